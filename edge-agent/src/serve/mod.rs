//! Serving the active subnet behind an atomic swap.
//!
//! The active model is an `Arc` behind a `RwLock`: a request clones the `Arc` (the lock is
//! held for that clone only) and runs on it, so in-flight requests finish on the old subnet
//! while a switch installs a new one. A switch loads only the modules that differ from the
//! active subnet (the rest share tensor storage) and verifies them; if a load fails, nothing
//! is swapped and the old subnet keeps serving.
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use adaptivenet_core::artifact::{
    blob_path, decode_module, load_supernet, read_manifest, Manifest,
};
use adaptivenet_core::model::Params;
use adaptivenet_core::supernet::{module_name, Subnet, Supernet};
use adaptivenet_core::CoreError;
use candle_core::Tensor;

use crate::profile::quantile;
use crate::Result;

/// A local supernet artifact directory (manifest + verified blobs).
#[derive(Clone, Debug)]
pub struct ArtifactSource {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl ArtifactSource {
    /// Reads and validates the manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(ArtifactSource {
            dir: dir.to_path_buf(),
            manifest: read_manifest(dir)?,
        })
    }

    /// Loads stem, head and the modules of `subnets` (all modules with `None`), with BN
    /// folded into the convs: the device only runs inference, and folded modules take one
    /// fused kernel per layer.
    pub fn load(&self, subnets: Option<&[Subnet]>) -> Result<Supernet> {
        let mut sn = load_supernet(&self.dir, &self.manifest, subnets)?;
        sn.fold()?;
        Ok(sn)
    }

    /// Loads and verifies one (position, choice) module.
    pub fn load_module(&self, pos: usize, id: i8) -> Result<Params> {
        let name = module_name(pos, id);
        let c = self
            .manifest
            .positions
            .get(pos)
            .and_then(|p| p.choices.iter().find(|c| c.id == id))
            .ok_or_else(|| CoreError::Artifact {
                module: name.clone(),
                reason: "not in the manifest".into(),
            })?;
        let path = blob_path(&self.dir, &c.module.sha256);
        let bytes = std::fs::read(&path).map_err(|e| CoreError::Artifact {
            module: name.clone(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let params = decode_module(&name, &bytes, &c.module, &c.block.param_shapes())?;
        Ok(adaptivenet_core::model::fold::fold_params(
            &params,
            self.manifest.oracle.numerics.bn_eps,
        )?)
    }
}

/// The subnet being served, with only its own modules in memory.
#[derive(Debug)]
pub struct ActiveModel {
    pub subnet: Subnet,
    pub supernet: Supernet,
    /// Increases with every switch; tags latency samples so a window never mixes subnets.
    pub version: u64,
}

/// What a switch did.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchReport {
    pub from: Subnet,
    pub to: Subnet,
    pub loaded: usize,
    pub reused: usize,
    pub millis: f64,
}

/// Live latency samples of the active version (a sliding window).
#[derive(Debug)]
struct Window {
    version: u64,
    samples: VecDeque<f64>,
    cap: usize,
}

/// The serving core: active model, swap, live latency window.
#[derive(Debug)]
pub struct Server {
    source: ArtifactSource,
    active: RwLock<Arc<ActiveModel>>,
    switching: Mutex<()>,
    window: Mutex<Window>,
}

impl Server {
    /// Loads `subnet`'s modules and starts serving it. `window` is the number of latency
    /// samples kept.
    pub fn start(source: ArtifactSource, subnet: &Subnet, window: usize) -> Result<Server> {
        let supernet = source.load(Some(std::slice::from_ref(subnet)))?;
        Ok(Server {
            source,
            active: RwLock::new(Arc::new(ActiveModel {
                subnet: subnet.clone(),
                supernet,
                version: 0,
            })),
            switching: Mutex::new(()),
            window: Mutex::new(Window {
                version: 0,
                samples: VecDeque::new(),
                cap: window.max(1),
            }),
        })
    }

    pub fn source(&self) -> &ArtifactSource {
        &self.source
    }

    /// The model serving now (cheap `Arc` clone).
    pub fn active(&self) -> Arc<ActiveModel> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs one request batch on the active subnet and records its latency.
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        let m = self.active();
        let t = Instant::now();
        let y = m.supernet.forward(&m.subnet, x)?;
        self.record(m.version, t.elapsed().as_secs_f64() * 1e3);
        Ok(y)
    }

    /// Records a latency sample (ms) measured on model `version`; samples of an older
    /// version are dropped, so the window always describes the subnet serving now.
    pub fn record(&self, version: u64, ms: f64) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if version != w.version {
            return;
        }
        if w.samples.len() == w.cap {
            w.samples.pop_front();
        }
        w.samples.push_back(ms);
    }

    /// (samples, p50, p95) of the current window.
    pub fn window_stats(&self) -> (usize, f64, f64) {
        let w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<f64> = w.samples.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        (v.len(), quantile(&v, 0.5), quantile(&v, 0.95))
    }

    /// Switches to `target`, loading only the modules that differ. On error the old subnet
    /// keeps serving.
    pub fn switch(&self, target: &Subnet) -> Result<SwitchReport> {
        let _guard = self.switching.lock().unwrap_or_else(|e| e.into_inner());
        let t = Instant::now();
        let cur = self.active();
        cur.supernet.spec.validate(target)?;
        let (mut loaded, mut reused) = (0, 0);
        let mut modules = BTreeMap::new();
        for (p, id) in target.steps() {
            let params = match cur.supernet.modules.get(&(p, id)) {
                Some(m) => {
                    reused += 1;
                    m.clone()
                }
                None => {
                    loaded += 1;
                    self.source.load_module(p, id)?
                }
            };
            modules.insert((p, id), params);
        }
        let next = Arc::new(ActiveModel {
            subnet: target.clone(),
            supernet: Supernet {
                spec: cur.supernet.spec.clone(),
                stem: cur.supernet.stem.clone(),
                head: cur.supernet.head.clone(),
                modules,
            },
            version: cur.version + 1,
        });
        let version = next.version;
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = next;
        {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            w.version = version;
            w.samples.clear();
        }
        Ok(SwitchReport {
            from: cur.subnet.clone(),
            to: target.clone(),
            loaded,
            reused,
            millis: t.elapsed().as_secs_f64() * 1e3,
        })
    }
}
