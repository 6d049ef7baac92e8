//! PyTorch checkpoints: the zip format (`torch.save` >= 1.6) and the legacy non-zip format.
//!
//! Both describe tensors with the same pickle: `_rebuild_tensor_v2(storage, offset, size,
//! stride, ...)` where `storage` is a persistent id `('storage', <Type>Storage, key, location,
//! numel[, view_metadata])`. They differ in where the storage bytes live: zip entries
//! `<prefix>/data/<key>`, or (legacy) a data section after five back-to-back pickles holding,
//! per key of the fifth pickle's list, an i64 LE element count and the raw bytes.
use std::collections::HashMap;
use std::io::Read;

use super::pickle::{self, Value, V};
use super::{Budget, ElemType, Fail, RawTensor};

/// A tensor found in the pickle, before its storage is read.
struct Spec {
    name: String,
    key: String,
    elem: ElemType,
    /// Storage offset in elements (already including a legacy view's offset).
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// What the pickle says about a storage.
struct StorageRef {
    key: String,
    elem: ElemType,
    /// Offset (elements) of a legacy storage view into its root storage.
    view_offset: usize,
}

fn storage_elem(class: &str) -> Option<ElemType> {
    Some(match class {
        "FloatStorage" => ElemType::F32,
        "DoubleStorage" => ElemType::F64,
        "HalfStorage" => ElemType::F16,
        "BFloat16Storage" => ElemType::BF16,
        "LongStorage" => ElemType::I64,
        "IntStorage" => ElemType::I32,
        "ShortStorage" => ElemType::I16,
        "CharStorage" => ElemType::I8,
        "ByteStorage" => ElemType::U8,
        "BoolStorage" => ElemType::Bool,
        _ => return None,
    })
}

fn nonneg(v: &V, what: &str, name: &str) -> Result<usize, String> {
    v.val
        .as_int()
        .and_then(|i| usize::try_from(i).ok())
        .ok_or_else(|| format!("tensor {name}: {what} is not a non-negative integer"))
}

/// A tuple of non-negative ints (also accepts `torch.Size((...))`).
fn dims(v: &V, what: &str, name: &str) -> Result<Vec<usize>, String> {
    let v = match &v.val {
        Value::Call { callable, args } if callable.val.is_global("torch", "Size") => args
            .val
            .as_seq()
            .and_then(|a| a.first())
            .ok_or_else(|| format!("tensor {name}: malformed torch.Size"))?,
        _ => v,
    };
    let items = v
        .val
        .as_seq()
        .ok_or_else(|| format!("tensor {name}: {what} is not a tuple"))?;
    if items.len() > 32 {
        return Err(format!("tensor {name}: {what} has rank {}", items.len()));
    }
    items.iter().map(|i| nonneg(i, what, name)).collect()
}

fn storage_ref(v: &V, name: &str) -> Result<StorageRef, String> {
    let bad = |why: &str| format!("tensor {name}: storage reference {why}");
    let Value::PersId(id) = &v.val else {
        return Err(bad("is not a persistent id"));
    };
    let t = id.val.as_seq().ok_or_else(|| bad("is not a tuple"))?;
    if t.len() < 5 || t[0].val.as_str() != Some("storage") {
        return Err(bad("is not ('storage', type, key, location, numel, ...)"));
    }
    let elem = match &t[1].val {
        Value::Global {
            module,
            name: class,
        } if module == "torch" => storage_elem(class)
            .ok_or_else(|| bad(&format!("has unsupported storage type torch.{class}")))?,
        _ => return Err(bad("has no torch storage type")),
    };
    let key = match &t[2].val {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => return Err(bad("has a non-string key")),
    };
    // Legacy view_metadata: (view_key, offset, view_size); offset in elements.
    let view_offset = match t.get(5).map(|v| &v.val) {
        Some(Value::Tuple(vm)) if vm.len() == 3 => nonneg(&vm[1], "view offset", name)?,
        Some(Value::None) | None => 0,
        Some(_) => return Err(bad("has malformed view metadata")),
    };
    Ok(StorageRef {
        key,
        elem,
        view_offset,
    })
}

/// Recognises a tensor-valued pickle object; `Ok(None)` for anything else (skipped).
fn tensor_spec(name: &str, v: &V, depth: u32) -> Result<Option<Spec>, String> {
    if depth > 8 {
        return Ok(None);
    }
    let (callable, args) = match &v.val {
        Value::Call { callable, args } => (callable, args),
        Value::Build { obj, .. } => return tensor_spec(name, obj, depth + 1),
        _ => return Ok(None),
    };
    let Value::Global { module, name: func } = &callable.val else {
        return Ok(None);
    };
    let a = args.val.as_seq().unwrap_or(&[]);
    match (module.as_str(), func.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            if a.len() < 4 {
                return Err(format!("tensor {name}: {func} with {} args", a.len()));
            }
            let st = storage_ref(&a[0], name)?;
            let offset = nonneg(&a[1], "storage offset", name)?
                .checked_add(st.view_offset)
                .ok_or_else(|| format!("tensor {name}: storage offset overflows"))?;
            let shape = dims(&a[2], "size", name)?;
            let stride = dims(&a[3], "stride", name)?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "tensor {name}: size {shape:?} and stride {stride:?} differ in rank"
                ));
            }
            Ok(Some(Spec {
                name: name.to_owned(),
                key: st.key,
                elem: st.elem,
                offset,
                shape,
                stride,
            }))
        }
        // nn.Parameter(data, requires_grad, hooks[, state]).
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => match a.first() {
            Some(data) => tensor_spec(name, data, depth + 1),
            None => Err(format!("tensor {name}: {func} without data")),
        },
        // Tensor subclasses: _rebuild_from_type_v2(func, type, args, state).
        ("torch._tensor", "_rebuild_from_type_v2") => {
            if a.len() < 3 {
                return Err(format!("tensor {name}: {func} with {} args", a.len()));
            }
            let inner = std::rc::Rc::new(pickle::Obj::call(a[0].clone(), a[2].clone()));
            tensor_spec(name, &inner, depth + 1)
        }
        _ => Ok(None),
    }
}

