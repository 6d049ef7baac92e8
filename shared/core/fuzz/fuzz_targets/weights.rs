//! Any byte string must give Ok or Err from the weight readers, never a panic, abort or hang.
//! Seed the corpus with ../tests/data/*.pth and a small safetensors file.
#![no_main]

use adaptivenet_core::weights::{read_tensors_from_bytes_with, ReadOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the options so both the skip and keep paths are explored.
    let Some((&flag, bytes)) = data.split_first() else {
        return;
    };
    let opts = ReadOptions {
        keep_integer_tensors: flag & 1 == 1,
    };
    let _ = read_tensors_from_bytes_with(bytes, opts);
});
