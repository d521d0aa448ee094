//! The OpenAPI 3.1 document of `/api/v1`, generated from the route table
//! ([`crate::routes::table`], which also builds the router) and the wire
//! types' JSON Schemas (`schemars`): a route cannot be served without
//! being documented, and a schema cannot drift from its type.
//!
//! Served at `GET /api/v1/openapi.json` and, as a page, `GET /api/v1/docs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::auth::ROUTE_PERMISSIONS;

/// Emits the schema of a type (as a reference into `components`).
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T`.
pub fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// A request body.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    /// JSON of this schema.
    Json(SchemaFn),
    /// JSON of this schema, and the body may be left out.
    OptionalJson(SchemaFn),
    /// Raw bytes of this content type.
    Raw(&'static str),
}

/// A success response.
#[derive(Clone, Copy)]
pub enum Reply {
    /// `200` with JSON of this schema.
    Json(SchemaFn),
    /// `200` with a JSON object this document does not pin down.
    Object,
    /// `200` with this content type and description.
    Other(&'static str, &'static str),
    /// A JSON reply, or with `stream: true` an NDJSON stream (exec).
    JsonOrNdjson(SchemaFn),
    /// `101` WebSocket upgrade.
    WebSocket,
}

/// The documentation of one operation.
#[derive(Clone, Copy)]
pub struct Doc {
    pub tag: &'static str,
    pub summary: &'static str,
    pub body: Body,
    /// Query parameters: the properties of this schema.
    pub query: Option<SchemaFn>,
    pub reply: Reply,
}

impl Doc {
    pub const fn new(tag: &'static str, summary: &'static str, reply: Reply) -> Self {
        Doc {
            tag,
            summary,
            body: Body::None,
            query: None,
            reply,
        }
    }

    pub const fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    pub const fn query(mut self, q: SchemaFn) -> Self {
        self.query = Some(q);
        self
    }
}

/// One operation: method (upper case), route pattern under `/api/v1`,
/// documentation.
#[derive(Clone, Copy)]
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub doc: Doc,
}

fn generator() -> SchemaGenerator {
    let mut s = SchemaSettings::draft2020_12();
    s.definitions_path = "#/components/schemas/".into();
    s.meta_schema = None;
    SchemaGenerator::new(s)
}

fn path_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

/// Query parameters from the properties of an object schema.
fn query_params(g: &mut SchemaGenerator, f: SchemaFn) -> Vec<Value> {
    let s = f(g);
    // Query types are inlined objects, or references to one (which
    // then leaves `components`: it is no body anyone sends).
    let obj = match s
        .as_object()
        .and_then(|o| o.get("$ref"))
        .and_then(Value::as_str)
    {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap_or_default().to_string();
            g.definitions_mut().remove(&name).unwrap_or(Value::Null)
        }
        None => s.to_value(),
    };
    let required: Vec<String> = obj["required"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let Some(props) = obj["properties"].as_object() else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, schema)| {
            let mut schema = schema.clone();
            // A query parameter is present or not; never null.
            if let Some(types) = schema.get_mut("type").and_then(Value::as_array_mut) {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    schema["type"] = types[0].clone();
                }
            }
            let description = schema
                .as_object_mut()
                .and_then(|o| o.remove("description"))
                .unwrap_or(Value::Null);
            let mut p = json!({
                "name": name,
                "in": "query",
                "required": required.contains(name),
                "schema": schema,
            });
            if !description.is_null() {
                p["description"] = description;
            }
            p
        })
        .collect()
}

fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_ascii_lowercase();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        id.push('_');
        let seg = seg.trim_start_matches('{').trim_end_matches('}');
        id.extend(
            seg.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
        );
    }
    id
}

/// The OpenAPI 3.1 document of `ops`.
pub fn document(ops: &[Op]) -> Value {
    let mut g = generator();
    let error = schema::<stacyvm_api::ErrorBody>(&mut g);
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for op in ops {
        let perm = ROUTE_PERMISSIONS
            .iter()
            .find(|p| p.method == op.method && p.path == op.path)
            .map(|p| p.perm);
        let mut params: Vec<Value> = path_params(op.path)
            .into_iter()
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if let Some(q) = op.doc.query {
            params.extend(query_params(&mut g, q));
        }
        let mut o = json!({
            "operationId": operation_id(op.method, op.path),
            "tags": [op.doc.tag],
            "summary": op.doc.summary,
            "responses": {
                "default": {
                    "description": "An error: `code` and `message`, with the status of its kind (docs/api.md, \"Errors\").",
                    "content": {"application/json": {"schema": error.clone()}},
                },
            },
        });
        if !params.is_empty() {
            o["parameters"] = Value::Array(params);
        }
        match op.doc.body {
            Body::None => {}
            Body::Json(f) | Body::OptionalJson(f) => {
                o["requestBody"] = json!({
                    "required": matches!(op.doc.body, Body::Json(_)),
                    "content": {"application/json": {"schema": f(&mut g)}},
                });
            }
            Body::Raw(ctype) => {
                o["requestBody"] = json!({
                    "required": true,
                    "content": {ctype: {"schema": {"type": "string", "contentMediaType": ctype}}},
                });
            }
        }
        let ok = match op.doc.reply {
            Reply::Json(f) => (
                "200",
                json!({
                    "description": "OK",
                    "content": {"application/json": {"schema": f(&mut g)}},
                }),
            ),
            Reply::Object => (
                "200",
                json!({
                    "description": "OK",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }),
            ),
            Reply::Other(ctype, what) => (
                "200",
                json!({
                    "description": what,
                    "content": {ctype: {"schema": {"type": "string"}}},
                }),
            ),
            Reply::JsonOrNdjson(f) => (
                "200",
                json!({
                    "description": "The finished command; with `stream: true`, one JSON object per output chunk (NDJSON).",
                    "content": {
                        "application/json": {"schema": f(&mut g)},
                        "application/x-ndjson": {"schema": {"type": "string"}},
                    },
                }),
            ),
            Reply::WebSocket => (
                "101",
                json!({
                    "description": "WebSocket upgrade; messages as described in docs/api.md, \"Exec\".",
                }),
            ),
        };
        o["responses"][ok.0] = ok.1;
        match perm.and_then(|p| p.scope()) {
            None => o["security"] = json!([]),
            Some((_, scope)) => {
                o["x-stacyvm-permission"] = json!(scope);
                o["description"] = json!(format!("Needs `{scope}`."));
            }
        }
        paths
            .entry(format!("/api/v1{}", op.path))
            .or_default()
            .insert(op.method.to_ascii_lowercase(), o);
    }
    // Tags in order of first use.
    let mut tags: Vec<&str> = Vec::new();
    for o in ops {
        if !tags.contains(&o.doc.tag) {
            tags.push(o.doc.tag);
        }
    }
    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "StacyVM API",
            "version": crate::VERSION,
            "description": "Disposable sandboxes: spawn, exec, files, templates, quotas, tenants and audit. Reference: docs/api.md. Credentials: `X-API-Key` (an API key) or `Authorization: Bearer` (an API key or an OIDC token).",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}, {"bearer": []}],
        "tags": tags.iter().map(|t| json!({"name": t})).collect::<Vec<_>>(),
        "paths": paths,
        "components": {
            "schemas": g.take_definitions(true),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained page listing every operation (no scripts, no
/// external assets), linking the JSON document.
pub fn page(doc: &Value) -> String {
    let mut h = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>StacyVM API</title>\
         <style>body{font:15px system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}\
         code,pre{font:13px ui-monospace,monospace}pre{background:#f4f4f4;padding:.5rem;overflow:auto}\
         .m{display:inline-block;min-width:4.5rem;font-weight:bold}details{margin:.3rem 0}</style></head><body>",
    );
    let _ = write!(
        h,
        "<h1>StacyVM API <small>{}</small></h1><p>{}</p><p><a href=\"openapi.json\">openapi.json</a> (OpenAPI 3.1)</p>",
        esc(doc["info"]["version"].as_str().unwrap_or_default()),
        esc(doc["info"]["description"].as_str().unwrap_or_default()),
    );
    let empty = Map::new();
    let paths = doc["paths"].as_object().unwrap_or(&empty);
    for tag in doc["tags"].as_array().into_iter().flatten() {
        let tag = tag["name"].as_str().unwrap_or_default();
        let _ = write!(h, "<h2 id=\"{0}\">{0}</h2>", esc(tag));
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap_or(&empty) {
                if op["tags"][0].as_str() != Some(tag) {
                    continue;
                }
                let _ = write!(
                    h,
                    "<details><summary><span class=\"m\">{}</span> <code>{}</code> — {}</summary><pre>{}</pre></details>",
                    esc(&method.to_ascii_uppercase()),
                    esc(path),
                    esc(op["summary"].as_str().unwrap_or_default()),
                    esc(&serde_json::to_string_pretty(op).unwrap_or_default()),
                );
            }
        }
    }
    h.push_str("</body></html>");
    h
}

/// Documentation-only shapes of query strings the handlers read as maps.
pub mod queries {
    use schemars::JsonSchema;

    /// Filters of `GET /admin/audit`.
    #[allow(dead_code)]
    #[derive(JsonSchema)]
    pub struct AdminAudit {
        /// Only this caller.
        actor: Option<String>,
        /// Only this HTTP method.
        method: Option<String>,
        tenant_id: Option<String>,
        /// RFC 3339 time, or a look-back duration such as `24h`.
        since: Option<String>,
        /// Rows (1–500, default 100).
        limit: Option<u32>,
        /// `json` (default) or `csv`.
        format: Option<String>,
    }

    /// Filters of `GET /admin/op-audit`.
    #[allow(dead_code)]
    #[derive(JsonSchema)]
    pub struct OpAudit {
        actor: Option<String>,
        /// e.g. `sandbox.spawn`, `file.read`.
        action: Option<String>,
        sandbox_id: Option<String>,
        tenant_id: Option<String>,
        /// RFC 3339 time, or a look-back duration such as `24h`.
        since: Option<String>,
        /// Rows (1–500, default 100).
        limit: Option<u32>,
        /// `json` (default) or `csv`.
        format: Option<String>,
    }

    /// `GET /admin/tenants/{tenant}/audit`.
    #[allow(dead_code)]
    #[derive(JsonSchema)]
    pub struct TenantAudit {
        /// RFC 3339 time, or a look-back duration such as `24h`.
        since: Option<String>,
    }
}