/// Keys under which training scripts nest the state dict, in order of preference.
const STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model_state_dict", "model"];

/// The tensors of a state dict: the top object itself, or its `state_dict` (or
/// `model_state_dict`, `model`) entry when that is a dict.
fn collect_specs(root: &V) -> Result<Vec<Spec>, String> {
    let Value::Dict(items) = &root.val else {
        return Err(
            "the pickled object is not a dict (a whole pickled nn.Module is not \
                    supported: save its state_dict)"
                .into(),
        );
    };
    let nested = STATE_DICT_KEYS.iter().find_map(|key| {
        items.iter().find_map(|(k, v)| match &v.val {
            Value::Dict(inner) if k.val.as_str() == Some(*key) => Some(inner),
            _ => None,
        })
    });
    let items = nested.unwrap_or(items);
    let mut out = Vec::new();
    for (k, v) in items {
        let Some(name) = k.val.as_str() else { continue };
        if let Some(spec) = tensor_spec(name, v, 0)? {
            out.push(spec);
        }
    }
    Ok(out)
}

fn work_limit(len: usize) -> u64 {
    (len as u64).saturating_mul(8).saturating_add(1 << 16)
}

/// Turns specs plus storages into tensors; integer tensors are skipped unless asked for.
fn materialise(
    specs: Vec<Spec>,
    storages: &HashMap<String, (ElemType, &[u8])>,
    budget: &mut Budget,
) -> Result<Vec<RawTensor>, String> {
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        if !s.elem.is_float() && !budget.keep_integers {
            continue;
        }
        let (elem, data) = storages
            .get(&s.key)
            .ok_or_else(|| format!("tensor {}: storage {} not found", s.name, s.key))?;
        if *elem != s.elem {
            return Err(format!(
                "tensor {}: storage {} is used with two element types",
                s.name, s.key
            ));
        }
        let values = super::gather(&s.name, data, s.elem, s.offset, &s.shape, &s.stride, budget)?;
        out.push(RawTensor {
            name: s.name,
            shape: s.shape,
            values,
        });
    }
    Ok(out)
}

