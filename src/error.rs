//! The crate's one public error type.

use std::fmt;
use std::sync::Arc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error from healthlb.
///
/// The message names the target and says what went wrong, so it can be shown
/// to a person as it is. [`Error::kind`] tells programs what class of failure
/// it was. Cloning is cheap: errors are shared, for example between the
/// resolver's status and every caller that reads it.
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    target: Option<Arc<str>>,
    message: String,
    source: Option<BoxError>,
}

/// What class of failure an [`Error`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The target string is malformed or uses an unsupported scheme.
    InvalidTarget,
    /// A configuration value is out of range.
    InvalidConfig,
    /// No Tokio runtime was running where one is required.
    NoRuntime,
    /// Name resolution failed.
    Resolve,
    /// Connecting to an endpoint failed.
    Connect,
    /// No endpoint was SERVING when one was needed.
    Unavailable,
}

// === impl Error ===

impl Error {
    pub(crate) fn new(
        kind: ErrorKind,
        target: Option<Arc<str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                target,
                message: message.into(),
                source: None,
            }),
        }
    }

    #[allow(dead_code)]
    pub(crate) fn with_source(
        kind: ErrorKind,
        target: Option<Arc<str>>,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                target,
                message: message.into(),
                source: Some(source.into()),
            }),
        }
    }

    pub(crate) fn invalid_target(target: &str, what: impl fmt::Display) -> Self {
        Self::new(
            ErrorKind::InvalidTarget,
            Some(target.into()),
            format!("invalid target {target:?}: {what}"),
        )
    }

    pub(crate) fn invalid_config(what: impl Into<String>) -> Self {
        Self::new(
            ErrorKind::InvalidConfig,
            None,
            format!("invalid configuration: {}", what.into()),
        )
    }

    pub(crate) fn no_runtime(what: &str) -> Self {
        Self::new(
            ErrorKind::NoRuntime,
            None,
            format!("{what} needs a running Tokio runtime; call it from within one"),
        )
    }

    /// The class of failure.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The target this error is about, as the user wrote it, if any.
    pub fn target(&self) -> Option<&str> {
        self.inner.target.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind)
            .field("message", &self.inner.message);
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
