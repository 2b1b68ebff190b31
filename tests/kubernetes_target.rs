//! A `kubernetes:///` target, whose client healthlb builds from the
//! kubeconfig, against an API server that refuses: the errors name that
//! server's address. Alone in its binary: it points `KUBECONFIG` at a file
//! of its own before any thread starts.
#![cfg(feature = "kubernetes")]

use healthlb_testkit as support;

use std::time::{Duration, Instant};

use healthlb::LbChannel;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;

#[test]
fn a_refusing_api_server_is_named_in_call_errors_and_the_status() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let server = format!("http://127.0.0.1:{port}");
    let path = std::env::temp_dir().join(format!("healthlb-kubeconfig-{}", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster:\n    server: {server}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\n\
             users:\n- name: test\n  user: {{}}\n"
        ),
    )
    .expect("writes the kubeconfig");
    // SAFETY: no other thread exists yet; this binary has this one test.
    unsafe { std::env::set_var("KUBECONFIG", &path) };

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let channel = LbChannel::builder("kubernetes:///echo.default:50051")
            .ready_timeout(Duration::from_secs(5))
            .build()
            .expect("builds");
        let mut client = EchoClient::new(channel.clone());
        // The first call may come before the first failure: it waits for
        // resolution, then fails with its error. Bounded by ready_timeout.
        let started = Instant::now();
        let err = client
            .unary(EchoRequest {
                message: "x".into(),
            })
            .await
            .expect_err("no endpoint");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        for what in [
            "EndpointSlices of default/echo",
            server.as_str(),
            "Connection refused",
        ] {
            assert!(err.message().contains(what), "{what}: {}", err.message());
        }
        let status = channel.resolution().to_string();
        assert!(
            status.contains("failing") && status.contains(&server),
            "{status}"
        );
    });
    let _ = std::fs::remove_file(&path);
}
