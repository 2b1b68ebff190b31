//! One attempt's request body: it replays what the call recorded, then
//! reads on from the caller's body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tonic::Status;

use super::recording::{Mode, Recorded};
use super::{ReplayInner, SentFrames, lock};

/// One attempt's request body: replays what was recorded, then reads on.
pub(crate) struct ReplayBody {
    pub(super) replay: Arc<ReplayInner>,
    pub(super) generation: u64,
    /// Until when a superseded body waits before it fails.
    pub(super) linger_until: Option<tokio::time::Instant>,
    pub(super) lingering: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Telemetry: sees each request frame this attempt sends.
    pub(super) outbound: Option<SentFrames>,
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
        let polled = this.poll_next(cx);
        if let (Some(outbound), Poll::Ready(Some(Ok(frame)))) = (&mut this.outbound, &polled)
            && let Some(data) = frame.data_ref()
        {
            outbound(data);
        }
        polled
    }
}

impl ReplayBody {
    /// The next frame: recorded, or read on from the caller's body.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self;
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
