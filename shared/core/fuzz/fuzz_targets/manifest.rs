//! Manifest parser and subnet-code parser on arbitrary bytes: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = adaptivenet_core::artifact::Manifest::from_json(data) {
        let spec = m.supernet_spec();
        let _ = spec.count();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = adaptivenet_core::supernet::Subnet::parse(s);
    }
});
