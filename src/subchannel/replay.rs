//! Transparent retry (gRFC A6): a call the server refused without
//! processing it is sent again, on another connection.
//!
//! HTTP/2 says which calls those are. A GOAWAY names the last stream the
//! server will process; every later stream fails with the GOAWAY's error.
//! A stream reset with REFUSED_STREAM was not processed either (RFC 9113
//! §8.7). grpc-go and C-core servers send GOAWAY on MAX_CONNECTION_AGE and
//! on shutdown, so without this a deploy fails the calls that crossed it.
//!
//! hyper consumes the request, so its body is recorded while it is sent, up
//! to [`REPLAY_LIMIT`] bytes. The rest of the body stays shared, so a
//! streaming call that had not sent more than that can be replayed too.
//!
//! The recording lives only as long as the call can be re-sent. When the
//! response headers arrive, the call is committed: the [`Replay`] is
//! dropped, and with it every recorded frame the current attempt has already
//! sent. A call that outgrows the limit drops its recording at once.
//!
//! Each attempt gets a generation. Only the body of the latest attempt may
//! read on; an earlier attempt's body, still polled by a connection that
//! failed it, gets an error instead. So two attempts can never interleave
//! what they send.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::{Body as HttpBody, Frame};
use tonic::Status;
use tonic::body::Body;

/// How many times a call is handed to a connection, when each one closes,
/// or refuses it unprocessed, before the call could leave the client.
pub(crate) const MAX_ATTEMPTS: usize = 8;

/// The most request bytes kept for a replay. A unary call's message is
/// usually far smaller; a call past it is not retried.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// A request that can be sent again until it commits.
pub(crate) struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    recording: Arc<Mutex<Recording>>,
    /// Attempts so far.
    attempts: u64,
}

struct Recording {
    /// The body not yet read; `None` once it ended.
    inner: Option<Body>,
    /// Messages counted for metrics, as they are first read.
    counting: Option<Counting>,
    /// Frames read so far that a later attempt may need.
    frames: VecDeque<Recorded>,
    /// How many of `frames` the current attempt has sent.
    cursor: usize,
    size: usize,
    mode: Mode,
    /// The attempt whose body may read.
    generation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Frames are kept for another attempt.
    Recording,
    /// Over the limit: nothing is kept, no other attempt.
    Overflowed,
    /// Response headers arrived: nothing more is kept, and frames leave the
    /// recording as the current attempt sends them.
    Committed,
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
    /// Takes over `request`; [`attempt`](Self::attempt) sends it.
    pub(crate) fn new(request: Request<Body>) -> Self {
        let (parts, body) = request.into_parts();
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            recording: Arc::new(Mutex::new(Recording {
                inner: Some(body),
                counting: None,
                frames: VecDeque::new(),
                cursor: 0,
                size: 0,
                mode: Mode::Recording,
                generation: 0,
            })),
            attempts: 0,
        }
    }

    /// The request's path, for metrics labels.
    pub(crate) fn path(&self) -> &str {
        self.uri.path()
    }

    /// The request for the next attempt, whose body replays what earlier
    /// attempts read and then reads on. `None` when the body was not kept
    /// whole, so it cannot be sent again. New messages count into
    /// `counting`.
    pub(crate) fn attempt(&mut self, counting: Option<Counting>) -> Option<Request<Body>> {
        let generation = {
            let mut rec = lock(&self.recording);
            if self.attempts > 0 && rec.mode != Mode::Recording {
                return None;
            }
            rec.generation += 1;
            rec.cursor = 0;
            if counting.is_some() {
                rec.counting = counting;
            }
            rec.generation
        };
        self.attempts += 1;
        let mut request = Request::new(Body::new(ReplayBody {
            recording: self.recording.clone(),
            generation,
        }));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        Some(request)
    }

    /// Whether another attempt is possible: the body so far was kept whole.
    pub(crate) fn can_retry(&self) -> bool {
        lock(&self.recording).mode == Mode::Recording
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
    /// Commits: no other attempt can come, so the recording goes, except
    /// frames the current attempt has still to send.
    fn drop(&mut self) {
        let mut rec = lock(&self.recording);
        if rec.mode == Mode::Recording {
            rec.mode = Mode::Committed;
        }
        let sent = rec.cursor.min(rec.frames.len());
        rec.frames.drain(..sent);
        rec.cursor = 0;
        if rec.frames.is_empty() {
            rec.frames = VecDeque::new();
        }
    }
}

fn lock(recording: &Mutex<Recording>) -> MutexGuard<'_, Recording> {
    recording.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One attempt's request body: replays what was recorded, then reads on.
struct ReplayBody {
    recording: Arc<Mutex<Recording>>,
    generation: u64,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let mut guard = lock(&this.recording);
        let rec = &mut *guard;
        if rec.generation != this.generation {
            return Poll::Ready(Some(Err(Status::cancelled(
                "this attempt was superseded by another",
            ))));
        }
        if rec.cursor < rec.frames.len() {
            let frame = match rec.mode {
                Mode::Committed => rec.frames.pop_front().map(Recorded::into_frame),
                _ => {
                    rec.cursor += 1;
                    rec.frames.get(rec.cursor - 1).map(Recorded::to_frame)
                }
            };
            if let Some(frame) = frame {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        let Some(inner) = rec.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(counting), Some(data)) = (rec.counting.as_mut(), frame.data_ref()) {
                    let n = counting.frames.feed(data);
                    if n > 0 {
                        counting.stats.metrics.messages_sent(n, &counting.method);
                    }
                }
                if rec.mode == Mode::Recording {
                    rec.record(&frame);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(status)) => Poll::Ready(Some(Err(status))),
            None => {
                rec.inner = None;
                Poll::Ready(None)
            }
        }
    }
}

