//! The verdict channel over real UDP sockets on 127.0.0.1: what the edge applies arrives intact,
//! once, in order per host, also through a relay that loses 30% of the datagrams both ways; the
//! host's link retransmits until acknowledged, within a bounded window; forged, stale, replayed or
//! garbage datagrams are never applied; restarts of either end are recovered from.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edge::channel::{
    key_from_hex, load_key, KeyError, Keyring, Received, VerdictReceiver, MIN_KEY_LEN,
};
use edge::link::{Class, LinkConfig, LinkError, VerdictLink};
use vigil_wire::ack::{open_ack, ACK_LEN};
use vigil_wire::auth::{self, AuthError, Header, MAX_DATAGRAM, MAX_RECORDS};
use vigil_wire::verdict::{v4, IpVersion, Protocol, Rule, VerdictRepr, RECORD_LEN};

/// Generous: loopback delivers in microseconds; this only bounds a failing test.
const WAIT: Duration = Duration::from_secs(10);

fn key(byte: u8) -> Vec<u8> {
    vec![byte; MIN_KEY_LEN]
}

fn records(n: usize, base: usize) -> Vec<[u8; RECORD_LEN]> {
    (0..n)
        .map(|i| {
            let i = base + i;
            let rule = Rule::egress_to(
                IpVersion::V4,
                Protocol::Tcp,
                v4([192, 0, 2, (i % 250) as u8]),
                (1000 + i % 60_000) as u16,
            );
            VerdictRepr::add(3, i as u64 + 1, 60_000, rule).to_bytes()
        })
        .collect()
}

fn fast() -> LinkConfig {
    LinkConfig {
        rto_initial: Duration::from_millis(5),
        rto_max: Duration::from_millis(50),
        ..LinkConfig::default()
    }
}

/// One applied record and its sender.
type Applied = (u32, [u8; RECORD_LEN]);

/// An edge's receiving loop on its own thread: applies into a list, in the order given.
struct Edge {
    addr: SocketAddr,
    applied: Arc<Mutex<Vec<Applied>>>,
    events: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<VerdictReceiver>>,
}

impl Edge {
    fn start(rx: VerdictReceiver) -> Edge {
        let addr = rx.local_addr().unwrap();
        let applied = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, e, s) = (applied.clone(), events.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut rx = rx;
            while !s.load(Ordering::Acquire) {
                let got = rx
                    .recv(Duration::from_millis(20), |d| {
                        a.lock()
                            .unwrap()
                            .extend(d.records.iter().map(|rec| (d.sender, *rec)));
                        true
                    })
                    .unwrap();
                if let Some(got) = got {
                    e.lock().unwrap().push(got);
                }
            }
            rx
        });
        Edge {
            addr,
            applied,
            events,
            stop,
            thread: Some(thread),
        }
    }

    fn applied(&self) -> Vec<[u8; RECORD_LEN]> {
        self.applied
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| *r)
            .collect()
    }

    fn stop(mut self) -> VerdictReceiver {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP relay between a link and an edge that drops `loss_pct`% of the datagrams each way
/// (a fixed-seed xorshift decides, so a failure reproduces) and can capture what passes.
struct LossyRelay {
    addr: SocketAddr,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, u64)>>,
}

