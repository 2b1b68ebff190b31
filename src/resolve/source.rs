//! The seam every endpoint source plugs into: DNS, SRV and fixed lists
//! here, the Kubernetes API beside them, and any registry a user has
//! (Consul, etcd, a file, a control plane).

use std::future::Future;

use futures::Stream;
use futures::future::BoxFuture;

use super::endpoint::Endpoint;
use crate::backoff::{Backoff, BackoffConfig};

/// Why a source could not say what the endpoints are this time. The
/// channel keeps the last good set, reports resolution as failing with
/// this error, and asks the source again.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// A source of endpoint sets, which a channel balances over.
///
/// [`next`](Self::next) waits until the source has something to say, then
/// says it whole: the current set of endpoints (an empty set means none),
/// or why it could not tell. The channel does the rest: it sorts and
/// de-duplicates the set, caps it at `max_endpoints` and applies random
/// subsetting, publishes it only when it changed, keeps the last good set
/// while the source fails, logs one warning when it starts failing and one
/// line when it recovers, and ends the source when the channel is dropped.
/// Connections, health checks and outlier ejection then apply to its
/// endpoints as to DNS's.
///
/// `None` means the source has no more to say: the last set stays for the
/// channel's life. After an error, the channel waits before asking again,
/// with backoff (1 s × 1.6 ± 20 %, at most `max_refresh`, 30 s by default),
/// so a source need not pace its own retries. It is asked again at once
/// after an answer, so a source that polls waits inside `next`; a source
/// that watches returns when something changed.
///
/// ```no_run
/// use std::time::Duration;
///
/// use healthlb::resolve::Endpoint;
/// use healthlb::resolve::{EndpointSource, SourceError};
///
/// /// Polls a registry every 5 s.
/// struct Registry {
///     first: bool,
/// }
///
/// impl EndpointSource for Registry {
///     async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
///         if !std::mem::take(&mut self.first) {
///             tokio::time::sleep(Duration::from_secs(5)).await;
///         }
///         // Ask your registry here.
///         let addrs = ["10.0.0.7:50051", "10.0.0.8:50051"];
///         let endpoints = addrs.iter().map(|a| a.parse().map(Endpoint::new));
///         Some(endpoints.collect::<Result<_, _>>().map_err(SourceError::from))
///     }
/// }
///
/// # fn build() -> Result<(), healthlb::Error> {
/// let channel = healthlb::LbChannel::from_source("registry:echo", Registry { first: true })
///     .build()?;
/// # drop(channel);
/// # Ok(())
/// # }
/// ```
///
/// A stream of sets works too, through [`from_stream`].
pub trait EndpointSource: Send + 'static {
    /// The next endpoint set, or why there is none this time; `None` once
    /// the source has ended.
    fn next(&mut self) -> impl Future<Output = Option<Result<Vec<Endpoint>, SourceError>>> + Send;
}

/// A source as the channel runs it, behind a box.
pub(crate) trait DynSource: Send {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Vec<Endpoint>, SourceError>>>;
}

impl<S: EndpointSource> DynSource for S {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Vec<Endpoint>, SourceError>>> {
        Box::pin(EndpointSource::next(self))
    }
}

/// A source from a stream of endpoint sets, such as a watch on a service
/// registry: each item is the whole set, or why there is none this time.
pub fn from_stream<S, E>(stream: S) -> impl EndpointSource
where
    S: Stream<Item = Result<Vec<Endpoint>, E>> + Send + Unpin + 'static,
    E: Into<SourceError>,
{
    FromStream(stream)
}

struct FromStream<S>(S);

impl<S, E> EndpointSource for FromStream<S>
where
    S: Stream<Item = Result<Vec<Endpoint>, E>> + Send + Unpin + 'static,
    E: Into<SourceError>,
{
    async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
        let item = futures::StreamExt::next(&mut self.0).await?;
        Some(item.map_err(Into::into))
    }
}

/// A user's source, paced: after an error the next ask waits with the
/// resolver's backoff (1 s × 1.6 ± 20 %, at most `max_refresh`), so a
/// source that fails at once can't spin a worker; and each answer yields
/// to the runtime first, as a source that is always ready would never
/// yield otherwise. A source that panics is taken as one that failed, with
/// the panic's message: the channel keeps its last set and asks again.
pub(crate) struct Paced {
    source: Box<dyn DynSource>,
    backoff: Backoff,
    failed: bool,
    /// Whether a panic was logged already: the first one is, at error level.
    panicked: bool,
}

impl Paced {
    pub(crate) fn new(source: Box<dyn DynSource>, backoff: BackoffConfig) -> Self {
        Self {
            source,
            backoff: Backoff::new(backoff),
            failed: false,
            panicked: false,
        }
    }
}

impl EndpointSource for Paced {
    async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
        if std::mem::take(&mut self.failed) {
            tokio::time::sleep(self.backoff.next_delay()).await;
        } else {
            tokio::task::yield_now().await;
        }
        let asked = std::panic::AssertUnwindSafe(self.source.next());
        let answer = match futures::FutureExt::catch_unwind(asked).await {
            Ok(answer) => answer?,
            Err(panic) => {
                let why = crate::error::panic_message(panic.as_ref());
                if !std::mem::replace(&mut self.panicked, true) {
                    tracing::error!(panic = %why, "the endpoint source panicked; its last set stays, and it is asked again with backoff");
                }
                Err(format!("the endpoint source panicked: {why}").into())
            }
        };
        match &answer {
            Ok(_) => self.backoff.reset(),
            Err(_) => self.failed = true,
        }
        Some(answer)
    }
}

/// A fixed list: said once, never changed. It doesn't end, so its status
/// stays "resolved".
pub(crate) struct Fixed(pub(crate) Option<Vec<Endpoint>>);

impl EndpointSource for Fixed {
    async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
        match self.0.take() {
            Some(list) => Some(Ok(list)),
            None => std::future::pending().await,
        }
    }
}
