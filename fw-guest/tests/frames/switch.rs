//! A switch with one attached tenant port and the neighbour-frame builders its tests share
//! (switch_hygiene.rs, switch_neighbors.rs).

use std::sync::atomic::{AtomicU64, Ordering};

use fw_guest::filter::neighbor::REPLY_MAX;
use fw_guest::filter::{Admit, Filter, IpVersion, Protocol, Rule, VerdictRepr, UPLINK_TENANT};

use super::*;

pub const PORT: usize = 1;
pub const UPLINK: usize = 0;
pub const GW: [u8; 4] = [10, 0, 0, 1];
pub const GW6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 9];
pub const BCAST: [u8; 6] = [0xff; 6];
pub const T_MAC: [u8; 6] = TENANT_MAC.0;
pub const G_MAC: [u8; 6] = GW_MAC.0;

pub fn v4(a: [u8; 4]) -> [u8; 16] {
    vigil_wire::verdict::v4(a)
}

/// Tenant 1 behind port 1 with MAC `TENANT_MAC`, 10.0.0.2 and 2001:db8::2; the uplink on port 0;
/// verdicts opening TCP and ICMP echo to 10.0.0.5 and TCP to 2001:db8::5.
pub fn switch() -> Filter<'static> {
    let mut f = filter_with(64, 8);
    f.tenancy_mut().set_boot_port(UPLINK, UPLINK_TENANT);
    let mac = Some(TENANT_MAC.0);
    for (seq, addr) in [
        (1, (IpVersion::V4, v4(TENANT))),
        (2, (IpVersion::V6, TENANT6)),
    ] {
        let r = VerdictRepr::attach_with_mac(T1, seq, Some(PORT as u16), Some(addr), mac);
        // Through the wire form, as the VMM sends it.
        f.apply_record(&r.to_bytes(), 0).unwrap();
    }
    let mut seq = 2;
    for (proto, version, server) in [
        (Protocol::Tcp, IpVersion::V4, v4(SERVER)),
        (Protocol::Icmp, IpVersion::V4, v4(SERVER)),
        (Protocol::Tcp, IpVersion::V6, SERVER6),
    ] {
        seq += 1;
        let rule = Rule::egress_to(
            version,
            proto,
            server,
            if proto == Protocol::Tcp { 80 } else { 0 },
        );
        f.apply(&VerdictRepr::add(T1, seq, 0, rule), 0).unwrap();
    }
    assert_eq!(f.tenancy().identity(PORT).mac, TENANT_MAC.0);
    f
}

/// A clock for [`admit`]: a second later at every call, so the port's budget of neighbour frames
/// never runs out in tests that are not about it (those call `Filter::admit` with their times).
static CLOCK: AtomicU64 = AtomicU64::new(SEC);

/// [`Filter::admit`] on the tenant port, its reply buffer dropped.
pub fn admit(f: &mut Filter<'_>, frame: &[u8]) -> Admit {
    admit_reply(f, frame).0
}

/// [`Filter::admit`] on the tenant port, with what the switch built (answer or request).
pub fn admit_reply(f: &mut Filter<'_>, frame: &[u8]) -> (Admit, Vec<u8>) {
    let mut reply = [0u8; REPLY_MAX];
    let now = CLOCK.fetch_add(SEC, Ordering::Relaxed);
    let a = f.admit(PORT, frame, now, &mut reply);
    let built = match a {
        Admit::Reply(n) | Admit::Uplink(n) => reply[..n].to_vec(),
        _ => Vec::new(),
    };
    (a, built)
}

/// An Ethernet/IPv4 ARP frame, every field chosen by the caller (42 bytes, unpadded).
pub fn arp(
    op: u16,
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&eth_dst);
    b.extend_from_slice(&eth_src);
    b.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    b.extend_from_slice(&op.to_be_bytes());
    b.extend_from_slice(&sha);
    b.extend_from_slice(&spa);
    b.extend_from_slice(&tha);
    b.extend_from_slice(&tpa);
    b
}

/// `frame` zero-padded to the Ethernet minimum.
pub fn padded(mut frame: Vec<u8>) -> Vec<u8> {
    frame.resize(frame.len().max(60), 0);
    frame
}

/// A neighbour solicitation from the tenant to the target's solicited-node multicast.
pub fn ns(src: [u8; 16], target: [u8; 16]) -> Vec<u8> {
    let mut b = ndp_solicit(src, target, 255);
    b[0..6].copy_from_slice(&[0x33, 0x33, 0xff, target[13], target[14], target[15]]);
    b
}

/// Recompute the ICMPv6 checksum of an untagged IPv6 frame after an edit.
pub fn refill_checksum(frame: &mut [u8]) {
    use smoltcp::wire::{Icmpv6Packet, Ipv6Packet};
    let ip = Ipv6Packet::new_checked(&frame[14..]).unwrap();
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let mut icmp = Icmpv6Packet::new_unchecked(&mut frame[14 + 40..]);
    icmp.fill_checksum(&src, &dst);
}

/// An IPv6 neighbour discovery frame: `body` (the ICMPv6 message, checksum filled here) from
/// `eth_src`/`src` to `eth_dst`/`dst`, hop limit 255.
pub fn nd_raw(
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    body: &[u8],
) -> Vec<u8> {
    let mut fr = ip_frame_hops(
        Ip::V6(src),
        Ip::V6(dst),
        smoltcp::wire::IpProtocol::Icmpv6,
        body,
        255,
    );
    fr[0..6].copy_from_slice(&eth_dst);
    fr[6..12].copy_from_slice(&eth_src);
    refill_checksum(&mut fr);
    fr
}

/// An NA body: `flags` (R 0x80, S 0x40, O 0x20), `target`, a target link-layer option `mac`.
pub fn na_body(flags: u8, target: [u8; 16], mac: [u8; 6]) -> Vec<u8> {
    let mut b = vec![136, 0, 0, 0, flags, 0, 0, 0];
    b.extend_from_slice(&target);
    b.extend_from_slice(&[2, 1]);
    b.extend_from_slice(&mac);
    b
}

/// An NS body for `target` with the given options (raw bytes).
pub fn ns_body(target: [u8; 16], options: &[u8]) -> Vec<u8> {
    let mut b = vec![135, 0, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&target);
    b.extend_from_slice(options);
    b
}

/// The solicited-node address of `target` and its MAC.
pub fn solicited(target: [u8; 16]) -> ([u8; 16], [u8; 6]) {
    let mut a = [0u8; 16];
    a[0] = 0xff;
    a[1] = 0x02;
    a[11] = 1;
    a[12] = 0xff;
    a[13..].copy_from_slice(&target[13..]);
    (a, [0x33, 0x33, 0xff, target[13], target[14], target[15]])
}
