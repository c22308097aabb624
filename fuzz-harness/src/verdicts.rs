//! Verdict records, the verdict ring and the counters block: the shared memory between the VMM
//! and the firewall micro-VM, where each side must survive whatever the other left there.
//!
//! Input: a mode byte, then
//! - mode 0 (a ring the producer corrupted): the rest is the raw region (header and slots, as
//!   little-endian words); the micro-VM's consumer attaches and the filter drains it;
//! - mode 1 (a ring formatted properly, then corrupted): a capacity byte, records (64 bytes
//!   each) pushed by the producer, then (word index, value) pairs written over the region; then
//!   both the producer and the consumer carry on;
//! - mode 2 (the counters block the VMM reads back): the raw region; every counter is read.
//!
//! Invariants: every record that decodes re-encodes to bytes that decode to the same record; a
//! consumer never hands out more records than were pushed plus the capacity; a pushed record
//! comes out unchanged when nothing corrupted the ring.

use std::sync::atomic::AtomicU64;

use fw_guest::filter::{slots_for, Config, Filter, FlowSlot, IndexSlot, VerdictSlot};
use vigil_wire::ring::{self, Consumer, CountersReader, DropReason, Producer, SLOT_BYTES};
use vigil_wire::verdict::{VerdictRepr, RECORD_LEN};

use crate::Input;

/// Largest region taken from an input (in words).
const MAX_WORDS: usize = 4096;

pub fn ring(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => corrupted_region(input.rest()),
        1 => formatted_then_corrupted(&mut input),
        _ => counters(input.rest()),
    }
}

fn words(bytes: &[u8]) -> Vec<AtomicU64> {
    bytes
        .chunks(8)
        .take(MAX_WORDS)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            AtomicU64::new(u64::from_le_bytes(w))
        })
        .collect()
}

/// Checks one record: decoding is total, and a decoded record survives a round trip.
pub fn record(bytes: &[u8]) {
    if let Ok(v) = VerdictRepr::from_bytes(bytes) {
        let again = VerdictRepr::from_bytes(&v.to_bytes())
            .unwrap_or_else(|e| panic!("{v:?} re-encodes to a record that fails: {e:?}"));
        assert_eq!(again, v, "round trip changed the record");
    }
}

fn filter_drain(region: &[AtomicU64]) -> Option<usize> {
    let mut consumer = Consumer::attach(region).ok()?;
    let mut flows = vec![FlowSlot::EMPTY; slots_for(16)];
    let mut verdicts = vec![VerdictSlot::EMPTY; 8];
    let mut index = vec![IndexSlot::EMPTY; 16];
    let mut filter = Filter::new(&mut flows, &mut verdicts, &mut index, Config::default()).ok()?;
    let capacity = consumer.capacity();
    // Nobody produces meanwhile: at most `capacity` records, then empty or an error.
    let taken = filter.drain_ring(&mut consumer, 0).unwrap_or(0);
    assert!(
        taken as u64 <= capacity,
        "drained {taken} records from a ring of {capacity}"
    );
    Some(taken)
}

fn corrupted_region(bytes: &[u8]) {
    let region = words(bytes);
    let mut out = [0u8; SLOT_BYTES];
    if let Ok(mut c) = Consumer::attach(&region) {
        for _ in 0..=c.capacity().min(64) {
            match c.pop(&mut out) {
                Ok(true) => record(&out),
                _ => break,
            }
        }
    }
    filter_drain(&region);
}

fn formatted_then_corrupted(input: &mut Input<'_>) {
    let capacity = 1u64 << (input.u8() % 5);
    let region: Vec<AtomicU64> = (0..ring::ring_bytes(capacity) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    ring::format(&region, capacity).expect("format");
    let mut producer = Producer::attach(&region).expect("attach producer");
    let mut pushed = Vec::new();
    for _ in 0..usize::from(input.u8() % 20) {
        let mut r = [0u8; RECORD_LEN];
        let b = input.bytes(RECORD_LEN);
        r[..b.len()].copy_from_slice(b);
        record(&r);
        if producer.push(&r).is_ok() {
            pushed.push(r);
        }
    }
    let corruptions = usize::from(input.u8() % 4);
    for _ in 0..corruptions {
        let at = usize::from(input.u16()) % region.len();
        region[at].store(input.u64(), std::sync::atomic::Ordering::Relaxed);
    }
    let Ok(mut consumer) = Consumer::attach(&region) else {
        return;
    };
    let mut out = [0u8; SLOT_BYTES];
    let mut popped = 0usize;
    while let Ok(true) = consumer.pop(&mut out) {
        if corruptions == 0 {
            assert_eq!(
                Some(&out),
                pushed.get(popped),
                "record {popped} changed in the ring"
            );
        }
        popped += 1;
        assert!(
            popped as u64 <= capacity + pushed.len() as u64,
            "the consumer handed out {popped} records; {} were pushed into {capacity} slots",
            pushed.len()
        );
        record(&out);
    }
    if corruptions == 0 {
        assert_eq!(popped, pushed.len(), "records lost in the ring");
    }
    // The producer goes on after whatever the consumer side holds now.
    let _ = Producer::attach(&region).map(|mut p| p.push(&[0u8; RECORD_LEN]));
    filter_drain(&region);
}

fn counters(bytes: &[u8]) {
    let region = words(bytes);
    if let Ok(reader) = CountersReader::attach(&region) {
        for which in 0..=ring::GLOBAL_COUNT {
            let _ = reader.global(which);
        }
        for reason in DropReason::ALL {
            let _ = reader.drops(reason);
        }
        for port in 0..=reader.ports().min(ring::MAX_PORTS + 1) {
            for which in 0..4 {
                let _ = reader.port(port, which);
            }
        }
    }
}
