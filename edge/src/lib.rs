//! The edge node: boots the fw-guest ELF in the edge role, firmware-less, between the outside
//! world and the cloud, and takes verdicts from hosts over an authenticated channel.

pub mod channel;
pub mod node;
