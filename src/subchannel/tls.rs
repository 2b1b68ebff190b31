//! TLS to the backends, with rustls and the ring provider (feature `tls`).
//!
//! The server name is the target's hostname, not the pod IP: a headless
//! Service's certificate names the service, and every pod behind it presents
//! that one name.
//!
//! healthlb owns its connections (it needs to see GOAWAY and get unsent
//! calls back), so it cannot hand them to tonic's `ClientTlsConfig`, which
//! only configures connections tonic makes itself. [`TlsConfig`] plays that
//! role: CA roots, an optional client identity for mTLS, and the name.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsConnector, rustls};

use crate::Error;

/// How to speak TLS to the backends.
///
/// Defaults: the server name is the target's hostname (for
/// `dns:///echo.prod.svc:443`, `echo.prod.svc`); ALPN offers `h2` only,
/// as gRPC requires.
#[derive(Clone)]
pub struct TlsConfig {
    connector: TlsConnector,
    server_name: Option<String>,
}

impl TlsConfig {
    /// Trusts the CA certificates in `pem` (one or more PEM blocks).
    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, Error> {
        Ok(Self::from_rustls(Self::builder(pem)?.with_no_client_auth()))
    }

    /// Trusts the CA certificates in `ca_pem` and presents the client
    /// certificate chain `cert_pem` with its private key `key_pem` (mTLS).
    pub fn from_ca_pem_with_identity(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, Error> {
        let chain = certificates(cert_pem, "the client certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            Error::invalid_config(format!("the client key is not a PEM private key: {e}"))
        })?;
        let config = Self::builder(ca_pem)?
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                Error::invalid_config(format!("the client identity is not usable: {e}"))
            })?;
        Ok(Self::from_rustls(config))
    }

    /// Uses a rustls configuration as it is, except that ALPN is set to
    /// `h2`: a gRPC server may refuse a TLS connection without it.
    pub fn from_rustls(mut config: rustls::ClientConfig) -> Self {
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: None,
        }
    }

    /// Verifies the servers' certificates against `name` instead of the
    /// target's hostname. Default: the target's hostname.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    fn builder(
        ca_pem: &[u8],
    ) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, Error>
    {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(ca_pem, "the CA")? {
            roots.add(cert).map_err(|e| {
                Error::invalid_config(format!("a CA certificate is not usable: {e}"))
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::invalid_config(format!("TLS: {e}")))?
            .with_root_certificates(roots))
    }

    /// The name checked against the certificate.
    fn name_for(&self, authority: &Authority) -> Result<ServerName<'static>, Error> {
        let name = match &self.server_name {
            Some(name) => name.as_str(),
            None => authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']'),
        };
        ServerName::try_from(name.to_owned()).map_err(|e| {
            Error::invalid_config(format!("TLS server name {name:?} is not valid: {e}"))
        })
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        match &self.server_name {
            Some(name) => ServerName::try_from(name.as_str())
                .map(|_| ())
                .map_err(|e| {
                    Error::invalid_config(format!("TLS server name {name:?} is not valid: {e}"))
                }),
            None => Ok(()),
        }
    }

    /// Runs the TLS handshake on `tcp`.
    pub(crate) async fn handshake(
        &self,
        addr: SocketAddr,
        authority: &Authority,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, Error> {
        let name = self.name_for(authority)?;
        let shown = name.to_str().into_owned();
        let stream = self.connector.connect(name, tcp).await.map_err(|e| {
            Error::connect(
                "TLS handshake failed",
                format!("the TLS handshake with {addr} (server name {shown:?}) failed: {e}"),
                Some(e.into()),
            )
        })?;
        let alpn = stream.get_ref().1.alpn_protocol();
        if alpn.is_some_and(|p| p != b"h2") {
            return Err(Error::connect(
                "TLS handshake failed",
                format!(
                    "{addr} negotiated ALPN {:?}, not h2",
                    String::from_utf8_lossy(alpn.unwrap_or_default())
                ),
                None,
            ));
        }
        Ok(stream)
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid_config(format!("{what} is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::invalid_config(format!(
            "{what} holds no PEM certificate"
        )));
    }
    Ok(certs)
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}
