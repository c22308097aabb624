//! TAP devices (the host side of a tenant's network interface).
//!
//! A [`Tap`] is a non-blocking file descriptor on `/dev/net/tun` attached to one TAP interface
//! (`IFF_TAP | IFF_NO_PI`: every read or write is exactly one Ethernet frame, no packet-info
//! prefix, no virtio-net header). The interface may live in another network namespace: the
//! namespace is entered on a short-lived helper thread that opens the device there, so no thread
//! of the VMM stays in it, and the descriptor keeps working from any thread afterwards.
//!
//! Owns: opening a TAP interface (in its namespace) and reading and writing its frames.
//! Must not: bring the link up or address it (the caller's job), leave the calling thread in
//! another namespace, or block.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

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
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if needed) the TAP interface `name`, in the network namespace `netns`
    /// (a name under /run/netns, as `ip netns add` makes) or in the caller's own when `None`.
    pub fn open(name: &str, netns: Option<&str>) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = match netns {
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
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
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

/// Opens /dev/net/tun in the current thread's network namespace and attaches it to `name`.
fn open_here(name: &str) -> Result<File, TapError> {
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
    Ok(file)
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
}
