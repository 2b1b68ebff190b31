//! Memory per open stream: the client's live heap and resident memory with
//! 10,000 streams open through one `LbChannel`.
//!
//! Two kinds of stream, each held open after its first reply:
//! - server streams: the request (one small message) has been sent whole;
//! - bidi streams: the client sent 1 KiB, 16 messages of 1 KiB, or 3 of
//!   16 KiB, and keeps its side open, as a subscription or a chat does.
//!
//! The server (a tonic echo server with tonic-health that allows 100,000
//! concurrent streams) runs in a child process, the same binary, so the
//! figures are the client's alone. Live heap bytes come from a counting
//! global allocator in this binary: exact, and not blurred by the
//! allocator's caching the way RSS is.
//!
//! `cargo bench --bench streams` (`HEALTHLB_STREAMS`, default 10000, sets
//! the number of streams.)

use healthlb_bench::servers;
use healthlb_testkit as support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use healthlb::LbChannel;
use support::echo::pb::echo_client::EchoClient;
use support::echo::pb::{EchoReply, EchoRequest, StreamRequest};
use support::echo::{Backend, Options, free_port, loopback};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Counts the bytes this process has allocated and not freed.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; the counter
// only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed) as i64
}

/// Resident memory of this process, in bytes.
fn rss() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The child: one echo server allowing 100,000 streams; prints its address
/// and lives until stdin closes.
fn serve(port: u16) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let options = Options {
            max_concurrent_streams: Some(100_000),
            ..Options::default()
        };
        let backend = Backend::start_with("s", loopback(1, port), options).await;
        println!("READY {}", backend.addr);
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
        backend.kill().await;
    });
}

/// What holding `n` streams costs, per stream.
struct Cost {
    heap: f64,
    rss: f64,
    opened: usize,
    took: Duration,
}

/// Opens `n` streams with `open`, measures, then drops them all.
async fn measure<H, F>(n: usize, open: impl Fn() -> F) -> Cost
where
    F: Future<Output = Option<H>>,
{
    let (heap_before, rss_before) = (live(), rss());
    let start = Instant::now();
    let held: Vec<H> = futures::stream::iter(0..n)
        .map(|_| open())
        .buffer_unordered(256)
        .filter_map(|h| async move { h })
        .collect()
        .await;
    let took = start.elapsed();
    // Let background work settle before reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let opened = held.len().max(1);
    let cost = Cost {
        heap: (live() - heap_before) as f64 / opened as f64,
        rss: (rss() - rss_before) as f64 / opened as f64,
        opened: held.len(),
        took,
    };
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cost
}

/// A bidi stream that has sent `messages` messages of `kib` KiB and got
/// each echoed back, with its request side still open.
async fn bidi_stream(
    channel: &LbChannel,
    messages: usize,
    kib: usize,
) -> Option<(mpsc::Sender<EchoRequest>, tonic::Streaming<EchoReply>)> {
    let mut client = EchoClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(messages);
    let message = "x".repeat(kib * 1024);
    for _ in 0..messages {
        tx.send(EchoRequest {
            message: message.clone(),
        })
        .await
        .ok()?;
    }
    let mut replies = client
        .bidi(ReceiverStream::new(rx))
        .await
        .ok()?
        .into_inner();
    for _ in 0..messages {
        replies.message().await.ok()??;
    }
    Some((tx, replies))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Ok(port) = std::env::var("HEALTHLB_STREAMS_SERVE") {
        serve(port.parse().expect("PORT"));
        return;
    }
    let default = if support::benchmarking() { 10_000 } else { 200 };
    let n: usize = std::env::var("HEALTHLB_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(1, 100_000);

    let port = free_port();
    let (mut child, ready) = servers::spawn_self("HEALTHLB_STREAMS_SERVE", &port.to_string());
    let addr = ready
        .strip_prefix("READY ")
        .expect("the server process started")
        .to_owned();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (server, bidi) = runtime.block_on(async {
        let channel = LbChannel::builder(format!("ipv4:{addr}"))
            .connect()
            .await
            .expect("the channel connects");
        let limit = Duration::from_secs(120);

        let server = tokio::time::timeout(
            limit,
            measure(n, || {
                let mut client = EchoClient::new(channel.clone());
                async move {
                    let request = StreamRequest {
                        message: "s".into(),
                        count: 2,
                        interval_ms: 600_000,
                    };
                    let mut replies = client.server_stream(request).await.ok()?.into_inner();
                    replies.message().await.ok()??;
                    Some(replies)
                }
            }),
        )
        .await
        .expect("server streams opened in time");

        let mut bidi = Vec::new();
        for (messages, kib) in [(1, 1), (16, 1), (3, 16)] {
            let cost =
                tokio::time::timeout(limit, measure(n, || bidi_stream(&channel, messages, kib)))
                    .await
                    .expect("bidi streams opened in time");
            bidi.push((messages, kib, cost));
        }
        (server, bidi)
    });
    drop(runtime);
    drop(child.stdin.take());
    let _ = child.wait();

    let mut report = String::new();
    let _ = writeln!(
        report,
        "| streams open | kind | client heap per stream | client RSS per stream | opened in |"
    );
    let _ = writeln!(report, "| ---: | --- | ---: | ---: | ---: |");
    let mut rows = vec![("server streaming".to_owned(), &server)];
    for (messages, kib, cost) in &bidi {
        rows.push((format!("bidi, {messages} × {kib} KiB sent"), cost));
    }
    for (kind, cost) in rows {
        let _ = writeln!(
            report,
            "| {} | {kind} | {:.1} KiB | {:.1} KiB | {:.2} s |",
            cost.opened,
            cost.heap / 1024.0,
            cost.rss / 1024.0,
            cost.took.as_secs_f64()
        );
    }
    println!("\n{report}");
    if !support::benchmarking() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/healthlb-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("streams.md"), &report);
}
