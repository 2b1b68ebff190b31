//! One live connection: the HTTP/2 connection, its health Watch when it is
//! the endpoint's first, and its liveness checks; and how one is
//! established.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::config::SubchannelConfig;
use super::shared::Shared;
use crate::Error;
use crate::connection::HealthStatus;
use crate::connection::chain;
use crate::connection::{Conn, Dialer, Driver, Ended, GoAway, Http2Settings, Role};
use crate::connection::{HealthEvent, HealthWatch, LoadEvent, LoadReportStream};
use crate::connection::{Liveness, Probe, ProbeRate, probe};
use crate::deadline::capped;
use crate::load::{LoadReports, Report};

/// What a subchannel's connections are made with.
pub(crate) struct Ctx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: Arc<SubchannelConfig>,
    pub(crate) dialer: Dialer,
    /// The channel's cap on liveness probes; `None` for a lone subchannel.
    pub(crate) probe_rate: Option<Arc<ProbeRate>>,
}

impl Ctx {
    fn http2_settings(&self) -> Http2Settings {
        // Added to an Instant: capped, so no sum overflows.
        Http2Settings {
            keep_alive_interval: self.shared.keep_alive().map(capped),
            keep_alive_timeout: capped(self.config.keep_alive_timeout),
            keep_alive_while_idle: self.config.keep_alive_while_idle,
            initial_stream_window_size: self.config.initial_stream_window_size,
            initial_connection_window_size: self.config.initial_connection_window_size,
            adaptive_window: self.config.http2_adaptive_window,
        }
    }
}

/// Establishes an endpoint's first connection: connected, and the first
/// health answer in, so the server has spoken HTTP/2 and gRPC on it.
pub(crate) async fn establish(
    ctx: Arc<Ctx>,
    limit: Duration,
) -> Result<(Active, HealthEvent), Error> {
    let addr = ctx.shared.endpoint.addr();
    let config = &ctx.config;
    let attempt = async {
        let oob = matches!(ctx.shared.stats.load_reports, LoadReports::OutOfBand { .. });
        let role = Role {
            watches: usize::from(config.health_check) + usize::from(oob),
            probe: config.liveness_interval.is_some(),
            extra: false,
        };
        let (conn, driver) = ctx.dialer.connect(ctx.http2_settings(), role).await?;
        let mut active = Active::new(conn, driver, &ctx);
        if active.health.is_none() {
            // No health stream: one probe proves the peer speaks gRPC.
            let conn = active.conn.clone();
            let answer = probe(&conn, &config.health_service, limit);
            tokio::pin!(answer);
            // A driver that ends first says why the connection closed.
            let outcome = poll_fn(|cx| match active.driver.as_mut().poll(cx) {
                Poll::Ready(result) => Poll::Ready(Err(Lost::from_driver(result))),
                Poll::Pending => answer.as_mut().poll(cx).map(Ok),
            })
            .await;
            return match outcome.map_err(|lost| lost.error(addr))? {
                Probe::Alive => Ok((active, HealthEvent::Status(HealthStatus::Serving))),
                Probe::Closed => Err(Error::connect(
                    "connection closed",
                    format!("{addr} closed the connection right after it opened"),
                    None,
                )),
                Probe::Dead(why) => Err(Error::connect(
                    "connect failed",
                    format!("{addr}: {why}"),
                    None,
                )),
            };
        }
        match active.next_event().await {
            ConnEvent::Health(HealthEvent::Ended(_)) if !active.conn.is_ready() => {
                Err(Error::connect(
                    "connection closed",
                    format!("{addr} closed the connection before answering the health check"),
                    None,
                ))
            }
            ConnEvent::Health(first) => Ok((active, first)),
            ConnEvent::GoingAway(goaway) => Err(Error::connect(
                "GOAWAY",
                format!("{addr} sent {goaway} before answering the health check"),
                None,
            )),
            ConnEvent::Lost(lost) => Err(lost.error(addr)),
        }
    };
    within(
        limit,
        addr,
        "TCP, HTTP/2 and the first health answer",
        attempt,
    )
    .await
}

