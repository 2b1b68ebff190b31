//! HTTP/2 PINGs on one connection, from the connection's own task:
//! keepalive (gRFC A8) and, with the adaptive window, the window sized to
//! the bandwidth-delay product.
//!
//! After hyper's `proto/h2/ping.rs` (MIT), which did this while healthlb
//! drove hyper. Here anything read from the peer is proof of life, as in
//! grpc-go: the watched IO counts every byte, so a keepalive PING goes out
//! only after `interval` of silence, and a missing PONG closes the
//! connection only if nothing else came meanwhile.
//!
//! BDP: when data arrives and no PING is out, one goes out and the bytes
//! read until its PONG are the sample; when a sample is at least 2/3 of the
//! window, the window doubles the sample, up to 16 MiB.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use super::conn::Conn;
use super::io::Signals;

/// What a PONG, or its absence, came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ponged {
    /// The window should be this size now (BDP).
    Window(u32),
    /// A keepalive PING went unanswered within its timeout, and nothing
    /// else was read meanwhile.
    TimedOut,
}

/// Keepalive settings (gRFC A8).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepAliveSettings {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) while_idle: bool,
}

/// One connection's PINGs.
pub(crate) struct Pinger {
    pong: h2::PingPong,
    /// When the PING in flight went out, if one is.
    sent_at: Option<Instant>,
    keep_alive: Option<KeepAlive>,
    bdp: Option<Bdp>,
    signals: Arc<Signals>,
    epoch: Instant,
    /// For its open streams: without `while_idle`, an idle connection is
    /// not pinged. Weak: the connection's task must not keep it.
    conn: std::sync::Weak<Conn>,
}

struct KeepAlive {
    settings: KeepAliveSettings,
    state: KeepAliveState,
    sleep: Pin<Box<Sleep>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeepAliveState {
    /// Due after `interval` from the last read, once scheduled.
    Init,
    Scheduled(Instant),
    /// A PING went out then; its PONG is awaited until the timeout.
    Sent(Instant),
}

/// The bandwidth-delay product estimate.
struct Bdp {
    /// The window now.
    window: u32,
    max_bandwidth: f64,
    /// Round-trip time, in seconds, averaged.
    rtt: f64,
    /// How long to wait before the next sample; longer as it stabilises.
    ping_delay: Duration,
    stable_count: u32,
    /// Bytes read when the sample's PING went out.
    bytes_at: u64,
    /// No sample before then.
    next_at: Instant,
}

/// The most the window grows to: past it TCP's own flow control likely
/// binds (hyper's limit).
const BDP_LIMIT: u32 = 16 * 1024 * 1024;

// === impl Pinger ===

impl Pinger {
    /// PINGs for a connection, if keepalive or the adaptive window
    /// (starting at `window`) asks for them.
    pub(crate) fn new(
        pong: h2::PingPong,
        keep_alive: Option<KeepAliveSettings>,
        adaptive_window: Option<u32>,
        signals: Arc<Signals>,
        epoch: Instant,
        conn: std::sync::Weak<Conn>,
    ) -> Self {
        let now = Instant::now();
        Self {
            pong,
            sent_at: None,
            keep_alive: keep_alive.map(|settings| KeepAlive {
                settings,
                state: KeepAliveState::Init,
                sleep: Box::pin(tokio::time::sleep(settings.interval)),
            }),
            bdp: adaptive_window.map(|window| Bdp::new(window, now)),
            signals,
            epoch,
            conn,
        }
    }

    fn last_read(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.signals.last_read.load(Ordering::Acquire))
    }

    fn bytes_read(&self) -> u64 {
        self.signals.bytes_read.load(Ordering::Relaxed)
    }

    /// No stream open: no call, and no health Watch.
    fn idle(&self) -> bool {
        self.conn
            .upgrade()
            .is_none_or(|conn| conn.in_flight() == 0 && conn.role.watches == 0)
    }

    fn send_ping(&mut self, now: Instant) -> bool {
        match self.pong.send_ping(h2::Ping::opaque()) {
            Ok(()) => {
                self.sent_at = Some(now);
                true
            }
            // The connection is closing: its driver reports why.
            Err(_) => false,
        }
    }

