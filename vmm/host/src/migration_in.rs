//! The target's end of a live migration: listens at `tcp:HOST:PORT`, authenticates the source
//! (see `migration_link`), builds the VM while the source still runs it, takes RAM in rounds,
//! then the final state; only then does its switch take the tenant over and the VM run.
//!
//! Owns: the receiving side of the protocol in `migration`. Must not: open anything for a
//! tenant (switch port, address, verdicts) before its whole state arrived and checked; keep
//! anything of a migration that failed.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use edge::link::{EdgeOutcome, Queued};
use vigil_wire::outcome::Outcome;
use vigil_wire::verdict::RECORD_LEN;
use vmm_core::snapshot::{read_json, write_json, VmSnapshot};

use crate::lifecycle::Prepared;
use crate::migration::{
    page_digests, MigrationHeader, MigrationReply, Step, MIGRATION_VERSION, MIGRATION_WAIT,
};
use crate::migration_deadline::{Deadline, ReceiveLimit};
use crate::migration_link::{self, tcp_target, Session};
use crate::snapshot::{import_introspection, MAX_STATE_DOC};
use crate::tenant::{start_vm, Tenant};
use crate::{Host, HostError, VmState};

/// How long an accepted connection may take to authenticate, in all.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// Handshakes under way at once, in all and from one address (each is a thread for at most
/// `HANDSHAKE_WAIT`): a peer that opens connections without end cannot crowd out the source.
const MAX_HANDSHAKES: usize = 64;
const MAX_HANDSHAKES_PER_PEER: usize = 4;
/// Pre-copy rounds a target takes at most (a source that never stops is cut off).
const MAX_ROUNDS: u32 = 64;
/// How long the announcement waits for the edge to acknowledge this host's claim of the
/// tenant's address: the edge takes a claim once the source released the tenant
/// (`edge::owners`, within its `CLAIM_WAIT` of 1.5 s), and until then refuses frames of the
/// address from this host.
const CLAIM_CONFIRM_LIMIT: Duration = Duration::from_secs(5);
/// Claims made at most when the edge refuses them as a collision (the source had not released
/// the tenant within the edge's `CLAIM_WAIT`: a slow source, or one that released late): each
/// waits up to `CLAIM_WAIT` at the edge again, so the source has about 6 s in all.
const CLAIM_ATTEMPTS: u32 = 4;
/// The pause before claiming again.
const CLAIM_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// When the announcement goes out, counted from the edge's confirmation: three frames, as
/// QEMU's self-announce sends several, since one can be lost.
const ANNOUNCE_AT: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(300),
];

/// The tenant announcing itself, sent on its behalf after a migration so that the switch, the
/// edge's VXLAN table and outside hosts learn where it is now (virtio-net's GUEST_ANNOUNCE does
/// this from inside the guest; the tenant's kernel was not asked to): for IPv4 a gratuitous ARP
/// (who-has its own address, broadcast), for IPv6 an unsolicited neighbour advertisement of its
/// address to all nodes with the override flag (RFC 4861 §7.2.6).
fn announcement(mac: [u8; 6], ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => {
            let mut frame = vec![0xff; 6];
            frame.extend_from_slice(&mac);
            // EtherType ARP; htype Ethernet, ptype IPv4, hlen 6, plen 4, op request (RFC 826).
            frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            frame.extend_from_slice(&mac);
            frame.extend_from_slice(&ip.octets());
            frame.extend_from_slice(&[0; 6]);
            frame.extend_from_slice(&ip.octets());
            frame
        }
        IpAddr::V6(ip) => neighbour_advertisement(mac, ip),
    }
}

