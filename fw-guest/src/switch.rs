//! The switch itself: which ports a frame goes out of, in either role, and how it gets there.
//!
//! Owns: MAC learning, the choice of output ports (switch role: tenant ports and the uplink;
//! edge role: the outside and cloud ports), delivery (copies to all outputs but the last, which
//! takes the receive buffer itself: [`Port::forward`]) and the per-port forwarded/dropped
//! counts. Must not: judge a frame (the [`Filter`] does), or touch a device register (the ports
//! do).

use vigil_wire::boot::TENANT_UNASSIGNED;

use crate::filter::{
    self, Admit, Decision, Direction, DropReason, EdgeReplies, EdgeSide, Filter, MAX_PORTS,
    UPLINK_TENANT,
};
use crate::virtio_net::{Port, RxFrame};

/// MAC addresses the switch remembers (a full table floods, it never evicts).
pub const MAX_MACS: usize = 256;

/// MAC address → the port it was last seen on (a learning switch's table).
pub type Learned = heapless::FnvIndexMap<[u8; 6], u8, MAX_MACS>;

/// The packet loop's per-port state.
pub struct Ports<'a> {
    pub ports: heapless::Vec<Port<'a>, MAX_PORTS>,
    pub learned: Learned,
    /// Per receiving port: frames sent on (each copy counts) and frames dropped.
    pub forwarded: [u64; MAX_PORTS],
    pub dropped: [u64; MAX_PORTS],
}

/// A port set holds a bit per port.
const _: () = assert!(MAX_PORTS <= 32);

fn mac_at(bytes: &[u8], at: usize) -> Option<[u8; 6]> {
    bytes.get(at..at + 6).and_then(|b| b.try_into().ok())
}

impl<'a> Ports<'a> {
    pub fn new() -> Self {
        Ports {
            ports: heapless::Vec::new(),
            learned: Learned::new(),
            forwarded: [0; MAX_PORTS],
            dropped: [0; MAX_PORTS],
        }
    }

    /// Remember that `src` sits behind port `i` (unicast sources only).
    fn learn(&mut self, bytes: &[u8], i: usize) {
        if let Some(src) = mac_at(bytes, 6).filter(|m| m[0] & 1 == 0) {
            let _ = self.learned.insert(src, i as u8);
        }
    }

    /// The port that owns the destination MAC, other than `i` and not in `exclude`.
    fn target(&self, bytes: &[u8], i: usize, exclude: impl Fn(usize) -> bool) -> Option<usize> {
        let dst = mac_at(bytes, 0)?;
        self.learned
            .get(&dst)
            .map(|&p| usize::from(p))
            .filter(|&p| p != i && p < self.ports.len() && !exclude(p))
    }

    /// Sends the frame received on port `i` out of each port in `targets` (a bit per port):
    /// a copy to all but the last, which takes the receive buffer itself. `bytes` are the
    /// frame's (from `frame`), and are not used after this call.
    fn deliver(&mut self, i: usize, targets: u32, frame: RxFrame, bytes: &[u8]) {
        let Some(last) = targets.checked_ilog2() else {
            return;
        };
        self.send_copies(i, targets & !(1 << last), bytes);
        // SAFETY: the caller's frame, received on port `i` this round (its recycle comes
        // after), forwarded once (taken by value). The copies read `bytes` before; nothing
        // reads them after.
        let sent = unsafe { self.ports[last as usize].forward(frame) };
        self.count(i, sent);
    }

    /// Sends a copy of `bytes` out of each port in `targets`, counted for port `i`.
    fn send_copies(&mut self, i: usize, targets: u32, bytes: &[u8]) {
        let mut rest = targets;
        while rest != 0 {
            let j = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            let sent = self.ports[j].send(bytes);
            self.count(i, sent);
        }
    }

    /// Counts a frame from port `i` as sent on, or dropped.
    fn count(&mut self, i: usize, sent: bool) {
        if sent {
            self.forwarded[i] += 1;
        } else {
            self.dropped[i] += 1;
        }
    }

