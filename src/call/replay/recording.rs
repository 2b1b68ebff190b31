//! The recording of a request body as its attempts read it: the frames an
//! attempt may still need, each attempt's cursor, and who waits on the
//! caller's body.

use std::collections::VecDeque;

use smallvec::SmallVec;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame};
use tonic::Status;
use tonic::body::Body;

use super::RetryBuffer;

/// What keeping one frame costs beside its data: its entry in the recording.
pub(crate) const FRAME_COST: usize = std::mem::size_of::<Recorded>();

pub(super) struct Recording {
    /// The body not yet read; `None` once it ended.
    pub(super) inner: Option<Body>,
    /// A frame read ahead from `inner` to learn whether the body ends, not
    /// yet handed to any attempt.
    pub(super) peeked: Option<Result<Frame<Bytes>, Status>>,
    /// How the body failed, for every attempt that reads past it.
    pub(super) failed: Option<Status>,
    /// Messages counted for metrics, as they are first read.
    pub(super) counting: Option<Counting>,
    /// Frames read so far that an attempt may still need.
    pub(super) frames: Frames,
    /// The index, counted from the body's start, of `frames[0]`.
    pub(super) base: usize,
    /// The attempts whose bodies may read, and the next frame of each:
    /// inline for a call's first two, so most calls allocate nothing here.
    pub(super) readers: SmallVec<[(u64, usize); 2]>,
    /// Attempts started so far.
    pub(super) attempts: u64,
    /// Bytes held in `buffer`.
    pub(super) held: usize,
    pub(super) buffer: Arc<RetryBuffer>,
    pub(super) mode: Mode,
    /// The waker the caller's body is polled with once more than one
    /// attempt may wait on it; `None` while one attempt reads alone.
    pub(super) waiters: Option<(Arc<Waiters>, Waker)>,
    /// The waker of the one attempt that waits on the caller's body alone,
    /// handed to `waiters` when another attempt joins.
    pub(super) parked: Option<Waker>,
    /// The caller's own header map, until the first attempt takes it.
    pub(super) first_headers: Option<HeaderMap>,
}

/// Every attempt waiting on the caller's body. A body keeps only the last
/// waker it was polled with, so hedged attempts polling it side by side
/// would each replace the other's: one woken, the rest parked for good.
/// The body is polled with this one instead, which wakes them all.
#[derive(Default)]
pub(super) struct Waiters(Mutex<Vec<Waker>>);

