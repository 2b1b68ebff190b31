//! gRPC's standard telemetry against real parts: the OpenTelemetry SDK's
//! in-memory metric and span exporters, real tonic backends on 127.0.0.x,
//! a retried call, a hedged one, an endpoint ejected, and the servers
//! checking the trace context each attempt carried.
#![cfg(feature = "opentelemetry")]

use healthlb_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use healthlb::LbChannel;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, backends, free_port};
use tracing_subscriber::layer::SubscriberExt;

const A66_LATENCY: [f64; 41] = [
    0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16,
    0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
];
const A66_SIZE: [f64; 14] = [
    0.0,
    1024.0,
    2048.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];

const RETRY: &str = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;

const HEDGE: &str = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
    "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0s"}}]}"#;

/// One data point: its labels, and its value (a sum's or gauge's), or its
/// count and bounds (a histogram's).
#[derive(Debug)]
struct Point {
    labels: BTreeMap<String, String>,
    value: f64,
    count: u64,
    bounds: Vec<f64>,
}

/// Every metric exported: name to (unit, points).
fn collect(
    provider: &SdkMeterProvider,
    exporter: &InMemoryMetricExporter,
) -> BTreeMap<String, (String, Vec<Point>)> {
    provider.force_flush().expect("flushes");
    let mut out: BTreeMap<String, (String, Vec<Point>)> = BTreeMap::new();
    for rm in exporter.get_finished_metrics().expect("metrics") {
        for scope in rm.scope_metrics() {
            for metric in scope.metrics() {
                let labels = |attrs: &mut dyn Iterator<Item = &opentelemetry::KeyValue>| {
                    attrs
                        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                        .collect::<BTreeMap<_, _>>()
                };
                let mut points = Vec::new();
                macro_rules! read {
                    ($data:expr, $as:expr) => {
                        match $data {
                            MetricData::Sum(s) => {
                                for p in s.data_points() {
                                    points.push(Point {
                                        labels: labels(&mut p.attributes()),
                                        value: $as(p.value()),
                                        count: 0,
                                        bounds: vec![],
                                    });
                                }
                            }
                            MetricData::Gauge(g) => {
                                for p in g.data_points() {
                                    points.push(Point {
                                        labels: labels(&mut p.attributes()),
                                        value: $as(p.value()),
                                        count: 0,
                                        bounds: vec![],
                                    });
                                }
                            }
                            MetricData::Histogram(h) => {
                                for p in h.data_points() {
                                    points.push(Point {
                                        labels: labels(&mut p.attributes()),
                                        value: $as(p.sum()),
                                        count: p.count(),
                                        bounds: p.bounds().collect(),
                                    });
                                }
                            }
                            _ => {}
                        }
                    };
                }
                match metric.data() {
                    AggregatedMetrics::F64(d) => read!(d, |v: f64| v),
                    AggregatedMetrics::U64(d) => read!(d, |v: u64| v as f64),
                    AggregatedMetrics::I64(d) => read!(d, |v: i64| v as f64),
                }
                // Cumulative: the last export holds everything.
                out.insert(metric.name().to_owned(), (metric.unit().to_owned(), points));
            }
        }
    }
    out
}

/// The meter provider each test records on. Every test calls it before it
/// makes a channel, so it also sets [`Undecided`] as the global subscriber.
fn meters() -> (SdkMeterProvider, InMemoryMetricExporter) {
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        tracing::subscriber::set_global_default(Undecided).expect("the first global subscriber")
    });
    let exporter = InMemoryMetricExporter::default();
    let reader = PeriodicReader::builder(exporter.clone()).build();
    let provider = SdkMeterProvider::builder().with_reader(reader).build();
    (provider, exporter)
}

fn label_names(points: &[Point]) -> BTreeSet<String> {
    points
        .iter()
        .flat_map(|p| p.labels.keys().cloned())
        .collect()
}

async fn unary(client: &mut EchoClient<LbChannel>) -> Result<String, tonic::Status> {
    let reply = client
        .unary(EchoRequest {
            message: "hello".into(),
        })
        .await?;
    Ok(reply.into_inner().backend)
}

