//! A hostile HTTP/2 server written frame by frame: it answers every stream
//! UNIMPLEMENTED at once (so a health Watch finds no health service and the
//! endpoint counts as SERVING), then, when told, floods DATA frames of 256
//! bytes (too big for h2's small-frame budget) on the streams it has
//! already closed, ids the client has forgotten.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;

/// What the server saw of its one connection.
#[derive(Debug, Default)]
pub struct Seen {
    /// Streams the client opened, all answered and closed.
    pub streams: std::sync::Mutex<Vec<u32>>,
    /// DATA frames sent on closed streams so far.
    pub flooded: AtomicU64,
    /// The error code and debug data of the client's GOAWAY, once one came.
    pub goaway: std::sync::Mutex<Option<(u32, String)>>,
    /// Flood frames sent before the GOAWAY arrived.
    pub flooded_at_goaway: AtomicU64,
    /// The client closed the connection.
    pub closed: AtomicBool,
    /// Connections accepted.
    pub accepted: AtomicU32,
}

pub struct Hostile {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    flood: mpsc::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Hostile {
    pub async fn start(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Seen::default());
        let (flood, floods) = mpsc::channel::<u64>(4);
        let floods = Arc::new(Mutex::new(floods));
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                // Only the first connection is watched and flooded.
                if shared.accepted.load(Ordering::SeqCst) > 1 {
                    continue;
                }
                let _ = tcp.set_nodelay(true);
                let (mut read, mut write) = tcp.into_split();
                let (frames, mut to_write) = mpsc::channel::<Vec<u8>>(1024);
                tokio::spawn(async move {
                    while let Some(frame) = to_write.recv().await {
                        if write.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                });
                let _ = frames.send(frame(SETTINGS, 0, 0, &[])).await;
                let seen = shared.clone();
                let replies = frames.clone();
                tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    if read.read_exact(&mut preface).await.is_err() {
                        return;
                    }
                    loop {
                        let mut head = [0u8; 9];
                        if read.read_exact(&mut head).await.is_err() {
                            seen.closed.store(true, Ordering::SeqCst);
                            return;
                        }
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let (kind, flags) = (head[3], head[4]);
                        let id =
                            u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & !(1 << 31);
                        let mut payload = vec![0u8; len];
                        if read.read_exact(&mut payload).await.is_err() {
                            seen.closed.store(true, Ordering::SeqCst);
                            return;
                        }
                        match kind {
                            SETTINGS if flags & 1 == 0 => {
                                let _ = replies.send(frame(SETTINGS, 1, 0, &[])).await;
                            }
                            PING if flags & 1 == 0 => {
                                let _ = replies.send(frame(PING, 1, 0, &payload)).await;
                            }
                            HEADERS => {
                                seen.streams.lock().unwrap().push(id);
                                let _ = replies
                                    .send(frame(HEADERS, 0x5, id, &unimplemented()))
                                    .await;
                            }
                            GOAWAY => {
                                let code = u32::from_be_bytes([
                                    payload[4], payload[5], payload[6], payload[7],
                                ]);
                                let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
                                *seen.goaway.lock().unwrap() = Some((code, debug));
                                let at = seen.flooded.load(Ordering::SeqCst);
                                seen.flooded_at_goaway.store(at, Ordering::SeqCst);
                            }
                            _ => {}
                        }
                    }
                });
                let seen = shared.clone();
                let floods = floods.clone();
                tokio::spawn(async move {
                    while let Some(n) = floods.lock().await.recv().await {
                        let ids = seen.streams.lock().unwrap().clone();
                        for _ in 0..n {
                            if seen.goaway.lock().unwrap().is_some() {
                                break;
                            }
                            let sent = seen.flooded.load(Ordering::SeqCst);
                            let id = ids[sent as usize % ids.len()];
                            if frames.send(frame(DATA, 0, id, &[0; 256])).await.is_err() {
                                return;
                            }
                            seen.flooded.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            flood,
            task,
        }
    }

    /// Sends `n` DATA frames, round the closed streams, unless a GOAWAY
    /// comes first.
    pub async fn flood(&self, n: u64) {
        let _ = self.flood.send(n).await;
        let target = self.seen.flooded.load(Ordering::SeqCst) + n;
        for _ in 0..1000 {
            if self.seen.flooded.load(Ordering::SeqCst) >= target
                || self.seen.goaway.lock().unwrap().is_some()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK for `:status: 200`, `content-type: application/grpc`,
/// `grpc-status: 12` (UNIMPLEMENTED): a trailers-only response.
fn unimplemented() -> Vec<u8> {
    let mut block = vec![0x88];
    for (name, value) in [("content-type", "application/grpc"), ("grpc-status", "12")] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}
