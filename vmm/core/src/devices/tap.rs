//! TAP devices (the host side of a tenant's network interface).
//!
//! A [`Tap`] is a non-blocking file descriptor on `/dev/net/tun` attached to one TAP interface
//! (`IFF_TAP | IFF_NO_PI`: every read or write is exactly one Ethernet frame, no packet-info
//! prefix, no virtio-net header). The interface may live in another network namespace: the
//! namespace is entered on a short-lived helper thread that opens the device there, so no thread
//! of the VMM stays in it, and the descriptor keeps working from any thread afterwards.
//!
//! Batches: a TAP is a character device, so `recvmmsg`/`sendmmsg` do not apply; an io_uring
//! does. One `io_uring_enter` issues a batch of reads (or writes), each one frame; the reads are
//! `RWF_NOWAIT`, so one with nothing queued completes at once with `EAGAIN` (without it,
//! io_uring parks the read on the descriptor's poll queue even though the descriptor is
//! non-blocking, and the batch would wait for frames that may never come). The batch slots are sized to the interface's MTU when it opens; a frame
//! that fills its whole slot (the MTU was raised since) is dropped and counted by the device,
//! and the TAP goes back to one frame per call, which reads any size. Without io_uring (a kernel
//! that refuses it, or `VIGIL_TAP_IO=frame`, the benchmark's baseline) it moves one frame per call.
//!
//! Owns: opening a TAP interface (in its namespace) and reading and writing its frames, one or a
//! batch per system call.
//! Must not: bring the link up or address it (the caller's job), leave the calling thread in
//! another namespace, or block.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};
use thiserror::Error;

use crate::devices::virtio::net::link::{FrameBatch, BATCH};
use crate::devices::virtio::net::MAX_FRAME;

/// Linux `IFNAMSIZ` (include/uapi/linux/if.h), the terminating NUL included.
const IFNAMSIZ: usize = 16;
/// `TUNSETIFF` = `_IOW('T', 202, int)` (include/uapi/linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `IFF_TAP` (include/uapi/linux/if_tun.h): Ethernet frames rather than IP packets.
const IFF_TAP: libc::c_short = 0x0002;
/// `IFF_NO_PI` (include/uapi/linux/if_tun.h): no 4-byte packet-information prefix.
const IFF_NO_PI: libc::c_short = 0x1000;
/// The TUN/TAP clone device.
const TUN_DEVICE: &str = "/dev/net/tun";
/// Where `ip netns add` bind-mounts named network namespaces.
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, Error)]
pub enum TapError {
    #[error("bad TAP interface name {0:?}: 1 to {max} bytes of [A-Za-z0-9._-]", max = IFNAMSIZ - 1)]
    BadName(String),
    #[error("bad network namespace name {0:?}: a name under {NETNS_DIR}, without '/'")]
    BadNetnsName(String),
    #[error("{TUN_DEVICE} is missing: the tun module is not loaded (modprobe tun)")]
    NoTunDevice,
    #[error("opening {TUN_DEVICE}: permission denied (needs CAP_NET_ADMIN)")]
    Permission,
    #[error("opening {TUN_DEVICE}: {0}")]
    Open(#[source] io::Error),
    #[error("network namespace {name:?} does not exist ({path} is missing)")]
    NoNetns { name: String, path: PathBuf },
    #[error("entering network namespace {name:?}: {source}")]
    Setns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "attaching to TAP {name:?}: permission denied (needs CAP_NET_ADMIN, or the interface \
         exists and belongs to another user, or is not a TAP)"
    )]
    AttachPermission { name: String },
    #[error("attaching to TAP {name:?}: it is in use by another process")]
    Busy { name: String },
    #[error("attaching to TAP {name:?}: {source} (a TUN device or another kind of interface of that name?)")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("the namespace helper thread failed: {0}")]
    Helper(String),
}

/// Linux `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union's first bytes.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    // The union is 24 bytes on x86_64; the kernel copies the whole struct.
    _pad: [u8; 22],
}

fn valid_name(name: &str) -> bool {
    name.len() < IFNAMSIZ && valid_name_chars(name) && name != "." && name != ".."
}

/// One TAP interface, open non-blocking. Dropping it closes the descriptor (a non-persistent
/// interface that it created disappears then).
pub struct Tap {
    file: File,
    name: String,
    /// The io_uring its batches go through (`None`: one frame per system call).
    uring: Option<Mutex<IoUring>>,
    /// Batch slot size: the interface's MTU when it opened, plus an Ethernet header and a VLAN
    /// tag, at least 2 KiB.
    slot: usize,
    /// Set once a frame filled its slot, or the kernel refused a non-waiting read: batches stop,
    /// one frame per call from then on.
    per_frame: AtomicBool,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("batched", &self.uring.is_some())
            .field("slot", &self.slot)
            .finish()
    }
}

