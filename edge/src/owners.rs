//! Who attached what at the edge: each tenant's host, each attached address's tenant, each
//! host's underlay address, and the edge's own. Every authentic record a host sends is judged
//! against this book before it reaches the micro-VM:
//!
//! - a host speaks only for tenants it attached: an `Add`, `Remove`, `Adopt`, `FlushTenant` or
//!   `Release` naming another host's tenant is refused (`other_hosts_tenant`), a rule record for
//!   a tenant nobody attached too (`not_attached`), and a rule whose local address is another
//!   tenant's (`foreign_local_address`);
//! - an `Attach` of another host's tenant, or of an address attached by another host, waits
//!   until that host releases it (`Release`: the tenant migrated away; its verdicts and flows stay
//!   at the edge and follow it) or flushes it; after [`CLAIM_WAIT`] it is refused (`collision`).
//!   While it waits the datagram is not acknowledged, so the claiming host retransmits it, and
//!   nothing of it is applied;
//! - nobody attaches the underlay's addresses (`underlay_address`) or names the underlay's tenant
//!   (`underlay_tenant`): the edge's VMM alone attaches, under
//!   [`vigil_wire::verdict::UNDERLAY_TENANT`], its own addresses and each host's underlay address
//!   (the source of its authentic datagrams), so the outside can never send from them.
//!
//! What the book decides about addresses goes to the cloud port's VXLAN endpoint as bindings
//! ([`Change`]): a frame from host X may speak only for addresses X attached.
//!
//! Owns: the book, bounded ([`MAX_TENANTS`] tenants, [`MAX_TENANT_ADDRS`] addresses each,
//! [`crate::order::MAX_SENDERS`] hosts). Must not: authenticate (only authentic, in-order records
//! reach it), or talk to the micro-VM or the endpoint (the node does, from the [`Change`]s).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use vigil_wire::boot::TENANT_UNASSIGNED;
use vigil_wire::verdict::{IpVersion, Op, VerdictRepr, UNDERLAY_TENANT};

/// Tenants the book follows (a full book refuses new ones).
pub const MAX_TENANTS: usize = 65_536;
/// Addresses one tenant may hold at the edge.
pub const MAX_TENANT_ADDRS: usize = 16;
/// How long an `Attach` colliding with another host's tenant or address waits for that host's
/// `Release` or flush before it is refused. A migration's release follows the target's claim by
/// one round trip; under 30% loss a retransmitted release arrives well within it.
pub const CLAIM_WAIT: Duration = Duration::from_millis(1500);

/// Why a host's record was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// It names [`UNDERLAY_TENANT`], the edge's own.
    UnderlayTenant,
    /// It attaches an underlay address (the edge's or a host's) to a tenant.
    UnderlayAddress,
    /// It names a tenant another host attached.
    OtherHostsTenant,
    /// A verdict for a tenant no host attached.
    NotAttached,
    /// A rule whose local address is attached to another tenant.
    ForeignLocalAddress,
    /// An attach that collided with another host's tenant or address for [`CLAIM_WAIT`].
    Collision,
    /// The book is full (tenants, or addresses of the tenant).
    Full,
}

impl Refusal {
    /// A stable name (counters, events).
    pub const fn name(self) -> &'static str {
        match self {
            Refusal::UnderlayTenant => "underlay_tenant",
            Refusal::UnderlayAddress => "underlay_address",
            Refusal::OtherHostsTenant => "other_hosts_tenant",
            Refusal::NotAttached => "not_attached",
            Refusal::ForeignLocalAddress => "foreign_local_address",
            Refusal::Collision => "collision",
            Refusal::Full => "full",
        }
    }
}

/// What to do with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judged {
    /// Put it into the micro-VM's ring.
    Apply,
    /// Taken by the book alone (a `Release`): nothing for the micro-VM.
    Consumed,
    Refuse(Refusal),
}

/// What the cloud port's endpoint must be told (bindings of addresses to underlay senders, and
/// which senders it hears).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Only `host` may speak for `addr` (`None`: nobody, an underlay address).
    Bind { addr: IpAddr, host: Option<IpAddr> },
    /// `addr` is nobody's now.
    Unbind(IpAddr),
    /// Frames from this underlay sender are no longer taken (a host moved away from it).
    Untrust(IpAddr),
}

#[derive(Debug)]
struct TenantEntry {
    host: u32,
    /// The host gave it up (migration); the next host to attach it takes it over.
    released: bool,
    addrs: Vec<IpAddr>,
}

