//! The anchor of the per-call benches: tonic's generated client and codec
//! over one h2 connection driven directly, with nothing between them: no
//! hyper dispatch task, no task per body, HEADERS and a whole request body
//! queued in the caller's turn. No balancing, no health, no retries: the
//! least a tonic call over HTTP/2 can cost, for the others to be read
//! against.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use tonic::Status;
use tonic::body::Body;

/// h2 connections as a tower service for tonic's generated clients: one,
/// or one per address taken in turn (round robin, the least a balancer
/// does).
#[derive(Clone)]
pub struct H2Channel {
    sends: std::sync::Arc<[h2::client::SendRequest<Bytes>]>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl H2Channel {
    /// One connection to each of `addrs`, calls taken round robin.
    pub async fn connect_all(addrs: &[SocketAddr]) -> std::io::Result<Self> {
        let mut sends = Vec::new();
        for addr in addrs {
            sends.push(Self::connect_one(*addr).await?);
        }
        Ok(Self {
            sends: sends.into(),
            next: Default::default(),
        })
    }

    /// Connects to `addr`, with `TCP_NODELAY`, and spawns the connection's
    /// task.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        Self::connect_all(&[addr]).await
    }

    async fn connect_one(addr: SocketAddr) -> std::io::Result<h2::client::SendRequest<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(send)
    }
}

impl tower::Service<Request<Body>> for H2Channel {
    type Response = Response<Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Response<Body>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut send = self.sends[turn % self.sends.len()].clone();
        Box::pin(async move {
            let (parts, mut body) = request.into_parts();
            let head = Request::from_parts(parts, ());
            // A unary body: one data frame, then its end, both ready now.
            let mut data = Bytes::new();
            while let Some(frame) =
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            {
                if let Ok(chunk) = frame?.into_data() {
                    data = chunk;
                }
            }
            let (response, mut stream) = send
                .send_request(head, false)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            stream
                .send_data(data, true)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            drop(send);
            let response = response
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(response.map(|recv| {
                Body::new(Received {
                    recv,
                    data_done: false,
                })
            }))
        })
    }
}

/// A response body straight from h2.
struct Received {
    recv: h2::RecvStream,
    data_done: bool,
}

impl HttpBody for Received {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(Status::unavailable(e.to_string())))),
                None => this.data_done = true,
            }
        }
        Poll::Ready(match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(Status::unavailable(e.to_string()))),
        })
    }
}
