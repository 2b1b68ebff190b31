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

mod body;
mod buffer;
mod recording;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use tokio::time::Instant;
use tonic::body::Body;

pub(crate) use self::body::ReplayBody;
pub(crate) use self::buffer::RetryBuffer;
pub(crate) use self::recording::Counting;
use self::recording::{Frames, Mode, Recording};
use crate::deadline::encode_grpc_timeout;
use smallvec::SmallVec;

/// Sees each data frame an attempt's body hands to the connection (for
/// telemetry's message events).
pub(crate) type SentFrames = Box<dyn FnMut(&[u8]) + Send + Sync>;

/// How many times a call is handed to a connection, when each one closes,
/// or refuses it unprocessed, before the call could leave the client. These
/// transparent retries don't count against a retry policy's attempts.
pub(crate) const MAX_ATTEMPTS: usize = 8;

/// The header that tells the server how many attempts came before this one.
const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

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
    /// The request's headers, for attempts after the first, which takes
    /// the caller's map itself. Inline: names and values clone by reference
    /// count, so the common call allocates nothing for its headers.
    headers: SmallVec<[(HeaderName, HeaderValue); 8]>,
    /// The call's deadline: each attempt tells the server the time left.
    deadline: Option<Instant>,
    recording: Mutex<Recording>,
    /// The call's span, the parent of its attempts' (telemetry).
    #[cfg(feature = "opentelemetry")]
    span: std::sync::OnceLock<tracing::Span>,
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
        let headers = parts
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Self {
            inner: Arc::new(ReplayInner {
                method: parts.method,
                uri: parts.uri,
                version: parts.version,
                headers,
                deadline,
                #[cfg(feature = "opentelemetry")]
                span: std::sync::OnceLock::new(),
                recording: Mutex::new(Recording {
                    inner: Some(body),
                    peeked: None,
                    failed: None,
                    counting: None,
                    frames: Frames::default(),
                    base: 0,
                    readers: SmallVec::new(),
                    attempts: 0,
                    held: 0,
                    buffer,
                    mode: Mode::Recording,
                    waiters: None,
                    parked: None,
                    first_headers: Some(parts.headers),
                }),
            }),
        }
    }

    /// The call's deadline, if it has one.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// The request's path.
    pub(crate) fn path(&self) -> &str {
        self.inner.uri.path()
    }

    /// The call's span, parent of its attempts' spans.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn set_span(&self, span: tracing::Span) {
        let _ = self.inner.span.set(span);
    }

    /// The call's span, if telemetry set one.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn span(&self) -> Option<&tracing::Span> {
        self.inner.span.get()
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
        outbound: Option<SentFrames>,
    ) -> Option<(AttemptId, Request<ReplayBody>)> {
        let (generation, first_headers) = {
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
            (generation, rec.first_headers.take())
        };
        let mut request = Request::new(ReplayBody {
            replay: self.inner.clone(),
            generation,
            linger_until,
            lingering: None,
            outbound,
        });
        *request.method_mut() = self.inner.method.clone();
        *request.uri_mut() = self.inner.uri.clone();
        *request.version_mut() = self.inner.version;
        *request.headers_mut() = first_headers.unwrap_or_else(|| {
            let mut headers = HeaderMap::with_capacity(self.inner.headers.len());
            for (name, value) in &self.inner.headers {
                headers.append(name.clone(), value.clone());
            }
            headers
        });
        if let Some(deadline) = self.inner.deadline {
            // gRFC A6: each attempt carries the time left, not the call's.
            let left = deadline.saturating_duration_since(Instant::now());
            request
                .headers_mut()
                .insert(&crate::deadline::GRPC_TIMEOUT, encode_grpc_timeout(left));
        }
        if previous > 0 {
            request
                .headers_mut()
                .insert(PREVIOUS_ATTEMPTS, HeaderValue::from(previous));
        }
        Some((AttemptId(generation), request))
    }

    /// How the caller's request body failed, if it did: what the caller
    /// hears when the client reset a stream because of it.
    pub(crate) fn body_failure(&self) -> BodyFailure {
        BodyFailure(self.inner.clone())
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

    /// Claims the call for `attempt`'s outcome, in one step: commits to it
    /// if the call has not committed yet (`None`: an outcome no attempt
    /// sent, after which no attempt may send more). False when the call
    /// committed to another attempt first, which alone may answer it.
    pub(crate) fn claim(&self, attempt: Option<AttemptId>) -> bool {
        let mut rec = lock(&self.inner.recording);
        match rec.mode {
            Mode::Recording => {
                rec.commit(attempt.map_or(0, |a| a.0));
                true
            }
            Mode::Committed(g) => attempt == Some(AttemptId(g)),
        }
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

/// A handle on how the caller's request body failed, for the response side
/// of an attempt.
pub(crate) struct BodyFailure(Arc<ReplayInner>);

impl BodyFailure {
    /// The body's own error, if it failed.
    pub(crate) fn get(&self) -> Option<tonic::Status> {
        lock(&self.0.recording).failed.clone()
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
