//! TLS to a real tonic server: the certificate names the service, not the
//! pod IP, and a wrong name fails the handshake with a clear error.
#![cfg(feature = "tls")]

use healthlb_testkit as support;

use std::time::Duration;

use healthlb::resolve::Endpoint;
use healthlb::subchannel::Subchannel;
use healthlb::subchannel::{SubchannelConfig, SubchannelState, TlsConfig};
use healthlb::{BackoffConfig, ErrorKind};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, Options, loopback};
use tonic::transport::{Identity, ServerTlsConfig};

/// A CA, and a server certificate it signed for `name`: (CA PEM, identity).
fn pki(name: &str) -> (String, Identity) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    (
        ca.pem(),
        Identity::from_pem(server.pem(), server_key.serialize_pem()),
    )
}

async fn tls_backend(n: u8, name: &str) -> (Backend, String) {
    let (ca, identity) = pki(name);
    let options = Options {
        tls: Some(ServerTlsConfig::new().identity(identity)),
        ..Options::default()
    };
    (
        Backend::start_with("tls", loopback(n, 0), options).await,
        ca,
    )
}

fn fast() -> BackoffConfig {
    BackoffConfig::default()
        .initial(Duration::from_millis(100))
        .max(Duration::from_secs(1))
}

#[tokio::test]
async fn the_certificate_is_checked_against_the_service_name_not_the_pod_ip() {
    let (backend, ca) = tls_backend(20, "echo.test.local").await;
    // As the balancer does: the target's host is the authority.
    let config = SubchannelConfig::default()
        .authority(format!("echo.test.local:{}", backend.addr.port()))
        .tls_config(TlsConfig::new().ca_certificate(ca.as_bytes()).unwrap())
        .unwrap();
    let sub = Subchannel::spawn(Endpoint::new(backend.addr), config).unwrap();
    let mut client = EchoClient::new(sub.clone());
    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().backend, "tls");
    assert!(sub.state().is_serving());
}

#[tokio::test]
async fn a_wrong_name_fails_the_handshake_with_a_clear_error() {
    let (backend, ca) = tls_backend(21, "echo.test.local").await;
    let config = SubchannelConfig::default()
        .authority(format!("echo.test.local:{}", backend.addr.port()))
        .tls_config(
            TlsConfig::new()
                .ca_certificate(ca.as_bytes())
                .unwrap()
                .domain_name("other.test.local"),
        )
        .unwrap()
        .backoff(fast());
    let sub = Subchannel::spawn(Endpoint::new(backend.addr), config).unwrap();
    let mut rx = sub.subscribe();
    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let SubchannelState::TransientFailure(error) = rx.borrow_and_update().state() {
                return error.clone();
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the handshake fails within 5 s");
    assert_eq!(failed.label(), "TLS handshake failed");
    let message = failed.to_string();
    assert!(message.contains("other.test.local"), "{message}");
    assert!(message.contains(&backend.addr.to_string()), "{message}");
}

#[test]
fn bad_pem_is_refused_with_a_clear_error() {
    let err = TlsConfig::new()
        .ca_certificate(b"not a certificate")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(
        err.to_string()
            .contains("the CA certificate holds no PEM certificate"),
        "{err}"
    );

    let (ca, _) = pki("x.test");
    let err = TlsConfig::new()
        .identity(ca.as_bytes(), b"no key")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the client key is not a PEM private key"),
        "{err}"
    );

    let tls = TlsConfig::new()
        .ca_certificate(ca.as_bytes())
        .unwrap()
        .domain_name("bad name!");
    let err = SubchannelConfig::default().tls_config(tls).unwrap_err();
    assert!(
        err.to_string()
            .contains("TLS domain name \"bad name!\" is not valid"),
        "{err}"
    );

    // No roots at all: nothing could be checked.
    let err = SubchannelConfig::default()
        .tls_config(TlsConfig::new())
        .unwrap_err();
    assert!(err.to_string().contains("no root certificate"), "{err}");
}

#[tokio::test]
async fn an_https_target_turns_tls_on() {
    let (backend, ca) = tls_backend(22, "echo.test.local").await;
    // With the cluster's CA, as tonic users write it.
    let tls = TlsConfig::new()
        .ca_certificate(ca.as_bytes())
        .unwrap()
        .domain_name("echo.test.local");
    let channel = healthlb::LbChannel::builder(format!("https://{}", backend.addr))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("SERVING over TLS");
    let reply = EchoClient::new(channel)
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().backend, "tls");

    // Without any TLS settings, an https:// target still speaks TLS, with
    // the system's roots, which don't know this test's private CA: the
    // handshake fails on the certificate, not for want of TLS.
    let channel = healthlb::LbChannel::builder(format!("https://{}", backend.addr))
        .subchannels(|s| s.backoff(fast()))
        .build()
        .unwrap();
    let failed = support::wait_for(Duration::from_secs(10), || {
        channel
            .endpoints()
            .iter()
            .any(|e| matches!(&e.state, SubchannelState::TransientFailure(err) if err.label() == "TLS handshake failed"))
    })
    .await;
    assert!(
        failed.is_some(),
        "{:?}",
        channel
            .endpoints()
            .iter()
            .map(|e| e.state.to_string())
            .collect::<Vec<_>>()
    );
    let state = channel.endpoints()[0].state.to_string();
    assert!(
        state.contains("UnknownIssuer") || state.contains("certificate"),
        "{state}"
    );
}