fn neighbour_advertisement(mac: [u8; 6], ip: std::net::Ipv6Addr) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Packet, Icmpv6Repr,
        IpProtocol, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr, RawHardwareAddress,
        IPV6_LINK_LOCAL_ALL_NODES,
    };
    let icmp = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags: NdiscNeighborFlags::OVERRIDE,
        target_addr: ip,
        lladdr: Some(RawHardwareAddress::from(EthernetAddress(mac))),
    });
    let header = Ipv6Repr {
        src_addr: ip,
        dst_addr: IPV6_LINK_LOCAL_ALL_NODES,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        // Receivers drop neighbour discovery that crossed a router (RFC 4861 §7.1.2).
        hop_limit: 255,
    };
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(mac),
        // 33:33 and the group's low 32 bits (RFC 2464 §7).
        dst_addr: EthernetAddress([0x33, 0x33, 0, 0, 0, 1]),
        ethertype: EthernetProtocol::Ipv6,
    };
    let mut frame = vec![0u8; ethernet.buffer_len() + header.buffer_len() + icmp.buffer_len()];
    let mut e = EthernetFrame::new_unchecked(&mut frame[..]);
    ethernet.emit(&mut e);
    let mut p = Ipv6Packet::new_unchecked(e.payload_mut());
    header.emit(&mut p);
    let mut i = Icmpv6Packet::new_unchecked(p.payload_mut());
    icmp.emit(
        &ip,
        &IPV6_LINK_LOCAL_ALL_NODES,
        &mut i,
        &ChecksumCapabilities::default(),
    );
    frame
}

fn reply(session: &mut Session, ok: bool, error: Option<String>, restore_ms: f64, tiers_ms: f64) {
    reply_timed(session, ok, error, restore_ms, tiers_ms, 0.0);
}

fn reply_timed(
    session: &mut Session,
    ok: bool,
    error: Option<String>,
    restore_ms: f64,
    tiers_ms: f64,
    target_ms: f64,
) {
    let _ = write_json(
        &mut session.writer,
        &MigrationReply {
            ok,
            error,
            restore_ms,
            tiers_ms,
            target_ms,
        },
    )
    .and_then(|()| session.writer.flush());
}

