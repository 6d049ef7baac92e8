//! Weight-file readers: safetensors, PyTorch zip `.pth` (torch.save >= 1.6) and legacy non-zip
//! `.pth` (pre-1.6 torch.save), detected from content rather than file extension.
//!
//! Every tensor comes back as a contiguous f32 CPU tensor in file order (pickle dict order for
//! `.pth`, data-offset order for safetensors). f16, bf16 and f64 are converted to f32.
//! **Integer and bool tensors** (e.g. BatchNorm's int64 `num_batches_tracked`) **are skipped**:
//! no model here consumes them, and silently turning counters into f32 parameters would only
//! invite shape-mismatch noise. [`ReadOptions::keep_integer_tensors`] returns them as f32
//! instead (exact up to 2^24).
//!
//! PyTorch tensors are gathered honouring (shape, stride, storage offset) for any strides, since
//! real checkpoints store permuted views (EfficientNet-Lite0 keeps TF's HWIO layout in storage).
//!
//! Hostile input never panics: lengths, offsets and strides are checked against the bytes
//! actually present; pickle evaluation and output size are bounded relative to the input size.
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{CoreError, Result};

mod pickle;
mod torch;

pub use torch::{inflate_budget, MAX_INFLATED_BYTES};

/// The container formats [`read_tensors`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Hugging Face safetensors (8-byte LE header length, JSON header, raw data).
    Safetensors,
    /// PyTorch >= 1.6 `torch.save`: a zip with `data.pkl` and one entry per storage.
    TorchZip,
    /// PyTorch < 1.6 `torch.save`: five pickles back to back, then raw storages.
    TorchLegacy,
}

/// Options for [`read_tensors_from_bytes_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Return integer/bool tensors converted to f32 instead of skipping them.
    pub keep_integer_tensors: bool,
}

/// Reads every floating-point tensor of a weight file as contiguous f32 on CPU; integer tensors
/// (`num_batches_tracked`) are skipped. See the module docs.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    read_impl(&bytes, &path.display().to_string(), ReadOptions::default())
}

/// [`read_tensors`] on an in-memory file.
pub fn read_tensors_from_bytes(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    read_impl(bytes, BYTES_LABEL, ReadOptions::default())
}

/// [`read_tensors_from_bytes`] with options.
pub fn read_tensors_from_bytes_with(
    bytes: &[u8],
    opts: ReadOptions,
) -> Result<Vec<(String, Tensor)>> {
    read_impl(bytes, BYTES_LABEL, opts)
}

/// Identifies the container format from the first bytes.
pub fn detect_format(bytes: &[u8]) -> Result<WeightFormat> {
    detect(bytes).map_err(|Fail(reason)| CoreError::WeightFormat {
        path: BYTES_LABEL.into(),
        reason,
    })
}

const BYTES_LABEL: &str = "<bytes>";

/// An error message without the file name (added by [`read_impl`]).
struct Fail(String);

impl From<String> for Fail {
    fn from(s: String) -> Self {
        Fail(s)
    }
}

fn detect(bytes: &[u8]) -> std::result::Result<WeightFormat, Fail> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Ok(WeightFormat::TorchZip);
    }
    if let [0x80, proto, rest @ ..] = bytes {
        if (2..=5).contains(proto) {
            // Protocol 4+ may open with an 8-byte FRAME.
            let rest = match rest {
                [0x95, tail @ ..] if tail.len() >= 8 => &tail[8..],
                _ => rest,
            };
            if rest.starts_with(&[0x8a, 0x0a]) && rest[2..].starts_with(&torch::LEGACY_MAGIC) {
                return Ok(WeightFormat::TorchLegacy);
            }
        }
    }
    if bytes.len() >= 9 {
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if bytes[8] == b'{' && n <= (bytes.len() - 8) as u64 {
            return Ok(WeightFormat::Safetensors);
        }
    }
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(Fail(format!(
        "unrecognised weight format (first bytes {}): expected safetensors, a PyTorch zip \
         checkpoint or a legacy PyTorch checkpoint",
        head.join(" ")
    )))
}

fn read_impl(bytes: &[u8], label: &str, opts: ReadOptions) -> Result<Vec<(String, Tensor)>> {
    let wrap = |Fail(reason)| CoreError::WeightFormat {
        path: label.to_owned(),
        reason,
    };
    let mut budget = Budget {
        // Output elements: shared storages (tied weights) and strided views may exceed the
        // input size a little, but a 4x blow-up of a real file is implausible.
        left: (bytes.len() as u64)
            .saturating_mul(4)
            .saturating_add(1 << 20),
        keep_integers: opts.keep_integer_tensors,
    };
    let raw = match detect(bytes).map_err(wrap)? {
        WeightFormat::Safetensors => read_safetensors(bytes, &mut budget),
        WeightFormat::TorchZip => torch::read_zip(bytes, &mut budget),
        WeightFormat::TorchLegacy => torch::read_legacy(bytes, &mut budget),
    }
    .map_err(wrap)?;
    raw.into_iter()
        .map(|t| {
            let tensor = Tensor::from_vec(t.values, t.shape, &Device::Cpu)?;
            Ok((t.name, tensor))
        })
        .collect()
}

