//! The end-to-end harness: what Vigil's end-to-end tests share. It drives real parts: the `vigil`
//! binary as a process, network namespaces with TAP and veth devices (the outside world, the
//! underlay between hosts), Linux's own TCP/UDP stacks there, and the Debian tenant image.
//!
//! Owns: finding the images and the binary, namespaces, processes and their output, API calls.
//! Must not: stand in for a part that can run here (no mock VMM, no fake network).

pub mod images;
pub mod netns;
pub mod process;
pub mod rest;

pub use images::{fw_guest_elf, tenant_dir, vigil_bin};
pub use netns::{veth, Namespace};
pub use process::Process;
pub use rest::{api, drop_count, edge_counters};

/// Standard base64 (RFC 4648), for a workload on the kernel command line.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
