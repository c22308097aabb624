//! The end-to-end harness: what Vigil's end-to-end tests share. It drives real parts: the `vigil`
//! binary as a process, network namespaces with TAP and veth devices (the outside world, the
//! underlay between hosts), Linux's own TCP/UDP stacks there, and the Debian tenant image.
//!
//! Owns: finding the images and the binary, `vigil` processes and their output, namespaces,
//! outside servers, tenant workloads, API calls and event streams. Each test file keeps only its
//! scenario.
//! Must not: stand in for a part that can run here (no mock VMM, no fake network).

pub mod edge_standin;
pub mod error;
pub mod etcd;
pub mod events;
pub mod hosts;
pub mod images;
pub mod load;
pub mod netns;
pub mod outside;
pub mod process;
pub mod rest;
pub mod restart;
pub mod segment;
pub mod soak;
pub mod workload;

pub use error::Error;
pub use images::{fw_guest_elf, tenant_dir, try_vigil_bin, vigil_bin};
pub use netns::{veth, Namespace};
pub use process::{run_vigil, Finished, Line, Stream, TempDir, VigilCommand, VigilProcess};
pub use rest::{api, drop_count, edge_counters};
pub use workload::base64;
