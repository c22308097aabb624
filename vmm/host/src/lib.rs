//! A cloud host: the switch-tier firewall micro-VM and the tenant VMs created on it through the
//! API, with the firewall tiers reconfigured as tenants come and go, snapshot, restore and live
//! migration.
//!
//! Modules: `claims` (tenants in transition), `config` (host configuration, VM spec), `error`, `host` (start, shutdown, counters),
//! `switch` (the switch micro-VM and the book of what it holds), `supervisor` (its restarts), `tenant` (one tenant's entry), `lifecycle` (create, boot,
//! pause, resume, delete, policy), `tiers` (control records to both tiers, timings),
//! `edge_link` (the channel to the edge), `snapshot`, `migration` (source), `migration_in`
//! (target), `migration_link` (TCP, authentication, sealed frames).
//!
//! Owns: the tenant table and the switch. Must not: let one tenant's failure (bad config, a
//! crashed guest) take down the host or another tenant; know about HTTP.

mod claims;
mod config;
mod edge_link;
mod error;
mod host;
mod lifecycle;
mod migration;
mod migration_deadline;
mod migration_in;
pub mod migration_link;
mod snapshot;
mod supervisor;
mod switch;
mod tenant;
mod tiers;

pub use config::{EdgeLinkConfig, HostConfig, VmSpec, MAX_TENANT_PORTS};
pub use edge_link::EdgeLinkStats;
pub use error::{HostError, StartError};
pub use host::Host;
pub use migration::{migration_target, MigrationOptions, Round};
pub use migration_deadline::ReceiveLimit;
pub use migration_link::MigrationKeys;
pub use snapshot::file_path;
pub use switch::SwitchStatus;
pub use tenant::{VmInfo, VmState};
pub use tiers::ReconfigTimes;
