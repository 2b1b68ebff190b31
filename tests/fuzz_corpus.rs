//! The fuzzers' corpus (`fuzz/corpus/`), replayed on stable Rust with the
//! fuzz targets' own assertions, so `cargo test` catches a regression on
//! any input a fuzzer once found, without cargo-fuzz or nightly.

use std::path::PathBuf;

/// Every file of one fuzz target's corpus.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

#[test]
fn the_frame_reader_finds_the_same_in_any_split() {
    let mut found = 0;
    for (path, bytes) in corpus("frames") {
        // Panics if a split changes what the reader saw.
        let n = healthlb::internals::fuzz_frames(&bytes);
        assert!(n <= 2, "{}", path.display());
        found += n;
    }
    assert!(found > 0, "the seeds hold a GOAWAY and a stream limit");
}

#[test]
fn dns_answers_keep_at_most_max_endpoints() {
    for (path, bytes) in corpus("dns_answer") {
        let kept = healthlb::internals::fuzz_dns_answer(&bytes);
        assert!(kept <= 1024, "{}: {kept}", path.display());
    }
}

#[test]
fn bad_targets_are_refused_by_name() {
    let mut refused = 0;
    for (path, bytes) in corpus("target") {
        let Ok(input) = std::str::from_utf8(&bytes) else {
            continue;
        };
        for default_port in [None, Some(443)] {
            if let Err(err) = healthlb::Target::parse(input, default_port) {
                assert!(
                    err.to_string()
                        .starts_with(&format!("invalid target {input:?}: ")),
                    "{}: {err}",
                    path.display()
                );
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the corpus holds bad targets");
}
