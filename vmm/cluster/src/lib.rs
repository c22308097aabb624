//! Vigil's cluster state in etcd: one place that says which tenants exist, where they run and
//! under which policy, which hosts and edges are alive, and which channel keys each host uses.
//!
//! Modules: `keys` (the key layout and its records), `store` (blocking reads and writes, for the
//! `vigil cluster` commands, tests and benchmarks), `reconcile` (desired vs applied, as one
//! action), `agent` (a host's registration, lease, heartbeat and reconciliation through
//! `vmm_host::Host`; its part in moves between hosts in `agent_moves.rs`), `edge_watch` (the edge fences a host whose lease expired), `key_book` (the hosts' keys as
//! each end installs them).
//!
//! Owns: everything Vigil reads from and writes to etcd. Must not: change the host's API or
//! lifecycle (it drives them as the REST API does); trust a record it cannot parse.

mod agent;
mod background;
mod edge_watch;
mod error;
mod key_book;
pub mod keys;
mod reconcile;
mod store;

pub use agent::{AgentConfig, HostAgent, ARRIVE_WAIT, LEAVE_WAIT};
pub use edge_watch::{EdgeWatch, EdgeWatchConfig};
pub use error::ClusterError;
pub use reconcile::{plan, Action};
pub use store::{Store, REQUEST_TIMEOUT};

/// The lease TTL hosts and edges use unless told otherwise (s).
pub const DEFAULT_LEASE_TTL_S: i64 = 2;
