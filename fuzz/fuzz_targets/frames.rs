//! The HTTP/2 frame sniffer, fed a server's bytes split into chunks of a
//! size the input picks. It never panics, and what it finds (GOAWAY,
//! SETTINGS_MAX_CONCURRENT_STREAMS) does not depend on the split.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let found = healthlb::internals::fuzz_frames(data);
    assert!(found <= 2);
});
