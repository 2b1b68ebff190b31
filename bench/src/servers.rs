//! Servers in child processes, so a benchmark's figures are the client's
//! alone: one tonic server with tonic-health per loopback address, up to
//! [`PER_CHILD`] per process. The child is the benchmark's own binary,
//! started with `HEALTHLB_SERVE=FROM:TO:PORT`; its `main` calls
//! [`serve_if_child`] first.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// The most addresses one server process serves: each holds a listener and
/// a connection per address, which keeps it within a 20,000-file limit.
pub const PER_CHILD: usize = 2500;

/// The `i`-th server address: 127.0.1.1 onwards, 250 per /24.
pub fn addr(i: usize, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8], port))
}

/// Server processes for the addresses `0..n`; they stop when dropped.
pub struct Servers {
    children: Vec<Child>,
    pub port: u16,
}

impl Servers {
    /// Echo backends (`support::echo`, with tonic-health) on the addresses
    /// `0..n`, in one child process.
    pub fn echo(n: usize, port: u16) -> Self {
        let (child, ready) = spawn_self("HEALTHLB_SERVE_ECHO", &format!("0:{n}:{port}"));
        assert_eq!(ready, "READY", "the echo server process started");
        Self {
            children: vec![child],
            port,
        }
    }

    pub fn start(n: usize, port: u16) -> Self {
        let mut children = Vec::new();
        for from in (0..n).step_by(PER_CHILD) {
            let to = (from + PER_CHILD).min(n);
            let (child, ready) = spawn_self("HEALTHLB_SERVE", &format!("{from}:{to}:{port}"));
            assert_eq!(ready, "READY", "the server process started");
            children.push(child);
        }
        Self { children, port }
    }

    /// An `ipv4:` target over the first `n` addresses.
    pub fn target(&self, n: usize) -> String {
        let list: Vec<String> = (0..n).map(|i| addr(i, self.port).to_string()).collect();
        format!("ipv4:{}", list.join(","))
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.children {
            // Closing stdin ends the child.
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// This benchmark's own binary as a child process, with `var=value` in its
/// environment, its stdin a pipe that ends it when closed; and the first
/// line it printed, trimmed (READY, as the children here say).
pub fn spawn_self(var: &str, value: &str) -> (Child, String) {
    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .env(var, value)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("server process");
    let mut ready = String::new();
    let stdout = child.stdout.take().expect("stdout");
    let _ = BufReader::new(stdout).read_line(&mut ready);
    (child, ready.trim().to_owned())
}

/// In a child started by [`Servers::start`]: serves until stdin closes,
/// then returns `true`. Otherwise returns `false` at once.
pub fn serve_if_child() -> bool {
    let spec = |var| {
        let spec = std::env::var(var).ok()?;
        let parts: Vec<usize> = spec
            .split(':')
            .map(|p| p.parse().expect("FROM:TO:PORT"))
            .collect();
        Some((parts[0], parts[1], parts[2] as u16))
    };
    if let Some((from, to, port)) = spec("HEALTHLB_SERVE") {
        serve(from, to, port);
        return true;
    }
    if let Some((from, to, port)) = spec("HEALTHLB_SERVE_ECHO") {
        serve_echo(from, to, port);
        return true;
    }
    false
}

/// Echo backends on the addresses `from..to`, each on its own thread as
/// the tests run them; says READY; lives until stdin closes.
fn serve_echo(from: usize, to: usize, port: u16) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut backends = Vec::new();
        for i in from..to {
            let name = format!("b{i}");
            backends.push(healthlb_testkit::echo::Backend::start(&name, addr(i, port)).await);
        }
        println!("READY");
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
        drop(backends);
    });
}

/// Serves tonic servers with tonic-health on the addresses `from..to`, all
/// in one runtime; says READY; lives until stdin closes.
fn serve(from: usize, to: usize, port: u16) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        for i in from..to {
            let listener = tokio::net::TcpListener::bind(addr(i, port))
                .await
                .expect("bind");
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let router = tonic::transport::Server::builder().add_service(health.clone());
            tokio::spawn(router.serve_with_incoming(incoming));
        }
        println!("READY");
        // The parent closes stdin when done, or dies.
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
    });
}
