//! The supernet artifact: a versioned JSON manifest plus one content-addressed safetensors blob
//! per module (stem, head, every (position, choice)).
//!
//! A directory holds `manifest.json` and `blobs/<sha256>`. Blobs are named by the sha256 of
//! their bytes, so the cloud can host them by digest and a device fetches only the modules of
//! the subnets it runs. Every load checks size and hash before parsing and then checks every
//! tensor's shape against the manifest's spec. Parsers return errors, never panic.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{BlockSpec, ModelSpec, Params};
/// Re-exported: the artifact's blobs and manifest are written with these.
pub use crate::persist::{params_to_safetensors, sha256_hex, write_atomic};
use crate::supernet::{BranchKind, Choice, ChoiceSpec, ModuleKey, Subnet, Supernet, SupernetSpec};
use crate::{CoreError, Result};

/// Version of the manifest schema this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Upper bound on a manifest's size, so hostile input cannot make us allocate without bound.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

/// What a model expects as input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// (channels, height, width).
    pub shape: [usize; 3],
    /// Per-channel normalisation `(x/255 - mean) / std`.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub class_names: Vec<String>,
}

/// One module blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleEntry {
    pub sha256: String,
    pub size: u64,
    pub params: u64,
    pub macs: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChoiceEntry {
    /// Written as the research code's integer id (see [`Choice`]).
    pub id: Choice,
    pub span: usize,
    pub block: BlockSpec,
    /// Output (c, h, w) at the default input size.
    pub out_shape: [usize; 3],
    pub module: ModuleEntry,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionEntry {
    pub index: usize,
    /// Input (c, h, w) at the default input size.
    pub in_shape: [usize; 3],
    pub choices: Vec<ChoiceEntry>,
}

/// Cloud-side expectation for one subnet (evaluated after training).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prior {
    pub subnet: Subnet,
    pub macs: u64,
    pub accuracy: f64,
    pub samples: u64,
    /// Which split it was measured on (e.g. `validation`).
    pub split: String,
}

