//! What can go wrong in the harness itself (as opposed to a failed assertion): a tool that would
//! not run or failed, a process that never printed what was awaited, an API call that got no
//! answer. Tests turn these into panics; the control benchmark reports them and goes on.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the harness's fallible calls (`try_*`, [`crate::VigilCommand::spawn`], ...).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the harness needs is not there; `hint` says how to make it.
    #[error("{} is missing: {hint}", path.display())]
    Missing { path: PathBuf, hint: &'static str },
    /// A program could not be started (or its pipes read).
    #[error("cannot run {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed; `detail` is what it said.
    #[error("{command}: {detail}")]
    Failed { command: String, detail: String },
    /// A file or socket operation of the harness failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A process printed no line matching `what` within `limit`.
    #[error("{name}: no line with {what} within {limit:?}")]
    NoLine {
        name: String,
        what: String,
        limit: Duration,
    },
    /// A process closed its output (exited) before printing a line matching `what`.
    #[error("{name} exited before a line with {what}")]
    Exited { name: String, what: String },
    /// An API request got no (HTTP) answer.
    #[error("{method} {path}: {source}")]
    Api {
        method: String,
        path: String,
        #[source]
        source: vmm_api::http::ClientError,
    },
    /// An API request was answered with an unexpected status.
    #[error("{method} {path}: {status} {body}")]
    Status {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    /// An awaited event did not come, or the stream ended.
    #[error("event stream: {0}")]
    Events(String),
}

pub type Result<T> = std::result::Result<T, Error>;
