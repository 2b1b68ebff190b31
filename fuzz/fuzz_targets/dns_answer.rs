//! The resolver's answer handling, fed raw DNS messages: records of every
//! type, CNAMEs, SRV, additional sections. It never panics, and the
//! endpoint cap holds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let kept = healthlb::internals::fuzz_dns_answer(data);
    assert!(kept <= 1024);
});
