//! The target parser never panics, and its errors name the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    for default_port in [None, Some(443)] {
        if let Err(err) = healthlb::Target::parse(input, default_port) {
            assert!(err.to_string().starts_with(&format!("invalid target {input:?}: ")));
        }
    }
});
