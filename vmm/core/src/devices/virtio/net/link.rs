//! Where a virtio-net device's frames go: one datagram per Ethernet frame, non-blocking.
//!
//! Owns: the [`FrameLink`] trait and its implementations for a TAP device and a datagram socket.
//! Must not: block (the backend thread polls the link's fd), or cut or join frames.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use crate::devices::tap::Tap;

/// Where a device's frames go: one datagram per Ethernet frame, non-blocking.
pub trait FrameLink: AsRawFd + Send {
    /// Receives one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize>;
}

impl FrameLink for Tap {
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_frame(buf)
    }
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.write_frame(frame)
    }
}

/// One end of a `socketpair(AF_UNIX, SOCK_DGRAM)`, set non-blocking by the caller: a link to
/// another device or process in the same host (and the tests' way to see frames without root).
impl FrameLink for UnixDatagram {
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.send(frame)
    }
}
