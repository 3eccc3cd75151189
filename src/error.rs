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
use crate::sink::log::OpenError;

#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    Server(ServerError),
    Admin(AdminError),
    CountLog(OpenError),
    /// The Redis store could not be set up (a bad URL, usually).
    Redis(String),
    /// The Kafka producer could not be created (bad settings).
    Kafka(String),
    /// The Redis stream sink could not be set up (a bad URL, usually).
    RedisStream(String),
    Journal(JournalError),
    Thread(io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(err) => err.fmt(f),
            StartError::Server(err) => err.fmt(f),
            StartError::Admin(err) => err.fmt(f),
            StartError::CountLog(err) => err.fmt(f),
            StartError::Journal(err) => err.fmt(f),
            StartError::Redis(message)
            | StartError::Kafka(message)
            | StartError::RedisStream(message) => f.write_str(message),
            StartError::Thread(source) => write!(f, "cannot start a thread: {source}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Server(err) => err.source(),
            StartError::Admin(err) => err.source(),
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

impl From<OpenError> for StartError {
    fn from(err: OpenError) -> Self {
        StartError::CountLog(err)
    }
}
