//! Health: a `grpc.health.v1.Health/Watch` stream per endpoint (gRFC A17).
//!
//! The Watch stream runs on the very connection that carries the calls, so
//! its answer describes that connection. Its rules:
//!
//! - Until the first answer the endpoint is CONNECTING. Only SERVING is
//!   serving; NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN and values this client
//!   doesn't know are not.
//! - UNIMPLEMENTED: the server has no health service. The endpoint counts as
//!   serving, one error-level line is logged, and the stream isn't retried.
//! - Any other end: not serving at once, and the stream is retried with
//!   backoff. The backoff resets when the ended stream had delivered a
//!   message, so a stream that worked and then broke is retried at once.
//!
//! The Watch is a stream like any call, and counts against the server's
//! stream limit; the pool keeps a slot for it on the endpoint's first
//! connection, so it never waits behind calls.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::Stream;
use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::time::{Sleep, sleep};
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, Streaming};
use tonic::{Code, Status};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_prost::ProstCodec;

use super::conn::Conn;
use super::conn::Internal;
use crate::backoff::{Backoff, BackoffConfig};

/// What the health stream said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HealthEvent {
    /// An answer.
    Status(HealthStatus),
    /// The server has no health service.
    Unimplemented,
    /// The stream ended or failed; a retry is scheduled.
    Ended(String),
}

/// The largest Watch message accepted. A `HealthCheckResponse` is 2 bytes;
/// a server sending more is broken, and its stream ends with an error.
const MAX_HEALTH_MESSAGE: usize = 4 * 1024;

/// The Watch's method, as tonic-health's generated client names it.
const WATCH: &str = "/grpc.health.v1.Health/Watch";

/// The Watch's decode buffer: its answers are a few bytes, and every
/// endpoint keeps one stream for its life; tonic's default is 8 KiB.
const WATCH_BUFFER: usize = 64;

/// One connection's Watch stream, retried as gRFC A17 says. Polled, not
/// awaited, so the subchannel can drop it at any point.
pub(crate) struct HealthWatch {
    conn: Arc<Conn>,
    service: String,
    state: WatchState,
    backoff: Backoff,
    delivered: bool,
}

enum WatchState {
    Starting(BoxFuture<'static, Result<Streaming<HealthCheckResponse>, Status>>),
    Streaming(Box<Streaming<HealthCheckResponse>>),
    Waiting(Pin<Box<Sleep>>),
    Off,
}

// === impl HealthWatch ===

impl HealthWatch {
    pub(crate) fn start(conn: Arc<Conn>, service: String, backoff: BackoffConfig) -> Self {
        let mut watch = Self {
            conn,
            service,
            state: WatchState::Off,
            backoff: Backoff::new(backoff),
            delivered: false,
        };
        watch.open();
        watch
    }

    fn open(&mut self) {
        // tonic's own client for the generated messages, with a small
        // decode buffer (`SmallBuffer`).
        let mut client = tonic::client::Grpc::new(InternalService(self.conn.clone()))
            .max_decoding_message_size(MAX_HEALTH_MESSAGE);
        let request = tonic::Request::new(HealthCheckRequest {
            service: self.service.clone(),
        });
        self.delivered = false;
        self.state = WatchState::Starting(Box::pin(async move {
            let codec =
                SmallBuffer(ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default());
            let path = http::uri::PathAndQuery::from_static(WATCH);
            client
                .server_streaming(request, path, codec)
                .await
                .map(tonic::Response::into_inner)
        }));
    }

    fn retry(&mut self) {
        if self.delivered {
            self.backoff.reset();
            self.open();
        } else {
            self.state = WatchState::Waiting(Box::pin(sleep(self.backoff.next_delay())));
        }
    }