impl Host {
    /// `vm.receive-migration`: listens at `url` (`tcp:HOST:PORT`) for one migrating VM (in the
    /// background; the call returns once the socket listens). Connections that fail to
    /// authenticate are refused and it listens on, until a source authenticated or
    /// `MIGRATION_WAIT` passed.
    pub fn receive_migration(self: &Arc<Self>, url: &str) -> Result<(), HostError> {
        let addr = tcp_target(url).ok_or_else(|| HostError::InvalidUrl {
            url: url.into(),
            form: "tcp:HOST:PORT",
        })?;
        if self.shutdown.load(Ordering::Acquire) {
            return Err(HostError::ShuttingDown);
        }
        let listener = TcpListener::bind(addr).map_err(|e| HostError::Path {
            what: format!("cannot listen at {addr}"),
            source: e,
        })?;
        let host = self.clone();
        let url = url.to_string();
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                if let Err(e) = host.accept_migration(listener) {
                    host.emit(
                        "migration_failed",
                        "",
                        serde_json::json!({"at": url, "error": e}),
                    );
                }
            })
            .map_err(|e| HostError::internal("cannot start the receiver", e))?;
        Ok(())
    }

    /// Waits for a source that authenticates (others are refused with an event each). Each
    /// connection authenticates on its own thread, within `HANDSHAKE_WAIT` in all: one taken in
    /// turn let a peer that sent a byte now and then (or a hundred silent ones) hold the
    /// receiver past the source's own wait.
    fn authenticated_source(&self, listener: &TcpListener) -> Result<Session, String> {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + MIGRATION_WAIT;
        let keys = self.migration_keys();
        let (won, winner) = mpsc::channel::<Session>();
        // Handshakes under way: an id, the peer's address, a handle to cut it off, its start.
        let in_flight: Mutex<Vec<(u64, IpAddr, TcpStream, Instant)>> = Mutex::default();
        let in_flight = &in_flight;
        let ongoing = || in_flight.lock().unwrap_or_else(|p| p.into_inner());
        std::thread::scope(|scope| {
            let mut next_id = 0u64;
            let result = loop {
                if let Ok(session) = winner.try_recv() {
                    break Ok(session);
                }
                let now = Instant::now();
                if now >= deadline {
                    break Err("no source authenticated".to_string());
                }
                // A handshake past its time is cut off: its reads fail at once.
                for (_, _, stream, _) in ongoing()
                    .iter()
                    .filter(|(_, _, _, started)| now.duration_since(*started) >= HANDSHAKE_WAIT)
                {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                let (stream, peer) = match listener.accept() {
                    Ok(accepted) => accepted,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let mut poll = libc::pollfd {
                            fd: std::os::fd::AsRawFd::as_raw_fd(listener),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut poll, 1, 50) };
                        continue;
                    }
                    Err(e) => break Err(e.to_string()),
                };
                let crowded = {
                    let ongoing = ongoing();
                    ongoing.len() >= MAX_HANDSHAKES
                        || ongoing.iter().filter(|h| h.1 == peer.ip()).count()
                            >= MAX_HANDSHAKES_PER_PEER
                };
                let setup = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(HANDSHAKE_WAIT)))
                    .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_WAIT)))
                    .and_then(|()| stream.set_nodelay(true))
                    .and_then(|()| stream.try_clone());
                let handle = match setup {
                    Ok(handle) if !crowded => handle,
                    Ok(_) => {
                        self.emit(
                            "migration_refused",
                            "",
                            serde_json::json!({"peer": peer.to_string(),
                                "error": "too many handshakes under way from this peer or \
                                          in all"}),
                        );
                        continue;
                    }
                    Err(e) => {
                        log::warn!("migration from {peer}: {e}");
                        continue;
                    }
                };
                let id = next_id;
                next_id += 1;
                ongoing().push((id, peer.ip(), handle, Instant::now()));
                let (keys, won) = (&keys, won.clone());
                scope.spawn(move || {
                    let outcome = migration_link::accept(stream, keys, &self.config.name);
                    ongoing().retain(|h| h.0 != id);
                    match outcome {
                        Ok(session) => {
                            let _ = won.send(session);
                        }
                        Err(e) => self.emit(
                            "migration_refused",
                            "",
                            serde_json::json!({"peer": peer.to_string(), "error": e.to_string()}),
                        ),
                    }
                });
            };
            // Whoever is still authenticating is cut off (the scope waits for their threads).
            for (_, _, stream, _) in ongoing().drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
            let session = result?;
            let socket = session.reader.get_ref();
            let _ = socket.set_read_timeout(Some(MIGRATION_WAIT));
            let _ = socket.set_write_timeout(Some(MIGRATION_WAIT));
            Ok(session)
        })
    }

    /// What an incoming migration may take in all, from now on (the default allows a real
    /// one of the largest tenant: [`ReceiveLimit::default`]).
    pub fn set_receive_limit(&self, limit: ReceiveLimit) {
        *self.receive_limit.lock().unwrap_or_else(|p| p.into_inner()) = limit;
    }

    pub(crate) fn accept_migration(&self, listener: TcpListener) -> Result<(), String> {
        let mut session = self.authenticated_source(&listener)?;
        // One source: nobody else connects from here.
        drop(listener);
        // The whole receive runs under one deadline (`migration_deadline`): the header's part
        // first, then, once the spec is checked, the time its RAM allows.
        let limit = *self.receive_limit.lock().unwrap_or_else(|p| p.into_inner());
        let mut allowed = limit.base;
        let socket = session
            .reader
            .get_ref()
            .try_clone()
            .map_err(|e| format!("the receive's deadline: {e}"))?;
        let mut deadline =
            Deadline::start(socket, allowed).map_err(|e| format!("the receive's deadline: {e}"))?;
        let why = |deadline: &Deadline, allowed: Duration, e: String| {
            if deadline.passed() {
                format!(
                    "the source did not complete the migration within its deadline ({} s); \
                     cut off ({e})",
                    allowed.as_secs()
                )
            } else {
                e
            }
        };
        let refuse = |session: &mut Session, e: String| {
            reply(session, false, Some(e.clone()), 0.0, 0.0);
            e
        };
        let header: MigrationHeader = read_json(&mut session.reader, 1 << 20)
            .map_err(|e| why(&deadline, allowed, format!("header: {e}")))?;
        if header.version != MIGRATION_VERSION {
            return Err(refuse(
                &mut session,
                format!(
                    "migration protocol {} (this host speaks {MIGRATION_VERSION})",
                    header.version
                ),
            ));
        }
        if header.source_host != session.peer {
            let e = format!(
                "the header names {:?}, the handshake {:?}",
                header.source_host, session.peer
            );
            return Err(refuse(&mut session, e));
        }
        let spec = header.spec;
        let id = spec.id.clone();
        // Build the VM (slow: the kernel is read and checked) while the source still runs it.
        // Its claim stands until the tenant is in the table (or the migration failed): no create
        // or restore of the same id, number or address meanwhile.
        let Prepared {
            mut vm,
            introspection,
            tenant,
            slot,
            mac,
            claim: taken,
        } = match self.prepare(&spec) {
            Ok(p) => p,
            Err(e) => return Err(refuse(&mut session, e.to_string())),
        };
        let release = || {
            // Whatever of the tenant the switch took (or its book would give a restarted one).
            self.switch.forget(self.flush_record(tenant), tenant);
            self.switch.release(slot);
        };
        allowed = limit.total(spec.memory_mib);
        deadline.allow(allowed);
        if let Err(e) = vm.clear_ram() {
            release();
            return Err(refuse(&mut session, e.to_string()));
        }
        reply(&mut session, true, None, 0.0, 0.0);
        let mut rounds = 0u32;
        let mut arrived = Instant::now();
        let restored = (|| -> Result<Vec<[u8; RECORD_LEN]>, String> {
            loop {
                let step: Step =
                    read_json(&mut session.reader, 4096).map_err(|e| format!("step: {e}"))?;
                match step {
                    Step::Pages { round } => {
                        if round != rounds || rounds >= MAX_ROUNDS {
                            return Err(format!("round {round} out of place"));
                        }
                        vmm_core::snapshot::read_memory(vm.memory(), &mut session.reader)
                            .map_err(|e| format!("round {round}: {e}"))?;
                        rounds += 1;
                    }
                    Step::Final => break,
                }
            }
            arrived = Instant::now();
            let snapshot: VmSnapshot =
                read_json(&mut session.reader, MAX_STATE_DOC).map_err(|e| format!("state: {e}"))?;
            vmm_core::snapshot::read_memory(vm.memory(), &mut session.reader)
                .map_err(|e| format!("final pages: {e}"))?;
            vm.restore_state(&snapshot).map_err(|e| e.to_string())?;
            let state: Option<vmm_core::introspect::IntrospectionState> =
                read_json(&mut session.reader, MAX_STATE_DOC)
                    .map_err(|e| format!("introspection: {e}"))?;
            if header.verify {
                let ours = page_digests(vm.memory());
                let mut theirs = vec![0u8; ours.len() * 8];
                session
                    .reader
                    .read_exact(&mut theirs)
                    .map_err(|e| format!("page digests: {e}"))?;
                let differ: Vec<usize> = ours
                    .iter()
                    .zip(theirs.chunks_exact(8))
                    .enumerate()
                    .filter(|(_, (a, b))| a.to_le_bytes() != **b)
                    .map(|(n, _)| n)
                    .collect();
                if !differ.is_empty() {
                    return Err(format!(
                        "verification: {} pages differ from the source's (first: {:x?})",
                        differ.len(),
                        &differ[..differ.len().min(8)]
                    ));
                }
            }
            import_introspection(&introspection, &state)
        })();
        // Nothing is cut after this: the VM's state is all here (or the receive failed).
        let passed = deadline.finish();
        let adopted = match restored {
            Ok(_) if passed => Err("the deadline passed as the state arrived".to_string()),
            other => other,
        };
        let adopted = match adopted {
            Ok(a) => a,
            Err(e) => {
                release();
                let e = why(&deadline, allowed, e);
                return Err(refuse(&mut session, e));
            }
        };
        let restore_ms = arrived.elapsed().as_secs_f64() * 1e3;
        // This switch takes the tenant over before it runs: its port and address, and its
        // verdicts as Adopt (its flows are established; they continue mid-stream here).
        let mut records = vec![self.switch_attach(tenant, slot, spec.ip, Some(mac))];
        records.extend(adopted.iter().copied());
        // The edge keeps the tenant's verdicts and flows; this host claims its address there
        // (taken over once the source released it: see `edge::owners`), and announces the
        // tenant once the edge confirmed the claim (see `announce`).
        let claim = self.claim_at_edge(tenant, spec.ip);
        let tiers_ms = match self.reconfigure(&records, &[]) {
            Ok(ms) => ms,
            Err(e) => {
                release();
                return Err(refuse(&mut session, e.to_string()));
            }
        };
        let mut entry = Tenant::new(
            spec.clone(),
            tenant,
            slot,
            &vm,
            introspection,
            VmState::Running,
        );
        entry.thread = Some(
            start_vm(&id, vm, self.on_own_stop(&id, tenant)).map_err(|e| {
                // The source resumes it: give it back at the edge.
                self.tell_edge(&[self.edge_release(tenant)]);
                release();
                refuse(&mut session, e.to_string())
            })?,
        );
        self.tenants().insert(id.clone(), entry);
        // In the table now, which stands for it: the source's caller may delete it and create
        // it anew the moment the reply below reaches it, while this thread still announces.
        drop(taken);
        let target_ms = arrived.elapsed().as_secs_f64() * 1e3;
        reply_timed(&mut session, true, None, restore_ms, tiers_ms, target_ms);
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .migrate_ms = Some(tiers_ms);
        self.emit(
            "migrated_in",
            &id,
            serde_json::json!({"from": header.source_host, "tenant": tenant,
                "switch_port": slot + 1, "restore_ms": restore_ms, "tiers_ms": tiers_ms,
                "precopy_rounds": rounds, "adopted_verdicts": adopted.len()}),
        );
        self.announce(&id, slot, mac, tenant, spec.ip, claim);
        Ok(())
    }

    /// Tells the network where a migrated (or restored) tenant is now: a frame on its behalf
    /// into its switch port, which the switch forwards and the edge's VXLAN endpoint learns the
    /// tenant's MAC from. Only after the edge acknowledged this host's claim of the address (it
    /// acknowledges once it judged it): before that, the edge refuses the frame (it speaks for
    /// an address bound to the source) and keeps sending the tenant's traffic to the source,
    /// where nothing receives it, until the tenant itself sends something. Sent
    /// [`ANNOUNCE_AT`] times, while the tenant runs on this port. A gratuitous ARP for an IPv4
    /// tenant, an unsolicited neighbour advertisement for IPv6.
    pub(crate) fn announce(
        &self,
        id: &str,
        slot: usize,
        mac: [u8; 6],
        tenant: u32,
        ip: IpAddr,
        claim: Option<Queued>,
    ) {
        let frame = announcement(mac, ip);
        let started = Instant::now();
        let running_here = || {
            self.tenants()
                .get(id)
                .is_some_and(|t| t.slot == slot && t.state == VmState::Running)
        };
        let mut claim = claim;
        let mut attempts = u32::from(claim.is_some());
        let (edge, refusal) = loop {
            let outcome = match (&self.edge, &claim) {
                (None, _) => break ("none", None),
                (Some(_), None) => break ("not_queued", None),
                (Some(link), Some(queued)) => link.wait(queued, CLAIM_CONFIRM_LIMIT),
            };
            match claim_step(&outcome, attempts) {
                ClaimStep::Done(edge, refusal) => break (edge, refusal),
                ClaimStep::Again if running_here() => {
                    std::thread::sleep(CLAIM_RETRY_PAUSE);
                    claim = self.claim_at_edge(tenant, ip);
                    attempts += 1;
                }
                ClaimStep::Again => break ("refused", Some(Outcome::Collision.name())),
            }
        };
        if edge != "acknowledged" && edge != "none" {
            log::warn!(
                "{id}: the edge did not confirm this host's claim ({edge}{}, {attempts} \
                 attempts); announcing anyway",
                refusal.map(|r| format!(": {r}")).unwrap_or_default()
            );
        }
        let confirmed = Instant::now();
        let (mut frames, mut error) = (0u32, None);
        for at in ANNOUNCE_AT {
            std::thread::sleep((confirmed + at).saturating_duration_since(Instant::now()));
            if !running_here() {
                break;
            }
            let ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            match ports[slot].0.link.send_frame(&frame) {
                Ok(()) => frames += 1,
                Err(e) => error = Some(e.to_string()),
            }
        }
        if let Some(e) = &error {
            log::warn!("{id}: announcing the migrated tenant: {e}");
        }
        self.emit(
            "announced",
            id,
            serde_json::json!({"edge_claim": edge, "claim_attempts": attempts,
                "claim_refusal": refusal, "frames": frames, "error": error,
                "claim_confirmed_ms": (confirmed - started).as_secs_f64() * 1e3}),
        );
    }
}

