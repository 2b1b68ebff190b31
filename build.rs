//! Compiles `proto/echo.proto`, the echo service that tests, examples and
//! benchmarks run behind the balancer, with the feature `internals` only:
//! the library itself has no use for it, so a user's build compiles neither
//! protox nor tonic-prost-build, and generates nothing. protox parses the
//! proto in pure Rust, so no `protoc` has to be installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "internals")]
    {
        println!("cargo:rerun-if-changed=proto/echo.proto");
        let fds = protox::compile(["echo.proto"], ["proto"])?;
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
