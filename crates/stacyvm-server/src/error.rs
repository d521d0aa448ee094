//! The one table from error kind to HTTP status, and the error body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use stacyvm_api::ErrorBody;
use stacyvm_core::{Error, ErrorKind};

use crate::json::json_response;

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// A 5xx message that says nothing about the host (a kind, or a fixed
    /// sentence): kept in the body. Other 5xx messages are replaced by
    /// their kind and the request id on the way out.
    pub public: bool,
}

/// Marks a 5xx response whose message may be shown (stripped before the
/// response leaves the server).
pub const PUBLIC_MESSAGE: &str = "x-stacyvm-public-message";

/// Status and wire code of an error kind.
pub fn status_of(kind: ErrorKind) -> (StatusCode, &'static str) {
    match kind {
        ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        ErrorKind::SandboxNotFound
        | ErrorKind::SandboxDestroyed
        | ErrorKind::ProviderNotFound
        | ErrorKind::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        ErrorKind::Conflict => (StatusCode::CONFLICT, "CONFLICT"),
        ErrorKind::ExecTimeout => (StatusCode::REQUEST_TIMEOUT, "TIMEOUT"),
        ErrorKind::ResourceLimit => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_LIMIT"),
        ErrorKind::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
        ErrorKind::Forbidden => (StatusCode::FORBIDDEN, "FORBIDDEN"),
        ErrorKind::ProviderUnavailable | ErrorKind::StoreUnavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
        }
        ErrorKind::Unsupported => (StatusCode::NOT_IMPLEMENTED, "NOT_IMPLEMENTED"),
        ErrorKind::SetupFailed => (StatusCode::UNPROCESSABLE_ENTITY, "SETUP_FAILED"),
        ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            public: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    /// A 503 with a message fit for any caller (no host detail).
    pub fn unavailable(message: &'static str) -> Self {
        ApiError {
            public: true,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = status_of(e.kind());
        let message = if status.is_server_error() {
            // The full cause chain goes to the log, not to the client
            // (F-17: details carry host paths and agent stderr).
            tracing::error!(error = %e, "request failed");
            e.kind().prefix().to_string()
        } else {
            e.to_string()
        };
        ApiError {
            status,
            code,
            // A 5xx message here is only the kind's prefix.
            public: true,
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = json_response(
            self.status,
            &ErrorBody {
                code: self.code.to_string(),
                message: self.message,
            },
        );
        if self.public && self.status.is_server_error() {
            resp.headers_mut()
                .insert(PUBLIC_MESSAGE, axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
