//! What the engine's integration tests share: the micro-VM image they boot.

use std::path::PathBuf;

/// The fw-guest ELF built by `scripts/build-fw-guest` (`VIGIL_FW_GUEST` overrides).
pub fn fw_guest_elf() -> PathBuf {
    let path = std::env::var_os("VIGIL_FW_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-none/release/fw-guest")
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-fw-guest first",
        path.display()
    );
    path
}
