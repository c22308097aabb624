//! The device bus of one VM: the serial console on COM1, the firmware-less exit and idle ports of
//! the micro-VM, the ACPI sleep and i8042 reset ports, and the MMIO windows of its virtio devices.
//!
//! Owns: routing one port I/O or MMIO access to the device behind it, and what such an access
//! decides (go on, or stop the VM with a reason); the console's output (log file, stdout lines,
//! boot-marker timing); saving and restoring the state of the devices on the bus.
//! Must not: issue KVM ioctls or know about vCPUs (the vCPU loop calls in here, never the
//! reverse), or trust the guest's access sizes, offsets or values.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::MmioDevice;
use crate::vcpu::StopReason;

/// COM1 I/O ports.
const COM1_BASE: u16 = 0x3f8;
const COM1_LEN: u16 = 8;
/// i8042 command port; writing 0xfe pulses the CPU reset line (how Linux's `reboot=k` resets).
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_COMMAND: u8 = 0xfe;

/// Result of a port write, for the vCPU loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PioAction {
    Continue,
    Stop(StopReason),
}

/// Raises the serial interrupt through an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Most bytes a console log holds: past it the log starts again (the guest writes its console
/// without end if it likes, and the host's disk is shared by every VM). The newest output is
/// what a crash's diagnosis reads, so it is the older that goes.
pub const CONSOLE_LOG_MAX: u64 = 16 << 20;

/// The serial console's output: a per-VM log file and, optionally, stdout line by line.
pub struct ConsoleOutput {
    prefix: String,
    log: Option<File>,
    /// Bytes in the log since it (re)started, and how often it restarted.
    log_bytes: u64,
    log_restarts: u64,
    stdout: bool,
    line: Vec<u8>,
    created: Instant,
    markers: Vec<(String, Option<u64>)>,
}

impl ConsoleOutput {
    /// Console output of the VM `name`: `log` gets every byte; with `stdout`, whole lines are
    /// copied to stdout prefixed with `[name] `; each marker's first appearance is timed from
    /// `created`.
    pub fn new(
        name: &str,
        log: Option<File>,
        stdout: bool,
        created: Instant,
        markers: &[String],
    ) -> Self {
        ConsoleOutput {
            prefix: format!("[{name}] "),
            log,
            log_bytes: 0,
            log_restarts: 0,
            stdout,
            line: Vec::new(),
            created,
            markers: markers.iter().map(|m| (m.clone(), None)).collect(),
        }
    }

    /// Each marker seen so far, with when (ms since the VM was created).
    pub fn markers_seen(&self) -> impl Iterator<Item = (&str, u64)> {
        self.markers
            .iter()
            .filter_map(|(marker, seen)| seen.map(|ms| (marker.as_str(), ms)))
    }

    fn end_of_line(&mut self) {
        if self.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(self.prefix.as_bytes());
            let _ = out.write_all(&self.line);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
        if self.markers.iter().any(|(_, seen)| seen.is_none()) {
            let text = String::from_utf8_lossy(&self.line);
            let now = self.created.elapsed().as_millis() as u64;
            for (marker, seen) in self.markers.iter_mut() {
                if seen.is_none() && text.contains(marker.as_str()) {
                    *seen = Some(now);
                }
            }
        }
        self.line.clear();
    }
}

impl ConsoleOutput {
    /// Appends `buf` to the log, first emptying it when `buf` would take it past
    /// [`CONSOLE_LOG_MAX`] (the restart is said in the log itself).
    fn log_bytes(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        if self.log_bytes + buf.len() as u64 > CONSOLE_LOG_MAX {
            use std::io::Seek;
            log.set_len(0)?;
            log.rewind()?;
            self.log_restarts += 1;
            let note = format!(
                "[vigil: this console log restarted ({} times): the guest wrote more than {} \
                 bytes; older output was dropped]\n",
                self.log_restarts, CONSOLE_LOG_MAX
            );
            log.write_all(note.as_bytes())?;
            self.log_bytes = note.len() as u64;
        }
        log.write_all(buf)?;
        self.log_bytes += buf.len() as u64;
        Ok(())
    }

