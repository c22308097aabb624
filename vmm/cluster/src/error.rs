//! The cluster's errors.
//!
//! Owns: [`ClusterError`]. Must not: hide which key or endpoint an error is about.

/// Why a cluster operation failed. Each message says what it was about.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd could not be reached or refused the request.
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A request to etcd did not complete in time.
    #[error("etcd at {endpoints}: no answer within {secs} s")]
    Timeout { endpoints: String, secs: u64 },
    /// A name that cannot be part of a key.
    #[error("{kind} name {name:?}: use 1 to 32 letters, digits, '-', '_' or '.'")]
    InvalidName { kind: String, name: String },
    /// A stored value that is not a valid record.
    #[error("{key}: {reason}")]
    BadRecord { key: String, reason: String },
    /// A tenant record that cannot stand beside another tenant's (the reason names it).
    #[error("{key}: {reason}")]
    Conflict { key: String, reason: String },
    /// The key does not exist.
    #[error("{key} does not exist")]
    NotFound { key: String },
    /// A compare-and-swap kept losing to other writers.
    #[error("{key} kept changing under the update; try again")]
    Contended { key: String },
    /// A thread or runtime could not be started.
    #[error("cannot start the cluster {what}: {source}")]
    Runtime {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// No random bytes for a new key.
    #[error("cannot draw a new key from /dev/urandom: {0}")]
    Random(#[source] std::io::Error),
    /// The lease of this host's or edge's registration is gone.
    #[error("the lease {lease:#x} expired")]
    LeaseLost { lease: i64 },
}
