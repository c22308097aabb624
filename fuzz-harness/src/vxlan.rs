//! VXLAN decapsulation and the learned forwarding table of a user-space VXLAN endpoint (a host's
//! uplink, an edge's cloud port): datagrams from the underlay, which anyone on it can send.
//!
//! Input: datagrams until the input ends, each a sender byte (one of 8 loopback peers), a u16
//! length and the bytes; then, per datagram taken, the frame is sent back toward its source MAC
//! (the FDB lookup and the flood).
//!
//! Invariants: a datagram is taken exactly when [`decapsulate`] finds a frame in it, the frame is
//! the datagram's bytes after the 8-byte header, and its source MAC (when unicast) is learned
//! behind the datagram's sender.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;

use vmm_core::devices::virtio::net::FrameLink;
use vmm_core::devices::vxlan::{decapsulate, Vxlan, VXLAN_HEADER_LEN};

use crate::Input;

const VNI: u32 = 7;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let link = Vxlan::bind(any, vec![], VNI).expect("bind VXLAN");
    let counters = link.counters();
    let mut buf = vec![0u8; 1600];
    let mut taken = 0u64;
    let mut datagrams = 0u64;
    while !input.is_empty() {
        let peer = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2 + (input.u8() % 8)), 9));
        let datagram = input.chunk(4096);
        datagrams += 1;
        let expected = decapsulate(datagram, VNI).filter(|f| f.len() <= buf.len());
        let got = link.accept_datagram(datagram, peer, &mut buf);
        assert_eq!(got, expected.map(<[u8]>::len), "decapsulation disagrees");
        let Some(n) = got else { continue };
        taken += 1;
        let frame = &buf[..n];
        assert_eq!(frame, &datagram[VXLAN_HEADER_LEN..]);
        let src: [u8; 6] = frame[6..12].try_into().expect("an Ethernet header");
        if src[0] & 1 == 0 {
            assert_eq!(link.peer_of(&src), Some(peer), "source MAC not learned");
        }
        // Back toward the source: unicast to the learned peer (sends to 127.0.0.x:9, discard).
        let mut reply = frame.to_vec();
        reply[..6].copy_from_slice(&src);
        let _ = link.send_frame(&reply);
    }
    assert_eq!(counters.rx_datagrams.load(Ordering::Relaxed), datagrams);
    assert_eq!(
        counters.rx_dropped.load(Ordering::Relaxed),
        datagrams - taken
    );
}
