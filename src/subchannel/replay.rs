//! Re-sending a call until it commits (gRFC A6): transparent retry of calls
//! the server refused unprocessed, and the service config's retries and
//! hedges.
//!
//! HTTP/2 says which calls were refused unprocessed. A GOAWAY names the last
//! stream the server will process; every later stream fails with the
//! GOAWAY's error. A stream reset with REFUSED_STREAM was not processed
//! either (RFC 9113 §8.7). grpc-go and C-core servers send GOAWAY on
//! MAX_CONNECTION_AGE and on shutdown, so without this a deploy fails the
//! calls that crossed it.
//!
//! hyper consumes the request, so its body is recorded while it is sent, up
//! to the per-call limit and within the channel's total ([`RetryBuffer`]).
//! The rest of the body stays shared, so a streaming call that had not sent
//! more than that can be replayed too.
//!
//! Each attempt reads the recording at its own cursor, so hedged attempts
//! run side by side; whichever is furthest ahead reads on from the caller's
//! body. The caller's body keeps one waker, so every attempt that waits on
//! it is woken through one that wakes them all ([`Waiters`]). The recording lives only as long as the call can be re-sent. When
//! an attempt's response headers arrive, the call commits to it: every other
//! attempt's body fails, and every frame it has already sent is freed. A
//! call that outgrows its buffer commits to the attempt that read past it,
//! rather than failing.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker, ready};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version};
use http_body::{Body as HttpBody, Frame};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;

use crate::deadline::encode_grpc_timeout;

/// How many times a call is handed to a connection, when each one closes,
/// or refuses it unprocessed, before the call could leave the client. These
/// transparent retries don't count against a retry policy's attempts.
pub(crate) const MAX_ATTEMPTS: usize = 8;

/// The header that tells the server how many attempts came before this one.
const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// The bytes of request bodies kept for another attempt: per call, and in
/// total for one channel. grpc-go's defaults: 256 KiB and 16 MiB. A kept
/// frame counts what it holds: its data and its entry in the recording
/// ([`FRAME_COST`]), so a stream of empty frames is bounded too.
#[derive(Debug)]
pub(crate) struct RetryBuffer {
    per_call: usize,
    total: usize,
    used: AtomicUsize,
}