/// The manifest of a supernet artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub supernet_id: Uuid,
    /// sha256 of the oracle's weight file.
    pub oracle_digest: String,
    pub input: InputSpec,
    pub oracle: ModelSpec,
    pub branches: Vec<BranchKind>,
    pub oracle_params: u64,
    pub oracle_macs: u64,
    pub supernet_params: u64,
    pub subnet_count: String,
    pub stem: ModuleEntry,
    pub head: ModuleEntry,
    pub positions: Vec<PositionEntry>,
    #[serde(default)]
    pub priors: Vec<Prior>,
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Manifest {
    /// Parses and validates a manifest (version, digests, chain consistency, spans).
    pub fn from_json(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(CoreError::Manifest(format!(
                "{} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(bytes)?;
        match v.get("format_version").and_then(|x| x.as_u64()) {
            Some(1) => {}
            Some(other) => {
                return Err(CoreError::Manifest(format!(
                    "unsupported format_version {other} (this build reads {FORMAT_VERSION})"
                )))
            }
            None => return Err(CoreError::Manifest("format_version: missing".into())),
        }
        let m: Manifest =
            serde_json::from_value(v).map_err(|e| CoreError::Manifest(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(self)?)
    }

    fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(CoreError::Manifest(s));
        for (name, e) in self.modules() {
            if !is_hex_digest(&e.sha256) {
                return bad(format!(
                    "module {name}: sha256 is not 64 lowercase hex digits"
                ));
            }
        }
        let n = self.oracle.blocks.len();
        if self.positions.len() != n {
            return bad(format!(
                "{} positions but the oracle has {n} blocks",
                self.positions.len()
            ));
        }
        crate::model::ArchDescriptor::from_value(
            serde_json::json!({"family": "adaptivenet.chain", "spec": self.oracle}),
        )
        .map_err(|e| CoreError::Manifest(format!("oracle: {e}")))?;
        for (i, p) in self.positions.iter().enumerate() {
            if p.index != i {
                return bad(format!("positions[{i}].index is {}", p.index));
            }
            match p.choices.first() {
                Some(c) if c.id == Choice::Original && c.block == self.oracle.blocks[i] => {}
                _ => {
                    return bad(format!(
                        "positions[{i}]: first choice must be the original block"
                    ))
                }
            }
            for c in &p.choices {
                let kind = c.id.kind();
                if c.id != Choice::Original && kind.is_none() {
                    return bad(format!(
                        "positions[{i}]: choice id {} cannot stand at a position",
                        c.id.id()
                    ));
                }
                let span = kind.map_or(1, |k| k.span());
                if c.span != span || i + span > n {
                    return bad(format!(
                        "positions[{i}] choice {}: bad span {}",
                        c.id, c.span
                    ));
                }
                if c.block.cin() != self.oracle.blocks[i].cin()
                    || c.block.cout() != self.oracle.blocks[i + span - 1].cout()
                {
                    return bad(format!(
                        "positions[{i}] choice {}: channels do not fit the chain",
                        c.id
                    ));
                }
                if c.block.inner() == 0 || c.block.inner() > 1 << 16 {
                    return bad(format!("positions[{i}] choice {}: bad inner width", c.id));
                }
            }
        }
        Ok(())
    }

    /// Every module: (name, entry); names are `stem`, `head` and `p{pos}c{id}`.
    pub fn modules(&self) -> Vec<(String, &ModuleEntry)> {
        let mut v = vec![
            ("stem".to_string(), &self.stem),
            ("head".to_string(), &self.head),
        ];
        for p in &self.positions {
            for c in &p.choices {
                v.push((ModuleKey::new(p.index, c.id).name(), &c.module));
            }
        }
        v
    }

    /// The modules one subnet needs (stem, head and its chosen blocks).
    pub fn modules_for(&self, s: &Subnet) -> Result<Vec<(String, &ModuleEntry)>> {
        let spec = self.supernet_spec();
        spec.validate(s)?;
        let mut v = vec![
            ("stem".to_string(), &self.stem),
            ("head".to_string(), &self.head),
        ];
        for key in s.steps() {
            let c = self.positions[key.pos]
                .choices
                .iter()
                .find(|c| c.id == key.choice)
                .expect("validated");
            v.push((key.name(), &c.module));
        }
        Ok(v)
    }

    /// The supernet spec the manifest describes.
    pub fn supernet_spec(&self) -> SupernetSpec {
        SupernetSpec {
            oracle: self.oracle.clone(),
            branches: self.branches.clone(),
            positions: self
                .positions
                .iter()
                .map(|p| {
                    p.choices
                        .iter()
                        .map(|c| ChoiceSpec {
                            id: c.id,
                            span: c.span,
                            block: c.block.clone(),
                        })
                        .collect()
                })
                .collect(),
        }
    }
}

/// Parses a module blob after checking its size and digest against the manifest entry, then
/// checks every tensor against the expected shapes.
pub fn decode_module(
    name: &str,
    bytes: &[u8],
    entry: &ModuleEntry,
    expected: &[(String, Vec<usize>)],
) -> Result<Params> {
    let err = |reason: String| CoreError::Artifact {
        module: name.to_string(),
        reason,
    };
    if bytes.len() as u64 != entry.size {
        return Err(err(format!(
            "size {} does not match the manifest's {}",
            bytes.len(),
            entry.size
        )));
    }
    let digest = sha256_hex(bytes);
    if digest != entry.sha256 {
        return Err(err(format!(
            "sha256 {digest} does not match the manifest's {}",
            entry.sha256
        )));
    }
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| err(format!("not a safetensors blob: {e}")))?;
    let mut found: HashMap<String, Tensor> = HashMap::new();
    for (n, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(err(format!(
                "tensor {n}: dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        let t = Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), &Device::Cpu)?;
        found.insert(n, t);
    }
    let mut out = Params::new();
    for (n, shape) in expected {
        let t = found
            .remove(n)
            .ok_or_else(|| err(format!("missing tensor {n}")))?;
        if t.dims() != shape.as_slice() {
            return Err(err(format!(
                "tensor {n}: expected shape {shape:?}, found {:?}",
                t.dims()
            )));
        }
        out.insert(n.clone(), t);
    }
    if let Some(n) = found.keys().next() {
        return Err(err(format!("unexpected tensor {n}")));
    }
    Ok(out)
}

/// Where a content-addressed blob lives in an artifact (or blob-cache) directory.
pub fn blob_path(dir: &Path, sha256: &str) -> PathBuf {
    dir.join("blobs").join(sha256)
}

/// Where [`build_artifact`] puts module blobs: an artifact directory ([`DirBlobs`]) or any
/// content-addressed store (the cloud's blob store), so that a job needs no scratch copy.
pub trait BlobSink {
    /// The sink's error; core failures (serialisation) convert into it.
    type Error: From<CoreError>;
    /// Stores `bytes`, whose sha256 is `sha256`. Called once per module, so a digest shared by
    /// two modules comes twice: storing it again must be harmless.
    fn put(&mut self, sha256: &str, bytes: &[u8]) -> std::result::Result<(), Self::Error>;
}

/// Blobs as `<dir>/blobs/<sha256>` files, each written atomically.
#[derive(Clone, Copy, Debug)]
pub struct DirBlobs<'a>(pub &'a Path);

impl BlobSink for DirBlobs<'_> {
    type Error = CoreError;
    fn put(&mut self, sha256: &str, bytes: &[u8]) -> Result<()> {
        let path = blob_path(self.0, sha256);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(())
    }
}

fn module_entry<S: BlobSink>(
    params: &Params,
    macs: u64,
    sink: &mut S,
) -> std::result::Result<ModuleEntry, S::Error> {
    let bytes = params_to_safetensors(params.iter().map(|(n, t)| (n.as_str(), t.clone())))?;
    let sha = sha256_hex(&bytes);
    sink.put(&sha, &bytes)?;
    let params = params
        .iter()
        .filter(|(n, _)| !crate::model::spec::is_running_stat(n))
        .map(|(_, t)| t.elem_count() as u64)
        .sum();
    Ok(ModuleEntry {
        sha256: sha,
        size: bytes.len() as u64,
        params,
        macs,
    })
}

/// Writes a supernet as an artifact directory; the manifest is written last, so a reader
/// never sees a manifest whose blobs are missing.
pub fn write_artifact(
    dir: &Path,
    supernet: &Supernet,
    input: InputSpec,
    oracle_digest: &str,
    priors: Vec<Prior>,
) -> Result<Manifest> {
    let manifest = build_artifact(supernet, input, oracle_digest, priors, &mut DirBlobs(dir))?;
    write_atomic(&dir.join("manifest.json"), &manifest.to_json()?)?;
    Ok(manifest)
}

/// Puts every module blob of a supernet into `sink` and returns the manifest that lists them
/// (not stored anywhere: the caller records it once the blobs are in).
pub fn build_artifact<S: BlobSink>(
    supernet: &Supernet,
    input: InputSpec,
    oracle_digest: &str,
    priors: Vec<Prior>,
    sink: &mut S,
) -> std::result::Result<Manifest, S::Error> {
    let spec = &supernet.spec;
    let o = &spec.oracle;
    let [_, h, w] = o.input;
    let shapes = o.block_shapes(h, w);
    let stem = module_entry(&supernet.stem, o.stem.macs(&o.numerics, h, w), sink)?;
    let last = shapes[shapes.len() - 1];
    let head = module_entry(&supernet.head, o.head.macs(last[1], last[2]), sink)?;
    let mut positions = Vec::new();
    for (i, choices) in spec.positions.iter().enumerate() {
        let in_shape = shapes[i];
        let mut entries = Vec::new();
        for c in choices {
            let macs = c.block.macs(&o.numerics, in_shape[1], in_shape[2]);
            let module = module_entry(supernet.module(ModuleKey::new(i, c.id))?, macs, sink)?;
            entries.push(ChoiceEntry {
                id: c.id,
                span: c.span,
                block: c.block.clone(),
                out_shape: shapes[i + c.span],
                module,
            });
        }
        positions.push(PositionEntry {
            index: i,
            in_shape,
            choices: entries,
        });
    }
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        supernet_id: Uuid::new_v4(),
        oracle_digest: oracle_digest.to_string(),
        input,
        oracle: o.clone(),
        branches: spec.branches.clone(),
        oracle_params: o.num_params(),
        oracle_macs: o.macs(),
        supernet_params: spec.num_params(),
        subnet_count: spec.count().to_string(),
        stem,
        head,
        positions,
        priors,
    })
}

/// Reads and validates `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).map_err(|e| CoreError::io(&path, e))?;
    Manifest::from_json(&bytes)
}

