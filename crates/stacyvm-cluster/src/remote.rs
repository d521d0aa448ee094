//! The control plane's side of worker RPC: a provider per (worker,
//! provider) that reaches the worker's RPC address over mutual TLS with
//! worker credentials and, on every call about a sandbox, its lease.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::RequestBuilder;
use stacyvm_core::cluster::Remote;
use stacyvm_core::config::{Config, CustomConfig, Dur, Secret};
use stacyvm_core::provider::Provider;
use stacyvm_core::store::{Store, WorkerRecord};
use stacyvm_core::{Error, ErrorKind, Result};
use stacyvm_providers::remote::http::{CustomProvider, Decorate};

use crate::token::{self, Audience, Issue};

/// How long one RPC may take at most (an exec's own timeout is shorter;
/// file transfers of gigabytes need long). Connecting is capped at 10 s.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(3600);

/// The control plane's credential towards workers.
#[derive(Clone)]
enum Creds {
    /// `auth.worker_token` (staging).
    Static(String),
    /// `auth.worker_signing_key`: a fresh 5-minute token per call.
    Signing(Vec<u8>),
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Creds::Static(_) => "Static([REDACTED])",
            Creds::Signing(_) => "Signing([REDACTED])",
        })
    }
}

impl Creds {
    fn token(&self, worker: &str) -> Result<String> {
        match self {
            Creds::Static(t) => Ok(t.clone()),
            Creds::Signing(k) => {
                let now = chrono::Utc::now().timestamp();
                token::sign(k, &Issue::new(worker, Audience::Rpc, 300), now)
                    .map(|(t, _)| t)
                    .map_err(|e| Error::internal(format!("signing a worker RPC token: {e}")))
            }
        }
    }
}

/// How long a sandbox's lease, as read from the store, is sent without
/// reading it again. A lease changes hands only when a sandbox is
/// destroyed or its lease is lost and re-taken; a worker refuses any
/// generation older than one it has seen (409), and that refusal drops the
/// cached one, so a stale entry costs one refused call, never a call
/// acting under an old lease.
const LEASE_CACHE_TTL: Duration = Duration::from_secs(2);

/// Adds worker id, token, provider and lease to each request.
#[derive(Debug)]
struct Decorator {
    worker: String,
    provider: String,
    creds: Creds,
    store: Arc<dyn Store>,
    leases: Arc<LeaseCache>,
    /// The last signed token and when it was made (reused for a minute of
    /// its five).
    token: parking_lot::Mutex<Option<(String, std::time::Instant)>>,
}

impl Decorator {
    fn token(&self) -> Result<String> {
        if let Creds::Static(t) = &self.creds {
            return Ok(t.clone());
        }
        let mut cached = self.token.lock();
        if let Some((t, at)) = cached.as_ref() {
            if at.elapsed() < Duration::from_secs(60) {
                return Ok(t.clone());
            }
        }
        let t = self.creds.token(&self.worker)?;
        *cached = Some((t.clone(), std::time::Instant::now()));
        Ok(t)
    }
}

/// `holder:generation` per sandbox, with when it was read.
#[derive(Debug, Default)]
struct LeaseCache(parking_lot::Mutex<HashMap<String, (String, std::time::Instant)>>);

impl LeaseCache {
    fn get(&self, id: &str) -> Option<String> {
        let m = self.0.lock();
        m.get(id)
            .filter(|(_, at)| at.elapsed() < LEASE_CACHE_TTL)
            .map(|(v, _)| v.clone())
    }

    fn put(&self, id: &str, v: String) {
        let mut m = self.0.lock();
        if m.len() >= 10_000 {
            m.retain(|_, (_, at)| at.elapsed() < LEASE_CACHE_TTL);
        }
        m.insert(id.to_string(), (v, std::time::Instant::now()));
    }

    fn forget(&self, id: &str) {
        self.0.lock().remove(id);
    }
}