    /// Switch role. A frame's tenant is its port's; tenant 0 ports are uplinks. A tenant's
    /// frame goes out the uplink unless its destination MAC sits behind another tenant port;
    /// an uplink frame goes to the tenant port that owns the destination MAC, or to every
    /// tenant port when unknown or broadcast. Judged egress for the tenant it leaves, then
    /// ingress for the tenant it reaches. Unassigned ports neither send nor receive.
    pub fn switch_frame(
        &mut self,
        filter: &mut Filter<'_>,
        i: usize,
        (frame, bytes): (RxFrame, &[u8]),
        now: u64,
    ) {
        let from = filter.tenancy().port(i);
        if from == TENANT_UNASSIGNED {
            filter.drop_frame(DropReason::UnknownTenant);
            self.dropped[i] += 1;
            return;
        }
        let from_uplink = from == UPLINK_TENANT;
        if from_uplink {
            // A neighbour claim the switch does not believe is not the tenants' to hear.
            if filter.observe_uplink(bytes, now).is_some() {
                self.dropped[i] += 1;
                return;
            }
        } else {
            // What the tenant may send as: its MAC and addresses; ARP and neighbour discovery
            // field by field, answered here when the switch knows the target.
            let mut reply = [0u8; filter::neighbor::REPLY_MAX];
            match filter.admit(i, bytes, now, &mut reply) {
                Admit::Pass => {}
                Admit::Reply(n) => {
                    let _ = self.ports[i].send(&reply[..n]);
                    self.forwarded[i] += 1;
                    return;
                }
                Admit::Uplink(n) => {
                    // The switch's own request for the tenant's target (its frame stays).
                    for j in 0..self.ports.len() {
                        if filter.tenancy().port(j) == UPLINK_TENANT {
                            let _ = self.ports[j].send(&reply[..n]);
                        }
                    }
                    self.forwarded[i] += 1;
                    return;
                }
                Admit::Drop(_) => {
                    self.dropped[i] += 1;
                    return;
                }
            }
            self.learn(bytes, i);
        }
        let target = self.target(bytes, i, |p| filter.tenancy().port(p) == TENANT_UNASSIGNED);
        let mut targets = 0u32;
        for j in 0..self.ports.len() {
            let to = filter.tenancy().port(j);
            let goes = match target {
                Some(t) => j == t,
                None if from_uplink => to != UPLINK_TENANT,
                None => to == UPLINK_TENANT,
            };
            if !goes || j == i || to == TENANT_UNASSIGNED {
                continue;
            }
            let mut decision = Decision::Forward;
            if !from_uplink {
                decision = filter.process(from, Direction::Egress, bytes, now);
            }
            if decision == Decision::Forward && to != UPLINK_TENANT {
                // Only what is addressed to the port (a flooded frame is not every port's).
                decision = filter.process_to_port(j, bytes, now);
            }
            if decision == Decision::Forward {
                targets |= 1 << j;
            } else {
                self.dropped[i] += 1;
            }
        }
        self.deliver(i, targets, frame, bytes);
    }

    /// Edge role. Tenant 0 ports face the outside, every other port is a cloud port
    /// carrying many tenants (the VMM decapsulates). A cloud frame goes out the outside
    /// port(s) unless its destination MAC sits behind another cloud port; an outside frame
    /// goes to the cloud port that owns the destination MAC, or to every cloud port. The
    /// filter finds the tenant by address ([`Filter::process_edge`]); each frame is judged
    /// once, whatever the number of copies. Cloud-to-cloud frames (which hosts should send
    /// each other directly) are judged for both tenants, as the switch tier would.
    ///
    /// The SYN proxy may answer a frame instead of forwarding it ([`Decision::Answered`]):
    /// its replies go out of port `i` (toward where the frame came from) or, toward the
    /// other side, where the frame would have gone.
    pub fn edge_frame(
        &mut self,
        filter: &mut Filter<'_>,
        i: usize,
        (frame, bytes): (RxFrame, &mut [u8]),
        replies: &mut EdgeReplies,
        now: u64,
    ) {
        let outside = |t: &Filter<'_>, p: usize| t.tenancy().port(p) == UPLINK_TENANT;
        let from = if outside(filter, i) {
            EdgeSide::Outside
        } else {
            self.learn(bytes, i);
            EdgeSide::Cloud
        };
        let target = self.target(bytes, i, |p| outside(filter, p));
        let to = match (target, from) {
            (Some(_), _) | (None, EdgeSide::Outside) => EdgeSide::Cloud,
            (None, EdgeSide::Cloud) => EdgeSide::Outside,
        };
        match filter.process_edge_mut(from, to, bytes, replies, now) {
            Decision::Forward => {
                let targets = self.edge_targets(filter, i, target, to);
                self.deliver(i, targets, frame, bytes);
            }
            Decision::Answered => {
                for side in [EdgeSide::Outside, EdgeSide::Cloud] {
                    if let Some(reply) = replies.frame(side) {
                        if side == from {
                            let _ = self.ports[i].send(reply);
                        } else {
                            let targets = self.edge_targets(filter, i, target, to);
                            self.send_copies(i, targets, reply);
                        }
                    }
                }
            }
            Decision::Drop(_) => self.dropped[i] += 1,
        }
    }

    /// The ports an edge frame that arrived on port `i` goes out of toward side `to`: the
    /// port owning its destination MAC (`target`), or every port of that side.
    fn edge_targets(
        &self,
        filter: &Filter<'_>,
        i: usize,
        target: Option<usize>,
        to: EdgeSide,
    ) -> u32 {
        let mut targets = 0u32;
        for j in 0..self.ports.len() {
            let goes = match target {
                Some(t) => j == t,
                None => {
                    j != i
                        && ((filter.tenancy().port(j) == UPLINK_TENANT)
                            == (to == EdgeSide::Outside))
                }
            };
            if goes {
                targets |= 1 << j;
            }
        }
        targets
    }
}

impl Default for Ports<'_> {
    fn default() -> Self {
        Ports::new()
    }
}
