//! In-memory token buckets (`rate_limit.*`): capacity = burst (≤0 → rpm),
//! refill rpm/60 per second, keyed by the credential that authenticated
//! (and the owner it acts for), or the client address. Keys are stored
//! hashed (`<kind>:<sha256>`), never as presented. The table is bounded:
//! two generations of at most `max_buckets / 2` entries each; when the
//! current one is full the older one is dropped (an approximate LRU, O(1)
//! per request), so a flood of distinct keys cannot grow memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use stacyvm_core::config::RateLimitConfig;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Allowed { limit: u64, remaining: u64 },
    Limited { limit: u64, retry_after_secs: u64 },
}

/// Counters exposed in diagnostics and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub allowed_total: u64,
    pub limited_total: u64,
    pub evicted_total: u64,
    pub active_buckets: u64,
}

/// Two generations of buckets: lookups promote from `previous` to
/// `current`; a full `current` replaces `previous`.
#[derive(Debug, Default)]
struct Table {
    current: HashMap<String, Bucket>,
    previous: HashMap<String, Bucket>,
    last_cleanup: Option<Instant>,
}

impl Table {
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[derive(Debug)]
pub struct RateLimiter {
    enabled: bool,
    capacity: f64,
    per_sec: f64,
    key_by: String,
    ttl: Duration,
    cleanup_every: Duration,
    generation_cap: usize,
    buckets: Mutex<Table>,
    allowed: AtomicU64,
    limited: AtomicU64,
    evicted: AtomicU64,
}

impl RateLimiter {
    pub fn new(c: &RateLimitConfig) -> Self {
        let rpm = c.requests_per_minute.max(0);
        let burst = if c.burst > 0 { c.burst } else { rpm };
        #[allow(clippy::cast_precision_loss)]
        let (capacity, per_sec) = (burst as f64, rpm as f64 / 60.0);
        let ttl = if c.bucket_ttl.is_zero() {
            Duration::from_secs(600)
        } else {
            c.bucket_ttl.std()
        };
        let cleanup_every = if c.cleanup_interval.is_zero() {
            Duration::from_secs(60)
        } else {
            c.cleanup_interval.std()
        };
        RateLimiter {
            enabled: c.enabled && rpm > 0,
            capacity,
            per_sec,
            key_by: c.key_by.to_ascii_lowercase(),
            ttl,
            cleanup_every,
            generation_cap: generation_cap(c.max_buckets),
            buckets: Mutex::new(Table::default()),
            allowed: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// The limiter of failed authentication attempts: per client address
    /// (an IPv6 /64 counts as one address), `per_minute` a minute with the
    /// same burst, on whether or not `rate_limit.enabled`; 0 disables it.
    pub fn failed_auth(c: &RateLimitConfig) -> Self {
        let per_minute = c.failed_auth_per_minute.max(0);
        let mut l = RateLimiter::new(&RateLimitConfig {
            enabled: per_minute > 0,
            requests_per_minute: per_minute,
            burst: per_minute,
            key_by: "ip".into(),
            ..c.clone()
        });
        l.enabled = per_minute > 0;
        l
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The bucket key. `credential` names the credential that actually
    /// authenticated (`api-key`, `admin-key`, `oidc:<sub>`; "" when the
    /// server is open), never a header as presented. `owner` → the
    /// credential and the owner it acts for > the address; `api_key` →
    /// the credential > the address; `ip` → the address.
    pub fn key(&self, credential: &str, owner: &str, addr: &str) -> String {
        let (kind, value) = match self.key_by.as_str() {
            "owner" if !credential.is_empty() && !owner.is_empty() => {
                ("owner", format!("{credential}\0{owner}"))
            }
            "owner" | "api_key" if !credential.is_empty() => ("credential", credential.to_string()),
            _ => ("ip", network_of(addr)),
        };
        let h = Sha256::digest(format!("{kind}:{value}").as_bytes());
        format!("{kind}:{}", hex::encode(h))
    }

    pub fn check(&self, key: &str) -> Decision {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Decision {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let limit = self.capacity as u64;
        let mut g = self.buckets.lock();
        let t = &mut *g;
        let last = *t.last_cleanup.get_or_insert(now);
        if now.duration_since(last) >= self.cleanup_every {
            let before = t.len();
            t.current
                .retain(|_, b| now.duration_since(b.last) < self.ttl);
            t.previous
                .retain(|_, b| now.duration_since(b.last) < self.ttl);
            self.evicted
                .fetch_add((before - t.len()) as u64, Ordering::Relaxed);
            t.last_cleanup = Some(now);
        }
        if !t.current.contains_key(key) {
            let carried = t.previous.remove(key);
            if t.current.len() >= self.generation_cap {
                let dropped = std::mem::take(&mut t.current);
                let old = std::mem::replace(&mut t.previous, dropped);
                self.evicted.fetch_add(old.len() as u64, Ordering::Relaxed);
            }
            t.current.insert(
                key.to_string(),
                carried.unwrap_or(Bucket {
                    tokens: self.capacity,
                    last: now,
                }),
            );
        }
        let Some(b) = t.current.get_mut(key) else {
            return Decision::Allowed {
                limit,
                remaining: limit,
            };
        };
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.capacity);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            self.allowed.fetch_add(1, Ordering::Relaxed);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let remaining = b.tokens.floor() as u64;
            Decision::Allowed { limit, remaining }
        } else {
            self.limited.fetch_add(1, Ordering::Relaxed);
            let wait = (1.0 - b.tokens) / self.per_sec;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let retry_after_secs = (wait.ceil() as u64).max(1);
            Decision::Limited {
                limit,
                retry_after_secs,
            }
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            allowed_total: self.allowed.load(Ordering::Relaxed),
            limited_total: self.limited.load(Ordering::Relaxed),
            evicted_total: self.evicted.load(Ordering::Relaxed),
            active_buckets: self.buckets.lock().len() as u64,
        }
    }
}

/// Entries per generation for `max_buckets` (≤ 0 → 100 000 in total).
fn generation_cap(max_buckets: i64) -> usize {
    let total = if max_buckets > 0 {
        usize::try_from(max_buckets).unwrap_or(usize::MAX)
    } else {
        100_000
    };
    (total / 2).max(1)
}

/// The address a bucket is kept for: IPv4 as is, IPv6 by its /64 (one
/// host usually owns a whole /64).
fn network_of(addr: &str) -> String {
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(std::net::IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map_or_else(|| addr.to_string(), |v4| v4.to_string()),
        _ => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stacyvm_core::config::Dur;

    fn limiter(rpm: i64, burst: i64, key_by: &str) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig {
            enabled: true,
            requests_per_minute: rpm,
            burst,
            key_by: key_by.into(),
            bucket_ttl: Dur::secs(60),
            cleanup_interval: Dur::secs(1),
            max_buckets: 100_000,
            failed_auth_per_minute: 30,
        })
    }

    #[test]
    fn burst_then_refill_with_retry_after() {
        let l = limiter(60, 2, "ip");
        let t0 = Instant::now();
        assert_eq!(
            l.check_at("k", t0),
            Decision::Allowed {
                limit: 2,
                remaining: 1
            }
        );
        assert!(matches!(l.check_at("k", t0), Decision::Allowed { .. }));
        assert_eq!(
            l.check_at("k", t0),
            Decision::Limited {
                limit: 2,
                retry_after_secs: 1
            }
        );
        // Other keys have their own bucket.
        assert!(matches!(l.check_at("other", t0), Decision::Allowed { .. }));
        // One token per second at 60 rpm.
        assert!(matches!(
            l.check_at("k", t0 + Duration::from_millis(1001)),
            Decision::Allowed { .. }
        ));
        let s = l.stats();
        assert_eq!((s.allowed_total, s.limited_total), (4, 1));
        // Idle buckets are evicted.
        let later = t0 + Duration::from_secs(120);
        l.check_at("fresh", later);
        assert_eq!(l.stats().active_buckets, 1);
        assert_eq!(l.stats().evicted_total, 2);
    }

    #[test]
    fn keys_follow_key_by_and_are_hashed() {
        let l = limiter(60, 0, "owner");
        assert!(l.key("api-key", "alice", "1.2.3.4").starts_with("owner:"));
        assert!(l.key("api-key", "", "1.2.3.4").starts_with("credential:"));
        assert!(l.key("", "", "1.2.3.4").starts_with("ip:"));
        // An owner without a verified credential is not a key (open server).
        assert!(l.key("", "alice", "1.2.3.4").starts_with("ip:"));
        assert!(!l.key("api-key", "alice", "").contains("alice"));
        let l = limiter(60, 0, "ip");
        assert!(l.key("api-key", "alice", "1.2.3.4").starts_with("ip:"));
        // One IPv6 /64 is one address.
        assert_eq!(
            l.key("", "", "2001:db8:1:2::1"),
            l.key("", "", "2001:db8:1:2:ffff::9")
        );
        assert_ne!(
            l.key("", "", "2001:db8:1:2::1"),
            l.key("", "", "2001:db8:1:3::1")
        );
        let l = limiter(0, 0, "ip");
        assert!(!l.enabled());
    }

    #[test]
    fn a_million_distinct_keys_keep_the_table_bounded() {
        let mut c = RateLimitConfig {
            enabled: true,
            requests_per_minute: 60,
            burst: 1,
            key_by: "ip".into(),
            bucket_ttl: Dur::secs(3600),
            cleanup_interval: Dur::secs(3600),
            max_buckets: 1000,
            failed_auth_per_minute: 30,
        };
        let l = RateLimiter::new(&c);
        let t0 = Instant::now();
        for i in 0..1_000_000u32 {
            l.check_at(&format!("k{i}"), t0);
            assert!(l.buckets.lock().len() <= 1000);
        }
        let s = l.stats();
        assert!(s.active_buckets <= 1000, "{s:?}");
        assert!(s.evicted_total >= 998_000, "{s:?}");
        // A hot key survives the churn: it is promoted on every use.
        let l = RateLimiter::new(&c);
        assert!(matches!(l.check_at("hot", t0), Decision::Allowed { .. }));
        for i in 0..10_000u32 {
            l.check_at(&format!("k{i}"), t0);
            assert!(matches!(l.check_at("hot", t0), Decision::Limited { .. }));
        }
        c.max_buckets = 0;
        assert_eq!(generation_cap(c.max_buckets), 50_000);
    }

    #[test]
    fn failed_auth_limiter_is_on_without_rate_limit_enabled() {
        let mut c = RateLimitConfig::default();
        assert!(!c.enabled);
        let l = RateLimiter::failed_auth(&c);
        assert!(l.enabled());
        let t0 = Instant::now();
        let k = l.key("", "", "192.0.2.7");
        let allowed = (0..100)
            .filter(|_| matches!(l.check_at(&k, t0), Decision::Allowed { .. }))
            .count();
        assert_eq!(allowed, 30);
        c.failed_auth_per_minute = 0;
        assert!(!RateLimiter::failed_auth(&c).enabled());
    }
}
