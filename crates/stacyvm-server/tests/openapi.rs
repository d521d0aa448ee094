//! `GET /api/v1/openapi.json` against the server that serves it: every
//! documented operation is routed (not the router's fallback), the route
//! table and the permission table name the same routes, and every schema
//! reference resolves. (tests/python/test_openapi.py checks the document
//! with an OpenAPI 3.1 validator.)

use std::collections::BTreeSet;

use serde_json::Value;
use stacyvm_core::config::Config;

mod common;

/// Whether a reply is the router's own "no such route/method" answer
/// rather than a handler's.
fn is_fallback(status: u16, body: &Value) -> bool {
    let msg = body["message"].as_str().unwrap_or_default();
    (status == 404 && msg.starts_with("route not found"))
        || (status == 405 && msg.starts_with("method "))
}

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_matches_the_routes_and_the_permission_table() {
    let s = common::start_with(Config::default()).await;
    let r = s
        .http
        .get(format!("{}/api/v1/openapi.json", s.root))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.expect("json");
    assert_eq!(doc["openapi"], "3.1.0");

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let route = path.strip_prefix("/api/v1").expect("under /api/v1");
        for (method, op) in item.as_object().expect("item") {
            assert!(op["responses"]["default"].is_object(), "{path} {method}");
            assert!(!op["summary"].as_str().unwrap_or_default().is_empty());
            documented.insert((method.to_ascii_uppercase(), route.to_string()));
        }
    }
    let permitted: BTreeSet<(String, String)> = stacyvm_server::ROUTE_PERMISSIONS
        .iter()
        .map(|p| (p.method.to_string(), p.path.to_string()))
        .collect();
    let undocumented: Vec<_> = permitted.difference(&documented).collect();
    let unpermitted: Vec<_> = documented.difference(&permitted).collect();
    assert!(
        undocumented.is_empty() && unpermitted.is_empty(),
        "routes with a permission but no documentation: {undocumented:?}; documented without a permission: {unpermitted:?}"
    );

    // Every documented operation reaches a handler.
    for (method, route) in &documented {
        let path: String = route
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    "sb-00000000"
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = s.http.request(m, format!("{}/api/v1{path}", s.root));
        if method == "POST" || method == "PUT" {
            rb = rb.header("content-type", "application/json").body("{}");
        }
        let r = rb.send().await.expect("send");
        let status = r.status().as_u16();
        let json = r
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        // Streams (events) are left unread.
        let body = if json {
            r.json().await.unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        assert!(
            !is_fallback(status, &body),
            "{method} {route} is documented but not routed: {status} {body}"
        );
    }
    // The check above can tell: an undocumented route is the fallback.
    for (method, path) in [
        ("GET", "/sandboxes/sb-00000000/nope"),
        ("PATCH", "/sandboxes"),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = s
            .http
            .request(m, format!("{}/api/v1{path}", s.root))
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let body: Value = r.json().await.expect("json");
        assert!(
            is_fallback(status, &body),
            "{method} {path}: {status} {body}"
        );
    }

    // Every reference resolves.
    let mut out = Vec::new();
    refs(&doc, &mut out);
    assert!(!out.is_empty());
    for r in out {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("reference outside components: {r}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling reference {r}"
        );
    }
    // Request bodies are described by the types the handlers parse.
    let spawn = &doc["components"]["schemas"]["SpawnRequest"]["properties"];
    for field in ["image", "provider", "ttl", "memory_mb", "metadata"] {
        assert!(spawn[field].is_object(), "SpawnRequest.{field}: {spawn}");
    }
    let exec = &doc["paths"]["/api/v1/sandboxes/{id}/exec"]["post"];
    assert_eq!(exec["x-stacyvm-permission"], "api:*");
    assert_eq!(
        doc["paths"]["/api/v1/health"]["get"]["security"],
        serde_json::json!([])
    );

    // The page lists every operation.
    let page = s
        .http
        .get(format!("{}/api/v1/docs", s.root))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    for (method, route) in &documented {
        assert!(
            page.contains(&format!("{method}</span> <code>/api/v1{route}</code>")),
            "{method} {route} missing from /docs"
        );
    }
}