impl LossyRelay {
    fn start(edge: SocketAddr, loss_pct: u64) -> LossyRelay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(edge).unwrap();
        front.set_nonblocking(true).unwrap();
        back.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let captured = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (captured.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            let mut lose = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % 100 < loss_pct
            };
            let (mut passed, mut dropped) = (0, 0);
            let mut host: Option<SocketAddr> = None;
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Acquire) {
                let mut idle = true;
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    idle = false;
                    host = Some(from);
                    c.lock().unwrap().push(buf[..n].to_vec());
                    if lose() {
                        dropped += 1;
                    } else {
                        passed += 1;
                        let _ = back.send(&buf[..n]);
                    }
                }
                if let Ok(n) = back.recv(&mut buf) {
                    idle = false;
                    if lose() {
                        dropped += 1;
                    } else if let Some(host) = host {
                        passed += 1;
                        let _ = front.send_to(&buf[..n], host);
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            (passed, dropped)
        });
        LossyRelay {
            addr,
            captured,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_link_delivers_in_order_once_and_is_acknowledged() {
    let edge = Edge::start(VerdictReceiver::bind("127.0.0.1:0", key(1)).unwrap());
    let link = VerdictLink::connect(edge.addr, key(1), 77, 1000, fast()).unwrap();
    let mut sent = Vec::new();
    let mut last = 0;
    for (i, n) in [1, MAX_RECORDS + 5, 3].into_iter().enumerate() {
        let batch = records(n, i * 100);
        last = link.send(&batch, Class::Verdict).unwrap().last_ticket;
        sent.extend(batch);
    }
    assert!(link.wait_acked(last, WAIT), "acknowledged");
    assert_eq!(link.outstanding(), 0);
    assert_eq!(edge.applied(), sent);
    assert_ne!(link.edge_boot(), 0);
    let rx = edge.stop();
    // The hello, then four datagrams (one batch needed two).
    assert_eq!(rx.stats().accepted_datagrams, 5);
    assert_eq!(rx.stats().accepted_records, sent.len() as u64);
    assert!(rx.stats().acks_sent >= 5);
}

#[test]
fn thirty_percent_loss_both_ways_still_delivers_everything_once_in_order() {
    let edge = Edge::start(VerdictReceiver::bind("127.0.0.1:0", key(2)).unwrap());
    let relay = LossyRelay::start(edge.addr, 30);
    let link = VerdictLink::connect(relay.addr, key(2), 5, 1, fast()).unwrap();
    let mut sent = Vec::new();
    let mut last = 0;
    for i in 0..200 {
        let batch = records(1 + i % 3, i * 10);
        last = link.send(&batch, Class::Verdict).unwrap().last_ticket;
        sent.extend(batch);
    }
    // A revocation last: applied after everything before it.
    let flush = VerdictRepr::flush_tenant(3, 9999).to_bytes();
    let last_flush = link.send(&[flush], Class::Control).unwrap().last_ticket;
    assert!(last_flush > last);
    sent.push(flush);
    assert!(link.wait_acked(last_flush, WAIT), "acknowledged under loss");
    assert_eq!(edge.applied(), sent, "every record once, in order");
    let (passed, dropped) = relay.stop();
    let rx = edge.stop();
    let retransmits = link.stats().retransmits.load(Ordering::Relaxed);
    eprintln!(
        "relay passed {passed} dropped {dropped}; link retransmits {retransmits}; edge held \
         {} duplicates {}",
        rx.stats().held,
        rx.stats().duplicates
    );
    assert!(dropped > 0 && retransmits > 0);
    assert!(
        rx.stats().held > 0,
        "losses left gaps that later datagrams waited behind"
    );
}

#[test]
fn forgeries_are_never_applied_or_acknowledged() {
    let edge = Edge::start(VerdictReceiver::bind("127.0.0.1:0", key(1)).unwrap());
    // The forger claims the real sender's id and a high sequence number.
    let forger = VerdictLink::connect(edge.addr, key(2), 77, 1_000_000, fast()).unwrap();
    let t = forger.send(&records(3, 0), Class::Verdict).unwrap();
    assert!(!forger.wait_acked(t.last_ticket, Duration::from_millis(200)));
    assert_eq!(forger.edge_boot(), 0, "no ack ever reached the forger");
    // The real sender, numbering from 1, is applied: the forgery moved nothing.
    let link = VerdictLink::connect(edge.addr, key(1), 77, 1, fast()).unwrap();
    let t = link.send(&records(1, 50), Class::Verdict).unwrap();
    assert!(link.wait_acked(t.last_ticket, WAIT));
    drop(forger);
    assert_eq!(edge.applied(), records(1, 50));
    let rx = edge.stop();
    assert!(rx.stats().rejected_for(&AuthError::BadTag) >= 2);
    // Besides the forgeries, only the real host's first datagram, sent before it knew the
    // edge's boot id.
    assert_eq!(
        rx.stats()
            .rejected_by_name()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        vec!["bad_tag", "other_edge"]
    );
}

#[test]
fn a_replayed_datagram_is_a_duplicate_and_changes_nothing() {
    let edge = Edge::start(VerdictReceiver::bind("127.0.0.1:0", key(9)).unwrap());
    let relay = LossyRelay::start(edge.addr, 0);
    let link = VerdictLink::connect(relay.addr, key(9), 5, 1, fast()).unwrap();
    let revoke = VerdictRepr::flush_tenant(3, 1).to_bytes();
    let t = link.send(&records(2, 0), Class::Verdict).unwrap();
    let t2 = link.send(&[revoke], Class::Control).unwrap();
    assert!(link.wait_acked(t.last_ticket.max(t2.last_ticket), WAIT));
    let applied = edge.applied();
    // Replay every datagram the host sent (the verdicts after their revocation included).
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    let captured = relay.captured.lock().unwrap().clone();
    // Judged before the replays (retransmissions, a first datagram for an earlier edge run):
    // the wait below counts only the replays' own.
    let judged = || {
        edge.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Received::Duplicate { .. } | Received::Rejected { .. }))
            .count()
    };
    let before = judged();
    for d in &captured {
        raw.send_to(d, edge.addr).unwrap();
    }
    wait_until("the replays judged", || judged() >= before + captured.len());
    assert_eq!(edge.applied(), applied, "nothing applied again");
    let rx = edge.stop();
    assert!(rx.stats().duplicates >= 3);
    relay.stop();
}

