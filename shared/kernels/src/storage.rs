//! Access to candle CPU storage, and output buffers that are written once.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout};

use crate::KernelError;

fn dtype_name(s: &CpuStorage) -> &'static str {
    use candle_core::backend::BackendStorage;
    s.dtype().as_str()
}

/// The contiguous f32 data of `s` under layout `l`.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
    arg: &'static str,
) -> Result<&'a [f32], KernelError> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => {
            return Err(KernelError::DType {
                op,
                arg,
                dtype: dtype_name(other),
            })
        }
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(KernelError::NotContiguous { op, arg }),
    }
}

pub(crate) fn dims4(
    l: &Layout,
    op: &'static str,
) -> Result<(usize, usize, usize, usize), KernelError> {
    match l.shape().dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        d => Err(KernelError::Shape(format!(
            "{op}: expected a rank-4 tensor, got shape {d:?}"
        ))),
    }
}

/// A vector of `n` floats that `fill` writes completely, without zeroing it first (a
/// `vec![0; n]` of a reused heap block is a memset: an extra pass over every output).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn filled(n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all `n` elements (the caller's contract).
    unsafe { v.set_len(n) };
    v
}
