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

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::{Body as HttpBody, Frame};
use tonic::Status;
use tonic::body::Body;

/// The most request bytes kept for a replay. A unary call's message is
/// usually far smaller; a call past it is not retried.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// Whether a failed call is known not to have been processed by the server.
pub(crate) fn refused_unprocessed(err: &hyper::Error) -> bool {
    super::call::h2_error(err).is_some_and(|h2| {
        h2.is_remote()
            && (h2.is_go_away()
                || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)))
    })
}

/// What it takes to send a request again.
pub(crate) struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Arc<Mutex<Recording>>,
}

struct Recording {
    /// The body not yet read; `None` once it ended.
    inner: Option<Body>,
    /// Messages counted for metrics, on the first read only.
    counting: Option<Counting>,
    frames: Vec<Recorded>,
    size: usize,
    /// Over the limit: no replay.
    overflow: bool,
}

/// What the request's messages are counted into.
pub(crate) struct Counting {
    pub(crate) stats: Arc<super::Stats>,
    pub(crate) method: Arc<str>,
    pub(crate) frames: crate::metrics::GrpcFrames,
}

enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Replay {
    /// Splits `request` into the request to send, whose body records itself,
    /// and what it takes to send it again.
    pub(crate) fn wrap(
        request: Request<Body>,
        counting: Option<Counting>,
    ) -> (Request<Body>, Replay) {
        let (parts, body) = request.into_parts();
        let recording = Arc::new(Mutex::new(Recording {
            inner: Some(body),
            counting,
            frames: Vec::new(),
            size: 0,
            overflow: false,
        }));
        let replay = Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: recording.clone(),
        };
        let body = Body::new(ReplayBody { recording, pos: 0 });
        (Request::from_parts(parts, body), replay)
    }

    /// The same request again, if its body was kept whole so far.
    pub(crate) fn rebuild(&self) -> Option<Request<Body>> {
        if lock(&self.body).overflow {
            return None;
        }
        let mut request = Request::new(Body::new(ReplayBody {
            recording: self.body.clone(),
            pos: 0,
        }));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        Some(request)
    }
}

fn lock(recording: &Mutex<Recording>) -> MutexGuard<'_, Recording> {
    recording.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request body that replays what was recorded, then reads on.
struct ReplayBody {
    recording: Arc<Mutex<Recording>>,
    pos: usize,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let mut rec = lock(&this.recording);
        if let Some(frame) = rec.frames.get(this.pos) {
            this.pos += 1;
            return Poll::Ready(Some(Ok(match frame {
                Recorded::Data(data) => Frame::data(data.clone()),
                Recorded::Trailers(trailers) => Frame::trailers(trailers.clone()),
            })));
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
                if !rec.overflow {
                    let recorded = match frame.data_ref() {
                        Some(data) if rec.size + data.len() <= REPLAY_LIMIT => {
                            rec.size += data.len();
                            Some(Recorded::Data(data.clone()))
                        }
                        Some(_) => None,
                        None => frame.trailers_ref().map(|t| Recorded::Trailers(t.clone())),
                    };
                    match recorded {
                        Some(recorded) => {
                            rec.frames.push(recorded);
                            this.pos = rec.frames.len();
                        }
                        None if frame.is_data() => {
                            rec.overflow = true;
                            rec.frames.clear();
                            this.pos = 0;
                        }
                        None => {}
                    }
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
