//! The signed verdict channel as the edge receives it: real UDP datagrams on loopback into an
//! [`edge::channel::VerdictReceiver`] (structure, HMAC tag, edge boot, per-sender runs, ordering,
//! holding ahead of gaps, duplicates), every record it delivers decoded.
//!
//! Input: datagrams until the input ends, each a mode byte and its operands:
//! - even mode: a raw datagram (u16 length, bytes) from an attacker without the key;
//! - odd mode: a datagram the harness seals with the right key (sender index byte, seq u16, epoch
//!   byte, timestamp u16, record count byte, the records; mode bit 1: for another edge boot), then
//!   alters (a u16 byte index and an XOR byte; XOR 0 leaves it intact): a replay, a reorder, a
//!   restart or a bit flip of a real host's datagram. Mode bit 2: `apply` refuses this time; bit
//!   3: the datagram signs another underlay address than the harness sends from (a relayed copy).
//!
//! Invariants: whatever the receiver applies, holds or calls a duplicate is a datagram the
//! harness sealed for this edge and nothing altered, with the records it sealed; the counters
//! agree with what was applied.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::Duration;

use edge::channel::{Received, VerdictReceiver};
use vigil_wire::auth::{self, Header, MAX_DATAGRAM};
use vigil_wire::verdict::RECORD_LEN;

use crate::verdicts::record;
use crate::Input;

const KEY: &[u8] = b"vigil fuzz key: 32 bytes long!!!";
const BOOT: u64 = 0x5eed;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut receiver =
        VerdictReceiver::bind_with_boot("127.0.0.1:0", KEY.to_vec(), BOOT).expect("bind receiver");
    let to = receiver.local_addr().expect("receiver address");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
    socket.set_nonblocking(true).expect("non-blocking");
    // Intact datagrams sealed for this edge: (sender, seq) → the records of each version sent.
    let mut sealed: HashMap<(u32, u64), Vec<Vec<[u8; RECORD_LEN]>>> = HashMap::new();
    let mut applied_datagrams = 0u64;
    let mut datagrams = 0;
    let mut ack = [0u8; 2048];
    while !input.is_empty() && datagrams < 64 {
        let mode = input.u8();
        let refuse = mode & 4 != 0;
        let relayed = mode & 8 != 0;
        let datagram = if mode.is_multiple_of(2) {
            input.chunk(MAX_DATAGRAM + 64).to_vec()
        } else {
            let header = Header {
                key_id: 0,
                sender: u32::from(input.u8() % 8),
                seq: u64::from(input.u16()),
                epoch: u64::from(input.u8() % 4),
                edge_boot: if mode & 2 != 0 { BOOT + 1 } else { BOOT },
                timestamp_ms: u64::from(input.u16()),
                // The sender's own address (the harness's socket), or another one: a copy
                // relayed from here, never to be delivered.
                underlay: Some(
                    if relayed {
                        [192, 0, 2, 1]
                    } else {
                        [127, 0, 0, 1]
                    }
                    .into(),
                ),
            };
            let count = usize::from(input.u8() % 4);
            let records: Vec<[u8; RECORD_LEN]> = (0..count).map(|_| input.array()).collect();
            let mut out = vec![0u8; MAX_DATAGRAM];
            let Ok(len) = auth::seal(KEY, &header, &records, &mut out) else {
                continue;
            };
            out.truncate(len);
            let at = usize::from(input.u16());
            let xor = input.u8();
            if xor != 0 && at < len {
                out[at] ^= xor;
            } else if header.edge_boot == BOOT && !relayed {
                sealed
                    .entry((header.sender, header.seq))
                    .or_default()
                    .push(records);
            }
            out
        };
        if socket.send_to(&datagram, to).is_err() {
            continue;
        }
        datagrams += 1;
        let got = receiver
            .recv(Duration::from_secs(5), |d| {
                let versions = sealed.get(&(d.sender, d.seq));
                assert!(
                    versions.is_some_and(|v| v.iter().any(|r| r[..] == d.records[..])),
                    "delivered ({}, {}) that the key holder did not send intact",
                    d.sender,
                    d.seq
                );
                for r in d.records {
                    record(r);
                }
                !refuse
            })
            .expect("recv")
            .expect("a datagram on loopback within 5 s");
        match got {
            Received::Applied {
                sender,
                seq,
                datagrams,
                ..
            } => {
                assert!(sealed.contains_key(&(sender, seq)), "applied a forgery");
                applied_datagrams += datagrams as u64;
            }
            Received::Held { sender, seq, .. }
            | Received::Duplicate { sender, seq, .. }
            | Received::NotApplied { sender, seq, .. } => {
                assert!(
                    sealed.contains_key(&(sender, seq)),
                    "({sender}, {seq}) taken as authentic"
                );
            }
            Received::Rejected { .. } => {}
        }
        while socket.recv(&mut ack).is_ok() {}
    }
    assert_eq!(receiver.stats().accepted_datagrams, applied_datagrams);
}
