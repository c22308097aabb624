//! Helpers shared by the VMM's integration tests: the images they boot, network namespaces with
//! TAP devices (the "outside" of a VM), base64 for workloads on the kernel command line.
// Each test binary uses a different subset.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The fw-guest ELF built by `scripts/build-fw-guest` (`VIGIL_FW_GUEST` overrides).
pub fn fw_guest_elf() -> PathBuf {
    let path = std::env::var_os("VIGIL_FW_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/x86_64-unknown-none/release/fw-guest")
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-fw-guest first",
        path.display()
    );
    path
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A network namespace with one TAP device holding one address (`addr/24`); deleted on drop,
/// even when the test fails.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn create(name: &str, tap: &str, addr: &str) -> Namespace {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        let ns = Namespace { name: name.into() };
        ip(&["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["-n", name, "addr", "add", &format!("{addr}/24"), "dev", tap]);
        ip(&["-n", name, "link", "set", tap, "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it makes live there).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

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
