//! The fw-guest filter as the micro-VM's packet loop drives it, in both roles, over a sequence
//! of frames and verdict records per input.
//!
//! Input: one configuration byte (bit 1: tight half-open limits), then operations until the
//! input ends, each an opcode byte and its operands:
//! - `0` frame: control byte (switch: port in bits 0-1; edge: from-cloud in bit 0, to-cloud in
//!   bit 1; both: seconds to advance in bits 4-7), a u16 length, the frame bytes;
//! - `1` verdict record: 64 bytes, applied as the ring would hand them over;
//! - `2` sweep with a budget byte; `3` flush a tenant (byte, mod 4); `4` advance the clock by a
//!   u16 of seconds.
//!
//! Switch ports: 0 the uplink (tenant 0), 1 and 2 boot-assigned to tenants 1 and 2, 3 left
//! unassigned (an `Attach` record may claim it).
//!
//! Invariants beyond "no panic": a frame the parser refuses is never forwarded; until a verdict
//! was applied, no IP packet is forwarded (default deny); the counters add up to the frames
//! judged.

use fw_guest::filter::neighbor::REPLY_MAX;
use fw_guest::filter::{
    parse, slots_for, Admit, Config, Decision, DropReason, EdgeSide, Filter, FlowSlot,
    HalfOpenLimits, IndexSlot, Op, Parsed, VerdictRepr, VerdictSlot, UPLINK_TENANT,
};
use vigil_wire::boot::TENANT_UNASSIGNED;
use vigil_wire::verdict::{Direction, RECORD_LEN};

use crate::Input;

const PORTS: usize = 4;
const SEC: u64 = 1_000_000_000;
/// Largest frame taken from the input (a jumbo-ish frame; the filter reads headers only).
const MAX_FRAME: usize = 2048;

/// The switch role (`filter_switch`).
pub fn switch(data: &[u8]) {
    run(data, false);
}

/// The edge role (`filter_edge`).
pub fn edge(data: &[u8]) {
    run(data, true);
}

struct Run<'f> {
    filter: Filter<'f>,
    now: u64,
    /// An Add or Adopt verdict was applied at some point.
    opened: bool,
    judged: u64,
}

fn run(data: &[u8], edge: bool) {
    let mut input = Input::new(data);
    let config_byte = input.u8();
    // Small tables: a short input reaches full tables, eviction and the sweep.
    let mut flows = vec![FlowSlot::EMPTY; slots_for(32)];
    let mut verdicts = vec![VerdictSlot::EMPTY; 16];
    let mut index = vec![IndexSlot::EMPTY; 32];
    let config = Config {
        sweep_on_full: 4,
        evict_scan: 8,
        half_open: (config_byte & 2 != 0).then_some(HalfOpenLimits {
            global: 4,
            per_tenant: 2,
        }),
        ..Config::default()
    };
    let filter = Filter::new(&mut flows, &mut verdicts, &mut index, config).expect("filter setup");
    let mut r = Run {
        filter,
        now: SEC,
        opened: false,
        judged: 0,
    };
    r.filter.tenancy_mut().set_boot_port(0, UPLINK_TENANT);
    if !edge {
        r.filter.tenancy_mut().set_boot_port(1, 1);
        r.filter.tenancy_mut().set_boot_port(2, 2);
    }
    while !input.is_empty() {
        match input.u8() % 5 {
            0 => {
                let control = input.u8();
                let frame = input.chunk(MAX_FRAME);
                r.now += u64::from(control >> 4) * SEC;
                if edge {
                    r.edge_frame(control, frame);
                } else {
                    r.switch_frame(usize::from(control & 3), frame);
                }
            }
            1 => {
                let record = input.bytes(RECORD_LEN);
                let op = VerdictRepr::from_bytes(record).map(|v| v.op);
                if r.filter.apply_record(record, r.now).is_ok()
                    && matches!(op, Ok(Op::Add | Op::Adopt))
                {
                    r.opened = true;
                }
            }
            2 => {
                let budget = usize::from(input.u8());
                r.filter.sweep(r.now, budget);
            }
            3 => {
                let tenant = u32::from(input.u8() % 4);
                r.filter.flush_tenant(tenant, r.now);
            }
            _ => r.now += u64::from(input.u16()) * SEC,
        }
    }
    let c = r.filter.counters();
    let drops: u64 = c.drops.iter().sum();
    assert!(
        c.forwarded + drops >= r.judged,
        "counters lost frames: {} forwarded + {drops} dropped < {} judged",
        c.forwarded,
        r.judged
    );
}

