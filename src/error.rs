//! Why the service could not start, each as one line that says what to do.
//!
//! Each part says what went wrong in its own error type; this one gathers them
//! for [`crate::Verve::start`].

use std::fmt;
use std::io;

use crate::admin::AdminError;
use crate::config::ConfigError;
use crate::journal::JournalError;
use crate::server::ServerError;
use crate::store::StoreError;

#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    Server(ServerError),
    Admin(AdminError),
    /// The Redis store could not be set up (a bad URL, the fleet's refusal).
    Store(StoreError),
    /// A sink could not be set up: each kind says why in its own error type,
    /// which this does not need to know (a new sink adds no variant here).
    Sink(Box<dyn std::error::Error + Send + Sync>),
    Journal(JournalError),
    Thread(io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(err) => err.fmt(f),
            StartError::Server(err) => err.fmt(f),
            StartError::Admin(err) => err.fmt(f),
            StartError::Store(err) => err.fmt(f),
            StartError::Sink(err) => err.fmt(f),
            StartError::Journal(err) => err.fmt(f),
            StartError::Thread(source) => write!(f, "cannot start a thread: {source}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Server(err) => err.source(),
            StartError::Admin(err) => err.source(),
            StartError::Store(err) => err.source(),
            StartError::Sink(err) => err.source(),
            StartError::Thread(source) => Some(source),
            _ => None,
        }
    }
}

impl From<ConfigError> for StartError {
    fn from(err: ConfigError) -> Self {
        StartError::Config(err)
    }
}

impl From<ServerError> for StartError {
    fn from(err: ServerError) -> Self {
        StartError::Server(err)
    }
}

impl From<AdminError> for StartError {
    fn from(err: AdminError) -> Self {
        StartError::Admin(err)
    }
}

impl From<JournalError> for StartError {
    fn from(err: JournalError) -> Self {
        StartError::Journal(err)
    }
}

impl StartError {
    /// A sink's own error, whatever its kind.
    pub fn sink(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        StartError::Sink(Box::new(err))
    }
}
