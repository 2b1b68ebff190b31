//! Random subsetting (gRFC A68) simulated with healthlb's own code: many
//! clients, each with its own random seed, keep `subset_size` of the pods.
//! It reports how many clients each pod gets (the spread), and how many
//! client connections move when one pod leaves or arrives (the churn).
//!
//! `cargo bench --bench subsetting` (pure computation, no sockets). Under
//! `cargo test --all-targets` it runs one small case.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;

use healthlb::internals::random_subset;

use healthlb_testkit as support;

fn pod(i: usize) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080))
}

/// Each client's subset of `pods`.
fn subsets(seeds: &[u64], pods: &[SocketAddr], size: usize) -> Vec<BTreeSet<SocketAddr>> {
    seeds
        .iter()
        .map(|&seed| random_subset(pods, size, seed).into_iter().collect())
        .collect()
}

struct Spread {
    mean: f64,
    min: usize,
    max: usize,
    /// Standard deviation over the mean.
    cv: f64,
    /// Pods whose client count is within ±10 % of the mean.
    within: f64,
}

fn spread(subsets: &[BTreeSet<SocketAddr>], pods: &[SocketAddr]) -> Spread {
    let mut clients: HashMap<SocketAddr, usize> = pods.iter().map(|p| (*p, 0)).collect();
    for subset in subsets {
        for pod in subset {
            *clients.get_mut(pod).expect("a known pod") += 1;
        }
    }
    let counts: Vec<usize> = clients.into_values().collect();
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<usize>() as f64 / n;
    let var = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let within = counts
        .iter()
        .filter(|&&c| (c as f64 - mean).abs() <= 0.1 * mean)
        .count() as f64
        / n;
    Spread {
        mean,
        min: counts.iter().copied().min().unwrap_or(0),
        max: counts.iter().copied().max().unwrap_or(0),
        cv: var.sqrt() / mean,
        within,
    }
}

/// Connections that change over all clients: pods a subset gained.
fn moved(before: &[BTreeSet<SocketAddr>], after: &[BTreeSet<SocketAddr>]) -> (usize, usize) {
    let mut connections = 0;
    let mut clients = 0;
    for (b, a) in before.iter().zip(after) {
        let gained = a.difference(b).count();
        connections += gained;
        clients += usize::from(gained > 0);
    }
    (connections, clients)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "| clients | pods | subset | clients per pod: mean | min | max | std ÷ mean | pods within ±10 % |"
    );
    let _ = writeln!(
        report,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let full = support::benchmarking();
    let cases: &[(usize, usize, usize)] = if full {
        &[
            (1000, 10_000, 20),
            (1000, 1000, 20),
            (1000, 100, 20),
            (10_000, 100, 20),
        ]
    } else {
        &[(100, 1000, 20)]
    };
    let mut churn = String::new();
    for &(n_clients, n_pods, size) in cases {
        let pods: Vec<SocketAddr> = (0..n_pods).map(pod).collect();
        let seeds: Vec<u64> = (0..n_clients).map(|_| rand::random()).collect();
        let before = subsets(&seeds, &pods, size);
        let s = spread(&before, &pods);
        let _ = writeln!(
            report,
            "| {n_clients} | {n_pods} | {size} | {:.1} | {} | {} | {:.1} % | {:.1} % |",
            s.mean,
            s.min,
            s.max,
            100.0 * s.cv,
            100.0 * s.within
        );
        if full && (n_clients, n_pods) != (1000, 10_000) {
            continue;
        }
        // Churn: 20 pods leave one at a time, then 20 new ones arrive.
        let (mut left_conns, mut left_clients, mut came_conns, mut came_clients) = (0, 0, 0, 0);
        let changes = if full { 20 } else { 2 };
        for k in 0..changes {
            let gone = pods[k * 499 % n_pods];
            let fewer: Vec<SocketAddr> = pods.iter().copied().filter(|p| *p != gone).collect();
            let (c, cl) = moved(&before, &subsets(&seeds, &fewer, size));
            left_conns += c;
            left_clients += cl;
            let mut more = pods.clone();
            more.push(pod(n_pods + k));
            let (c, cl) = moved(&before, &subsets(&seeds, &more, size));
            came_conns += c;
            came_clients += cl;
        }
        let per = |x: usize| x as f64 / changes as f64;
        let _ = writeln!(
            churn,
            "| one pod leaves | {:.2} | {:.2} | {:.1} |",
            per(left_conns),
            per(left_clients),
            s.mean
        );
        let _ = writeln!(
            churn,
            "| one pod arrives | {:.2} | {:.2} | {:.1} |",
            per(came_conns),
            per(came_clients),
            s.mean
        );
    }
    let _ = writeln!(
        report,
        "\nChurn, 1000 clients over 10,000 pods, subset 20, mean of 20 changes each:\n\n\
         | change | connections moved | clients affected | clients per pod (mean) |\n\
         | --- | ---: | ---: | ---: |\n{churn}"
    );
    println!("\n{report}");
    if !full {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/healthlb-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("subsetting.md"), &report);
}