fn seal(k: &[u8], header: Header, recs: &[[u8; RECORD_LEN]]) -> Vec<u8> {
    let mut out = [0u8; MAX_DATAGRAM];
    let len = auth::seal(k, &header, recs, &mut out).unwrap();
    out[..len].to_vec()
}

fn recv_ack(raw: &UdpSocket, k: &[u8]) -> vigil_wire::ack::Ack {
    let mut buf = [0u8; ACK_LEN + 1];
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let n = raw.recv(&mut buf).expect("an ack");
    open_ack(k, &buf[..n]).unwrap()
}

#[test]
fn runs_and_boot_ids_by_hand() {
    let k = key(4);
    let mut rx = VerdictReceiver::bind_with_boot("127.0.0.1:0", k.clone(), 0xB00).unwrap();
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.connect(rx.local_addr().unwrap()).unwrap();
    let recs = records(1, 0);
    let h = |epoch, seq, edge_boot| Header {
        sender: 8,
        seq,
        epoch,
        edge_boot,
        ..Header::default()
    };
    let mut applied = Vec::new();
    let mut judge = |rx: &mut VerdictReceiver| {
        rx.recv(WAIT, |d| {
            applied.push((d.seq, d.restarted));
            true
        })
        .unwrap()
        .expect("a datagram")
    };
    // For another run of the edge (or sent before the host knew it): refused, and the ack says
    // which run speaks now.
    raw.send(&seal(&k, h(100, 100, 0), &recs)).unwrap();
    assert!(matches!(
        judge(&mut rx),
        Received::Rejected {
            reason: AuthError::OtherEdge { .. },
            ..
        }
    ));
    let ack = recv_ack(&raw, &k);
    assert_eq!((ack.edge_boot, ack.next), (0xB00, 0));
    // 101 before 100: held, then both in order.
    raw.send(&seal(&k, h(100, 101, 0xB00), &recs)).unwrap();
    assert!(matches!(judge(&mut rx), Received::Held { seq: 101, .. }));
    assert_eq!(recv_ack(&raw, &k).next, 100);
    raw.send(&seal(&k, h(100, 100, 0xB00), &recs)).unwrap();
    assert!(matches!(
        judge(&mut rx),
        Received::Applied { datagrams: 2, .. }
    ));
    assert_eq!(recv_ack(&raw, &k).next, 102);
    // Far ahead: refused rather than held.
    raw.send(&seal(&k, h(100, 100_000, 0xB00), &recs)).unwrap();
    assert!(matches!(
        judge(&mut rx),
        Received::Rejected {
            reason: AuthError::TooFarAhead { .. },
            ..
        }
    ));
    assert_eq!(recv_ack(&raw, &k).next, 102);
    // The host restarts: a newer run starts over, and the restart is reported.
    raw.send(&seal(&k, h(500, 500, 0xB00), &recs)).unwrap();
    assert!(matches!(judge(&mut rx), Received::Applied { seq: 500, .. }));
    recv_ack(&raw, &k);
    // The older run, replayed: refused; the ack names the run the edge follows.
    raw.send(&seal(&k, h(100, 102, 0xB00), &recs)).unwrap();
    assert!(matches!(
        judge(&mut rx),
        Received::Rejected {
            reason: AuthError::StaleEpoch { current: 500, .. },
            ..
        }
    ));
    assert_eq!(recv_ack(&raw, &k).epoch, 500);
    assert_eq!(
        applied,
        vec![(100, None), (101, None), (500, Some(100))],
        "in order, the restart reported once"
    );
}

/// A host's datagram copied by someone on the path and sent from their own address is authentic
/// (the tag covers only what the host wrote), but the host signed the address it sends from: the
/// copy is refused, and neither its sequence number nor the host's address goes to the relay.
#[test]
fn a_datagram_relayed_from_another_address_is_refused_and_the_original_applies() {
    let k = key(9);
    let mut rx = VerdictReceiver::bind_with_boot("127.0.0.1:0", k.clone(), 0xB01).unwrap();
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = UdpSocket::bind("127.0.0.2:0").unwrap();
    let header = Header {
        sender: 12,
        seq: 50,
        epoch: 50,
        edge_boot: 0xB01,
        underlay: Some(host.local_addr().unwrap().ip()),
        ..Header::default()
    };
    let datagram = seal(&k, header, &records(1, 0));
    let judge = |rx: &mut VerdictReceiver| rx.recv(WAIT, |_| true).unwrap().expect("one");
    // The relay is first.
    relay.send_to(&datagram, rx.local_addr().unwrap()).unwrap();
    assert!(matches!(
        judge(&mut rx),
        Received::Rejected {
            reason: AuthError::Relayed { sender: 12 },
            ..
        }
    ));
    // The host's own copy: applied, and acknowledged to it alone.
    host.send_to(&datagram, rx.local_addr().unwrap()).unwrap();
    assert!(matches!(judge(&mut rx), Received::Applied { seq: 50, .. }));
    host.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; ACK_LEN + 1];
    let n = host.recv(&mut buf).expect("an ack");
    assert_eq!(open_ack(&k, &buf[..n]).unwrap().next, 51);
    relay.set_nonblocking(true).unwrap();
    assert!(
        relay.recv(&mut buf).is_err(),
        "nothing acknowledged to the relay"
    );
    assert_eq!(
        rx.stats().rejected[AuthError::Relayed { sender: 0 }.index()],
        1
    );
}

