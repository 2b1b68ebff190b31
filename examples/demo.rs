//! healthlb end to end, with nothing to install.
//!
//! ```sh
//! cargo run --example demo                 # the ~30 s story below
//! cargo run --example demo -- --phase 2    # each phase 2 s instead of 6 s
//! cargo run --example demo -- --target dns:///echo.default.svc.cluster.local:50051
//! ```
//!
//! It starts a DNS server (hickory-server) and four echo backends with
//! tonic-health on 127.0.0.2–127.0.0.5:50051, all in this process, and sends
//! calls through one `LbChannel` from 8 callers while it plays a story:
//! steady traffic, one backend NOT_SERVING, a scale-up to five, a backend
//! killed, and a rolling restart onto new addresses. Each second it prints
//! what the balancer thinks of every endpoint. It ends with the total and
//! the failed calls.
//!
//! With `--target`, it balances over a real target instead, with steady
//! traffic only.

use healthlb_testkit as support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use healthlb::LbChannel;
use support::dns::TestDns;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, loopback};

const HOST: &str = "echo.demo.local";
const CALLERS: usize = 8;

struct Args {
    phase: Duration,
    port: u16,
    target: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        phase: Duration::from_secs(6),
        port: 50051,
        target: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--phase" => {
                let secs: f64 = value()?.parse().map_err(|_| "--phase takes seconds")?;
                args.phase = Duration::from_secs_f64(secs.clamp(0.5, 60.0));
            }
            "--port" => args.port = value()?.parse().map_err(|_| "--port takes a port number")?,
            "--target" => args.target = Some(value()?),
            "--help" | "-h" => {
                return Err("usage: demo [--phase SECS] [--port PORT] [--target TARGET]".into());
            }
            other => return Err(format!("unknown flag {other}; try --help")),
        }
    }
    Ok(args)
}

#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    failed: AtomicU64,
}

#[tokio::main]
async fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let steps = (args.phase.as_secs_f64().ceil().max(1.0) as u32) * 5;
    if let Some(target) = &args.target {
        let channel = match LbChannel::builder(target.clone()).build() {
            Ok(channel) => channel,
            Err(error) => {
                eprintln!("{error}");
                std::process::exit(2);
            }
        };
        let load = Load::start(&channel);
        let mut last = HashMap::new();
        for _ in 0..steps {
            tokio::time::sleep(Duration::from_secs(1)).await;
            print_table(&channel, &mut last, load.start.elapsed());
        }
        load.finish().await;
        return;
    }

    let dns = TestDns::start().await;
    let mut backends = Vec::new();
    for n in 2..=5 {
        backends.push(Backend::start(&format!("pod-{n}"), loopback(n, args.port)).await);
    }
    publish(&dns, &backends);
    let target = dns.target(HOST, args.port);
    println!(
        "DNS on {}; backends on 127.0.0.2-5:{}; target {target}\n",
        dns.addr(),
        args.port
    );

    let channel = LbChannel::builder(target)
        .resolution(|r| r.min_refresh(Duration::from_millis(500)))
        .build()
        .expect("the demo's target is valid");
    let load = Load::start(&channel);
    let mut last = HashMap::new();
    for step in 0..steps {
        story(step, args.phase, args.port, &dns, &mut backends).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        print_table(&channel, &mut last, load.start.elapsed());
    }
    load.finish().await;
}

/// The story, one phase per `phase`.
async fn story(step: u32, phase: Duration, port: u16, dns: &TestDns, backends: &mut Vec<Backend>) {
    let per_phase = phase.as_secs_f64().ceil().max(1.0) as u32;
    if !step.is_multiple_of(per_phase) {
        return;
    }
    match step / per_phase {
        0 => println!("== steady traffic over 4 pods"),
        1 => {
            println!("== pod-2 reports NOT_SERVING (alive, not ready)");
            backends[0].set_serving(false).await;
        }
        2 => {
            println!("== scale-up: pod-6 joins DNS (TTL 1 s)");
            backends[0].set_serving(true).await;
            backends.push(Backend::start("pod-6", loopback(6, port)).await);
            publish(dns, backends);
        }
        3 => {
            println!("== pod-3 is killed: no GOAWAY, its connections just die");
            let killed = backends.remove(1);
            killed.kill().await;
        }
        4 => {
            println!(
                "== rolling restart onto new addresses: NOT_SERVING, drain 200 ms, stop, replace"
            );
            let old = std::mem::take(backends);
            for (i, backend) in old.into_iter().enumerate() {
                let n = 10 + i as u8;
                backend.set_serving(false).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                backends.push(Backend::start(&format!("pod-{n}"), loopback(n, port)).await);
                publish(dns, backends);
                backend.stop().await;
            }
        }
        _ => {}
    }
}

fn publish(dns: &TestDns, backends: &[Backend]) {
    dns.zone()
        .set_a(HOST, &support::ipv4s(backends.iter().map(|b| b.addr)), 1);
}

/// Calls from `CALLERS` tasks, until finished.
struct Load {
    totals: Arc<Totals>,
    stop: Arc<AtomicBool>,
    callers: Vec<tokio::task::JoinHandle<()>>,
    start: Instant,
}

impl Load {
    fn start(channel: &LbChannel) -> Self {
        let totals = Arc::new(Totals::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut callers = Vec::new();
        for _ in 0..CALLERS {
            let (channel, totals, stop) = (channel.clone(), totals.clone(), stop.clone());
            callers.push(tokio::spawn(async move {
                let mut client = EchoClient::new(channel);
                // Bounded in count as well as time.
                for _ in 0..2_000_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    totals.sent.fetch_add(1, Ordering::Relaxed);
                    let request = tonic::Request::new(EchoRequest {
                        message: "demo".into(),
                    });
                    if let Err(status) = client.unary(request).await {
                        totals.failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("call failed: {:?}: {}", status.code(), status.message());
                    }
                }
            }));
        }
        Self {
            totals,
            stop,
            callers,
            start: Instant::now(),
        }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for caller in self.callers {
            let _ = caller.await;
        }
        let sent = self.totals.sent.load(Ordering::Relaxed);
        let failed = self.totals.failed.load(Ordering::Relaxed);
        println!("\n{sent} calls sent, {failed} failed");
    }
}

fn print_table(channel: &LbChannel, last: &mut HashMap<SocketAddr, u64>, at: Duration) {
    let mut line = format!("t={:>4.1}s ", at.as_secs_f64());
    for endpoint in channel.endpoints() {
        let before = last
            .insert(endpoint.addr, endpoint.calls_started)
            .unwrap_or(endpoint.calls_started);
        let rate = endpoint.calls_started.saturating_sub(before);
        line.push_str(&format!(
            " | {} {:<11} {:>5}/s",
            endpoint.addr.ip(),
            endpoint.state.label(),
            rate
        ));
    }
    println!("{line}");
}
