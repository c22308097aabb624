//! The fw-guest micro-VM image.
//!
//! Built for `x86_64-unknown-none` (scripts/build-fw-guest) it is a firmware-less ELF loaded at a
//! fixed physical address and entered through its Xen PVH note. Ring 0 ([`arch`]) only sets up
//! paging, the GDT/IDT/TSS and copies the boot data, then drops to ring 3 where everything else
//! runs: [`ring3_start`] turns the boot data into a [`BootSummary`] and calls [`ring3_main`].
//!
//! Built for the host (as `cargo build --workspace` does) the binary only says what it is.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    println!(
        "fw-guest only runs as a micro-VM: build it with scripts/build-fw-guest \
         (target x86_64-unknown-none) and boot it with the Vigil VMM or QEMU -M microvm"
    );
}

#[cfg(target_os = "none")]
mod arch;

#[cfg(target_os = "none")]
pub use guest::*;

#[cfg(target_os = "none")]
mod guest {
    use core::fmt::Write;

    use vigil_wire::boot::{
        cmdline_role, exit_code, memmap_ram_top, BootInfo, BootInfoError, MmioDevice, Role,
        IDLE_MMIO_ADDR, TENANT_UNASSIGNED,
    };

    use crate::arch::serial::{Com1, Console};
    use crate::arch::{self, BootCapture};
    use fw_guest::filter::{
        slots_for, Config, EdgeReplies, Filter, FlowSlot, IndexSlot, SynProxy, VerdictSlot,
        UPLINK_TENANT,
    };
    use fw_guest::switch::Ports;
    use fw_guest::virtio_net::{Port, Queue};

