//! A hedge that lost keeps its stream a moment before it is cancelled.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::subchannel::Slot;

/// How long after it was sent a hedge that lost keeps its stream: 20 ms.
///
/// A stream cancelled before the server has taken it from its accept queue
/// looks like the rapid-reset attack (CVE-2023-44487): hyper's and so
/// tonic's servers close the connection, GOAWAY ENHANCE_YOUR_CALM, once 20
/// such streams are pending. A busy server reads a hedge and its cancel in
/// one go when they are close together; 20 ms apart, it has taken the
/// stream first. A loser that answers meanwhile costs no cancel at all.
pub(crate) const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// An attempt's wait for its response that, dropped before [`LINGER`] has
/// passed since it was sent, hands the stream and its slot to a task that
/// cancels it only then.
pub(super) struct Lingering<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    pub(super) response: Option<Pin<Box<F>>>,
    pub(super) slot: Option<Slot>,
    pub(super) until: tokio::time::Instant,
}

impl<F> Future for Lingering<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    type Output = (F::Output, Slot);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(response) = self.response.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(response.as_mut().poll(cx));
        self.response = None;
        match self.slot.take() {
            Some(slot) => Poll::Ready((output, slot)),
            None => Poll::Pending,
        }
    }
}

impl<F> Drop for Lingering<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    fn drop(&mut self) {
        let (Some(response), Some(slot)) = (self.response.take(), self.slot.take()) else {
            return;
        };
        let until = self.until;
        if until <= tokio::time::Instant::now() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // An answer in time is dropped whole; otherwise the
                // stream is cancelled now.
                let _ = tokio::time::timeout_at(until, response).await;
                drop(slot);
            });
        }
    }
}
