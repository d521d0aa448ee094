//! The dashboard's OIDC sign-in: the authorization code flow with PKCE
//! (RFC 7636, `S256`) against `auth.oidc_issuer` (docs/dashboard.md).
//!
//! `GET /ui/oidc/start` remembers a random `state`, `nonce` and code
//! verifier server-side, binds the state to the browser in a short-lived
//! cookie, and sends the browser to the issuer's authorization endpoint.
//! `GET /ui/oidc/callback` takes the pending sign-in back only when the
//! `state` it carries is the browser's own (so nobody can sign a victim
//! into the attacker's account), once, within ten minutes; redeems the
//! code with the verifier at the token endpoint; and accepts the ID token
//! only through the same verifier as API bearer tokens (signature, issuer,
//! expiry), with this client as its audience and the sign-in's nonce. The
//! browser then holds a dashboard session like a key sign-in's, ending
//! when the ID token expires.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use stacyvm_core::config::AuthConfig;

use super::{digest, random_hex};
use crate::auth::{Identity, Oidc};

/// The cookie binding a sign-in's `state` to the browser that started it.
pub const STATE_COOKIE: &str = "stacyvm_oidc";
/// A sign-in must come back within this.
pub const PENDING_FOR: Duration = Duration::from_secs(600);
/// Sign-ins awaiting their callback at once; the oldest go first.
const MAX_PENDING: usize = 10_000;
/// Sign-ins one client address may have in flight; its oldest go first,
/// so one address starting sign-ins in a loop pushes out only its own.
const MAX_PENDING_PER_ADDR: usize = 16;
/// Discovery documents are refetched after this.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// A failed discovery is not retried for this long: while the issuer is
/// down, sign-ins fail at once instead of each waiting on it.
const DISCOVERY_RETRY: Duration = Duration::from_secs(10);
/// Largest discovery document or token answer read.
const MAX_ANSWER: usize = 256 * 1024;

/// Why a sign-in failed; its code goes back to the page, the detail to
/// the log only.
#[derive(Debug)]
pub struct Failure {
    pub code: &'static str,
    pub detail: String,
}

fn fail(code: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        code,
        detail: detail.into(),
    }
}

#[derive(Clone)]
struct Endpoints {
    authorization: String,
    token: String,
}

struct Pending {
    verifier: String,
    nonce: String,
    redirect: String,
    created: Instant,
    /// The client address that started it.
    addr: String,
}

