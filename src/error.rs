//! The crate's error type.
//!
//! One [`Error`] for everything, with a queryable [`ErrorKind`]; a backend's own error (redis-rs)
//! is reachable through [`std::error::Error::source`] and never part of the public type. Being
//! unable to reach Redis is *not* an error of the typed API: the store's resilience wrapper
//! serves from its fallback instead. Errors that do reach callers are about their input (a key,
//! a TTL, a value that cannot be encoded) or about configuration.

use std::error::Error as StdError;
use std::fmt;

use crate::key::KeyError;
use crate::ttl::TtlError;

/// A `Result` with speedlayer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A key, identifier or pattern was refused (see [`KeyError`]).
    InvalidKey,
    /// A TTL or jitter was refused (see [`TtlError`]).
    InvalidTtl,
    /// Configuration is invalid (a malformed `REDIS_URL`, a TLS URL without the `tls` feature).
    Config,
    /// A value could not be encoded to JSON.
    Serialize,
    /// A value is larger than the configured maximum.
    ValueTooLarge,
    /// The stored value has a type the operation cannot use (a Redis hash where a string was
    /// expected, a non-integer under a counter).
    WrongType,
    /// A counter would overflow `i64`.
    Overflow,
    /// A server-side script failed on the data it found (another client wrote a value of its own
    /// shape under one of speedlayer's keys). The server itself is healthy: this never counts
    /// against it.
    Script,
    /// A backend call did not answer within its timeout.
    Timeout,
    /// The connection to the backend failed or dropped.
    Connection,
    /// The backend answered with an error.
    Backend,
    /// The backend is not usable right now (circuit breaker open) and no fallback can answer.
    Unavailable,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::InvalidKey => "invalid key",
            ErrorKind::InvalidTtl => "invalid TTL",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Serialize => "serialization failed",
            ErrorKind::ValueTooLarge => "value too large",
            ErrorKind::WrongType => "wrong type",
            ErrorKind::Overflow => "overflow",
            ErrorKind::Script => "script refused the data",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection failed",
            ErrorKind::Backend => "backend error",
            ErrorKind::Unavailable => "backend unavailable",
        };
        f.write_str(s)
    }
}

/// speedlayer's error. `Display` says what happened and what to do; it never contains a
/// password.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `kind` with a message.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The backend did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// The backend could not be reached or used: timeout, connection, backend error or breaker
    /// open. These errors are what the resilience wrapper turns into fallbacks.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::Backend
                | ErrorKind::Unavailable
        )
    }

    /// The message without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            // The source's Display, not its Debug: redis-rs redacts passwords in both, but
            // Display is the shorter and is what the tests check.
            d.field("source", &format_args!("{source}"));
        }
        d.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<KeyError> for Error {
    fn from(e: KeyError) -> Self {
        Error::new(ErrorKind::InvalidKey, e.to_string()).with_source(e)
    }
}

impl From<TtlError> for Error {
    fn from(e: TtlError) -> Self {
        Error::new(ErrorKind::InvalidTtl, e.to_string()).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_sources() {
        let e: Error = KeyError::EmptySegment { part: "id" }.into();
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
        assert!(!e.is_unavailable());
        assert!(e.source().is_some());
        assert!(e.to_string().contains("must not be empty"));
        assert!(Error::new(ErrorKind::Timeout, "x").is_timeout());
    }
}
