//! Any byte string must give Ok or Err from the IDX parsers, never a panic, abort, hang or
//! huge allocation. Seed the corpus with a small raw and a small gzipped IDX file.
#![no_main]

use adaptivenet_core::data::{parse_idx_images, parse_idx_labels};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(images) = parse_idx_images(data) {
        assert_eq!(
            images.pixels.len(),
            images.count * images.rows * images.cols
        );
    }
    let _ = parse_idx_labels(data);
});
