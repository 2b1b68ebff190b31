//! A long-lived server stream the balancer keeps on a connection, as gRFC
//! A17 keeps the health Watch: opened with tonic's own client over the
//! connection, and reopened after it ends, at once if it had delivered a
//! message, else with backoff. UNIMPLEMENTED stops it for good. The
//! health Watch (`health.rs`) and ORCA's out-of-band reports
//! (`load_reports.rs`) are both one.

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
use tonic_prost::ProstCodec;

use super::conn::{Conn, Internal};
use crate::backoff::{Backoff, BackoffConfig};

/// What a watched stream gave.
pub(crate) enum Watch<M> {
    Message(M),
    /// The server doesn't have the method: the stream stays off.
    Unimplemented,
    /// The stream ended or failed with `Status` (OK when the server just
    /// closed it); another is scheduled.
    Ended(Status),
}

/// The stream's method and its limits.
pub(crate) struct Method {
    pub(crate) path: &'static str,
    /// The largest message accepted.
    pub(crate) max_message: usize,
    /// The decode buffer: small for small messages, as every endpoint
    /// keeps its stream for its life (tonic's default is 8 KiB).
    pub(crate) buffer: usize,
}

/// One connection's watched stream of `Resp` for `Req`. Polled, not
/// awaited, so the subchannel can drop it at any point.
pub(crate) struct Watched<Req, Resp> {
    conn: Arc<Conn>,
    method: &'static Method,
    request: Req,
    state: State<Resp>,
    backoff: Backoff,
    delivered: bool,
}

enum State<Resp> {
    Starting(BoxFuture<'static, Result<Streaming<Resp>, Status>>),
    Streaming(Box<Streaming<Resp>>),
    Waiting(Pin<Box<Sleep>>),
    Off,
}

impl<Req, Resp> Watched<Req, Resp>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    pub(crate) fn start(
        conn: Arc<Conn>,
        method: &'static Method,
        request: Req,
        backoff: BackoffConfig,
    ) -> Self {
        let mut watched = Self {
            conn,
            method,
            request,
            state: State::Off,
            backoff: Backoff::new(backoff),
            delivered: false,
        };
        watched.open();
        watched
    }

    fn open(&mut self) {
        let mut client = tonic::client::Grpc::new(InternalService(self.conn.clone()))
            .max_decoding_message_size(self.method.max_message);
        let request = tonic::Request::new(self.request.clone());
        let method = self.method;
        self.delivered = false;
        self.state = State::Starting(Box::pin(async move {
            let codec = SmallBuffer {
                codec: ProstCodec::<Req, Resp>::default(),
                buffer: method.buffer,
            };
            let path = http::uri::PathAndQuery::from_static(method.path);
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
            self.state = State::Waiting(Box::pin(sleep(self.backoff.next_delay())));
        }
    }

    fn ended(&mut self, status: Status) -> Watch<Resp> {
        if status.code() == Code::Unimplemented {
            self.state = State::Off;
            return Watch::Unimplemented;
        }
        self.retry();
        Watch::Ended(status)
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Watch<Resp>> {
        loop {
            match &mut self.state {
                State::Starting(fut) => match ready!(fut.as_mut().poll(cx)) {
                    Ok(stream) => self.state = State::Streaming(Box::new(stream)),
                    Err(status) => return Poll::Ready(self.ended(status)),
                },
                State::Streaming(stream) => {
                    return Poll::Ready(match ready!(Pin::new(&mut **stream).poll_next(cx)) {
                        Some(Ok(message)) => {
                            self.delivered = true;
                            Watch::Message(message)
                        }
                        Some(Err(status)) => self.ended(status),
                        None => {
                            self.retry();
                            Watch::Ended(Status::ok("the server ended the stream"))
                        }
                    });
                }
                State::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.open();
                }
                State::Off => return Poll::Pending,
            }
        }
    }
}

/// A codec whose decoder starts with a small buffer.
struct SmallBuffer<C> {
    codec: C,
    buffer: usize,
}

impl<C: Codec> Codec for SmallBuffer<C> {
    type Encode = C::Encode;
    type Decode = C::Decode;
    type Encoder = C::Encoder;
    type Decoder = SmallDecoder<C::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.codec.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SmallDecoder(self.codec.decoder(), self.buffer)
    }
}

struct SmallDecoder<D>(D, usize);

impl<D: Decoder> Decoder for SmallDecoder<D> {
    type Item = D::Item;
    type Error = D::Error;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D::Item>, D::Error> {
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        // tonic's yield threshold, which `BufferSettings` doesn't expose.
        BufferSettings::new(self.1, 32 * 1024)
    }
}

/// The connection as a tower service for tonic's client.
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