/// Loads a supernet from an artifact (or blob-cache) directory. With `subnets`, only the
/// modules those subnets use are read (what an edge device holds); otherwise all.
pub fn load_supernet(
    dir: &Path,
    manifest: &Manifest,
    subnets: Option<&[Subnet]>,
) -> Result<Supernet> {
    let spec = manifest.supernet_spec();
    let read = |name: &str, e: &ModuleEntry, expected: &[(String, Vec<usize>)]| -> Result<Params> {
        let path = blob_path(dir, &e.sha256);
        let bytes = std::fs::read(&path).map_err(|err| CoreError::Artifact {
            module: name.to_string(),
            reason: format!("cannot read {}: {err}", path.display()),
        })?;
        decode_module(name, &bytes, e, expected)
    };
    let stem = read("stem", &manifest.stem, &manifest.oracle.stem.param_shapes())?;
    let head = read("head", &manifest.head, &manifest.oracle.head.param_shapes())?;
    let mut wanted: Vec<ModuleKey> = match subnets {
        Some(list) => {
            let mut v = Vec::new();
            for s in list {
                spec.validate(s)?;
                v.extend(s.steps());
            }
            v
        }
        None => spec
            .positions
            .iter()
            .enumerate()
            .flat_map(|(i, cs)| cs.iter().map(move |c| ModuleKey::new(i, c.id)))
            .collect(),
    };
    wanted.sort_unstable();
    wanted.dedup();
    let mut modules = BTreeMap::new();
    for key in wanted {
        let c = manifest.positions[key.pos]
            .choices
            .iter()
            .find(|c| c.id == key.choice)
            .ok_or_else(|| CoreError::InvalidSubnet {
                position: key.pos,
                reason: format!("choice '{}' not in manifest", key.choice),
            })?;
        let p = read(&key.name(), &c.module, &c.block.param_shapes())?;
        modules.insert(key, p);
    }
    Ok(Supernet {
        spec,
        stem,
        head,
        modules,
    })
}
