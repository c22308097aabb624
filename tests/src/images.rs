//! Where the things under test are: the `vigil` binary, the fw-guest ELF, the tenant image.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The workspace's root.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `vigil` binary of the profile this test was built with (`VIGIL_BIN` overrides).
///
/// Cargo builds it with `cargo test --workspace` (the `vigil` package has integration tests of its
/// own, so its binary is built) and `scripts/test` builds it first; `cargo test -p vigil-tests`
/// alone does not rebuild it, hence the explicit path in the message.
pub fn vigil_bin() -> PathBuf {
    try_vigil_bin().unwrap_or_else(|e| panic!("{e}"))
}

/// [`vigil_bin`], with a missing binary an error rather than a panic (for the benchmark).
pub fn try_vigil_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VIGIL_BIN") {
        return Ok(PathBuf::from(path));
    }
    // target/<profile>/deps/<test> or target/<profile>/examples/<example> -> target/<profile>/vigil
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "the test's own path".into(),
        source,
    })?;
    let profile_dir = exe
        .parent()
        .and_then(|dir| match dir.file_name().and_then(|n| n.to_str()) {
            Some("deps" | "examples") => dir.parent(),
            _ => Some(dir),
        })
        .expect("a target directory above the test binary");
    let bin = profile_dir.join("vigil");
    if !bin.is_file() {
        return Err(Error::Missing {
            path: bin,
            hint: "build it with `cargo build --release -p vigil` (scripts/test does), or name \
                   another with VIGIL_BIN",
        });
    }
    Ok(bin)
}

/// The fw-guest ELF built by `scripts/build-fw-guest` (`VIGIL_FW_GUEST` overrides).
pub fn fw_guest_elf() -> PathBuf {
    let path = std::env::var_os("VIGIL_FW_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/x86_64-unknown-none/release/fw-guest"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-fw-guest first",
        path.display()
    );
    path
}

/// The tenant image built by `scripts/build-tenant-image` (`VIGIL_TENANT_DIR` overrides).
pub fn tenant_dir() -> PathBuf {
    let dir = std::env::var_os("VIGIL_TENANT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("build/tenant"));
    for file in ["vmlinuz", "initramfs.cpio"] {
        assert!(
            dir.join(file).is_file(),
            "{} is missing: run scripts/build-tenant-image first",
            dir.join(file).display()
        );
    }
    dir
}
