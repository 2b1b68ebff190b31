//! healthlb's benchmarks' shared parts: the peers they measure healthlb
//! against, side by side in one run, and servers in child processes. The
//! benchmarks themselves are in `benches/`: `cargo bench -p healthlb-bench
//! --bench NAME`. Under `cargo test -p healthlb-bench --benches` each makes
//! one short pass that checks it works.

pub mod anchor;
pub mod peers;
pub mod servers;
