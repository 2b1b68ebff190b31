//! gRPC's standard telemetry, printed to stdout: the metrics of gRFC A66
//! and A94 from an OpenTelemetry `MeterProvider`, and the call and attempt
//! spans of A72 through `tracing-opentelemetry`.
//!
//! ```sh
//! cargo run --example opentelemetry --features opentelemetry
//! ```
//!
//! Three echo backends with tonic-health on 127.0.0.2–4; one fails its
//! next call, so the first call is retried. The SDK's in-memory exporters
//! stand in for an OTLP exporter, and their contents are printed.

use healthlb_testkit as support;

use std::sync::atomic::Ordering;

use healthlb::LbChannel;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{backends, free_port};
use tracing::Level;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;

const RETRY: &str = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let metrics = InMemoryMetricExporter::default();
    let meters = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metrics.clone()).build())
        .build();
    let spans = InMemorySpanExporter::default();
    let tracers = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    // healthlb's spans and message events (debug) and your own at info;
    // without a filter, h2's and tower's trace-level spans go out too.
    let only = Targets::new()
        .with_default(Level::INFO)
        .with_target("healthlb", Level::DEBUG);
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(tracers.tracer("example"))
            .with_filter(only),
    );
    tracing::subscriber::set_global_default(subscriber)?;

    let b = backends(2, 3, free_port()).await;
    let list: Vec<String> = b.iter().map(|b| b.addr.to_string()).collect();
    let channel = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .default_service_config(RETRY)?
        .meter_provider(meters.clone())
        .connect()
        .await?;
    support::all_serving(&channel, 3).await;
    b[0].counters.fail_next.store(1, Ordering::SeqCst);
    b[1].counters.fail_next.store(1, Ordering::SeqCst);
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..5 {
        let reply = client.unary(EchoRequest {
            message: "hi".into(),
        });
        reply.await?;
    }

    meters.force_flush()?;
    tracers.force_flush()?;
    println!("metrics:");
    for rm in metrics.get_finished_metrics()?.iter().rev().take(1) {
        for scope in rm.scope_metrics() {
            for metric in scope.metrics() {
                println!("  {} ({})", metric.name(), metric.unit());
                let points: Vec<String> = match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => s
                        .data_points()
                        .map(|p| format!("{} {:?}", p.value(), p.attributes().collect::<Vec<_>>()))
                        .collect(),
                    AggregatedMetrics::I64(MetricData::Sum(s)) => s
                        .data_points()
                        .map(|p| format!("{} {:?}", p.value(), p.attributes().collect::<Vec<_>>()))
                        .collect(),
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => h
                        .data_points()
                        .map(|p| {
                            format!(
                                "count {} sum {:.6} {:?}",
                                p.count(),
                                p.sum(),
                                p.attributes().collect::<Vec<_>>()
                            )
                        })
                        .collect(),
                    AggregatedMetrics::U64(MetricData::Histogram(h)) => h
                        .data_points()
                        .map(|p| {
                            format!(
                                "count {} sum {} {:?}",
                                p.count(),
                                p.sum(),
                                p.attributes().collect::<Vec<_>>()
                            )
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                for p in points {
                    println!("    {p}");
                }
            }
        }
    }
    let finished = spans.get_finished_spans()?;
    println!("spans: {} exported", finished.len());
    for span in finished {
        let attrs: Vec<String> = span
            .attributes
            .iter()
            .filter(|kv| {
                !kv.key.as_str().starts_with("code.") && !kv.key.as_str().starts_with("thread.")
            })
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        println!(
            "  {} span {} parent {}: {}",
            span.name,
            span.span_context.span_id(),
            span.parent_span_id,
            attrs.join(" ")
        );
        for event in span.events.iter() {
            let attrs: Vec<String> = event
                .attributes
                .iter()
                .filter(|kv| {
                    kv.key.as_str().starts_with("sequence")
                        || kv.key.as_str().starts_with("message")
                })
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect();
            println!("    event {}: {}", event.name, attrs.join(" "));
        }
    }
    Ok(())
}
