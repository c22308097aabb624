//! IPv4 options at both tiers: a source route (loose or strict) makes the judged destination
//! only the first hop, so such packets are refused as IPv6's routing header is; other options
//! are judged as before. Real frames, explicit clock.

mod frames;

use frames::*;
use fw_guest::filter::*;
use vigil_wire::verdict::v4;

/// `frame` (untagged IPv4) with `options` (a multiple of 4 bytes) after its fixed header.
fn with_ipv4_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut out = frame[..34].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&frame[34..]);
    out[14] = 0x40 | (5 + options.len() / 4) as u8;
    let total = u16::from_be_bytes([out[16], out[17]]) + options.len() as u16;
    out[16..18].copy_from_slice(&total.to_be_bytes());
    out
}

#[test]
fn ipv4_source_routes_are_refused() {
    let mut f = filter_with(64, 16);
    let rule = Rule::egress_to(IpVersion::V4, Protocol::Tcp, v4(SERVER), 443);
    f.apply(&VerdictRepr::add(T1, 1, 0, rule), 0).unwrap();
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    // A SYN the verdict opens, routed on by the server (loose or strict, after padding): the
    // server is only its first hop, and the route's next address no verdict names.
    let route = |kind: u8| [kind, 7, 4, 192, 0, 2, 99, 0];
    for (port, options) in [
        (40000, route(0x83).to_vec()),
        (40001, route(0x89).to_vec()),
        (
            40002,
            [&[1, 1, 1, 1][..], &route(0x83)[..], &[0; 4][..]].concat(),
        ),
    ] {
        let syn = with_ipv4_options(&tcp(a, b, port, 443, Seg::Syn), &options);
        assert_eq!(
            f.process(T1, Direction::Egress, &syn, 0),
            drop(DropReason::UnsupportedProtocol),
            "{options:?}"
        );
    }
    assert_eq!(f.conntrack().used(), 0);
    // Other options (record route, a router alert) are judged as before.
    let record = [7u8, 7, 4, 0, 0, 0, 0, 0];
    let alert = [0x94u8, 4, 0, 0];
    for (port, options) in [(40003, &record[..]), (40004, &alert[..])] {
        let syn = with_ipv4_options(&tcp(a, b, port, 443, Seg::Syn), options);
        assert_eq!(f.process(T1, Direction::Egress, &syn, 0), FWD);
    }
}
