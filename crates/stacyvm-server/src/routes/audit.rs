//! Audit export: `GET /admin/audit` (requests) and `GET /admin/op-audit`
//! (sandbox operations), JSON or CSV, with a real `since` time filter.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use stacyvm_core::store::{AdminAuditFilter, OpAuditFilter};

use crate::error::{ApiError, ApiResult};
use crate::json::json_response;
use crate::AppState;

/// `since` as RFC 3339 (`2026-01-02T03:04:05Z`) or a look-back duration
/// (`90m`, `24h`).
pub fn parse_since(s: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    match stacyvm_api::duration::parse(s) {
        Ok(nanos) if nanos >= 0 => Ok(Some(Utc::now() - chrono::Duration::nanoseconds(nanos))),
        _ => Err(ApiError::bad_request(format!(
            "since must be an RFC 3339 time or a duration like 24h, got {s:?}"
        ))),
    }
}

fn limit_of(q: &HashMap<String, String>) -> Result<i64, ApiError> {
    match q.get("limit").map(|s| s.trim()) {
        None | Some("") => Ok(100),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n > 0 => Ok(n.min(500)),
            _ => Err(ApiError::bad_request("limit must be a positive integer")),
        },
    }
}

fn q(q: &HashMap<String, String>, k: &str) -> String {
    q.get(k).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn wants_csv(q: &HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("format").map(|s| s.trim()) {
        None | Some("" | "json") => Ok(false),
        Some("csv") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "format must be json or csv, got {other:?}"
        ))),
    }
}

/// One CSV field (RFC 4180 quoting; a leading `=+-@` is prefixed with `'`
/// so spreadsheets do not evaluate it).
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn csv_response(filename: &str, header_row: &str, rows: Vec<Vec<String>>) -> Response {
    let mut out = String::from(header_row);
    out.push('\n');
    for r in rows {
        let line: Vec<String> = r.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    let mut resp = (StatusCode::OK, out).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

pub async fn admin_audit(
    State(st): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let f = AdminAuditFilter {
        actor: q(&query, "actor"),
        method: q(&query, "method").to_ascii_uppercase(),
        tenant_id: q(&query, "tenant_id"),
        since: parse_since(&q(&query, "since"))?,
        limit: limit_of(&query)?,
    };
    let csv = wants_csv(&query)?;
    let rows = st.manager.audit_trail().admin(f).await?;
    if !csv {
        return Ok(json_response(StatusCode::OK, &rows));
    }
    let body = rows
        .into_iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.created_at.to_rfc3339(),
                r.actor,
                r.method,
                r.path,
                r.status.to_string(),
                r.duration_ms.to_string(),
                r.request_id,
                r.remote_addr,
                r.user_agent,
                r.tenant_id,
            ]
        })
        .collect();
    Ok(csv_response(
        "stacyvm-admin-audit.csv",
        "id,created_at,actor,method,path,status,duration_ms,request_id,remote_addr,user_agent,tenant_id",
        body,
    ))
}

pub async fn op_audit(
    State(st): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let f = OpAuditFilter {
        actor: q(&query, "actor"),
        action: q(&query, "action"),
        sandbox_id: q(&query, "sandbox_id"),
        tenant_id: q(&query, "tenant_id"),
        since: parse_since(&q(&query, "since"))?,
        limit: limit_of(&query)?,
    };
    let csv = wants_csv(&query)?;
    let rows = st.manager.audit_trail().ops(f).await?;
    if !csv {
        return Ok(json_response(StatusCode::OK, &rows));
    }
    let body = rows
        .into_iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.created_at.to_rfc3339(),
                r.actor,
                r.action,
                r.sandbox_id,
                r.resource,
                r.provider,
                r.status,
                r.detail,
                r.tenant_id,
                r.request_id,
            ]
        })
        .collect();
    Ok(csv_response(
        "stacyvm-op-audit.csv",
        "id,created_at,actor,action,sandbox_id,resource,provider,status,detail,tenant_id,request_id",
        body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_times_and_durations() {
        let t = parse_since("2026-01-02T03:04:05Z")
            .expect("rfc3339")
            .expect("some");
        assert_eq!(t.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let d = parse_since("1h").expect("dur").expect("some");
        let age = Utc::now() - d;
        assert!(age.num_minutes() >= 59 && age.num_minutes() <= 61, "{age}");
        assert_eq!(parse_since("").expect("empty"), None);
        assert!(parse_since("/api/v1").is_err());
    }

    #[test]
    fn csv_quotes_and_defuses() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("plain"), "plain");
    }
}
