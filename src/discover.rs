//! [`Discover`]: the SERVING endpoints as a [`tower::discover::Discover`],
//! for tower's own balancers.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tower::discover::Change;

use crate::balancer::ServingSet;
use crate::subchannel::Subchannel;

/// A stream of changes to the SERVING endpoints of an
/// [`LbChannel`](crate::LbChannel): `Insert` when an endpoint becomes
/// SERVING, `Remove` when it stops or leaves DNS. The services are
/// [`Subchannel`]s, whose `Load` is their calls in flight, so
/// `tower::balance::p2c::Balance` sees real load.
///
/// It ends when the last `LbChannel` clone is dropped. Subchannels it has
/// yielded stay connected until the balancer holding them drops them.
pub struct Discover {
    updates: BoxStream<'static, ServingSet>,
    known: BTreeSet<SocketAddr>,
    pending: VecDeque<Change<SocketAddr, Subchannel>>,
}

impl Discover {
    pub(crate) fn new(mut serving: watch::Receiver<ServingSet>) -> Self {
        serving.mark_changed();
        let updates = futures::stream::unfold(serving, |mut rx| async move {
            rx.changed().await.ok()?;
            let set = rx.borrow_and_update().clone();
            Some((set, rx))
        });
        Self {
            updates: Box::pin(updates.fuse()),
            known: BTreeSet::new(),
            pending: VecDeque::new(),
        }
    }

    fn diff(&mut self, set: &ServingSet) {
        let gone: Vec<SocketAddr> = self
            .known
            .iter()
            .filter(|a| !set.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            self.known.remove(&addr);
            self.pending.push_back(Change::Remove(addr));
        }
        for (addr, sub) in set.iter() {
            if self.known.insert(*addr) {
                // The balancer gave it the channel's ready timeout.
                self.pending.push_back(Change::Insert(*addr, sub.clone()));
            }
        }
    }
}

impl Stream for Discover {
    type Item = Result<Change<SocketAddr, Subchannel>, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match self.updates.as_mut().poll_next(cx) {
                Poll::Ready(Some(set)) => self.diff(&set),
                Poll::Ready(None) => {
                    // The channel is gone: everything leaves.
                    if self.known.is_empty() {
                        return Poll::Ready(None);
                    }
                    let all = std::mem::take(&mut self.known);
                    self.pending.extend(all.into_iter().map(Change::Remove));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl fmt::Debug for Discover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discover")
            .field("serving", &self.known)
            .finish_non_exhaustive()
    }
}
