//! Per-operation success/failure counters and latency.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Counters for one (operation, provider) pair, in the contract's field order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OperationMetrics {
    pub operation: String,
    pub provider: String,
    pub success_total: u64,
    pub failure_total: u64,
    pub latency_count: u64,
    pub latency_total_ms: f64,
    pub latency_min_ms: f64,
    pub latency_max_ms: f64,
    pub latency_avg_ms: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub last_observed_unix: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

#[derive(Debug, Default)]
pub struct Metrics {
    ops: Mutex<BTreeMap<(String, String), OperationMetrics>>,
}

impl Metrics {
    pub fn observe(&self, operation: &str, provider: &str, took: Duration, error: Option<&str>) {
        let ms = took.as_secs_f64() * 1000.0;
        let Ok(mut ops) = self.ops.lock() else { return };
        let key = (operation.to_string(), provider.to_string());
        let m = ops.entry(key).or_insert_with(|| OperationMetrics {
            operation: operation.to_string(),
            provider: provider.to_string(),
            latency_min_ms: f64::MAX,
            ..OperationMetrics::default()
        });
        match error {
            None => m.success_total += 1,
            Some(e) => {
                m.failure_total += 1;
                m.last_error = e.chars().take(512).collect();
            }
        }
        m.latency_count += 1;
        m.latency_total_ms += ms;
        m.latency_min_ms = m.latency_min_ms.min(ms);
        m.latency_max_ms = m.latency_max_ms.max(ms);
        m.latency_avg_ms = m.latency_total_ms / m.latency_count as f64;
        m.last_observed_unix = chrono::Utc::now().timestamp();
    }

    /// Sorted by operation, then provider.
    pub fn snapshot(&self) -> Vec<OperationMetrics> {
        self.ops
            .lock()
            .map(|ops| ops.values().cloned().collect())
            .unwrap_or_default()
    }
}