/// The configured sign-in client and its sign-ins in flight.
pub struct SignIn {
    issuer: String,
    client_id: String,
    client_secret: String,
    redirect_url: String,
    scopes: String,
    http: reqwest::Client,
    /// The last discovery's answer (or why it failed) and when.
    endpoints: tokio::sync::Mutex<Option<(Result<Endpoints, String>, Instant)>>,
    /// How long a failed discovery is answered from the cache.
    retry_after: Duration,
    pending: parking_lot::Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for SignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignIn")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// A started sign-in: where to send the browser and the state to bind.
pub struct Started {
    pub location: String,
    pub state: String,
}

/// A finished sign-in: who, and until when.
pub struct SignedIn {
    pub identity: Identity,
    pub lifetime: Duration,
}

/// The PKCE `S256` challenge of a verifier.
fn challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Whether `host` is a plain authority (name or address, optional port),
/// so it can be put into a redirect URL as is.
fn plain_authority(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

fn eq(a: &str, b: &str) -> bool {
    subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()).into()
}

async fn read_json(resp: reqwest::Response, what: &str) -> Result<Value, String> {
    let status = resp.status();
    let mut resp = resp;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{what}: {e}"))? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("{what}: larger than {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    let v: Value = serde_json::from_slice(&body).map_err(|_| {
        format!(
            "{what}: HTTP {} with a body that is not JSON",
            status.as_u16()
        )
    })?;
    if !status.is_success() {
        let err = v.get("error").and_then(Value::as_str).unwrap_or("");
        return Err(format!("{what}: HTTP {} {err}", status.as_u16()));
    }
    Ok(v)
}

/// Keeps a started sign-in: expired ones dropped, and room made within
/// the caps (the address's own oldest first when it is at its cap).
fn remember(pending: &mut HashMap<String, Pending>, key: String, p: Pending) {
    let now = p.created;
    pending.retain(|_, q| now.duration_since(q.created) < PENDING_FOR);
    let mine = pending.values().filter(|q| q.addr == p.addr).count();
    if mine >= MAX_PENDING_PER_ADDR || pending.len() >= MAX_PENDING {
        let at_cap = mine >= MAX_PENDING_PER_ADDR;
        let oldest = pending
            .iter()
            .filter(|(_, q)| !at_cap || q.addr == p.addr)
            .min_by_key(|(_, q)| q.created)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            pending.remove(&k);
        }
    }
    pending.insert(key, p);
}

impl SignIn {
    /// The sign-in `a` configures, if any (`auth.oidc_client_id`).
    pub fn new(a: &AuthConfig) -> Option<Self> {
        if a.oidc_client_id.trim().is_empty() || a.oidc_issuer.trim().is_empty() {
            return None;
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .ok()?;
        let mut scopes: Vec<&str> = a.oidc_scopes.iter().map(String::as_str).collect();
        if !scopes.contains(&"openid") {
            scopes.insert(0, "openid");
        }
        Some(SignIn {
            issuer: a.oidc_issuer.trim().to_string(),
            client_id: a.oidc_client_id.trim().to_string(),
            client_secret: a.oidc_client_secret.expose().to_string(),
            redirect_url: a.oidc_redirect_url.trim().to_string(),
            scopes: scopes.join(" "),
            http,
            endpoints: tokio::sync::Mutex::new(None),
            retry_after: DISCOVERY_RETRY,
            pending: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// The issuer's endpoints from its discovery document (cached for
    /// an hour; a failure for `retry_after`).
    async fn endpoints(&self) -> Result<Endpoints, Failure> {
        let mut cached = self.endpoints.lock().await;
        match cached.as_ref() {
            Some((Ok(e), at)) if at.elapsed() < DISCOVERY_TTL => return Ok(e.clone()),
            Some((Err(why), at)) if at.elapsed() < self.retry_after => {
                return Err(fail(
                    "unavailable",
                    format!(
                        "{why} (failed {} ms ago; not retried yet)",
                        at.elapsed().as_millis()
                    ),
                ))
            }
            _ => {}
        }
        let got = self.discover().await;
        *cached = Some((got.clone(), Instant::now()));
        got.map_err(|why| fail("unavailable", why))
    }

    /// Fetches and checks the issuer's discovery document.
    async fn discover(&self) -> Result<Endpoints, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("discovery at {url}: {e}"))?;
        let doc = read_json(resp, "discovery").await?;
        let field = |k: &str| doc.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        // The document must be the configured issuer's own (OpenID
        // Connect Discovery §4.3).
        if field("issuer").trim_end_matches('/') != self.issuer.trim_end_matches('/') {
            return Err(format!(
                "the discovery document names issuer {:?}, not {:?}",
                field("issuer"),
                self.issuer
            ));
        }
        let e = Endpoints {
            authorization: field("authorization_endpoint"),
            token: field("token_endpoint"),
        };
        for u in [&e.authorization, &e.token] {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(format!(
                    "the discovery document's endpoint {u:?} is not an HTTP URL"
                ));
            }
        }
        Ok(e)
    }

    /// Starts a sign-in for a browser at `addr` that reached this server
    /// as `host` over `scheme`.
    pub async fn start(&self, scheme: &str, host: &str, addr: &str) -> Result<Started, Failure> {
        let redirect = if self.redirect_url.is_empty() {
            if !plain_authority(host) {
                return Err(fail(
                    "request",
                    format!("host {host:?} is not a plain authority"),
                ));
            }
            format!("{scheme}://{host}/ui/oidc/callback")
        } else {
            self.redirect_url.clone()
        };
        let endpoints = self.endpoints().await?;
        let (state, nonce, verifier) = (random_hex(), random_hex(), random_hex());
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", &redirect)
            .append_pair("scope", &self.scopes)
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge(&verifier))
            .append_pair("code_challenge_method", "S256")
            .finish();
        let sep = if endpoints.authorization.contains('?') {
            '&'
        } else {
            '?'
        };
        remember(
            &mut self.pending.lock(),
            digest(&state),
            Pending {
                verifier,
                nonce,
                redirect,
                created: Instant::now(),
                addr: addr.to_string(),
            },
        );
        Ok(Started {
            location: format!("{}{sep}{query}", endpoints.authorization),
            state,
        })
    }