/// The edge's ownership book.
#[derive(Debug, Default)]
pub struct Owners {
    tenants: HashMap<u32, TenantEntry>,
    addrs: HashMap<IpAddr, u32>,
    hosts: HashMap<u32, IpAddr>,
    /// The edge's own addresses and every host's: attached under [`UNDERLAY_TENANT`].
    underlay: HashSet<IpAddr>,
    /// Tenants handed over from one host to another.
    pub handovers: u64,
}

/// A record's address field as an [`IpAddr`].
pub fn ip_of(version: IpVersion, a: &[u8; 16]) -> IpAddr {
    match version {
        IpVersion::V4 => IpAddr::from([a[0], a[1], a[2], a[3]]),
        IpVersion::V6 => IpAddr::from(*a),
    }
}

/// The record field form of `ip`.
pub fn fields_of(ip: IpAddr) -> (IpVersion, [u8; 16]) {
    match ip {
        IpAddr::V4(v4) => (IpVersion::V4, vigil_wire::verdict::v4(v4.octets())),
        IpAddr::V6(v6) => (IpVersion::V6, v6.octets()),
    }
}

/// The micro-VM's record attaching (or, with `TENANT_UNASSIGNED`, releasing) underlay address
/// `ip`. Sequence 0: the edge's own records are not numbered.
pub fn underlay_record(tenant: u32, ip: IpAddr) -> VerdictRepr {
    VerdictRepr::attach(tenant, 0, None, Some(fields_of(ip)))
}

impl Owners {
    pub fn new() -> Owners {
        Owners::default()
    }

    /// The edge's own address `ip`: nobody's to send from, attached under the underlay's tenant.
    /// Returns the record for the micro-VM, or `None` when it is known already.
    pub fn own(&mut self, ip: IpAddr, out: &mut Vec<Change>) -> Option<VerdictRepr> {
        if !self.underlay.insert(ip) {
            return None;
        }
        out.push(Change::Bind {
            addr: ip,
            host: None,
        });
        Some(underlay_record(UNDERLAY_TENANT, ip))
    }

    /// Host `sender`'s authentic datagram came from `from`: the first time (or from a new
    /// address: the host moved), its underlay address is attached under the underlay's tenant
    /// and its tenants' addresses are bound to it. Returns the records for the micro-VM.
    pub fn see_host(
        &mut self,
        sender: u32,
        from: IpAddr,
        out: &mut Vec<Change>,
    ) -> Vec<VerdictRepr> {
        let mut records = Vec::new();
        match self.hosts.insert(sender, from) {
            Some(old) if old == from => return records,
            Some(old) => {
                // Moved: the old address is the underlay's no more, unless another host has it.
                if !self.hosts.values().any(|h| *h == old) {
                    self.underlay.remove(&old);
                    out.push(Change::Unbind(old));
                    out.push(Change::Untrust(old));
                    records.push(underlay_record(TENANT_UNASSIGNED, old));
                }
                for t in self.tenants.values().filter(|t| t.host == sender) {
                    out.extend(t.addrs.iter().map(|a| Change::Bind {
                        addr: *a,
                        host: Some(from),
                    }));
                }
            }
            None => {}
        }
        if self.underlay.insert(from) {
            out.push(Change::Bind {
                addr: from,
                host: None,
            });
            records.push(underlay_record(UNDERLAY_TENANT, from));
        }
        records
    }

    /// Hosts the book has seen (at least 1, to divide the room by).
    pub fn host_count(&self) -> usize {
        self.hosts.len().max(1)
    }

    /// The underlay address host `sender` sends from.
    pub fn host_addr(&self, sender: u32) -> Option<IpAddr> {
        self.hosts.get(&sender).copied()
    }

    fn host_of(&self, tenant: u32) -> Option<(u32, bool)> {
        self.tenants.get(&tenant).map(|t| (t.host, t.released))
    }

    /// Whether `v` from `sender` collides with another host's tenant or address, which that host
    /// has not released: the record must wait (see the module doc). Changes nothing.
    pub fn collides(&self, sender: u32, v: &VerdictRepr) -> bool {
        if v.op != Op::Attach || v.tenant == TENANT_UNASSIGNED || v.tenant == UNDERLAY_TENANT {
            return false;
        }
        if matches!(self.host_of(v.tenant), Some((h, false)) if h != sender) {
            return true;
        }
        let Some((version, a)) = v.attach_addr() else {
            return false;
        };
        match self.addrs.get(&ip_of(version, &a)) {
            Some(u) if *u != v.tenant => {
                matches!(self.host_of(*u), Some((h, false)) if h != sender)
            }
            _ => false,
        }
    }

