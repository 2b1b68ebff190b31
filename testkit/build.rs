//! Compiles `proto/echo.proto`, the echo service the tests, examples and
//! benchmarks run behind the balancer, and cncf/xds's ORCA protos vendored
//! in `../proto/xds`, so the tests can hold healthlb's own ORCA types
//! against generated code. protox parses them in pure Rust, so no `protoc`
//! has to be installed.

use std::path::{Path, PathBuf};

/// The ORCA protos, from the crate's `proto/` directory.
const ORCA: [&str; 2] = [
    "xds/data/orca/v3/orca_load_report.proto",
    "xds/service/orca/v3/orca.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    let files = protox::compile(["echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(files)?;

    // The `validate.rules` options need protoc-gen-validate's proto; they
    // change no field number or type, so they are left out here.
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("orca-proto");
    for file in ORCA {
        let from = Path::new("../proto").join(file);
        println!("cargo:rerun-if-changed={}", from.display());
        let text = std::fs::read_to_string(&from)?;
        let to = out.join(file);
        std::fs::create_dir_all(to.parent().expect("a directory"))?;
        std::fs::write(to, without_validate(&text))?;
    }
    let files = protox::compile(ORCA, [&out])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(files)?;
    Ok(())
}

/// `text` without the `validate` import and the `[(validate.rules)…]`
/// field options.
fn without_validate(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('[') {
        let close = rest[at..].find(']').map(|i| at + i);
        match close {
            Some(close) if rest[at..close].contains("validate.rules") => {
                out.push_str(rest[..at].trim_end());
                rest = &rest[close + 1..];
            }
            _ => {
                out.push_str(&rest[..=at]);
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out.lines()
        .filter(|line| !line.contains("validate/validate.proto"))
        .collect::<Vec<_>>()
        .join("\n")
}
