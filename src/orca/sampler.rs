//! [`ServerMetricsRecorder::sample_process`]: the process's CPU and
//! memory utilization, read from Linux's `/proc` and cgroup files.

use std::time::{Duration, Instant};

use super::recorder::ServerMetricsRecorder;

/// Linux reports CPU times in /proc in USER_HZ, 100 per second on every
/// architecture Linux runs on.
const USER_HZ: f64 = 100.0;

/// A running sampler; dropping it stops the sampling. It also stops once
/// every clone of its recorder is gone.
#[derive(Debug)]
pub struct Sampler {
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ServerMetricsRecorder {
    /// Sets CPU and memory utilization every `period` from the process's
    /// own figures: CPU time used over the period ÷ (the period × the CPUs
    /// available, cgroup quota included), and resident memory ÷ the
    /// cgroup's memory limit (else the machine's memory). Linux only:
    /// elsewhere nothing is set. Needs a Tokio runtime.
    pub fn sample_process(&self, period: Duration) -> Sampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let recorder = self.downgrade();
        let period = period.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let mut last = cpu_seconds().map(|s| (s, Instant::now()));
            let mut ticks = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = ticks.tick() => {}
                }
                let Some(recorder) = ServerMetricsRecorder::upgrade(&recorder) else {
                    return;
                };
                if let (Some((before, at)), Some(now)) = (last, cpu_seconds()) {
                    let wall = at.elapsed().as_secs_f64();
                    if wall > 0.0 {
                        recorder.set_cpu_utilization((now - before).max(0.0) / (wall * cpus));
                    }
                    last = Some((now, Instant::now()));
                }
                if let Some(memory) = memory_utilization() {
                    recorder.set_memory_utilization(memory);
                }
            }
        });
        Sampler { _stop: stop }
    }
}

/// CPU seconds the process has used: utime + stime of /proc/self/stat.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Resident memory over the memory available: the cgroup v2 limit if one
/// is set, else the machine's.
fn memory_utilization() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: f64 = kib(&status, "VmRSS:")?;
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .or_else(|| {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            Some(kib(&meminfo, "MemTotal:")? * 1024.0)
        })?;
    (limit > 0.0).then(|| (rss_kib * 1024.0 / limit).clamp(0.0, 1.0))
}

/// The value in KiB of the `key` line of a /proc file.
fn kib(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_figures_read_on_linux() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let cpu = cpu_seconds().expect("/proc/self/stat reads");
        assert!(cpu >= 0.0);
        let memory = memory_utilization().expect("memory reads");
        assert!(memory > 0.0 && memory <= 1.0, "{memory}");
        assert_eq!(kib("VmRSS:\t  1234 kB\n", "VmRSS:"), Some(1234.0));
    }
}
