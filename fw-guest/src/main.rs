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
    };

    use crate::arch::{self, serial::Com1, BootCapture};
    use fw_guest::filter::{slots_for, Config, Filter, FlowSlot, IndexSlot, VerdictSlot};

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
        /// virtio-mmio devices (none without Vigil's block: the micro-VM probes nothing).
        pub fn devices(&self) -> &[MmioDevice] {
            self.boot_info.as_ref().map_or(&[], |info| info.devices())
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
                let _ = writeln!(Com1, "fw-guest: bad boot information: {error}");
                exit_code::BAD_BOOT_INFO
            }
        };
        arch::exit(code)
    }

    /// The micro-VM's ring-3 program; returns the exit code. The packet loop goes here.
    pub fn ring3_main(boot: &BootSummary) -> u8 {
        let _ = writeln!(
            Com1,
            "vigil fw-guest: role={} cpl={} mem={}MiB devices={}",
            boot.role.name(),
            arch::current_privilege_level(),
            boot.ram_bytes >> 20,
            boot.devices().len()
        );
        if let Some(test) = cmdline_value(boot.cmdline, b"fw.selftest=") {
            return protection_selftest(test);
        }
        if let Some((base, size)) = boot.verdict_region() {
            return take_boot_verdicts(base, size);
        }
        exit_code::OK
    }

    // The filter's tables: statics (no heap), all-zero or EMPTY at load.
    const FLOWS: usize = 4096;
    const VERDICTS: usize = 1024;
    static mut FLOW_SLOTS: [FlowSlot; slots_for(FLOWS)] = [FlowSlot::EMPTY; slots_for(FLOWS)];
    static mut VERDICT_SLOTS: [VerdictSlot; VERDICTS] = [VerdictSlot::EMPTY; VERDICTS];
    static mut VERDICT_INDEX: [IndexSlot; 2 * VERDICTS] = [IndexSlot::EMPTY; 2 * VERDICTS];

    /// The verdict region the VMM reserved (vigil-wire `ring` layout): apply every verdict
    /// waiting in the ring to the filter, publish the counters, report. Until the switch ports
    /// exist this is all the micro-VM does with verdicts; the packet loop will drain the ring
    /// before each batch of frames.
    fn take_boot_verdicts(base: u64, size: u64) -> u8 {
        use core::sync::atomic::AtomicU64;
        use vigil_wire::ring::{
            Consumer, CountersWriter, COUNTERS_OFFSET, MAX_COUNTED_PORTS, VERDICT_REGION_BYTES,
        };
        if size < VERDICT_REGION_BYTES as u64 || !base.is_multiple_of(4096) {
            let _ = writeln!(
                Com1,
                "fw-guest: verdict region {base:#x}+{size:#x} is too small"
            );
            return exit_code::BAD_BOOT_INFO;
        }
        let words = |offset: usize, bytes: usize| {
            // SAFETY: the region lies in RAM that ring 3 maps read/write (boot info checked
            // against RAM by the VMM, alignment checked above), the VMM only ever touches it as
            // AtomicU64 words too, and nothing else in the micro-VM aliases it.
            unsafe {
                core::slice::from_raw_parts((base as usize + offset) as *const AtomicU64, bytes / 8)
            }
        };
        let mut ring = match Consumer::attach(words(0, COUNTERS_OFFSET)) {
            Ok(ring) => ring,
            Err(e) => {
                let _ = writeln!(Com1, "fw-guest: verdict ring: {e:?}");
                return exit_code::BAD_BOOT_INFO;
            }
        };
        let counters = match CountersWriter::format(
            words(COUNTERS_OFFSET, VERDICT_REGION_BYTES - COUNTERS_OFFSET),
            MAX_COUNTED_PORTS,
        ) {
            Ok(c) => c,
            Err(e) => {
                let _ = writeln!(Com1, "fw-guest: counters block: {e:?}");
                return exit_code::BAD_BOOT_INFO;
            }
        };
        // SAFETY: the tables are used only here, by the single ring-3 thread, once.
        let (flows, verdicts, index) = unsafe {
            (
                &mut *core::ptr::addr_of_mut!(FLOW_SLOTS),
                &mut *core::ptr::addr_of_mut!(VERDICT_SLOTS),
                &mut *core::ptr::addr_of_mut!(VERDICT_INDEX),
            )
        };
        let Ok(mut filter) = Filter::new(flows, verdicts, index, Config::default()) else {
            let _ = writeln!(Com1, "fw-guest: filter tables rejected");
            return exit_code::PANIC;
        };
        // No clock yet (the boot information carries no TSC rate): verdicts apply at time 0.
        let taken = filter.drain_ring(&mut ring, 0);
        let c = *filter.counters();
        c.publish(&counters, 0);
        let _ = writeln!(
            Com1,
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
        // SAFETY (all cases): each access is meant to fault before it has any effect; the
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
        let _ = writeln!(Com1, "fw-guest: unknown or survived fw.selftest");
        exit_code::PANIC
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        let _ = writeln!(Com1, "fw-guest: panic: {info}");
        arch::exit(exit_code::PANIC)
    }
}
