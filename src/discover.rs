//! [`Discover`]: the SERVING endpoints as a [`tower::discover::Discover`],
//! for tower's own balancers.

use std::collections::{BTreeMap, VecDeque};
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
/// SERVING, `Remove` when it stops or leaves DNS, and `Insert` again for an
/// address whose subchannel was replaced (a pod back on the same IP). The
/// services are [`Subchannel`]s, whose `Load` is their calls in flight, so
/// `tower::balance::p2c::Balance` sees real load.
///
/// The subchannels belong to the channel, not to the balancer that holds
/// them: when the last `LbChannel` clone is dropped, every subchannel shuts
/// down and closes its connections, and this stream ends. It yields no
/// `Remove` then, because tower's p2c would wait forever with no service;
/// calls through the shut-down subchannels fail at once with UNAVAILABLE.
pub struct Discover {
    updates: BoxStream<'static, ServingSet>,
    known: BTreeMap<SocketAddr, Subchannel>,
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
            known: BTreeMap::new(),
            pending: VecDeque::new(),
        }
    }

    fn diff(&mut self, set: &ServingSet) {
        let gone: Vec<SocketAddr> = self
            .known
            .keys()
            .filter(|a| !set.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            self.known.remove(&addr);
            self.pending.push_back(Change::Remove(addr));
        }
        for (addr, sub) in set.iter() {
            if self.known.get(addr).is_some_and(|known| known.same(sub)) {
                continue;
            }
            // New, or a new subchannel at a known address: tower replaces
            // the service under that key. The balancer gave it the
            // channel's ready timeout.
            self.known.insert(*addr, sub.clone());
            self.pending.push_back(Change::Insert(*addr, sub.clone()));
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
                // The channel is gone and its subchannels shut down.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl fmt::Debug for Discover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discover")
            .field("serving", &self.known.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}
