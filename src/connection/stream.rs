//! One HTTP/2 stream on a connection: its request sent from the caller's
//! own task, and its response body.
//!
//! hyper hands each request to its dispatch task and spawns a task per
//! request body, so a unary call's HEADERS and DATA leave in two turns of
//! the connection and two writes. Here the caller opens the stream itself:
//! a body that is already whole (a unary request) is queued with its
//! HEADERS and END_STREAM in the same turn, and the connection writes them
//! in one go. A body that isn't whole is fed from the call's own future
//! while it waits for the response headers ([`Exchange`]); only a request
//! still open after them (a bidi stream) gets a task of its own
//! ([`finish_request`]), as the caller then polls only the response.
//!
//! Flow control as hyper does it: a chunk waits for send capacity, one
//! byte reserved at a time, so a body never pins the connection's window
//! ahead of its data (hyper #4003). A body that fails resets the stream
//! with CANCEL; a stream the server resets stops being fed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::task::AtomicWaker;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;

/// Why a request stopped before its end.
#[derive(Debug)]
pub(crate) enum Stopped {
    /// Its body failed, with this error; the client reset the stream.
    Body(Status),
    /// The server reset the stream, with this reason (NO_ERROR: it has
    /// answered and needs no more).
    Reset(Reason),
    /// The stream or the connection failed.
    Failed(h2::Error),
}

/// A request body being sent on its stream, as flow control allows.
pub(crate) struct Outgoing<B> {
    stream: SendStream<Bytes>,
    body: B,
    /// A chunk read, waiting for send capacity, and whether it ends the
    /// body.
    waiting: Option<(Bytes, bool)>,
    /// A frame read ahead of the first, not yet sent.
    peeked: Option<Frame<Bytes>>,
}

/// Why a stream could not be opened: nothing of the request left.
#[derive(Debug)]
pub(crate) enum NotOpened {
    /// The request body failed before anything was sent.
    Body(Status),
    /// The connection refused the stream (closed, going away, or the
    /// request malformed).
    Refused(h2::Error),
}

/// Opens a stream for `head` on `send` and sends what `body` has ready
/// now, in the caller's turn: a whole body goes with END_STREAM, so a
/// unary call is one write. The rest is sent by the returned [`Exchange`].
pub(crate) fn open<B>(
    send: &mut SendRequest<Bytes>,
    head: Request<()>,
    mut body: B,
    cx: &mut Context<'_>,
) -> Result<Exchange<B>, NotOpened>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    let first = Pin::new(&mut body).poll_frame(cx);
    let (response, stream, rest) = match first {
        Poll::Ready(Some(Err(status))) => return Err(NotOpened::Body(status)),
        Poll::Ready(None) => {
            let (response, _) = send.send_request(head, true).map_err(NotOpened::Refused)?;
            return Ok(Exchange::answered_by(response, None));
        }
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) => {
                // Looks ahead, so that a whole body says so with its data.
                let (end, peeked) = match body.is_end_stream() {
                    true => (true, None),
                    false => match Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(None) => (true, None),
                        Poll::Ready(Some(Err(status))) => return Err(NotOpened::Body(status)),
                        Poll::Ready(Some(Ok(next))) => (false, Some(next)),
                        Poll::Pending => (false, None),
                    },
                };
                let (response, mut stream) =
                    send.send_request(head, false).map_err(NotOpened::Refused)?;
                if end {
                    // Whole: no wait for capacity, h2 queues it and sends as
                    // the window allows.
                    if let Err(e) = stream.send_data(data, true) {
                        return Ok(Exchange::failed(response, Stopped::Failed(e)));
                    }
                    return Ok(Exchange::holding(response, stream));
                }
                // A stream's chunks wait for capacity, each before the next
                // is read: an attempt the server doesn't read from reads no
                // further (a hedge's shared recording depends on it).
                stream.reserve_capacity(1);
                let rest = Outgoing {
                    stream,
                    body,
                    waiting: Some((data, false)),
                    peeked,
                };
                return Ok(Exchange::answered_by(response, Some(rest)));
            }
            Err(frame) => {
                let (response, mut stream) =
                    send.send_request(head, false).map_err(NotOpened::Refused)?;
                match frame.into_trailers() {
                    Ok(trailers) => {
                        if let Err(e) = stream.send_trailers(trailers) {
                            return Ok(Exchange::failed(response, Stopped::Failed(e)));
                        }
                        (response, stream, None)
                    }
                    // A frame of a kind HTTP/2 doesn't carry: skipped.
                    Err(_) => (response, stream, Some(body)),
                }
            }
        },
        Poll::Pending => {
            let (response, stream) = send.send_request(head, false).map_err(NotOpened::Refused)?;
            (response, stream, Some(body))
        }
    };
    let outgoing = rest.map(|body| Outgoing {
        stream,
        body,
        waiting: None,
        peeked: None,
    });
    Ok(Exchange::answered_by(response, outgoing))
}

