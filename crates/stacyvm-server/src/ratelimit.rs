//! In-memory token buckets (`rate_limit.*`): capacity = burst (≤0 → rpm),
//! refill rpm/60 per second, keyed by owner, API key or client address.
//! Keys are stored hashed (`<kind>:<sha256>`), never as presented.

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

#[derive(Debug)]
pub struct RateLimiter {
    enabled: bool,
    capacity: f64,
    per_sec: f64,
    key_by: String,
    ttl: Duration,
    cleanup_every: Duration,
    buckets: Mutex<(HashMap<String, Bucket>, Instant)>,
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
            buckets: Mutex::new((HashMap::new(), Instant::now())),
            allowed: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The bucket key: `owner` → verified owner > API key > address;
    /// `api_key` → API key > address; `ip` → address.
    pub fn key(&self, owner: &str, api_key: &str, addr: &str) -> String {
        let (kind, value) = match self.key_by.as_str() {
            "owner" if !owner.is_empty() => ("owner", owner),
            "owner" | "api_key" if !api_key.is_empty() => ("api_key", api_key),
            _ => ("ip", addr),
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
        let (map, last_cleanup) = &mut *g;
        if now.duration_since(*last_cleanup) >= self.cleanup_every {
            let before = map.len();
            map.retain(|_, b| now.duration_since(b.last) < self.ttl);
            self.evicted
                .fetch_add((before - map.len()) as u64, Ordering::Relaxed);
            *last_cleanup = now;
        }
        let b = map.entry(key.to_string()).or_insert(Bucket {
            tokens: self.capacity,
            last: now,
        });
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
            active_buckets: self.buckets.lock().0.len() as u64,
        }
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
        assert!(l.key("alice", "k", "1.2.3.4").starts_with("owner:"));
        assert!(l.key("", "k", "1.2.3.4").starts_with("api_key:"));
        assert!(l.key("", "", "1.2.3.4").starts_with("ip:"));
        assert!(!l.key("alice", "", "").contains("alice"));
        let l = limiter(60, 0, "ip");
        assert!(l.key("alice", "k", "1.2.3.4").starts_with("ip:"));
        let l = limiter(0, 0, "ip");
        assert!(!l.enabled());
    }
}