/// A decoded tensor before it becomes a candle tensor.
struct RawTensor {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Read-wide limits and options.
struct Budget {
    /// Output elements still allowed.
    left: u64,
    keep_integers: bool,
}

/// Element types of stored data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElemType {
    F32,
    F64,
    F16,
    BF16,
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    Bool,
}

impl ElemType {
    fn size(self) -> usize {
        match self {
            ElemType::I8 | ElemType::U8 | ElemType::Bool => 1,
            ElemType::F16 | ElemType::BF16 | ElemType::I16 | ElemType::U16 => 2,
            ElemType::F32 | ElemType::I32 | ElemType::U32 => 4,
            ElemType::F64 | ElemType::I64 | ElemType::U64 => 8,
        }
    }
    fn is_float(self) -> bool {
        matches!(
            self,
            ElemType::F32 | ElemType::F64 | ElemType::F16 | ElemType::BF16
        )
    }
    /// Decoder of one little-endian element (the slice has at least `size()` bytes).
    fn decoder(self) -> fn(&[u8]) -> f32 {
        fn a<const N: usize>(b: &[u8]) -> [u8; N] {
            let mut out = [0u8; N];
            out.copy_from_slice(&b[..N]);
            out
        }
        match self {
            ElemType::F32 => |b| f32::from_le_bytes(a(b)),
            ElemType::F64 => |b| f64::from_le_bytes(a(b)) as f32,
            ElemType::F16 => |b| half::f16::from_le_bytes(a(b)).to_f32(),
            ElemType::BF16 => |b| half::bf16::from_le_bytes(a(b)).to_f32(),
            ElemType::I8 => |b| b[0] as i8 as f32,
            ElemType::U8 => |b| b[0] as f32,
            ElemType::Bool => |b| (b[0] != 0) as u8 as f32,
            ElemType::I16 => |b| i16::from_le_bytes(a(b)) as f32,
            ElemType::U16 => |b| u16::from_le_bytes(a(b)) as f32,
            ElemType::I32 => |b| i32::from_le_bytes(a(b)) as f32,
            ElemType::U32 => |b| u32::from_le_bytes(a(b)) as f32,
            ElemType::I64 => |b| i64::from_le_bytes(a(b)) as f32,
            ElemType::U64 => |b| u64::from_le_bytes(a(b)) as f32,
        }
    }
}

/// Gathers a strided view of `data` (elements of `elem`) into a contiguous f32 vector, after
/// checking that every index it touches lies inside the storage.
fn gather(
    name: &str,
    data: &[u8],
    elem: ElemType,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
    budget: &mut Budget,
) -> std::result::Result<Vec<f32>, String> {
    debug_assert_eq!(shape.len(), stride.len());
    let esize = elem.size();
    let avail = data.len() / esize;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("tensor {name}: shape {shape:?} overflows"))?;
    if numel as u64 > budget.left {
        return Err(format!(
            "tensor {name}: {numel} elements exceed what a file of this size can hold"
        ));
    }
    budget.left -= numel as u64;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let last = shape
        .iter()
        .zip(stride)
        .try_fold(offset, |acc, (&d, &s)| {
            (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
        })
        .ok_or_else(|| format!("tensor {name}: stride {stride:?} overflows"))?;
    if last >= avail {
        return Err(format!(
            "tensor {name}: storage too short: it holds {avail} elements but shape {shape:?}, \
             stride {stride:?}, offset {offset} reads element {last}"
        ));
    }
    let dec = elem.decoder();
    let mut out = Vec::with_capacity(numel);
    let contiguous = {
        let mut expect = 1usize;
        shape.iter().zip(stride).rev().all(|(&d, &s)| {
            let ok = d == 1 || s == expect;
            expect = expect.saturating_mul(d);
            ok
        })
    };
    if contiguous {
        let bytes = &data[offset * esize..(offset + numel) * esize];
        out.extend(bytes.chunks_exact(esize).map(dec));
        return Ok(out);
    }
    // Odometer over the index space; `pos` stays within [offset, last] whenever it is read, and
    // the wrapping arithmetic undoes itself exactly on carry.
    let rank = shape.len();
    let mut idx = vec![0usize; rank];
    let mut pos = offset;
    loop {
        out.push(dec(&data[pos * esize..]));
        let mut d = rank;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            idx[d] += 1;
            pos = pos.wrapping_add(stride[d]);
            if idx[d] < shape[d] {
                break;
            }
            pos = pos.wrapping_sub(stride[d].wrapping_mul(shape[d]));
            idx[d] = 0;
        }
    }
}