/// Opens a stream at its first poll, in the caller's task: [`open`] as a
/// future.
pub(crate) struct Opening<'a, B> {
    pub(crate) send: &'a mut SendRequest<Bytes>,
    pub(crate) request: Option<(Request<()>, B)>,
}

impl<B> Future for Opening<'_, B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Output = Result<Exchange<B>, NotOpened>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match this.request.take() {
            Some((head, body)) => Poll::Ready(open(this.send, head, body, cx)),
            // Polled after it was ready: a caller's bug, answered, not hung.
            None => Poll::Ready(Err(NotOpened::Body(Status::internal(
                "a stream was opened twice",
            )))),
        }
    }
}

// === impl Outgoing ===

impl<B> Outgoing<B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    /// Sends what the body has, as capacity allows; ready once its end is
    /// sent, or it stopped.
    pub(crate) fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Stopped>> {
        loop {
            // Heard while waiting for the body or for capacity.
            if let Poll::Ready(reset) = self.stream.poll_reset(cx) {
                return Poll::Ready(Err(match reset {
                    Ok(reason) => Stopped::Reset(reason),
                    Err(e) => Stopped::Failed(e),
                }));
            }
            if let Some((data, end)) = self.waiting.take() {
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            self.waiting = Some((data, end));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Stopped::Failed(e))),
                        // No longer sending: finished or reset.
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(Stopped::Reset(Reason::CANCEL)));
                        }
                    }
                }
                self.stream.send_data(data, end).map_err(Stopped::Failed)?;
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let next = match self.peeked.take() {
                Some(frame) => Some(Ok(frame)),
                None => ready!(Pin::new(&mut self.body).poll_frame(cx)),
            };
            match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.body.is_end_stream();
                        if data.is_empty() {
                            self.stream.send_data(data, end).map_err(Stopped::Failed)?;
                            if end {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        self.stream.reserve_capacity(1);
                        self.waiting = Some((data, end));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream
                                .send_trailers(trailers)
                                .map_err(Stopped::Failed)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(status)) => {
                    self.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(Stopped::Body(status)));
                }
                None => {
                    self.stream
                        .send_data(Bytes::new(), true)
                        .map_err(Stopped::Failed)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// Gives up on the request: the stream is reset with CANCEL.
    fn cancel(&mut self) {
        self.stream.send_reset(Reason::CANCEL);
    }
}

/// A stream waiting for its response headers, feeding its request body
/// meanwhile.
pub(crate) struct Exchange<B> {
    response: ResponseFuture,
    outgoing: Option<Outgoing<B>>,
    stopped: Option<Stopped>,
    /// The sending side of a request sent whole, kept until the answer:
    /// dropped at once, it would wake the connection's task a second time
    /// in the caller's turn.
    _sent: Option<SendStream<Bytes>>,
}

/// What an [`Exchange`] came to.
pub(crate) struct Answered<B> {
    pub(crate) response: Result<Response<RecvStream>, h2::Error>,
    /// The request, when it is still being sent.
    pub(crate) rest: Option<Outgoing<B>>,
    /// Why the request stopped before its end, if it did.
    pub(crate) stopped: Option<Stopped>,
}

impl<B> Exchange<B> {
    fn answered_by(response: ResponseFuture, outgoing: Option<Outgoing<B>>) -> Self {
        Self {
            response,
            outgoing,
            stopped: None,
            _sent: None,
        }
    }

    fn holding(response: ResponseFuture, sent: SendStream<Bytes>) -> Self {
        Self {
            response,
            outgoing: None,
            stopped: None,
            _sent: Some(sent),
        }
    }