impl Recording {
    /// Keeps a frame just read for another attempt, or gives up recording
    /// once the body outgrows the limit. Only called once every recorded
    /// frame was sent, so dropping them loses nothing this attempt needs.
    fn record(&mut self, frame: &Frame<Bytes>) {
        let recorded = match (frame.data_ref(), frame.trailers_ref()) {
            (Some(data), _) if self.size + data.len() <= REPLAY_LIMIT => {
                self.size += data.len();
                Recorded::Data(data.clone())
            }
            (Some(_), _) => {
                self.mode = Mode::Overflowed;
                self.frames = VecDeque::new();
                self.cursor = 0;
                self.size = 0;
                return;
            }
            (None, Some(trailers)) => Recorded::Trailers(trailers.clone()),
            (None, None) => return,
        };
        self.frames.push_back(recorded);
        self.cursor = self.frames.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

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

    async fn next(body: &mut Body) -> Option<Result<Bytes, Status>> {
        let frame = body.frame().await?;
        Some(frame.map(|f| f.into_data().unwrap_or_default()))
    }

    #[tokio::test]
    async fn a_second_attempt_replays_then_reads_on() {
        let (tx, request) = streaming_request();
        let mut replay = Replay::new(request);
        let mut first = replay.attempt(None).unwrap().into_body();
        tx.send(Bytes::from_static(b"one")).await.unwrap();
        assert_eq!(next(&mut first).await.unwrap().unwrap(), "one");

        let mut second = replay.attempt(None).unwrap().into_body();
        tx.send(Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "one");
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "two");
        // The first attempt's body may not read any more.
        let stale = next(&mut first).await.unwrap().unwrap_err();
        assert_eq!(stale.code(), tonic::Code::Cancelled);
    }

    #[tokio::test]
    async fn an_old_attempt_cannot_corrupt_the_retry_by_going_over_the_limit() {
        let (tx, request) = streaming_request();
        let mut replay = Replay::new(request);
        let mut first = replay.attempt(None).unwrap().into_body();
        let chunk = Bytes::from(vec![7u8; REPLAY_LIMIT / 2]);
        tx.send(chunk.clone()).await.unwrap();
        assert_eq!(next(&mut first).await.unwrap().unwrap(), chunk);

        let mut second = replay.attempt(None).unwrap().into_body();
        // One more byte than the limit is waiting; only the old attempt polls.
        tx.send(Bytes::from(vec![8u8; REPLAY_LIMIT / 2 + 1]))
            .await
            .unwrap();
        assert!(next(&mut first).await.unwrap().is_err());
        // The retry still gets every byte, in order.
        assert_eq!(next(&mut second).await.unwrap().unwrap(), chunk);
        let rest = next(&mut second).await.unwrap().unwrap();
        assert_eq!(rest.len(), REPLAY_LIMIT / 2 + 1);
        assert!(!replay.can_retry(), "past the limit now");
        assert!(replay.attempt(None).is_none());
    }

    #[tokio::test]
    async fn a_body_just_over_the_limit_is_sent_whole_but_not_kept() {
        let (tx, request) = streaming_request();
        let mut replay = Replay::new(request);
        let mut body = replay.attempt(None).unwrap().into_body();
        tx.send(Bytes::from(vec![1u8; REPLAY_LIMIT])).await.unwrap();
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        drop(tx);
        assert_eq!(next(&mut body).await.unwrap().unwrap().len(), REPLAY_LIMIT);
        assert!(replay.can_retry(), "exactly the limit is kept");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "x");
        assert!(next(&mut body).await.is_none());
        assert!(!replay.can_retry());
        assert_eq!(lock(&replay.recording).frames.len(), 0);
    }

    #[tokio::test]
    async fn commit_frees_what_was_sent_and_keeps_what_was_not() {
        let (tx, request) = streaming_request();
        let mut replay = Replay::new(request);
        let mut first = replay.attempt(None).unwrap().into_body();
        for word in ["a", "b", "c"] {
            tx.send(Bytes::from(word)).await.unwrap();
            next(&mut first).await.unwrap().unwrap();
        }
        let mut second = replay.attempt(None).unwrap().into_body();
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "a");
        // The response headers arrive: the call commits mid-replay.
        let recording = replay.recording.clone();
        drop(replay);
        assert_eq!(lock(&recording).frames.len(), 2, "only what is unsent");
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "b");
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "c");
        tx.send(Bytes::from_static(b"d")).await.unwrap();
        assert_eq!(next(&mut second).await.unwrap().unwrap(), "d");
        assert_eq!(
            lock(&recording).frames.len(),
            0,
            "nothing kept after commit"
        );
    }
}
