//! Making one HTTP/2 connection to one endpoint: TCP, TLS when
//! configured, h2's handshake, and the task that drives the connection (h2's
//! own, and the PINGs of `ping.rs`).
//!
//! healthlb drives h2 itself rather than a tonic `Channel` (or hyper's
//! client under it), because the balancer must see what a `Channel` hides:
//! why the connection ended (a GOAWAY and its code, such as
//! `too_many_pings`), and which requests never left the client, so they can
//! go to another endpoint; and because a call queued from its own task costs
//! a third less than one handed to a dispatch task (`stream.rs`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::conn::{Conn, Origin, Role, Slots};
use super::frames::FrameSniffer;
pub(crate) use super::frames::GoAway;
use super::io::{Io, Signals, WatchedIo};
use super::ping::{KeepAliveSettings, Pinger, Ponged};
use super::stream::Released;
use crate::Error;

/// The future that drives a connection's request dispatch. It ends when the
/// connection can take no more requests: after a GOAWAY, or when it closes.
pub(crate) type Driver = Pin<Box<dyn Future<Output = Result<(), Ended>> + Send>>;

/// Reset streams a connection remembers for h2's 1 s, so that their late
/// frames are dropped quietly: 1,024 cancels a second (h2's default is 50).
const RESET_STREAMS_REMEMBERED: usize = 1024;

/// hyper's defaults, kept from when healthlb drove hyper: the spec's 64 KiB
/// windows are too small for most gRPC traffic.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The windows the adaptive window starts from: HTTP/2's own.
const SPEC_WINDOW: u32 = 65_535;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams opened before the server's SETTINGS say how many it takes: the
/// least RFC 9113 recommends a server allow.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Frames for streams a connection has forgotten that it answers (each with
/// a RST_STREAM it must queue) before it closes the connection with GOAWAY
/// ENHANCE_YOUR_CALM: 10,000 in its life, ten times h2's default. Late
/// frames of cancelled calls land on remembered streams and cost nothing
/// here; only a connection cancelling more than 1,024 streams a second
/// with answers on the way spends from it. Without a cap, a server that
/// sends frames on old stream ids grows the client's queue without bound.
const FORGOTTEN_STREAM_FRAMES: usize = 10_000;

/// Per-connection settings that change between connections of one endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Http2Settings {
    pub(crate) keep_alive_interval: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) keep_alive_while_idle: bool,
    pub(crate) initial_stream_window_size: Option<u32>,
    pub(crate) initial_connection_window_size: Option<u32>,
    pub(crate) adaptive_window: bool,
}

/// What a subchannel connects with.
pub(crate) struct Dialer {
    pub(crate) addr: SocketAddr,
    pub(crate) origin: Arc<Origin>,
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) tcp_nodelay: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<super::tls::TlsConfig>,
    pub(crate) slots: Arc<Slots>,
}

