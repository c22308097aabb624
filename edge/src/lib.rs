//! The edge node: boots the fw-guest ELF in the edge role, firmware-less, between the outside
//! world and the cloud, and takes verdicts from hosts over an authenticated channel.
//!
//! Owns: the verdict channel (`channel`: both ends, used by hosts too) and the edge node
//! (`node`). Must not: depend on the host or the API crates.

pub mod channel;
pub mod node;
