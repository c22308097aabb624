//! Many VXLAN datagrams per system call: `recvmmsg(2)` and `sendmmsg(2)` on the endpoint's UDP
//! socket, each datagram gathered from (or scattered into) its 8-byte VXLAN header and its frame
//! in a [`FrameBatch`] slot, so a frame is never copied to move its header.
//!
//! The message arrays live on the caller's stack (a few KiB for [`BATCH`] messages): nothing is
//! allocated per call.
//!
//! The socket addresses are converted by hand (IPv4 and IPv6 only): `socket2` 0.6 cannot wrap a
//! `sockaddr_storage` that `recvmmsg` filled (rust-lang/socket2#613), and `std` has no public
//! conversion.
//!
//! Owns: the message arrays and the address conversions. Must not: judge or learn anything (the
//! endpoint does, per datagram), or hand out a datagram the kernel cut (`MSG_TRUNC`).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use crate::devices::virtio::net::{FrameBatch, BATCH};

use super::VXLAN_HEADER_LEN;

/// What `recvmmsg` gave for one datagram.
#[derive(Clone, Copy)]
pub(super) struct Received {
    /// Its sender, if an IPv4 or IPv6 address.
    pub from: Option<SocketAddr>,
    /// The whole datagram's length (header and frame).
    pub len: usize,
    /// The kernel cut it to the header and slot (it was longer).
    pub truncated: bool,
}

impl Received {
    const NONE: Received = Received {
        from: None,
        len: 0,
        truncated: false,
    };
}

/// A batch's message arrays, zeroed.
type Arrays = (
    [[libc::iovec; 2]; BATCH],
    [libc::sockaddr_storage; BATCH],
    [libc::mmsghdr; BATCH],
);

fn zeroed_arrays() -> Arrays {
    // SAFETY: all-zero is a valid value of these plain C structs (null pointers, zero lengths).
    unsafe { zeroed() }
}

/// Receives up to [`BATCH`] datagrams without waiting: datagram `i`'s header into `headers[i]`,
/// its frame into slot `i` of `batch`, what the kernel said of it into `got[i]`. Returns how many
/// (`WouldBlock` when none was waiting). The batch's lengths and count are the caller's to set.
pub(super) fn recv(
    fd: RawFd,
    batch: &mut FrameBatch,
    headers: &mut [[u8; VXLAN_HEADER_LEN]; BATCH],
    got: &mut [Received; BATCH],
) -> io::Result<usize> {
    let slot = batch.slot_size();
    let (mut iovs, mut names, mut msgs) = zeroed_arrays();
    for i in 0..BATCH {
        iovs[i][0] = libc::iovec {
            iov_base: headers[i].as_mut_ptr().cast(),
            iov_len: VXLAN_HEADER_LEN,
        };
        iovs[i][1] = libc::iovec {
            iov_base: batch.slot_ptr(i).cast(),
            iov_len: slot,
        };
        let hdr = &mut msgs[i].msg_hdr;
        hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = iovs[i].as_mut_ptr();
        hdr.msg_iovlen = 2;
    }
    // SAFETY: every message points at its own header array, its own slot of `batch` (`slot`
    // bytes) and its own name storage, all of which outlive the call; the kernel writes at most
    // those lengths.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        got[i] = Received {
            from: from_sockaddr(&names[i], msgs[i].msg_hdr.msg_namelen),
            len: msgs[i].msg_len as usize,
            truncated: msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    for g in got.iter_mut().skip(n) {
        *g = Received::NONE;
    }
    Ok(n)
}

/// Sends `header` + frame `frame` of `batch` to `to`, for each `(frame, to)` of `list`, in one
/// `sendmmsg` per [`BATCH`] entries. Returns how many entries went before the first that failed
/// (all of them: `list.len()`); an error only when the very first one failed.
pub(super) fn send(
    fd: RawFd,
    header: &[u8; VXLAN_HEADER_LEN],
    batch: &FrameBatch,
    list: &[(usize, SocketAddr)],
) -> io::Result<usize> {
    let mut done = 0;
    for chunk in list.chunks(BATCH) {
        let (mut iovs, mut names, mut msgs) = zeroed_arrays();
        for (i, (frame, to)) in chunk.iter().enumerate() {
            let frame = batch.frame(*frame);
            // The kernel only reads through these pointers (sendmmsg), so casting the shared
            // borrows to `*mut` is sound.
            iovs[i][0] = libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: VXLAN_HEADER_LEN,
            };
            iovs[i][1] = libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            };
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_namelen = to_sockaddr(to, &mut names[i]);
            hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_iov = iovs[i].as_mut_ptr();
            hdr.msg_iovlen = 2;
        }
        // SAFETY: the first `chunk.len()` messages point at live buffers of the lengths given
        // (the shared header, frames of `batch`, their name storage) for the whole call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                chunk.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return if done == 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(done)
            };
        }
        done += n as usize;
        if (n as usize) < chunk.len() {
            return Ok(done);
        }
    }
    Ok(done)
}

/// `addr` as a C socket address in `out`; returns its length.
fn to_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// The IPv4 or IPv6 address in `storage` (`len` bytes of it valid), if it is one.
fn from_sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it holds a sockaddr_in, and `len` covers one.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_convert_both_ways() {
        for addr in [
            "192.0.2.7:4789",
            "[2001:db8::7]:4789",
            "[fe80::1%3]:9",
            "0.0.0.0:0",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
            let len = to_sockaddr(&addr, &mut storage);
            assert_eq!(from_sockaddr(&storage, len), Some(addr));
            // Too short a length, or another family: no address.
            assert_eq!(from_sockaddr(&storage, len - 1), None);
        }
        // SAFETY: as above.
        let mut unix: libc::sockaddr_storage = unsafe { zeroed() };
        unix.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(from_sockaddr(&unix, 110), None);
    }
}
