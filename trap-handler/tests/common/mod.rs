//! Shared by the real-kernel tests: where the Debian cloud kernel's vmlinux is.

use std::path::PathBuf;

/// The vmlinux to test against: `$VIGIL_VMLINUX`, else `<workspace>/build/tenant/vmlinux` (made by
/// scripts/build-tenant-image), else `<workspace>/build/vmi/vmlinux`. Missing is a failure, never a skip:
/// these tests are the only check against a real kernel.
pub fn vmlinux_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VIGIL_VMLINUX") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "VIGIL_VMLINUX={} does not exist: run scripts/build-tenant-image first",
            p.display()
        );
        return p;
    }
    let ws = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for rel in ["build/tenant/vmlinux", "build/vmi/vmlinux"] {
        let p = ws.join(rel);
        if p.is_file() {
            return p;
        }
    }
    panic!("no vmlinux found (VIGIL_VMLINUX, build/tenant/vmlinux, build/vmi/vmlinux): run scripts/build-tenant-image first");
}
