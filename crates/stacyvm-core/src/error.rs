//! The error taxonomy shared by the orchestrator, providers and store.
//!
//! Every error carries an [`ErrorKind`]; the server maps kinds to HTTP
//! statuses in exactly one table (`stacyvm-server::error`). Display texts
//! start with the canonical sentinel of the public contract
//! (`sandbox not found: sb-…`, `invalid input: …`).

use std::fmt;

/// What went wrong, independent of where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller sent something unacceptable (400).
    InvalidInput,
    /// The sandbox does not exist (404).
    SandboxNotFound,
    /// The sandbox exists but was destroyed (404).
    SandboxDestroyed,
    /// No provider of that name is registered (404).
    ProviderNotFound,
    /// A stored entity (template, quota, file …) does not exist (404).
    NotFound,
    /// Uniqueness or lease conflict (409).
    Conflict,
    /// The exec deadline fired (408).
    ExecTimeout,
    /// Quota, capacity, queue or limit exceeded (429).
    ResourceLimit,
    /// The request body is larger than allowed (413).
    PayloadTooLarge,
    /// Forbidden by policy or permissions (403).
    Forbidden,
    /// The provider cannot serve requests right now (503).
    ProviderUnavailable,
    /// The operation is not supported by this provider (501).
    Unsupported,
    /// The database cannot be reached right now (503); retry later.
    StoreUnavailable,
    /// A template's setup failed in a new sandbox, which was removed (422).
    SetupFailed,
    /// Anything else (500).
    Internal,
}

impl ErrorKind {
    /// The canonical message prefix of the public contract, if any.
    pub fn prefix(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::SandboxNotFound => "sandbox not found",
            ErrorKind::SandboxDestroyed => "sandbox destroyed",
            ErrorKind::ProviderNotFound => "provider not found",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::ExecTimeout => "exec timeout",
            ErrorKind::ResourceLimit => "resource limit exceeded",
            ErrorKind::PayloadTooLarge => "request body too large",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::ProviderUnavailable => "provider unavailable",
            ErrorKind::Unsupported => "unsupported operation",
            ErrorKind::StoreUnavailable => "store unavailable",
            ErrorKind::SetupFailed => "template setup failed",
            ErrorKind::Internal => "internal error",
        }
    }
}

/// An error with a kind, a message (without the kind prefix) and an optional cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    detail: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Error {
            kind,
            detail: detail.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause; its text is appended to the message.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, detail)
    }
    pub fn setup_failed(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::SetupFailed, detail)
    }
    pub fn sandbox_not_found(id: &str) -> Self {
        Self::new(ErrorKind::SandboxNotFound, id)
    }
    pub fn sandbox_destroyed(id: &str) -> Self {
        Self::new(ErrorKind::SandboxDestroyed, id)
    }
    pub fn provider_not_found(name: &str) -> Self {
        Self::new(ErrorKind::ProviderNotFound, name)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, detail)
    }
    pub fn exec_timeout(id: &str) -> Self {
        Self::new(ErrorKind::ExecTimeout, id)
    }
    pub fn limit(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceLimit, detail)
    }
    pub fn too_large(detail: impl Into<String>) -> Self {
        Error::new(ErrorKind::PayloadTooLarge, detail)
    }
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::ProviderUnavailable, detail)
    }
    pub fn unsupported(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, detail)
    }

    /// Prefixes the detail with context, keeping the kind: `exec: <detail>`.
    #[must_use]
    pub fn context(mut self, ctx: &str) -> Self {
        self.detail = format!("{ctx}: {}", self.detail);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = self.kind.prefix();
        match self.kind {
            // Internal errors carry their own wording.
            ErrorKind::Internal => f.write_str(&self.detail)?,
            _ if self.detail.is_empty() => f.write_str(prefix)?,
            _ => write!(f, "{prefix}: {}", self.detail)?,
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::Conflict,
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidFilename => {
                ErrorKind::InvalidInput
            }
            _ => ErrorKind::Internal,
        };
        let detail = match kind {
            ErrorKind::Internal => "i/o error".to_string(),
            _ => String::new(),
        };
        Error::new(kind, detail).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_uses_canonical_prefixes() {
        assert_eq!(
            Error::sandbox_not_found("sb-1").to_string(),
            "sandbox not found: sb-1"
        );
        assert_eq!(
            Error::limit("max sandboxes reached (10)").to_string(),
            "resource limit exceeded: max sandboxes reached (10)"
        );
        assert_eq!(
            Error::provider_not_found("xyz")
                .context("getting provider")
                .detail(),
            "getting provider: xyz"
        );
        assert_eq!(Error::internal("boom").to_string(), "boom");
    }
}
