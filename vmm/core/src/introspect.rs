//! Introspection wiring: hardware breakpoints on the guest kernel's socket LSM hooks, attribution
//! of each hit to a guest process (trap-handler), the tenant's policy, the verdict applied before
//! the vCPU resumes, and write traps on the kernel pages the hooks depend on.
//!
//! A denied call returns `-EPERM` from the hooked function to its caller (RAX set, the return
//! address popped), so the guest process sees "Operation not permitted". An allowed call resumes
//! past the breakpoint, after a verdict record (the shared wire format of `vigil-wire`) for the
//! firewall tiers was produced.
//!
//! Every decision is an event, one JSON line on the VMM's stdout. The vCPU only builds the event;
//! a logger thread serializes and writes it, so a slow terminal never stalls the guest (a full
//! queue does, by design: events are not dropped).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use serde::Serialize;
use trap_handler::attribution::{self, Attribution, HookArgs, Process, SocketOp};
use trap_handler::mem::{PagingMode, VirtReader};
use trap_handler::policy::{Policy, PolicySpec, Verdict};
use trap_handler::profile::KernelProfile;
use vigil_wire::verdict::{Direction, IpVersion, Op, Protocol, Rule, VerdictRepr, RECORD_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest_ram::GuestRam;
use crate::verdict_region::VerdictRegion;
use crate::write_trap::{GuardedPage, PAGE_SIZE};

const INT3: u8 = 0xcc;
/// `EPERM` (include/uapi/asm-generic/errno-base.h).
const EPERM: u64 = 1;
/// Events waiting for the logger before a vCPU that produces one more waits.
const EVENT_QUEUE: usize = 65_536;
/// Verdict records kept for a tier that has not taken them yet.
const PENDING_VERDICTS: usize = 4096;
/// How long a connect verdict stays open for a flow that has not started (the tier's conntrack
/// carries an established flow after that).
const CONNECT_VERDICT_LIFETIME_MS: u64 = 60_000;

/// Kernel objects whose pages are write-trapped once the tenant has booted, and how many bytes
/// from the symbol are guarded: the hooked functions and their callers (the first bytes, where the
/// hooks and the call sites of interest are), the system-call entry and dispatch, the system call
/// table and the LSM hook lists.
const GUARDED_SYMBOLS: &[(&str, u64)] = &[
    ("security_socket_connect", 64),
    ("security_socket_bind", 64),
    ("security_socket_listen", 64),
    ("security_socket_sendmsg", 64),
    ("__sys_connect", 64),
    ("__sys_bind", 64),
    ("__sys_listen", 64),
    ("entry_SYSCALL_64", 256),
    ("do_syscall_64", 64),
    ("x64_sys_call", 64),
    ("sys_call_table", 8 * 512),
    ("security_hook_heads", 2048),
];

/// Monotonic clock in nanoseconds (CLOCK_MONOTONIC: comparable across the VMM's threads and
/// with other processes on the host).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One decision on a socket operation.
#[derive(Serialize)]
struct SocketEvent {
    vcpu: u8,
    t_ns: u64,
    verdict: Verdict,
    #[serde(flatten)]
    attribution: Option<Attribution>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Sequence number of the verdict record an allowed call produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    verdict_seq: Option<u64>,
    vmm_work_ns: u64,
}

/// A verdict record produced for the firewall tiers.
#[derive(Serialize)]
struct VerdictEvent {
    tenant: u32,
    seq: u64,
    direction: &'static str,
    protocol: u8,
    local: String,
    remote: String,
    lifetime_ms: u64,
    /// The 64-byte record as the tiers receive it, hex.
    record: String,
}

/// A guest write to a write-trapped page, refused.
#[derive(Serialize)]
struct TamperEvent {
    vcpu: u8,
    t_ns: u64,
    gpa: String,
    guarded: String,
    len: usize,
    data: String,
    rip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<Process>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The software breakpoints were placed.
#[derive(Serialize)]
struct SoftHooksEvent {
    t_ns: u64,
    placed: Vec<(String, String)>,
    skipped: Vec<String>,
}

/// The write traps were armed (or could not be).
#[derive(Serialize)]
struct WriteTrapsEvent {
    t_ns: u64,
    kaslr_slide: String,
    pages: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

enum LogEntry {
    Socket(SocketEvent),
    /// A verdict record as produced (decoded for the log by the logger).
    Verdict([u8; RECORD_LEN]),
    Tamper(TamperEvent),
    WriteTraps(WriteTrapsEvent),
    SoftHooks(SoftHooksEvent),
    /// Answered once every entry queued before it is written.
    Barrier(mpsc::Sender<()>),
}

/// How often the logger looks for events. It polls rather than blocks, so that a vCPU queueing an
/// event never pays for waking a thread (a futex system call) on its trap path; an event reaches
/// stdout within this long.
const LOGGER_POLL: Duration = Duration::from_millis(2);

/// The fields every event line starts with.
#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    event: &'static str,
    vm: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

fn line<T: Serialize>(event: &'static str, vm: &str, body: &T) -> serde_json::Result<String> {
    serde_json::to_string(&Line { event, vm, body })
}

/// The log form of a verdict record.
fn verdict_event(tenant: u32, record: &[u8; RECORD_LEN]) -> Option<VerdictEvent> {
    let v = VerdictRepr::from_bytes(record).ok()?;
    let rule = v.rule;
    Some(VerdictEvent {
        tenant,
        seq: v.seq,
        direction: match rule.direction {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        },
        protocol: rule.protocol as u8,
        local: addr_text(rule.ip_version, &rule.local_addr, rule.local_port),
        remote: if rule.remote_prefix == 0 {
            "any".to_string()
        } else {
            addr_text(rule.ip_version, &rule.remote_addr, rule.remote_port_min)
        },
        lifetime_ms: v.lifetime_ms,
        record: hex(record),
    })
}

fn run_logger(vm: String, tenant: u32, rx: Receiver<LogEntry>) {
    loop {
        let mut barriers = Vec::new();
        loop {
            let entry = match rx.try_recv() {
                Ok(entry) => entry,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            };
            let text = match entry {
                LogEntry::Socket(e) => line("socket", &vm, &e),
                LogEntry::Verdict(record) => match verdict_event(tenant, &record) {
                    Some(e) => line("verdict", &vm, &e),
                    None => continue,
                },
                LogEntry::Tamper(e) => line("tamper", &vm, &e),
                LogEntry::WriteTraps(e) => line("write_traps", &vm, &e),
                LogEntry::SoftHooks(e) => line("soft_hooks", &vm, &e),
                LogEntry::Barrier(done) => {
                    barriers.push(done);
                    continue;
                }
            };
            if let Ok(text) = text {
                crate::events::bus().publish(&text);
            }
        }
        for done in barriers {
            let _ = done.send(());
        }
        std::thread::sleep(LOGGER_POLL);
    }
}

/// What the vCPU must do after a hook hit.
pub enum HookOutcome {
    /// Resume past the breakpoint.
    Allow,
    /// Registers already rewritten to return -EPERM to the caller.
    Denied,
}

/// Verdict records not yet taken by a firewall tier.
struct VerdictOutbox {
    next_seq: u64,
    pending: VecDeque<[u8; RECORD_LEN]>,
    overflowed: u64,
    /// The most recent verdicts granted (at most `GRANTED_KEPT`): what a migration hands to the
    /// target's tiers so the tenant's established flows go on there.
    granted: VecDeque<[u8; RECORD_LEN]>,
}

/// Granted verdicts kept for a migration.
const GRANTED_KEPT: usize = 1024;

/// What a migration carries of a tenant's introspection besides its policy (which travels in
/// the VM spec): where the kernel is, the software breakpoints already written into guest RAM,
/// the verdict sequence, the verdicts granted so far.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct IntrospectionState {
    pub slide: u64,
    /// (operation, address, length of the instruction the int3 covers).
    pub soft_placed: Option<Vec<(SocketOp, u64, u64)>>,
    pub next_seq: u64,
    /// Granted verdict records, hex.
    pub granted: Vec<String>,
}

/// Hooks of one VM: what to trap and how to decide.
pub struct Introspection {
    pub vm: String,
    /// The tenant id verdict records carry.
    pub tenant: u32,
    pub profile: KernelProfile,
    /// The policy in force and the spec it was compiled from (replaceable while the VM runs).
    policy: RwLock<(PolicySpec, Policy)>,
    /// (operation, guest-virtual address of its LSM hook), at most three: DR1-DR3.
    pub hooks: Vec<(SocketOp, u64)>,
    /// Hooks by software breakpoint (an `int3` Vigil writes over the function's `endbr64`), for
    /// more hooks than debug registers: (operation, guest-virtual address). Placed once the
    /// tenant has booted; visible to a guest that reads its own text.
    pub soft_hooks: Vec<(SocketOp, u64)>,
    /// The software breakpoints actually placed: (operation, address, length of the instruction
    /// the int3 replaced the first byte of; resuming skips it).
    soft_placed: OnceLock<Vec<(SocketOp, u64, u64)>>,
    /// KASLR slide, measured once the kernel runs (see `adopt_slide`).
    slide: std::sync::atomic::AtomicU64,
    /// Benchmark knob `VIGIL_BARE_HOOKS=bind,...`: these hooks trap and resume with no work (the
    /// bare trap round trip `scripts/bench` compares the full path with). Never for production:
    /// a bare hook decides nothing.
    pub bare: Vec<SocketOp>,
    events: SyncSender<LogEntry>,
    verdicts: Mutex<VerdictOutbox>,
    /// The firewall tiers, once the tenant is plugged into them: allowed calls' verdicts go
    /// there before the vCPU resumes.
    tiers: OnceLock<Arc<dyn VerdictSink>>,
}

/// Where a tenant's verdict records go: the switch-tier micro-VM's ring, and on a cloud host
/// the edge as well.
pub trait VerdictSink: Send + Sync {
    /// Delivers records in order; false when they could not all be delivered (the caller keeps
    /// them for a later `take_verdicts`).
    fn deliver(&self, records: &[[u8; RECORD_LEN]]) -> bool;
}

impl VerdictSink for VerdictRegion {
    fn deliver(&self, records: &[[u8; RECORD_LEN]]) -> bool {
        self.push(records).is_ok()
    }
}

/// A stable tenant id from a VM name (FNV-1a, 32 bits): the same VM gets the same id on every
/// host, which a migrated tenant's verdicts rely on.
pub fn tenant_id(name: &str) -> u32 {
    let hash = name.bytes().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    // 0 is the uplink's id and u32::MAX an unassigned port's (vigil-wire boot information).
    match hash {
        0 | u32::MAX => 1,
        other => other,
    }
}

/// Address families whose sockets reach the network: AF_INET, AF_INET6, AF_PACKET.
fn governed_family(family: u16) -> bool {
    matches!(family, 2 | 10 | 17)
}

/// The verdict record an allowed operation opens, if its protocol is one the tiers filter.
fn verdict_rule(a: &Attribution) -> Option<Rule> {
    let protocol = Protocol::from_u8(u8::try_from(a.protocol).ok()?)?;
    // An IPv4-mapped address (`::ffff:a.b.c.d` on a dual-stack socket) is IPv4 on the wire.
    let addr = match a.addr? {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (ip_version, addr) = match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (IpVersion::V4, bytes)
        }
        IpAddr::V6(v6) => (IpVersion::V6, v6.octets()),
    };
    let port = a.port.unwrap_or(0);
    let mut rule = match a.op {
        SocketOp::Connect | SocketOp::Sendmsg => Rule::egress_to(ip_version, protocol, addr, port),
        SocketOp::Bind | SocketOp::Listen => {
            let mut rule = Rule::any(Direction::Ingress, ip_version, protocol);
            rule.local_addr = addr;
            rule.local_port = port;
            rule
        }
    };
    if protocol.is_icmp() {
        // ICMP has no ports: the echo identifier is not known at connect time.
        rule.local_port = 0;
        rule.remote_port_min = 0;
        rule.remote_port_max = u16::MAX;
    }
    Some(rule)
}

/// Every rule an allowed call opens: its own, and for a bind/listen on the IPv6 wildcard the
/// IPv4 wildcard too (Linux sockets are dual-stack unless IPV6_V6ONLY or bindv6only say
/// otherwise, and then IPv4 peers reach them as well).
fn verdict_rules(a: &Attribution) -> Vec<Rule> {
    let Some(rule) = verdict_rule(a) else {
        return Vec::new();
    };
    let mut rules = vec![rule];
    if rule.direction == Direction::Ingress
        && rule.ip_version == IpVersion::V6
        && rule.local_addr == [0; 16]
    {
        let mut v4 = rule;
        v4.ip_version = IpVersion::V4;
        rules.push(v4);
    }
    rules
}

fn addr_text(version: IpVersion, bytes: &[u8; 16], port: u16) -> String {
    let ip: IpAddr = match version {
        IpVersion::V4 => IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
        IpVersion::V6 => IpAddr::from(*bytes),
    };
    match ip {
        IpAddr::V4(_) => format!("{ip}:{port}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
    }
}

fn unhex(text: &str) -> Option<[u8; RECORD_LEN]> {
    if text.len() != 2 * RECORD_LEN {
        return None;
    }
    let mut out = [0u8; RECORD_LEN];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Introspection {
    /// Builds the hooks from the kernel the VM boots (link addresses: a PVH-booted kernel runs
    /// unrelocated, so no KASLR slide applies) and starts the VM's event logger.
    pub fn new(vm: &str, profile: KernelProfile, spec: PolicySpec) -> Result<Self, String> {
        let policy = Policy::compile(&spec).map_err(|e| format!("policy: {e}"))?;
        let mut hooks = Vec::new();
        for op in [SocketOp::Connect, SocketOp::Bind, SocketOp::Listen] {
            let addr = *profile
                .symbols
                .get(op.hook_symbol())
                .ok_or_else(|| format!("the kernel has no {} symbol to hook", op.hook_symbol()))?;
            hooks.push((op, addr));
        }
        let soft_hooks = [SocketOp::Sendmsg]
            .into_iter()
            .filter_map(|op| profile.symbols.get(op.hook_symbol()).map(|&a| (op, a)))
            .collect();
        let bare = match std::env::var("VIGIL_BARE_HOOKS") {
            Ok(list) => list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|name| {
                    serde_json::from_value(serde_json::Value::String(name.trim().into()))
                        .map_err(|_| format!("VIGIL_BARE_HOOKS: unknown operation {name:?}"))
                })
                .collect::<Result<Vec<SocketOp>, String>>()?,
            Err(_) => Vec::new(),
        };
        let (events, rx) = mpsc::sync_channel(EVENT_QUEUE);
        std::thread::Builder::new()
            .name(format!("{vm}-events"))
            .spawn({
                let vm = vm.to_string();
                let tenant = tenant_id(&vm);
                move || run_logger(vm, tenant, rx)
            })
            .map_err(|e| format!("cannot start the event logger: {e}"))?;
        Ok(Introspection {
            vm: vm.to_string(),
            tenant: tenant_id(vm),
            profile,
            policy: RwLock::new((spec, policy)),
            hooks,
            slide: std::sync::atomic::AtomicU64::new(0),
            soft_hooks,
            soft_placed: OnceLock::new(),
            bare,
            events,
            tiers: OnceLock::new(),
            verdicts: Mutex::new(VerdictOutbox {
                next_seq: 1,
                pending: VecDeque::new(),
                overflowed: 0,
                granted: VecDeque::new(),
            }),
        })
    }

    pub fn hook_at(&self, pc: u64) -> Option<SocketOp> {
        let slide = self.slide();
        self.hooks
            .iter()
            .find(|(_, a)| a.wrapping_add(slide) == pc)
            .map(|(op, _)| *op)
    }

    /// The KASLR slide found at run time (0 until measured, and for a kernel that runs where it
    /// was linked, as a PVH-booted vmlinux does).
    pub fn slide(&self) -> u64 {
        self.slide.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where the debug-register hooks are in this boot (link address + slide).
    pub fn hook_addresses(&self) -> Vec<u64> {
        let slide = self.slide();
        self.hooks
            .iter()
            .map(|(_, a)| a.wrapping_add(slide))
            .collect()
    }

    /// Measures the KASLR slide from the guest's syscall entry (MSR_LSTAR against the linked
    /// `entry_SYSCALL_64`) and adopts it. Returns it, or an error for a value no KASLR produces
    /// (not a multiple of 2 MiB): the hooks then stay where they were.
    pub fn adopt_slide(&self, lstar: u64) -> Result<u64, String> {
        let linked = *self
            .profile
            .symbols
            .get("entry_SYSCALL_64")
            .ok_or("the profile has no entry_SYSCALL_64")?;
        let slide = lstar.wrapping_sub(linked);
        if slide % (2 << 20) != 0 {
            return Err(format!(
                "MSR_LSTAR {lstar:#x} is not entry_SYSCALL_64 ({linked:#x}) moved by a KASLR slide"
            ));
        }
        self.slide
            .store(slide, std::sync::atomic::Ordering::Release);
        Ok(slide)
    }

    /// The software-breakpoint hook at `pc`, if one is placed there, and the length of the
    /// instruction it covers.
    pub fn soft_hook_at(&self, pc: u64) -> Option<(SocketOp, u64)> {
        self.soft_placed
            .get()?
            .iter()
            .find(|(_, a, _)| *a == pc)
            .map(|&(op, _, len)| (op, len))
    }

    pub fn soft_hooks_placed(&self) -> bool {
        self.soft_placed.get().is_some_and(|p| !p.is_empty())
    }

    /// Places the software breakpoints (once per VM): an `int3` over the first byte of each hooked
    /// function, written through the VMM's mapping of guest RAM (so a write trap on that page
    /// does not stop it). Only where the first instruction has no effect but moving RIP (the
    /// `endbr64` of an IBT kernel, or the 5-byte NOP ftrace leaves where `call __fentry__` was):
    /// resuming skips it whole. A function starting otherwise is not hooked this way (the event
    /// says so). Returns how many were placed.
    pub fn place_soft_hooks(&self, mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> usize {
        let placed = self.soft_placed.get_or_init(|| {
            let ram = GuestRam(mem);
            let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
            let mut placed = Vec::new();
            let mut skipped = Vec::new();
            let slide = self.slide();
            for &(op, linked) in &self.soft_hooks {
                let addr = linked.wrapping_add(slide);
                let placed_one = reader.translate(addr).ok().and_then(|t| {
                    let mut head = [0u8; 15];
                    mem.read_slice(&mut head, GuestAddress(t.gpa)).ok()?;
                    let insn = iced_x86::Decoder::with_ip(64, &head, addr, 0).decode();
                    crate::emulation::is_skippable_at_hook(&insn).then_some(())?;
                    mem.write_slice(&[INT3], GuestAddress(t.gpa)).ok()?;
                    Some(insn.len() as u64)
                });
                match placed_one {
                    Some(len) => placed.push((op, addr, len)),
                    None => skipped.push(op.hook_symbol()),
                }
            }
            let _ = self.events.send(LogEntry::SoftHooks(SoftHooksEvent {
                t_ns: monotonic_ns(),
                placed: placed
                    .iter()
                    .map(|(op, a, _)| (op.hook_symbol().to_string(), format!("{a:#x}")))
                    .collect(),
                skipped: skipped.iter().map(|s| s.to_string()).collect(),
            }));
            placed
        });
        placed.len()
    }

    /// The thread-group id of the process running on a vCPU (kernel GS base in `sregs`).
    pub fn current_tgid(&self, mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> Option<u32> {
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        attribution::current_process(&reader, &self.profile, sregs.gs.base)
            .ok()
            .map(|p| p.tgid)
    }

    /// Whether a hit of `op`'s hook needs a decision. A `sendmsg` without a destination of its
    /// own goes where its socket's `connect` (already decided) pointed it: it passes without
    /// an event, which keeps every TCP write from producing one. An unreadable message is decided
    /// (and then denied).
    pub fn needs_decision(
        &self,
        op: SocketOp,
        mem: &GuestMemoryMmap,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> bool {
        if op != SocketOp::Sendmsg {
            return true;
        }
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        !matches!(
            reader.read_field_u64(regs.rsi, self.profile.msghdr.msg_name.offset),
            Ok(0)
        )
    }

    /// Waits until every event queued so far is written (or `limit` passes).
    pub fn flush_events(&self, limit: Duration) {
        let (done, wait) = mpsc::channel();
        if self.events.send(LogEntry::Barrier(done)).is_ok() {
            let _ = wait.recv_timeout(limit);
        }
    }

    /// Plugs the tenant into a switch-tier micro-VM: its verdicts go to that ring from now on.
    pub fn connect_switch(&self, region: Arc<VerdictRegion>) {
        self.connect_tiers(region);
    }

    /// Plugs the tenant into its firewall tiers (once; later calls are ignored).
    pub fn connect_tiers(&self, tiers: Arc<dyn VerdictSink>) {
        let _ = self.tiers.set(tiers);
    }

    /// The state a migration carries (see [`IntrospectionState`]).
    pub fn export_state(&self) -> IntrospectionState {
        let outbox = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        IntrospectionState {
            slide: self.slide(),
            soft_placed: self.soft_placed.get().cloned(),
            next_seq: outbox.next_seq,
            granted: outbox.granted.iter().map(|r| hex(r)).collect(),
        }
    }

    /// Takes over a migrated tenant's state (before its vCPUs run here). Returns the granted
    /// verdicts, re-issued as `Adopt` records for this host's tiers: the flows they opened are
    /// established already and continue mid-stream here.
    pub fn import_state(
        &self,
        state: &IntrospectionState,
    ) -> Result<Vec<[u8; RECORD_LEN]>, String> {
        self.slide
            .store(state.slide, std::sync::atomic::Ordering::Release);
        if let Some(placed) = &state.soft_placed {
            // The int3 bytes are in the migrated RAM already: record them, never place again.
            let _ = self.soft_placed.set(placed.clone());
        }
        let mut outbox = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        outbox.next_seq = outbox.next_seq.max(state.next_seq);
        let mut adopted = Vec::new();
        for text in &state.granted {
            let bytes = unhex(text).ok_or("a granted verdict is not hex")?;
            let mut v = VerdictRepr::from_bytes(&bytes).map_err(|e| format!("{e:?}"))?;
            if v.tenant != self.tenant {
                return Err(format!(
                    "a granted verdict of tenant {} in tenant {}",
                    v.tenant, self.tenant
                ));
            }
            v.op = Op::Adopt;
            v.seq = outbox.next_seq;
            outbox.next_seq += 1;
            // Connect verdicts expire (they only open new flows for a while); adopting an
            // established flow needs the verdict now, so it gets a fresh lifetime.
            if v.lifetime_ms != 0 {
                v.lifetime_ms = CONNECT_VERDICT_LIFETIME_MS;
            }
            let record = v.to_bytes();
            outbox.granted.push_back(record);
            if outbox.granted.len() > GRANTED_KEPT {
                outbox.granted.pop_front();
            }
            adopted.push(record);
        }
        Ok(adopted)
    }

    /// The policy spec in force.
    pub fn policy_spec(&self) -> PolicySpec {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Replaces the policy: every later call is decided by `spec`. The caller revokes the
    /// verdicts the old policy granted (a flush of the tenant on its tiers).
    pub fn replace_policy(&self, spec: PolicySpec) -> Result<(), String> {
        let policy = Policy::compile(&spec).map_err(|e| e.to_string())?;
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = (spec, policy);
        Ok(())
    }

    /// The next sequence number of this tenant's verdict records (the host numbers its own
    /// control records for the tenant from the same counter).
    pub fn next_seq(&self) -> u64 {
        let mut outbox = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        let seq = outbox.next_seq;
        outbox.next_seq += 1;
        seq
    }

    /// Verdict records not yet taken by a tier, oldest first, and how many were dropped because
    /// nobody took them.
    pub fn take_verdicts(&self) -> (Vec<[u8; RECORD_LEN]>, u64) {
        let mut outbox = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        let overflowed = std::mem::take(&mut outbox.overflowed);
        (outbox.pending.drain(..).collect(), overflowed)
    }

    /// Produces the verdict record of an allowed operation; returns its sequence number.
    fn produce_verdict(&self, rule: Rule) -> u64 {
        let lifetime_ms = match rule.direction {
            Direction::Egress => CONNECT_VERDICT_LIFETIME_MS,
            Direction::Ingress => 0,
        };
        let (seq, record) = {
            let mut outbox = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
            let seq = outbox.next_seq;
            outbox.next_seq += 1;
            let record = VerdictRepr {
                op: Op::Add,
                tenant: self.tenant,
                seq,
                lifetime_ms,
                rule,
            }
            .to_bytes();
            if outbox.granted.len() == GRANTED_KEPT {
                outbox.granted.pop_front();
            }
            outbox.granted.push_back(record);
            // Straight into the switch's ring when there is one (the micro-VM drains it before
            // it reads the next frames, so the flow's first packet finds its verdict); kept for a
            // tier that asks later otherwise, or when the ring is full.
            let delivered = self
                .tiers
                .get()
                .is_some_and(|tiers| tiers.deliver(&[record]));
            if !delivered {
                if outbox.pending.len() == PENDING_VERDICTS {
                    outbox.pending.pop_front();
                    outbox.overflowed += 1;
                }
                outbox.pending.push_back(record);
            }
            (seq, record)
        };
        // Formatted by the logger thread, off the trap path.
        let _ = self.events.send(LogEntry::Verdict(record));
        seq
    }

    /// Attributes, decides and applies. Fails closed: an attribution error denies.
    pub fn on_hook(
        &self,
        vcpu: u8,
        op: SocketOp,
        mem: &GuestMemoryMmap,
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
    ) -> HookOutcome {
        let work = Instant::now();
        let t_ns = monotonic_ns();
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        let args = HookArgs {
            rdi: regs.rdi,
            rsi: regs.rsi,
            rdx: regs.rdx,
            gs_base: sregs.gs.base,
        };
        let attributed = attribution::attribute(&reader, &self.profile, op, args);
        let verdict = match &attributed {
            // The firewall governs network flows: local IPC and configuration sockets (unix,
            // netlink, ...) are allowed, and still logged. AF_PACKET is raw network access and
            // stays under the policy.
            Ok(a) if !governed_family(a.family) => Verdict::Allow,
            Ok(a) => self
                .policy
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .decide(a),
            Err(_) => Verdict::Deny,
        };
        let mut outcome = HookOutcome::Allow;
        if verdict == Verdict::Deny {
            // Return -EPERM to the caller: pop the return address the call pushed.
            match reader.read_u64(regs.rsp) {
                Ok(ret) => {
                    regs.rax = EPERM.wrapping_neg();
                    regs.rip = ret;
                    regs.rsp += 8;
                    outcome = HookOutcome::Denied;
                }
                Err(_) => {
                    // The guest's own stack is unreadable: let the call proceed rather than
                    // corrupt its state; the event says so (verdict "allow", with the error).
                }
            }
        }
        let verdict_seq = match (&outcome, &attributed) {
            (HookOutcome::Allow, Ok(a)) => verdict_rules(a)
                .into_iter()
                .map(|rule| self.produce_verdict(rule))
                .reduce(|first, _| first),
            _ => None,
        };
        let vmm_work_ns = work.elapsed().as_nanos() as u64;
        let (attribution, error) = match attributed {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let _ = self.events.send(LogEntry::Socket(SocketEvent {
            vcpu,
            t_ns,
            verdict: match outcome {
                HookOutcome::Allow => Verdict::Allow,
                HookOutcome::Denied => Verdict::Deny,
            },
            attribution,
            error,
            verdict_seq,
            vmm_work_ns,
        }));
        outcome
    }

    /// The guest pages to write-trap, from the guest's own page tables (so a relocated or
    /// KASLR-placed kernel is found where it really is).
    pub fn guarded_pages(&self, mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> Vec<GuardedPage> {
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        let mut pages = Vec::new();
        for &(symbol, extent) in GUARDED_SYMBOLS {
            let Some(&linked) = self.profile.symbols.get(symbol) else {
                continue;
            };
            let addr = linked.wrapping_add(self.slide());
            let mut page = addr & !(PAGE_SIZE - 1);
            while page < addr + extent {
                if let Ok(t) = reader.translate(page) {
                    pages.push(GuardedPage {
                        gpa: t.gpa & !(PAGE_SIZE - 1),
                        label: symbol.to_string(),
                    });
                }
                page += PAGE_SIZE;
            }
        }
        pages
    }

    /// Logs the outcome of arming the write traps.
    pub fn write_traps_armed(&self, pages: &[GuardedPage], error: Option<String>) {
        let _ = self.events.send(LogEntry::WriteTraps(WriteTrapsEvent {
            t_ns: monotonic_ns(),
            kaslr_slide: format!("{:#x}", self.slide()),
            pages: pages
                .iter()
                .map(|p| (format!("{:#x}", p.gpa), p.label.clone()))
                .collect(),
            error,
        }));
    }

    /// A guest write to a guarded page was refused (KVM discarded it): report who tried.
    #[allow(clippy::too_many_arguments)]
    pub fn on_tamper(
        &self,
        vcpu: u8,
        gpa: u64,
        guarded: &str,
        data: &[u8],
        mem: &GuestMemoryMmap,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) {
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        let process = attribution::current_process(&reader, &self.profile, sregs.gs.base);
        let (process, error) = match process {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let _ = self.events.send(LogEntry::Tamper(TamperEvent {
            vcpu,
            t_ns: monotonic_ns(),
            gpa: format!("{gpa:#x}"),
            guarded: guarded.to_string(),
            len: data.len(),
            data: hex(data),
            rip: format!("{:#x}", regs.rip),
            process,
            error,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use trap_handler::attribution::Process;

    fn attribution(op: SocketOp, addr: &str, port: u16, protocol: u16) -> Attribution {
        Attribution {
            op,
            family: 2,
            sock_type: 1,
            protocol,
            addr: Some(addr.parse().unwrap()),
            port: Some(port),
            process: Process {
                pid: 7,
                tgid: 7,
                comm: "nc".into(),
                exe: Some("/bin/busybox".into()),
                uid: 0,
                ppid: 1,
                parent_comm: "sh".into(),
            },
        }
    }

    #[test]
    fn connect_opens_exactly_one_remote_endpoint() {
        let rule = verdict_rule(&attribution(SocketOp::Connect, "10.77.0.1", 8080, 6)).unwrap();
        assert_eq!(rule.direction, Direction::Egress);
        assert_eq!(rule.protocol, Protocol::Tcp);
        assert_eq!(rule.remote_prefix, 32);
        assert_eq!(
            &rule.remote_addr[..4],
            &Ipv4Addr::new(10, 77, 0, 1).octets()
        );
        assert_eq!((rule.remote_port_min, rule.remote_port_max), (8080, 8080));
        assert_eq!(rule.local_port, 0);
        // The record round-trips through the wire format the tiers parse.
        let record = VerdictRepr {
            op: Op::Add,
            tenant: 9,
            seq: 1,
            lifetime_ms: 1,
            rule,
        }
        .to_bytes();
        assert_eq!(VerdictRepr::from_bytes(&record).unwrap().rule, rule);
    }

    #[test]
    fn a_dual_stack_wildcard_listener_opens_both_versions_and_mapped_addresses_are_ipv4() {
        let rules = verdict_rules(&attribution(SocketOp::Listen, "::", 7000, 6));
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].ip_version, IpVersion::V6);
        assert_eq!(rules[1].ip_version, IpVersion::V4);
        assert!(rules
            .iter()
            .all(|r| r.local_port == 7000 && r.direction == Direction::Ingress));
        // A specific IPv6 address is IPv6 only.
        assert_eq!(
            verdict_rules(&attribution(SocketOp::Bind, "fd00::2", 7000, 6)).len(),
            1
        );
        // connect() to ::ffff:10.0.0.1 is an IPv4 flow.
        let mapped = verdict_rules(&attribution(SocketOp::Connect, "::ffff:10.0.0.1", 80, 6));
        assert_eq!(mapped.len(), 1);
        assert_eq!(mapped[0].ip_version, IpVersion::V4);
        assert_eq!(&mapped[0].remote_addr[..4], &[10, 0, 0, 1]);
    }

    #[test]
    fn bind_opens_the_local_port_to_any_remote() {
        let rule = verdict_rule(&attribution(SocketOp::Bind, "0.0.0.0", 8050, 6)).unwrap();
        assert_eq!(rule.direction, Direction::Ingress);
        assert_eq!(rule.local_port, 8050);
        assert_eq!(rule.remote_prefix, 0);
        assert_eq!((rule.remote_port_min, rule.remote_port_max), (0, u16::MAX));
    }

    #[test]
    fn unfiltered_protocols_and_addressless_calls_produce_no_record() {
        assert!(verdict_rule(&attribution(SocketOp::Connect, "10.0.0.1", 1, 132)).is_none());
        let mut no_addr = attribution(SocketOp::Connect, "10.0.0.1", 1, 6);
        no_addr.addr = None;
        assert!(verdict_rule(&no_addr).is_none());
    }

    #[test]
    fn event_lines_start_with_event_and_vm_and_decode_verdicts() {
        #[derive(Serialize)]
        struct Body {
            x: u8,
        }
        assert_eq!(
            line("tamper", "t1", &Body { x: 3 }).unwrap(),
            r#"{"event":"tamper","vm":"t1","x":3}"#
        );
        let rule = verdict_rule(&attribution(SocketOp::Connect, "10.77.0.1", 8080, 6)).unwrap();
        let record = VerdictRepr {
            op: Op::Add,
            tenant: 5,
            seq: 9,
            lifetime_ms: 60_000,
            rule,
        }
        .to_bytes();
        let event = verdict_event(5, &record).unwrap();
        assert_eq!(
            (event.seq, event.direction, event.protocol),
            (9, "egress", 6)
        );
        assert_eq!(event.remote, "10.77.0.1:8080");
        assert_eq!(event.record.len(), 2 * RECORD_LEN);
        assert!(
            verdict_event(5, &[0u8; RECORD_LEN]).is_none(),
            "op 0 is not a verdict"
        );
    }

    #[test]
    fn only_network_families_are_governed() {
        assert!(governed_family(2) && governed_family(10) && governed_family(17));
        assert!(
            !governed_family(1) && !governed_family(16),
            "unix and netlink are local"
        );
    }

    #[test]
    fn tenant_ids_are_stable_and_distinct() {
        assert_eq!(tenant_id("tenant"), tenant_id("tenant"));
        assert_ne!(tenant_id("tenant"), tenant_id("tenant2"));
        // FNV-1a of the empty string is its offset basis.
        assert_eq!(tenant_id(""), 0x811c_9dc5);
    }
}
