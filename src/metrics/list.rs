//! Every metric healthlb records, with its kind, unit, labels and
//! meaning: the README's reference table is checked against this list, and
//! each description is registered with the recorder.

/// What one metric is.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct Described {
    pub(crate) name: &'static str,
    /// counter, gauge or histogram.
    pub(crate) kind: &'static str,
    /// seconds, or empty for a plain count.
    pub(crate) unit: &'static str,
    pub(crate) labels: &'static str,
    pub(crate) meaning: &'static str,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
const fn described(
    name: &'static str,
    kind: &'static str,
    unit: &'static str,
    labels: &'static str,
    meaning: &'static str,
) -> Described {
    Described {
        name,
        kind,
        unit,
        labels,
        meaning,
    }
}

/// Every metric healthlb records.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const METRICS: &[Described] = &[
    described(
        "healthlb_endpoints",
        "gauge",
        "",
        "target, state (serving, not_serving, connecting, transient_failure)",
        "Endpoints in each state.",
    ),
    described(
        "healthlb_requests_total",
        "counter",
        "",
        "target, endpoint, code (the gRPC status name), method (opt-in)",
        "Calls that ended, each attempt counted, by gRPC status; CANCELLED for attempts the client gave up on.",
    ),
    described(
        "healthlb_stream_messages_sent_total",
        "counter",
        "",
        "target, endpoint, method (opt-in)",
        "Request messages sent, counted as they pass.",
    ),
    described(
        "healthlb_stream_messages_received_total",
        "counter",
        "",
        "target, endpoint, method (opt-in)",
        "Response messages received, counted as they pass.",
    ),
    described(
        "healthlb_health_transitions_total",
        "counter",
        "",
        "target, endpoint, to (the new state)",
        "Endpoint state changes.",
    ),
    described(
        "healthlb_resolutions_total",
        "counter",
        "",
        "target, result (ok, empty, error)",
        "Name resolutions.",
    ),
    described(
        "healthlb_connection_recycles_total",
        "counter",
        "",
        "target, endpoint, reason (max_age, goaway, too_many_pings, lost)",
        "Connections replaced, and why.",
    ),
    described(
        "healthlb_connections",
        "gauge",
        "",
        "target, endpoint",
        "Connections open for calls, extra ones past a server's stream limit included.",
    ),
    described(
        "healthlb_pick_wait_seconds",
        "histogram",
        "seconds",
        "target",
        "How long calls waited for a SERVING endpoint, for the calls that had to.",
    ),
    described(
        "healthlb_policy",
        "gauge",
        "",
        "target, policy, outlier_detection (on, off)",
        "1 for the policy in use.",
    ),
    described(
        "healthlb_ejections_total",
        "counter",
        "",
        "target, endpoint, reason (consecutive_failures, success_rate, failure_percentage)",
        "Outlier ejections.",
    ),
    described(
        "healthlb_ejected_endpoints",
        "gauge",
        "",
        "target",
        "Endpoints ejected now.",
    ),
    described(
        "healthlb_panic_mode",
        "gauge",
        "",
        "target",
        "1 while every SERVING endpoint is ejected and calls go to them anyway.",
    ),
    described(
        "healthlb_zone_local_share",
        "gauge",
        "",
        "target",
        "With a client zone set: the share of calls that lands in the client's zone, with zone-aware routing on or off (1 all, 0 none).",
    ),
    described(
        "healthlb_wrr_rr_fallback_total",
        "counter",
        "",
        "target",
        "weighted_round_robin: weight updates with fewer than two usable weights, which fell back to round robin (gRFC A78's rr_fallback).",
    ),
    described(
        "healthlb_wrr_endpoint_weight_not_yet_usable_total",
        "counter",
        "",
        "target",
        "weighted_round_robin: endpoints, at each weight update, with no report yet or still in their blackout period.",
    ),
    described(
        "healthlb_wrr_endpoint_weight_stale_total",
        "counter",
        "",
        "target",
        "weighted_round_robin: endpoints, at each weight update, whose last report is older than the expiration period.",
    ),
    described(
        "healthlb_ring_hash_walked_total",
        "counter",
        "",
        "target, reason (not_in_rotation, overloaded)",
        "ring_hash: calls that went past their key's first endpoint on the ring, and why.",
    ),
    described(
        "healthlb_resolution_failing",
        "gauge",
        "",
        "target",
        "1 while resolution fails (the last good set is kept; with none, calls that aren't wait-for-ready fail at once).",
    ),
    described(
        "healthlb_call_attempts",
        "histogram",
        "",
        "target, kind (retry, hedge)",
        "Attempts per call under a retry or hedging policy; transparent ones are not counted.",
    ),
    described(
        "healthlb_retries_total",
        "counter",
        "",
        "target, kind (retry, hedge), code (the status that caused it)",
        "Retries and hedges sent.",
    ),
    described(
        "healthlb_retries_throttled_total",
        "counter",
        "",
        "target",
        "Retries and hedges the token bucket held back.",
    ),
    described(
        "healthlb_retry_pushbacks_total",
        "counter",
        "",
        "target, action (delay, stop)",
        "Servers' grpc-retry-pushback-ms obeyed.",
    ),
];

/// Registers every metric's description with the installed recorder, so
/// an exporter shows them. Called by each `build()`: a recorder installed
/// later than a channel's build gets them at the next.
pub(crate) fn describe() {
    #[cfg(feature = "metrics")]
    for m in METRICS {
        let unit = match m.unit {
            "seconds" => metrics::Unit::Seconds,
            _ => metrics::Unit::Count,
        };
        let help = format!("{} Labels: {}.", m.meaning, m.labels);
        match m.kind {
            "counter" => metrics::describe_counter!(m.name, unit, help),
            "gauge" => metrics::describe_gauge!(m.name, unit, help),
            _ => metrics::describe_histogram!(m.name, unit, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::METRICS;

    #[test]
    fn the_readme_table_lists_every_metric_as_the_code_describes_it() {
        let readme = include_str!("../../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter(|l| l.starts_with("| `healthlb_"))
            .collect();
        assert_eq!(rows.len(), METRICS.len(), "one row per metric: {rows:#?}");
        for m in METRICS {
            let row = rows
                .iter()
                .find(|r| r.starts_with(&format!("| `{}` |", m.name)))
                .unwrap_or_else(|| panic!("{} has no row in the README", m.name));
            let unit = if m.unit.is_empty() { "" } else { m.unit };
            let expected = format!(
                "| `{}` | {} | {} | {} | {} |",
                m.name, m.kind, unit, m.labels, m.meaning
            );
            assert_eq!(*row, expected.replace("|  |", "| |"), "{}", m.name);
        }
    }
}