/// Whether TAPs batch their I/O: yes unless `VIGIL_TAP_IO=frame` (the benchmark's baseline).
fn batching_wanted() -> bool {
    std::env::var("VIGIL_TAP_IO").map_or(true, |v| v != "frame")
}

/// An io_uring for one TAP's batches, or `None` (logged) when the kernel refuses one.
fn uring_for(name: &str) -> Option<Mutex<IoUring>> {
    if !batching_wanted() {
        return None;
    }
    match IoUring::new(2 * BATCH as u32) {
        Ok(ring) => Some(Mutex::new(ring)),
        Err(e) => {
            log::warn!("TAP {name}: no io_uring ({e}): one frame per system call");
            None
        }
    }
}

impl Tap {
    /// Opens (creating it if needed) the TAP interface `name`, in the network namespace `netns`
    /// (a name under /run/netns, as `ip netns add` makes) or in the caller's own when `None`.
    pub fn open(name: &str, netns: Option<&str>) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let (file, mtu) = match netns {
            None => open_here(name)?,
            Some(ns) => {
                if !valid_name_netns(ns) {
                    return Err(TapError::BadNetnsName(ns.to_string()));
                }
                let path = Path::new(NETNS_DIR).join(ns);
                let ns_file = File::open(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => TapError::NoNetns {
                        name: ns.to_string(),
                        path: path.clone(),
                    },
                    _ => TapError::Setns {
                        name: ns.to_string(),
                        source: e,
                    },
                })?;
                let tap_name = name.to_string();
                let ns_name = ns.to_string();
                // The namespace switch is per thread: do it on a thread that ends right after,
                // so no VMM thread is ever left inside the tenant's namespace.
                std::thread::Builder::new()
                    .name("vigil-tap-netns".into())
                    .spawn(move || {
                        // SAFETY: setns on this thread only, with a descriptor we own.
                        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(TapError::Setns {
                                name: ns_name,
                                source: io::Error::last_os_error(),
                            });
                        }
                        open_here(&tap_name)
                    })
                    .map_err(|e| TapError::Helper(e.to_string()))?
                    .join()
                    .map_err(|_| TapError::Helper("panicked".into()))??
            }
        };
        let slot = (mtu + 18).next_multiple_of(64).clamp(2048, MAX_FRAME);
        Ok(Tap {
            file,
            name: name.to_string(),
            uring: uring_for(name),
            slot,
            per_frame: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The slot size of this TAP's batches; `None` when it moves one frame per call.
    pub fn batch_slot(&self) -> Option<usize> {
        match &self.uring {
            Some(_) if !self.per_frame.load(Ordering::Relaxed) => Some(self.slot),
            _ => None,
        }
    }

    /// Reads the frames queued, up to a batch, with one `io_uring_enter`; `WouldBlock` when none
    /// is. Slots a read left empty (a frame arrived between two reads) have length 0.
    pub fn read_batch(&self, batch: &mut FrameBatch) -> io::Result<usize> {
        let Some(uring) = &self.uring else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        let mut ring = uring.lock().unwrap_or_else(|p| p.into_inner());
        let fd = types::Fd(self.file.as_raw_fd());
        let len = batch.slot_size().min(u32::MAX as usize) as u32;
        {
            let mut sq = ring.submission();
            for i in 0..BATCH {
                // RWF_NOWAIT: with nothing queued, complete with EAGAIN now rather than park the
                // read on the descriptor's poll queue (which io_uring does even for a
                // non-blocking descriptor).
                let read = opcode::Read::new(fd, batch.slot_ptr(i), len)
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data(i as u64);
                // SAFETY: each read targets its own slot of `batch`, which outlives it: every
                // submitted read completes before this function returns (submit_and_wait below,
                // and RWF_NOWAIT completes them at once).
                if unsafe { sq.push(&read) }.is_err() {
                    return Err(io::Error::other("io_uring submission queue full"));
                }
            }
        }
        ring.submit_and_wait(BATCH)?;
        let (mut last, mut error) = (None, None);
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            match cqe.result() {
                n if n > 0 && i < BATCH => {
                    let n = n as usize;
                    if n >= batch.slot_size() {
                        // Cut to the slot: the MTU grew. Read any size from now on.
                        self.per_frame.store(true, Ordering::Relaxed);
                    }
                    batch.set_len(i, n);
                    last = Some(last.map_or(i, |l: usize| l.max(i)));
                }
                n if i < BATCH => {
                    batch.set_len(i, 0);
                    if -n == libc::EOPNOTSUPP || -n == libc::EINVAL {
                        // A kernel whose TAP does not take RWF_NOWAIT: one frame per call.
                        if !self.per_frame.swap(true, Ordering::Relaxed) {
                            log::warn!(
                                "TAP {}: no non-waiting io_uring reads: one frame per system call",
                                self.name
                            );
                        }
                        error = Some(io::ErrorKind::Interrupted.into());
                    } else if n < 0 && -n != libc::EAGAIN && -n != libc::EINTR {
                        error = Some(io::Error::from_raw_os_error(-n));
                    }
                }
                _ => {}
            }
        }
        match (last, error) {
            (Some(last), _) => {
                batch.set_count(last + 1);
                Ok(last + 1)
            }
            (None, Some(e)) => Err(e),
            (None, None) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Writes every frame of `batch` with one `io_uring_enter`; how many were written before
    /// the first that failed (that one's error when it was the first).
    pub fn write_batch(&self, batch: &FrameBatch) -> io::Result<usize> {
        let Some(uring) = &self.uring else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        let n = batch.len();
        if n == 0 {
            return Ok(0);
        }
        let mut ring = uring.lock().unwrap_or_else(|p| p.into_inner());
        let fd = types::Fd(self.file.as_raw_fd());
        {
            let mut sq = ring.submission();
            for i in 0..n {
                let frame = batch.frame(i);
                let write = opcode::Write::new(fd, frame.as_ptr(), frame.len() as u32)
                    .build()
                    .user_data(i as u64);
                // SAFETY: each write reads its own frame of `batch`, borrowed until this
                // function returns, after every submitted write completed.
                if unsafe { sq.push(&write) }.is_err() {
                    return Err(io::Error::other("io_uring submission queue full"));
                }
            }
        }
        ring.submit_and_wait(n)?;
        let mut first_failed = n;
        let mut error = None;
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            if cqe.result() < 0 && i < first_failed {
                first_failed = i;
                error = Some(io::Error::from_raw_os_error(-cqe.result()));
            }
        }
        match error {
            Some(e) if first_failed == 0 => Err(e),
            _ => Ok(first_failed),
        }
    }

    /// Reads one frame; `WouldBlock` when none is queued. A frame longer than `buf` is truncated
    /// by the kernel (the caller sizes `buf` for the interface's MTU).
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read into a buffer we own, of its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: write from a buffer we own, of its length.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn valid_name_netns(name: &str) -> bool {
    name.len() <= 64 && valid_name_chars(name) && name != "." && name != ".."
}

fn valid_name_chars(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Opens /dev/net/tun in the current thread's network namespace and attaches it to `name`; the
/// interface's MTU with it (1500 when it cannot be read).
fn open_here(name: &str) -> Result<(File, usize), TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => TapError::NoTunDevice,
            io::ErrorKind::PermissionDenied => TapError::Permission,
            _ => TapError::Open(e),
        })?;
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    // valid_name() bounded the length below IFNAMSIZ, so the name keeps its NUL.
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let name = name.to_string();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::AttachPermission { name },
            Some(libc::EBUSY) => TapError::Busy { name },
            _ => TapError::Attach { name, source: e },
        });
    }
    Ok((file, mtu_here(name).unwrap_or(1500)))
}

