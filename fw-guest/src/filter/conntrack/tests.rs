//! Unit tests of the flow table.

use super::*;
use vigil_wire::verdict::{v4, IpVersion, Protocol};

fn key(n: u32) -> FlowKey {
    FlowKey {
        tenant: 1,
        ip_version: IpVersion::V4,
        protocol: Protocol::Udp,
        local: v4([10, 0, 0, 2]),
        remote: v4(n.to_be_bytes()),
        local_port: 1000,
        remote_port: 53,
    }
}

const V: VerdictRef = VerdictRef { slot: 0, gen: 0 };

#[test]
fn insert_find_remove_many() {
    let mut store = [FlowSlot::EMPTY; 64];
    let mut ct = Conntrack::new(&mut store, 99).unwrap();
    assert_eq!(ct.capacity(), 56);
    for n in 0..56 {
        let k = key(n);
        let h = ct.hash(&k);
        let Probe::Vacant(i) = ct.lookup(&k, h, 0) else {
            panic!("dup")
        };
        assert!(!ct.is_full());
        ct.insert(i, &k, Direction::Egress, TcpState::None, V, 100);
    }
    assert!(ct.is_full());
    // Remove every other key, then every remaining one must still be found.
    for n in (0..56).step_by(2) {
        let k = key(n);
        let Probe::Found(i) = ct.lookup(&k, ct.hash(&k), 0) else {
            panic!("lost {n}")
        };
        assert_eq!(ct.remove(i).key(), Some(k));
    }
    for n in 0..56 {
        let k = key(n);
        let found = matches!(ct.lookup(&k, ct.hash(&k), 0), Probe::Found(_));
        assert_eq!(found, n % 2 == 1, "key {n}");
    }
    assert_eq!(ct.used(), 28);
}

#[test]
fn sweep_reclaims_expired_only() {
    let mut store = [FlowSlot::EMPTY; 32];
    let mut ct = Conntrack::new(&mut store, 5).unwrap();
    for n in 0..20 {
        let k = key(n);
        let Probe::Vacant(i) = ct.lookup(&k, ct.hash(&k), 0) else {
            panic!()
        };
        ct.insert(
            i,
            &k,
            Direction::Egress,
            TcpState::None,
            V,
            if n < 10 { 5 } else { 50 },
        );
    }
    let mut seen = 0;
    let removed = ct.sweep(10, 1000, |_, expired| {
        seen += usize::from(expired);
        expired
    });
    assert_eq!((removed, seen), (10, 10));
    assert_eq!(ct.used(), 10);
    for n in 10..20 {
        let k = key(n);
        assert!(matches!(ct.lookup(&k, ct.hash(&k), 10), Probe::Found(_)));
    }
}

/// The micro-VM leaves its flow table as the VMM's zeroed RAM gave it (`Conntrack::new_empty`):
/// that is sound only while an empty slot is all zero bytes.
#[test]
fn an_empty_slot_is_all_zero_bytes_so_zeroed_ram_is_an_empty_table() {
    // SAFETY: FlowSlot is repr(C), 80 bytes of integers and arrays with no padding (its size
    // is asserted), so every byte is initialised.
    let bytes: [u8; 80] = unsafe { core::mem::transmute(FlowSlot::EMPTY) };
    assert!(bytes.iter().all(|b| *b == 0));
    let mut store = [FlowSlot::EMPTY; 32];
    let mut ct = Conntrack::new_empty(&mut store, 3).unwrap();
    assert_eq!(ct.used(), 0);
    let k = key(1);
    let Probe::Vacant(i) = ct.lookup(&k, ct.hash(&k), 0) else {
        panic!("an empty table found a key")
    };
    ct.insert(i, &k, Direction::Egress, TcpState::None, V, 100);
    assert!(matches!(ct.lookup(&k, ct.hash(&k), 0), Probe::Found(_)));
}