impl RetryBuffer {
    pub(crate) fn new(per_call: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_call,
            total,
            used: AtomicUsize::new(0),
        })
    }

    /// The limits: per call, and for the channel.
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.per_call, self.total)
    }

    /// Takes `n` more bytes for a call already holding `held`, if both
    /// limits allow it.
    fn reserve(&self, held: usize, n: usize) -> bool {
        if held.saturating_add(n) > self.per_call {
            return false;
        }
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(n).filter(|&u| u <= self.total) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Bytes held now by every call of the channel.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// What keeping one frame costs beside its data: its entry in the recording.
pub(crate) const FRAME_COST: usize = std::mem::size_of::<Recorded>();

/// Which attempt of a call a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttemptId(u64);

/// A request that can be sent again until it commits. Its drop commits to
/// the latest attempt.
pub(crate) struct Replay {
    inner: Arc<ReplayInner>,
}

/// The request's head and its recording, in one allocation shared with
/// every attempt's body.
struct ReplayInner {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// The call's deadline: each attempt tells the server the time left.
    deadline: Option<Instant>,
    recording: Mutex<Recording>,
}

struct Recording {
    /// The body not yet read; `None` once it ended.
    inner: Option<Body>,
    /// A frame read ahead from `inner` to learn whether the body ends, not
    /// yet handed to any attempt.
    peeked: Option<Result<Frame<Bytes>, Status>>,
    /// How the body failed, for every attempt that reads past it.
    failed: Option<Status>,
    /// Messages counted for metrics, as they are first read.
    counting: Option<Counting>,
    /// Frames read so far that an attempt may still need.
    frames: VecDeque<Recorded>,
    /// The index, counted from the body's start, of `frames[0]`.
    base: usize,
    /// The attempts whose bodies may read, and the next frame of each.
    readers: Vec<(u64, usize)>,
    /// Attempts started so far.
    attempts: u64,
    /// Bytes held in `buffer`.
    held: usize,
    buffer: Arc<RetryBuffer>,
    mode: Mode,
    /// The waker the caller's body is polled with once more than one
    /// attempt may wait on it; `None` while one attempt reads alone.
    waiters: Option<(Arc<Waiters>, Waker)>,
    /// The waker of the one attempt that waits on the caller's body alone,
    /// handed to `waiters` when another attempt joins.
    parked: Option<Waker>,
}

/// Every attempt waiting on the caller's body. A body keeps only the last
/// waker it was polled with, so hedged attempts polling it side by side
/// would each replace the other's: one woken, the rest parked for good.
/// The body is polled with this one instead, which wakes them all.
#[derive(Default)]
struct Waiters(Mutex<Vec<Waker>>);

impl Waiters {
    fn register(&self, waker: &Waker) {
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
enum Mode {
    /// Frames are kept for another attempt.
    Recording,
    /// Committed to one attempt: nothing more is kept, and frames leave
    /// the recording as that attempt sends them.
    Committed(u64),
}

/// What the request's messages are counted into.
pub(crate) struct Counting {
    pub(crate) stats: Arc<super::stats::Stats>,
    pub(crate) method: Arc<str>,
    pub(crate) frames: crate::metrics::GrpcFrames,
}

enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Recorded {
    fn to_frame(&self) -> Frame<Bytes> {
        match self {
            Recorded::Data(data) => Frame::data(data.clone()),
            Recorded::Trailers(trailers) => Frame::trailers(trailers.clone()),
        }
    }

    fn into_frame(self) -> Frame<Bytes> {
        match self {
            Recorded::Data(data) => Frame::data(data),
            Recorded::Trailers(trailers) => Frame::trailers(trailers),
        }
    }
}

// === impl Replay ===

impl Replay {
    /// Takes over `request`; [`attempt`](Self::attempt) sends it. Its body
    /// is kept within `buffer`. With a `deadline`, each attempt's
    /// `grpc-timeout` is the time left until it.
    pub(crate) fn new(
        request: Request<Body>,
        buffer: Arc<RetryBuffer>,
        deadline: Option<Instant>,
    ) -> Self {
        let (parts, body) = request.into_parts();
        Self {
            inner: Arc::new(ReplayInner {
                method: parts.method,
                uri: parts.uri,
                version: parts.version,
                headers: parts.headers,
                deadline,
                recording: Mutex::new(Recording {
                    inner: Some(body),
                    peeked: None,
                    failed: None,
                    counting: None,
                    frames: VecDeque::new(),
                    base: 0,
                    readers: Vec::new(),
                    attempts: 0,
                    held: 0,
                    buffer,
                    mode: Mode::Recording,
                    waiters: None,
                    parked: None,
                }),
            }),
        }
    }

    /// The request's path.
    pub(crate) fn path(&self) -> &str {
        self.inner.uri.path()
    }

    /// The request for another attempt, whose body replays what earlier
    /// attempts read and then reads on. `previous` attempts came before it
    /// (transparent ones not counted); the server is told so. `None` once
    /// the call committed. New messages count into `counting`.
    /// With `linger_until` (a hedge), its body, superseded before then,
    /// waits until then to fail, so that its stream isn't cancelled sooner
    /// (`call.rs`'s `LINGER` says why).
    pub(crate) fn attempt(
        &self,
        counting: Option<Counting>,
        previous: u32,
        linger_until: Option<tokio::time::Instant>,
    ) -> Option<(AttemptId, Request<Body>)> {
        let generation = {
            let mut rec = lock(&self.inner.recording);
            if rec.mode != Mode::Recording {
                return None;
            }
            rec.attempts += 1;
            let generation = rec.attempts;
            let start = rec.base;
            rec.readers.push((generation, start));
            if counting.is_some() && rec.counting.is_none() {
                rec.counting = counting;
            }
            generation
        };
        let mut request = Request::new(Body::new(ReplayBody {
            replay: self.inner.clone(),
            generation,
            linger_until,
            lingering: None,
        }));
        *request.method_mut() = self.inner.method.clone();
        *request.uri_mut() = self.inner.uri.clone();
        *request.version_mut() = self.inner.version;
        *request.headers_mut() = self.inner.headers.clone();
        if let Some(deadline) = self.inner.deadline {
            // gRFC A6: each attempt carries the time left, not the call's.
            let left = deadline.saturating_duration_since(Instant::now());
            request
                .headers_mut()
                .insert("grpc-timeout", encode_grpc_timeout(left));
        }
        if previous > 0 {
            request
                .headers_mut()
                .insert(PREVIOUS_ATTEMPTS, HeaderValue::from(previous));
        }
        Some((AttemptId(generation), request))
    }

    /// Whether another attempt is possible: the call has not committed.
    pub(crate) fn can_retry(&self) -> bool {
        lock(&self.inner.recording).mode == Mode::Recording
    }

    /// The attempt the call committed to, if it has.
    pub(crate) fn committed_to(&self) -> Option<AttemptId> {
        match lock(&self.inner.recording).mode {
            Mode::Committed(g) => Some(AttemptId(g)),
            Mode::Recording => None,
        }
    }

    /// Commits the call to `attempt`: no other attempt may send anything
    /// more, and what `attempt` has sent is freed. Whether the call is
    /// `attempt`'s: false when it had committed to another already.
    pub(crate) fn commit(&self, attempt: AttemptId) -> bool {
        let mut rec = lock(&self.inner.recording);
        rec.commit(attempt.0);
        rec.mode == Mode::Committed(attempt.0)
    }

    /// `attempt` is over: its body may not read any more.
    pub(crate) fn retire(&self, attempt: AttemptId) {
        let mut rec = lock(&self.inner.recording);
        rec.readers.retain(|(g, _)| *g != attempt.0);
        // It may have been the one the caller's body would wake.
        rec.wake_waiters();
    }

    #[cfg(test)]
    fn frames(&self) -> usize {
        lock(&self.inner.recording).frames.len()
    }
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

impl Drop for Replay {
    /// No other attempt can come: commit to the latest.
    fn drop(&mut self) {
        let mut rec = lock(&self.inner.recording);
        if rec.mode == Mode::Recording {
            let latest = rec.readers.iter().map(|(g, _)| *g).max().unwrap_or(0);
            rec.commit(latest);
        }
    }
}

fn lock(recording: &Mutex<Recording>) -> MutexGuard<'_, Recording> {
    recording.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Recording {
    fn commit(&mut self, generation: u64) {
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
            self.frames = VecDeque::new();
            self.base = sent.max(self.base);
        }
        self.buffer.release(std::mem::take(&mut self.held));
    }

    /// Keeps a frame the furthest attempt just read, or commits to that
    /// attempt once the body outgrows its buffer.
    fn record(&mut self, reader: usize, frame: &Frame<Bytes>) {
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
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
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
    fn wake_waiters(&mut self) {
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
    fn look_ahead(&mut self, cx: &mut Context<'_>) {
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
    fn ended_at(&self, cursor: usize) -> bool {
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

/// One attempt's request body: replays what was recorded, then reads on.
struct ReplayBody {
    replay: Arc<ReplayInner>,
    generation: u64,
    /// Until when a superseded body waits before it fails.
    linger_until: Option<tokio::time::Instant>,
    lingering: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = Status;

    fn is_end_stream(&self) -> bool {
        let rec = lock(&self.replay.recording);
        rec.readers
            .iter()
            .find(|(g, _)| *g == self.generation)
            .is_some_and(|&(_, cursor)| rec.ended_at(cursor))
    }

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let mut guard = lock(&this.replay.recording);
        let rec = &mut *guard;
        let Some(reader) = rec.readers.iter().position(|(g, _)| *g == this.generation) else {
            drop(guard);
            if let Some(until) = this.linger_until {
                let sleep = this
                    .lingering
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                ready!(sleep.as_mut().poll(cx));
            }
            return Poll::Ready(Some(Err(Status::cancelled(
                "this attempt was superseded by another",
            ))));
        };
        let cursor = rec.readers[reader].1;
        let end = rec.base + rec.frames.len();
        if cursor < end {
            let frame = match rec.mode {
                Mode::Committed(_) => {
                    rec.base += 1;
                    rec.frames.pop_front().map(Recorded::into_frame)
                }
                Mode::Recording => rec.frames.get(cursor - rec.base).map(Recorded::to_frame),
            };
            rec.readers[reader].1 += 1;
            if let Some(frame) = frame {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        if let Some(failed) = &rec.failed {
            return Poll::Ready(Some(Err(failed.clone())));
        }
        let next = match rec.peeked.take() {
            Some(peeked) => Some(peeked),
            None => ready!(rec.poll_inner(cx)),
        };
        match next {
            Some(Ok(frame)) => {
                if let (Some(counting), Some(data)) = (rec.counting.as_mut(), frame.data_ref()) {
                    let n = counting.frames.feed(data);
                    if n > 0 {
                        counting.stats.metrics.messages_sent(n, &counting.method);
                    }
                }
                match rec.mode {
                    Mode::Recording => rec.record(reader, &frame),
                    Mode::Committed(_) => {
                        rec.base += 1;
                        rec.readers[reader].1 += 1;
                    }
                }
                rec.look_ahead(cx);
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(status)) => {
                rec.inner = None;
                rec.failed = Some(status.clone());
                Poll::Ready(Some(Err(status)))
            }
            None => {
                rec.inner = None;
                Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    const LIMIT: usize = 64 * 1024;

    /// A request whose body yields what is sent on the returned channel.
    fn streaming_request() -> (mpsc::Sender<Bytes>, Request<Body>) {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, Status>(Frame::data(data)), rx))
        });
        let body = Body::new(http_body_util::StreamBody::new(stream));
        (tx, Request::new(body))
    }

    fn replay(request: Request<Body>) -> (Replay, Arc<RetryBuffer>) {
        let buffer = RetryBuffer::new(LIMIT, 16 * LIMIT);
        (Replay::new(request, buffer.clone(), None), buffer)
    }

    fn attempt(replay: &Replay) -> (AttemptId, Body) {
        let (id, request) = replay.attempt(None, 0, None).expect("not committed");
        (id, request.into_body())
    }

    async fn next(body: &mut Body) -> Option<Result<Bytes, Status>> {
        let frame = body.frame().await?;
        Some(frame.map(|f| f.into_data().unwrap_or_default()))
    }

    #[tokio::test]
    async fn a_second_attempt_replays_then_reads_on() {
        let (tx, request) = streaming_request();
        let (replay, _) = replay(request);
        let (id, mut first) = attempt(&replay);
        tx.send(Bytes::from_static(b"one")).await.unwrap();
        assert_eq!(next(&mut first).await.unwrap().unwrap(), "one");

        replay.retire(id);
        let (_, mut second) = attempt(&replay);
        tx.send(Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "one");
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "two");
        // The retired attempt's body may not read any more.
        let stale = next(&mut first).await.unwrap().unwrap_err();
        assert_eq!(stale.code(), tonic::Code::Cancelled);
    }

    #[tokio::test]
    async fn hedged_attempts_each_read_every_frame() {
        let (tx, request) = streaming_request();
        let (replay, _) = replay(request);
        let (_, mut first) = attempt(&replay);
        let (second_id, mut second) = attempt(&replay);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        // The second reads ahead from the caller; the first replays.
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "a");
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "b");
        assert_eq!(next(&mut first).await.unwrap().unwrap(), "a");
        tx.send(Bytes::from_static(b"c")).await.unwrap();
        assert_eq!(next(&mut first).await.unwrap().unwrap(), "b");
        assert_eq!(next(&mut first).await.unwrap().unwrap(), "c");
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "c");
        // The second answers first: the first may send nothing more.
        assert!(replay.commit(second_id));
        assert_eq!(replay.frames(), 0, "the committed attempt sent them all");
        assert!(next(&mut first).await.unwrap().is_err());
        drop(tx);
        assert!(next(&mut second).await.is_none());
        assert!(replay.attempt(None, 1, None).is_none(), "committed");
    }

    #[tokio::test]
    async fn hedged_attempts_waiting_on_the_callers_body_are_all_woken() {
        let (tx, request) = streaming_request();
        let (replay, _) = replay(request);
        let (_, first) = attempt(&replay);
        let (_, second) = attempt(&replay);
        // Each waits on the body from its own task, as each attempt's
        // stream does in hyper.
        let reader = |mut body: Body| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(frame) = next(&mut body).await {
                    got.push(frame.unwrap());
                }
                got
            })
        };
        let (first, second) = (reader(first), reader(second));
        for word in ["a", "b", "c"] {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(Bytes::from(word)).await.unwrap();
        }
        drop(tx);
        let limit = std::time::Duration::from_secs(5);
        let second = tokio::time::timeout(limit, second).await;
        let second = second.expect("the second attempt was woken").unwrap();
        assert_eq!(second, ["a", "b", "c"]);
        let first = tokio::time::timeout(limit, first).await;
        let first = first.expect("the first attempt was woken").unwrap();
        assert_eq!(first, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn an_attempt_left_waiting_when_another_retires_is_woken() {
        let (tx, request) = streaming_request();
        let (replay, _) = replay(request);
        let (_, first) = attempt(&replay);
        let (second_id, mut second) = attempt(&replay);
        let first = tokio::spawn(async move {
            let mut first = first;
            next(&mut first).await.map(Result::unwrap)
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // The second waits last, so the body holds its waker; then it
        // fails and is retired before anything arrives.
        let waiting = futures::poll!(std::pin::pin!(next(&mut second)));
        assert!(waiting.is_pending());
        replay.retire(second_id);
        drop(second);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let limit = std::time::Duration::from_secs(5);
        let got = tokio::time::timeout(limit, first).await;
        assert_eq!(got.expect("the first was woken").unwrap().unwrap(), "a");
    }

    #[tokio::test]
    async fn an_old_attempt_cannot_corrupt_the_retry_by_going_over_the_limit() {
        let (tx, request) = streaming_request();
        let (replay, _) = replay(request);
        let (old, mut first) = attempt(&replay);
        let chunk = Bytes::from(vec![7u8; LIMIT / 2]);
        tx.send(chunk.clone()).await.unwrap();
        assert_eq!(next(&mut first).await.unwrap().unwrap(), chunk);

        replay.retire(old);
        let (_, mut second) = attempt(&replay);
        // More than the limit is waiting; only the old attempt polls.
        tx.send(Bytes::from(vec![8u8; LIMIT / 2])).await.unwrap();
        assert!(next(&mut first).await.unwrap().is_err());
        // The retry still gets every byte, in order.
        assert_eq!(next(&mut second).await.unwrap().unwrap(), chunk);
        let rest = next(&mut second).await.unwrap().unwrap();
        assert_eq!(rest.len(), LIMIT / 2);
        assert!(!replay.can_retry(), "past the limit: committed");
        assert!(replay.attempt(None, 1, None).is_none());
    }

    #[tokio::test]
    async fn a_body_just_over_the_limit_commits_and_is_sent_whole() {
        let (tx, request) = streaming_request();
        let (replay, buffer) = replay(request);
        let (id, mut body) = attempt(&replay);
        // A frame costs its data and its entry: this one fills the limit.
        let fits = LIMIT - FRAME_COST;
        tx.send(Bytes::from(vec![1u8; fits])).await.unwrap();
        tx.send(Bytes::new()).await.unwrap();
        drop(tx);
        assert_eq!(next(&mut body).await.unwrap().unwrap().len(), fits);
        assert!(replay.can_retry(), "exactly the limit is kept");
        assert_eq!(buffer.used(), LIMIT);
        // Even an empty frame costs its entry: over the limit.
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "");
        assert!(next(&mut body).await.is_none());
        assert_eq!(replay.committed_to(), Some(id));
        assert_eq!(replay.frames(), 0);
        assert_eq!(buffer.used(), 0, "the channel's buffer is given back");
    }

    #[tokio::test]
    async fn the_buffer_counts_what_each_frame_holds_not_only_its_data() {
        // A stream of empty frames holds memory as surely as one of data.
        let (replay, buffer) = {
            let (tx, request) = streaming_request();
            let buffer = RetryBuffer::new(16 * FRAME_COST, 1 << 20);
            tokio::spawn(async move {
                for _ in 0..100_000 {
                    if tx.send(Bytes::new()).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Bytes::from_static(b"x")).await;
            });
            (Replay::new(request, buffer.clone(), None), buffer)
        };
        let (id, mut body) = attempt(&replay);
        let mut read = 0;
        while let Some(frame) = next(&mut body).await {
            frame.unwrap();
            read += 1;
            assert!(replay.frames() <= 16, "{} frames kept", replay.frames());
            assert!(buffer.used() <= 16 * FRAME_COST);
        }
        assert_eq!(read, 100_001, "every frame is still sent");
        assert_eq!(replay.committed_to(), Some(id), "committed at the 17th");
        assert_eq!(buffer.used(), 0);
    }

    #[tokio::test]
    async fn the_channel_total_bounds_every_call_together() {
        let buffer = RetryBuffer::new(LIMIT, LIMIT + LIMIT / 2);
        let fits = LIMIT - FRAME_COST;
        let mut held = Vec::new();
        for _ in 0..2 {
            let (tx, request) = streaming_request();
            let replay = Replay::new(request, buffer.clone(), None);
            let (_, mut body) = attempt(&replay);
            tx.send(Bytes::from(vec![2u8; fits])).await.unwrap();
            assert_eq!(next(&mut body).await.unwrap().unwrap().len(), fits);
            held.push((tx, replay, body));
        }
        // The first fits; the second would pass the total, so it commits.
        assert!(held[0].1.can_retry());
        assert!(!held[1].1.can_retry());
        assert_eq!(buffer.used(), LIMIT);
        drop(held);
        assert_eq!(buffer.used(), 0);
    }

    #[tokio::test]
    async fn commit_frees_what_was_sent_and_keeps_what_was_not() {
        let (tx, request) = streaming_request();
        let (replay, buffer) = replay(request);
        let (old, mut first) = attempt(&replay);
        for word in ["a", "b", "c"] {
            tx.send(Bytes::from(word)).await.unwrap();
            next(&mut first).await.unwrap().unwrap();
        }
        replay.retire(old);
        let (_, mut second) = attempt(&replay);
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "a");
        // The response headers arrive: the call commits mid-replay.
        let inner = replay.inner.clone();
        let recording = &inner.recording;
        drop(replay);
        assert_eq!(lock(recording).frames.len(), 2, "only what is unsent");
        assert_eq!(buffer.used(), 0);
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "b");
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "c");
        tx.send(Bytes::from_static(b"d")).await.unwrap();
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "d");
        assert_eq!(lock(recording).frames.len(), 0, "nothing kept after commit");
    }

    #[tokio::test]
    async fn a_body_of_one_ready_frame_ends_with_it() {
        // As tonic sends a unary request: one message, then the end at once.
        let stream =
            futures::stream::iter([Ok::<_, Status>(Frame::data(Bytes::from_static(b"one")))]);
        let (replay, _) = replay(Request::new(Body::new(http_body_util::StreamBody::new(
            stream,
        ))));
        let (_, mut body) = attempt(&replay);
        assert!(!body.is_end_stream(), "nothing read yet");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "one");
        assert!(
            body.is_end_stream(),
            "the last frame says so: HTTP/2 sends it with END_STREAM"
        );
        assert!(next(&mut body).await.is_none());

        // A retry replays the frame, and ends with it too.
        let (_, mut again) = attempt(&replay);
        assert!(!again.is_end_stream(), "the frame is still to send");
        assert_eq!(next(&mut again).await.unwrap().unwrap(), "one");
        assert!(again.is_end_stream());
    }

    #[tokio::test]
    async fn a_frame_read_ahead_is_not_lost() {
        let (tx, request) = streaming_request();
        let (replay, _) = replay(request);
        let (_, mut body) = attempt(&replay);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "a");
        assert!(!body.is_end_stream(), "b was read ahead, not sent");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "b");
        drop(tx);
        assert!(next(&mut body).await.is_none());
    }

    #[test]
    fn a_retry_names_the_attempts_before_it() {
        let (replay, _) = replay(Request::new(Body::empty()));
        let (_, first) = replay.attempt(None, 0, None).unwrap();
        assert!(first.headers().get(PREVIOUS_ATTEMPTS).is_none());
        let (_, third) = replay.attempt(None, 2, None).unwrap();
        assert_eq!(third.headers()[PREVIOUS_ATTEMPTS], "2");
    }
}