#[async_trait]
impl Decorate for Decorator {
    async fn decorate(&self, rb: RequestBuilder, sandbox: Option<&str>) -> Result<RequestBuilder> {
        let mut rb = rb
            .header("X-Worker-ID", &self.worker)
            .header("X-Stacyvm-Provider", &self.provider);
        let mut t = reqwest::header::HeaderValue::from_str(&self.token()?)
            .map_err(|_| Error::invalid("the worker token cannot be sent in a header"))?;
        t.set_sensitive(true);
        rb = rb.header("X-Worker-Token", t);
        if let Some(id) = sandbox {
            if let Some(l) = self.leases.get(id) {
                return Ok(rb.header("X-Stacyvm-Lease", l));
            }
            match self.store.get_lease(id).await {
                Ok(l) => {
                    let v = l.fence().to_string();
                    self.leases.put(id, v.clone());
                    rb = rb.header("X-Stacyvm-Lease", v);
                }
                // No lease: the worker refuses the call (409), as it must.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(rb)
    }

    fn refused(&self, sandbox: &str) {
        self.leases.forget(sandbox);
    }
}

/// The client of port tunnels to workers (`connect`): HTTP/1.1 only, as
/// an `Upgrade` needs, with the RPC's TLS settings; no overall timeout (a
/// tunnel lives as long as its connection).
pub fn tunnel_client(t: &stacyvm_core::config::RpcTlsConfig) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .no_proxy()
        .http1_only()
        .user_agent(concat!("stacyvm-control-plane/", env!("CARGO_PKG_VERSION")));
    if t.enabled {
        let mut h1 = crate::tls::client_config(t)?;
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        b = b.use_preconfigured_tls(h1);
    }
    b.build()
        .map_err(|e| Error::internal("building the worker tunnel client").with_source(e))
}

/// Every worker this control plane reaches.
pub struct Workers {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    /// HTTP/1.1 only, for port tunnels.
    tunnel: reqwest::Client,
    creds: Creds,
    tls: bool,
    cache: parking_lot::Mutex<HashMap<(String, String, String), Arc<CustomProvider>>>,
    leases: Arc<LeaseCache>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("creds", &self.creds)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// `None` when no worker credential is configured (`auth.worker_token`
    /// or `auth.worker_signing_key`): such a control plane reaches no
    /// worker.
    pub fn from_config(cfg: &Config, store: Arc<dyn Store>) -> Result<Option<Workers>> {
        let a = &cfg.auth;
        // The shared token first: a worker then verifies calls without
        // holding the signing key (it only ever gets tokens issued to it).
        let creds = if !a.worker_token.is_empty() {
            Creds::Static(a.worker_token.expose().trim().to_string())
        } else if !a.worker_signing_key.is_empty() {
            let k = a.worker_signing_key.expose().trim().as_bytes().to_vec();
            if k.len() < token::MIN_KEY_LEN {
                return Err(Error::invalid(format!(
                    "auth.worker_signing_key must be at least {} bytes",
                    token::MIN_KEY_LEN
                )));
            }
            Creds::Signing(k)
        } else {
            return Ok(None);
        };
        let t = &cfg.worker.rpc_tls;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(RPC_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("stacyvm-control-plane/", env!("CARGO_PKG_VERSION")));
        if t.enabled {
            builder = builder.use_preconfigured_tls(crate::tls::client_config(t)?);
        }
        let client = builder
            .build()
            .map_err(|e| Error::internal("building the worker RPC client").with_source(e))?;
        let tunnel = tunnel_client(t)?;
        Ok(Some(Workers {
            store,
            client,
            tunnel,
            creds,
            tls: t.enabled,
            cache: parking_lot::Mutex::default(),
            leases: Arc::default(),
        }))
    }
}

#[async_trait]
impl Remote for Workers {
    fn lease_changed(&self, sandbox: &str) {
        self.leases.forget(sandbox);
    }

    async fn provider(&self, worker: &WorkerRecord, provider: &str) -> Result<Arc<dyn Provider>> {
        let url = worker
            .capacity
            .get("rpc_url")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
            .to_string();
        if url.is_empty() {
            return Err(Error::unavailable(format!(
                "worker {} has no rpc_url: it cannot be reached",
                worker.id
            )));
        }
        if self.tls && !url.starts_with("https://") {
            return Err(Error::unavailable(format!(
                "worker {} advertises {url}, but worker.rpc_tls is on: it must be https://",
                worker.id
            )));
        }
        let key = (worker.id.clone(), provider.to_string(), url.clone());
        if let Some(p) = self.cache.lock().get(&key) {
            return Ok(p.clone());
        }
        let cfg = CustomConfig {
            enabled: true,
            name: provider.to_string(),
            base_url: url,
            api_key: Secret::default(),
            timeout: Dur(stacyvm_api::duration::GoDuration::from_std(RPC_TIMEOUT)),
        };
        let p = Arc::new(
            CustomProvider::for_worker(
                &cfg,
                self.client.clone(),
                Arc::new(Decorator {
                    worker: worker.id.clone(),
                    provider: provider.to_string(),
                    creds: self.creds.clone(),
                    store: self.store.clone(),
                    leases: self.leases.clone(),
                    token: parking_lot::Mutex::new(None),
                }),
            )?
            .with_tunnel_client(self.tunnel.clone()),
        );
        self.cache.lock().insert(key, p.clone());
        Ok(p)
    }
}
