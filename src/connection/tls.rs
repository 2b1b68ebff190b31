//! TLS to the backends, with rustls (feature `tls`): on the crypto provider the
//! application installed for the process, else *ring*.
//!
//! The server name is the target's hostname, not the pod IP: a headless
//! Service's certificate names the service, and every pod behind it presents
//! that one name.
//!
//! healthlb owns its connections (it needs to see GOAWAY and get unsent
//! calls back), so it cannot hand them to tonic's `ClientTlsConfig`, which
//! only configures connections tonic makes itself. [`TlsConfig`] plays that
//! role, with the same names: CA certificates, the system's roots, an
//! optional client identity for mTLS, and the domain name.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsConnector, rustls};
use tracing::warn;

use crate::Error;

/// How to speak TLS to the backends, built as tonic's `ClientTlsConfig` is:
///
/// ```
/// # fn run(ca_pem: &[u8]) -> Result<(), healthlb::Error> {
/// use healthlb::subchannel::TlsConfig;
///
/// // A private CA, as a cluster's own certificates are:
/// let private = TlsConfig::new().ca_certificate(ca_pem)?;
/// // Public certificates, checked against the system's roots:
/// let public = TlsConfig::new().with_native_roots();
/// # Ok(())
/// # }
/// ```
///
/// Defaults: no root certificates until some are added (an `https://`
/// target without a `TlsConfig` gets the system's roots); the server name is
/// the target's hostname (for `dns:///echo.prod.svc:443`,
/// `echo.prod.svc`); ALPN offers `h2` only, as gRPC requires. The system's
/// roots are read on the first connect, on the blocking pool, never on a
/// Tokio worker. The crypto is the rustls `CryptoProvider` the application
/// installed for the process (`CryptoProvider::install_default`), such as
/// aws-lc-rs for post-quantum key exchange; without one, *ring*'s.
#[derive(Clone, Default)]
pub struct TlsConfig {
    roots: Vec<CertificateDer<'static>>,
    native_roots: bool,
    identity: Option<Identity>,
    domain_name: Option<String>,
    rustls: Option<Arc<rustls::ClientConfig>>,
    /// Built on the first connect, and shared by clones from then on.
    connector: Arc<OnceCell<Result<TlsConnector, Error>>>,
}

#[derive(Clone)]
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

// === impl TlsConfig ===

impl TlsConfig {
    /// No roots, no identity: add what the backends need.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificates in `pem` (one or more PEM blocks).
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Result<Self, Error> {
        self.roots
            .extend(certificates(pem.as_ref(), "the CA certificate")?);
        self.connector = Arc::default();
        Ok(self)
    }

    /// Trusts the system's root certificates too, for backends behind
    /// public certificates, as tonic's `with_native_roots`. Default: off.
    pub fn with_native_roots(mut self) -> Self {
        self.native_roots = true;
        self.connector = Arc::default();
        self
    }

    /// Presents the client certificate chain `cert_pem`, with its private
    /// key `key_pem`, for mTLS.
    pub fn identity(
        mut self,
        cert_pem: impl AsRef<[u8]>,
        key_pem: impl AsRef<[u8]>,
    ) -> Result<Self, Error> {
        let chain = certificates(cert_pem.as_ref(), "the client certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_ref()).map_err(|e| {
            Error::invalid_config(format!("the client key is not a PEM private key: {e}"))
        })?;
        self.identity = Some(Identity {
            chain,
            key: Arc::new(key),
        });
        self.connector = Arc::default();
        Ok(self)
    }

    /// Checks the servers' certificates against `name` instead of the
    /// target's hostname. Default: the target's hostname.
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// Uses a rustls configuration as it is, except that ALPN is set to
    /// `h2`: a gRPC server may refuse a TLS connection without it. The
    /// roots and identity set on this `TlsConfig` are then not used.
    pub fn from_rustls(mut config: rustls::ClientConfig) -> Self {
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self {
            rustls: Some(Arc::new(config)),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if let Some(name) = &self.domain_name {
            ServerName::try_from(name.as_str()).map_err(|e| {
                Error::invalid_config(format!("TLS domain name {name:?} is not valid: {e}"))
            })?;
        }
        if self.rustls.is_none() && self.roots.is_empty() && !self.native_roots {
            return Err(Error::invalid_config(
                "TLS has no root certificate to check servers against: \
                 add ca_certificate(...) or with_native_roots()",
            ));
        }
        Ok(())
    }

    /// The connector, built once: reading the system's roots is file IO,
    /// so it runs on the blocking pool.
    async fn connector(&self) -> Result<TlsConnector, Error> {
        let built = self
            .connector
            .get_or_init(|| async {
                if let Some(config) = &self.rustls {
                    return Ok(TlsConnector::from(config.clone()));
                }
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.build())
                    .await
                    .unwrap_or_else(|e| {
                        Err(Error::connect(
                            "TLS setup failed",
                            format!("building the TLS configuration failed: {e}"),
                            None,
                        ))
                    })
            })
            .await;
        built.clone()
    }

    fn build(&self) -> Result<TlsConnector, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.roots {
            roots.add(cert.clone()).map_err(|e| {
                Error::invalid_config(format!("a CA certificate is not usable: {e}"))
            })?;
        }
        if self.native_roots {
            let found = rustls_native_certs::load_native_certs();
            if !found.errors.is_empty() {
                warn!(errors = ?found.errors, loaded = found.certs.len(), "some system root certificates could not be read");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 && self.roots.is_empty() {
                return Err(Error::connect(
                    "TLS setup failed",
                    format!(
                        "no system root certificate could be loaded ({:?}); add ca_certificate(...)",
                        found.errors
                    ),
                    None,
                ));
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::invalid_config(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some(identity) => builder
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .map_err(|e| {
                    Error::invalid_config(format!("the client identity is not usable: {e}"))
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// The name checked against the certificate.
    fn name_for(&self, authority: &Authority) -> Result<ServerName<'static>, Error> {
        let name = match &self.domain_name {
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

    /// Runs the TLS handshake on `tcp`.
    pub(crate) async fn handshake(
        &self,
        addr: SocketAddr,
        authority: &Authority,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, Error> {
        let connector = self.connector().await?;
        let name = self.name_for(authority)?;
        let shown = name.to_str().into_owned();
        let stream = connector.connect(name, tcp).await.map_err(|e| {
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
            .field("roots", &self.roots.len())
            .field("native_roots", &self.native_roots)
            .field("identity", &self.identity.is_some())
            .field("domain_name", &self.domain_name)
            .field("rustls", &self.rustls.is_some())
            .finish_non_exhaustive()
    }
}

/// The crypto the client's TLS runs on: the process's default rustls
/// `CryptoProvider` when the application installed one (rustls's rule for
/// libraries: the application chooses, e.g. aws-lc-rs for post-quantum key
/// exchange), else *ring*'s, which healthlb's `tls` feature builds.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    if let Some(installed) = rustls::crypto::CryptoProvider::get_default() {
        return installed.clone();
    }
    // rustls 0.23.48 deprecates ring's constructor ("no support for
    // post-quantum algorithms") and offers no other: ring's signature
    // algorithms are private. Scoped here, so no other deprecation hides.
    #[allow(deprecated)]
    let ring = rustls::crypto::ring::default_provider();
    Arc::new(ring)
}
