//! Network namespaces (the outside world, the hosts of a cloud) with TAP and veth devices, and
//! sockets made inside them.

use std::net::{TcpListener, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Runs `ip ARGS`; its stderr is the error's detail.
pub fn try_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            what: "ip".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Failed {
            command: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Runs `ip ARGS`; panics if it fails.
pub fn ip(args: &[&str]) {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"));
}

/// A network namespace; deleted on drop, even when the test fails.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// A namespace with only its loopback up (devices are added to it later); a namespace left
    /// over by an earlier run under the same name is replaced.
    pub fn bare(name: &str) -> Namespace {
        Namespace::try_bare(name).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_bare(name: &str) -> Result<Namespace> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        try_ip(&["netns", "add", name])?;
        // From here on the guard deletes the namespace whatever fails next.
        let ns = Namespace { name: name.into() };
        try_ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace with one TAP device holding `addr/24`.
    pub fn create(name: &str, tap: &str, addr: &str) -> Namespace {
        let ns = Namespace::bare(name);
        ns.try_add_tap(tap, Some(addr))
            .unwrap_or_else(|e| panic!("{e}"));
        ns
    }

    /// A namespace with one TAP device and no address (a VMM's port to the outside).
    pub fn try_with_tap(name: &str, tap: &str) -> Result<Namespace> {
        let ns = Namespace::try_bare(name)?;
        ns.try_add_tap(tap, None)?;
        Ok(ns)
    }

    /// Adds TAP device `tap`, up, holding `addr/24` if given.
    pub fn try_add_tap(&self, tap: &str, addr: Option<&str>) -> Result<()> {
        let name = self.name.as_str();
        try_ip(&["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        if let Some(addr) = addr {
            try_ip(&["-n", name, "addr", "add", &format!("{addr}/24"), "dev", tap])?;
        }
        try_ip(&["-n", name, "link", "set", tap, "up"])
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

    /// A TCP listener bound in the namespace (a socket stays in the namespace it was made in,
    /// whichever thread uses it later).
    pub fn tcp_listener<A: ToSocketAddrs + Send + 'static>(&self, addr: A) -> TcpListener {
        self.spawn(move || TcpListener::bind(addr))
            .join()
            .expect("bind thread")
            .expect("bind a TCP listener in the namespace")
    }

    /// A UDP socket bound in the namespace.
    pub fn udp_socket<A: ToSocketAddrs + Send + 'static>(&self, addr: A) -> UdpSocket {
        self.spawn(move || UdpSocket::bind(addr))
            .join()
            .expect("bind thread")
            .expect("bind a UDP socket in the namespace")
    }

    /// Runs `ARGS` in the namespace (stdout discarded); whether it succeeded.
    pub fn exec(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("ip netns exec")
            .success()
    }

    /// The MAC address of device `dev` in the namespace.
    pub fn mac_of(&self, dev: &str) -> [u8; 6] {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{dev}/address"))
            .output()
            .expect("read the device's MAC");
        assert!(out.status.success(), "cat {dev}/address in {}", self.name);
        let text = String::from_utf8_lossy(&out.stdout);
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).expect("MAC hex"))
            .collect();
        bytes.try_into().expect("a 6-byte MAC")
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
