//! Wire formats shared by the Vigil VMM (host side) and the firewall micro-VM (guest side).
//!
//! Owns: the boot information handed to the micro-VM, verdict records, the verdict channel's
//! datagrams and acknowledgements (`auth`, `ack`) and the layout of the
//! shared-memory verdict ring and its outcome log. Must not: allocate, depend on `std`, or trust its input: every view
//! over bytes checks lengths before it reads.
#![no_std]

pub mod ack;
pub mod auth;
pub mod boot;
pub mod outcome;
pub mod ring;
pub mod verdict;