/// The MTU of interface `name` in the current thread's network namespace.
fn mtu_here(name: &str) -> Option<usize> {
    #[repr(C)]
    struct IfReqMtu {
        name: [u8; IFNAMSIZ],
        mtu: libc::c_int,
        _pad: [u8; 20],
    }
    let mut req = IfReqMtu {
        name: [0; IFNAMSIZ],
        mtu: 0,
        _pad: [0; 20],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a datagram socket this function owns and closes; SIOCGIFMTU reads and writes a
    // `struct ifreq`, which `req` is laid out as.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return None;
        }
        let rc = libc::ioctl(sock, libc::SIOCGIFMTU, &mut req as *mut IfReqMtu);
        libc::close(sock);
        (rc == 0 && req.mtu > 0).then_some(req.mtu as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_system_call() {
        for bad in ["", "sixteen-bytes-xx", "a/b", "a b", "..", "tap\0"] {
            assert!(
                matches!(Tap::open(bad, None), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
        for bad in ["", "..", "a/b", "../../proc/1/ns/net"] {
            assert!(
                matches!(Tap::open("vt0", Some(bad)), Err(TapError::BadNetnsName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let err = Tap::open("vt0", Some("vigil-no-such-namespace")).unwrap_err();
        assert!(matches!(err, TapError::NoNetns { .. }), "{err}");
        assert!(err.to_string().contains("vigil-no-such-namespace"));
    }

    /// Runs `ip ARGS`; whether it succeeded.
    fn ip(args: &[&str]) -> bool {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Batched reads and writes through a real TAP in a network namespace (needs root; skipped
    /// without it): an empty queue answers `WouldBlock` at once, a burst the namespace sends comes
    /// out in batches, in order, and a batch written arrives as that many frames.
    #[test]
    fn a_tap_reads_and_writes_frames_in_batches() {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 || !Path::new(TUN_DEVICE).exists() {
            eprintln!("skipped: needs root and {TUN_DEVICE}");
            return;
        }
        let ns = format!("vgt-batch-{}", std::process::id());
        assert!(ip(&["netns", "add", &ns]));
        struct Cleanup(String);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = ip(&["netns", "del", &self.0]);
            }
        }
        let _cleanup = Cleanup(ns.clone());
        let tap = Tap::open("vgtb0", Some(&ns)).expect("open the TAP");
        if tap.batch_slot().is_none() {
            eprintln!("skipped: no io_uring here (or VIGIL_TAP_IO=frame)");
            return;
        }
        let netns_path = format!("{NETNS_DIR}/{ns}");
        let in_ns = move |f: Box<dyn FnOnce() + Send>| {
            let path = netns_path.clone();
            std::thread::spawn(move || {
                let file = File::open(path).unwrap();
                // SAFETY: setns on this thread only, with a descriptor we own.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0);
                f()
            })
            .join()
            .unwrap()
        };
        in_ns(Box::new(|| {
            for key in ["all", "default", "vgtb0"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1");
            }
        }));
        for args in [
            vec!["-n", &ns, "addr", "add", "10.251.0.1/24", "dev", "vgtb0"],
            vec!["-n", &ns, "link", "set", "vgtb0", "up"],
            vec![
                "-n",
                &ns,
                "neigh",
                "add",
                "10.251.0.2",
                "lladdr",
                "02:00:00:00:00:02",
                "dev",
                "vgtb0",
                "nud",
                "permanent",
            ],
        ] {
            assert!(ip(&args), "ip {args:?}");
        }
        let mut batch = FrameBatch::new(tap.batch_slot().unwrap());
        // Nothing queued: WouldBlock at once (a read the kernel parked would hang here).
        let mut drained = 0;
        loop {
            batch.clear();
            match tap.read_batch(&mut batch) {
                Ok(n) => drained += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                    break;
                }
            }
            assert!(drained < 1000, "the TAP never ran dry");
        }
        // A burst of 50 datagrams from the namespace: 50 frames, in order, over few reads.
        in_ns(Box::new(|| {
            let s = std::net::UdpSocket::bind("10.251.0.1:0").unwrap();
            for i in 0..50u8 {
                s.send_to(&[i; 20], "10.251.0.2:9").unwrap();
            }
        }));
        let (mut got, mut calls) = (Vec::new(), 0);
        while got.len() < 50 && calls < 200 {
            batch.clear();
            calls += 1;
            match tap.read_batch(&mut batch) {
                Ok(n) => {
                    for i in 0..n {
                        let f = batch.frame(i);
                        if f.len() >= 62 && f[12..14] == [0x08, 0x00] && f[23] == 17 {
                            got.push(f[42]);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("read_batch: {e}"),
            }
        }
        assert_eq!(got, (0..50u8).collect::<Vec<_>>(), "in {calls} reads");
        // A batch of 20 frames written: the interface receives 20 more.
        let rx = || {
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "cat",
                    "/sys/class/net/vgtb0/statistics/rx_packets",
                ])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0)
                })
                .unwrap_or(0)
        };
        let before = rx();
        batch.clear();
        for _ in 0..20 {
            let slot = batch.next_slot().unwrap();
            slot[..6].copy_from_slice(&[0xff; 6]);
            slot[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            slot[12..14].copy_from_slice(&[0x88, 0xb5]);
            batch.commit(60);
        }
        assert_eq!(tap.write_batch(&batch).unwrap(), 20);
        assert_eq!(rx() - before, 20);
    }
}
