//! The verdict channel over real UDP sockets on 127.0.0.1: what is accepted arrives intact, and
//! forged, replayed, altered or garbage datagrams are rejected with the right reason.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use edge::channel::{
    key_from_hex, load_key, KeyError, Received, VerdictReceiver, VerdictSender, MIN_KEY_LEN,
};
use vigil_wire::auth::{self, AuthError, MAX_DATAGRAM, MAX_RECORDS};
use vigil_wire::verdict::{v4, IpVersion, Protocol, Rule, VerdictRepr, RECORD_LEN};

/// Generous: loopback delivers in microseconds; this only bounds a failing test.
const WAIT: Duration = Duration::from_secs(5);

fn key(byte: u8) -> Vec<u8> {
    vec![byte; MIN_KEY_LEN]
}

fn records(n: usize) -> Vec<[u8; RECORD_LEN]> {
    (0..n)
        .map(|i| {
            let rule = Rule::egress_to(
                IpVersion::V4,
                Protocol::Tcp,
                v4([192, 0, 2, (i % 250) as u8]),
                1000 + i as u16,
            );
            VerdictRepr::add(3, i as u64 + 1, 60_000, rule).to_bytes()
        })
        .collect()
}

fn receiver(key: Vec<u8>) -> VerdictReceiver {
    VerdictReceiver::bind("127.0.0.1:0", key).unwrap()
}

fn next(rx: &mut VerdictReceiver) -> Received {
    rx.recv(WAIT).unwrap().expect("a datagram within the wait")
}