fn list(backends: &[Backend]) -> String {
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    format!("ipv4:{}", addrs.join(","))
}

#[tokio::test]
async fn a66_and_a94_instruments_have_the_standard_names_units_labels_and_buckets() {
    let b = backends(200, 2, free_port()).await;
    let (provider, exporter) = meters();
    let target = list(&b);
    let channel = LbChannel::builder(&target)
        .outlier_detection(None)
        .default_service_config(RETRY)
        .unwrap()
        .meter_provider(provider.clone());
    let channel = support::connect_serving(channel, 2).await;
    // Each backend fails its next call: the first call takes 3 attempts.
    for backend in &b {
        backend.counters.fail_next.store(1, Ordering::SeqCst);
    }
    let mut client = EchoClient::new(channel.clone());
    for i in 0..10 {
        unary(&mut client)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }

    let m = collect(&provider, &exporter);
    let get = |name: &str| {
        m.get(name)
            .unwrap_or_else(|| panic!("{name} missing: {:?}", m.keys()))
    };
    let call_labels: BTreeSet<String> = ["grpc.method", "grpc.status", "grpc.target"]
        .map(String::from)
        .into();

    let (unit, started) = get("grpc.client.attempt.started");
    assert_eq!(unit, "{attempt}");
    let total: f64 = started.iter().map(|p| p.value).sum();
    assert_eq!(total, 12.0, "10 calls, one of them in 3 attempts");
    assert_eq!(started[0].labels["grpc.method"], "echo.Echo/Unary");
    assert_eq!(started[0].labels["grpc.target"], target);
    assert_eq!(
        label_names(started),
        ["grpc.method", "grpc.target"].map(String::from).into()
    );

    let (unit, duration) = get("grpc.client.attempt.duration");
    assert_eq!(unit, "s");
    assert_eq!(label_names(duration), call_labels);
    assert!(duration.iter().all(|p| p.bounds == A66_LATENCY));
    let by_status: BTreeMap<&str, u64> = duration
        .iter()
        .map(|p| (p.labels["grpc.status"].as_str(), p.count))
        .collect();
    assert_eq!(by_status, BTreeMap::from([("OK", 10), ("UNAVAILABLE", 2)]));

    for name in [
        "grpc.client.attempt.sent_total_compressed_message_size",
        "grpc.client.attempt.rcvd_total_compressed_message_size",
    ] {
        let (unit, sizes) = get(name);
        assert_eq!(unit, "By", "{name}");
        assert!(sizes.iter().all(|p| p.bounds == A66_SIZE), "{name}");
        let ok = sizes
            .iter()
            .find(|p| p.labels["grpc.status"] == "OK")
            .unwrap();
        assert!(
            ok.value >= 10.0 * 7.0,
            "{name}: 10 messages of at least 7 bytes, got {}",
            ok.value
        );
    }

    let (unit, calls) = get("grpc.client.call.duration");
    assert_eq!(unit, "s");
    assert_eq!(label_names(calls), call_labels);
    assert_eq!(calls.iter().map(|p| p.count).sum::<u64>(), 10);
    let statuses: Vec<(&str, u64)> = calls
        .iter()
        .map(|p| (p.labels["grpc.status"].as_str(), p.count))
        .collect();
    assert_eq!(statuses, [("OK", 10)]);
    assert!(calls.iter().all(|p| p.bounds == A66_LATENCY));

    let subchannel_labels: BTreeSet<String> =
        ["grpc.lb.backend_service", "grpc.lb.locality", "grpc.target"]
            .map(String::from)
            .into();
    let (unit, ok) = get("grpc.subchannel.connection_attempts_succeeded");
    assert_eq!(unit, "{attempt}");
    assert_eq!(label_names(ok), subchannel_labels);
    assert!(ok.iter().map(|p| p.value).sum::<f64>() >= 2.0);
    let (unit, open) = get("grpc.subchannel.open_connections");
    assert_eq!(unit, "{connection}");
    let mut with_level = subchannel_labels.clone();
    with_level.insert("grpc.security_level".into());
    assert_eq!(label_names(open), with_level);
    assert_eq!(open.iter().map(|p| p.value).sum::<f64>(), 2.0, "{open:?}");
    assert_eq!(open[0].labels["grpc.security_level"], "none");

    // A pod stopped: a disconnection with its reason, one connection fewer.
    let mut b = b;
    b.pop().unwrap().stop().await;
    let gone = support::wait_for(Duration::from_secs(5), || {
        channel
            .endpoints()
            .iter()
            .filter(|e| e.connections > 0)
            .count()
            == 1
    })
    .await;
    assert!(gone.is_some(), "{:?}", support::states(&channel));
    let m = collect(&provider, &exporter);
    let (unit, lost) = &m["grpc.subchannel.disconnections"];
    assert_eq!(unit, "{disconnection}");
    assert!(
        lost.iter()
            .all(|p| p.labels.contains_key("grpc.disconnect_error")),
        "{lost:?}"
    );
    assert!(lost.iter().map(|p| p.value).sum::<f64>() >= 1.0);
    let (_, open) = &m["grpc.subchannel.open_connections"];
    assert_eq!(open.iter().map(|p| p.value).sum::<f64>(), 1.0, "{open:?}");
}