/// Hosts held to keys of their own: a datagram opens only under its sender's key of the id it
/// names; the shared key no longer speaks for such a sender; acks come under the same key.
#[test]
fn a_sender_with_own_keys_is_held_to_them() {
    let shared = key(1);
    let (k8, k9) = (key(8), key(9));
    let keys = Arc::new(std::sync::RwLock::new(
        Keyring::shared(shared.clone()).unwrap(),
    ));
    keys.write()
        .unwrap()
        .set_sender(8, vec![(3, k8.clone())])
        .unwrap();
    keys.write()
        .unwrap()
        .set_sender(9, vec![(1, k9.clone())])
        .unwrap();
    let mut rx = VerdictReceiver::bind_keyring("127.0.0.1:0", keys.clone(), 0xB0).unwrap();
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.connect(rx.local_addr().unwrap()).unwrap();
    let recs = records(1, 0);
    let h = |key_id, sender, seq| Header {
        key_id,
        sender,
        seq,
        epoch: 100,
        edge_boot: 0xB0,
        ..Header::default()
    };
    let judge = |rx: &mut VerdictReceiver| rx.recv(WAIT, |_| true).unwrap().expect("a datagram");
    let rejected = |r: &Received| match r {
        Received::Rejected { reason, .. } => Some(*reason),
        _ => None,
    };
    // Sender 8 under its own key 3: applied, and acked under that key (id 3).
    raw.send(&seal(&k8, h(3, 8, 100), &recs)).unwrap();
    assert!(matches!(
        judge(&mut rx),
        Received::Applied { sender: 8, .. }
    ));
    let mut buf = [0u8; ACK_LEN + 1];
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let n = raw.recv(&mut buf).unwrap();
    assert_eq!(vigil_wire::ack::claimed_key_id(&buf[..n]), Some(3));
    assert!(
        open_ack(&shared, &buf[..n]).is_err(),
        "not under the shared key"
    );
    assert_eq!(open_ack(&k8, &buf[..n]).unwrap().next, 101);
    // The shared key (id 0) no longer speaks for sender 8.
    raw.send(&seal(&shared, h(0, 8, 101), &recs)).unwrap();
    assert_eq!(
        rejected(&judge(&mut rx)),
        Some(AuthError::UnknownKey {
            sender: 8,
            key_id: 0
        })
    );
    // Host 9 signs as sender 8 with its own key, naming 8's key id: 8's key does not open it.
    raw.send(&seal(&k9, h(3, 8, 101), &recs)).unwrap();
    assert_eq!(rejected(&judge(&mut rx)), Some(AuthError::BadTag));
    // A key id sender 8 does not have.
    raw.send(&seal(&k8, h(4, 8, 101), &recs)).unwrap();
    assert!(matches!(
        rejected(&judge(&mut rx)),
        Some(AuthError::UnknownKey { key_id: 4, .. })
    ));
    // A sender without own keys still may use the shared key.
    raw.send(&seal(&shared, h(0, 5, 100), &recs)).unwrap();
    assert!(matches!(
        judge(&mut rx),
        Received::Applied { sender: 5, .. }
    ));
    // Keys taken away (its host is gone): sender 9's own key opens nothing any more.
    keys.write().unwrap().set_sender(9, Vec::new()).unwrap();
    raw.send(&seal(&k9, h(1, 9, 100), &recs)).unwrap();
    assert!(matches!(
        rejected(&judge(&mut rx)),
        Some(AuthError::UnknownKey { sender: 9, .. })
    ));
    // Malformed key sets are refused whole.
    let mut ring = keys.write().unwrap();
    assert!(
        ring.set_sender(7, vec![(0, key(2))]).is_err(),
        "id 0 is the shared key's"
    );
    assert!(ring
        .set_sender(7, vec![(1, vec![1; MIN_KEY_LEN - 1])])
        .is_err());
    assert!(ring
        .set_sender(7, (1..=5).map(|i| (i, key(2))).collect())
        .is_err());
    assert!(!ring.key_ids().contains_key(&7));
    assert!(format!("{ring:?}").contains("senders"));
}