    /// Runs the PINGs; ready when the connection must change or close.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Ponged> {
        let now = Instant::now();
        if let Some(sent) = self.sent_at {
            match self.pong.poll_pong(cx) {
                Poll::Ready(Ok(_)) => {
                    self.sent_at = None;
                    if let Some(ka) = &mut self.keep_alive {
                        ka.state = KeepAliveState::Init;
                    }
                    let read = self.bytes_read();
                    if let Some(bdp) = &mut self.bdp {
                        let sample = read.saturating_sub(bdp.bytes_at);
                        let update = bdp.calculate(sample, now.saturating_duration_since(sent));
                        bdp.next_at = now + bdp.ping_delay;
                        if let Some(window) = update {
                            return Poll::Ready(Ponged::Window(window));
                        }
                    }
                }
                Poll::Ready(Err(_)) => self.sent_at = None,
                Poll::Pending => {}
            }
        }
        if let Poll::Ready(ponged) = self.poll_keep_alive(cx, now) {
            return Poll::Ready(ponged);
        }
        self.maybe_sample(now);
        Poll::Pending
    }

    fn poll_keep_alive(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<Ponged> {
        let last_read = self.last_read();
        let idle = self
            .keep_alive
            .as_ref()
            .is_some_and(|ka| !ka.settings.while_idle)
            && self.idle();
        let in_flight = self.sent_at;
        let Some(ka) = &mut self.keep_alive else {
            return Poll::Pending;
        };
        let interval = ka.settings.interval;
        loop {
            match ka.state {
                KeepAliveState::Init => {
                    if idle {
                        return Poll::Pending;
                    }
                    let at = last_read.checked_add(interval).unwrap_or(now);
                    ka.state = KeepAliveState::Scheduled(at);
                    ka.sleep.as_mut().reset(at.into());
                }
                KeepAliveState::Scheduled(at) => {
                    if ka.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Something was read since it was scheduled.
                    if last_read.checked_add(interval).is_some_and(|due| due > at) {
                        ka.state = KeepAliveState::Init;
                        continue;
                    }
                    if idle {
                        ka.state = KeepAliveState::Init;
                        return Poll::Pending;
                    }
                    // A PING already out (a BDP sample's) serves as well.
                    let sent = match in_flight {
                        Some(sent) => sent,
                        None => {
                            if self.pong.send_ping(h2::Ping::opaque()).is_err() {
                                return Poll::Pending;
                            }
                            self.sent_at = Some(now);
                            now
                        }
                    };
                    ka.state = KeepAliveState::Sent(sent);
                    ka.sleep.as_mut().reset((now + ka.settings.timeout).into());
                }
                KeepAliveState::Sent(sent) => {
                    if ka.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Anything read since the PING proves the peer alive.
                    if last_read > sent {
                        ka.state = KeepAliveState::Init;
                        continue;
                    }
                    self.keep_alive = None;
                    return Poll::Ready(Ponged::TimedOut);
                }
            }
        }
    }

    /// Starts a BDP sample when data arrived since the last one and no
    /// PING is out.
    fn maybe_sample(&mut self, now: Instant) {
        let read = self.bytes_read();
        let due = self.sent_at.is_none()
            && self
                .bdp
                .as_ref()
                .is_some_and(|bdp| now >= bdp.next_at && read > bdp.bytes_at);
        if due
            && self.send_ping(now)
            && let Some(bdp) = &mut self.bdp
        {
            bdp.bytes_at = read;
        }
    }
}

// === impl Bdp ===

impl Bdp {
    /// Starting at `window`, the first sample due at `now`.
    fn new(window: u32, now: Instant) -> Self {
        Self {
            window,
            max_bandwidth: 0.0,
            rtt: 0.0,
            ping_delay: Duration::from_millis(100),
            stable_count: 0,
            bytes_at: 0,
            next_at: now,
        }
    }

    /// The new window, when `bytes` read over `rtt` call for one.
    fn calculate(&mut self, bytes: u64, rtt: Duration) -> Option<u32> {
        if self.window == BDP_LIMIT {
            self.stabilize_delay();
            return None;
        }
        let rtt = rtt.as_secs_f64();
        if self.rtt == 0.0 {
            self.rtt = rtt;
        } else {
            // A moving average, the new sample weighing 1/8.
            self.rtt += (rtt - self.rtt) * 0.125;
        }
        let bandwidth = bytes as f64 / (self.rtt * 1.5);
        if bandwidth < self.max_bandwidth {
            self.stabilize_delay();
            return None;
        }
        self.max_bandwidth = bandwidth;
        if bytes >= u64::from(self.window) * 2 / 3 {
            self.window = u32::try_from(bytes.saturating_mul(2))
                .unwrap_or(BDP_LIMIT)
                .min(BDP_LIMIT);
            self.stable_count = 0;
            self.ping_delay /= 2;
            Some(self.window)
        } else {
            self.stabilize_delay();
            None
        }
    }

    fn stabilize_delay(&mut self) {
        if self.ping_delay < Duration::from_secs(10) {
            self.stable_count += 1;
            if self.stable_count >= 2 {
                self.ping_delay *= 4;
                self.stable_count = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdp(window: u32) -> Bdp {
        Bdp::new(window, Instant::now())
    }

    #[test]
    fn a_full_window_sample_doubles_the_window_up_to_the_limit() {
        let mut b = bdp(65_535);
        let rtt = Duration::from_millis(10);
        assert_eq!(b.calculate(65_535, rtt), Some(131_070));
        // A slower sample changes nothing.
        assert_eq!(b.calculate(1_000, rtt), None);
        let mut window = b.window;
        for _ in 0..20 {
            if let Some(w) = b.calculate(u64::from(window), rtt) {
                assert!(w > window);
                window = w;
            }
        }
        assert_eq!(window, BDP_LIMIT);
        assert_eq!(b.calculate(u64::from(BDP_LIMIT) * 4, rtt), None, "capped");
    }

    #[test]
    fn a_stable_bandwidth_pings_less_often() {
        let mut b = bdp(1 << 20);
        let rtt = Duration::from_millis(10);
        assert_eq!(b.calculate(1 << 20, rtt), Some(2 << 20));
        let delay = b.ping_delay;
        for _ in 0..4 {
            b.calculate(1, rtt);
        }
        assert!(b.ping_delay > delay, "{:?} > {delay:?}", b.ping_delay);
    }
}
