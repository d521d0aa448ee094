//! The conformance suite through worker RPC: the control plane's client
//! (the custom provider with worker credentials and leases) against a
//! worker's RPC server over mutual TLS, the worker running the native
//! provider. What a sandbox on a worker can do is what a local one can
//! (directory watches excepted: the RPC has none yet).

use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_cluster::rpc::{RpcAuth, WorkerRpc};
use stacyvm_cluster::token::Verifier;
use stacyvm_core::config::{Config, CustomConfig, Dur, RpcTlsConfig, Secret};
use stacyvm_core::provider::Provider;
use stacyvm_core::registry::Registry;
use stacyvm_providers::conformance;
use stacyvm_providers::remote::http::{CustomProvider, Decorate};

const TOKEN: &str = "conformance-rpc-token-0123456789";

/// Sends what a control plane sends: worker id, token, provider, and a
/// lease this worker holds.
#[derive(Debug)]
struct Lease;

#[async_trait]
impl Decorate for Lease {
    async fn decorate(
        &self,
        rb: reqwest::RequestBuilder,
        sandbox: Option<&str>,
    ) -> stacyvm_core::Result<reqwest::RequestBuilder> {
        let rb = rb
            .header("X-Worker-ID", "w-conf")
            .header("X-Worker-Token", TOKEN)
            .header("X-Stacyvm-Provider", "native");
        Ok(match sandbox {
            Some(_) => rb.header("X-Stacyvm-Lease", "w-conf:1"),
            None => rb,
        })
    }
}

struct Fixture {
    url: String,
    tls: RpcTlsConfig,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn pki(dir: &std::path::Path) -> RpcTlsConfig {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "conformance CA");
    let ca = p.self_signed(&ca_key).expect("ca");
    let leaf = |sans: Vec<String>, eku, name: &str| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(sans).expect("params");
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &ca, &ca_key).expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("pem");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("key");
    };
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca");
    leaf(
        vec!["127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth, "client");
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    RpcTlsConfig {
        enabled: true,
        server_cert_file: p("server.pem"),
        server_key_file: p("server.key"),
        client_ca_file: p("ca.pem"),
        ca_file: p("ca.pem"),
        client_cert_file: p("client.pem"),
        client_key_file: p("client.key"),
        server_name: String::new(),
        insecure_skip_verify: false,
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tmp");
    let tls = pki(dir.path());
    let mut cfg = Config::default();
    cfg.server.data_dir = dir.path().join("data").to_string_lossy().into_owned();
    cfg.providers.default = "native".into();
    cfg.providers.native.warm_pool = 0;
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let server_tls = tls.clone();
    // The worker runs on a runtime of its own, as a separate process would.
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let providers = stacyvm_providers::registry::build(&cfg).expect("providers");
            let registry = Arc::new(Registry::new(providers, "native").expect("registry"));
            let rpc = WorkerRpc::new(
                registry.clone(),
                RpcAuth {
                    worker_id: "w-conf".into(),
                    verifier: Verifier::new::<&[u8]>(&[], &[]),
                    static_token: Some(TOKEN.into()),
                },
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            url_tx.send(format!("https://{addr}")).expect("url");
            let server_cfg = stacyvm_cluster::tls::server_config(&server_tls).expect("tls");
            let stop = async move {
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            };
            let _ =
                stacyvm_cluster::tls::serve(listener, rpc.router(), Some(server_cfg), stop).await;
            for p in registry.all() {
                p.shutdown().await;
            }
        });
    });
    Fixture {
        url: url_rx.recv().expect("worker url"),
        tls,
        stop: Some(stop_tx),
        thread: Some(thread),
        _dir: dir,
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl conformance::Fixture for Fixture {
    fn provider(&self) -> Arc<dyn Provider> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(
                stacyvm_cluster::tls::client_config(&self.tls).expect("client tls"),
            )
            .build()
            .expect("client");
        Arc::new(
            CustomProvider::for_worker(
                &CustomConfig {
                    enabled: true,
                    name: "native".into(),
                    base_url: self.url.clone(),
                    api_key: Secret::default(),
                    timeout: Dur::secs(300),
                },
                client,
                Arc::new(Lease),
            )
            .expect("provider")
            .with_tunnel_client(
                stacyvm_cluster::remote::tunnel_client(&self.tls).expect("tunnel client"),
            ),
        )
    }
    fn image(&self) -> String {
        "host".into()
    }
    fn survives_restart(&self) -> bool {
        // A new client reaches the same worker.
        true
    }
    /// Port streams and archives: the `connect` and `archive` extensions.
    fn supports_connect(&self) -> bool {
        true
    }
    fn supports_archives(&self) -> bool {
        true
    }
    /// The `pause` extension, served by the worker's native provider.
    fn supports_pause(&self) -> bool {
        true
    }
}

stacyvm_providers::conformance_tests!(worker_rpc_conformance, fixture());