    /// Judges `v` from `sender` and updates the book (call [`Owners::collides`] first: a record
    /// that collides is taken over if its tenant was released, else treated as a collision).
    /// Judging the same record again gives the same answer (a retransmission is harmless).
    pub fn judge(&mut self, sender: u32, v: &VerdictRepr, out: &mut Vec<Change>) -> Judged {
        if v.tenant == UNDERLAY_TENANT {
            return Judged::Refuse(Refusal::UnderlayTenant);
        }
        let owner = self.host_of(v.tenant);
        let others = matches!(owner, Some((h, _)) if h != sender);
        match v.op {
            Op::Attach if v.tenant == TENANT_UNASSIGNED => self.detach(sender, v, out),
            Op::Attach => self.attach(sender, v, out),
            Op::FlushTenant if others => Judged::Refuse(Refusal::OtherHostsTenant),
            Op::FlushTenant => {
                if let Some(t) = self.tenants.remove(&v.tenant) {
                    for a in t.addrs {
                        self.addrs.remove(&a);
                        out.push(Change::Unbind(a));
                    }
                }
                Judged::Apply
            }
            Op::Release if others => Judged::Refuse(Refusal::OtherHostsTenant),
            Op::Release => match self.tenants.get_mut(&v.tenant) {
                Some(t) => {
                    t.released = true;
                    Judged::Consumed
                }
                None => Judged::Refuse(Refusal::NotAttached),
            },
            Op::Add | Op::Remove | Op::Adopt => {
                if others {
                    return Judged::Refuse(Refusal::OtherHostsTenant);
                }
                if owner.is_none() {
                    return Judged::Refuse(Refusal::NotAttached);
                }
                let local = v.rule.local_addr;
                if local != [0; 16] {
                    let ip = ip_of(v.rule.ip_version, &local);
                    if self.underlay.contains(&ip)
                        || self.addrs.get(&ip).is_some_and(|t| *t != v.tenant)
                    {
                        return Judged::Refuse(Refusal::ForeignLocalAddress);
                    }
                }
                Judged::Apply
            }
        }
    }

    /// `Attach` of `TENANT_UNASSIGNED`: releases an address, the sender's own only.
    fn detach(&mut self, sender: u32, v: &VerdictRepr, out: &mut Vec<Change>) -> Judged {
        let Some((version, a)) = v.attach_addr() else {
            return Judged::Apply;
        };
        let ip = ip_of(version, &a);
        if self.underlay.contains(&ip) {
            return Judged::Refuse(Refusal::UnderlayAddress);
        }
        let Some(&t) = self.addrs.get(&ip) else {
            return Judged::Apply;
        };
        if self.host_of(t).map(|(h, _)| h) != Some(sender) {
            return Judged::Refuse(Refusal::OtherHostsTenant);
        }
        self.addrs.remove(&ip);
        if let Some(e) = self.tenants.get_mut(&t) {
            e.addrs.retain(|x| *x != ip);
        }
        out.push(Change::Unbind(ip));
        Judged::Apply
    }

    fn attach(&mut self, sender: u32, v: &VerdictRepr, out: &mut Vec<Change>) -> Judged {
        if self.collides(sender, v) {
            return Judged::Refuse(Refusal::Collision);
        }
        let ip = v.attach_addr().map(|(version, a)| ip_of(version, &a));
        if ip.is_some_and(|ip| self.underlay.contains(&ip)) {
            return Judged::Refuse(Refusal::UnderlayAddress);
        }
        let host = self.hosts.get(&sender).copied();
        let Some(entry) = self.tenants.get(&v.tenant) else {
            if self.tenants.len() >= MAX_TENANTS {
                return Judged::Refuse(Refusal::Full);
            }
            self.tenants.insert(
                v.tenant,
                TenantEntry {
                    host: sender,
                    released: false,
                    addrs: Vec::new(),
                },
            );
            return self.attach(sender, v, out);
        };
        if ip.is_some_and(|ip| !entry.addrs.contains(&ip) && entry.addrs.len() >= MAX_TENANT_ADDRS)
        {
            return Judged::Refuse(Refusal::Full);
        }
        if entry.host != sender {
            // Released by its host (else it collided): taken over with every address it has.
            self.handovers += 1;
            out.extend(entry.addrs.iter().map(|a| Change::Bind { addr: *a, host }));
        }
        let Some(ip) = ip else {
            if let Some(e) = self.tenants.get_mut(&v.tenant) {
                e.host = sender;
                e.released = false;
            }
            return Judged::Apply;
        };
        // An address another of the sender's tenants had moves to this one (the firewall's
        // table: last writer wins).
        if let Some(u) = self.addrs.insert(ip, v.tenant).filter(|u| *u != v.tenant) {
            if let Some(e) = self.tenants.get_mut(&u) {
                e.addrs.retain(|x| *x != ip);
            }
        }
        if let Some(e) = self.tenants.get_mut(&v.tenant) {
            e.host = sender;
            e.released = false;
            if !e.addrs.contains(&ip) {
                e.addrs.push(ip);
            }
        }
        out.push(Change::Bind { addr: ip, host });
        Judged::Apply
    }