#[tokio::test]
async fn an_ejection_and_throttled_retries_show_in_healthlbs_lb_metrics() {
    let b = backends(205, 3, free_port()).await;
    let (provider, exporter) = meters();
    let channel = LbChannel::builder(list(&b)).meter_provider(provider.clone());
    let channel = support::connect_serving(channel, 3).await;
    b[0].counters
        .fail_with
        .store(tonic::Code::Unavailable as i32, Ordering::SeqCst);
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..30 {
        let _ = unary(&mut client).await;
    }
    let ejected = support::wait_for(Duration::from_secs(5), || {
        channel.endpoints().iter().any(|e| e.ejected_for.is_some())
    })
    .await;
    assert!(ejected.is_some(), "{:?}", support::states(&channel));
    let m = collect(&provider, &exporter);
    let (unit, ejections) = &m["grpc.lb.outlier_detection.ejections"];
    assert_eq!(unit, "{ejection}");
    assert_eq!(
        ejections[0].labels["grpc.lb.outlier_detection.algorithm"],
        "consecutive_failures"
    );
    assert_eq!(ejections.iter().map(|p| p.value).sum::<f64>(), 1.0);
    let (_, now) = &m["grpc.lb.outlier_detection.ejected_endpoints"];
    assert_eq!(now[0].value, 1.0);
    let (_, panic) = &m["grpc.lb.panic_mode"];
    assert_eq!(panic[0].value, 0.0);
}

/// The global subscriber: records nothing, and has every callsite asked
/// again at each use. tracing caches a callsite's interest from the
/// subscribers alive when it is first hit; with only the tests' scoped
/// subscribers, a first hit in one test could cache "never" while another
/// test's subscriber was being made, and that test's attempt spans went
/// missing (2 to 3 runs in 40 with every test at once).
struct Undecided;

