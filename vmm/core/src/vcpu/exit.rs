//! Exit dispatch: what one KVM exit means, decided over the device bus with no KVM call (the
//! vCPU loop does the ioctls), so unit tests can drive it without /dev/kvm.
//!
//! Owns: routing port I/O and MMIO exits to the bus (or, for a write-trapped page, to the tamper
//! report), the stop reason of halts, shutdowns and system events, and the classification of a
//! debug exit (our breakpoint, the end of a step-over, the syscall fix, someone else's).
//! Must not: touch KVM, guest registers or guest memory; trust anything in the exit (ports,
//! addresses, sizes and values are the guest's).

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use trap_handler::attribution::SocketOp;

use crate::bus::{Bus, PioAction};
use crate::vcpu::{StopReason, VcpuStats};

/// DR6 bits: breakpoint 0 hit, single step.
pub(crate) const DR6_B0: u64 = 1 << 0;
pub(crate) const DR6_BS: u64 = 1 << 14;
/// Vector of #BP.
pub(crate) const BP_VECTOR: u8 = 3;

/// A KVM exit as dispatch sees it: the data KVM handed over, no KVM type.
#[derive(Debug)]
pub enum VcpuExitView<'a> {
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    Debug {
        pc: u64,
        dr6: u64,
        exception: u32,
    },
    Hlt,
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT` with its type.
    SystemEvent(u32),
    /// `KVM_EXIT_INTERNAL_ERROR`; its suberror is read from `kvm_run` by the loop.
    InternalError,
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// An exit that needs nothing (an interrupt window, a signal).
    Nothing,
    /// Any other exit, in KVM's own words.
    Unexpected(String),
}

/// What the vCPU loop does after dispatch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Done: run the guest again.
    Handled,
    /// A port write the bus took and that did not stop the VM: run again (the loop first checks
    /// whether the syscall fix can be armed; port writes are frequent during boot).
    PortWritten,
    /// A debug exit, for the loop (it needs registers).
    Debug {
        pc: u64,
        dr6: u64,
        exception: u32,
    },
    /// An instruction KVM could not emulate, for the loop.
    InternalError,
    /// A guest write to a write-trapped page (KVM discarded it).
    Tamper {
        gpa: u64,
        data: [u8; 8],
        len: usize,
    },
    Stop(StopReason),
}

/// Dispatches one exit of vCPU `index`: device accesses go to `bus` (MMIO writes to an address
/// `guarded` says is write-trapped become [`ExitAction::Tamper`] instead), and the exit is
/// counted in `stats`.
pub fn dispatch(
    exit: VcpuExitView<'_>,
    bus: &Bus,
    guarded: impl Fn(u64) -> bool,
    stats: &mut VcpuStats,
    index: u8,
) -> ExitAction {
    match exit {
        VcpuExitView::IoOut { port, data } => {
            stats.pio_exits += 1;
            match bus.pio_write(port, data) {
                PioAction::Continue => ExitAction::PortWritten,
                PioAction::Stop(reason) => ExitAction::Stop(reason),
            }
        }
        VcpuExitView::IoIn { port, data } => {
            stats.pio_exits += 1;
            bus.pio_read(port, data);
            ExitAction::Handled
        }
        VcpuExitView::MmioRead { addr, data } => {
            stats.mmio_exits += 1;
            bus.mmio_read(addr, data);
            ExitAction::Handled
        }
        VcpuExitView::MmioWrite { addr, data } => {
            stats.mmio_exits += 1;
            if guarded(addr) {
                let len = data.len().min(8);
                let mut copy = [0u8; 8];
                copy[..len].copy_from_slice(&data[..len]);
                ExitAction::Tamper {
                    gpa: addr,
                    data: copy,
                    len,
                }
            } else {
                bus.mmio_write(addr, data);
                ExitAction::Handled
            }
        }
        VcpuExitView::Debug { pc, dr6, exception } => ExitAction::Debug { pc, dr6, exception },
        VcpuExitView::Hlt => ExitAction::Stop(StopReason::Halted),
        VcpuExitView::Shutdown => ExitAction::Stop(StopReason::Reset),
        VcpuExitView::SystemEvent(kind) => ExitAction::Stop(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::Poweroff,
            KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
            other => StopReason::Crashed(format!("guest system event {other}")),
        }),
        VcpuExitView::InternalError => ExitAction::InternalError,
        VcpuExitView::FailEntry { reason, cpu } => ExitAction::Stop(StopReason::Crashed(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExitView::Nothing => ExitAction::Handled,
        VcpuExitView::Unexpected(what) => ExitAction::Stop(StopReason::Crashed(format!(
            "unexpected KVM exit {what} on vCPU {index}"
        ))),
    }
}

/// What a debug exit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugExit {
    /// A #BP intercepted with `KVM_GUESTDBG_USE_SW_BP` (hardware hosts): a software hook of
    /// ours, or the guest's own int3.
    Breakpoint,
    /// The instruction under our breakpoint ran (end of a step-over): put the breakpoint back.
    SteppedOver,
    /// One of the introspection hooks.
    Hook(SocketOp),
    /// The guest's #PF handler (the syscall fix).
    PageFaultEntry,
    /// Not ours (a stale breakpoint after the guest changed its IDT): step past it.
    Stale,
}

/// Classifies a debug exit at `pc`. `stepping`: the vCPU is stepping over one of our
/// breakpoints; `hook`: the hook at `pc`, if any; `pf_handler`: where the syscall fix's
/// breakpoint sits.
pub fn classify_debug(
    pc: u64,
    dr6: u64,
    exception: u32,
    stepping: bool,
    hook: Option<SocketOp>,
    pf_handler: Option<u64>,
) -> DebugExit {
    if exception == u32::from(BP_VECTOR) {
        DebugExit::Breakpoint
    } else if stepping || (dr6 & DR6_BS != 0 && dr6 & DR6_B0 == 0) {
        DebugExit::SteppedOver
    } else if let Some(op) = hook {
        DebugExit::Hook(op)
    } else if Some(pc) == pf_handler {
        DebugExit::PageFaultEntry
    } else {
        DebugExit::Stale
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::bus::{ConsoleOutput, MmioSlot};
    use crate::devices::MmioDevice;

    const DEVICE_BASE: u64 = 0xd000_0000;
    const COM1_SCRATCH: u16 = 0x3f8 + 7;

    /// Records writes; reads return the offset's low byte.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl MmioDevice for Recorder {
        fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn mmio_write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn bus(exit_port: bool) -> (Bus, Arc<Mutex<Recorder>>) {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let console = ConsoleOutput::new("t", None, false, Instant::now(), &[]);
        let bus = Bus::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            console,
            vec![MmioSlot {
                base: DEVICE_BASE,
                size: 0x1000,
                device: device.clone(),
            }],
            exit_port,
        );
        (bus, device)
    }

    fn run(bus: &Bus, exit: VcpuExitView<'_>) -> ExitAction {
        dispatch(exit, bus, |_| false, &mut VcpuStats::default(), 0)
    }

    fn out(bus: &Bus, port: u16, value: u8) -> ExitAction {
        run(
            bus,
            VcpuExitView::IoOut {
                port,
                data: &[value],
            },
        )
    }

    #[test]
    fn serial_registers_are_reached_through_port_io() {
        let (bus, _) = bus(false);
        assert_eq!(out(&bus, COM1_SCRATCH, 0x5a), ExitAction::PortWritten);
        let mut data = [0u8; 1];
        let action = run(
            &bus,
            VcpuExitView::IoIn {
                port: COM1_SCRATCH,
                data: &mut data,
            },
        );
        assert_eq!(action, ExitAction::Handled);
        assert_eq!(data, [0x5a]);
    }

    #[test]
    fn unknown_ports_read_high_and_ignore_writes() {
        let (bus, _) = bus(false);
        let mut data = [0u8; 2];
        run(
            &bus,
            VcpuExitView::IoIn {
                port: 0x1234,
                data: &mut data,
            },
        );
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(out(&bus, 0x1234, 1), ExitAction::PortWritten);
        // An empty write (the guest chose the size) must not panic anywhere.
        for port in [0x3f8, vigil_wire::boot::EXIT_PORT, 0x64, 0x600] {
            let action = run(&bus, VcpuExitView::IoOut { port, data: &[] });
            assert_eq!(action, ExitAction::PortWritten, "port {port:#x}");
        }
    }

    #[test]
    fn exit_port_stops_only_a_micro_vm() {
        let (micro, _) = bus(true);
        assert_eq!(
            out(&micro, vigil_wire::boot::EXIT_PORT, 7),
            ExitAction::Stop(StopReason::ExitCode(7))
        );
        let (linux, _) = bus(false);
        assert_eq!(
            out(&linux, vigil_wire::boot::EXIT_PORT, 7),
            ExitAction::PortWritten
        );
    }

    #[test]
    fn reset_and_poweroff_ports() {
        let (bus, _) = bus(false);
        assert_eq!(out(&bus, 0x64, 0xfe), ExitAction::Stop(StopReason::Reset));
        assert_eq!(out(&bus, 0x64, 0xfd), ExitAction::PortWritten);
        assert_eq!(
            out(
                &bus,
                crate::acpi::SLEEP_CONTROL_PORT,
                crate::acpi::SLEEP_ENABLE
            ),
            ExitAction::Stop(StopReason::Poweroff)
        );
        assert_eq!(
            out(&bus, crate::acpi::SLEEP_CONTROL_PORT, 0),
            ExitAction::PortWritten
        );
    }

    #[test]
    fn mmio_reaches_the_device_at_its_offset() {
        let (bus, device) = bus(false);
        let mut data = [0u8; 4];
        let action = run(
            &bus,
            VcpuExitView::MmioRead {
                addr: DEVICE_BASE + 0x70,
                data: &mut data,
            },
        );
        assert_eq!(action, ExitAction::Handled);
        assert_eq!(data, [0x70; 4]);
        let action = run(
            &bus,
            VcpuExitView::MmioWrite {
                addr: DEVICE_BASE + 0x10,
                data: &[1, 2],
            },
        );
        assert_eq!(action, ExitAction::Handled);
        assert_eq!(device.lock().unwrap().writes, vec![(0x10, vec![1, 2])]);
        // Outside every window: reads are zero, writes go nowhere.
        let mut data = [9u8; 4];
        run(
            &bus,
            VcpuExitView::MmioRead {
                addr: DEVICE_BASE + 0x1000,
                data: &mut data,
            },
        );
        assert_eq!(data, [0; 4]);
        run(
            &bus,
            VcpuExitView::MmioWrite {
                addr: DEVICE_BASE - 1,
                data: &[1],
            },
        );
        assert_eq!(device.lock().unwrap().writes.len(), 1);
    }

    #[test]
    fn idle_port_of_a_micro_vm_is_not_a_device() {
        let (bus, device) = bus(true);
        let action = run(
            &bus,
            VcpuExitView::MmioWrite {
                addr: vigil_wire::boot::IDLE_MMIO_ADDR,
                data: &0u32.to_le_bytes(),
            },
        );
        assert_eq!(action, ExitAction::Handled);
        assert!(device.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn a_write_to_a_guarded_page_is_tamper_not_a_device_write() {
        let (bus, device) = bus(false);
        let guarded_addr = DEVICE_BASE + 0x20;
        let mut stats = VcpuStats::default();
        let action = dispatch(
            VcpuExitView::MmioWrite {
                addr: guarded_addr,
                data: &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            },
            &bus,
            |addr| addr == guarded_addr,
            &mut stats,
            0,
        );
        assert_eq!(
            action,
            ExitAction::Tamper {
                gpa: guarded_addr,
                data: [1, 2, 3, 4, 5, 6, 7, 8],
                len: 8
            }
        );
        assert!(device.lock().unwrap().writes.is_empty());
        assert_eq!(stats.mmio_exits, 1);
    }

    #[test]
    fn exits_are_counted_by_kind() {
        let (bus, _) = bus(false);
        let mut stats = VcpuStats::default();
        let mut data = [0u8; 1];
        for exit in [
            VcpuExitView::IoOut {
                port: 0x80,
                data: &[0],
            },
            VcpuExitView::IoIn {
                port: 0x80,
                data: &mut data,
            },
        ] {
            dispatch(exit, &bus, |_| false, &mut stats, 0);
        }
        dispatch(
            VcpuExitView::MmioWrite {
                addr: 0,
                data: &[0],
            },
            &bus,
            |_| false,
            &mut stats,
            0,
        );
        dispatch(VcpuExitView::Hlt, &bus, |_| false, &mut stats, 0);
        assert_eq!((stats.pio_exits, stats.mmio_exits), (2, 1));
    }

    #[test]
    fn stops_and_crashes() {
        let (bus, _) = bus(false);
        assert_eq!(
            run(&bus, VcpuExitView::Hlt),
            ExitAction::Stop(StopReason::Halted)
        );
        assert_eq!(
            run(&bus, VcpuExitView::Shutdown),
            ExitAction::Stop(StopReason::Reset)
        );
        assert_eq!(
            run(&bus, VcpuExitView::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN)),
            ExitAction::Stop(StopReason::Poweroff)
        );
        assert_eq!(
            run(&bus, VcpuExitView::SystemEvent(KVM_SYSTEM_EVENT_RESET)),
            ExitAction::Stop(StopReason::Reset)
        );
        assert_eq!(
            run(&bus, VcpuExitView::SystemEvent(99)),
            ExitAction::Stop(StopReason::Crashed("guest system event 99".into()))
        );
        assert_eq!(
            run(
                &bus,
                VcpuExitView::FailEntry {
                    reason: 0x21,
                    cpu: 1
                }
            ),
            ExitAction::Stop(StopReason::Crashed(
                "KVM could not enter the guest (hardware reason 0x21, cpu 1)".into()
            ))
        );
        assert_eq!(
            dispatch(
                VcpuExitView::Unexpected("Hypercall".into()),
                &bus,
                |_| false,
                &mut VcpuStats::default(),
                3
            ),
            ExitAction::Stop(StopReason::Crashed(
                "unexpected KVM exit Hypercall on vCPU 3".into()
            ))
        );
        assert_eq!(run(&bus, VcpuExitView::Nothing), ExitAction::Handled);
        assert_eq!(
            run(&bus, VcpuExitView::InternalError),
            ExitAction::InternalError
        );
        assert_eq!(
            run(
                &bus,
                VcpuExitView::Debug {
                    pc: 1,
                    dr6: 2,
                    exception: 1
                }
            ),
            ExitAction::Debug {
                pc: 1,
                dr6: 2,
                exception: 1
            }
        );
    }

    #[test]
    fn debug_exits_are_classified() {
        let pf = Some(0xffff_8000_0000_1000);
        let hook = Some(SocketOp::Connect);
        // #BP first, whatever else holds.
        assert_eq!(
            classify_debug(5, DR6_BS, 3, true, hook, pf),
            DebugExit::Breakpoint
        );
        // The end of a step-over: stepping, or a single step that is not breakpoint 0.
        assert_eq!(
            classify_debug(5, 0, 1, true, hook, pf),
            DebugExit::SteppedOver
        );
        assert_eq!(
            classify_debug(5, DR6_BS, 1, false, hook, pf),
            DebugExit::SteppedOver
        );
        assert_eq!(
            classify_debug(5, DR6_BS | DR6_B0, 1, false, hook, pf),
            DebugExit::Hook(SocketOp::Connect)
        );
        assert_eq!(
            classify_debug(0xffff_8000_0000_1000, DR6_B0, 1, false, None, pf),
            DebugExit::PageFaultEntry
        );
        assert_eq!(
            classify_debug(5, DR6_B0, 1, false, None, pf),
            DebugExit::Stale
        );
        assert_eq!(
            classify_debug(5, DR6_B0, 1, false, None, None),
            DebugExit::Stale
        );
    }
}
