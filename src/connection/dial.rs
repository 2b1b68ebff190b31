//! Making one HTTP/2 connection to one endpoint.
//!
//! healthlb drives hyper's HTTP/2 client itself rather than a tonic
//! `Channel`, because the balancer must see what a `Channel` hides: why the
//! connection ended (a GOAWAY and its code, such as `too_many_pings`), and
//! which requests never left the client, so they can go to another
//! endpoint.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::conn::{Conn, Origin, Role, Slots};
use super::frames::FrameSniffer;
pub(crate) use super::frames::GoAway;
use super::io::{Io, Signals, WatchedIo};
use crate::Error;

/// The future that drives a connection's request dispatch. It ends when the
/// connection can take no more requests: after a GOAWAY, or when it closes.
pub(crate) type Driver = Pin<Box<dyn Future<Output = Result<(), Ended>> + Send>>;

/// Reset streams a connection remembers for h2's 1 s, so that their late
/// frames are dropped quietly: 1,024 cancels a second (h2's default is 50).
const RESET_STREAMS_REMEMBERED: usize = 1024;

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
        let io = TokioIo::new(WatchedIo {
            io,
            epoch: established,
            signals: signals.clone(),
            frames: FrameSniffer::default(),
            yielded: false,
        });
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(settings.keep_alive_interval)
            .keep_alive_timeout(settings.keep_alive_timeout)
            .keep_alive_while_idle(settings.keep_alive_while_idle)
            .adaptive_window(settings.adaptive_window)
            // A cancelled call (a hedge that lost, a deadline) may still
            // have frames on the way. h2 remembers only 50 reset streams,
            // and each frame for a forgotten one counts against a limit of
            // 1,024 per connection's life, after which the client closes its
            // own connection (ENHANCE_YOUR_CALM) and fails every call on it.
            // Remember more, so late frames are dropped quietly, and keep a
            // cap for a server that sends frames on old ids on purpose.
            .max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED)
            .max_local_error_reset_streams(Some(FORGOTTEN_STREAM_FRAMES));
        // Set only when given: setting a window turns the adaptive one off.
        if let Some(size) = settings.initial_stream_window_size {
            builder.initial_stream_window_size(size);
        }
        if let Some(size) = settings.initial_connection_window_size {
            builder.initial_connection_window_size(size);
        }
        let (send, driver) = builder.handshake(io).await.map_err(|e| {
            Error::connect(
                "HTTP/2 handshake failed",
                format!("the HTTP/2 handshake with {addr} failed: {e}"),
                Some(e.into()),
            )
        })?;
        let conn = Arc::new(Conn {
            addr,
            send: arc_swap::ArcSwapOption::from_pointee(send),
            origin: self.origin.clone(),
            established,
            role,
            signals,
            slots: self.slots.clone(),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
            idle_since: AtomicU64::new(0),
        });
        // The connection runs in a task of its own, as in tonic, so a call's
        // dispatch wakes only it, not the subchannel's health and probe work.
        // Dropping the driver aborts it, which closes the connection. The
        // connection's sender goes with the task, however it ends.
        let ended = TaskEnded(Arc::downgrade(&conn));
        let task = AbortOnDrop(tokio::spawn(async move {
            let _ended = ended;
            driver.await
        }));
        Ok((conn, Box::pin(task)))
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
    /// hyper reported an HTTP/2 or IO failure.
    Http2(hyper::Error),
    /// The connection's task panicked: a bug, reported with its message.
    Panicked(String),
}

/// A spawned connection that stops when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<Result<(), T>>);

impl<T> Future for AbortOnDrop<T>
where
    T: Into<Ended>,
{
    type Output = Result<(), Ended>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| match joined {
            Ok(result) => result.map_err(Into::into),
            Err(e) if e.is_panic() => Err(Ended::Panicked(crate::error::panic_message(
                e.into_panic().as_ref(),
            ))),
            // Cancelled: only this handle aborts it, on drop.
            Err(_) => Ok(()),
        })
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl From<hyper::Error> for Ended {
    fn from(e: hyper::Error) -> Self {
        Ended::Http2(e)
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
            Ok::<(), hyper::Error>(())
        });
        match AbortOnDrop(task).await {
            Err(Ended::Panicked(message)) => assert_eq!(message, "boom in the connection"),
            other => panic!("not reported as a panic: {other:?}"),
        }
    }
}