impl tracing::Subscriber for Undecided {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Spans of every call made inside `f`, with the backends' traceparents.
async fn traced<F: std::future::Future<Output = ()>>(f: F) -> Vec<SpanData> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let guard = tracing::subscriber::set_default(subscriber);
    f.await;
    drop(guard);
    provider.force_flush().expect("flushes");
    exporter.get_finished_spans().expect("spans")
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The attempt spans under the one call span, checked against what the
/// servers received.
fn attempts_of_one_call(spans: &[SpanData], seen: &[String]) -> Vec<SpanData> {
    let calls: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "Sent.echo.Echo.Unary")
        .collect();
    assert_eq!(
        calls.len(),
        1,
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let call = calls[0];
    let attempts: Vec<SpanData> = spans
        .iter()
        .filter(|s| s.name == "Attempt.echo.Echo.Unary")
        .cloned()
        .collect();
    for a in &attempts {
        assert_eq!(
            a.parent_span_id,
            call.span_context.span_id(),
            "a child of the call"
        );
        assert_eq!(a.span_context.trace_id(), call.span_context.trace_id());
        let sent = format!(
            "00-{}-{}-01",
            a.span_context.trace_id(),
            a.span_context.span_id()
        );
        assert!(seen.contains(&sent), "the server got {sent}: {seen:?}");
    }
    assert_eq!(attr(call, "grpc.status").as_deref(), Some("OK"));
    attempts
}

fn traceparents(b: &[Backend]) -> Vec<String> {
    b.iter()
        .flat_map(|b| b.counters.traceparents.lock().unwrap().clone())
        .collect()
}

#[tokio::test]
async fn a_retried_call_shows_each_attempt_and_sends_each_its_trace_context() {
    let b = backends(210, 2, free_port()).await;
    let (provider, _exporter) = meters();
    let channel = LbChannel::builder(list(&b))
        .outlier_detection(None)
        .default_service_config(RETRY)
        .unwrap()
        .meter_provider(provider);
    let channel = support::connect_serving(channel, 2).await;
    for backend in &b {
        backend.counters.fail_next.store(1, Ordering::SeqCst);
    }
    let spans = traced(async {
        let mut client = EchoClient::new(channel.clone());
        unary(&mut client).await.expect("the third attempt answers");
    })
    .await;
    let mut attempts = attempts_of_one_call(&spans, &traceparents(&b));
    attempts.sort_by_key(|a| attr(a, "previous-rpc-attempts"));
    let summary: Vec<(Option<String>, Option<String>)> = attempts
        .iter()
        .map(|a| (attr(a, "previous-rpc-attempts"), attr(a, "grpc.status")))
        .collect();
    assert_eq!(
        summary,
        [
            (Some("0".into()), Some("UNAVAILABLE".into())),
            (Some("1".into()), Some("UNAVAILABLE".into())),
            (Some("2".into()), Some("OK".into())),
        ]
    );
    assert!(
        attempts
            .iter()
            .all(|a| attr(a, "transparent-retry").as_deref() == Some("false"))
    );
}

#[tokio::test]
async fn a_hedged_call_shows_both_attempts() {
    let b = backends(215, 2, free_port()).await;
    b[0].counters.delay_us.store(300_000, Ordering::SeqCst);
    b[1].counters.delay_us.store(300_000, Ordering::SeqCst);
    let (provider, _exporter) = meters();
    let channel = LbChannel::builder(list(&b))
        .outlier_detection(None)
        .default_service_config(HEDGE)
        .unwrap()
        .meter_provider(provider);
    let channel = support::connect_serving(channel, 2).await;
    let spans = traced(async {
        let mut client = EchoClient::new(channel.clone());
        unary(&mut client).await.expect("a hedge answers");
        // The loser's stream lingers briefly before it is cancelled.
        tokio::time::sleep(Duration::from_millis(100)).await;
    })
    .await;
    let attempts = attempts_of_one_call(&spans, &traceparents(&b));
    assert_eq!(
        attempts.len(),
        2,
        "{attempts:?} {:?} {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>(),
        traceparents(&b)
    );
    let statuses: BTreeSet<Option<String>> =
        attempts.iter().map(|a| attr(a, "grpc.status")).collect();
    assert!(statuses.contains(&Some("OK".into())), "{statuses:?}");
}

/// An event's attribute, by key.
fn event_attr(event: &opentelemetry::trace::Event, key: &str) -> Option<i64> {
    event
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .and_then(|kv| match kv.value {
            opentelemetry::Value::I64(v) => Some(v),
            _ => None,
        })
}

/// (sequence-number, message-size) of the attempt's events named `name`.
fn messages(attempt: &SpanData, name: &str) -> Vec<(i64, i64)> {
    attempt
        .events
        .iter()
        .filter(|e| e.name == name)
        .map(|e| {
            (
                event_attr(e, "sequence-number").unwrap_or_else(|| panic!("{e:?}")),
                event_attr(e, "message-size").expect("a size"),
            )
        })
        .collect()
}

/// `grpc-trace-bin` as OpenCensus's binary format lays it out.
fn trace_bin(span: &SpanData) -> Vec<u8> {
    let sc = &span.span_context;
    let mut out = vec![0, 0];
    out.extend(sc.trace_id().to_bytes());
    out.push(1);
    out.extend(sc.span_id().to_bytes());
    out.extend([2, sc.trace_flags().to_u8()]);
    out
}

#[tokio::test]
async fn attempts_carry_message_events_and_the_trace_context_headers_asked_for() {
    use prost::Message as _;
    let b = backends(220, 1, free_port()).await;
    let (provider, _exporter) = meters();
    let channel = LbChannel::builder(list(&b))
        .meter_provider(provider.clone())
        .trace_context(healthlb::TraceContext::Both);
    let channel = support::connect_serving(channel, 1).await;
    let requests: Vec<EchoRequest> = ["a", "a longer message", ""]
        .iter()
        .map(|m| EchoRequest {
            message: (*m).into(),
        })
        .collect();
    let sent: Vec<(i64, i64)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (i as i64, r.encoded_len() as i64))
        .collect();
    let mut replies = Vec::new();
    let spans = traced(async {
        let mut client = EchoClient::new(channel.clone());
        let mut stream = client
            .bidi(tokio_stream::iter(requests))
            .await
            .expect("the bidi call starts")
            .into_inner();
        while let Some(reply) = stream.message().await.expect("a reply") {
            replies.push(reply);
        }
    })
    .await;
    assert_eq!(replies.len(), 3, "one reply per request");
    let received: Vec<(i64, i64)> = replies
        .iter()
        .enumerate()
        .map(|(i, r)| (i as i64, r.encoded_len() as i64))
        .collect();
    let attempt = spans
        .iter()
        .find(|s| s.name == "Attempt.echo.Echo.Bidi")
        .expect("an attempt span");
    assert_eq!(messages(attempt, "Outbound message"), sent);
    assert_eq!(messages(attempt, "Inbound message"), received);
    // Both headers, naming the same attempt span.
    let sc = &attempt.span_context;
    assert_eq!(
        *b[0].counters.traceparents.lock().unwrap(),
        [format!("00-{}-{}-01", sc.trace_id(), sc.span_id())]
    );
    assert_eq!(
        *b[0].counters.trace_bins.lock().unwrap(),
        [trace_bin(attempt)]
    );

