//! A TCP proxy between the balancer and a backend that can go silent (a
//! black hole, like a node that lost power) or inject an HTTP/2 GOAWAY, as
//! grpc-go and C-core servers send for `too_many_pings`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug, Default)]
pub struct State {
    silent: AtomicBool,
    /// GOAWAYs to inject, one per connection, then close it.
    goaways: AtomicUsize,
    pub accepted: AtomicUsize,
    pub open: AtomicUsize,
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `backend`.
    pub async fn start(listen: SocketAddr, backend: SocketAddr) -> Self {
        let listener = TcpListener::bind(listen).await.expect("bind proxy");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let state = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(backend).await else {
                        return;
                    };
                    state.open.fetch_add(1, Ordering::SeqCst);
                    relay(client, server, &state).await;
                    state.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self { addr, state, task }
    }

    /// Stops forwarding in both directions without closing anything.
    pub fn go_silent(&self, silent: bool) {
        self.state.silent.store(silent, Ordering::SeqCst);
    }

    /// The next server-to-client frame boundary on one open connection gets a
    /// GOAWAY ENHANCE_YOUR_CALM "too_many_pings", and the connection closes.
    pub fn send_too_many_pings(&self) {
        self.state.goaways.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, state: &State) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            wait_while_silent(state).await;
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            wait_while_silent(state).await;
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Server to client frame by frame, so a GOAWAY lands on a boundary.
    let downstream = async {
        let mut header = [0u8; 9];
        loop {
            if server_read.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; len];
            if server_read.read_exact(&mut payload).await.is_err() {
                return;
            }
            wait_while_silent(state).await;
            if client_write.write_all(&header).await.is_err()
                || client_write.write_all(&payload).await.is_err()
            {
                return;
            }
            let take = state
                .goaways
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if take {
                let _ = client_write.write_all(&too_many_pings()).await;
                let _ = client_write.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

async fn wait_while_silent(state: &State) {
    while state.silent.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GOAWAY, last stream 0, ENHANCE_YOUR_CALM (0xb), "too_many_pings".
fn too_many_pings() -> Vec<u8> {
    let debug = b"too_many_pings";
    let len = 8 + debug.len();
    let mut frame = vec![0, 0, len as u8, 0x7, 0, 0, 0, 0, 0];
    frame.extend_from_slice(&0u32.to_be_bytes());
    frame.extend_from_slice(&0xbu32.to_be_bytes());
    frame.extend_from_slice(debug);
    frame
}