fn rejected(received: Received) -> AuthError {
    match received {
        Received::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn accepted_records_arrive_intact_and_in_order() {
    let mut rx = receiver(key(1));
    let mut tx = VerdictSender::connect(rx.local_addr().unwrap(), key(1), 77).unwrap();
    let sent = records(MAX_RECORDS + 5);
    assert_eq!(tx.send(&sent).unwrap(), 2);
    assert_eq!(tx.send(&[]).unwrap(), 0);
    assert_eq!(tx.next_seq(), 3);

    let mut got = Vec::new();
    for expected_seq in [1, 2] {
        match next(&mut rx) {
            Received::Accepted {
                from,
                sender,
                seq,
                records,
            } => {
                assert_eq!(from, tx.local_addr().unwrap());
                assert_eq!(sender, 77);
                assert_eq!(seq, expected_seq);
                got.extend(records);
            }
            other => panic!("rejected: {other:?}"),
        }
    }
    assert_eq!(got, sent);
    for (got, sent) in got.iter().zip(&sent) {
        assert_eq!(
            VerdictRepr::from_bytes(got).unwrap(),
            VerdictRepr::from_bytes(sent).unwrap()
        );
    }
    let stats = rx.stats();
    assert_eq!(stats.accepted_datagrams, 2);
    assert_eq!(stats.accepted_records, (MAX_RECORDS + 5) as u64);
    assert_eq!(stats.rejected_total(), 0);
    // Nothing else is queued.
    assert_eq!(rx.recv(Duration::from_millis(20)).unwrap(), None);
}

#[test]
fn another_key_is_rejected_and_does_not_move_the_window() {
    let mut rx = receiver(key(1));
    let addr = rx.local_addr().unwrap();
    // The forger claims the real sender's id and a high sequence number.
    let mut forger = VerdictSender::connect(addr, key(2), 77)
        .unwrap()
        .with_first_seq(1_000_000)
        .unwrap();
    forger.send(&records(3)).unwrap();
    assert_eq!(rejected(next(&mut rx)), AuthError::BadTag);

    // The real sender, numbering from 1, is still accepted: the forgery moved nothing.
    let mut tx = VerdictSender::connect(addr, key(1), 77).unwrap();
    tx.send(&records(1)).unwrap();
    assert!(matches!(
        next(&mut rx),
        Received::Accepted {
            sender: 77,
            seq: 1,
            ..
        }
    ));
    assert_eq!(rx.stats().rejected_for(&AuthError::BadTag), 1);
    assert_eq!(
        rx.stats().rejected_by_name().collect::<Vec<_>>(),
        vec![("bad_tag", 1)]
    );
}

#[test]
fn man_in_the_middle_replay_and_tamper_are_rejected() {
    let mut rx = receiver(key(9));
    let rx_addr = rx.local_addr().unwrap();
    // The sender believes the relay is the edge; the relay sees every datagram.
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    relay.set_read_timeout(Some(WAIT)).unwrap();
    let mut tx = VerdictSender::connect(relay.local_addr().unwrap(), key(9), 5).unwrap();
    let mut buf = [0u8; 2048];

    tx.send(&records(2)).unwrap();
    let (len, _) = relay.recv_from(&mut buf).unwrap();
    let captured = buf[..len].to_vec();

    // Forwarded once: accepted. Replayed: rejected, twice over.
    relay.send_to(&captured, rx_addr).unwrap();
    assert!(matches!(next(&mut rx), Received::Accepted { seq: 1, .. }));
    relay.send_to(&captured, rx_addr).unwrap();
    assert_eq!(
        rejected(next(&mut rx)),
        AuthError::Replayed { sender: 5, seq: 1 }
    );
    relay.send_to(&captured, rx_addr).unwrap();
    assert!(matches!(
        rejected(next(&mut rx)),
        AuthError::Replayed { .. }
    ));

    // The next datagram, altered in a record (widen a port range): rejected by the tag.
    tx.send(&records(2)).unwrap();
    let (len, _) = relay.recv_from(&mut buf).unwrap();
    let mut tampered = buf[..len].to_vec();
    tampered[auth::HEADER_LEN + 60] ^= 0xFF;
    relay.send_to(&tampered, rx_addr).unwrap();
    assert_eq!(rejected(next(&mut rx)), AuthError::BadTag);
    // The genuine copy, delivered late, is still accepted once.
    relay.send_to(&buf[..len], rx_addr).unwrap();
    assert!(matches!(next(&mut rx), Received::Accepted { seq: 2, .. }));

    let stats = rx.stats();
    assert_eq!(stats.accepted_datagrams, 2);
    assert_eq!(stats.accepted_records, 4);
    assert_eq!(
        stats.rejected_for(&AuthError::Replayed { sender: 0, seq: 0 }),
        2
    );
    assert_eq!(stats.rejected_for(&AuthError::BadTag), 1);
}

#[test]
fn sealed_by_hand_reordered_and_too_old() {
    let k = key(4);
    let mut rx = receiver(k.clone());
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.connect(rx.local_addr().unwrap()).unwrap();
    let recs = records(1);
    let send = |seq: u64| {
        let mut out = [0u8; MAX_DATAGRAM];
        let len = auth::seal(&k, 8, seq, 0, &recs, &mut out).unwrap();
        raw.send(&out[..len]).unwrap();
    };
    // Out of order within the window: each accepted once.
    for seq in [500, 498, 499] {
        send(seq);
        assert!(matches!(next(&mut rx), Received::Accepted { seq: s, .. } if s == seq));
    }
    send(499);
    assert!(matches!(
        rejected(next(&mut rx)),
        AuthError::Replayed { seq: 499, .. }
    ));
    send(500 - auth::REPLAY_WINDOW);
    assert!(matches!(
        rejected(next(&mut rx)),
        AuthError::TooOld { highest: 500, .. }
    ));
    // An operator reset lets a reinstalled host start again.
    assert!(rx.forget_sender(8));
    send(1);
    assert!(matches!(next(&mut rx), Received::Accepted { seq: 1, .. }));
}

#[test]
fn garbage_is_rejected() {
    let mut rx = receiver(key(1));
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.connect(rx.local_addr().unwrap()).unwrap();

    raw.send(&[]).unwrap();
    assert_eq!(rejected(next(&mut rx)), AuthError::Truncated { len: 0 });
    raw.send(b"GET /api/v1/verdicts HTTP/1.1\r\nHost: edge.example\r\nAccept: */*\r\n\r\n")
        .unwrap();
    assert_eq!(rejected(next(&mut rx)), AuthError::BadMagic);
    // Right magic and version, random rest.
    let mut junk = vec![0x5Au8; 200];
    junk[..4].copy_from_slice(&auth::MAGIC);
    junk[4] = auth::VERSION;
    junk[5] = 0;
    raw.send(&junk).unwrap();
    assert!(matches!(
        rejected(next(&mut rx)),
        AuthError::BadLength { .. } | AuthError::TooManyRecords(_)
    ));
    // Larger than any valid datagram (not cut down to a plausible size).
    raw.send(&[0u8; 3000]).unwrap();
    assert!(matches!(
        rejected(next(&mut rx)),
        AuthError::Oversize { .. }
    ));
    assert_eq!(rx.stats().rejected_total(), 4);
    assert_eq!(rx.stats().accepted_datagrams, 0);
}

#[test]
fn recv_times_out_without_traffic() {
    let mut rx = receiver(key(1));
    let start = Instant::now();
    assert_eq!(rx.recv(Duration::from_millis(30)).unwrap(), None);
    assert!(start.elapsed() >= Duration::from_millis(25));
}

#[test]
fn short_keys_are_refused_by_both_ends() {
    assert!(VerdictReceiver::bind("127.0.0.1:0", vec![1; MIN_KEY_LEN - 1]).is_err());
    assert!(VerdictSender::connect("127.0.0.1:9", vec![1; MIN_KEY_LEN - 1], 1).is_err());
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
    let recs = records(MAX_RECORDS);
    let mut out = [0u8; MAX_DATAGRAM];
    let iterations = if cfg!(debug_assertions) { 500 } else { 20_000 };
    let mut len = 0;
    let start = Instant::now();
    for seq in 1..=iterations {
        len = auth::seal(&k, 1, seq, 0, &recs, &mut out).unwrap();
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
