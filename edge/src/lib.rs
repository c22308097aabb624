//! The edge node: boots the fw-guest ELF in the edge role, firmware-less, between the outside
//! world and the cloud, and takes verdicts from hosts over an authenticated, acknowledged channel.
//!
//! Owns: the verdict channel (`channel`: the edge's receiving end and the keys; `order`: the
//! per-host delivery order; `link`: the hosts' retransmitting sending end), the edge node
//! (`node`) and its book of who attached what (`owners`). Must not: depend on the host or the API crates.

pub mod channel;
pub mod link;
pub mod node;
pub mod order;
pub mod owners;