    /// Finishes the sign-in `state` names, for the browser whose state
    /// cookie is `bound`: the code redeemed, the ID token verified.
    pub async fn finish(
        &self,
        oidc: &Oidc,
        state: &str,
        bound: Option<&str>,
        code: &str,
    ) -> Result<SignedIn, Failure> {
        if state.is_empty() || !bound.is_some_and(|b| eq(b, state)) {
            return Err(fail(
                "state",
                "the callback's state is not the one this browser started",
            ));
        }
        let pending = self
            .pending
            .lock()
            .remove(&digest(state))
            .filter(|p| p.created.elapsed() < PENDING_FOR)
            .ok_or_else(|| {
                fail(
                    "state",
                    "no sign-in in flight for this state (used or expired)",
                )
            })?;
        if code.is_empty() {
            return Err(fail("request", "the callback carries no code"));
        }
        let endpoints = self.endpoints().await?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", pending.redirect.as_str()),
            ("code_verifier", pending.verifier.as_str()),
        ];
        let mut req = self.http.post(&endpoints.token);
        if self.client_secret.is_empty() {
            form.push(("client_id", self.client_id.as_str()));
        } else {
            // client_secret_basic (RFC 6749 §2.3.1): both parts form-encoded.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            req = req.basic_auth(enc(&self.client_id), Some(enc(&self.client_secret)));
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let resp = req
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| fail("exchange", format!("token endpoint: {e}")))?;
        let answer = read_json(resp, "token endpoint")
            .await
            .map_err(|e| fail("exchange", e))?;
        let id_token = answer
            .get("id_token")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("exchange", "the token answer has no id_token"))?;
        let (identity, claims) = oidc
            .verify_for(id_token, &self.client_id)
            .await
            .map_err(|e| fail("token", format!("ID token: {e}")))?;
        let nonce = claims.get("nonce").and_then(Value::as_str).unwrap_or("");
        if !eq(nonce, &pending.nonce) {
            return Err(fail("token", "the ID token's nonce is not this sign-in's"));
        }
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        let left = exp.saturating_sub(chrono::Utc::now().timestamp());
        let lifetime = Duration::from_secs(u64::try_from(left).unwrap_or(0).max(60));
        Ok(SignedIn { identity, lifetime })
    }

    /// Sign-ins in flight (tests).
    #[cfg(test)]
    fn pending_len(&self) -> usize {
        self.pending.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig {
            oidc_issuer: "http://127.0.0.1:9".into(),
            oidc_client_id: "dash".into(),
            oidc_jwks_url: "http://127.0.0.1:9/jwks".into(),
            ..AuthConfig::default()
        }
    }

    #[test]
    fn pkce_challenge_is_the_unpadded_base64url_sha256() {
        // base64url(SHA-256(verifier)) without padding (RFC 7636 §4.2).
        assert_eq!(
            challenge("dBjftJeZ4CVP-mJ0sGx4pLhu3jXM1nYSeXkE7tF8"),
            "n8tt4oy8CsZj9T4T0h7tffjA_sFTOkwtDS5QNi-kkME"
        );
    }

    #[test]
    fn hosts_that_are_not_plain_authorities_are_refused() {
        assert!(plain_authority("127.0.0.1:7423"));
        assert!(plain_authority("[::1]:80"));
        assert!(plain_authority("dash.example.com"));
        assert!(!plain_authority("evil.example/x?"));
        assert!(!plain_authority("a@b"));
        assert!(!plain_authority(""));
    }

    #[test]
    fn a_sign_in_needs_a_client_id_and_an_issuer_and_always_asks_for_openid() {
        assert!(SignIn::new(&AuthConfig::default()).is_none());
        let mut c = config();
        c.oidc_scopes = vec!["email".into()];
        let s = SignIn::new(&c).expect("configured");
        assert_eq!(s.scopes, "openid email");
        c.oidc_issuer.clear();
        assert!(SignIn::new(&c).is_none());
    }

    #[test]
    fn one_address_starting_sign_ins_in_a_loop_pushes_out_only_its_own() {
        let mut pending = HashMap::new();
        let start = Instant::now();
        let at = |addr: &str, i: u64| Pending {
            verifier: String::new(),
            nonce: String::new(),
            redirect: String::new(),
            created: start + Duration::from_millis(i),
            addr: addr.into(),
        };
        remember(&mut pending, "victim".into(), at("198.51.100.7", 0));
        for i in 1..1000 {
            remember(&mut pending, format!("flood-{i}"), at("203.0.113.9", i));
        }
        assert!(
            pending.contains_key("victim"),
            "another address's sign-in survives"
        );
        let flood = pending.values().filter(|p| p.addr == "203.0.113.9").count();
        assert_eq!(flood, MAX_PENDING_PER_ADDR);
        assert!(pending.contains_key("flood-999") && !pending.contains_key("flood-1"));
    }

    /// An issuer that answers discovery with `status`, counting fetches.
    async fn issuer(status: u16) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test");
        let url = format!("http://{}", l.local_addr().expect("test"));
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (h, me) = (hits.clone(), url.clone());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let body = format!(
                    r#"{{"issuer":"{me}","authorization_endpoint":"{me}/auth","token_endpoint":"{me}/token"}}"#
                );
                let body = if status == 200 { body } else { String::new() };
                let _ = c
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        (url, hits)
    }

    #[tokio::test]
    async fn a_failed_discovery_is_answered_from_the_cache_until_it_may_be_retried() {
        let (url, hits) = issuer(503).await;
        let mut c = config();
        c.oidc_issuer = url;
        let mut s = SignIn::new(&c).expect("configured");
        for _ in 0..5 {
            let e = s
                .start("http", "127.0.0.1:7423", "192.0.2.1")
                .await
                .err()
                .expect("the issuer is down");
            assert_eq!(e.code, "unavailable");
        }
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one fetch while the failure is fresh"
        );
        // Once the failure may be retried, the next sign-in asks again.
        s.retry_after = Duration::ZERO;
        let (good, good_hits) = issuer(200).await;
        s.issuer = good;
        let started = s
            .start("http", "127.0.0.1:7423", "192.0.2.1")
            .await
            .expect("the issuer is back");
        assert!(
            started.location.starts_with(&format!("{}/auth?", s.issuer)),
            "{}",
            started.location
        );
        assert_eq!(good_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A good answer is kept.
        s.start("http", "127.0.0.1:7423", "192.0.2.1")
            .await
            .expect("cached");
        assert_eq!(good_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_callback_needs_the_browsers_own_state_and_uses_it_once() {
        let c = config();
        let s = SignIn::new(&c).expect("configured");
        // A pending sign-in as `start` leaves it (no issuer needed).
        s.pending.lock().insert(
            digest("st"),
            Pending {
                verifier: "v".into(),
                nonce: "n".into(),
                redirect: "http://h/ui/oidc/callback".into(),
                created: Instant::now(),
                addr: "192.0.2.1".into(),
            },
        );
        let auth = crate::auth::Authenticator::new(&c).expect("auth");
        let oidc = auth.oidc().expect("oidc");
        for bound in [None, Some("other"), Some("")] {
            let e = s
                .finish(oidc, "st", bound, "code")
                .await
                .err()
                .expect("refused");
            assert_eq!(e.code, "state", "{bound:?}");
        }
        assert_eq!(s.pending_len(), 1, "a foreign callback does not spend it");
        // The right state is taken (the exchange then fails: no issuer).
        let e = s
            .finish(oidc, "st", Some("st"), "code")
            .await
            .err()
            .expect("no issuer");
        assert_eq!(e.code, "unavailable");
        assert_eq!(s.pending_len(), 0);
        let e = s
            .finish(oidc, "st", Some("st"), "code")
            .await
            .err()
            .expect("used");
        assert_eq!(e.code, "state", "a state is good once");
    }
}
