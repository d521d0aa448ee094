//! Mutual TLS for worker RPC (`worker.rpc_tls`), with rustls.
//!
//! The worker serves with its certificate and, when `client_ca_file` is
//! set, accepts only clients whose certificate that CA signed (a control
//! plane). The control plane trusts the CA in `ca_file` (only it: never
//! the system roots) and shows `client_cert_file`/`client_key_file`. Both
//! sides speak HTTP/2 (ALPN `h2`) and HTTP/1.1.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use stacyvm_core::config::RpcTlsConfig;
use stacyvm_core::{Error, Result};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &str, path: &str) -> Result<Vec<CertificateDer<'static>>> {
    if path.trim().is_empty() {
        return Err(Error::invalid(format!("worker.rpc_tls.{what} is required")));
    }
    let list: Vec<_> = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(|e| Error::invalid(format!("worker.rpc_tls.{what} {path}: {e}")))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::invalid(format!("worker.rpc_tls.{what} {path}: {e}")))?;
    if list.is_empty() {
        return Err(Error::invalid(format!(
            "worker.rpc_tls.{what} {path} holds no PEM certificate"
        )));
    }
    Ok(list)
}

fn key(what: &str, path: &str) -> Result<PrivateKeyDer<'static>> {
    if path.trim().is_empty() {
        return Err(Error::invalid(format!("worker.rpc_tls.{what} is required")));
    }
    PrivateKeyDer::from_pem_file(Path::new(path)).map_err(|e| {
        Error::invalid(format!(
            "worker.rpc_tls.{what} {path}: no usable private key ({e})"
        ))
    })
}

fn roots(what: &str, path: &str) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for c in certs(what, path)? {
        store
            .add(c)
            .map_err(|e| Error::invalid(format!("worker.rpc_tls.{what} {path}: {e}")))?;
    }
    Ok(store)
}

/// The worker's server configuration.
pub fn server_config(t: &RpcTlsConfig) -> Result<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?;
    let builder = if t.client_ca_file.trim().is_empty() {
        builder.with_no_client_auth()
    } else {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots("client_ca_file", &t.client_ca_file)?),
            provider(),
        )
        .build()
        .map_err(|e| Error::invalid(format!("worker.rpc_tls.client_ca_file: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut cfg = builder
        .with_single_cert(
            certs("server_cert_file", &t.server_cert_file)?,
            key("server_key_file", &t.server_key_file)?,
        )
        .map_err(|e| Error::invalid(format!("worker.rpc_tls server certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The control plane's client configuration.
pub fn client_config(t: &RpcTlsConfig) -> Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?;
    let builder = if t.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    } else {
        builder.with_root_certificates(roots("ca_file", &t.ca_file)?)
    };
    let mut cfg = match (t.client_cert_file.trim(), t.client_key_file.trim()) {
        ("", "") => builder.with_no_client_auth(),
        ("", _) | (_, "") => {
            return Err(Error::invalid(
                "worker.rpc_tls.client_cert_file and client_key_file go together",
            ))
        }
        (c, k) => builder
            .with_client_auth_cert(certs("client_cert_file", c)?, key("client_key_file", k)?)
            .map_err(|e| {
                Error::invalid(format!("worker.rpc_tls client certificate and key: {e}"))
            })?,
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// `insecure_skip_verify`: accepts any server certificate (lint flags it).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Serves `router` on `listener`: TLS when `tls` is given (HTTP/2 and
/// HTTP/1.1 by ALPN), plain HTTP otherwise. Runs until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Option<ServerConfig>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use tower::Service as _;
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "worker RPC accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut router = router.clone();
                    async move { router.call(req.map(axum::body::Body::new)).await }
                });
            let builder = Builder::new(TokioExecutor::new());
            let result = match acceptor {
                Some(a) => {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), a.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "worker RPC TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "worker RPC TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => {
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "worker RPC connection ended");
            }
        });
    }
}