/// A host's own key rotated while verdicts flow: the link signs with the new key from then on,
/// and every record reaches the edge once, in order, with no shared key at the edge at all.
#[test]
fn a_rotation_of_a_hosts_own_key_loses_nothing() {
    let (k1, k2) = (key(0x11), key(0x22));
    let keys = Arc::new(std::sync::RwLock::new(Keyring::own_keys_only()));
    keys.write()
        .unwrap()
        .set_sender(4, vec![(1, k1.clone())])
        .unwrap();
    let rx = VerdictReceiver::bind_keyring("127.0.0.1:0", keys.clone(), 77).unwrap();
    let addr = rx.local_addr().unwrap();
    let edge = Edge::start(rx);
    let link = VerdictLink::connect_keyed(addr, (1, k1.clone()), 4, 10, fast()).unwrap();
    let t = link.send(&records(5, 0), Class::Verdict).unwrap();
    assert!(link.wait_acked(t.last_ticket, WAIT));
    // The edge learns key 2 first (both kept, as during a rotation), then the host signs with it.
    keys.write()
        .unwrap()
        .set_sender(4, vec![(1, k1), (2, k2.clone())])
        .unwrap();
    link.set_key(2, k2.clone()).unwrap();
    assert_eq!(link.key_id(), 2);
    let t = link.send(&records(5, 5), Class::Verdict).unwrap();
    assert!(link.wait_acked(t.last_ticket, WAIT));
    // Key 1 retired at the edge: the link goes on under key 2.
    keys.write().unwrap().set_sender(4, vec![(2, k2)]).unwrap();
    let t = link.send(&records(5, 10), Class::Verdict).unwrap();
    assert!(link.wait_acked(t.last_ticket, WAIT));
    assert_eq!(edge.applied(), records(15, 0));
    // A host whose key the edge does not hold is not heard: nothing more is applied.
    link.set_key(3, key(0x33)).unwrap();
    let t = link.send(&records(1, 15), Class::Verdict).unwrap();
    assert!(!link.wait_acked(t.last_ticket, Duration::from_millis(300)));
    assert_eq!(edge.applied().len(), 15);
    let rejected = edge.stop().stats().rejected_for(&AuthError::UnknownKey {
        sender: 4,
        key_id: 3,
    });
    assert!(rejected > 0, "the datagrams under key 3 were refused");
}

#[test]
fn a_restarted_edge_gets_the_unacknowledged_records_in_a_new_run() {
    let k = key(6);
    let rx = VerdictReceiver::bind_with_boot("127.0.0.1:0", k.clone(), 1).unwrap();
    let addr = rx.local_addr().unwrap();
    let edge = Edge::start(rx);
    let link = Arc::new(VerdictLink::connect(addr, k.clone(), 3, 10, fast()).unwrap());
    // The host's hook re-sends what still stands, from the link's own thread.
    let weak = Arc::downgrade(&link);
    link.on_edge_restart(Box::new(move || {
        if let Some(link) = weak.upgrade() {
            link.send(&records(1, 20), Class::Control).unwrap();
        }
    }));
    let t = link.send(&records(2, 0), Class::Verdict).unwrap();
    assert!(link.wait_acked(t.last_ticket, WAIT));
    assert_eq!(link.edge_boot(), 1);
    drop(edge.stop());
    // The edge restarts on the same address with a new boot id; the host's next records reach
    // it in a new run (the old one's numbers mean nothing to it).
    let edge = Edge::start(VerdictReceiver::bind_with_boot(addr, k, 2).unwrap());
    let t = link.send(&records(1, 7), Class::Control).unwrap();
    assert!(link.wait_acked(t.last_ticket, WAIT));
    assert_eq!(link.edge_boot(), 2);
    assert_eq!(link.stats().edge_restarts.load(Ordering::Relaxed), 1);
    wait_until("the hook's records applied", || edge.applied().len() == 2);
    let mut want = records(1, 7);
    want.extend(records(1, 20));
    assert_eq!(
        edge.applied(),
        want,
        "the unacknowledged record, then the hook's"
    );
}

