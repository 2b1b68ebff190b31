//! ORCA on the wire (gRFC A51), held against code generated from
//! cncf/xds's protos (vendored in `proto/xds`): what healthlb's server
//! layer and service write, the generated types read field for field; what
//! the generated server writes, healthlb's client reads.

use healthlb_testkit as support;

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{Stream, StreamExt};
use healthlb::{LbChannel, Policy, WeightState, WeightedRoundRobin};
use prost::Message;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, Options, OrcaOptions, free_port, loopback};
use support::xds::data::orca::v3::OrcaLoadReport as Generated;
use support::xds::service::orca::v3 as service;

async fn reporting(n: u8, oob_interval: Option<Duration>) -> Backend {
    let options = Options {
        orca: Some(OrcaOptions { oob_interval }),
        ..Options::default()
    };
    Backend::start_with(&format!("b{n}"), loopback(n, free_port()), options).await
}

async fn plain_client(backend: &Backend) -> EchoClient<tonic::transport::Channel> {
    let uri = format!("http://{}", backend.addr);
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .expect("a URI")
        .connect()
        .await
        .expect("connects");
    EchoClient::new(channel)
}

fn report_in(metadata: &tonic::metadata::MetadataMap) -> Generated {
    let value = metadata
        .get_bin(healthlb::orca::TRAILER)
        .expect("a report")
        .to_bytes()
        .expect("base64");
    Generated::decode(value).expect("an OrcaLoadReport")
}

#[tokio::test]
async fn a_per_call_report_decodes_as_the_proto_says() {
    let b = reporting(30, None).await;
    let server = b.orca.clone().expect("reports");
    server.set_cpu_utilization(0.5);
    server.set_memory_utilization(0.25);
    server.set_named_utilization("disk", 0.125);
    server.set_named_metric("queue", 7.0);
    server.set_eps(1.5);
    b.counters.cost_milli.store(2000, Ordering::SeqCst);
    let mut client = plain_client(&b).await;

    // OK: in the trailers, which tonic merges into a unary reply's metadata.
    let reply = client
        .unary(EchoRequest {
            message: "r".into(),
        })
        .await
        .expect("ok");
    let report = report_in(reply.metadata());
    // The call's own: its qps (at least 1) and qps × cost.
    assert!(report.rps_fractional >= 1.0, "{report:?}");
    assert_eq!(report.application_utilization, report.rps_fractional * 2.0);
    // The server's: set, not measured.
    assert_eq!(report.cpu_utilization, 0.5);
    assert_eq!(report.mem_utilization, 0.25);
    assert_eq!(report.eps, 1.5);
    assert_eq!(report.utilization["disk"], 0.125);
    assert_eq!(report.named_metrics["queue"], 7.0);
    // The deprecated whole `rps` (field 3) stays unset.
    #[allow(deprecated)]
    let rps = report.rps;
    assert_eq!(rps, 0);

    // A failed call, trailers-only: the report is in its headers.
    b.counters
        .fail_with
        .store(tonic::Code::Unavailable as i32, Ordering::SeqCst);
    let status = client
        .unary(EchoRequest {
            message: "r".into(),
        })
        .await
        .expect_err("fails");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let report = report_in(status.metadata());
    assert_eq!(report.cpu_utilization, 0.5);
}

#[tokio::test]
async fn the_out_of_band_service_streams_at_the_minimum_interval_or_slower() {
    let b = reporting(31, Some(Duration::from_millis(100))).await;
    let server = b.orca.clone().expect("reports");
    server.set_application_utilization(0.75);
    server.set_qps(40.0);
    let uri = format!("http://{}", b.addr);
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .expect("a URI")
        .connect()
        .await
        .expect("connects");
    let mut client = service::open_rca_service_client::OpenRcaServiceClient::new(channel);
    let request = service::OrcaLoadReportRequest {
        // Asks for 10 ms; the server's floor is 100 ms.
        report_interval: Some(prost_types::Duration {
            seconds: 0,
            nanos: 10_000_000,
        }),
        request_cost_names: Vec::new(),
    };
    let mut stream = client
        .stream_core_metrics(request)
        .await
        .expect("the stream opens")
        .into_inner();
    let first = stream.next().await.expect("a report").expect("ok");
    assert_eq!(first.application_utilization, 0.75);
    assert_eq!(first.rps_fractional, 40.0);
    // At 100 ms at most, 550 ms hold at most 6 more.
    let mut more = 0;
    let window = tokio::time::sleep(Duration::from_millis(550));
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = &mut window => break,
            next = stream.next() => {
                next.expect("the stream stays open").expect("ok");
                more += 1;
            }
        }
    }
    assert!((1..=6).contains(&more), "{more} reports in 550 ms");
}

/// `OpenRcaService` as the generated code serves it: one report, then the
/// stream stays open.
struct GeneratedService;

type Reports = Pin<Box<dyn Stream<Item = Result<Generated, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl service::open_rca_service_server::OpenRcaService for GeneratedService {
    type StreamCoreMetricsStream = Reports;

    async fn stream_core_metrics(
        &self,
        _: tonic::Request<service::OrcaLoadReportRequest>,
    ) -> Result<tonic::Response<Reports>, tonic::Status> {
        let report = Generated {
            cpu_utilization: 0.9,
            rps_fractional: 50.0,
            eps: 0.0,
            application_utilization: 0.5,
            named_metrics: [("x".to_owned(), 1.0)].into(),
            ..Generated::default()
        };
        let reports = futures::stream::iter([Ok(report)]).chain(futures::stream::pending());
        Ok(tonic::Response::new(Box::pin(reports)))
    }
}

#[tokio::test]
async fn a_report_the_generated_code_writes_is_read_by_the_client() {
    let addr = loopback(32, free_port());
    let listener = tokio::net::TcpListener::bind(addr).await.expect("binds");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(service::open_rca_service_server::OpenRcaServiceServer::new(
            GeneratedService,
        ))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);
    let wrr = WeightedRoundRobin::default()
        .blackout_period(Duration::ZERO)
        .weight_update_period(Duration::from_millis(100))
        .oob_load_report(Duration::from_millis(100));
    let channel = LbChannel::builder(format!("ipv4:{addr}"))
        .policy(Policy::WeightedRoundRobin(wrr))
        .connect()
        .await
        .expect("connects");
    // 50 qps at 0.5 application utilization (CPU's 0.9 is not read).
    let weighed = support::wait_for(Duration::from_secs(10), || {
        channel.endpoints()[0]
            .server_weight
            .is_some_and(|w| w.state == WeightState::Usable && w.weight == 100.0)
    })
    .await;
    assert!(weighed.is_some(), "{}", channel.endpoints()[0]);
    drop(channel);
    server.abort();
}
