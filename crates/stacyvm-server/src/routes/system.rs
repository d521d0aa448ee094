//! Health probes, providers, events (SSE), metrics, diagnostics, host stats.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{json, Value};
use stacyvm_api::{
    GoDuration, HealthResponse, PoolStatus, ProviderDetail, ProviderHealth, ReadyResponse,
    SnapshotSummary,
};
use std::sync::Mutex;
use tokio_stream::wrappers::BroadcastStream;

use crate::error::ApiResult;
use crate::json::Json;
use crate::routes::Who;
use crate::{AppState, VERSION};

fn uptime(st: &AppState) -> GoDuration {
    // Whole milliseconds keep the text short, like `2h13m5.1s`.
    let ms = st.manager.uptime().as_millis() as i64;
    GoDuration(ms * 1_000_000)
}

pub async fn health(State(st): State<AppState>) -> Json<HealthResponse> {
    Json::ok(HealthResponse {
        status: "ok".into(),
        uptime: uptime(&st),
        version: VERSION.into(),
    })
}

pub async fn live(State(st): State<AppState>) -> Json<HealthResponse> {
    Json::ok(HealthResponse {
        status: "alive".into(),
        uptime: uptime(&st),
        version: VERSION.into(),
    })
}

pub async fn ready(State(st): State<AppState>) -> Response {
    let providers = st.manager.registry().health_all().await;
    let healthy = providers.iter().filter(|p| p.healthy).count() as i64;
    let store_ok = st.manager.store_health().await.0.is_ok();
    let ok = healthy > 0 && store_ok;
    let body = ReadyResponse {
        total_providers: providers.len() as i64,
        ready_providers: healthy,
        providers,
        status: if ok {
            "ready".into()
        } else {
            "not_ready".into()
        },
        uptime: uptime(&st),
        version: VERSION.into(),
    };
    Json(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
    .into_response()
}

/// Provider health; the error text of a failed check (which may name
/// sockets and paths) only for the admin and global operators (F-17).
pub async fn providers(
    State(st): State<AppState>,
    authed: crate::tenancy::Authed,
) -> Json<Vec<ProviderHealth>> {
    let mut all = st.manager.registry().health_all().await;
    if !authed.sees_server_wide() {
        for h in &mut all {
            if !h.error.is_empty() {
                h.error = "unhealthy".into();
            }
            h.runtime_count = None;
        }
    }
    Json::ok(all)
}

pub async fn providers_test(State(st): State<AppState>) -> Json<BTreeMap<String, bool>> {
    let all = st.manager.registry().health_all().await;
    Json::ok(all.into_iter().map(|h| (h.name, h.healthy)).collect())
}

/// One provider. Callers that may not see server-wide facts (F-17) get
/// neither its configuration (host paths, sockets, `DOCKER_HOST`) nor
/// the error text of its health check, and a count of only the sandboxes
/// they can see.
pub async fn provider(
    State(st): State<AppState>,
    authed: crate::tenancy::Authed,
    Path(name): Path<String>,
) -> ApiResult<Json<ProviderDetail>> {
    let wide = authed.sees_server_wide();
    let reg = st.manager.registry();
    let p = reg.get(&name).map_err(|e| {
        if name.is_empty() {
            e
        } else {
            stacyvm_core::Error::provider_not_found(&name)
        }
    })?;
    let mut health = reg.health_of(&p).await;
    let count = st
        .manager
        .cached()
        .iter()
        .filter(|r| r.provider == p.name() && (wide || authed.caller.sees(r)))
        .count() as i64;
    let config = if wide {
        p.describe()
    } else {
        health.error = if health.healthy {
            String::new()
        } else {
            "unhealthy".into()
        };
        health.runtime_count = None;
        BTreeMap::new()
    };
    Ok(Json::ok(ProviderDetail {
        name: p.name().to_string(),
        healthy: health.healthy,
        default: health.default,
        sandbox_count: count,
        health,
        config,
    }))
}

pub async fn pool_status(State(st): State<AppState>) -> Json<PoolStatus> {
    Json::ok(st.manager.pool_status())
}

/// Snapshots of sandboxes the caller sees (`source_sandbox_id` set), then
/// the restore points providers keep for their own spawns (a booted
/// guest per image and size: no user data).
pub async fn snapshots(
    State(st): State<AppState>,
    Who(who): Who,
) -> ApiResult<Json<Vec<SnapshotSummary>>> {
    let mut all = st.manager.list_snapshots(&who).await?;
    for p in st.manager.registry().all() {
        match p.snapshots().await {
            Ok(list) => all.extend(list),
            Err(e) => tracing::warn!(provider = p.name(), error = %e, "listing snapshots failed"),
        }
    }
    all.sort_by_key(|s| s.created_at);
    Ok(Json::ok(all))
}

/// `GET /snapshots/{id}`: a snapshot of a sandbox the caller sees.
pub async fn snapshot(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotSummary>> {
    let r = st.manager.get_snapshot(&id, &who).await?;
    Ok(Json::ok(stacyvm_core::manager::snapshot_summary(&r)))
}

/// `DELETE /snapshots/{id}`.
pub async fn delete_snapshot(
    State(st): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> ApiResult<Json<stacyvm_api::StatusResponse>> {
    st.manager.delete_snapshot(&id, &who).await?;
    Ok(Json::ok(stacyvm_api::StatusResponse::new("deleted")))
}

/// Server-sent events: `data: <json>\n\n` per event, flushed immediately.
/// SSE of orchestrator events. A caller only sees events of sandboxes it
/// can see (its tenant's, or its own when owner-scoped; only the admin
/// without a tenant sees all), so exec command lines never reach another
/// tenant or owner. Ids are remembered so the final `sandbox.destroyed`
/// still arrives after the record left the cache.
pub async fn events(State(st): State<AppState>, Who(who): Who) -> Response {
    let rx = st.manager.events().subscribe();
    let all = who.sees_all_tenants();
    let mine: std::sync::Arc<Mutex<std::collections::HashSet<String>>> = std::sync::Arc::default();
    if !all {
        if let Ok(mut m) = mine.lock() {
            for r in st.manager.cached() {
                if who.sees(&r) {
                    m.insert(r.id.clone());
                }
            }
        }
    }
    let manager = st.manager.clone();
    let who = std::sync::Arc::new(who);
    let stream = BroadcastStream::new(rx).filter_map(move |ev| {
        let (who, mine, manager) = (who.clone(), mine.clone(), manager.clone());
        async move {
            // Lagged subscribers skip what they missed.
            let ev = ev.ok()?;
            if !all {
                let mut m = mine.lock().ok()?;
                if !m.contains(&ev.sandbox_id) {
                    let visible = !ev.sandbox_id.is_empty()
                        && manager
                            .cached()
                            .iter()
                            .any(|r| r.id == ev.sandbox_id && who.sees(r));
                    if !visible {
                        return None;
                    }
                    m.insert(ev.sandbox_id.clone());
                }
            }
            let mut s = String::from("data: ");
            s.push_str(&serde_json::to_string(&ev).ok()?);
            s.push_str("\n\n");
            Some(Ok::<Bytes, Infallible>(Bytes::from(s)))
        }
    });
    // A comment line first so proxies and clients see the stream open.
    let opening = futures::stream::once(async {
        Ok::<Bytes, Infallible>(Bytes::from_static(b": stream open\n\n"))
    });
    let mut resp = Response::new(Body::from_stream(opening.chain(stream)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn limits(st: &AppState) -> Value {
    let d = &st.cfg.defaults;
    json!({
        "max_sandboxes": d.max_sandboxes,
        "max_sandboxes_per_owner": d.max_sandboxes_per_owner,
        "default_exec_timeout": d.default_exec_timeout.0,
        "max_exec_timeout": d.max_exec_timeout.0,
        "max_ttl": d.max_ttl.0,
        "spawn_overflow": d.spawn_overflow,
        "spawn_queue_timeout": d.spawn_queue_timeout.0,
        "max_spawn_queue": d.max_spawn_queue,
    })
}

struct Summary {
    by_state: BTreeMap<String, i64>,
    by_provider: BTreeMap<String, i64>,
    by_worker: BTreeMap<String, i64>,
    total: i64,
    active: i64,
}

async fn sandbox_summary(st: &AppState) -> ApiResult<Summary> {
    let mut recs = st.manager.active_records().await?;
    // Pool hosts are the server's runtimes, not sandboxes (see
    // `stacyvm_pool_hosts`).
    recs.retain(|r| !r.is_pool_host());
    let mut s = Summary {
        by_state: BTreeMap::new(),
        by_provider: BTreeMap::new(),
        by_worker: BTreeMap::new(),
        total: recs.len() as i64,
        active: 0,
    };
    for r in &recs {
        *s.by_state.entry(r.state.clone()).or_default() += 1;
        *s.by_provider.entry(r.provider.clone()).or_default() += 1;
        let w = if r.worker_id.is_empty() {
            "local".to_string()
        } else {
            r.worker_id.clone()
        };
        *s.by_worker.entry(w).or_default() += 1;
        if r.state == "running" {
            s.active += 1;
        }
    }
    Ok(s)
}

fn scheduler(st: &AppState) -> Value {
    let q = &st.manager.queue;
    use std::sync::atomic::Ordering::Relaxed;
    let count = q.wait_count.load(Relaxed);
    let total = q.wait_total_ms.load(Relaxed);
    let max = q.wait_max_ms.load(Relaxed);
    let avg = total.checked_div(count).unwrap_or(0);
    let d = |ms: u64| GoDuration((ms as i64) * 1_000_000).to_string();
    json!({
        "spawn_overflow": st.cfg.defaults.spawn_overflow,
        "spawn_queue_depth": q.depth.load(Relaxed),
        "max_spawn_queue": st.cfg.defaults.max_spawn_queue,
        "spawn_queue_timeout": st.cfg.defaults.spawn_queue_timeout.0,
        "admission_control": "in_memory_reservation",
        "worker_id": "local",
        "spawn_queued_total": q.queued_total.load(Relaxed),
        "spawn_dequeued_total": q.dequeued_total.load(Relaxed),
        "spawn_queue_timeouts": q.timeouts.load(Relaxed),
        "spawn_queue_wait_count": count,
        "spawn_queue_wait_total": d(total),
        "spawn_queue_wait_max": d(max),
        "spawn_queue_wait_avg": d(avg),
        "spawn_queue_wait_total_ms": total,
        "spawn_queue_wait_max_ms": max,
        "spawn_queue_wait_avg_ms": avg,
    })
}

fn process_memory() -> (u64, u64) {
    // (resident bytes, virtual bytes) from /proc/self/statm.
    let page = 4096u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
            let size = it.next()?;
            let rss = it.next()?;
            Some((rss * page, size * page))
        })
        .unwrap_or((0, 0))
}

fn thread_count() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn quota_counts(st: &AppState) -> ApiResult<Value> {
    let qs = st.manager.quotas().list().await?;
    Ok(json!({
        "total": qs.len(),
        "with_max_sandboxes": qs.iter().filter(|q| q.max_sandboxes > 0).count(),
        "with_max_ttl": qs.iter().filter(|q| q.max_ttl_seconds > 0).count(),
        "with_max_exec_timeout": qs.iter().filter(|q| q.max_exec_timeout_seconds > 0).count(),
    }))
}

async fn leases(st: &AppState) -> ApiResult<Value> {
    let ls = st.manager.leases().await?;
    let now = Utc::now();
    let mut by_holder: BTreeMap<String, i64> = BTreeMap::new();
    let mut active = 0;
    for l in &ls {
        if l.expires_at > now {
            active += 1;
            *by_holder.entry(l.holder_id.clone()).or_default() += 1;
        }
    }
    Ok(
        json!({"active": active, "by_holder": by_holder, "expired": ls.len() as i64 - active, "total": ls.len()}),
    )
}

fn rate_limit_stats(st: &AppState) -> Value {
    let r = &st.cfg.rate_limit;
    let s = st.ratelimit.stats();
    json!({
        "enabled": r.enabled, "requests_per_minute": if r.enabled { r.requests_per_minute } else { 0 },
        "burst": if r.enabled { r.burst } else { 0 }, "key_by": if r.enabled { r.key_by.as_str() } else { "" },
        "active_buckets": s.active_buckets, "allowed_total": s.allowed_total,
        "limited_total": s.limited_total, "evicted_total": s.evicted_total,
        "bucket_ttl": if r.enabled { r.bucket_ttl.0 } else { GoDuration::ZERO },
        "cleanup_interval": if r.enabled { r.cleanup_interval.0 } else { GoDuration::ZERO },
    })
}

fn workers_summary() -> Value {
    json!({"items": [], "online": 1, "stale": 0, "total": 1, "unhealthy": 0})
}

pub async fn metrics(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let providers = st.manager.registry().health_all().await;
    let s = sandbox_summary(&st).await?;
    let bus = st.manager.events().stats();
    let (rss, _vsz) = process_memory();
    Ok(Json::ok(json!({
        "events": {"subscribers": bus.subscribers, "history_size": bus.history_size, "events_total": bus.events_total},
        "gc_cycles": 0,
        "goroutines": thread_count(),
        "leases": leases(&st).await?,
        "memory_alloc": rss,
        "memory_heap_alloc": rss,
        "memory_sys": rss,
        "operations": st.manager.metrics().snapshot(),
        "providers": {"healthy": providers.iter().filter(|p| p.healthy).count(), "items": providers, "total": st.manager.registry().names().len()},
        "quotas": quota_counts(&st).await?,
        "rate_limit": rate_limit_stats(&st),
        "sandboxes": {"active": s.active, "by_provider": s.by_provider, "by_state": s.by_state, "by_worker": s.by_worker, "total": s.total},
        "scheduler": scheduler(&st),
        "uptime": uptime(&st),
        "workers": workers_summary(),
    })))
}

pub async fn diagnostics(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let providers = st.manager.registry().health_all().await;
    let s = sandbox_summary(&st).await?;
    let bus = st.manager.events().stats();
    let t0 = Instant::now();
    let store = match st.manager.store_health().await {
        (Ok(()), engine) => {
            json!({"healthy": true, "latency_ms": t0.elapsed().as_millis() as i64, "engine": engine})
        }
        (Err(e), engine) => {
            json!({"error": e.to_string(), "healthy": false, "latency_ms": t0.elapsed().as_millis() as i64, "engine": engine})
        }
    };
    let (rss, vsz) = process_memory();
    let doc = |p: &str| format!("docs/{p}");
    Ok(Json::ok(json!({
        // Key names follow the original server's (Go) diagnostics so existing
        // dashboards keep working; values describe this process.
        "build": {"goarch": go_arch(), "goos": std::env::consts::OS, "version": VERSION},
        "events": {"subscribers": bus.subscribers, "history_size": bus.history_size, "events_total": bus.events_total},
        "generated_at": Utc::now(),
        "leases": leases(&st).await?,
        "limits": limits(&st),
        "operations": st.manager.metrics().snapshot(),
        "process": {
            "goroutines": thread_count(),
            "memory": {"alloc": rss, "gc_cycles": 0, "heap_alloc": rss, "sys": vsz},
            "uptime": uptime(&st),
        },
        "providers": providers,
        "quotas": quota_counts(&st).await?,
        "rate_limit": rate_limit_stats(&st),
        "redactions": ["provider secrets", "registry credentials", "environment secrets", "API keys"],
        "remediation": {
            "admin_control_plane": doc("operations.md"), "deployment": doc("operations.md"),
            "production_readiness": doc("operations.md"), "public_support_matrix": doc("providers.md"),
            "release_verification": doc("operations.md"), "runtime_certification": doc("providers.md"),
            "runtime_conformance": doc("providers.md"), "security_governance": doc("security.md"),
            "support_bundle": doc("operations.md"), "upgrade_and_rollback": doc("operations.md"),
        },
        "sandboxes": {"active": s.active, "by_provider": s.by_provider, "by_state": s.by_state, "by_worker": s.by_worker, "total": s.total},
        "scheduler": scheduler(&st),
        "store": store,
        "workers": workers_summary(),
    })))
}

/// The architecture under Go's name (`amd64`, `arm64`).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn esc(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// Prometheus text exposition (api.md §15), with counters typed as counters.
pub async fn prometheus(State(st): State<AppState>) -> ApiResult<Response> {
    let providers = st.manager.registry().health_all().await;
    let s = sandbox_summary(&st).await?;
    let bus = st.manager.events().stats();
    let mut out = String::new();
    let fam = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    fam(
        &mut out,
        "stacyvm_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
    );
    let _ = writeln!(
        out,
        "stacyvm_uptime_seconds {}",
        st.manager.uptime().as_secs_f64()
    );
    fam(
        &mut out,
        "stacyvm_runtime_goroutines",
        "gauge",
        "OS threads of the server process.",
    );
    let _ = writeln!(out, "stacyvm_runtime_goroutines {}", thread_count());
    let (rss, vsz) = process_memory();
    fam(
        &mut out,
        "stacyvm_runtime_memory_alloc_bytes",
        "gauge",
        "Resident memory of the server process.",
    );
    let _ = writeln!(out, "stacyvm_runtime_memory_alloc_bytes {rss}");
    fam(
        &mut out,
        "stacyvm_runtime_memory_sys_bytes",
        "gauge",
        "Virtual memory of the server process.",
    );
    let _ = writeln!(out, "stacyvm_runtime_memory_sys_bytes {vsz}");
    fam(
        &mut out,
        "stacyvm_runtime_gc_cycles_total",
        "counter",
        "Always 0: no garbage collector.",
    );
    let _ = writeln!(out, "stacyvm_runtime_gc_cycles_total 0");
    fam(
        &mut out,
        "stacyvm_sandboxes_total",
        "gauge",
        "Live sandboxes by state.",
    );
    for (k, v) in &s.by_state {
        let _ = writeln!(out, "stacyvm_sandboxes_total{{state={}}} {v}", esc(k));
    }
    if st.manager.config().pool.enabled {
        let (hosts, users, queued, claims, spawned) = st.manager.pool_counters();
        for (name, kind, help, v) in [
            (
                "stacyvm_pool_hosts",
                "gauge",
                "Pool hosts (pool mode) running.",
                hosts as u64,
            ),
            (
                "stacyvm_pool_sandboxes",
                "gauge",
                "Pooled sandboxes in pool hosts.",
                users as u64,
            ),
            (
                "stacyvm_pool_queued",
                "gauge",
                "Spawns waiting for a pool slot (pool.overflow: queue).",
                queued as u64,
            ),
            (
                "stacyvm_pool_claims_total",
                "counter",
                "Pooled sandboxes spawned.",
                claims,
            ),
            (
                "stacyvm_pool_hosts_spawned_total",
                "counter",
                "Pool hosts spawned.",
                spawned,
            ),
        ] {
            fam(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
    }
    let pools = st.manager.pool_stats();
    if !pools.is_empty() {
        for (name, kind, help) in [
            (
                "stacyvm_template_pool_target",
                "gauge",
                "Sandboxes a template's warm pool keeps (pool_size).",
            ),
            (
                "stacyvm_template_pool_ready",
                "gauge",
                "Set-up sandboxes waiting in a template's warm pool.",
            ),
            (
                "stacyvm_template_pool_hits_total",
                "counter",
                "Spawns served from a template's warm pool.",
            ),
            (
                "stacyvm_template_pool_misses_total",
                "counter",
                "Spawns from a pooled template that found the pool empty.",
            ),
            (
                "stacyvm_template_pool_failures_total",
                "counter",
                "Warm-pool sandboxes whose spawn or setup failed.",
            ),
        ] {
            fam(&mut out, name, kind, help);
            for (t, p) in &pools {
                let v = match name {
                    "stacyvm_template_pool_target" => p.target as f64,
                    "stacyvm_template_pool_ready" => p.ready as f64,
                    "stacyvm_template_pool_hits_total" => p.hits as f64,
                    "stacyvm_template_pool_misses_total" => p.misses as f64,
                    _ => p.failures as f64,
                };
                let _ = writeln!(out, "{name}{{template={}}} {v}", esc(t));
            }
        }
    }
    fam(
        &mut out,
        "stacyvm_sandboxes_by_provider_total",
        "gauge",
        "Live sandboxes by provider.",
    );
    for (k, v) in &s.by_provider {
        let _ = writeln!(
            out,
            "stacyvm_sandboxes_by_provider_total{{provider={}}} {v}",
            esc(k)
        );
    }
    fam(
        &mut out,
        "stacyvm_sandboxes_by_worker_total",
        "gauge",
        "Live sandboxes by worker.",
    );
    for (k, v) in &s.by_worker {
        let _ = writeln!(
            out,
            "stacyvm_sandboxes_by_worker_total{{worker={}}} {v}",
            esc(k)
        );
    }
    fam(
        &mut out,
        "stacyvm_provider_healthy",
        "gauge",
        "1 when the provider's health probe passes.",
    );
    for p in &providers {
        let _ = writeln!(
            out,
            "stacyvm_provider_healthy{{provider={},default=\"{}\"}} {}",
            esc(&p.name),
            p.default,
            u8::from(p.healthy)
        );
    }
    fam(
        &mut out,
        "stacyvm_provider_health_latency_milliseconds",
        "gauge",
        "Latency of the last health probe.",
    );
    for p in &providers {
        let _ = writeln!(
            out,
            "stacyvm_provider_health_latency_milliseconds{{provider={}}} {}",
            esc(&p.name),
            p.latency_ms
        );
    }
    fam(
        &mut out,
        "stacyvm_provider_runtime_sandboxes",
        "gauge",
        "Runtimes reported by provider inventory.",
    );
    for p in &providers {
        if let Some(n) = p.runtime_count {
            let _ = writeln!(
                out,
                "stacyvm_provider_runtime_sandboxes{{provider={}}} {n}",
                esc(&p.name)
            );
        }
    }
    fam(
        &mut out,
        "stacyvm_events_total",
        "counter",
        "Events published.",
    );
    let _ = writeln!(out, "stacyvm_events_total {}", bus.events_total);
    fam(
        &mut out,
        "stacyvm_event_subscribers",
        "gauge",
        "Connected event subscribers.",
    );
    let _ = writeln!(out, "stacyvm_event_subscribers {}", bus.subscribers);
    fam(
        &mut out,
        "stacyvm_event_history_size",
        "gauge",
        "Events in the in-memory history.",
    );
    let _ = writeln!(out, "stacyvm_event_history_size {}", bus.history_size);
    use std::sync::atomic::Ordering::Relaxed;
    let q = &st.manager.queue;
    for (name, kind, help, v) in [
        (
            "stacyvm_spawn_queue_depth",
            "gauge",
            "Spawns waiting for capacity.",
            q.depth.load(Relaxed) as u64,
        ),
        (
            "stacyvm_spawn_queue_capacity",
            "gauge",
            "Maximum queued spawns.",
            st.cfg.defaults.max_spawn_queue.max(0) as u64,
        ),
        (
            "stacyvm_spawn_queue_enqueued_total",
            "counter",
            "Spawns that had to queue.",
            q.queued_total.load(Relaxed),
        ),
        (
            "stacyvm_spawn_queue_dequeued_total",
            "counter",
            "Queued spawns admitted.",
            q.dequeued_total.load(Relaxed),
        ),
        (
            "stacyvm_spawn_queue_timeout_total",
            "counter",
            "Queued spawns that timed out.",
            q.timeouts.load(Relaxed),
        ),
        (
            "stacyvm_spawn_queue_wait_milliseconds_sum",
            "counter",
            "Total queue wait.",
            q.wait_total_ms.load(Relaxed),
        ),
        (
            "stacyvm_spawn_queue_wait_milliseconds_count",
            "counter",
            "Queue waits observed.",
            q.wait_count.load(Relaxed),
        ),
        (
            "stacyvm_spawn_queue_wait_milliseconds_max",
            "gauge",
            "Longest queue wait.",
            q.wait_max_ms.load(Relaxed),
        ),
    ] {
        fam(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    let quotas = st.manager.quotas().list().await?;
    fam(
        &mut out,
        "stacyvm_owner_quotas_total",
        "gauge",
        "Configured owner quotas.",
    );
    let _ = writeln!(out, "stacyvm_owner_quotas_total {}", quotas.len());
    fam(
        &mut out,
        "stacyvm_owner_quota_overrides_total",
        "gauge",
        "Owner quotas overriding each limit.",
    );
    for (t, n) in [
        (
            "max_sandboxes",
            quotas.iter().filter(|q| q.max_sandboxes > 0).count(),
        ),
        (
            "max_ttl",
            quotas.iter().filter(|q| q.max_ttl_seconds > 0).count(),
        ),
        (
            "max_exec_timeout",
            quotas
                .iter()
                .filter(|q| q.max_exec_timeout_seconds > 0)
                .count(),
        ),
    ] {
        let _ = writeln!(
            out,
            "stacyvm_owner_quota_overrides_total{{type=\"{t}\"}} {n}"
        );
    }
    let rl = st.ratelimit.stats();
    for (name, kind, help, v) in [
        (
            "stacyvm_rate_limit_allowed_total",
            "counter",
            "Requests allowed by the rate limiter.",
            rl.allowed_total,
        ),
        (
            "stacyvm_rate_limit_blocked_total",
            "counter",
            "Requests rejected by the rate limiter.",
            rl.limited_total,
        ),
        (
            "stacyvm_rate_limit_evicted_buckets_total",
            "counter",
            "Idle rate-limit buckets evicted.",
            rl.evicted_total,
        ),
        (
            "stacyvm_rate_limit_active_buckets",
            "gauge",
            "Active rate-limit buckets.",
            rl.active_buckets,
        ),
    ] {
        fam(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    let ops = st.manager.metrics().snapshot();
    let groups: [(&str, &str, &str); 5] = [
        (
            "stacyvm_operation_success_total",
            "counter",
            "Successful operations.",
        ),
        (
            "stacyvm_operation_failure_total",
            "counter",
            "Failed operations.",
        ),
        (
            "stacyvm_operation_latency_milliseconds_sum",
            "counter",
            "Total operation latency.",
        ),
        (
            "stacyvm_operation_latency_milliseconds_count",
            "counter",
            "Operations timed.",
        ),
        (
            "stacyvm_operation_latency_milliseconds_max",
            "gauge",
            "Slowest operation.",
        ),
    ];
    for (i, (name, kind, help)) in groups.iter().enumerate() {
        fam(&mut out, name, kind, help);
        for o in &ops {
            let v = match i {
                0 => o.success_total as f64,
                1 => o.failure_total as f64,
                2 => o.latency_total_ms,
                3 => o.latency_count as f64,
                _ => o.latency_max_ms,
            };
            let _ = writeln!(
                out,
                "{name}{{operation={},provider={}}} {v}",
                esc(&o.operation),
                esc(&o.provider)
            );
        }
    }
    let mut resp = Response::new(Body::from(out));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

/// Host CPU/memory/disk/network sampler; deltas between calls.
#[derive(Debug, Default)]
pub struct SystemSampler {
    last: Mutex<Option<Sample>>,
}

/// (taken at, cpu total, cpu idle, rx bytes, tx bytes)
type Sample = (Instant, u64, u64, u64, u64);

fn cpu_times() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total, idle)
}

fn net_bytes() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let mut rx = 0;
    let mut tx = 0;
    for l in s.lines().skip(2) {
        let Some((name, rest)) = l.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        rx += v.first().copied().unwrap_or(0);
        tx += v.get(8).copied().unwrap_or(0);
    }
    (rx, tx)
}

fn mem_pct() -> f64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let total = get("MemTotal:");
    if total == 0.0 {
        0.0
    } else {
        (total - get("MemAvailable:")) / total * 100.0
    }
}

fn disk_pct(path: &str) -> f64 {
    match nix_statvfs(path) {
        Some((total, avail)) if total > 0 => (total - avail) as f64 / total as f64 * 100.0,
        _ => 0.0,
    }
}

fn nix_statvfs(path: &str) -> Option<(u64, u64)> {
    let v = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = v.fragment_size();
    Some((v.blocks() * frag, v.blocks_available() * frag))
}

pub async fn system_stats(State(st): State<AppState>) -> Json<Value> {
    let (total, idle) = cpu_times();
    let (rx, tx) = net_bytes();
    let now = Instant::now();
    let mut cpu_pct = 0.0;
    let mut rx_bps = 0.0;
    let mut tx_bps = 0.0;
    if let Ok(mut last) = st.system.last.lock() {
        if let Some((t, lt, li, lrx, ltx)) = *last {
            let dt = now.duration_since(t).as_secs_f64().max(1e-3);
            let dtotal = total.saturating_sub(lt) as f64;
            if dtotal > 0.0 {
                cpu_pct = (1.0 - idle.saturating_sub(li) as f64 / dtotal) * 100.0;
            }
            rx_bps = rx.saturating_sub(lrx) as f64 / dt;
            tx_bps = tx.saturating_sub(ltx) as f64 / dt;
        }
        *last = Some((now, total, idle, rx, tx));
    }
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    Json::ok(json!({
        "cpu_pct": cpu_pct, "mem_pct": mem_pct(), "disk_pct": disk_pct(&st.cfg.server.data_dir),
        "net_rx_bps": rx_bps, "net_tx_bps": tx_bps, "load1": load1,
    }))
}
