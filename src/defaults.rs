//! Every default, stated once. The settings' docs cite these; the
//! `Default` impls and the builder read them.

use std::time::Duration;

use crate::BackoffConfig;

// === The channel ===

/// How long a call waits for a SERVING endpoint before it fails
/// UNAVAILABLE: 5 s. Set with `Builder::ready_timeout`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `Builder::connect` waits for a first SERVING endpoint: 20 s.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(20);

// === Resolution ===

/// The shortest time between two lookups: 1 s.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// The longest time between two lookups, whatever the TTL: 30 s.
pub const MAX_REFRESH: Duration = Duration::from_secs(30);

/// The most endpoints a channel keeps from one answer: 1024.
pub const MAX_ENDPOINTS: usize = 1024;

/// How long one DNS lookup may take: 5 s.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// gRPC's backoff: 1 s, × 1.6, ± 20 %, at most 120 s. Between connect
/// attempts, and between failed lookups (there at most `max_refresh`).
pub const BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_secs(1),
    multiplier: 1.6,
    jitter: 0.2,
    max: Duration::from_secs(120),
};

impl Default for BackoffConfig {
    /// [`BACKOFF`].
    fn default() -> Self {
        BACKOFF
    }
}

// === Subchannels ===

/// How long one connect attempt may take, through the first health
/// answer: 20 s, the spec's MIN_CONNECT_TIMEOUT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long an HTTP/2 keepalive ping may go unanswered: 20 s (tonic's).
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// TCP keepalive: 60 s.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How often an idle connection is checked with a ping: 15 s.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(15);

/// How long a liveness ping may go unanswered: 15 s.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(15);

/// The most liveness pings a channel sends per second, over all its
/// connections: 200.
pub const LIVENESS_PROBES_PER_SECOND: f64 = 200.0;

/// How long a connection recycled for its age may finish its calls: 30 s.
pub const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);

/// The most connections to one endpoint, opened when the server caps
/// concurrent streams: 8.
pub const MAX_CONNECTIONS_PER_ENDPOINT: usize = 8;

/// How long an extra connection may stay idle before it closes: 60 s.
pub const EXTRA_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The request bytes one call keeps for retries and hedges: 256 KiB.
pub const RETRY_BUFFER_PER_CALL: usize = 256 * 1024;

/// The request bytes all calls of a channel keep for retries and hedges:
/// 16 MiB.
pub const RETRY_BUFFER_TOTAL: usize = 16 * 1024 * 1024;

// === Balancing ===

/// Endpoints least_request samples per pick: 2.
pub const LEAST_REQUEST_CHOICES: usize = 2;

/// How fast peak EWMA's estimate forgets: 10 s, Linkerd's and Finagle's.
pub const PEAK_EWMA_DECAY: Duration = Duration::from_secs(10);

/// Peak EWMA's estimate for an endpoint with no answer yet: 30 ms.
pub const PEAK_EWMA_DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Weighted round robin: how often out-of-band load reports are asked
/// for, 10 s (gRFC A58).
pub const WRR_OOB_REPORTING_PERIOD: Duration = Duration::from_secs(10);

/// Weighted round robin: how long an endpoint reports before its weight
/// counts, 10 s (gRFC A58).
pub const WRR_BLACKOUT_PERIOD: Duration = Duration::from_secs(10);

/// Weighted round robin: how long without a report before a weight is
/// stale, 3 min (gRFC A58).
pub const WRR_WEIGHT_EXPIRATION_PERIOD: Duration = Duration::from_secs(180);

/// Weighted round robin: how often weights are worked out again, 1 s
/// (gRFC A58; at least 100 ms).
pub const WRR_WEIGHT_UPDATE_PERIOD: Duration = Duration::from_secs(1);

/// How long slow start's ramp lasts: 30 s.
pub const SLOW_START_WINDOW: Duration = Duration::from_secs(30);

/// Slow start's smallest share, in percent: 10.
pub const SLOW_START_MIN_WEIGHT_PERCENT: f64 = 10.0;

// === Outlier ejection (gRFC A50's values) ===

/// How often the detector judges: 10 s.
pub const EJECTION_INTERVAL: Duration = Duration::from_secs(10);

/// The first ejection's length, multiplied on each repeat: 30 s.
pub const BASE_EJECTION_TIME: Duration = Duration::from_secs(30);

/// The longest ejection: 300 s, or the base time if that is longer.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// The most endpoints ejected at once, in percent: 10 (at least one).
pub const MAX_EJECTION_PERCENT: u32 = 10;

/// Failures in a row that eject an endpoint: 5.
pub const CONSECUTIVE_FAILURES: u32 = 5;
