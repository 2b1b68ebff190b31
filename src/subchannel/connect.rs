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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

use super::Stats;
use crate::Error;

/// The future that drives a connection's request dispatch. It ends when the
/// connection can take no more requests: after a GOAWAY, or when it closes.
pub(crate) type Driver = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

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
}

/// One established HTTP/2 connection, shared by the subchannel task and the
/// request path.
pub(crate) struct Conn {
    pub(crate) addr: SocketAddr,
    pub(crate) send: http2::SendRequest<Body>,
    pub(crate) origin: Arc<Origin>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) established: Instant,
    signals: Arc<Signals>,
    /// Calls whose response has not ended, for draining.
    in_flight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("addr", &self.addr)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
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

    /// Closes the connection at once, failing whatever is still on it.
    pub(crate) fn kill(&self) {
        self.signals.kill();
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

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a call in. False, and not counted, once the connection is
    /// draining: a call picked just before must go elsewhere, or the drain
    /// could close the connection under it.
    pub(crate) fn call_started(&self) -> bool {
        // SeqCst pairs with `drained`: either the drain sees this call, or
        // this call sees the drain.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            self.call_ended();
            return false;
        }
        true
    }

    pub(crate) fn call_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.draining.load(Ordering::SeqCst)
        {
            self.idle.notify_waiters();
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

/// Connects to `addr`: TCP, TLS when configured, then the HTTP/2 handshake.
/// The caller bounds it in time.
pub(crate) async fn connect(
    addr: SocketAddr,
    settings: Http2Settings,
    tcp_keepalive: Option<Duration>,
    origin: Arc<Origin>,
    #[cfg(feature = "tls")] tls: Option<&super::TlsConfig>,
    stats: Arc<Stats>,
) -> Result<(Arc<Conn>, Driver), Error> {
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
    let _ = tcp.set_nodelay(true);
    if let Some(idle) = tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new().with_time(idle);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    }

    #[cfg(feature = "tls")]
    let io: Box<dyn Io> = match tls {
        Some(tls) => Box::new(tls.handshake(addr, &origin.authority, tcp).await?),
        None => Box::new(tcp),
    };
    #[cfg(not(feature = "tls"))]
    let io: Box<dyn Io> = Box::new(tcp);

    let signals = Arc::new(Signals::default());
    let io = TokioIo::new(WatchedIo {
        io,
        signals: signals.clone(),
        frames: FrameHeaders::default(),
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keep_alive_interval)
        .keep_alive_timeout(settings.keep_alive_timeout)
        .keep_alive_while_idle(settings.keep_alive_while_idle);
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
        origin,
        stats,
        established: Instant::now(),
        signals,
        in_flight: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        idle: Notify::new(),
    });
    // The connection runs in a task of its own, as in tonic, so a call's
    // dispatch wakes only it, not the subchannel's health and probe work.
    // Dropping the driver aborts it, which closes the connection.
    let task = AbortOnDrop(tokio::spawn(driver));
    Ok((conn, Box::pin(task)))
}

/// A spawned connection that stops when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Future for AbortOnDrop {
    type Output = Result<(), hyper::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A panicked or aborted connection task counts as a clean end; the
        // subchannel reconnects either way.
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|joined| joined.unwrap_or(Ok(())))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Byte streams a connection may run over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A GOAWAY frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GoAway {
    pub(crate) last_stream_id: u32,
    pub(crate) code: h2::Reason,
    pub(crate) debug: String,
}

impl GoAway {
    fn parse(payload: &[u8]) -> Option<Self> {
        let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
        Some(Self {
            last_stream_id: u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff,
            code: h2::Reason::from(u32::from_be_bytes([head[4], head[5], head[6], head[7]])),
            debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
        })
    }

    /// ENHANCE_YOUR_CALM with `too_many_pings`: the server wants fewer
    /// keepalive pings (gRFC A8).
    pub(crate) fn is_too_many_pings(&self) -> bool {
        self.code == h2::Reason::ENHANCE_YOUR_CALM && self.debug.contains("too_many_pings")
    }
}

impl std::fmt::Display for GoAway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GOAWAY {:?}", self.code)?;
        if !self.debug.is_empty() {
            write!(f, " ({})", self.debug)?;
        }
        Ok(())
    }
}

/// What the IO layer tells the subchannel, and the switch it obeys.
#[derive(Debug, Default)]
struct Signals {
    killed: AtomicBool,
    kill_waker: AtomicWaker,
    going_away: AtomicBool,
    goaway: std::sync::Mutex<Option<GoAway>>,
    goaway_waker: AtomicWaker,
}