impl Run<'_> {
    /// Checks one decision of `process`/`process_edge` against the invariants.
    fn judged(&mut self, frame: &[u8], d: Decision) {
        self.judged += 1;
        if d != Decision::Forward {
            return;
        }
        match parse(frame) {
            Err(reason) => panic!("forwarded a frame the parser refuses ({reason:?})"),
            Ok(Parsed::Ip(meta)) if !self.opened => {
                panic!("forwarded an IP packet with no verdict ever applied: {meta:?}")
            }
            Ok(_) => {}
        }
    }

    fn process(&mut self, tenant: u32, dir: Direction, frame: &[u8]) -> Decision {
        let d = self.filter.process(tenant, dir, frame, self.now);
        self.judged(frame, d);
        d
    }

    /// `Ports::switch_frame` of fw-guest/src/switch.rs, without the MAC learning (a frame to
    /// another tenant port goes there when its destination MAC is that port's attached MAC).
    fn switch_frame(&mut self, port: usize, frame: &[u8]) {
        let from = self.filter.tenancy().port(port);
        if from == TENANT_UNASSIGNED {
            self.filter.drop_frame(DropReason::UnknownTenant);
            return;
        }
        let from_uplink = from == UPLINK_TENANT;
        if from_uplink {
            if self.filter.observe_uplink(frame, self.now).is_some() {
                return;
            }
        } else {
            let mut reply = [0u8; REPLY_MAX];
            match self.filter.admit(port, frame, self.now, &mut reply) {
                Admit::Pass => {}
                Admit::Reply(n) => {
                    assert!(n <= reply.len(), "reply of {n} bytes");
                    return;
                }
                Admit::Uplink(n) => {
                    // The switch's own request: a neighbour frame the parser takes.
                    assert!(
                        matches!(
                            parse(&reply[..n]),
                            Ok(Parsed::Arp) | Ok(Parsed::NeighborDiscovery)
                        ),
                        "the switch built a request the parser refuses"
                    );
                    return;
                }
                Admit::Drop(_) => return,
            }
        }
        let dst = frame.get(..6);
        let target = (0..PORTS).find(|&p| {
            p != port
                && self.filter.tenancy().port(p) != UPLINK_TENANT
                && self.filter.tenancy().port(p) != TENANT_UNASSIGNED
                && dst == Some(&self.filter.tenancy().identity(p).mac[..])
        });
        for j in 0..PORTS {
            let to = self.filter.tenancy().port(j);
            let goes = match target {
                Some(t) => j == t,
                None if from_uplink => to != UPLINK_TENANT,
                None => to == UPLINK_TENANT,
            };
            if !goes || j == port || to == TENANT_UNASSIGNED {
                continue;
            }
            let mut d = Decision::Forward;
            if !from_uplink {
                d = self.process(from, Direction::Egress, frame);
            }
            if d == Decision::Forward && to != UPLINK_TENANT {
                let d = self.filter.process_to_port(j, frame, self.now);
                self.judged(frame, d);
            }
        }
    }

    fn edge_frame(&mut self, control: u8, frame: &[u8]) {
        let side = |cloud: bool| {
            if cloud {
                EdgeSide::Cloud
            } else {
                EdgeSide::Outside
            }
        };
        let from = side(control & 1 != 0);
        let to = side(control & 2 != 0);
        let d = self.filter.process_edge(from, to, frame, self.now);
        self.judged(frame, d);
    }
}
