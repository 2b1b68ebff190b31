//! A sleep that keeps sub-millisecond delays, for hedging delays and
//! retry backoffs.
//!
//! Tokio's timer wheel counts whole milliseconds and rounds a deadline up
//! to the next one, so `sleep(500µs)` ends 0.5–1.5 ms later and a 1 ms
//! hedging delay becomes 1–2 ms: as long again as a fast pod's call. Delays
//! shorter than [`PRECISE_BELOW`] therefore go to one shared thread that
//! sleeps on a condition variable, which Linux ends within tens of
//! microseconds, and wakes the waiting task. Longer delays use Tokio's
//! timer, where a millisecond is noise.
//!
//! The thread starts on the first short delay and ends once nothing has
//! waited on it for [`IDLE`], so it outlives no channel by more than that.
//! It never runs a task: it only calls wakers. If it cannot be started,
//! short delays fall back to Tokio's timer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::time::Instant;

/// Delays shorter than this get the precise thread; 20 ms, where Tokio's
/// rounding is 5 % or more of the delay.
pub(crate) const PRECISE_BELOW: Duration = Duration::from_millis(20);

/// How long the thread waits for work before it ends: 1 s.
const IDLE: Duration = Duration::from_secs(1);

/// Sleeps until `at`, to within tens of microseconds when `at` is less than
/// [`PRECISE_BELOW`] away.
pub(crate) async fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at <= now {
        return;
    }
    if at - now >= PRECISE_BELOW {
        return tokio::time::sleep_until(at).await;
    }
    Precise {
        entry: Arc::new(Entry {
            at: at.into_std(),
            fired: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }),
        queued: false,
        fallback: None,
    }
    .await;
}

/// Sleeps for `delay`, as [`sleep_until`].
pub(crate) async fn sleep(delay: Duration) {
    sleep_until(crate::deadline::deadline_in(delay)).await;
}

/// One waiting task.
struct Entry {
    at: std::time::Instant,
    fired: AtomicBool,
    waker: AtomicWaker,
}

struct Precise {
    entry: Arc<Entry>,
    queued: bool,
    /// Tokio's timer, when the thread could not start.
    fallback: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for Precise {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(sleep) = &mut self.fallback {
            return sleep.as_mut().poll(cx);
        }
        if self.entry.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.entry.waker.register(cx.waker());
        if !self.queued {
            self.queued = true;
            if !Thread::get().push(&self.entry) {
                let at = Instant::from_std(self.entry.at);
                self.fallback = Some(Box::pin(tokio::time::sleep_until(at)));
                return self.poll(cx);
            }
        }
        // It may have fired between the first check and the registration.
        if self.entry.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// The entries by deadline, earliest first. A dropped sleep leaves a dead
/// `Weak` that is popped when due: at most [`PRECISE_BELOW`] later.
struct Due(Reverse<std::time::Instant>, Weak<Entry>);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Due>,
    running: bool,
    /// Whether the thread could not be started once: don't try per call.
    unavailable: bool,
}

/// The process's one timer thread.
struct Thread {
    state: Mutex<State>,
    changed: Condvar,
}

impl Thread {
    fn get() -> &'static Arc<Thread> {
        static THREAD: OnceLock<Arc<Thread>> = OnceLock::new();
        THREAD.get_or_init(|| {
            Arc::new(Thread {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            })
        })
    }

    /// Queues `entry`, starting the thread if it isn't running. False when
    /// it cannot be started.
    fn push(self: &Arc<Self>, entry: &Arc<Entry>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.unavailable {
            return false;
        }
        let earliest = state.heap.peek().is_none_or(|due| entry.at < due.0.0);
        state
            .heap
            .push(Due(Reverse(entry.at), Arc::downgrade(entry)));
        if !state.running {
            let thread = Arc::clone(self);
            let started = std::thread::Builder::new()
                .name("healthlb-timer".into())
                .spawn(move || thread.run());
            if let Err(error) = started {
                tracing::warn!(%error, "cannot start the precise timer thread; short hedging delays and backoffs round up to Tokio's millisecond");
                state.unavailable = true;
                state.heap.clear();
                return false;
            }
            state.running = true;
        } else if earliest {
            self.changed.notify_one();
        }
        true
    }

    fn run(&self) {
        let mut due = Vec::new();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = std::time::Instant::now();
            while state.heap.peek().is_some_and(|d| d.0.0 <= now) {
                if let Some(Due(_, entry)) = state.heap.pop() {
                    due.push(entry);
                }
            }
            if !due.is_empty() {
                // Wake outside the lock: a waker may push again.
                drop(state);
                for entry in due.drain(..).filter_map(|e| e.upgrade()) {
                    entry.fired.store(true, Ordering::Release);
                    entry.waker.wake();
                }
                state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let wait = match state.heap.peek() {
                Some(d) => d.0.0 - now,
                None => IDLE,
            };
            let (next, timeout) = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner);
            state = next;
            if timeout.timed_out() && state.heap.is_empty() {
                state.running = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How late `sleep` ends, at its worst of `n`, for a delay of `delay`.
    async fn worst_lateness(delay: Duration, n: usize) -> Duration {
        let mut worst = Duration::ZERO;
        for _ in 0..n {
            let start = Instant::now();
            sleep(delay).await;
            let took = start.elapsed();
            assert!(took >= delay, "ended early: {took:?} for {delay:?}");
            worst = worst.max(took - delay);
        }
        worst
    }

    #[tokio::test]
    async fn short_delays_end_on_time_and_the_thread_ends_when_idle() {
        // Tokio alone ends some of these more than 1 ms late (a deadline
        // rounded up to a tick, then the park); the median of five worst
        // cases must be inside that.
        // A machine busy with other work (a build, other tests) can hold
        // any thread back, so the best of three tries counts.
        let mut tries = Vec::new();
        for _ in 0..3 {
            let mut worst = Vec::new();
            for _ in 0..5 {
                worst.push(worst_lateness(Duration::from_micros(300), 20).await);
            }
            worst.sort();
            tries.push(worst);
            if tries
                .last()
                .is_some_and(|w| w[2] < Duration::from_millis(1))
            {
                break;
            }
        }
        assert!(
            tries.iter().any(|w| w[2] < Duration::from_millis(1)),
            "the precise timer ended late: {tries:?}"
        );

        // Many at once, dropped halfway: all due ones end, none hangs.
        let many: Vec<_> = (0..200u64)
            .map(|i| tokio::spawn(sleep(Duration::from_micros(100 + i * 10))))
            .collect();
        for (i, task) in many.into_iter().enumerate() {
            if i % 2 == 0 {
                task.abort();
            } else {
                tokio::time::timeout(Duration::from_secs(5), task)
                    .await
                    .expect("a precise sleep ended")
                    .expect("not aborted");
            }
        }

        // Idle for longer than IDLE: the thread is gone.
        let stopped = Instant::now() + IDLE * 5;
        while Thread::get().state.lock().unwrap().running {
            assert!(
                Instant::now() < stopped,
                "the timer thread outlived its work"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn long_delays_end_no_earlier_than_asked() {
        let start = Instant::now();
        sleep(PRECISE_BELOW + Duration::from_millis(5)).await;
        assert!(start.elapsed() >= PRECISE_BELOW + Duration::from_millis(5));
    }
}