/// Establishes an extra connection to an endpoint already serving: the
/// server's SETTINGS must be in, so its stream limit is known.
pub(crate) async fn establish_extra(ctx: Arc<Ctx>) -> Result<Active, Error> {
    let addr = ctx.shared.endpoint.addr();
    let config = &ctx.config;
    let attempt = async {
        let role = Role {
            watches: 0,
            probe: config.liveness_interval.is_some(),
            extra: true,
        };
        let (conn, driver) = ctx.dialer.connect(ctx.http2_settings(), role).await?;
        let mut active = Active::without_health(conn, driver, &ctx);
        let conn = active.conn.clone();
        poll_fn(|cx| match active.driver.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(Err(Lost::from_driver(result).error(addr))),
            Poll::Pending => conn.poll_settings(cx).map(Ok),
        })
        .await?;
        Ok(active)
    };
    within(
        config.connect_timeout,
        addr,
        "TCP, HTTP/2 and the server's SETTINGS",
        attempt,
    )
    .await
}

/// Bounds a connect attempt by `limit`.
async fn within<T>(
    limit: Duration,
    addr: std::net::SocketAddr,
    what: &str,
    attempt: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Error::connect(
            "connect timed out",
            format!("{addr} did not answer within the connect timeout of {limit:?} ({what})"),
            None,
        )),
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum Lost {
    /// h2 ended the connection without an error: the server's GOAWAY
    /// NO_ERROR took effect before the sniffer reported it, or the
    /// connection closed in order.
    Closed,
    /// The server sent GOAWAY; `graceful` when its code is NO_ERROR.
    GoAway {
        too_many_pings: bool,
        graceful: bool,
        message: String,
    },
    /// The transport failed.
    Failed(String),
    /// The liveness probe went unanswered.
    Silent(String),
}

impl Lost {
    /// gRFC A94's disconnect error.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Lost::Closed => "connection closed",
            Lost::GoAway { graceful: true, .. } => "GOAWAY NO_ERROR",
            Lost::GoAway {
                too_many_pings: true,
                ..
            } => "GOAWAY ENHANCE_YOUR_CALM",
            Lost::GoAway { .. } => "GOAWAY",
            Lost::Failed(_) => "connection reset",
            Lost::Silent(_) => "connection timed out",
        }
    }
}

impl Lost {
    pub(crate) fn from_driver(result: Result<(), Ended>) -> Self {
        let err = match result {
            Ok(()) => return Lost::Closed,
            Err(Ended::Panicked(message)) => {
                return Lost::Failed(format!(
                    "the connection's task panicked, a bug in healthlb: {message}"
                ));
            }
            Err(Ended::KeepAliveTimedOut) => {
                return Lost::Failed("an HTTP/2 keepalive PING went unanswered".to_owned());
            }
            Err(Ended::Http2(err)) => err,
        };
        if err.is_go_away() && err.is_remote() {
            let message = err.to_string();
            return Lost::GoAway {
                too_many_pings: err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
                    && message.contains("too_many_pings"),
                graceful: err.reason() == Some(h2::Reason::NO_ERROR),
                message,
            };
        }
        Lost::Failed(chain(&err))
    }

    pub(crate) fn error(&self, addr: std::net::SocketAddr) -> Error {
        match self {
            Lost::Closed => Error::connect(
                "connection closed",
                format!("{addr} closed the connection"),
                None,
            ),
            Lost::GoAway { message, .. } => Error::connect(
                "GOAWAY",
                format!("{addr} closed the connection: {message}"),
                None,
            ),
            Lost::Failed(why) => Error::connect(
                "connection lost",
                format!("the connection to {addr} failed: {why}"),
                None,
            ),
            Lost::Silent(why) => Error::connect(
                "no liveness answer",
                format!("{addr} went silent: {why}"),
                None,
            ),
        }
    }
}

/// What an established connection reports.
pub(crate) enum ConnEvent {
    Health(HealthEvent),
    /// The server sent GOAWAY: no new calls may start on the connection.
    GoingAway(GoAway),
    Lost(Lost),
}

/// An established connection with its health stream and liveness checks.
pub(crate) struct Active {
    pub(crate) conn: Arc<Conn>,
    pub(crate) driver: Driver,
    pub(crate) health: Option<HealthWatch>,
    /// ORCA's out-of-band reports, on the endpoint's first connection when
    /// weighted round robin asks for them.
    load: Option<OutOfBand>,
    liveness: Liveness,
    goaway_reported: bool,
}