    /// Times the log restarted because the guest filled it.
    pub fn log_restarts(&self) -> u64 {
        self.log_restarts
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.log_bytes(buf)?;
        if self.stdout || !self.markers.is_empty() {
            for &byte in buf {
                if byte == b'\n' {
                    self.end_of_line();
                } else if byte != b'\r' && self.line.len() < 4096 {
                    self.line.push(byte);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(log) = self.log.as_mut() {
            log.flush()?;
        }
        Ok(())
    }
}

/// One device window on the bus.
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub device: Arc<Mutex<dyn MmioDevice>>,
}

/// Why the devices' saved state could not be loaded.
#[derive(Debug, Error)]
pub enum BusError {
    #[error("the snapshot has {saved} devices, this VM {present}")]
    DeviceCount { saved: usize, present: usize },
    #[error("device {index}: {source}")]
    DeviceRestore {
        index: usize,
        source: crate::devices::DeviceRestoreError,
    },
}

/// Routes port I/O and MMIO exits to devices. Shared by the VM's vCPUs.
pub struct Bus {
    serial: Mutex<Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOutput>>,
    mmio: Vec<MmioSlot>,
    /// Whether the exit port ends the VM (micro-VMs only; a Linux tenant has no business there).
    exit_port: bool,
    /// A micro-VM's verdict region: its idle exit rests there, woken by a producer's records.
    idle: std::sync::OnceLock<std::sync::Arc<crate::verdict_region::VerdictRegion>>,
    /// A micro-VM's RAM, where its console writes by address are read (set once).
    console_memory: std::sync::OnceLock<crate::GuestMemoryMmap>,
}

impl Bus {
    /// A bus with the console on COM1 (its interrupt raised through `serial_irq`) and the
    /// given device windows. `exit_port`: the micro-VM's exit and idle ports are live.
    pub fn new(
        serial_irq: EventFd,
        console: ConsoleOutput,
        mmio: Vec<MmioSlot>,
        exit_port: bool,
    ) -> Self {
        Bus {
            serial: Mutex::new(Serial::new(EventFdTrigger(serial_irq), console)),
            mmio,
            exit_port,
            idle: std::sync::OnceLock::new(),
            console_memory: std::sync::OnceLock::new(),
        }
    }

    /// The micro-VM's verdict region, whose producers wake its idle exit (set once).
    pub fn set_idle_doorbell(&self, region: std::sync::Arc<crate::verdict_region::VerdictRegion>) {
        let _ = self.idle.set(region);
    }

    /// Takes the micro-VM's console writes by address (`vigil_wire::boot::CONSOLE_MMIO_ADDR`)
    /// from `memory` (set once).
    pub fn set_console_memory(&self, memory: crate::GuestMemoryMmap) {
        let _ = self.console_memory.set(memory);
    }

    /// A console write by address: up to `CONSOLE_MAX` bytes of guest RAM go to the console
    /// as if written to the UART one by one. A value that names no bytes, or bytes outside RAM,
    /// writes nothing (the guest is not trusted; its console is only a log).
    fn console_write(&self, data: &[u8]) {
        use vm_memory::{Bytes, GuestAddress};
        let (Some(memory), Ok(value)) = (self.console_memory.get(), <[u8; 8]>::try_from(data))
        else {
            return;
        };
        let Some((addr, len)) = vigil_wire::boot::parse_console_write(u64::from_le_bytes(value))
        else {
            return;
        };
        let mut bytes = [0u8; vigil_wire::boot::CONSOLE_MAX];
        if memory
            .read_slice(&mut bytes[..len], GuestAddress(addr))
            .is_err()
        {
            return;
        }
        if let Ok(mut serial) = self.serial.lock() {
            // A console write error (full disk) must not stop the guest.
            let _ = serial.writer_mut().write_all(&bytes[..len]);
        }
    }

    /// Adds a device window (before the VM runs).
    pub fn add_mmio(&mut self, slot: MmioSlot) {
        self.mmio.push(slot);
    }

    /// Flushes the console and returns each marker's first appearance.
    pub fn console_markers(&self) -> Vec<(String, u64)> {
        match self.serial.lock() {
            Ok(mut serial) => {
                let console = serial.writer_mut();
                let _ = console.flush();
                console
                    .markers_seen()
                    .map(|(marker, ms)| (marker.to_string(), ms))
                    .collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Quiesces every MMIO device and returns their states (in bus order).
    pub(crate) fn save_devices(&self) -> Vec<crate::snapshot::TransportSnapshot> {
        self.mmio
            .iter()
            .filter_map(|slot| slot.device.lock().unwrap_or_else(|p| p.into_inner()).save())
            .collect()
    }

    pub(crate) fn resume_devices(&self) {
        for slot in &self.mmio {
            slot.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .resume_after_save();
        }
    }

    pub(crate) fn restore_devices(
        &self,
        states: &[crate::snapshot::TransportSnapshot],
    ) -> Result<(), BusError> {
        if states.len() != self.mmio.len() {
            return Err(BusError::DeviceCount {
                saved: states.len(),
                present: self.mmio.len(),
            });
        }
        for (index, (slot, state)) in self.mmio.iter().zip(states).enumerate() {
            slot.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(state)
                .map_err(|source| BusError::DeviceRestore { index, source })?;
        }
        Ok(())
    }

    pub(crate) fn save_serial(&self) -> crate::snapshot::SerialRegs {
        let state = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state();
        crate::snapshot::SerialRegs {
            divisor_low: state.baud_divisor_low,
            divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            line_control: state.line_control,
            modem_control: state.modem_control,
            scratch: state.scratch,
        }
    }

    /// Programs the serial port as the guest had it, through its registers (16550 offsets: 0
    /// DLL, 1 DLM/IER, 3 LCR with DLAB = bit 7, 4 MCR, 7 SCR). Enabling the transmit interrupt
    /// raises it, which restarts a guest that waited for it.
    pub(crate) fn restore_serial(&self, regs: &crate::snapshot::SerialRegs) {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let _ = serial.write(3, 0x80);
        let _ = serial.write(0, regs.divisor_low);
        let _ = serial.write(1, regs.divisor_high);
        let _ = serial.write(3, regs.line_control & 0x7f);
        let _ = serial.write(4, regs.modem_control);
        let _ = serial.write(7, regs.scratch);
        let _ = serial.write(1, regs.interrupt_enable);
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) => {
                if let Ok(mut serial) = self.serial.lock() {
                    // A `rep outsb` arrives as one exit with every byte: each is a write to the
                    // register, in order. A console write error (full disk) must not stop the
                    // guest.
                    for &value in data {
                        let _ = serial.write((p - COM1_BASE) as u8, value);
                    }
                }
                PioAction::Continue
            }
            vigil_wire::boot::EXIT_PORT if self.exit_port => {
                PioAction::Stop(StopReason::ExitCode(data.first().copied().unwrap_or(0)))
            }
            crate::acpi::SLEEP_CONTROL_PORT
                if data
                    .first()
                    .is_some_and(|v| v & crate::acpi::SLEEP_ENABLE != 0) =>
            {
                PioAction::Stop(StopReason::Poweroff)
            }
            I8042_COMMAND_PORT if data.first() == Some(&I8042_RESET_COMMAND) => {
                PioAction::Stop(StopReason::Reset)
            }
            _ => PioAction::Continue,
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
            if let Ok(mut serial) = self.serial.lock() {
                let value = serial.read((port - COM1_BASE) as u8);
                data.iter_mut().for_each(|b| *b = value);
                return;
            }
        }
        // Nothing there: the bus floats high, as on real hardware.
        data.iter_mut().for_each(|b| *b = 0xff);
    }

    fn mmio_slot(&self, addr: u64) -> Option<&MmioSlot> {
        self.mmio
            .iter()
            .find(|slot| addr >= slot.base && addr - slot.base < slot.size)
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.mmio_slot(addr) {
            Some(slot) => match slot.device.lock() {
                Ok(mut device) => device.mmio_read(addr - slot.base, data),
                Err(_) => data.fill(0),
            },
            None => data.fill(0),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.exit_port && addr == vigil_wire::boot::IDLE_MMIO_ADDR {
            // The micro-VM has nothing to do: keep its vCPU off the CPU for a bounded while.
            let mut value = [0u8; 4];
            let n = data.len().min(4);
            value[..n].copy_from_slice(&data[..n]);
            let us = u32::from_le_bytes(value).min(vigil_wire::boot::IDLE_MAX_US);
            match self.idle.get() {
                Some(region) => region.idle_wait(u64::from(us)),
                None => std::thread::sleep(Duration::from_micros(u64::from(us))),
            }
            return;
        }
        if self.exit_port && addr == vigil_wire::boot::CONSOLE_MMIO_ADDR {
            self.console_write(data);
            return;
        }
        if let Some(slot) = self.mmio_slot(addr) {
            if let Ok(mut device) = slot.device.lock() {
                device.mmio_write(addr - slot.base, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_logs_every_byte_and_times_markers_on_whole_lines() {
        let path = std::env::temp_dir().join(format!("vigil-bus-test-{}.log", std::process::id()));
        let log = File::create(&path).unwrap();
        let mut console = ConsoleOutput::new(
            "t",
            Some(log),
            false,
            Instant::now(),
            &["ready".to_string(), "never".to_string()],
        );
        console.write_all(b"boot\r\nrea").unwrap();
        assert_eq!(
            console.markers_seen().count(),
            0,
            "half a line is not a line"
        );
        console.write_all(b"dy now\n").unwrap();
        console.flush().unwrap();
        let seen: Vec<&str> = console.markers_seen().map(|(m, _)| m).collect();
        assert_eq!(seen, ["ready"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"boot\r\nready now\n");
        let _ = std::fs::remove_file(&path);
    }

    /// A bus with no devices whose console logs to `path` and times `marker`.
    fn bus_logging_to(path: &std::path::Path, marker: &str, exit_port: bool) -> Bus {
        Bus::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::new(
                "t",
                Some(File::create(path).unwrap()),
                false,
                Instant::now(),
                &[marker.to_string()],
            ),
            Vec::new(),
            exit_port,
        )
    }

    #[test]
    fn a_console_log_the_guest_overfills_restarts_with_its_newest_bytes() {
        let path = std::env::temp_dir().join(format!("vigil-con-cap-{}.log", std::process::id()));
        let mut out = ConsoleOutput::new(
            "t",
            Some(File::create(&path).unwrap()),
            false,
            Instant::now(),
            &[],
        );
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..CONSOLE_LOG_MAX / chunk.len() as u64 {
            out.write_all(&chunk).unwrap();
        }
        assert_eq!(out.log_restarts(), 0, "exactly full is not over");
        out.write_all(b"the newest line\n").unwrap();
        assert_eq!(out.log_restarts(), 1);
        let log = std::fs::read(&path).unwrap();
        assert!(
            log.len() < 4096,
            "the older output was dropped: {} bytes",
            log.len()
        );
        let text = String::from_utf8_lossy(&log);
        assert!(
            text.starts_with("[vigil: this console log restarted (1 times)"),
            "{text}"
        );
        assert!(text.ends_with("]\nthe newest line\n"), "{text}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_string_write_to_the_console_is_every_byte_in_order() {
        // `rep outsb` to COM1's data register: one exit carrying the whole string.
        let path = std::env::temp_dir().join(format!("vigil-outs-test-{}.log", std::process::id()));
        let bus = bus_logging_to(&path, "up: 2", false);
        bus.pio_write(COM1_BASE, b"switch up");
        bus.pio_write(COM1_BASE, b": 2 ports\r\n");
        let seen: Vec<String> = bus.console_markers().into_iter().map(|(m, _)| m).collect();
        assert_eq!(seen, ["up: 2"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"switch up: 2 ports\r\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_console_write_by_address_is_its_bytes_and_a_bad_one_writes_nothing() {
        use vigil_wire::boot::{console_write, CONSOLE_MAX, CONSOLE_MMIO_ADDR};
        use vm_memory::{Bytes, GuestAddress};
        let path = std::env::temp_dir().join(format!("vigil-mmio-con-{}.log", std::process::id()));
        let bus = bus_logging_to(&path, "switch up", true);
        // Before the VMM hands over the micro-VM's RAM, nothing is read.
        bus.mmio_write(CONSOLE_MMIO_ADDR, &console_write(0x1000, 4).to_le_bytes());
        let memory = crate::anonymous_memory(1 << 20, false).unwrap();
        bus.set_console_memory(memory.clone());
        memory
            .write_slice(b"fw-guest: switch up\r\n", GuestAddress(0x1000))
            .unwrap();
        bus.mmio_write(CONSOLE_MMIO_ADDR, &console_write(0x1000, 21).to_le_bytes());
        // Hostile values: past RAM, straddling its end, no bytes, too many, the wrong width.
        for value in [
            console_write(1 << 20, 8),
            console_write((1 << 20) - 4, 8),
            console_write(0x1000, 0),
            console_write(0x1000, CONSOLE_MAX as u32 + 1),
        ] {
            bus.mmio_write(CONSOLE_MMIO_ADDR, &value.to_le_bytes());
        }
        bus.mmio_write(CONSOLE_MMIO_ADDR, &0x1000u32.to_le_bytes());
        let seen: Vec<String> = bus.console_markers().into_iter().map(|(m, _)| m).collect();
        assert_eq!(seen, ["switch up"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"fw-guest: switch up\r\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn device_states_must_match_the_bus() {
        let bus = Bus::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::new("t", None, false, Instant::now(), &[]),
            Vec::new(),
            false,
        );
        let state = crate::snapshot::TransportSnapshot::default();
        let e = bus.restore_devices(&[state]).unwrap_err();
        assert_eq!(e.to_string(), "the snapshot has 1 devices, this VM 0");
        assert!(bus.save_devices().is_empty());
        assert!(bus.restore_devices(&[]).is_ok());
    }

    #[test]
    fn serial_registers_survive_save_and_restore() {
        let new_bus = || {
            Bus::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                ConsoleOutput::new("t", None, false, Instant::now(), &[]),
                Vec::new(),
                false,
            )
        };
        let a = new_bus();
        a.pio_write(COM1_BASE + 3, &[0x80]);
        a.pio_write(COM1_BASE, &[0x0c]);
        a.pio_write(COM1_BASE + 3, &[0x03]);
        a.pio_write(COM1_BASE + 7, &[0x42]);
        let saved = a.save_serial();
        assert_eq!(
            (saved.divisor_low, saved.line_control, saved.scratch),
            (0x0c, 0x03, 0x42)
        );
        let b = new_bus();
        b.restore_serial(&saved);
        let again = b.save_serial();
        assert_eq!(
            (again.divisor_low, again.line_control, again.scratch),
            (0x0c, 0x03, 0x42)
        );
    }
}
