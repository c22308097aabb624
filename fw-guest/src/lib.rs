//! The firewall micro-VM's portable core (host-testable, no_std).
//!
//! Owns: the default-deny stateful packet filter ([`filter`]): frame parsing, the verdict table,
//! the conntrack table, drop accounting; the switching between ports ([`switch`]); the virtio-net
//! driver ([`virtio_net`]). Must not: allocate on the data path, read a clock (time is
//! passed in), or panic on any input. The boot/entry code (`main.rs`, `arch`) drives it.
#![no_std]

pub mod filter;
pub mod switch;
pub mod virtio_net;