impl Waiters {
    pub(super) fn register(&self, waker: &Waker) {
        let mut wakers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let wakers = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        for waker in wakers {
            waker.wake();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// Frames are kept for another attempt.
    Recording,
    /// Committed to one attempt: nothing more is kept, and frames leave
    /// the recording as that attempt sends them.
    Committed(u64),
}

/// What the request's messages are counted into.
pub(crate) struct Counting {
    pub(crate) stats: Arc<crate::subchannel::Stats>,
    pub(crate) method: Arc<str>,
    pub(crate) frames: crate::metrics::GrpcFrames,
}

/// The frames kept, the first one inline: a unary request's only frame
/// costs no allocation.
#[derive(Default)]
pub(super) struct Frames {
    first: Option<Recorded>,
    rest: VecDeque<Recorded>,
}

impl Frames {
    pub(super) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(super) fn get(&self, i: usize) -> Option<&Recorded> {
        match i {
            0 => self.first.as_ref(),
            i => self.rest.get(i - 1),
        }
    }

    pub(super) fn push_back(&mut self, frame: Recorded) {
        match self.first {
            None => self.first = Some(frame),
            Some(_) => self.rest.push_back(frame),
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<Recorded> {
        let front = self.first.take()?;
        self.first = self.rest.pop_front();
        Some(front)
    }
}

pub(super) enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Recorded {
    pub(super) fn to_frame(&self) -> Frame<Bytes> {
        match self {
            Recorded::Data(data) => Frame::data(data.clone()),
            Recorded::Trailers(trailers) => Frame::trailers(trailers.clone()),
        }
    }

    pub(super) fn into_frame(self) -> Frame<Bytes> {
        match self {
            Recorded::Data(data) => Frame::data(data),
            Recorded::Trailers(trailers) => Frame::trailers(trailers),
        }
    }
}

impl Recording {
    pub(super) fn commit(&mut self, generation: u64) {
        if self.mode != Mode::Recording {
            return;
        }
        self.mode = Mode::Committed(generation);
        // The others' bodies fail at their next poll: let them see it.
        self.wake_waiters();
        self.readers.retain(|(g, _)| *g == generation);
        let end = self.base + self.frames.len();
        let sent = self.readers.first().map_or(end, |(_, c)| *c);
        while self.base < sent && self.frames.pop_front().is_some() {
            self.base += 1;
        }
        if self.frames.is_empty() {
            self.frames = Frames::default();
            self.base = sent.max(self.base);
        }
        self.buffer.release(std::mem::take(&mut self.held));
    }

    /// Keeps a frame the furthest attempt just read, or commits to that
    /// attempt once the body outgrows its buffer.
    pub(super) fn record(&mut self, reader: usize, frame: &Frame<Bytes>) {
        let (recorded, size) = match (frame.data_ref(), frame.trailers_ref()) {
            (Some(data), _) => (Recorded::Data(data.clone()), data.len()),
            (None, Some(trailers)) => {
                let size = trailers
                    .iter()
                    .map(|(name, value)| name.as_str().len() + value.len())
                    .sum();
                (Recorded::Trailers(trailers.clone()), size)
            }
            (None, None) => return,
        };
        let cost = size.saturating_add(FRAME_COST);
        if !self.buffer.reserve(self.held, cost) {
            let generation = self.readers[reader].0;
            tracing::debug!(
                bytes = self.held.saturating_add(cost),
                "the request outgrew its retry buffer; the call commits to its attempt"
            );
            self.readers[reader].1 += 1;
            self.commit(generation);
            return;
        }
        self.held += cost;
        self.frames.push_back(recorded);
        self.readers[reader].1 = self.base + self.frames.len();
    }

    /// Polls the caller's body for its next frame. While one attempt reads
    /// alone it is polled with that attempt's waker; once another may wait
    /// on it too, with [`Waiters`], which wakes every one of them.
    pub(super) fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if self.waiters.is_none() && self.readers.len() <= 1 {
            let polled = Pin::new(inner).poll_frame(cx);
            if polled.is_pending() {
                self.parked = Some(cx.waker().clone());
            }
            return polled;
        }
        let (waiters, waker) = self.waiters.get_or_insert_with(|| {
            let waiters = Arc::new(Waiters::default());
            let waker = Waker::from(waiters.clone());
            (waiters, waker)
        });
        if let Some(parked) = self.parked.take() {
            waiters.register(&parked);
        }
        waiters.register(cx.waker());
        Pin::new(inner).poll_frame(&mut Context::from_waker(waker))
    }

    /// Wakes every attempt waiting on the caller's body, so that one still
    /// live polls it again with its own waker.
    pub(super) fn wake_waiters(&mut self) {
        if let Some(parked) = self.parked.take() {
            parked.wake();
        }
        if let Some((_, waker)) = &self.waiters {
            waker.wake_by_ref();
        }
    }
}

impl Recording {
    /// Reads the next frame ahead if it is there already, so that a body
    /// that has just ended says so with its last data frame: HTTP/2 then
    /// sends that frame with END_STREAM, not an empty DATA frame after it.
    /// A tonic unary request is one data frame, then its end.
    pub(super) fn look_ahead(&mut self, cx: &mut Context<'_>) {
        let Some(inner) = self.inner.as_ref() else {
            return;
        };
        if self.peeked.is_some() || inner.is_end_stream() {
            return;
        }
        match self.poll_inner(cx) {
            Poll::Ready(None) => self.inner = None,
            Poll::Ready(Some(next)) => self.peeked = Some(next),
            Poll::Pending => {}
        }
    }

    /// Whether the reader at `cursor` has read the whole body.
    pub(super) fn ended_at(&self, cursor: usize) -> bool {
        cursor == self.base + self.frames.len()
            && self.peeked.is_none()
            && self.failed.is_none()
            && self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.buffer.release(self.held);
    }
}
