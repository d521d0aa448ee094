//! Compact JSON bodies with a trailing newline, and a body extractor whose
//! failures are typed API errors.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;

/// Serialises `v` as compact JSON followed by `\n`.
pub fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Response {
    let mut buf = match serde_json::to_vec(v) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "response serialisation failed");
            br#"{"code":"INTERNAL_ERROR","message":"response serialisation failed"}"#.to_vec()
        }
    };
    buf.push(b'\n');
    let mut resp = Response::new(Body::from(buf));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON response with status 200 (or another via [`Json::with_status`]).
pub struct Json<T>(pub StatusCode, pub T);

impl<T> Json<T> {
    pub fn ok(v: T) -> Self {
        Json(StatusCode::OK, v)
    }
    pub fn created(v: T) -> Self {
        Json(StatusCode::CREATED, v)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        json_response(self.0, &self.1)
    }
}

/// A decoded JSON request body. Empty bodies, malformed JSON and wrong types
/// are 400s; bodies over the configured limit are 413s.
pub struct Body2<T>(pub T);

/// Decodes a body; `allow_empty` maps an empty body to `T::default()`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("invalid request body: body is empty"));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, &()).await.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "request body too large",
            )
        } else {
            ApiError::bad_request(format!("invalid request body: {}", rej.body_text()))
        }
    })
}

impl<S, T> FromRequest<S> for Body2<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req).await?;
        decode(&bytes).map(Body2)
    }
}

/// Like [`Body2`] but an empty body decodes to `T::default()`.
pub struct OptBody<T>(pub T);

impl<S, T> FromRequest<S> for OptBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptBody(T::default()));
        }
        decode(&bytes).map(OptBody)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use stacyvm_api::{ExecRequest, SpawnRequest, TemplateInput, WriteFileRequest};

    fn never_5xx<T: DeserializeOwned>(bytes: &[u8]) {
        if let Err(e) = decode::<T>(bytes) {
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.starts_with("invalid request body"));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_decode_or_400(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            never_5xx::<SpawnRequest>(&bytes);
            never_5xx::<ExecRequest>(&bytes);
            never_5xx::<WriteFileRequest>(&bytes);
            never_5xx::<TemplateInput>(&bytes);
        }

        #[test]
        fn json_shaped_input_decodes_or_400(
            key in "(image|ttl|memory_mb|command|args|env|mode|path|content|timeout|metadata)",
            val in prop_oneof![
                Just("null".to_string()), Just("1".to_string()), Just("-1".to_string()), Just("1e400".to_string()),
                Just("\"x\"".to_string()), Just("[]".to_string()), Just("{}".to_string()), Just("[1,\"a\"]".to_string()),
                Just("{\"a\":1}".to_string()), Just("true".to_string()), Just("\"\\u0000\"".to_string()),
                "\"[^\"\\\\]{0,20}\"",
            ],
        ) {
            let body = format!("{{\"{key}\":{val}}}");
            never_5xx::<SpawnRequest>(body.as_bytes());
            never_5xx::<ExecRequest>(body.as_bytes());
            never_5xx::<WriteFileRequest>(body.as_bytes());
        }
    }
}
