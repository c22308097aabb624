//! The old home of a network interface's configuration, kept so that `vmm_core::net_config::*`
//! paths go on compiling.
//!
//! Owns: nothing (re-exports [`crate::config::net`]).
//! Must not: grow code; new code names `vmm_core::config`.

pub use crate::config::net::*;
