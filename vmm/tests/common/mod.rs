//! Helpers shared by the tests that boot the Debian tenant.

use std::path::PathBuf;

/// The tenant image built by `scripts/build-tenant-image` (`VIGIL_TENANT_DIR` overrides).
pub fn tenant_dir() -> PathBuf {
    let dir = std::env::var_os("VIGIL_TENANT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/tenant"));
    for file in ["vmlinuz", "initramfs.cpio"] {
        assert!(
            dir.join(file).is_file(),
            "{} is missing: run scripts/build-tenant-image first",
            dir.join(file).display()
        );
    }
    dir
}

/// Standard base64 (RFC 4648), for the workload on the kernel command line.
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