    // `grpc-trace-bin` alone: no `traceparent`.
    let only_bin = LbChannel::builder(list(&b))
        .meter_provider(provider)
        .trace_context(healthlb::TraceContext::GrpcTraceBin);
    let only_bin = support::connect_serving(only_bin, 1).await;
    let spans = traced(async {
        let mut client = EchoClient::new(only_bin.clone());
        unary(&mut client).await.expect("the call answers");
    })
    .await;
    let attempt = spans
        .iter()
        .find(|s| s.name == "Attempt.echo.Echo.Unary")
        .expect("an attempt span");
    assert_eq!(b[0].counters.traceparents.lock().unwrap()[1], "-");
    assert_eq!(
        b[0].counters.trace_bins.lock().unwrap()[1],
        trace_bin(attempt)
    );
}

/// The one span named `name`.
fn one<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "{name}: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

#[tokio::test]
async fn spans_say_ok_or_error_with_the_code() {
    use opentelemetry::trace::Status;
    let b = backends(225, 2, free_port()).await;
    let (provider, _exporter) = meters();
    let channel = LbChannel::builder(list(&b))
        .outlier_detection(None)
        .default_service_config(RETRY)
        .unwrap()
        .meter_provider(provider);
    let channel = support::connect_serving(channel, 2).await;
    b[0].counters.fail_next.store(1, Ordering::SeqCst);
    b[1].counters.fail_next.store(1, Ordering::SeqCst);
    let spans = traced(async {
        let mut client = EchoClient::new(channel.clone());
        unary(&mut client).await.expect("the third attempt answers");
    })
    .await;
    let attempts = attempts_of_one_call(&spans, &traceparents(&b));
    let mut statuses: Vec<Status> = attempts.iter().map(|a| a.status.clone()).collect();
    statuses.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        statuses,
        [
            Status::error("UNAVAILABLE"),
            Status::error("UNAVAILABLE"),
            Status::Ok
        ]
    );
    assert_eq!(one(&spans, "Sent.echo.Echo.Unary").status, Status::Ok);

    // A call that fails: its span says so, with the code.
    b[0].counters
        .fail_with
        .store(tonic::Code::NotFound as i32, Ordering::SeqCst);
    b[1].counters
        .fail_with
        .store(tonic::Code::NotFound as i32, Ordering::SeqCst);
    let spans = traced(async {
        let mut client = EchoClient::new(channel.clone());
        unary(&mut client).await.expect_err("not found");
    })
    .await;
    assert_eq!(
        one(&spans, "Sent.echo.Echo.Unary").status,
        Status::error("NOT_FOUND")
    );
    assert_eq!(
        one(&spans, "Attempt.echo.Echo.Unary").status,
        Status::error("NOT_FOUND")
    );
}