/// An ack recorded from an earlier run of the edge, replayed after it restarted, is authentic but
/// stale: it must not pass for another restart (each one made the host start a new run and
/// re-send everything, and the edge flush the host's tenants). The test plays the edge by hand.
#[test]
fn a_replayed_ack_of_an_earlier_edge_run_is_not_a_restart() {
    use vigil_wire::ack::{seal_ack, Ack};
    let k = key(7);
    let edge = UdpSocket::bind("127.0.0.1:0").unwrap();
    edge.set_read_timeout(Some(WAIT)).unwrap();
    let link = VerdictLink::connect(edge.local_addr().unwrap(), k.clone(), 5, 40, fast()).unwrap();
    let restarts = || link.stats().edge_restarts.load(Ordering::Relaxed);
    // The next datagram from the link: its run and number, and where to answer.
    let next_datagram = || {
        let mut buf = [0u8; MAX_DATAGRAM];
        let (n, from) = edge.recv_from(&mut buf).unwrap();
        let d = auth::SignedBatch::new_checked(&buf[..n]).unwrap();
        (d.epoch(), d.seq(), from)
    };
    let ack = |epoch, next, edge_boot| {
        seal_ack(
            &k,
            &Ack {
                sender: 5,
                epoch,
                next,
                edge_boot,
                ..Ack::default()
            },
        )
        .unwrap()
    };
    // Run 1 of the edge takes the first records; its ack is recorded.
    // (The first ack tells the link which edge run speaks; it sends again, naming it.)
    let t = link.send(&records(1, 0), Class::Verdict).unwrap();
    let (mut recorded, mut host) = (None, None);
    for _ in 0..8 {
        let (epoch, seq, from) = next_datagram();
        let sealed = ack(epoch, seq + 1, 1);
        edge.send_to(&sealed, from).unwrap();
        (recorded, host) = (Some(sealed), Some(from));
        if link.wait_acked(t.last_ticket, Duration::from_millis(200)) {
            break;
        }
    }
    let (recorded, host) = (recorded.unwrap(), host.unwrap());
    assert!(link.wait_acked(t.last_ticket, WAIT));
    assert_eq!((link.edge_boot(), restarts()), (1, 0));
    // The edge restarts as run 2 and answers the host's next datagram: a restart, a new run.
    link.send(&records(1, 1), Class::Verdict).unwrap();
    let (epoch, _, _) = next_datagram();
    edge.send_to(&ack(epoch, 0, 2), host).unwrap();
    wait_until("the restart heard", || restarts() == 1);
    assert_eq!(link.edge_boot(), 2);
    // Run 1's ack, replayed: counted as stale, and nothing else happens.
    edge.send_to(&recorded, host).unwrap();
    wait_until("the replay seen", || {
        link.stats().acks_stale.load(Ordering::Relaxed) == 1
    });
    assert_eq!((link.edge_boot(), restarts()), (2, 1), "no second restart");
}

#[test]
fn the_window_is_bounded_and_an_unreachable_edge_is_reported() {
    // An edge that never answers: a bound socket nobody reads.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = LinkConfig {
        rto_initial: Duration::from_millis(5),
        rto_max: Duration::from_millis(40),
        window: 4,
        control_window: 6,
        unreachable_after: Duration::from_millis(100),
        local: None,
    };
    let link = VerdictLink::connect(silent.local_addr().unwrap(), key(1), 1, 1, config).unwrap();
    // The hello takes one slot.
    for i in 0..3 {
        link.send(&records(1, i), Class::Verdict).unwrap();
    }
    assert!(matches!(
        link.send(&records(1, 9), Class::Verdict),
        Err(LinkError::Backlog { outstanding: 4 })
    ));
    // Revocations still have room.
    link.send(&records(1, 10), Class::Control).unwrap();
    link.send(&records(1, 11), Class::Control).unwrap();
    assert!(link.send(&records(1, 12), Class::Control).is_err());
    wait_until("unreachable", || link.unreachable());
    // Bounded backoff, no busy loop: over 500 ms each of 6 datagrams is resent about every
    // 40 ms at most.
    let before = link.stats().retransmits.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    let resent = link.stats().retransmits.load(Ordering::Relaxed) - before;
    assert!((6..=6 * 20).contains(&resent), "{resent} retransmissions");
    assert_eq!(link.stats().refused_batches.load(Ordering::Relaxed), 2);
}

