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
    let mut store = [FlowSlot::EMPTY; slots_for(56)];
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
        assert_eq!(ct.slot(i).key(), Some(k));
        assert_eq!(ct.remove(i).tenant(), k.tenant);
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
    let mut store = [FlowSlot::EMPTY; slots_for(28)];
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
    // SAFETY: FlowSlot is repr(C), 32 bytes of integers and arrays with no padding (its size
    // is asserted), so every byte is initialised.
    let bytes: [u8; 32] = unsafe { core::mem::transmute(FlowSlot::EMPTY) };
    assert!(bytes.iter().all(|b| *b == 0));
    let mut store = [FlowSlot::EMPTY; slots_for(28)];
    let mut ct = Conntrack::new_empty(&mut store, 3).unwrap();
    assert_eq!(ct.used(), 0);
    let k = key(1);
    let Probe::Vacant(i) = ct.lookup(&k, ct.hash(&k), 0) else {
        panic!("an empty table found a key")
    };
    ct.insert(i, &k, Direction::Egress, TcpState::None, V, 100);
    assert!(matches!(ct.lookup(&k, ct.hash(&k), 0), Probe::Found(_)));
}

fn v6_tcp_key(n: u32) -> FlowKey {
    let mut local = [0u8; 16];
    local[..2].copy_from_slice(&[0xfd, 0x00]);
    local[15] = 2;
    let mut remote = [0u8; 16];
    remote[..2].copy_from_slice(&[0x20, 0x01]);
    remote[12..].copy_from_slice(&n.to_be_bytes());
    FlowKey {
        tenant: 3,
        ip_version: IpVersion::V6,
        protocol: Protocol::Tcp,
        local,
        remote,
        local_port: 40000,
        remote_port: 443,
    }
}

fn insert_key(ct: &mut Conntrack<'_>, k: &FlowKey, tcp: TcpState) -> usize {
    let Probe::Vacant(i) = ct.lookup(k, ct.hash(k), 0) else {
        panic!("{k:?} already in the table")
    };
    assert!(!ct.is_full());
    ct.insert(i, k, Direction::Egress, tcp, V, 100);
    i
}

/// IPv6 addresses and TCP windows live in the pools: every key comes back whole, removal moves
/// entries without losing what the pools hold for them, and freed pool entries are reused.
#[test]
fn pooled_addresses_and_windows_follow_their_entries() {
    let mut store = [FlowSlot::EMPTY; slots_for(56)];
    let mut ct = Conntrack::new(&mut store, 17).unwrap();
    for n in 0..56 {
        let i = insert_key(&mut ct, &v6_tcp_key(n), TcpState::SynSent);
        // Each flow's window is its own: the opener's end is its number.
        let syn = TcpSeg {
            seq: n * 1000,
            ack: 0,
            win: 100,
            wscale: NO_WSCALE,
            mss: 0,
            len: 0,
        };
        let flags = TcpFlags {
            syn: true,
            ..TcpFlags::default()
        };
        assert_eq!(ct.track(i, true, flags, &syn), Track::InWindow);
    }
    assert_eq!((ct.v6.fresh, ct.tcp.fresh), (56, 56));
    for n in (0..56).step_by(2) {
        let k = v6_tcp_key(n);
        let Probe::Found(i) = ct.lookup(&k, ct.hash(&k), 0) else {
            panic!("lost {n}")
        };
        ct.remove(i);
    }
    for n in 0..56 {
        let k = v6_tcp_key(n);
        match ct.lookup(&k, ct.hash(&k), 0) {
            Probe::Found(i) => {
                assert_eq!(n % 2, 1, "removed key {n} still found");
                let flow = ct.slot(i);
                assert_eq!(flow.key(), Some(k));
                assert_eq!(flow.window(true).end, n * 1000, "key {n}'s window");
            }
            Probe::Vacant(_) => assert_eq!(n % 2, 0, "lost key {n}"),
        }
    }
    // A key that differs only in its address misses (the fold and the pool both compare).
    let mut other = v6_tcp_key(1);
    other.remote[0] ^= 1;
    assert!(matches!(
        ct.lookup(&other, ct.hash(&other), 0),
        Probe::Vacant(_)
    ));
    // New flows take the freed entries: neither pool reaches further into its memory.
    for n in 100..128 {
        insert_key(&mut ct, &v6_tcp_key(n), TcpState::SynSent);
    }
    assert_eq!((ct.v6.fresh, ct.tcp.fresh), (56, 56));
    assert_eq!(ct.iter().count(), 56);
    for flow in ct.iter() {
        let k = flow.key().unwrap();
        assert!(matches!(ct.lookup(&k, ct.hash(&k), 0), Probe::Found(_)));
    }
}