#[tokio::test]
async fn a_call_that_ends_at_its_deadline_is_recorded_as_deadline_exceeded() {
    use opentelemetry::trace::Status;
    use support::echo::pb::StreamRequest;
    let b = backends(228, 1, free_port()).await;
    b[0].counters.delay_us.store(2_000_000, Ordering::SeqCst);
    let (provider, exporter) = meters();
    let channel = LbChannel::builder(list(&b)).meter_provider(provider.clone());
    let channel = support::connect_serving(channel, 1).await;
    let spans = traced(async {
        let mut client = EchoClient::new(channel.clone());
        let mut request = tonic::Request::new(EchoRequest {
            message: "slow".into(),
        });
        request.set_timeout(Duration::from_millis(100));
        let status = client.unary(request).await.expect_err("too slow");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        // A stream its deadline ends, after its headers.
        let mut request = tonic::Request::new(StreamRequest {
            message: "s".into(),
            count: 100,
            interval_ms: 50,
        });
        request.set_timeout(Duration::from_millis(200));
        let mut stream = client.server_stream(request).await.unwrap().into_inner();
        let ended = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert_eq!(ended.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    })
    .await;
    let m = collect(&provider, &exporter);
    for name in ["grpc.client.call.duration", "grpc.client.attempt.duration"] {
        let (_, points) = &m[name];
        let statuses: BTreeMap<(&str, &str), u64> = points
            .iter()
            .map(|p| {
                let key = (
                    p.labels["grpc.method"].as_str(),
                    p.labels["grpc.status"].as_str(),
                );
                (key, p.count)
            })
            .collect();
        assert_eq!(
            statuses,
            BTreeMap::from([
                (("echo.Echo/ServerStream", "DEADLINE_EXCEEDED"), 1),
                (("echo.Echo/Unary", "DEADLINE_EXCEEDED"), 1),
            ]),
            "{name}"
        );
    }
    for name in [
        "Sent.echo.Echo.Unary",
        "Attempt.echo.Echo.Unary",
        "Sent.echo.Echo.ServerStream",
        "Attempt.echo.Echo.ServerStream",
    ] {
        let span = one(&spans, name);
        assert_eq!(
            attr(span, "grpc.status").as_deref(),
            Some("DEADLINE_EXCEEDED"),
            "{name}"
        );
        assert_eq!(span.status, Status::error("DEADLINE_EXCEEDED"), "{name}");
    }
}

#[tokio::test]
async fn calls_through_discover_are_traced_and_measured() {
    let b = backends(230, 2, free_port()).await;
    let (provider, exporter) = meters();
    let channel = LbChannel::builder(list(&b)).meter_provider(provider.clone());
    let channel = support::connect_serving(channel, 2).await;
    let spans = traced(async {
        let balance = tower::balance::p2c::Balance::new(channel.discover());
        let mut client = EchoClient::new(balance);
        let request = EchoRequest {
            message: "p2c".into(),
        };
        client.unary(request).await.expect("p2c answers");
    })
    .await;
    // One call span, its attempt its child, and the server got the attempt's
    // trace context.
    let attempts = attempts_of_one_call(&spans, &traceparents(&b));
    assert_eq!(attempts.len(), 1);
    let m = collect(&provider, &exporter);
    let (_, calls) = &m["grpc.client.call.duration"];
    let statuses: Vec<(&str, u64)> = calls
        .iter()
        .map(|p| (p.labels["grpc.status"].as_str(), p.count))
        .collect();
    assert_eq!(statuses, [("OK", 1)]);
}

#[tokio::test]
async fn the_target_label_is_the_canonical_target() {
    let port = free_port();
    let backend = Backend::start("b1", std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    let (provider, exporter) = meters();
    let channel = LbChannel::builder(format!("localhost:{port}"))
        .outlier_detection(None)
        .meter_provider(provider.clone())
        .connect()
        .await
        .expect("it connects");
    let mut client = EchoClient::new(channel.clone());
    unary(&mut client).await.expect("the call answers");
    let m = collect(&provider, &exporter);
    let (_, started) = &m["grpc.client.attempt.started"];
    assert_eq!(
        started[0].labels["grpc.target"],
        format!("dns:///localhost:{port}"),
        "as grpc-go's CanonicalTarget"
    );
    drop(backend);
}

#[tokio::test]
async fn an_attempt_that_waited_for_a_pick_says_so() {
    let b = backends(232, 1, free_port()).await;
    let (provider, _exporter) = meters();
    let channel = LbChannel::builder(list(&b)).meter_provider(provider);
    let channel = support::connect_serving(channel, 1).await;
    b[0].set_serving(false).await;
    let out = support::wait_for(Duration::from_secs(5), || {
        !support::is_serving(&channel, b[0].addr)
    })
    .await;
    assert!(out.is_some());
    let spans = traced(async {
        let mut client = EchoClient::new(channel.clone());
        let call = tokio::spawn(async move { unary(&mut client).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        b[0].set_serving(true).await;
        call.await.unwrap().expect("answered once it serves");
        // And one that did not wait.
        let mut client = EchoClient::new(channel.clone());
        unary(&mut client).await.expect("answered at once");
    })
    .await;
    let attempts: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "Attempt.echo.Echo.Unary")
        .collect();
    assert_eq!(attempts.len(), 2);
    let delayed: Vec<bool> = attempts
        .iter()
        .map(|a| {
            a.events
                .iter()
                .any(|e| e.name == "Delayed LB pick complete")
        })
        .collect();
    assert_eq!(delayed.iter().filter(|d| **d).count(), 1, "{delayed:?}");
}

#[tokio::test]
async fn the_zone_gauge_shows_the_share_really_kept() {
    use healthlb::resolve::{Endpoint, SourceError, from_stream};
    let pods = backends(234, 6, free_port()).await;
    let (provider, exporter) = meters();
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<Endpoint>, SourceError>>();
    let channel = LbChannel::from_source("echo-zones", from_stream(rx))
        .zone("a")
        .meter_provider(provider.clone())
        .build()
        .unwrap();
    let publish = |up: &[usize]| {
        let set = up
            .iter()
            .map(|&i| Endpoint::new(pods[i].addr).with_zone(if i < 3 { "a" } else { "b" }))
            .collect();
        tx.unbounded_send(Ok(set)).unwrap();
    };
    let share = |expected| zone_share(expected, &provider, &exporter);
    // 6 pods, 3 in zone a: routing on, every call stays.
    publish(&[0, 1, 2, 3, 4, 5]);
    assert_eq!(share(1.0).await, 1.0, "{:?}", support::states(&channel));
    // 3 pods, 1 in zone a: below 6, routing is off and calls spread: a third
    // stays.
    publish(&[0, 3, 4]);
    let kept = share(1.0 / 3.0).await;
    assert!((kept - 1.0 / 3.0).abs() < 1e-9, "{kept}");
    // Zone a lost its pods: nothing stays.
    publish(&[3, 4, 5]);
    assert_eq!(share(0.0).await, 0.0);
    drop(channel);
}

/// `grpc.lb.zone.local_share` once it reads `expected` (within 1e-9), or
/// its last value after 10 s: it is recorded when the balancer publishes,
/// which follows the endpoints' health by a moment.
async fn zone_share(
    expected: f64,
    provider: &SdkMeterProvider,
    exporter: &InMemoryMetricExporter,
) -> f64 {
    let read = || {
        let m = collect(provider, exporter);
        m.get("grpc.lb.zone.local_share")
            .and_then(|(_, points)| points.first())
            .map_or(f64::NAN, |p| p.value)
    };
    let started = std::time::Instant::now();
    loop {
        let value = read();
        if (value - expected).abs() < 1e-9 || started.elapsed() > Duration::from_secs(10) {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn spans_need_only_a_tracing_subscriber_not_a_meter_provider() {
    let b = backends(240, 1, free_port()).await;
    // Every test sets the global subscriber first (`meters`).
    let _ = meters();
    let channel = support::connect_serving(LbChannel::builder(list(&b)), 1).await;
    let spans = traced(async {
        let mut client = EchoClient::new(channel.clone());
        unary(&mut client).await.expect("the call answers");
    })
    .await;
    let attempts = attempts_of_one_call(&spans, &traceparents(&b));
    assert_eq!(attempts.len(), 1);
    let seen = traceparents(&b);
    assert!(
        seen.len() == 1 && seen[0] != "-",
        "the server got one: {seen:?}"
    );
}

#[tokio::test]
async fn weighted_round_robin_records_a78s_four_metrics() {
    use healthlb::{Policy, WeightState, WeightedRoundRobin};
    use support::echo::{Options, OrcaOptions, loopback};
    let port = free_port();
    let mut b = Vec::new();
    for n in [215, 216] {
        let options = Options {
            orca: Some(OrcaOptions::default()),
            ..Options::default()
        };
        b.push(Backend::start_with(&format!("b{n}"), loopback(n, port), options).await);
    }
    // b215 reports a cost per call; b216 reports none.
    b[0].counters.cost_milli.store(1000, Ordering::SeqCst);
    let wrr = WeightedRoundRobin::default()
        .blackout_period(Duration::ZERO)
        .weight_update_period(Duration::from_millis(100))
        .weight_expiration_period(Duration::from_millis(400));
    let (provider, exporter) = meters();
    let channel = LbChannel::builder(list(&b))
        .policy(Policy::WeightedRoundRobin(wrr))
        .meter_provider(provider.clone());
    let channel = support::connect_serving(channel, 2).await;
    let mut client = EchoClient::new(channel.clone());
    let state_of_first =
        |channel: &LbChannel| channel.endpoints()[0].server_weight.map(|w| w.state);
    for _ in 0..200 {
        if state_of_first(&channel) == Some(WeightState::Usable) {
            break;
        }
        unary(&mut client).await.expect("ok");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        state_of_first(&channel),
        Some(WeightState::Usable),
        "{}",
        channel.endpoints()[0]
    );
    // b215 stops reporting: stale after 400 ms.
    b[0].counters.cost_milli.store(0, Ordering::SeqCst);
    let stale = support::wait_for(Duration::from_secs(5), || {
        state_of_first(&channel) == Some(WeightState::Stale)
    })
    .await;
    assert!(stale.is_some(), "{}", channel.endpoints()[0]);

    let m = collect(&provider, &exporter);
    let labels = BTreeSet::from(["grpc.target".to_owned(), "grpc.lb.locality".to_owned()]);
    for (name, unit) in [
        ("grpc.lb.wrr.rr_fallback", "{update}"),
        ("grpc.lb.wrr.endpoint_weight_not_yet_usable", "{endpoint}"),
        ("grpc.lb.wrr.endpoint_weight_stale", "{endpoint}"),
    ] {
        let (got, points) = &m[name];
        assert_eq!(got, unit, "{name}");
        assert_eq!(label_names(points), labels, "{name}");
        // One usable weight at most, b216 never usable, b215 stale: each
        // was counted at some update.
        assert!(
            points.iter().map(|p| p.value).sum::<f64>() >= 1.0,
            "{name}: {points:?}"
        );
    }
    let (unit, weights) = &m["grpc.lb.wrr.endpoint_weights"];
    assert_eq!(unit, "{weight}");
    assert_eq!(label_names(weights), labels);
    assert!(
        weights.iter().map(|p| p.count).sum::<u64>() >= 2,
        "{weights:?}"
    );
    // b215's usable weight, 1.0, was among those recorded.
    assert!(
        weights.iter().map(|p| p.value).sum::<f64>() >= 1.0,
        "{weights:?}"
    );
}