/// Most bytes a `.pth` archive may inflate to, whatever its size: `torch.save` stores its
/// entries uncompressed, so a real checkpoint inflates to about its own size; the cloud
/// accepts uploads up to 512 MiB.
pub const MAX_INFLATED_BYTES: u64 = 1 << 30;

/// The inflation budget of a zip archive of `archive_len` bytes: 16x the archive plus
/// 16 MiB, at most [`MAX_INFLATED_BYTES`]. A decompression bomb (an entry claiming ~1000x
/// its compressed size) is refused before anything is inflated, so reading an untrusted
/// checkpoint costs memory in proportion to its size.
pub fn inflate_budget(archive_len: usize) -> u64 {
    (archive_len as u64)
        .saturating_mul(16)
        .saturating_add(16 << 20)
        .min(MAX_INFLATED_BYTES)
}

/// The zip format: `<prefix>/data.pkl` plus one entry per storage.
pub(super) fn read_zip(bytes: &[u8], budget: &mut Budget) -> Result<Vec<RawTensor>, Fail> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| Fail(format!("not a readable zip archive: {e}")))?;
    // What the central directory claims, before inflating anything.
    let mut inflate_left = inflate_budget(bytes.len());
    let mut claimed = 0u64;
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| Fail(format!("zip entry {i}: {e}")))?;
        claimed = claimed.saturating_add(f.size());
    }
    if claimed > inflate_left {
        return Err(Fail(format!(
            "zip entries claim {claimed} bytes inflated, over the budget of {inflate_left} bytes              for a {}-byte archive (16x its size + 16 MiB, at most {MAX_INFLATED_BYTES}):              refused as a decompression bomb",
            bytes.len()
        )));
    }
    let pkl_name = zip
        .file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .map(str::to_owned)
        .ok_or_else(|| Fail("zip archive has no data.pkl (not a torch.save file)".into()))?;
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_owned();

    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = Vec::new();
        f.by_ref()
            .take(16)
            .read_to_end(&mut order)
            .map_err(|e| Fail(format!("reading byteorder: {e}")))?;
        if order.trim_ascii() != b"little" {
            return Err(Fail(format!(
                "byte order {:?} is not supported (only little-endian)",
                String::from_utf8_lossy(&order)
            )));
        }
    }

    let pkl = read_entry(&mut zip, &pkl_name, &mut inflate_left)?;
    let mut pos = 0;
    let root = pickle::parse(&pkl, &mut pos, work_limit(pkl.len())).map_err(Fail)?;
    let specs = collect_specs(&root).map_err(Fail)?;

    let mut owned: HashMap<String, (ElemType, Vec<u8>)> = HashMap::new();
    for s in &specs {
        if (!s.elem.is_float() && !budget.keep_integers) || owned.contains_key(&s.key) {
            continue;
        }
        let entry = format!("{prefix}data/{}", s.key);
        let data = read_entry(&mut zip, &entry, &mut inflate_left)
            .map_err(|Fail(e)| Fail(format!("tensor {}: {e}", s.name)))?;
        owned.insert(s.key.clone(), (s.elem, data));
    }
    let storages = owned
        .iter()
        .map(|(k, (e, d))| (k.clone(), (*e, d.as_slice())))
        .collect();
    materialise(specs, &storages, budget).map_err(Fail)
}

/// Reads a zip entry within the archive's remaining inflation budget `left`: never more than
/// the entry claims nor than the budget holds, whatever the compressed stream expands to.
fn read_entry(
    zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
    left: &mut u64,
) -> Result<Vec<u8>, Fail> {
    let f = zip
        .by_name(name)
        .map_err(|e| Fail(format!("zip entry {name}: {e}")))?;
    let size = f.size();
    if size > *left {
        return Err(Fail(format!(
            "zip entry {name} claims {size} bytes, over the {} bytes left of the archive's              inflation budget: refused as a decompression bomb",
            *left
        )));
    }
    // One byte past the claim tells an entry that inflates to more than it declares.
    let mut out = Vec::new();
    f.take(size.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| Fail(format!("zip entry {name}: {e}")))?;
    if out.len() as u64 > size {
        return Err(Fail(format!(
            "zip entry {name} inflates beyond the {size} bytes it claims: refused as a \
             decompression bomb"
        )));
    }
    *left -= out.len() as u64;
    Ok(out)
}