    fn failed(response: ResponseFuture, stopped: Stopped) -> Self {
        Self {
            response,
            outgoing: None,
            stopped: Some(stopped),
            _sent: None,
        }
    }
}

impl<B> Future for Exchange<B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Output = Answered<B>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answered<B>> {
        let this = &mut *self;
        if let Some(outgoing) = &mut this.outgoing
            && let Poll::Ready(sent) = outgoing.poll_send(cx)
        {
            this.outgoing = None;
            this.stopped = sent.err();
        }
        let response = ready!(Pin::new(&mut this.response).poll(cx));
        Poll::Ready(Answered {
            response,
            rest: this.outgoing.take(),
            stopped: this.stopped.take(),
        })
    }
}

/// Ties a request still being sent to its response's body: a body dropped
/// before its end cancels the request, and a request body that fails after
/// the headers says why to the response.
#[derive(Default)]
pub(crate) struct Link {
    cancelled: std::sync::atomic::AtomicBool,
    waker: AtomicWaker,
    failed: Mutex<Option<Status>>,
}

impl Link {
    fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How the request body failed, if it did.
    pub(crate) fn failure(&self) -> Option<Status> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Sends the rest of a request whose response has begun, until its end,
/// a failure, a reset, or the response's drop (`link`).
pub(crate) async fn finish_request<B>(mut outgoing: Outgoing<B>, link: Arc<Link>)
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    let sent = std::future::poll_fn(|cx| {
        link.waker.register(cx.waker());
        if link.is_cancelled() {
            outgoing.cancel();
            return Poll::Ready(Ok(()));
        }
        outgoing.poll_send(cx)
    })
    .await;
    if let Err(Stopped::Body(status)) = sent {
        *link
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
    }
}

/// Streams whose response ended, handed to their connection's task to
/// release at its next turn. h2 wakes that task when a finished stream's
/// last handle drops; dropped in the caller's turn, just as the caller
/// opens its next stream on another endpoint's connection, two tasks would
/// wake at once, and the runtime wakes an idle worker (two futex calls per
/// call) to take the second.
#[derive(Default)]
pub(crate) struct Released {
    streams: Mutex<Vec<RecvStream>>,
    any: std::sync::atomic::AtomicBool,
}

impl Released {
    fn keep(&self, recv: RecvStream) {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        streams.push(recv);
        self.any.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Releases the streams kept: the connection's task, at each turn.
    /// `spare` is the task's own list, swapped in so that neither list
    /// allocates again once grown.
    pub(crate) fn release(&self, spare: &mut Vec<RecvStream>) {
        if !self.any.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        std::mem::swap(
            &mut *self
                .streams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            spare,
        );
        // Outside the lock: each drop takes h2's.
        spare.clear();
    }
}

/// A response body as it arrives on its stream: data, then trailers.
pub(crate) struct Incoming {
    /// `None` once handed to `released`.
    recv: Option<RecvStream>,
    data_done: bool,
    done: bool,
    /// The request still being sent, if it is.
    link: Option<Arc<Link>>,
    /// Where the stream goes once it has ended.
    released: Option<Arc<Released>>,
}

impl Incoming {
    pub(crate) fn new(
        recv: RecvStream,
        link: Option<Arc<Link>>,
        released: Option<Arc<Released>>,
    ) -> Self {
        let done = recv.is_end_stream();
        Self {
            recv: Some(recv),
            data_done: done,
            done,
            link,
            released,
        }
    }

    /// The request side's failure, if the request body failed after the
    /// response began.
    pub(crate) fn request_failure(&self) -> Option<Status> {
        self.link.as_ref().and_then(|l| l.failure())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.done {
            // Unfinished: dropped here, which cancels the stream at once.
            if let Some(link) = &self.link {
                link.cancel();
            }
            return;
        }
        if let (Some(recv), Some(released)) = (self.recv.take(), &self.released) {
            released.keep(recv);
        }
    }
}

impl HttpBody for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let Some(recv) = this.recv.as_mut().filter(|_| !this.done) else {
            return Poll::Ready(None);
        };
        if !this.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window opens again as the caller takes the data.
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(recv.poll_trailers(cx));
        this.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
