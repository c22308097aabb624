//! Network namespaces (the outside world, the hosts of a cloud) with TAP and veth devices.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A network namespace with one TAP device holding one address (`addr/24`); deleted on drop,
/// even when the test fails.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// A namespace with only its loopback up (devices are added to it later); a namespace left
    /// over by an earlier run under the same name is replaced.
    pub fn bare(name: &str) -> Namespace {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Namespace { name: name.into() }
    }

    /// A namespace with one TAP device holding `addr/24`.
    pub fn create(name: &str, tap: &str, addr: &str) -> Namespace {
        let ns = Namespace::bare(name);
        ip(&["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["-n", name, "addr", "add", &format!("{addr}/24"), "dev", tap]);
        ip(&["-n", name, "link", "set", tap, "up"]);
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

/// A veth pair between two namespaces, `a_addr/24` on the `a` end, `b_addr/24` on the other.
pub fn veth(a: &Namespace, a_if: &str, a_addr: &str, b: &Namespace, b_if: &str, b_addr: &str) {
    ip(&[
        "-n", &a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    ip(&[
        "-n",
        &a.name,
        "addr",
        "add",
        &format!("{a_addr}/24"),
        "dev",
        a_if,
    ]);
    ip(&[
        "-n",
        &b.name,
        "addr",
        "add",
        &format!("{b_addr}/24"),
        "dev",
        b_if,
    ]);
    ip(&["-n", &a.name, "link", "set", a_if, "up"]);
    ip(&["-n", &b.name, "link", "set", b_if, "up"]);
}
