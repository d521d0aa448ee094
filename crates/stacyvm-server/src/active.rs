//! Per-caller caps on long-lived work (F-10, `limits.*`): concurrent
//! execs (sync, NDJSON, WebSocket), file transfers and event streams, per
//! sandbox, per credential and per tenant. A request over any cap is
//! refused with 429 `RESOURCE_LIMIT` before its handler runs; a granted
//! [`Permit`] lives as long as the response body (or the WebSocket
//! session), so a stream holds its slot until it ends.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use stacyvm_core::config::LimitsConfig;

/// Which cap refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Sandbox(usize),
    Credential(usize),
    Tenant(usize),
}

impl std::fmt::Display for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cap::Sandbox(n) => write!(
                f,
                "too many concurrent execs and transfers on this sandbox (limit {n}, limits.max_active_per_sandbox)"
            ),
            Cap::Credential(n) => write!(
                f,
                "too many concurrent execs, transfers and streams for this credential (limit {n}, limits.max_active_per_credential)"
            ),
            Cap::Tenant(n) => write!(
                f,
                "too many concurrent execs, transfers and streams for this tenant (limit {n}, limits.max_active_per_tenant)"
            ),
        }
    }
}

/// The counters; an entry exists only while something holds it.
#[derive(Debug, Default)]
pub struct Active {
    per_sandbox: usize,
    per_credential: usize,
    per_tenant: usize,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// Slots held by one request; released on drop.
#[derive(Debug)]
pub struct Permit {
    keys: Vec<String>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut m = self.counts.lock();
        for k in &self.keys {
            if let Some(n) = m.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
    }
}

fn cap(v: i64) -> usize {
    usize::try_from(v).unwrap_or(0)
}

impl Active {
    pub fn new(c: &LimitsConfig) -> Self {
        Active {
            per_sandbox: cap(c.max_active_per_sandbox),
            per_credential: cap(c.max_active_per_credential),
            per_tenant: cap(c.max_active_per_tenant),
            counts: Arc::default(),
        }
    }

    /// Takes one slot of each applicable cap (0 = unlimited), or none.
    /// `sandbox` is `tenant/id` of the sandbox the request is about.
    pub fn try_acquire(
        &self,
        sandbox: Option<&str>,
        credential: &str,
        tenant: &str,
    ) -> Result<Permit, Cap> {
        let mut wanted: Vec<(String, usize, Cap)> = Vec::with_capacity(3);
        if let Some(s) = sandbox {
            wanted.push((
                format!("s:{s}"),
                self.per_sandbox,
                Cap::Sandbox(self.per_sandbox),
            ));
        }
        wanted.push((
            format!("c:{credential}"),
            self.per_credential,
            Cap::Credential(self.per_credential),
        ));
        wanted.push((
            format!("t:{tenant}"),
            self.per_tenant,
            Cap::Tenant(self.per_tenant),
        ));
        let mut m = self.counts.lock();
        for (k, limit, which) in &wanted {
            if *limit > 0 && m.get(k).copied().unwrap_or(0) >= *limit {
                return Err(*which);
            }
        }
        let mut keys = Vec::with_capacity(wanted.len());
        for (k, _, _) in wanted {
            *m.entry(k.clone()).or_insert(0) += 1;
            keys.push(k);
        }
        Ok(Permit {
            keys,
            counts: self.counts.clone(),
        })
    }

    /// Entries currently held (for tests and diagnostics).
    pub fn in_use(&self) -> usize {
        self.counts.lock().values().sum()
    }
}

/// A permit handed to the handler through request extensions; a handler
/// that outlives its response (a WebSocket session) takes it out.
#[derive(Debug, Clone, Default)]
pub struct PermitSlot(pub Arc<Mutex<Option<Permit>>>);

impl PermitSlot {
    pub fn take(&self) -> Option<Permit> {
        self.0.lock().take()
    }
}

/// Whether `method route` is long-lived work counted by [`Active`], and
/// whether it concerns one sandbox.
pub fn counted(method: &axum::http::Method, route: &str) -> Option<bool> {
    use axum::http::Method;
    match (method, route) {
        (&Method::POST, "/sandboxes/{id}/exec")
        | (&Method::GET, "/sandboxes/{id}/exec/ws")
        | (&Method::GET, "/sandboxes/{id}/execs/{exec_id}/stream")
        | (&Method::GET | &Method::POST | &Method::PUT, "/sandboxes/{id}/files")
        | (&Method::GET | &Method::PUT, "/sandboxes/{id}/archive") => Some(true),
        (&Method::GET, "/events") => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_sandbox_credential_and_tenant_and_release_on_drop() {
        let a = Active::new(&LimitsConfig {
            max_active_per_sandbox: 2,
            max_active_per_credential: 3,
            max_active_per_tenant: 4,
            ..LimitsConfig::default()
        });
        let p1 = a.try_acquire(Some("t/sb-1"), "k1", "t").expect("1");
        let _p2 = a.try_acquire(Some("t/sb-1"), "k1", "t").expect("2");
        assert_eq!(
            a.try_acquire(Some("t/sb-1"), "k2", "t")
                .expect_err("over the cap"),
            Cap::Sandbox(2)
        );
        let _p3 = a.try_acquire(Some("t/sb-2"), "k1", "t").expect("3");
        assert_eq!(
            a.try_acquire(Some("t/sb-3"), "k1", "t")
                .expect_err("over the cap"),
            Cap::Credential(3)
        );
        let _p4 = a.try_acquire(None, "k2", "t").expect("4");
        assert_eq!(
            a.try_acquire(None, "k3", "t").expect_err("over the cap"),
            Cap::Tenant(4)
        );
        let _other = a.try_acquire(None, "k3", "u").expect("other tenant");
        drop(p1);
        let _p5 = a.try_acquire(Some("t/sb-1"), "k2", "t").expect("released");
        drop((_p2, _p3, _p4, _other, _p5));
        assert_eq!(a.in_use(), 0);
        assert!(a.counts.lock().is_empty(), "no entries left behind");
        // 0 = unlimited.
        let a = Active::new(&LimitsConfig {
            max_active_per_sandbox: 0,
            max_active_per_credential: 0,
            max_active_per_tenant: 0,
            ..LimitsConfig::default()
        });
        let held: Vec<Permit> = (0..100)
            .map(|_| a.try_acquire(Some("t/x"), "k", "t").expect("free"))
            .collect();
        assert_eq!(held.len(), 100);
    }
}