impl Signals {
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.kill_waker.wake();
    }

    fn goaway(&self) -> Option<GoAway> {
        if !self.going_away.load(Ordering::Acquire) {
            return None;
        }
        self.goaway.lock().ok().and_then(|g| g.clone())
    }

    fn saw_goaway(&self, goaway: GoAway) {
        if let Ok(mut slot) = self.goaway.lock() {
            // The first one counts; a second only lowers the last stream id.
            if slot.is_none() {
                *slot = Some(goaway);
            }
        }
        self.going_away.store(true, Ordering::Release);
        self.goaway_waker.wake();
    }

    fn killed() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection closed by healthlb",
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
            return Poll::Ready(Err(Self::killed()));
        }
        match poll(cx) {
            Poll::Pending => {
                self.kill_waker.register(cx.waker());
                if self.killed.load(Ordering::Acquire) {
                    return Poll::Ready(Err(Self::killed()));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

/// Longest GOAWAY payload kept: the ids, the code and some debug data.
const GOAWAY_CAP: usize = 8 + 256;
const FRAME_HEADER_LEN: usize = 9;
const FRAME_TYPE_GOAWAY: u8 = 0x7;

/// Follows the frame headers of what the server sends. hyper notices a
/// GOAWAY only when the next request comes; this sees it as it arrives, so
/// an idle subchannel leaves a closing connection at once.
#[derive(Debug, Default)]
struct FrameHeaders {
    header: [u8; FRAME_HEADER_LEN],
    filled: usize,
    /// Payload bytes still to pass.
    skip: usize,
    goaway: Option<Vec<u8>>,
}

impl FrameHeaders {
    fn feed(&mut self, mut data: &[u8]) -> Option<GoAway> {
        let mut found = None;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                if let Some(payload) = &mut self.goaway {
                    let room = GOAWAY_CAP.saturating_sub(payload.len());
                    payload.extend_from_slice(&data[..n.min(room)]);
                }
                self.skip -= n;
                data = &data[n..];
                if self.skip == 0 {
                    if let Some(payload) = self.goaway.take() {
                        found = GoAway::parse(&payload).or(found);
                    }
                }
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.filled).min(data.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == FRAME_HEADER_LEN {
                self.filled = 0;
                let h = self.header;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                if h[3] == FRAME_TYPE_GOAWAY && self.skip >= 8 {
                    self.goaway = Some(Vec::with_capacity(self.skip.min(GOAWAY_CAP)));
                }
            }
        }
        found
    }
}

/// The connection's byte stream, watched for GOAWAY and closable at will.
struct WatchedIo {
    io: Box<dyn Io>,
    signals: Arc<Signals>,
    frames: FrameHeaders,
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
            if let Some(goaway) = this.frames.feed(&buf.filled()[before..]) {
                this.signals.saw_goaway(goaway);
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
        this.signals
            .guard(cx, |cx| Pin::new(&mut this.io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.signals.guard(cx, |cx| {
            Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.signals
            .guard(cx, |cx| Pin::new(&mut this.io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn goaway(last: u32, code: u32, debug: &[u8]) -> Vec<u8> {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(debug);
        frame(FRAME_TYPE_GOAWAY, 0, &payload)
    }

    #[test]
    fn finds_a_goaway_among_other_frames_in_any_split() {
        let mut wire = frame(0x4, 0, &[0; 12]); // SETTINGS
        wire.extend(frame(0x0, 1, &[7; 1000])); // DATA
        wire.extend(goaway(0x7fff_ffff, 0xb, b"too_many_pings"));
        wire.extend(frame(0x6, 0, &[0; 8])); // PING
        for chunk in [1, 2, 5, 9, 10, 64, wire.len()] {
            let mut frames = FrameHeaders::default();
            let found: Vec<GoAway> = wire.chunks(chunk).filter_map(|c| frames.feed(c)).collect();
            assert_eq!(found.len(), 1, "chunk {chunk}");
            assert_eq!(found[0].last_stream_id, 0x7fff_ffff);
            assert_eq!(found[0].code, h2::Reason::ENHANCE_YOUR_CALM);
            assert!(found[0].is_too_many_pings());
            assert_eq!(
                found[0].to_string(),
                "GOAWAY ENHANCE_YOUR_CALM (too_many_pings)"
            );
        }
    }

    #[test]
    fn data_that_looks_like_a_goaway_is_skipped() {
        let fake = goaway(1, 0, b"");
        let mut wire = frame(0x0, 1, &fake); // a DATA frame carrying GOAWAY bytes
        wire.extend(goaway(5, 0, b""));
        let mut frames = FrameHeaders::default();
        let found = frames.feed(&wire).expect("the real GOAWAY");
        assert_eq!(
            (found.last_stream_id, found.code),
            (5, h2::Reason::NO_ERROR)
        );
    }

    #[test]
    fn long_debug_data_is_capped() {
        let mut frames = FrameHeaders::default();
        let found = frames.feed(&goaway(3, 0, &[b'x'; 10_000])).expect("GOAWAY");
        assert_eq!(found.debug.len(), GOAWAY_CAP - 8);
        // And the stream stays in step after it.
        assert!(frames.feed(&goaway(1, 2, b"")).is_some());
    }
}
