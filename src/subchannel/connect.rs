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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use http::HeaderValue;
use http::uri::{Authority, Scheme};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tonic::body::Body;

pub(crate) use super::frames::GoAway;
use super::frames::{FrameSniffer, Seen};
use super::stats::Stats;
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

/// Who calls are addressed to.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    pub(crate) user_agent: HeaderValue,
}

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

/// What a connection reserves of the server's stream limit for the
/// balancer's own streams, and how it is used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Role {
    /// It carries the endpoint's health Watch.
    pub(crate) watch: bool,
    /// It runs a liveness probe.
    pub(crate) probe: bool,
    /// It is an extra connection, closed when idle.
    pub(crate) extra: bool,
}

/// How one endpoint's calls wait for a free stream slot: its connections
/// wake the waiters whenever a call ends.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    /// Calls waiting for a slot right now.
    pub(crate) waiters: AtomicUsize,
    pub(crate) freed: Notify,
}

impl Slots {
    /// A slot was freed or added: wakes the waiters, if any. The request
    /// path pays one load when nobody waits.
    pub(crate) fn released(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// One established HTTP/2 connection, shared by the subchannel task and the
/// request path.
pub(crate) struct Conn {
    pub(crate) addr: SocketAddr,
    pub(crate) send: http2::SendRequest<Body>,
    pub(crate) origin: Arc<Origin>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) established: Instant,
    pub(crate) role: Role,
    signals: Arc<Signals>,
    slots: Arc<Slots>,
    /// Calls whose response has not ended: stream slots in use by callers.
    in_flight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
    /// When the last call ended, in ns since `established`.
    idle_since: AtomicU64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("addr", &self.addr)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("max_streams", &self.max_streams())
            .finish()
    }
}

// === impl Conn ===

impl Conn {
    /// Whether the connection may take a new call: open, and no GOAWAY seen.
    pub(crate) fn is_ready(&self) -> bool {
        !self.send.is_closed()
            && !self.signals.going_away.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
    }

    /// Closes the connection at once, failing whatever is still on it with
    /// `why`.
    pub(crate) fn kill(&self, why: impl std::fmt::Display) {
        self.signals.kill(why.to_string());
    }

    /// The server's first GOAWAY, once it arrived.
    pub(crate) fn poll_goaway(&self, cx: &mut Context<'_>) -> Poll<GoAway> {
        if let Some(goaway) = self.signals.goaway() {
            return Poll::Ready(goaway);
        }
        self.signals.goaway_waker.register(cx.waker());
        match self.signals.goaway() {
            Some(goaway) => Poll::Ready(goaway),
            None => Poll::Pending,
        }
    }