/// IPv4 flows that are not TCP use the hash slots alone: their pools are never touched, so a
/// zeroed table's pool pages stay untouched.
#[test]
fn ipv4_udp_flows_touch_no_pool() {
    let mut store = [FlowSlot::EMPTY; slots_for(56)];
    let mut ct = Conntrack::new_empty(&mut store, 23).unwrap();
    for n in 0..56 {
        insert_key(&mut ct, &key(n), TcpState::None);
    }
    assert_eq!((ct.v6.fresh, ct.tcp.fresh), (0, 0));
    assert_eq!(ct.slot(0).window(true), TcpWindow::default());
    // An entry without TCP state has no window for a segment to be in.
    let k = key(3);
    let Probe::Found(i) = ct.lookup(&k, ct.hash(&k), 0) else {
        panic!("lost key 3")
    };
    let seg = TcpSeg {
        seq: 1,
        ack: 1,
        win: 1,
        wscale: NO_WSCALE,
        mss: 0,
        len: 0,
    };
    assert_eq!(
        ct.track(i, true, TcpFlags::default(), &seg),
        Track::OutOfWindow
    );
}

/// Random inserts, removals, expiries, sweeps and half-open evictions of IPv4 and IPv6, TCP and
/// UDP flows, against a model of what the table holds: every live key is found whole, nothing
/// else is, and each flow holds its own pool entries, no more (no entry shared, none leaked).
#[test]
fn random_churn_matches_a_model_and_no_pool_entry_leaks_or_is_shared() {
    extern crate std;
    use std::collections::{HashMap, HashSet};
    const FLOWS: usize = 96;
    let mut store = std::vec![FlowSlot::EMPTY; slots_for(FLOWS)];
    let mut ct = Conntrack::new(&mut store, 0x5eed).unwrap();
    let mut model: HashMap<FlowKey, u32> = HashMap::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut now = 0u32;
    for step in 0..60_000 {
        let r = next();
        let n = (r >> 8) as u32 % 160;
        let tcp = r & 1 != 0;
        let mut k = if r & 2 != 0 { v6_tcp_key(n) } else { key(n) };
        if !tcp {
            k.protocol = Protocol::Udp;
        }
        k.tenant = 1 + (r >> 4) as u32 % 3;
        match (r >> 32) % 100 {
            0..=54 => {
                let h = ct.hash(&k);
                if let Probe::Vacant(i) = ct.lookup(&k, h, now) {
                    if ct.needs_room(i) && ct.is_full() {
                        continue;
                    }
                    if !ct.needs_room(i) {
                        // An expired entry on the key's path is overwritten in place.
                        let old = ct.slot(i).key().unwrap();
                        assert!(model.remove(&old).is_some_and(|e| e <= now), "step {step}");
                    }
                    let state = match (tcp, (r >> 40) % 3) {
                        (false, _) => TcpState::None,
                        (true, 0) => TcpState::SynSent,
                        (true, _) => TcpState::Established,
                    };
                    let expires = now + 1 + (r >> 48) as u32 % 8;
                    ct.insert(i, &k, Direction::Egress, state, V, expires);
                    model.insert(k, expires);
                }
            }
            55..=74 => {
                if let Probe::Found(i) = ct.lookup(&k, ct.hash(&k), now) {
                    ct.remove(i);
                    assert!(model.remove(&k).is_some(), "step {step}");
                }
            }
            75..=89 => now += (r >> 40) as u32 % 3,
            90..=96 => {
                ct.sweep(now, 1 + (r >> 40) as usize % 64, |_, expired| expired);
            }
            _ => {
                ct.evict_half_open(k.tenant, now, 32, |_, _| {});
            }
        }
        // What left the table through a sweep or an eviction leaves the model.
        let held: HashSet<FlowKey> = ct.iter().map(|f| f.key().unwrap()).collect();
        model.retain(|k, _| held.contains(k));
        assert_eq!(
            held.len(),
            model.len(),
            "step {step}: the table holds keys the model lost"
        );
        assert_eq!(ct.used(), model.len(), "step {step}");
        for (k, &expires) in &model {
            let found = ct.lookup(k, ct.hash(k), now);
            match found {
                Probe::Found(i) => {
                    assert!(expires > now, "step {step}: an expired entry was found");
                    assert_eq!(ct.slot(i).key(), Some(*k), "step {step}");
                }
                Probe::Vacant(_) => assert!(expires <= now, "step {step}: lost {k:?}"),
            }
        }
        // Each TCP flow holds one TCP entry and each IPv6 flow one address entry, its own.
        let (mut tcp_held, mut v6_held) = (HashSet::new(), HashSet::new());
        for f in ct.iter() {
            let tcp = f.slot.tcp;
            assert_eq!(tcp != 0, f.key().unwrap().protocol == Protocol::Tcp);
            assert!(
                tcp == 0 || tcp_held.insert(tcp),
                "step {step}: a shared TCP entry"
            );
            assert!(
                !f.is_v6() || v6_held.insert(f.v6_index()),
                "step {step}: shared addresses"
            );
        }
        assert_eq!(
            ct.tcp.in_use(),
            tcp_held.len(),
            "step {step}: TCP entries leaked"
        );
        assert_eq!(
            ct.v6.in_use(),
            v6_held.len(),
            "step {step}: address entries leaked"
        );
    }
    assert!(ct.tcp.fresh as usize <= table_slots_for(FLOWS));
}