    fn ended(&mut self, status: &Status) -> HealthEvent {
        if status.code() == Code::Unimplemented {
            self.state = WatchState::Off;
            return HealthEvent::Unimplemented;
        }
        self.retry();
        if status.code() == Code::NotFound {
            // tonic-health ends the stream with NOT_FOUND where A17 sends
            // SERVICE_UNKNOWN; the service may be registered later, so retry.
            return HealthEvent::Status(HealthStatus::ServiceUnknown);
        }
        HealthEvent::Ended(format!("{:?}: {}", status.code(), status.message()))
    }

    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<HealthEvent> {
        loop {
            match &mut self.state {
                WatchState::Starting(fut) => match ready!(fut.as_mut().poll(cx)) {
                    Ok(stream) => self.state = WatchState::Streaming(Box::new(stream)),
                    Err(status) => return Poll::Ready(self.ended(&status)),
                },
                WatchState::Streaming(stream) => {
                    match ready!(Pin::new(&mut **stream).poll_next(cx)) {
                        Some(Ok(answer)) => {
                            self.delivered = true;
                            return Poll::Ready(HealthEvent::Status(HealthStatus::from_wire(
                                answer.status,
                            )));
                        }
                        Some(Err(status)) => return Poll::Ready(self.ended(&status)),
                        None => {
                            self.retry();
                            return Poll::Ready(HealthEvent::Ended(
                                "the server ended the health stream".into(),
                            ));
                        }
                    }
                }
                WatchState::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.open();
                }
                WatchState::Off => return Poll::Pending,
            }
        }
    }
}

/// A codec whose decoder starts with a small buffer.
struct SmallBuffer<C>(C);

impl<C: Codec> Codec for SmallBuffer<C> {
    type Encode = C::Encode;
    type Decode = C::Decode;
    type Encoder = C::Encoder;
    type Decoder = SmallDecoder<C::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SmallDecoder(self.0.decoder())
    }
}

struct SmallDecoder<D>(D);

impl<D: Decoder> Decoder for SmallDecoder<D> {
    type Item = D::Item;
    type Error = D::Error;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D::Item>, D::Error> {
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        // tonic's yield threshold, which `BufferSettings` doesn't expose.
        BufferSettings::new(WATCH_BUFFER, 32 * 1024)
    }
}

/// The connection as a tower service for tonic's health messages.
#[derive(Clone)]
struct InternalService(Arc<Conn>);

impl tower::Service<Request<Body>> for InternalService {
    type Response = Response<Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Response<Body>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let conn = self.0.clone();
        Box::pin(async move {
            match conn.send_internal(request).await {
                Internal::Response(response) => Ok(response),
                Internal::Unsent => Err(Status::unavailable(format!(
                    "the connection to {} has closed",
                    conn.addr
                ))),
                Internal::Failed(status) => Err(status),
            }
        })
    }
}

/// What a `grpc.health.v1` health service answered: its `ServingStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthStatus {
    /// `UNKNOWN` (0).
    Unknown,
    /// `SERVING` (1): the only answer that lets calls come.
    Serving,
    /// `NOT_SERVING` (2).
    NotServing,
    /// `SERVICE_UNKNOWN` (3): the server does not know the service name
    /// asked about. tonic-health ends the stream with NOT_FOUND instead,
    /// which healthlb reads as this.
    ServiceUnknown,
    /// A value this client does not know.
    Unrecognized(i32),
}

// === impl HealthStatus ===

impl HealthStatus {
    /// The status a `ServingStatus` value on the wire stands for.
    pub(crate) fn from_wire(value: i32) -> Self {
        match value {
            0 => HealthStatus::Unknown,
            1 => HealthStatus::Serving,
            2 => HealthStatus::NotServing,
            3 => HealthStatus::ServiceUnknown,
            other => HealthStatus::Unrecognized(other),
        }
    }

    /// Its name, as `grpc.health.v1` spells it.
    pub fn label(&self) -> &'static str {
        match self {
            HealthStatus::Unknown => "UNKNOWN",
            HealthStatus::Serving => "SERVING",
            HealthStatus::NotServing => "NOT_SERVING",
            HealthStatus::ServiceUnknown => "SERVICE_UNKNOWN",
            HealthStatus::Unrecognized(_) => "unrecognized health status",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthStatus::Unrecognized(value) => write!(f, "unrecognized health status {value}"),
            other => f.write_str(other.label()),
        }
    }
}