// === impl Active ===

impl Active {
    /// Takes the connection out of use: its health stream stops, and it
    /// finishes its calls, for at most `grace` when given, then closes.
    pub(crate) fn drain(self, grace: Option<Duration>) -> impl Future<Output = ()> + use<> {
        let Active {
            conn,
            driver,
            health,
            load,
            ..
        } = self;
        drop((health, load));
        crate::connection::drain(conn, driver, grace)
    }

    /// The endpoint's first connection: it carries the health Watch when
    /// health checking is on.
    fn new(conn: Arc<Conn>, driver: Driver, ctx: &Ctx) -> Self {
        let config = &ctx.config;
        let mut active = Self::without_health(conn, driver, ctx);
        active.health = config.health_check.then(|| {
            HealthWatch::start(
                active.conn.clone(),
                config.health_service.clone(),
                config.backoff,
            )
        });
        let stats = &ctx.shared.stats;
        if let LoadReports::OutOfBand { period, penalty } = stats.load_reports {
            active.load = Some(OutOfBand {
                stream: LoadReportStream::start(active.conn.clone(), period, config.backoff),
                stats: stats.clone(),
                penalty,
            });
        }
        active
    }

    fn without_health(conn: Arc<Conn>, driver: Driver, ctx: &Ctx) -> Self {
        let config = &ctx.config;
        Self {
            conn,
            driver,
            health: None,
            load: None,
            liveness: Liveness::new(
                config.liveness_interval,
                ctx.probe_rate.clone(),
                config.liveness_timeout,
                &config.health_service,
            ),
            goaway_reported: false,
        }
    }

    /// The next event; cancel-safe, as all progress lives in `self`. Not to
    /// be called again after it returned [`ConnEvent::Lost`].
    pub(crate) async fn next_event(&mut self) -> ConnEvent {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<ConnEvent> {
        if let Poll::Ready(result) = self.driver.as_mut().poll(cx) {
            return Poll::Ready(ConnEvent::Lost(Lost::from_driver(result)));
        }
        if !self.goaway_reported
            && let Poll::Ready(goaway) = self.conn.poll_goaway(cx)
        {
            self.goaway_reported = true;
            return Poll::Ready(ConnEvent::GoingAway(goaway));
        }
        if let Poll::Ready(why) = self.liveness.poll_silent(&self.conn, cx) {
            let message = format!("{} went silent: {why}", self.conn.addr);
            self.conn.kill(&message);
            return Poll::Ready(ConnEvent::Lost(Lost::Silent(why)));
        }
        if let Some(health) = &mut self.health
            && let Poll::Ready(event) = health.poll_event(cx)
        {
            return Poll::Ready(ConnEvent::Health(event));
        }
        if let Some(load) = &mut self.load {
            load.poll(&self.conn, cx);
        }
        Poll::Pending
    }
}

/// The out-of-band report stream and where its reports go.
struct OutOfBand {
    stream: LoadReportStream,
    stats: Arc<super::stats::Stats>,
    penalty: f64,
}

impl OutOfBand {
    /// Takes in every report that has come; never ready itself.
    fn poll(&mut self, conn: &Conn, cx: &mut Context<'_>) {
        // Bounded: a server flooding reports yields the task now and then.
        for _ in 0..64 {
            let Poll::Ready(event) = self.stream.poll_event(cx) else {
                return;
            };
            match event {
                LoadEvent::Report(report) => {
                    let report = Report {
                        cpu: report.cpu_utilization,
                        rps: report.rps_fractional,
                        eps: report.eps,
                        application: report.application_utilization,
                    };
                    self.stats.server_load.on_report(&report, self.penalty);
                }
                LoadEvent::Unimplemented => {
                    tracing::debug!(endpoint = %conn.addr, "the server sends no out-of-band load reports (UNIMPLEMENTED): weighted round robin gives it the mean weight");
                }
                LoadEvent::Ended(why) => {
                    tracing::debug!(endpoint = %conn.addr, %why, "the out-of-band load report stream ended; it is reopened");
                }
            }
        }
        cx.waker().wake_by_ref();
    }
}