/// The legacy format's magic number, 0x1950a86a20f9469cfc6c, as LONG1 little-endian bytes.
pub(super) const LEGACY_MAGIC: [u8; 10] =
    [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The legacy (pre-1.6) format.
pub(super) fn read_legacy(bytes: &[u8], budget: &mut Budget) -> Result<Vec<RawTensor>, Fail> {
    let limit = work_limit(bytes.len());
    let mut pos = 0;
    let next = |what: &str, pos: &mut usize| {
        pickle::parse(bytes, pos, limit).map_err(|e| Fail(format!("{what} pickle: {e}")))
    };
    let magic = next("magic number", &mut pos)?;
    if !matches!(&magic.val, Value::BigInt(b) if b[..] == LEGACY_MAGIC) {
        return Err(Fail("bad magic number (not a torch legacy file)".into()));
    }
    let proto = next("protocol version", &mut pos)?;
    if proto.val.as_int() != Some(1001) {
        return Err(Fail(format!(
            "unsupported legacy protocol version {:?}",
            proto.val.as_int()
        )));
    }
    let sys_info = next("sys_info", &mut pos)?;
    if let Value::Dict(items) = &sys_info.val {
        let le = items
            .iter()
            .find(|(k, _)| k.val.as_str() == Some("little_endian"))
            .map(|(_, v)| v.val.as_int());
        if le == Some(Some(0)) {
            return Err(Fail("big-endian legacy files are not supported".into()));
        }
    }
    let root = next("state dict", &mut pos)?;
    let keys = next("storage keys", &mut pos)?;
    let keys: Vec<String> = keys
        .val
        .as_seq()
        .ok_or_else(|| Fail("storage key list is not a list".into()))?
        .iter()
        .map(|k| match &k.val {
            Value::Str(s) => Ok(s.clone()),
            Value::Int(i) => Ok(i.to_string()),
            _ => Err(Fail("storage key is not a string".into())),
        })
        .collect::<Result<_, _>>()?;

    let specs = collect_specs(&root).map_err(Fail)?;
    // Element sizes per key: the data section has no types of its own.
    let mut elem_of: HashMap<&str, ElemType> = HashMap::new();
    for s in &specs {
        if let Some(prev) = elem_of.insert(&s.key, s.elem) {
            if prev != s.elem {
                return Err(Fail(format!(
                    "storage {} is used with two element types",
                    s.key
                )));
            }
        }
    }
    let mut storages: HashMap<String, (ElemType, &[u8])> = HashMap::new();
    for key in &keys {
        let elem = *elem_of.get(key.as_str()).ok_or_else(|| {
            Fail(format!(
                "storage {key} is listed but no tensor gives its type"
            ))
        })?;
        let count = bytes
            .get(pos..pos.saturating_add(8))
            .ok_or_else(|| Fail(format!("file truncated before storage {key}")))?;
        let count = i64::from_le_bytes(count.try_into().expect("8 bytes"));
        let nbytes = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(elem.size()))
            .ok_or_else(|| Fail(format!("storage {key}: invalid element count {count}")))?;
        let start = pos + 8;
        let data = start
            .checked_add(nbytes)
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| {
                Fail(format!(
                    "storage {key}: {count} elements need {nbytes} bytes, file has {}",
                    bytes.len().saturating_sub(start)
                ))
            })?;
        pos = start + nbytes;
        if storages.insert(key.clone(), (elem, data)).is_some() {
            return Err(Fail(format!("storage {key} listed twice")));
        }
    }
    materialise(specs, &storages, budget).map_err(Fail)
}