    /// Where the role came from.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum RoleSource {
        /// Vigil's boot information block (module 0).
        VigilBootInfo,
        /// `role=` on the command line (a VMM that does not know Vigil, e.g. QEMU).
        Cmdline,
        /// Neither: the switch role.
        Default,
    }

    /// What ring 3 knows about the machine it runs on, parsed from the boot data ring 0 copied.
    pub struct BootSummary {
        pub role: Role,
        pub role_source: RoleSource,
        /// Guest RAM in bytes (Vigil's block, else the top of the highest RAM range in the memory
        /// map).
        pub ram_bytes: u64,
        /// Vigil's boot information, when the VMM is Vigil.
        pub boot_info: Option<BootInfo>,
        /// First byte of RAM after the image: ring 3's free memory starts here.
        pub free_start: u64,
        pub cmdline: &'static [u8],
    }

    impl BootSummary {
        /// The VMM handed over zeroed RAM ([`vigil_wire::boot::BOOT_FLAG_RAM_ZEROED`]).
        pub fn ram_zeroed(&self) -> bool {
            self.flag(vigil_wire::boot::BOOT_FLAG_RAM_ZEROED)
        }

        /// The VMM takes console lines by address
        /// ([`vigil_wire::boot::BOOT_FLAG_CONSOLE_MMIO`]).
        pub fn console_by_address(&self) -> bool {
            self.flag(vigil_wire::boot::BOOT_FLAG_CONSOLE_MMIO)
        }

        fn flag(&self, flag: u32) -> bool {
            self.boot_info.as_ref().is_some_and(|i| i.flags & flag != 0)
        }

        /// virtio-mmio devices (none without Vigil's block: the micro-VM probes nothing).
        pub fn devices(&self) -> &[MmioDevice] {
            self.boot_info.as_ref().map_or(&[], |info| info.devices())
        }

        /// Where the VMM put the ports' queues, when it initialized the devices for us
        /// ([`vigil_wire::boot::BOOT_FLAG_PORTS_READY`]; parsing checked the zeroed-RAM flag).
        pub fn ports_ready(&self) -> Option<u64> {
            self.boot_info
                .as_ref()
                .filter(|_| self.flag(vigil_wire::boot::BOOT_FLAG_PORTS_READY))
                .map(|info| info.ports_base)
        }

        /// The guest-physical region reserved for the verdict ring, if any.
        pub fn verdict_region(&self) -> Option<(u64, u64)> {
            self.boot_info
                .as_ref()
                .filter(|info| info.verdict_size != 0)
                .map(|info| (info.verdict_base, info.verdict_size))
        }
    }

    /// Why the boot data cannot be used.
    #[derive(Debug)]
    pub enum SummaryError {
        BootInfo(BootInfoError),
        BadRoleArgument,
    }

    impl core::fmt::Display for SummaryError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                SummaryError::BootInfo(e) => write!(f, "Vigil boot info: {e}"),
                SummaryError::BadRoleArgument => {
                    write!(f, "command line: role= must be switch or edge")
                }
            }
        }
    }

    fn summarize(capture: &'static BootCapture) -> Result<BootSummary, SummaryError> {
        let module = capture.module0();
        // A module that is not Vigil's block (QEMU -initrd with something else) is not ours.
        let boot_info = if BootInfo::has_magic(module) {
            Some(BootInfo::parse(module).map_err(SummaryError::BootInfo)?)
        } else {
            None
        };
        let cmdline = capture.cmdline();
        let (role, role_source) = match boot_info.as_ref().and_then(BootInfo::role) {
            Some(role) => (role, RoleSource::VigilBootInfo),
            None => match cmdline_role(cmdline).map_err(|_| SummaryError::BadRoleArgument)? {
                Some(role) => (role, RoleSource::Cmdline),
                None => (Role::Switch, RoleSource::Default),
            },
        };
        let ram_bytes = match &boot_info {
            Some(info) if info.ram_size != 0 => info.ram_size,
            _ => memmap_ram_top(capture.memmap()),
        };
        Ok(BootSummary {
            role,
            role_source,
            ram_bytes,
            boot_info,
            free_start: capture.image_end,
            cmdline,
        })
    }

    /// Ring 3's entry, reached by `iretq` from ring 0 with the captured boot data.
    pub extern "C" fn ring3_start(capture: &'static BootCapture) -> ! {
        let code = match summarize(capture) {
            Ok(boot) => ring3_main(&boot),
            Err(error) => {
                let _ = writeln!(Console::new(), "fw-guest: bad boot information: {error}");
                exit_code::BAD_BOOT_INFO
            }
        };
        arch::exit(code)
    }

    /// The micro-VM's ring-3 program; returns the exit code. The packet loop goes here.
    pub fn ring3_main(boot: &BootSummary) -> u8 {
        if boot.console_by_address() {
            arch::serial::use_console_by_address();
        }
        let _ = writeln!(
            Console::new(),
            "vigil fw-guest: role={} cpl={} mem={}MiB devices={}",
            boot.role.name(),
            arch::current_privilege_level(),
            boot.ram_bytes >> 20,
            boot.devices().len()
        );
        if let Some(test) = cmdline_value(boot.cmdline, b"fw.selftest=") {
            return protection_selftest(test);
        }
        let Some((base, size)) = boot.verdict_region() else {
            return exit_code::OK;
        };
        let flows = cmdline_value(boot.cmdline, b"fw.flows=")
            .and_then(|v| core::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(DEFAULT_FLOWS);
        let secret = boot_secret(boot.cmdline);
        let zeroed = boot.ram_zeroed();
        if boot.devices().is_empty() {
            take_boot_verdicts(boot.free_start, (flows, zeroed), base, size)
        } else {
            let tsc_khz = cmdline_value(boot.cmdline, b"tsc_khz=")
                .and_then(|v| core::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            switch(
                boot.role,
                (boot.devices(), boot.ports_ready()),
                boot.free_start,
                (flows, secret, zeroed),
                base,
                size,
                tsc_khz,
            )
        }
    }

    // The filter's tables: statics (no heap), all-zero or EMPTY at load.
    /// Verdict table capacity; the flow table as many flows as asked (`fw.flows=`, default
    /// `DEFAULT_FLOWS`) or as RAM allows (see `make_filter`). Every table page the micro-VM
    /// touches costs a fault at boot, so it does not take all RAM by default.
    const VERDICTS: usize = 4096;
    const DEFAULT_FLOWS: usize = 1 << 16;
    const MAX_FLOWS: usize = 1 << 22;

    type Shared = (
        vigil_wire::ring::Consumer<'static>,
        vigil_wire::ring::CountersWriter<'static>,
        vigil_wire::outcome::OutcomeWriter<'static>,
    );

    /// Attaches the verdict ring and formats the counters block of the region the VMM reserved
    /// (vigil-wire `ring` layout).
    fn attach_region(base: u64, size: u64, room: usize) -> Result<Shared, u8> {
        use core::sync::atomic::AtomicU64;
        use vigil_wire::outcome::{outcomes_bytes, OutcomeWriter};
        use vigil_wire::ring::{
            Consumer, CountersWriter, COUNTERS_OFFSET, MAX_COUNTED_PORTS, OUTCOMES_OFFSET,
            VERDICT_REGION_BYTES,
        };
        if size < VERDICT_REGION_BYTES as u64 || !base.is_multiple_of(4096) {
            let _ = writeln!(
                Console::new(),
                "fw-guest: verdict region {base:#x}+{size:#x} is too small"
            );
            return Err(exit_code::BAD_BOOT_INFO);
        }
        let words = |offset: usize, bytes: usize| -> &'static [AtomicU64] {
            // SAFETY: the region lies in RAM that ring 3 maps read/write (the VMM reserved it at
            // the top of RAM; alignment checked above), the VMM only ever touches it as AtomicU64
            // words too, and nothing else in the micro-VM aliases it.
            unsafe {
                core::slice::from_raw_parts((base as usize + offset) as *const AtomicU64, bytes / 8)
            }
        };
        let ring = Consumer::attach(words(0, COUNTERS_OFFSET)).map_err(|e| {
            let _ = writeln!(Console::new(), "fw-guest: verdict ring: {e:?}");
            exit_code::BAD_BOOT_INFO
        })?;
        // The outcome log before the counters: the counters' header tells the VMM the micro-VM
        // applies records (and reports their outcomes) from now on.
        let outcomes = OutcomeWriter::format(
            words(OUTCOMES_OFFSET, outcomes_bytes()),
            ring.position(),
            room,
        )
        .map_err(|e| {
            let _ = writeln!(Console::new(), "fw-guest: outcome log: {e:?}");
            exit_code::BAD_BOOT_INFO
        })?;
        let counters = CountersWriter::format(
            words(COUNTERS_OFFSET, OUTCOMES_OFFSET - COUNTERS_OFFSET),
            MAX_COUNTED_PORTS,
        )
        .map_err(|e| {
            let _ = writeln!(Console::new(), "fw-guest: counters block: {e:?}");
            exit_code::BAD_BOOT_INFO
        })?;
        Ok((ring, counters, outcomes))
    }

    /// The next `count` places for a `T` at `cursor` (aligned to T and to a cache line), and
    /// the cursor moved past them.
    fn place<T>(cursor: &mut u64, count: usize) -> *mut T {
        let align = core::mem::align_of::<T>().max(64) as u64;
        let start = cursor.next_multiple_of(align);
        *cursor = start + (count * core::mem::size_of::<T>()) as u64;
        start as *mut T
    }

    /// [`carve`] of RAM left untouched: RAM the VMM zeroed ([`BootSummary::ram_zeroed`]) for a
    /// `T` that all zero bytes are, or any RAM for a `T` that any bytes are.
    ///
    /// # Safety
    /// As [`carve`]; also, the range's bytes are valid `T`s (all zero bytes and a `T` they are
    /// valid for, or a `T` every byte pattern is valid for).
    unsafe fn carve_zeroed<T: Copy>(cursor: &mut u64, count: usize) -> &'static mut [T] {
        // SAFETY: the caller vouches for the range and its contents; `place` aligns for T.
        unsafe { core::slice::from_raw_parts_mut(place::<T>(cursor, count), count) }
    }

    /// Carves a table of `count` entries out of free RAM at `*cursor` (identity mapped, ring 3
    /// read/write), fills it with `empty`, and moves the cursor past it.
    ///
    /// # Safety
    /// `[*cursor, *cursor + count * size_of::<T>())` must be free RAM nothing else uses.
    unsafe fn carve<T: Copy>(cursor: &mut u64, count: usize, empty: T) -> &'static mut [T] {
        let first = place::<T>(cursor, count);
        // SAFETY: the caller vouches for the range; `place` aligns for T. Every element is
        // written before the slice is made, so it never covers bytes that are not a T.
        unsafe {
            for i in 0..count {
                first.add(i).write(empty);
            }
            core::slice::from_raw_parts_mut(first, count)
        }
    }

    /// The filter, its tables sized from the boot information: the verdict table fixed, the
    /// flow table as many flows (a power of two, at most `MAX_FLOWS`) as fit in three quarters of
    /// the RAM between the image and the verdict region. Called once.
    fn make_filter(
        free_start: u64,
        free_end: u64,
        wanted: usize,
        zeroed: bool,
        config: Config,
    ) -> Result<Filter<'static>, u8> {
        use core::mem::size_of;
        let free = free_end.saturating_sub(free_start);
        let verdict_bytes = (VERDICTS * size_of::<VerdictSlot>()
            + 2 * VERDICTS * size_of::<IndexSlot>()
            + 256) as u64;
        let budget = free.saturating_sub(verdict_bytes) / 4 * 3;
        let mut flows = wanted.clamp(64, MAX_FLOWS).next_power_of_two();
        while flows > 64 && (slots_for(flows) * size_of::<FlowSlot>()) as u64 > budget {
            flows /= 2;
        }
        if (slots_for(flows) * size_of::<FlowSlot>()) as u64 > budget {
            let _ = writeln!(
                Console::new(),
                "fw-guest: {} KiB of free RAM is too little",
                free >> 10
            );
            return Err(exit_code::BAD_BOOT_INFO);
        }
        let mut cursor = free_start;
        // SAFETY: [free_start, free_end) is RAM above the image and below the verdict region
        // (both from the boot information), used by nothing else; the sizes fit (checked above).
        let (flow_slots, verdict_slots, index) = unsafe {
            (
                if zeroed {
                    // All zero already, which is FlowSlot::EMPTY: not written, so its pages are
                    // faulted in as flows arrive, not all at boot.
                    carve_zeroed::<FlowSlot>(&mut cursor, slots_for(flows))
                } else {
                    carve(&mut cursor, slots_for(flows), FlowSlot::EMPTY)
                },
                // Any bytes are a VerdictSlot (storage the table writes before it reads it):
                // never written here, so only the slots verdicts use are ever touched.
                carve_zeroed::<VerdictSlot>(&mut cursor, VERDICTS),
                if zeroed {
                    // All zero already, which is an empty index (IndexSlot::EMPTY).
                    carve_zeroed::<IndexSlot>(&mut cursor, 2 * VERDICTS)
                } else {
                    carve(&mut cursor, 2 * VERDICTS, IndexSlot::EMPTY)
                },
            )
        };
        let _ = writeln!(
            Console::new(),
            "fw-guest: tables: {flows} flows, {VERDICTS} verdicts, {} KiB",
            (cursor - free_start) >> 10
        );
        let config = Config {
            tables_zeroed: zeroed,
            ..config
        };
        Filter::new(flow_slots, verdict_slots, index, config).map_err(|_| {
            let _ = writeln!(Console::new(), "fw-guest: filter tables rejected");
            exit_code::PANIC
        })
    }

    /// The micro-VM's 128-bit secret (SYN cookie key, table hash seed): the host's `fw.seed=` (32
    /// hex digits from its /dev/urandom), mixed with RDRAND where the CPU has it and with the
    /// TSC, each folded in through SipHash so no one source alone decides it.
    fn boot_secret(cmdline: &[u8]) -> [u64; 2] {
        use core::hash::Hasher;
        let mut h = siphasher::sip128::SipHasher24::new_with_keys(0x7669_6769_6c00, 0x5345_4544);
        if let Some(hex) = cmdline_value(cmdline, b"fw.seed=") {
            h.write(hex);
        }
        // SAFETY: cpuid and rdtsc have no memory effects and ring 3 may run them.
        let (ecx, tsc) = unsafe {
            (
                core::arch::x86_64::__cpuid(1).ecx,
                core::arch::x86_64::_rdtsc(),
            )
        };
        h.write_u64(tsc);
        // CPUID.01H:ECX bit 30: RDRAND.
        if ecx & (1 << 30) != 0 {
            for _ in 0..2 {
                let mut r = 0u64;
                // SAFETY: RDRAND is present (checked above) and only writes `r`; a failed draw
                // (carry clear) leaves what the other sources gave.
                if unsafe { core::arch::x86_64::_rdrand64_step(&mut r) } == 1 {
                    h.write_u64(r);
                }
            }
        }
        let key = siphasher::sip128::Hasher128::finish128(&h);
        [key.h1, key.h2]
    }

    /// No switch ports: apply the verdicts waiting in the ring, publish the counters, report.
    fn take_boot_verdicts(
        free_start: u64,
        (flows, zeroed): (usize, bool),
        base: u64,
        size: u64,
    ) -> u8 {
        let (mut ring, counters, outcomes) = match attach_region(base, size, 0) {
            Ok(shared) => shared,
            Err(code) => return code,
        };
        let mut filter = match make_filter(free_start, base, flows, zeroed, Config::default()) {
            Ok(f) => f,
            Err(code) => return code,
        };
        // No ports, no clock needed: the verdicts apply at time 0.
        let taken = filter.drain_ring_reporting(&mut ring, 0, Some(&outcomes));
        let c = *filter.counters();
        c.publish(&counters, 0);
        let _ = writeln!(
            Console::new(),
            "fw-guest: verdicts taken={} applied={} rejected={}{}",
            taken.unwrap_or(0),
            c.verdicts_applied,
            c.verdicts_rejected,
            if taken.is_err() { " ring=corrupt" } else { "" }
        );
        if taken.is_err() {
            exit_code::BAD_BOOT_INFO
        } else {
            exit_code::OK
        }
    }

    /// Most ports the packet loop drives (the boot information's device limit).
    const MAX_PORTS: usize = fw_guest::filter::MAX_PORTS;
    /// Empty polling rounds before the loop yields the CPU, and for how long (µs).
    const IDLE_ROUNDS: u32 = 2000;
    const IDLE_US: u32 = 500;

    /// Monotonic nanoseconds from the TSC (ring 3 may read it), at the rate the VMM passed.
    fn now_ns(tsc_khz: u64) -> u64 {
        if tsc_khz == 0 {
            return 0;
        }
        // SAFETY: rdtsc has no memory effects.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        (u128::from(tsc) * 1_000_000 / u128::from(tsc_khz)) as u64
    }

    /// Carves `count` virtqueues (with their buffers, ~400 KiB each) out of free RAM at
    /// `*cursor`, all zero (a valid initial queue), page aligned. Only the ports present cost
    /// RAM, where statics for `MAX_PORTS` ports would put 6 MiB in every image. RAM the VMM
    /// zeroed (`zeroed`) is not written: a queue's pages are touched as its rings and buffers
    /// are used (boot to first forward was 9 ms longer, faulting in 2 MiB of zeros).
    ///
    /// # Safety
    /// As for [`carve`]; with `zeroed`, the range is all zero bytes.
    unsafe fn carve_queues(cursor: &mut u64, count: usize, zeroed: bool) -> &'static mut [Queue] {
        let start = cursor.next_multiple_of(core::mem::align_of::<Queue>() as u64);
        *cursor = start + (count * core::mem::size_of::<Queue>()) as u64;
        let first = start as *mut Queue;
        // SAFETY: the caller vouches for the range (and, with `zeroed`, its contents); `start`
        // is aligned for Queue, and all-zero bytes are a valid Queue (`Queue::ZERO`).
        unsafe {
            if !zeroed {
                core::ptr::write_bytes(first, 0, count);
            }
            core::slice::from_raw_parts_mut(first, count)
        }
    }

    /// The packet loop, in either role: ports from the boot information (tenant 0: the uplink,
    /// or at the edge the outside), port tenants and addresses updated by `Attach` and
    /// `FlushTenant` records, frames judged by the filter, verdicts taken from the ring before
    /// each round of frames, counters published as they change. Runs until the VMM stops the
    /// micro-VM.
    fn switch(
        role: Role,
        (devices, ports_ready): (&[MmioDevice], Option<u64>),
        free_start: u64,
        (flows, secret, zeroed): (usize, [u64; 2], bool),
        base: u64,
        size: u64,
        tsc_khz: u64,
    ) -> u8 {
        use vigil_wire::ring::{
            PORT_DROPPED, PORT_FORWARDED, PORT_RX_BYTES, PORT_RX_FRAMES, STAGE_BUSY_CYCLES,
            STAGE_BUSY_FRAMES, STAGE_KICKS, STAGE_TX_RING_FULL,
        };
        if devices.len() > MAX_PORTS {
            let _ = writeln!(
                Console::new(),
                "fw-guest: {} devices, using the first {MAX_PORTS}",
                devices.len()
            );
        }
        let count = devices.len().min(MAX_PORTS);
        let mut cursor = free_start;
        let queues = match ports_ready {
            Some(area) => {
                let end = (2 * devices.len() as u64)
                    .checked_mul(core::mem::size_of::<Queue>() as u64)
                    .and_then(|bytes| area.checked_add(bytes));
                if area < free_start || end.is_none_or(|end| end > base) {
                    let _ = writeln!(
                        Console::new(),
                        "fw-guest: the ports' queue area at {area:#x} is not free RAM"
                    );
                    return exit_code::BAD_BOOT_INFO;
                }
                // SAFETY: page-aligned (checked by BootInfo::parse) RAM between the image and
                // the verdict region (checked above) that only the devices use, all zero (the
                // flag comes with zeroed RAM): valid Queues. The tables end below it.
                unsafe { core::slice::from_raw_parts_mut(area as *mut Queue, 2 * count) }
            }
            // SAFETY: free RAM above the image and below the verdict region; make_filter takes
            // what follows the queues.
            None => unsafe { carve_queues(&mut cursor, 2 * count, zeroed) },
        };
        let free_end = ports_ready.unwrap_or(base);
        let config = Config {
            hash_seed: secret[0] ^ secret[1].rotate_left(32),
            // The edge answers SYN floods from the outside itself.
            synproxy: (role == Role::Edge).then(|| SynProxy::new(secret)),
            ..Config::default()
        };
        let mut filter = match make_filter(cursor, free_end, flows, zeroed, config) {
            Ok(f) => f,
            Err(code) => return code,
        };
        let mut state = Ports::new();
        let mut queue_pairs = queues.chunks_exact_mut(2);
        for (index, device) in devices[..count].iter().enumerate() {
            let Some([rx, tx]) = queue_pairs.next() else {
                break;
            };
            let port = match ports_ready {
                // SAFETY: as for `init` below; readied ports run with these queues (the boot
                // flag says so), and their rings are zero (it comes with zeroed RAM).
                Some(_) => Ok(unsafe { Port::adopt(device.base, rx, tx) }),
                // SAFETY: the window comes from the boot information and is mapped for ring 3;
                // the queues are identity-mapped RAM used by nothing else.
                None => unsafe { Port::init(device.base, rx, tx) },
            };
            match port {
                Ok(port) => {
                    let _ = state.ports.push(port);
                    filter.tenancy_mut().set_boot_port(index, device.tenant);
                }
                Err(e) => {
                    let _ = writeln!(
                        Console::new(),
                        "fw-guest: port at {:#x}: {e:?}",
                        device.base
                    );
                    return exit_code::BAD_BOOT_INFO;
                }
            }
        }
        let _ = filter.tenancy_mut().take_port_changes();
        let Some(uplink) = (0..count).find(|&i| filter.tenancy().port(i) == UPLINK_TENANT) else {
            let _ = writeln!(
                Console::new(),
                "fw-guest: no uplink port (a port with tenant 0)"
            );
            return exit_code::BAD_BOOT_INFO;
        };
        let unassigned = (0..count)
            .filter(|&i| filter.tenancy().port(i) == TENANT_UNASSIGNED)
            .count();
        let _ = writeln!(
            Console::new(),
            "fw-guest: {} up: {} ports, uplink {uplink}, unassigned {unassigned}, tsc {tsc_khz} kHz",
            role.name(),
            state.ports.len()
        );
        // The counters block is formatted last: its header is the VMM's sign that the tables
        // and ports are up and verdicts apply at once (records pushed earlier wait in the ring).
        let (mut ring, counters, outcomes) =
            match attach_region(base, size, filter.verdicts().room()) {
                Ok(shared) => shared,
                Err(code) => return code,
            };
        let mut replies = EdgeReplies::new();
        let mut published = u64::MAX;
        let mut rounds = 0u64;
        let (mut busy_cycles, mut busy_frames) = (0u64, 0u64);
        let mut idle_rounds = 0u32;
        loop {
            let now = now_ns(tsc_khz);
            if filter
                .drain_ring_reporting(&mut ring, now, Some(&outcomes))
                .is_err()
            {
                let _ = writeln!(
                    Console::new(),
                    "fw-guest: the verdict ring is corrupt; stopping"
                );
                return exit_code::BAD_BOOT_INFO;
            }
            // A port that changed hands: what was learned behind it belongs to someone else.
            let changed = filter.tenancy_mut().take_port_changes();
            if changed != 0 {
                state
                    .learned
                    .retain(|_, port| changed & (1u32 << (*port as u32 % 32)) == 0);
            }
            // SAFETY: rdtsc has no memory effects (ring 3 may read the TSC).
            let round_start = unsafe { core::arch::x86_64::_rdtsc() };
            let mut round_frames = 0u64;
            for i in 0..state.ports.len() {
                while let Some(received) = state.ports[i].recv() {
                    round_frames += 1;
                    // Judged in place: a forward moves the buffer itself to the output port.
                    // SAFETY: received on port i, whose recycle comes after this frame is done;
                    // `bytes` is the only reference to the frame, and is not used past the
                    // call that consumes `received`.
                    let bytes = unsafe { received.bytes_mut() };
                    match role {
                        Role::Switch => state.switch_frame(&mut filter, i, (received, bytes), now),
                        Role::Edge => {
                            state.edge_frame(&mut filter, i, (received, bytes), &mut replies, now)
                        }
                    }
                }
                state.ports[i].recycle();
            }
            rounds += 1;
            let total: u64 = state
                .forwarded
                .iter()
                .chain(state.dropped.iter())
                .sum::<u64>()
                + filter.counters().verdicts_applied
                + filter.counters().verdicts_rejected;
            let changed = total != published;
            let publish = changed || rounds.is_multiple_of(4096);
            if publish {
                // Counters before frames: whoever sees a frame of this round downstream reads
                // counters that count it already (the flush's release fence orders them).
                published = total;
                let c = *filter.counters();
                c.publish(&counters, filter.conntrack().used() as u64);
                for (i, port) in state.ports.iter().enumerate() {
                    counters.set_port(i, PORT_RX_FRAMES, port.rx_frames);
                    counters.set_port(i, PORT_RX_BYTES, port.rx_bytes);
                    counters.set_port(i, PORT_FORWARDED, state.forwarded[i]);
                    counters.set_port(i, PORT_DROPPED, state.dropped[i]);
                }
            }
            for port in state.ports.iter_mut() {
                port.flush();
            }
            if round_frames != 0 {
                // SAFETY: as above.
                let round_end = unsafe { core::arch::x86_64::_rdtsc() };
                busy_cycles = busy_cycles.wrapping_add(round_end.wrapping_sub(round_start));
                busy_frames += round_frames;
            }
            if !changed {
                idle_rounds += 1;
                if idle_rounds >= IDLE_ROUNDS {
                    // Nothing for a while: let the VMM take the vCPU off the CPU briefly.
                    // SAFETY: a 32-bit MMIO write to the VMM's idle address (mapped for ring 3
                    // with the rest of the device range); it has no effect on memory.
                    unsafe { core::ptr::write_volatile(IDLE_MMIO_ADDR as *mut u32, IDLE_US) };
                }
            } else {
                idle_rounds = 0;
            }
            if publish {
                // The transmit side's figures, after the flush that moves them.
                let (tx_full, kicks) = state
                    .ports
                    .iter()
                    .fold((0, 0), |(f, k), p| (f + p.tx_full, k + p.kicks));
                counters.set_stage(STAGE_TX_RING_FULL, tx_full);
                counters.set_stage(STAGE_KICKS, kicks);
                counters.set_stage(STAGE_BUSY_CYCLES, busy_cycles);
                counters.set_stage(STAGE_BUSY_FRAMES, busy_frames);
                filter.sweep(now, 64);
            }
        }
    }

    /// The value of the first `key...` argument on the command line.
    fn cmdline_value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
        cmdline
            .split(|b| b.is_ascii_whitespace())
            .find_map(|arg| arg.strip_prefix(key))
    }

    /// `fw.selftest=<what>`: ring 3 does something its page tables or privilege level forbid,
    /// to show that the CPU stops it (the exception handler reports and exits with
    /// `CPU_EXCEPTION`). Returns only for an unknown test name.
    fn protection_selftest(what: &[u8]) -> u8 {
        let kdata = arch::kernel_data_start() as *mut u64;
        let text = arch::text_start() as *mut u64;
        // SAFETY: (all cases) each access is meant to fault before it has any effect; the
        // handler never returns here.
        unsafe {
            match what {
                // Read the kernel-only data (page tables, GDT, IDT, TSS, stacks): #PF, error 5.
                b"kread" => {
                    core::ptr::read_volatile(kdata);
                }
                // Write it: #PF, error 7.
                b"kwrite" => core::ptr::write_volatile(kdata, 0),
                // Write the (user-readable) code: #PF, error 7.
                b"textwrite" => core::ptr::write_volatile(text, 0),
                // Read low memory with the PVH start info: #PF, error 5.
                b"lowmem" => {
                    core::ptr::read_volatile(0x6000 as *const u64);
                }
                // A privileged instruction: #GP, error 0.
                b"cli-cr3" => core::arch::asm!("mov cr3, {0}", in(reg) 0u64),
                // A port the TSS I/O bitmap does not grant (the i8042 reset command, which would
                // reset the VM if it got through): #GP, error 0.
                b"port" => core::arch::asm!("out dx, al", in("dx") 0x64u16, in("al") 0xfeu8),
                // An instruction that ring 3 may not run with IOPL 0: #GP, error 0.
                b"cli" => core::arch::asm!("cli"),
                // An invalid instruction: #UD.
                b"ud" => core::arch::asm!("ud2"),
                _ => {}
            }
        }
        let _ = writeln!(Console::new(), "fw-guest: unknown or survived fw.selftest");
        exit_code::PANIC
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        // The UART: it needs nothing set up.
        let _ = writeln!(Com1, "fw-guest: panic: {info}");
        arch::exit(exit_code::PANIC)
    }
}