/// What the announcement does after the edge's word on a claim.
#[derive(Debug, PartialEq, Eq)]
enum ClaimStep {
    /// Announce now; the claim's outcome for the event (`edge_claim`) and the edge's refusal,
    /// if it refused.
    Done(&'static str, Option<&'static str>),
    /// The claim collided with the source's hold on the tenant: claim again.
    Again,
}

/// The next step after `attempts` claims, the last with `outcome`. A collision is claimed again
/// up to [`CLAIM_ATTEMPTS`] times (the source releases the tenant once it knows the migration
/// succeeded, which may be late); any other refusal is final.
fn claim_step(outcome: &EdgeOutcome, attempts: u32) -> ClaimStep {
    match outcome {
        EdgeOutcome::Applied => ClaimStep::Done("acknowledged", None),
        EdgeOutcome::Unconfirmed => ClaimStep::Done("unconfirmed", None),
        EdgeOutcome::Refused { reason, .. } => match Outcome::from_code(*reason) {
            Some(Outcome::Collision) if attempts < CLAIM_ATTEMPTS => ClaimStep::Again,
            why => ClaimStep::Done("refused", Some(why.map_or("unknown", Outcome::name))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{
        EthernetFrame, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, NdiscNeighborFlags,
        NdiscRepr, RawHardwareAddress,
    };
    use vmm_core::devices::vxlan::claims;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    #[test]
    fn a_claim_refused_as_a_collision_is_made_again_and_any_other_refusal_is_final() {
        let refused = |reason: Outcome| EdgeOutcome::Refused {
            records: 1,
            reason: reason as u8,
        };
        assert_eq!(
            claim_step(&EdgeOutcome::Applied, 1),
            ClaimStep::Done("acknowledged", None)
        );
        assert_eq!(
            claim_step(&EdgeOutcome::Unconfirmed, 1),
            ClaimStep::Done("unconfirmed", None)
        );
        for attempts in 1..CLAIM_ATTEMPTS {
            assert_eq!(
                claim_step(&refused(Outcome::Collision), attempts),
                ClaimStep::Again
            );
        }
        assert_eq!(
            claim_step(&refused(Outcome::Collision), CLAIM_ATTEMPTS),
            ClaimStep::Done("refused", Some("collision"))
        );
        for other in [Outcome::AttachRefused, Outcome::NotOwner, Outcome::Invalid] {
            assert_eq!(
                claim_step(&refused(other), 1),
                ClaimStep::Done("refused", Some(other.name()))
            );
        }
        assert_eq!(
            claim_step(
                &EdgeOutcome::Refused {
                    records: 1,
                    reason: 200
                },
                1
            ),
            ClaimStep::Done("refused", Some("unknown"))
        );
    }

    #[test]
    fn an_ipv4_tenant_is_announced_by_gratuitous_arp_claiming_its_address() {
        let ip = IpAddr::from([10, 66, 0, 2]);
        let frame = announcement(MAC, ip);
        assert_eq!(frame.len(), 42);
        assert_eq!(&frame[..6], &[0xff; 6]);
        assert_eq!(claims(&frame), (Some(ip), None));
    }

    #[test]
    fn an_ipv6_tenant_is_announced_by_a_valid_unsolicited_neighbour_advertisement() {
        let ip: IpAddr = "fd00:66::2".parse().unwrap();
        let IpAddr::V6(v6) = ip else { unreachable!() };
        let frame = announcement(MAC, ip);
        // The edge's trust check sees the tenant's address as source and target.
        assert_eq!(claims(&frame), (Some(ip), Some(ip)));
        let e = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(e.src_addr().0, MAC);
        assert_eq!(e.dst_addr().0, [0x33, 0x33, 0, 0, 0, 1]);
        let p = Ipv6Packet::new_checked(e.payload()).unwrap();
        assert_eq!((p.hop_limit(), p.next_header()), (255, IpProtocol::Icmpv6));
        let i = Icmpv6Packet::new_checked(p.payload()).unwrap();
        assert!(i.verify_checksum(&p.src_addr(), &p.dst_addr()), "checksum");
        let parsed = Icmpv6Repr::parse(
            &p.src_addr(),
            &p.dst_addr(),
            &i,
            &smoltcp::phy::ChecksumCapabilities::default(),
        )
        .unwrap();
        assert_eq!(
            parsed,
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                flags: NdiscNeighborFlags::OVERRIDE,
                target_addr: v6,
                lladdr: Some(RawHardwareAddress::from_bytes(&MAC)),
            })
        );
    }
}
