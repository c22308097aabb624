//! End to end: boots Debian's unmodified cloud kernel (built into build/tenant by
//! `scripts/build-tenant-image`) with its busybox initramfs in the real VMM, with a virtio-net
//! interface backed by a real TAP device in a network namespace this test creates. A TCP server
//! runs in that namespace (the "outside"); busybox `nc` inside the guest talks to it. The test sees
//! the exchange on both ends.
//!
//! One boot serves every check: a boot takes minutes on a host whose KVM emulates guest ring 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;
use common::{base64, tenant_dir};

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const PORT: u16 = 8080;
const CLOSED_PORT: u16 = 8081;

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A network namespace with a TAP device in it, removed on drop even if the test fails.
struct Outside {
    name: String,
}

impl Outside {
    fn create(name: &str, tap: &str) -> Outside {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        let outside = Outside { name: name.into() };
        ip(&["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            tap,
        ]);
        ip(&["-n", name, "link", "set", tap, "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        outside
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it makes live there).
    fn spawn<T: Send + 'static>(
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

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
#[ignore = "boots the Debian tenant: 15-25 min on an emulating KVM host; run with scripts/test --e2e"]
fn debian_tenant_boots_and_talks_tcp_over_virtio_net_to_the_outside() {
    let dir = tenant_dir();
    let ns = format!("vigil-t{}", std::process::id());
    let tap = "vt0";
    let outside = Outside::create(&ns, tap);

    // The outside server: binds before the guest boots, accepts one connection, reads one line,
    // answers, and reports what it got.
    let (bound_tx, bound_rx) = mpsc::channel();
    let server = outside.spawn(move || {
        let listener = TcpListener::bind((HOST_IP, PORT)).expect("bind in the namespace");
        bound_tx.send(()).unwrap();
        let (mut stream, peer) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).map(|n| n == 1).unwrap_or(false) && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        stream.write_all(b"host-says-hello\n").expect("reply");
        (peer, String::from_utf8_lossy(&line).to_string())
    });
    bound_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server bound");

    let workload = format!(
        "echo \"VIGIL-CHECK tcp-reply $(echo tenant-says-hello | nc -w 120 {HOST_IP} {PORT})\"\n\
         if nc -w 60 {HOST_IP} {CLOSED_PORT} </dev/null; then echo VIGIL-CHECK closed-port open; \
         else echo VIGIL-CHECK closed-port refused; fi\n\
         ip -o addr show dev eth0 | sed 's/^/VIGIL-CHECK addr /'\n"
    );
    let encoded = base64(workload.as_bytes());
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 quiet vigil.ip={GUEST_IP}/24 vigil.gw={HOST_IP} vigil.run={encoded}"
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        // Fewer guest timer ticks per wall second on an emulating host (to /init: ~465 s with 8,
        // over 560 s without, measured); guest timeouts stretch by the same factor.
        .env("VIGIL_TSC_DILATION", "8")
        .args(["run-tenant", "--kernel"])
        .arg(dir.join("vmlinuz"))
        .arg("--initramfs")
        .arg(dir.join("initramfs.cpio"))
        .args(["--cmdline", &cmdline])
        .args(["--net", &format!("tap={tap},netns={ns}")])
        .args(["--marker", "VIGIL-INIT-START", "--timeout", "2700"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vigil");
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read vigil output");
        eprintln!("{line}");
        lines.push(line);
    }
    let status = child.wait().expect("wait for vigil");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .ok();
    let console = lines.join("\n");
    assert!(status.success(), "vigil failed: {stderr}\n{console}");

    // Both ends of the TCP exchange.
    let (peer, received) = server.join().expect("server thread");
    assert_eq!(
        peer.ip().to_string(),
        GUEST_IP,
        "the connection came from the guest"
    );
    assert_eq!(received, "tenant-says-hello");
    assert!(
        console.contains("VIGIL-CHECK tcp-reply host-says-hello"),
        "the guest did not print the server's reply:\n{console}"
    );
    // A port nobody listens on answers with a reset, which the guest sees as refused.
    assert!(
        console.contains("VIGIL-CHECK closed-port refused"),
        "{console}"
    );
    assert!(
        console.contains(&format!("inet {GUEST_IP}/24")),
        "{console}"
    );
    assert!(console.contains("VIGIL-WORKLOAD-EXIT rc=0"), "{console}");

    // The outcome: a clean poweroff, with the VMM's completions reported.
    let event: serde_json::Value = serde_json::from_str(
        lines
            .iter()
            .find(|l| l.contains("\"vm_stopped\""))
            .expect("vm_stopped event"),
    )
    .unwrap();
    let outcome = &event["outcome"];
    assert_eq!(outcome["stop"]["reason"], "poweroff", "{outcome}");
    assert!(outcome["markers"]["VIGIL-INIT-START"].as_u64().is_some());
    if outcome["host"].as_str().unwrap().starts_with("emulating") {
        assert!(
            outcome["stats"]["syscalls_completed"].as_u64().unwrap() > 100,
            "guest userspace ran through the syscall fix: {outcome}"
        );
    }
    drop(outside);
}