    /// Ready once the server's first SETTINGS frame arrived, so its stream
    /// limit is known.
    pub(crate) fn poll_settings(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signals.settings.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.signals.settings_waker.register(cx.waker());
        match self.signals.settings.load(Ordering::Acquire) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS; unlimited until it
    /// says otherwise, as HTTP/2 has it.
    pub(crate) fn max_streams(&self) -> usize {
        self.signals.max_streams.load(Ordering::Relaxed) as usize
    }

    /// When the server last sent anything at all.
    pub(crate) fn last_read(&self) -> Instant {
        self.established + Duration::from_nanos(self.signals.last_read.load(Ordering::Acquire))
    }

    /// Since when no call has been open, if none is.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        (self.in_flight() == 0).then(|| {
            self.established + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed))
        })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// How many calls may be open at once: the server's limit less the
    /// slots kept for the health Watch and the liveness probe, so those
    /// never wait behind calls. Under a limit too small for both, only the
    /// Watch's slot is kept.
    pub(crate) fn capacity(&self) -> usize {
        let max = self.max_streams();
        let watch = usize::from(self.role.watch);
        let kept = watch + usize::from(self.role.probe);
        match max.saturating_sub(kept) {
            0 => max.saturating_sub(watch),
            n => n,
        }
    }

    /// Whether a liveness probe would get a stream slot now, rather than
    /// queue behind calls.
    pub(crate) fn probe_has_slot(&self) -> bool {
        self.in_flight() + usize::from(self.role.watch) < self.max_streams()
    }

    /// Counts a call in, if a slot is free. False, and not counted, when the
    /// connection is full or draining: a call picked just before a drain
    /// must go elsewhere, or the drain could close the connection under it.
    pub(crate) fn try_start_call(&self) -> bool {
        let capacity = self.capacity();
        // SeqCst pairs with `drained` and with `Slots::released`: either the
        // drain sees this call or this call sees the drain, and a waiter
        // either sees a freed slot or is woken.
        let mut n = self.in_flight.load(Ordering::SeqCst);
        loop {
            if n >= capacity {
                return false;
            }
            match self
                .in_flight
                .compare_exchange_weak(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(actual) => n = actual,
            }
        }
        if self.draining.load(Ordering::SeqCst) {
            self.call_ended(false);
            return false;
        }
        true
    }

    /// A call is over; `wake` wakes the calls waiting for a slot.
    pub(crate) fn call_ended(&self, wake: bool) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            if self.draining.load(Ordering::SeqCst) {
                self.idle.notify_waiters();
            }
            if self.role.extra {
                let ns = self.established.elapsed().as_nanos() as u64;
                self.idle_since.store(ns, Ordering::Relaxed);
            }
        }
        if wake {
            self.slots.released();
        }
    }

    /// Waits until no call is left on the connection. New calls must already
    /// have stopped coming.
    pub(crate) async fn drained(&self) {
        self.draining.store(true, Ordering::SeqCst);
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// What a subchannel connects with.
pub(crate) struct Dialer {
    pub(crate) addr: SocketAddr,
    pub(crate) origin: Arc<Origin>,
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) tcp_nodelay: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<super::TlsConfig>,
    pub(crate) stats: Arc<Stats>,
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
            send,
            origin: self.origin.clone(),
            stats: self.stats.clone(),
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
        // Dropping the driver aborts it, which closes the connection.
        let task = AbortOnDrop(tokio::spawn(driver));
        Ok((conn, Box::pin(task)))
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

/// Byte streams a connection may run over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// What the IO layer tells the subchannel, and the switch it obeys.
#[derive(Debug)]
struct Signals {
    killed: AtomicBool,
    kill_waker: AtomicWaker,
    /// Why healthlb closed the connection, for the calls that fail.
    kill_reason: std::sync::Mutex<Option<String>>,
    going_away: AtomicBool,
    goaway: std::sync::Mutex<Option<GoAway>>,
    goaway_waker: AtomicWaker,
    /// SETTINGS_MAX_CONCURRENT_STREAMS, unlimited until the server says.
    max_streams: AtomicU32,
    settings: AtomicBool,
    settings_waker: AtomicWaker,
    /// When anything was last read, in ns since the connection began.
    last_read: AtomicU64,
}

impl Signals {
    fn new() -> Self {
        Self {
            killed: AtomicBool::new(false),
            kill_waker: AtomicWaker::new(),
            kill_reason: std::sync::Mutex::new(None),
            going_away: AtomicBool::new(false),
            goaway: std::sync::Mutex::new(None),
            goaway_waker: AtomicWaker::new(),
            max_streams: AtomicU32::new(u32::MAX),
            settings: AtomicBool::new(false),
            settings_waker: AtomicWaker::new(),
            last_read: AtomicU64::new(0),
        }
    }

    fn kill(&self, why: String) {
        if let Ok(mut reason) = self.kill_reason.lock() {
            reason.get_or_insert(why);
        }
        self.killed.store(true, Ordering::Release);
        self.kill_waker.wake();
    }

    fn goaway(&self) -> Option<GoAway> {
        if !self.going_away.load(Ordering::Acquire) {
            return None;
        }
        self.goaway.lock().ok().and_then(|g| g.clone())
    }

    fn saw(&self, seen: Seen) {
        if let Some(max) = seen.max_streams {
            self.max_streams.store(max, Ordering::Relaxed);
        }
        if seen.settings {
            self.settings.store(true, Ordering::Release);
            self.settings_waker.wake();
        }
        if let Some(goaway) = seen.goaway {
            if let Ok(mut slot) = self.goaway.lock() {
                // The first one counts: it is the one that stopped new calls.
                // A later one only lowers the last stream id, which hyper
                // applies to the streams it affects.
                if slot.is_none() {
                    *slot = Some(goaway);
                }
            }
            self.going_away.store(true, Ordering::Release);
            self.goaway_waker.wake();
        }
    }

    fn killed(&self) -> io::Error {
        let why = self
            .kill_reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_default();
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("healthlb closed the connection: {why}"),
        )
    }

    /// Runs one IO poll unless killed; a poll that waits also waits for the
    /// kill switch.
    fn guard<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.killed.load(Ordering::Acquire) {
            return Poll::Ready(Err(self.killed()));
        }
        match poll(cx) {
            Poll::Pending => {
                self.kill_waker.register(cx.waker());
                if self.killed.load(Ordering::Acquire) {
                    return Poll::Ready(Err(self.killed()));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

/// The connection's byte stream: every read is proof the peer is alive and
/// goes through the frame sniffer; a kill switch closes it at will.
struct WatchedIo {
    io: Box<dyn Io>,
    epoch: Instant,
    signals: Arc<Signals>,
    frames: FrameSniffer,
    /// Whether this burst of writes has already yielded once.
    yielded: bool,
}

impl WatchedIo {
    /// Lets every task that is ready run before the connection writes, once
    /// per burst of writes. h2 writes what it has each time the connection's
    /// task runs, and healthlb's callers hand it their calls one by one, each
    /// from its own task (a call's DATA even takes another turn after its
    /// HEADERS). One turn of the scheduler lets the calls that are ready add
    /// their frames first, so one write carries many calls. Every write is a
    /// system call, and on loopback it also wakes the server's thread: at 16
    /// callers this halved the writes per call and cut the client's CPU per
    /// call by a seventh (BENCHMARKS.md section 2).
    fn yield_once(&mut self, cx: &mut Context<'_>) -> bool {
        if self.yielded {
            return false;
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        true
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = this
            .signals
            .guard(cx, |cx| Pin::new(&mut this.io).poll_read(cx, buf));
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                let ns = this.epoch.elapsed().as_nanos() as u64;
                this.signals.last_read.store(ns, Ordering::Release);
                this.signals.saw(this.frames.feed(read));
            }
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.yield_once(cx) {
            return Poll::Pending;
        }
        this.signals
            .guard(cx, |cx| Pin::new(&mut this.io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.yield_once(cx) {
            return Poll::Pending;
        }
        this.signals.guard(cx, |cx| {
            Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = this
            .signals
            .guard(cx, |cx| Pin::new(&mut this.io).poll_flush(cx));
        if flushed.is_ready() {
            // The burst is out; the next one yields again.
            this.yielded = false;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
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