    /// Host `sender` restarted: its tenants are gone (those it released wait for their new
    /// host). Returns them; the caller flushes them at the micro-VM, then calls
    /// [`Owners::forget_tenants`].
    pub fn tenants_of(&self, sender: u32) -> Vec<u32> {
        self.tenants
            .iter()
            .filter(|(_, t)| t.host == sender && !t.released)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Forgets `tenants` and their addresses.
    pub fn forget_tenants(&mut self, tenants: &[u32], out: &mut Vec<Change>) {
        for id in tenants {
            if let Some(t) = self.tenants.remove(id) {
                for a in t.addrs {
                    self.addrs.remove(&a);
                    out.push(Change::Unbind(a));
                }
            }
        }
    }

    /// (hosts, tenants, attached addresses, underlay addresses).
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        (
            self.hosts.len(),
            self.tenants.len(),
            self.addrs.len(),
            self.underlay.len(),
        )
    }

    /// The underlay's addresses, sorted.
    pub fn underlay(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.underlay.iter().copied().collect();
        v.sort();
        v
    }

    /// The host that attached `addr`, if any.
    pub fn host_of_addr(&self, addr: IpAddr) -> Option<u32> {
        self.addrs
            .get(&addr)
            .and_then(|t| self.host_of(*t))
            .map(|(h, _)| h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_wire::verdict::{v4, Protocol, Rule};

    const A: u32 = 1;
    const B: u32 = 2;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn attach(tenant: u32, last: u8) -> VerdictRepr {
        VerdictRepr::attach(tenant, 1, None, Some((IpVersion::V4, v4([10, 0, 0, last]))))
    }

    fn add(tenant: u32) -> VerdictRepr {
        VerdictRepr::add(
            tenant,
            2,
            0,
            Rule::egress_to(IpVersion::V4, Protocol::Tcp, v4([10, 66, 0, 1]), 80),
        )
    }

    fn book() -> (Owners, Vec<Change>) {
        let mut o = Owners::new();
        let mut out = Vec::new();
        o.see_host(A, IpAddr::from([192, 0, 2, 10]), &mut out);
        o.see_host(B, IpAddr::from([192, 0, 2, 11]), &mut out);
        out.clear();
        (o, out)
    }

    #[test]
    fn a_host_speaks_only_for_what_it_attached() {
        let (mut o, mut out) = book();
        assert_eq!(o.judge(A, &attach(7, 2), &mut out), Judged::Apply);
        assert_eq!(
            out,
            [Change::Bind {
                addr: ip(2),
                host: Some(IpAddr::from([192, 0, 2, 10]))
            }]
        );
        assert_eq!(o.judge(A, &add(7), &mut out), Judged::Apply);
        // B names A's tenant: refused, whatever the op.
        assert!(o.collides(B, &attach(7, 3)));
        assert!(o.collides(B, &attach(8, 2)), "A's address for B's tenant");
        assert!(!o.collides(B, &attach(8, 3)));
        for v in [
            add(7),
            VerdictRepr::flush_tenant(7, 3),
            VerdictRepr::release(7, 4),
        ] {
            assert_eq!(
                o.judge(B, &v, &mut out),
                Judged::Refuse(Refusal::OtherHostsTenant),
                "{v:?}"
            );
        }
        assert_eq!(
            o.judge(B, &attach(7, 3), &mut out),
            Judged::Refuse(Refusal::Collision)
        );
        let detach = VerdictRepr::attach(
            TENANT_UNASSIGNED,
            5,
            None,
            Some((IpVersion::V4, v4([10, 0, 0, 2]))),
        );
        assert_eq!(
            o.judge(B, &detach, &mut out),
            Judged::Refuse(Refusal::OtherHostsTenant)
        );
        assert_eq!(o.host_of_addr(ip(2)), Some(A));
        // Nobody attached tenant 9; nobody may name the underlay's tenant or addresses.
        assert_eq!(
            o.judge(B, &add(9), &mut out),
            Judged::Refuse(Refusal::NotAttached)
        );
        assert_eq!(
            o.judge(A, &attach(UNDERLAY_TENANT, 5), &mut out),
            Judged::Refuse(Refusal::UnderlayTenant)
        );
        let host_b = VerdictRepr::attach(8, 6, None, Some((IpVersion::V4, v4([192, 0, 2, 11]))));
        assert_eq!(
            o.judge(A, &host_b, &mut out),
            Judged::Refuse(Refusal::UnderlayAddress)
        );
        // A rule of A's tenant 7 whose local address is B's tenant's.
        assert_eq!(o.judge(B, &attach(8, 3), &mut out), Judged::Apply);
        let mut foreign = add(7);
        foreign.rule.local_addr = v4([10, 0, 0, 3]);
        assert_eq!(
            o.judge(A, &foreign, &mut out),
            Judged::Refuse(Refusal::ForeignLocalAddress)
        );
        // A flushes its own: the address is unbound and free for B.
        out.clear();
        assert_eq!(
            o.judge(A, &VerdictRepr::flush_tenant(7, 7), &mut out),
            Judged::Apply
        );
        assert_eq!(out, [Change::Unbind(ip(2))]);
        assert!(!o.collides(B, &attach(8, 2)));
    }

    #[test]
    fn a_released_tenant_moves_to_the_host_that_attaches_it_next() {
        let (mut o, mut out) = book();
        o.judge(A, &attach(7, 2), &mut out);
        // The target claims before the source released: it must wait.
        assert!(o.collides(B, &attach(7, 2)));
        assert_eq!(
            o.judge(A, &VerdictRepr::release(7, 3), &mut out),
            Judged::Consumed
        );
        // Until the claim, the source still speaks for it.
        assert_eq!(o.judge(A, &add(7), &mut out), Judged::Apply);
        assert!(!o.collides(B, &attach(7, 2)));
        out.clear();
        assert_eq!(o.judge(B, &attach(7, 2), &mut out), Judged::Apply);
        let b = Some(IpAddr::from([192, 0, 2, 11]));
        assert!(out.contains(&Change::Bind {
            addr: ip(2),
            host: b
        }));
        assert_eq!(o.handovers, 1);
        assert_eq!(o.host_of_addr(ip(2)), Some(B));
        assert_eq!(o.judge(B, &add(7), &mut out), Judged::Apply);
        assert_eq!(
            o.judge(A, &add(7), &mut out),
            Judged::Refuse(Refusal::OtherHostsTenant)
        );
        // The same claim again (a retransmission): the same answer.
        assert_eq!(o.judge(B, &attach(7, 2), &mut out), Judged::Apply);
        assert_eq!(o.handovers, 1);
    }

    #[test]
    fn a_host_that_moves_or_restarts_takes_its_bindings_along_or_loses_them() {
        let (mut o, mut out) = book();
        o.judge(A, &attach(7, 2), &mut out);
        out.clear();
        let new = IpAddr::from([192, 0, 2, 20]);
        let records = o.see_host(A, new, &mut out);
        let old = IpAddr::from([192, 0, 2, 10]);
        assert_eq!(
            records,
            [
                underlay_record(TENANT_UNASSIGNED, old),
                underlay_record(UNDERLAY_TENANT, new)
            ]
        );
        assert!(out.contains(&Change::Untrust(old)));
        assert!(out.contains(&Change::Bind {
            addr: ip(2),
            host: Some(new)
        }));
        assert!(o.see_host(A, new, &mut out).is_empty());
        assert_eq!(o.tenants_of(A), [7]);
        out.clear();
        o.forget_tenants(&[7], &mut out);
        assert_eq!(out, [Change::Unbind(ip(2))]);
        assert_eq!(o.sizes(), (2, 0, 0, 2));
    }
}
