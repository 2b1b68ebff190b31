//! The connection's byte stream, watched: every read proves the peer alive
//! and passes the frame sniffer; a kill switch closes it at will.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frames::{FrameSniffer, GoAway, Seen};

/// Byte streams a connection may run over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// What the IO layer tells the subchannel, and the switch it obeys.
#[derive(Debug)]
pub(crate) struct Signals {
    pub(super) killed: AtomicBool,
    pub(super) kill_waker: AtomicWaker,
    /// Why healthlb closed the connection, for the calls that fail.
    pub(super) kill_reason: std::sync::Mutex<Option<String>>,
    pub(super) going_away: AtomicBool,
    pub(super) goaway: std::sync::Mutex<Option<GoAway>>,
    pub(super) goaway_waker: AtomicWaker,
    /// SETTINGS_MAX_CONCURRENT_STREAMS, unlimited until the server says.
    pub(super) max_streams: AtomicU32,
    pub(super) settings: AtomicBool,
    pub(super) settings_waker: AtomicWaker,
    /// When anything was last read, in ns since the connection began.
    pub(super) last_read: AtomicU64,
    /// Bytes read so far, for the adaptive window's samples.
    pub(super) bytes_read: AtomicU64,
}

impl Signals {
    pub(super) fn new() -> Self {
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
            bytes_read: AtomicU64::new(0),
        }
    }

    pub(super) fn kill(&self, why: String) {
        if let Ok(mut reason) = self.kill_reason.lock() {
            reason.get_or_insert(why);
        }
        self.killed.store(true, Ordering::Release);
        self.kill_waker.wake();
    }

    pub(super) fn goaway(&self) -> Option<GoAway> {
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

    /// Why healthlb closed the connection, if it did.
    pub(super) fn kill_reason(&self) -> Option<String> {
        if !self.killed.load(Ordering::Acquire) {
            return None;
        }
        self.kill_reason.lock().ok().and_then(|r| r.clone())
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
    /// kill switch. `registered`: the waker the switch last had, so that
    /// the connection's task, whose waker doesn't change, registers once.
    fn guard<T>(
        &self,
        cx: &mut Context<'_>,
        registered: &mut Option<std::task::Waker>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.killed.load(Ordering::Acquire) {
            return Poll::Ready(Err(self.killed()));
        }
        match poll(cx) {
            Poll::Pending => {
                if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    self.kill_waker.register(cx.waker());
                    *registered = Some(cx.waker().clone());
                }
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
pub(crate) struct WatchedIo {
    pub(super) io: Box<dyn Io>,
    pub(super) epoch: Instant,
    pub(super) signals: Arc<Signals>,
    pub(super) frames: FrameSniffer,
    /// The waker the kill switch has.
    pub(super) registered: Option<std::task::Waker>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = this.signals.guard(cx, &mut this.registered, |cx| {
            Pin::new(&mut this.io).poll_read(cx, buf)
        });
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                let ns = this.epoch.elapsed().as_nanos() as u64;
                this.signals.last_read.store(ns, Ordering::Release);
                this.signals
                    .bytes_read
                    .fetch_add(read.len() as u64, Ordering::Relaxed);
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
        this.signals.guard(cx, &mut this.registered, |cx| {
            Pin::new(&mut this.io).poll_write(cx, buf)
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.signals.guard(cx, &mut this.registered, |cx| {
            Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.signals.guard(cx, &mut this.registered, |cx| {
            Pin::new(&mut this.io).poll_flush(cx)
        })
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