#[test]
fn garbage_is_rejected() {
    let mut rx = VerdictReceiver::bind("127.0.0.1:0", key(1)).unwrap();
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.connect(rx.local_addr().unwrap()).unwrap();
    let next = |rx: &mut VerdictReceiver| match rx.recv(WAIT, |_| true).unwrap() {
        Some(Received::Rejected { reason, .. }) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    };
    raw.send(&[]).unwrap();
    assert_eq!(next(&mut rx), AuthError::Truncated { len: 0 });
    raw.send(b"GET /api/v1/verdicts HTTP/1.1\r\nHost: edge.example\r\nAccept: */*\r\nUser-Agent: curl/8\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(next(&mut rx), AuthError::BadMagic);
    // Right magic and version, random rest.
    let mut junk = vec![0x5Au8; 200];
    junk[..4].copy_from_slice(&auth::MAGIC);
    junk[4] = auth::VERSION;
    junk[5] = 0;
    raw.send(&junk).unwrap();
    assert!(matches!(
        next(&mut rx),
        AuthError::BadLength { .. } | AuthError::TooManyRecords(_)
    ));
    // Larger than any valid datagram (not cut down to a plausible size).
    raw.send(&[0u8; 3000]).unwrap();
    assert!(matches!(next(&mut rx), AuthError::Oversize { .. }));
    // An ack sent to the edge is not a verdict datagram.
    let ack = vigil_wire::ack::seal_ack(
        &key(1),
        &vigil_wire::ack::Ack {
            edge_boot: 1,
            ..Default::default()
        },
    )
    .unwrap();
    raw.send(&ack).unwrap();
    assert!(matches!(
        next(&mut rx),
        AuthError::Truncated { .. } | AuthError::BadMagic
    ));
    assert_eq!(rx.stats().rejected_total(), 5);
    assert_eq!(rx.stats().accepted_datagrams, 0);
    assert_eq!(
        rx.stats().acks_sent,
        0,
        "nothing unauthenticated is answered"
    );
}

#[test]
fn recv_times_out_without_traffic() {
    let mut rx = VerdictReceiver::bind("127.0.0.1:0", key(1)).unwrap();
    let start = Instant::now();
    assert_eq!(rx.recv(Duration::from_millis(30), |_| true).unwrap(), None);
    assert!(start.elapsed() >= Duration::from_millis(25));
}

#[test]
fn short_keys_are_refused_by_both_ends() {
    assert!(VerdictReceiver::bind("127.0.0.1:0", vec![1; MIN_KEY_LEN - 1]).is_err());
    assert!(VerdictLink::connect("127.0.0.1:9", vec![1; MIN_KEY_LEN - 1], 1, 1, fast()).is_err());
}

fn key_file(name: &str, content: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-edge-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn key_loading() {
    let hex = "00112233445566778899aabbccddeeffFFEEDDCCBBAA99887766554433221100";
    let good = key_file("good", format!("  {hex}\n\n").as_bytes());
    let k = load_key(&good).unwrap();
    assert_eq!(k.len(), 32);
    assert_eq!(&k[..3], &[0x00, 0x11, 0x22]);
    assert_eq!(k[16], 0xFF);
    assert_eq!(key_from_hex(hex).unwrap(), k);

    let missing = std::env::temp_dir().join("vigil-no-such-key-file");
    let e = load_key(&missing).unwrap_err();
    assert!(matches!(e, KeyError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("does not exist"));

    let e = load_key(key_file("nothex", format!("{}zz", &hex[..62]).as_bytes())).unwrap_err();
    assert!(e.to_string().contains("not hex"), "{e}");
    assert!(
        matches!(e, KeyError::InFile { ref source, .. } if matches!(**source, KeyError::NotHex { offset: 62 }))
    );
    // Binary junk (not UTF-8) is reported the same way, not as a panic.
    let e = load_key(key_file("binary", &[0xff, 0xfe, 0x00, 0x41])).unwrap_err();
    assert!(e.to_string().contains("not hex"), "{e}");

    let e = load_key(key_file("short", &hex.as_bytes()[..62])).unwrap_err();
    assert!(e.to_string().contains("at least 32"), "{e}");
    assert!(matches!(
        key_from_hex(&hex[..63]),
        Err(KeyError::OddLength { digits: 63 })
    ));
    assert!(matches!(key_from_hex(" \n\t"), Err(KeyError::Empty)));
    // Internal whitespace is not part of the format.
    assert!(matches!(
        key_from_hex(&format!("{} {}", &hex[..32], &hex[32..])),
        Err(KeyError::NotHex { offset: 32 })
    ));

    let e = load_key(key_file("huge", &vec![b'a'; 10_000])).unwrap_err();
    assert!(matches!(e, KeyError::TooLarge { .. }), "{e}");
    assert!(load_key(std::env::temp_dir()).is_err());
}

/// Not a pass/fail test: prints the cost of sealing and opening a full datagram.
#[test]
fn seal_open_cost() {
    let k = key(3);
    let recs = records(MAX_RECORDS, 0);
    let mut out = [0u8; MAX_DATAGRAM];
    let iterations = if cfg!(debug_assertions) { 500 } else { 20_000 };
    let mut len = 0;
    let start = Instant::now();
    for seq in 1..=iterations {
        let header = Header {
            sender: 1,
            seq,
            epoch: 1,
            edge_boot: 7,
            ..Header::default()
        };
        len = auth::seal(&k, &header, &recs, &mut out).unwrap();
    }
    let seal_ns = start.elapsed().as_nanos() as f64 / iterations as f64;
    let start = Instant::now();
    for _ in 0..iterations {
        let opened = auth::open(&k, &out[..len]).unwrap();
        assert_eq!(opened.record_count(), MAX_RECORDS);
    }
    let open_ns = start.elapsed().as_nanos() as f64 / iterations as f64;
    println!(
        "{} records ({len} bytes), {} build: seal {:.2} µs, open {:.2} µs, seal+open {:.2} µs",
        MAX_RECORDS,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        seal_ns / 1e3,
        open_ns / 1e3,
        (seal_ns + open_ns) / 1e3
    );
}

/// The edge's tables may refuse verdicts; its acks say which, and its room. A batch its room
/// does not cover waits for the word (`wait_outcome`); one it covers goes on, and a refusal of
/// it reaches the host's hook. The "tables" here are this test's `apply`, which refuses every
/// record whose destination port is 4444 (the real edge's reporting: `tests/tests/edge_trust.rs`).
#[test]
fn refusals_reach_the_waiting_caller_or_the_hook_and_room_makes_a_batch_certain() {
    use edge::channel::Applied as Report;
    use edge::link::EdgeOutcome;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;

    const REFUSED_PORT: u16 = 4444;
    let k = key(9);
    let mut rx = VerdictReceiver::bind("127.0.0.1:0", k.clone()).unwrap();
    let addr = rx.local_addr().unwrap();
    let room = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, s) = (room.clone(), stop.clone());
    let edge = std::thread::spawn(move || {
        while !s.load(Ordering::Acquire) {
            rx.recv_reporting(Duration::from_millis(20), |d| {
                let mut report = Report {
                    room: r.load(Ordering::Acquire),
                    ..Report::default()
                };
                for (i, rec) in d.records.iter().enumerate() {
                    let v = VerdictRepr::from_bytes(rec).unwrap();
                    if v.rule.remote_port_min == REFUSED_PORT {
                        report.refused |= 1 << i;
                        report.reason = 17;
                    }
                }
                Some(report)
            })
            .unwrap();
        }
    });
    let link = VerdictLink::connect(addr, k, 5, 1, fast()).unwrap();
    let (hook_tx, hook_rx) = mpsc::channel();
    let hook_tx = Mutex::new(hook_tx);
    link.on_refused(Box::new(move |records, reason| {
        let _ = hook_tx.lock().unwrap().send((records.to_vec(), reason));
    }));
    let verdict = |port: u16, seq: u64| {
        let rule = Rule::egress_to(IpVersion::V4, Protocol::Udp, v4([192, 0, 2, 9]), port);
        VerdictRepr::add(3, seq, 60_000, rule).to_bytes()
    };

    // No room: each batch waits for its ack and learns what was refused.
    let q = link
        .send_waited(&[verdict(53, 1), verdict(REFUSED_PORT, 2)], Class::Verdict)
        .unwrap();
    assert!(!q.certain, "room 0 makes nothing certain");
    assert_eq!(
        link.wait_outcome(&q, WAIT),
        EdgeOutcome::Refused {
            records: 0b10,
            reason: 17
        }
    );
    let q = link.send_waited(&[verdict(53, 3)], Class::Verdict).unwrap();
    assert_eq!(link.wait_outcome(&q, WAIT), EdgeOutcome::Applied);

    // Room for 100: a batch within it is certain (no wait). The edge refuses it anyway (its
    // table filled from elsewhere): the hook gets exactly the refused record.
    room.store(100, Ordering::Release);
    let q = link.send(&[], Class::Control).unwrap();
    assert!(link.wait_acked(q.last_ticket, WAIT));
    let q = link
        .send_waited(&[verdict(REFUSED_PORT, 4), verdict(80, 5)], Class::Verdict)
        .unwrap();
    assert!(q.certain, "room 100 covers 2 records");
    let (records, reason) = hook_rx.recv_timeout(WAIT).expect("the hook hears of it");
    assert_eq!(records, vec![verdict(REFUSED_PORT, 4)]);
    assert_eq!(reason, 17);
    assert_eq!(link.stats().refused_unwaited.load(Ordering::Relaxed), 1);
    assert_eq!(link.stats().refused_records.load(Ordering::Relaxed), 2);

    // Beyond the room: not certain again.
    let many: Vec<_> = (0..101)
        .map(|i| verdict(1000 + i, 10 + u64::from(i)))
        .collect();
    let q = link.send_waited(&many, Class::Verdict).unwrap();
    assert!(!q.certain, "101 records exceed room 100");
    assert_eq!(link.wait_outcome(&q, WAIT), EdgeOutcome::Applied);
    stop.store(true, Ordering::Release);
    edge.join().unwrap();
}
