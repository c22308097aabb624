//! The signed verdict channel as the edge receives it: real UDP datagrams on loopback into an
//! [`edge::channel::VerdictReceiver`] (structure, HMAC tag, replay window), then every record
//! of an accepted datagram decoded.
//!
//! Input: datagrams until the input ends, each a mode byte and its operands:
//! - even mode: a raw datagram (u16 length, bytes) from an attacker without the key;
//! - odd mode: a datagram the harness seals with the right key (sender index byte, seq u16,
//!   timestamp u16, record count byte, the records), then alters (a u16 byte index and an XOR
//!   byte; XOR 0 leaves it intact): a replay, a reorder or a bit flip of a real host's datagram;
//! - mode 0xff: the operator forgets a sender (index byte).
//!
//! Invariants: a datagram is accepted only if the harness sealed it and nothing altered it;
//! never twice for the same (sender, seq); every sealed, intact datagram whose sequence is fresh
//! (above every one accepted from its sender) is accepted.

use std::collections::{HashMap, HashSet};
use std::net::UdpSocket;
use std::time::Duration;

use edge::channel::{Received, VerdictReceiver};
use vigil_wire::auth::{self, MAX_DATAGRAM};
use vigil_wire::verdict::RECORD_LEN;

use crate::verdicts::record;
use crate::Input;

const KEY: &[u8] = b"vigil fuzz key: 32 bytes long!!!";

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut receiver = VerdictReceiver::bind("127.0.0.1:0", KEY.to_vec()).expect("bind receiver");
    let to = receiver.local_addr().expect("receiver address");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
    let mut accepted: HashSet<(u32, u64)> = HashSet::new();
    let mut highest: HashMap<u32, u64> = HashMap::new();
    let mut datagrams = 0;
    let mut accepted_total = 0u64;
    while !input.is_empty() && datagrams < 64 {
        let mode = input.u8();
        if mode == 0xff {
            let sender = u32::from(input.u8() % 8);
            if receiver.forget_sender(sender) {
                highest.remove(&sender);
                accepted.retain(|&(s, _)| s != sender);
            }
            continue;
        }
        let (datagram, sealed) = if mode.is_multiple_of(2) {
            (input.chunk(MAX_DATAGRAM + 64).to_vec(), None)
        } else {
            let sender = u32::from(input.u8() % 8);
            let seq = u64::from(input.u16());
            let timestamp = u64::from(input.u16());
            let count = usize::from(input.u8() % 4);
            let records: Vec<[u8; RECORD_LEN]> = (0..count).map(|_| input.array()).collect();
            let mut out = vec![0u8; MAX_DATAGRAM];
            let Ok(len) = auth::seal(KEY, sender, seq, timestamp, &records, &mut out) else {
                continue;
            };
            out.truncate(len);
            let at = usize::from(input.u16());
            let xor = input.u8();
            let intact = xor == 0 || at >= len;
            if !intact {
                out[at] ^= xor;
            }
            (out, Some((sender, seq, intact)))
        };
        if socket.send_to(&datagram, to).is_err() {
            continue;
        }
        datagrams += 1;
        let got = receiver
            .recv(Duration::from_secs(5))
            .expect("recv")
            .expect("a datagram on loopback within 5 s");
        match got {
            Received::Accepted {
                sender,
                seq,
                records,
                ..
            } => {
                assert!(
                    matches!(sealed, Some((s, q, true)) if s == sender && q == seq),
                    "accepted ({sender}, {seq}) that the key holder did not send intact"
                );
                assert!(
                    accepted.insert((sender, seq)),
                    "({sender}, {seq}) accepted twice"
                );
                accepted_total += 1;
                let h = highest.entry(sender).or_default();
                *h = (*h).max(seq);
                for r in &records {
                    record(r);
                }
            }
            Received::Rejected { reason, .. } => {
                if let Some((sender, seq, true)) = sealed {
                    let fresh = highest.get(&sender).is_none_or(|&h| seq > h);
                    assert!(
                        !fresh,
                        "intact, fresh ({sender}, {seq}) rejected: {reason:?}"
                    );
                }
            }
        }
    }
    let stats = receiver.stats();
    assert_eq!(stats.accepted_datagrams, accepted_total);
}