fn read_safetensors(
    bytes: &[u8],
    budget: &mut Budget,
) -> std::result::Result<Vec<RawTensor>, Fail> {
    use safetensors::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Fail(format!("safetensors: {e}")))?;
    let mut views = st.tensors();
    views.sort_by(|(an, a), (bn, b)| {
        (a.data().as_ptr() as usize, an).cmp(&(b.data().as_ptr() as usize, bn))
    });
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        let elem = match view.dtype() {
            Dtype::F32 => ElemType::F32,
            Dtype::F64 => ElemType::F64,
            Dtype::F16 => ElemType::F16,
            Dtype::BF16 => ElemType::BF16,
            Dtype::I8 => ElemType::I8,
            Dtype::U8 => ElemType::U8,
            Dtype::I16 => ElemType::I16,
            Dtype::U16 => ElemType::U16,
            Dtype::I32 => ElemType::I32,
            Dtype::U32 => ElemType::U32,
            Dtype::I64 => ElemType::I64,
            Dtype::U64 => ElemType::U64,
            Dtype::BOOL => ElemType::Bool,
            other => {
                return Err(Fail(format!(
                    "tensor {name}: unsupported safetensors dtype {other}"
                )))
            }
        };
        if !elem.is_float() && !budget.keep_integers {
            continue;
        }
        let shape = view.shape().to_vec();
        let mut stride = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1].saturating_mul(shape[i + 1]);
        }
        let values = gather(&name, view.data(), elem, 0, &shape, &stride, budget)?;
        out.push(RawTensor {
            name,
            shape,
            values,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            left: 1 << 20,
            keep_integers: false,
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn gather_honours_permuted_strides() {
        // Storage laid out as (C, R) = (3, 2) row-major; view as (R, C) = (2, 3), stride (1, 2).
        let data = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
        let v = gather(
            "t",
            &data,
            ElemType::F32,
            0,
            &[2, 3],
            &[1, 2],
            &mut budget(),
        )
        .unwrap();
        assert_eq!(v, vec![0., 2., 4., 1., 3., 5.]);
        // With an offset and a size-1 dim with a huge stride.
        let v = gather(
            "t",
            &data,
            ElemType::F32,
            1,
            &[1, 2],
            &[usize::MAX, 2],
            &mut budget(),
        )
        .unwrap();
        assert_eq!(v, vec![1., 3.]);
    }

    #[test]
    fn gather_rejects_out_of_bounds_and_overflow() {
        let data = f32_bytes(&[0.; 6]);
        let e = gather(
            "w",
            &data,
            ElemType::F32,
            1,
            &[2, 3],
            &[3, 1],
            &mut budget(),
        )
        .unwrap_err();
        assert!(e.contains("tensor w") && e.contains("too short"), "{e}");
        assert!(gather(
            "w",
            &data,
            ElemType::F32,
            0,
            &[2, 2],
            &[usize::MAX, 1],
            &mut budget()
        )
        .is_err());
        assert!(gather(
            "w",
            &data,
            ElemType::F32,
            0,
            &[usize::MAX, 4],
            &[0, 0],
            &mut budget()
        )
        .is_err());
        // Stride-0 broadcast beyond the budget.
        assert!(gather(
            "w",
            &data,
            ElemType::F32,
            0,
            &[1 << 30],
            &[0],
            &mut budget()
        )
        .is_err());
    }

    #[test]
    fn scalar_and_empty_tensors() {
        let data = f32_bytes(&[7.]);
        assert_eq!(
            gather("s", &data, ElemType::F32, 0, &[], &[], &mut budget()).unwrap(),
            vec![7.]
        );
        assert!(
            gather("e", &[], ElemType::F32, 5, &[0, 3], &[3, 1], &mut budget())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn detect_formats() {
        assert_eq!(
            detect_format(b"PK\x03\x04rest").unwrap(),
            WeightFormat::TorchZip
        );
        let mut legacy = vec![0x80, 0x02, 0x8a, 0x0a];
        legacy.extend_from_slice(&torch::LEGACY_MAGIC);
        assert_eq!(detect_format(&legacy).unwrap(), WeightFormat::TorchLegacy);
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{}");
        assert_eq!(detect_format(&st).unwrap(), WeightFormat::Safetensors);
        assert!(detect_format(b"").is_err());
        assert!(detect_format(b"\x80\x02K\x01.").is_err());
    }
}
