//! The crate's one public error type.

use std::borrow::Cow;
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
    /// A few words for summaries, such as "connect refused".
    label: Option<Cow<'static, str>>,
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
                label: None,
                source: None,
            }),
        }
    }

    /// A connection-level failure with a short `label` for summaries.
    pub(crate) fn connect(
        label: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind: ErrorKind::Connect,
                target: None,
                message: message.into(),
                label: Some(label.into()),
                source,
            }),
        }
    }

    /// A few words that name the failure, for summaries such as
    /// "3 endpoints: 2 NOT_SERVING, 1 connect refused".
    pub fn label(&self) -> &str {
        match &self.inner.label {
            Some(label) => label,
            None => match self.inner.kind {
                ErrorKind::InvalidTarget => "invalid target",
                ErrorKind::InvalidConfig => "invalid configuration",
                ErrorKind::NoRuntime => "no runtime",
                ErrorKind::Resolve => "resolution failed",
                ErrorKind::Connect => "connect failed",
                ErrorKind::Unavailable => "unavailable",
            },
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

/// The message of a panic's payload, for reports.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