impl Dialer {
    /// Connects: TCP, TLS when configured, then the HTTP/2 handshake. The
    /// caller bounds it in time.
    pub(crate) async fn connect(
        &self,
        settings: Http2Settings,
        role: Role,
    ) -> Result<(Arc<Conn>, Driver), Error> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr).await.map_err(|e| {
            let label = match e.kind() {
                io::ErrorKind::ConnectionRefused => "connect refused",
                io::ErrorKind::TimedOut => "connect timed out",
                _ => "connect failed",
            };
            Error::connect(
                label,
                format!("connecting to {addr} failed: {e}"),
                Some(e.into()),
            )
        })?;
        // Small gRPC messages must not wait for Nagle.
        let _ = tcp.set_nodelay(self.tcp_nodelay);
        if let Some(idle) = self.tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new().with_time(idle);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        }

        #[cfg(feature = "tls")]
        let io: Box<dyn Io> = match &self.tls {
            Some(tls) => Box::new(tls.handshake(addr, &self.origin.authority, tcp).await?),
            None => Box::new(tcp),
        };
        #[cfg(not(feature = "tls"))]
        let io: Box<dyn Io> = Box::new(tcp);

        let established = Instant::now();
        let signals = Arc::new(Signals::new());
        let io = WatchedIo {
            io,
            epoch: established,
            signals: signals.clone(),
            frames: FrameSniffer::default(),
            registered: None,
        };
        // A window given turns the adaptive one off, as in hyper.
        let adaptive = settings.adaptive_window
            && settings.initial_stream_window_size.is_none()
            && settings.initial_connection_window_size.is_none();
        let (stream_window, connection_window) = match adaptive {
            true => (SPEC_WINDOW, SPEC_WINDOW),
            false => (
                settings.initial_stream_window_size.unwrap_or(STREAM_WINDOW),
                settings
                    .initial_connection_window_size
                    .unwrap_or(CONNECTION_WINDOW),
            ),
        };
        let mut builder = h2::client::Builder::new();
        builder
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            // A cancelled call (a hedge that lost, a deadline) may still
            // have frames on the way. h2 remembers only 50 reset streams,
            // and each frame for a forgotten one counts against a limit of
            // 1,024 per connection's life, after which the client closes its
            // own connection (ENHANCE_YOUR_CALM) and fails every call on it.
            // Remember more, so late frames are dropped quietly, and keep a
            // cap for a server that sends frames on old ids on purpose.
            .max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED)
            .max_local_error_reset_streams(Some(FORGOTTEN_STREAM_FRAMES));
        let (send, mut connection) = builder.handshake::<_, Bytes>(io).await.map_err(|e| {
            Error::connect(
                "HTTP/2 handshake failed",
                format!("the HTTP/2 handshake with {addr} failed: {e}"),
                Some(e.into()),
            )
        })?;
        let keep_alive = settings
            .keep_alive_interval
            .map(|interval| KeepAliveSettings {
                interval,
                timeout: settings.keep_alive_timeout,
                while_idle: settings.keep_alive_while_idle,
            });
        let conn = Arc::new(Conn {
            addr,
            send: arc_swap::ArcSwapOption::from_pointee(send),
            origin: self.origin.clone(),
            established,
            role,
            signals: signals.clone(),
            slots: self.slots.clone(),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
            idle_since: AtomicU64::new(0),
            released: Arc::default(),
        });
        let pinger = match (keep_alive.is_some() || adaptive, connection.ping_pong()) {
            (true, Some(pong)) => Some(Pinger::new(
                pong,
                keep_alive,
                adaptive.then_some(stream_window),
                signals,
                established,
                Arc::downgrade(&conn),
            )),
            _ => None,
        };
        // The connection runs in a task of its own, as in tonic, so a call
        // wakes only it, not the subchannel's health and probe work.
        // Dropping the driver aborts it, which closes the connection. The
        // connection's sender goes with the task, however it ends.
        let ended = TaskEnded(Arc::downgrade(&conn));
        let released = conn.released.clone();
        let task = AbortOnDrop(tokio::spawn(async move {
            let _ended = ended;
            ConnTask {
                connection,
                pinger,
                released,
                spare: Vec::new(),
            }
            .await
        }));
        Ok((conn, Box::pin(task)))
    }
}

/// h2's connection and its PINGs, polled by the connection's task.
struct ConnTask {
    connection: h2::client::Connection<WatchedIo, Bytes>,
    pinger: Option<Pinger>,
    /// Finished streams the callers handed back, released here.
    released: Arc<Released>,
    spare: Vec<h2::RecvStream>,
}

impl Future for ConnTask {
    type Output = Result<(), Ended>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.released.release(&mut this.spare);
        let polled = Pin::new(&mut this.connection)
            .poll(cx)
            .map_err(Ended::Http2);
        if polled.is_ready() {
            return polled;
        }
        // After h2's turn, which read what arrived: the PINGs see it.
        while let Some(Poll::Ready(ponged)) = this.pinger.as_mut().map(|p| p.poll(cx)) {
            match ponged {
                Ponged::TimedOut => {
                    this.pinger = None;
                    return Poll::Ready(Err(Ended::KeepAliveTimedOut));
                }
                Ponged::Window(size) => {
                    this.connection.set_target_window_size(size);
                    if let Err(e) = this.connection.set_initial_window_size(size) {
                        return Poll::Ready(Err(Ended::Http2(e)));
                    }
                }
            }
        }
        Poll::Pending
    }
}

/// Drops the connection's sender when its task ends: completed, failed,
/// panicked or aborted.
struct TaskEnded(std::sync::Weak<Conn>);

impl Drop for TaskEnded {
    fn drop(&mut self) {
        if let Some(conn) = self.0.upgrade() {
            conn.task_ended();
        }
    }
}

/// How a connection's driver ended, when not cleanly.
#[derive(Debug)]
pub(crate) enum Ended {
    /// h2 reported an HTTP/2 or IO failure.
    Http2(h2::Error),
    /// A keepalive PING went unanswered (gRFC A8).
    KeepAliveTimedOut,
    /// The connection's task panicked: a bug, reported with its message.
    Panicked(String),
}

/// A spawned connection that stops when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), Ended>>);

impl Future for AbortOnDrop {
    type Output = Result<(), Ended>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(Ended::Panicked(crate::error::panic_message(
                e.into_panic().as_ref(),
            ))),
            // Cancelled: only this handle aborts it, on drop.
            Err(_) => Ok(()),
        })
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_connection_task_is_reported_with_its_message() {
        let task = tokio::spawn(async {
            if true {
                panic!("boom in the connection");
            }
            Ok::<(), Ended>(())
        });
        match AbortOnDrop(task).await {
            Err(Ended::Panicked(message)) => assert_eq!(message, "boom in the connection"),
            other => panic!("not reported as a panic: {other:?}"),
        }
    }
}
