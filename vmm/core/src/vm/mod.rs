//! A VM: guest memory, the in-kernel interrupt controllers, the device bus, vCPU threads, and the
//! boot of its payload (a Linux kernel or the fw-guest micro-VM).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_regs, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::Serialize;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootModule};
use crate::devices::tap::Tap;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{FrameLink, Net};
use crate::devices::vxlan::Vxlan;
use crate::devices::{MmioDevice, MmioDeviceInfo};
use crate::host_kind::HostKind;
use crate::layout::*;
use crate::net_config::NetBackend;
use crate::run_control::RunControl;
use crate::vcpu::{StopReason, Vcpu, VcpuStats};
use crate::verdict_region::{FirewallCounters, VerdictRegion};
use crate::write_trap::{RamSlot, WriteTraps};

/// COM1 I/O ports.
const COM1_BASE: u16 = 0x3f8;
const COM1_LEN: u16 = 8;
/// i8042 command port; writing 0xfe pulses the CPU reset line (how Linux's `reboot=k` resets).
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_COMMAND: u8 = 0xfe;
/// Where KVM's TSS and identity-map pages go (below the 4 GiB boundary, inside the MMIO hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm ({0}); is KVM available and do you have permission (root or group kvm)?")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM refused {what}: {source}")]
    KvmIoctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the VM needs between {min} and {max} MiB of memory, {0} MiB was asked for", min = MIN_RAM >> 20, max = MAX_RAM >> 20)]
    BadMemorySize(u64),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    KernelImage { path: PathBuf, message: String },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot allocate guest memory: {0}")]
    Memory(String),
    #[error("cannot open the console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Device(String),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmIoctl { what, source }
}

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum Payload {
    /// A Linux kernel (bzImage or ELF vmlinux) with an optional initramfs. The host profile's
    /// command line is appended to `cmdline`.
    Linux {
        kernel: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: String,
    },
    /// The fw-guest micro-VM ELF in a role.
    MicroVm {
        elf: PathBuf,
        role: vigil_wire::boot::Role,
        /// Verdict records in the ring before the micro-VM starts.
        verdicts: Vec<[u8; vigil_wire::verdict::RECORD_LEN]>,
    },
}

/// Where the serial console goes.
#[derive(Clone, Debug, Default)]
pub struct ConsoleConfig {
    /// Per-VM log file (every byte the guest writes).
    pub log: Option<PathBuf>,
    /// Also copy whole lines to stdout, prefixed with the VM's name.
    pub stdout: bool,
    /// Console strings whose first appearance is timed (ms since the VM was created) and
    /// reported in the outcome: boot milestones for benchmarks.
    pub markers: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub payload: Payload,
    pub console: ConsoleConfig,
    /// Network interfaces (virtio-net over virtio-mmio), in guest order eth0, eth1, ...
    pub nets: Vec<crate::net_config::NetConfig>,
    /// The tenant's application policy (JSON, see `trap_handler::policy`). With one, the guest
    /// kernel's socket hooks are trapped and every connect/bind/listen is decided by it.
    pub policy: Option<PathBuf>,
    /// Network interfaces backed by an in-process link instead of a TAP (a tenant's NIC and
    /// the switch port it is plugged into), after `nets` in guest order.
    pub links: Vec<LinkConfig>,
}

/// One end of a `socketpair(AF_UNIX, SOCK_DGRAM)` carrying Ethernet frames between two VMs of
/// this VMM: a tenant's virtio-net and its port on the switch-tier micro-VM.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub link: Arc<std::os::unix::net::UnixDatagram>,
    pub mac: [u8; 6],
    /// For a switch port: the tenant behind it.
    pub tenant: u32,
}

impl LinkConfig {
    /// A connected pair: (the tenant's end, the switch port's end).
    pub fn pair(tenant: u32, mac: [u8; 6]) -> std::io::Result<(LinkConfig, LinkConfig)> {
        let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        // Room for bursts: a full queue of frames in flight either way.
        for end in [&a, &b] {
            let size: libc::c_int = 4 << 20;
            // SAFETY: setsockopt with a valid fd and an int option value.
            unsafe {
                libc::setsockopt(
                    end.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        Ok((
            LinkConfig {
                link: Arc::new(a),
                mac,
                tenant,
            },
            LinkConfig {
                link: Arc::new(b),
                mac,
                tenant,
            },
        ))
    }
}

/// How a VM run ended, with what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct VmOutcome {
    pub name: String,
    pub stop: StopReason,
    pub host: String,
    /// From the start of `Vm::create` to the stop.
    pub wall_ms: u64,
    /// First appearance of each console marker, ms since the start of `Vm::create`.
    pub markers: BTreeMap<String, u64>,
    /// Resident memory of the whole VMM process when the VM stopped (guest pages it touched
    /// included), KiB.
    pub vmm_rss_kib: u64,
    pub stats: VcpuStats,
    /// What a firewall micro-VM published in its counters block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewall: Option<FirewallCounters>,
}

/// Result of a port write, for the vCPU loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PioAction {
    Continue,
    Stop(StopReason),
}

/// Raises the serial interrupt through an irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial console's output: a per-VM log file and, optionally, stdout line by line.
pub struct ConsoleOutput {
    prefix: String,
    log: Option<File>,
    stdout: bool,
    line: Vec<u8>,
    created: Instant,
    markers: Vec<(String, Option<u64>)>,
}

impl ConsoleOutput {
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

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(log) = self.log.as_mut() {
            log.write_all(buf)?;
        }
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

struct MmioSlot {
    base: u64,
    size: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// Routes port I/O and MMIO exits to devices. Shared by the VM's vCPUs.
pub struct Bus {
    serial: Mutex<Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOutput>>,
    mmio: Vec<MmioSlot>,
    /// Whether the exit port ends the VM (micro-VMs only; a Linux tenant has no business there).
    exit_port: bool,
}

impl Bus {
    /// Quiesces every MMIO device and returns their states (in bus order).
    fn save_devices(&self) -> Vec<crate::snapshot::TransportSnapshot> {
        self.mmio
            .iter()
            .filter_map(|slot| slot.device.lock().unwrap_or_else(|p| p.into_inner()).save())
            .collect()
    }

    fn resume_devices(&self) {
        for slot in &self.mmio {
            slot.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .resume_after_save();
        }
    }

    fn restore_devices(&self, states: &[crate::snapshot::TransportSnapshot]) -> Result<(), String> {
        if states.len() != self.mmio.len() {
            return Err(format!(
                "the snapshot has {} devices, this VM {}",
                states.len(),
                self.mmio.len()
            ));
        }
        for (index, (slot, state)) in self.mmio.iter().zip(states).enumerate() {
            slot.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(state)
                .map_err(|e| format!("device {index}: {e}"))?;
        }
        Ok(())
    }

    fn save_serial(&self) -> crate::snapshot::SerialRegs {
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
    fn restore_serial(&self, regs: &crate::snapshot::SerialRegs) {
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
                if let (Some(&value), Ok(mut serial)) = (data.first(), self.serial.lock()) {
                    // A console write error (full disk) must not stop the guest.
                    let _ = serial.write((p - COM1_BASE) as u8, value);
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
            std::thread::sleep(Duration::from_micros(u64::from(us)));
            return;
        }
        if let Some(slot) = self.mmio_slot(addr) {
            if let Ok(mut device) = slot.device.lock() {
                device.mmio_write(addr - slot.base, data);
            }
        }
    }
}

/// A VM ready to run.
/// Pause, capture and resume a VM that runs on another thread.
#[derive(Clone)]
pub struct VmHandle {
    fd: Arc<VmFd>,
    bus: Arc<Bus>,
    memory: GuestMemoryMmap,
    control: Arc<RunControl>,
}

impl VmHandle {
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn control(&self) -> &Arc<RunControl> {
        &self.control
    }

    /// Pauses the VM and captures everything but RAM; devices stop touching RAM, so RAM can be
    /// copied next. The VM stays paused: `resume_after_capture` lets it go on (a snapshot), or
    /// the caller stops it (a migration's source).
    pub fn capture(&self, limit: Duration) -> Result<crate::snapshot::VmSnapshot, String> {
        let vcpus = self.control.pause_and_capture(limit)?;
        let transports = self.bus.save_devices();
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(|e| format!("KVM_GET_IRQCHIP {chip_id}: {e}"))?;
            irqchips.push(chip);
        }
        Ok(crate::snapshot::VmSnapshot {
            mem_bytes: self.memory.iter().map(|r| r.len()).sum(),
            vcpus,
            irqchips,
            pit: self.fd.get_pit2().ok(),
            clock: self.fd.get_clock().ok(),
            serial: self.bus.save_serial(),
            transports,
        })
    }

    /// Lets a captured VM run on (its devices restart where they stood).
    pub fn resume_after_capture(&self) {
        self.bus.resume_devices();
        self.control.resume();
    }

    /// Restarts the devices of a captured VM but leaves its vCPUs parked.
    pub fn resume_devices(&self) {
        self.bus.resume_devices();
    }
}

pub struct Vm {
    name: String,
    host: HostKind,
    // Kept alive for the VM's lifetime: dropping these closes the VM.
    _kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    bus: Arc<Bus>,
    vcpus: Vec<Vcpu>,
    created: Instant,
    introspection: Option<Arc<crate::introspect::Introspection>>,
    /// The micro-VM's verdict ring and counters.
    verdict_region: Option<Arc<VerdictRegion>>,
    /// Set to stop the VM from outside (another VM's thread, the API).
    stop: Arc<AtomicBool>,
    /// Pauses and resumes the vCPUs from outside (the API).
    control: Arc<RunControl>,
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, VmError> {
    fs::read(path).map_err(|source| VmError::ReadFile {
        path: path.clone(),
        source,
    })
}

impl Vm {
    /// Builds a VM: memory, irqchip, devices, payload loaded, vCPUs at the PVH entry.
    pub fn create(config: &VmConfig, host: HostKind) -> Result<Vm, VmError> {
        let created = Instant::now();
        let mem_size = config.mem_mib.saturating_mul(1 << 20);
        if !(MIN_RAM..=MAX_RAM).contains(&mem_size) {
            return Err(VmError::BadMemorySize(config.mem_mib));
        }
        if config.vcpus == 0 {
            return Err(VmError::Device("a VM needs at least one vCPU".into()));
        }
        // Read every input before touching KVM, so bad input fails fast and clearly.
        let (elf, initramfs, mut cmdline, exit_port) = match &config.payload {
            Payload::Linux {
                kernel,
                initramfs,
                cmdline,
            } => {
                let image = read_file(kernel)?;
                let elf = boot::kernel_elf(&image).map_err(|e| VmError::KernelImage {
                    path: kernel.clone(),
                    message: e.to_string(),
                })?;
                let initramfs = initramfs.as_ref().map(read_file).transpose()?;
                let profile = host.linux_cmdline();
                let cmdline = if profile.is_empty() {
                    cmdline.clone()
                } else {
                    format!("{cmdline} {profile}")
                };
                (elf, initramfs, cmdline, false)
            }
            Payload::MicroVm { elf, role, .. } => {
                (read_file(elf)?, None, format!("role={}", role.name()), true)
            }
        };

        let introspection = match (&config.policy, &config.payload) {
            (Some(path), Payload::Linux { .. }) => {
                let text = fs::read_to_string(path).map_err(|source| VmError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
                let policy: trap_handler::policy::PolicySpec = serde_json::from_str(&text)
                    .map_err(|e| VmError::Device(format!("policy {}: {e}", path.display())))?;
                let profile = kernel_profile(&elf)?;
                Some(Arc::new(
                    crate::introspect::Introspection::new(&config.name, profile, policy)
                        .map_err(VmError::Device)?,
                ))
            }
            (Some(_), Payload::MicroVm { .. }) => {
                return Err(VmError::Device(
                    "a policy applies to Linux tenants only".into(),
                ))
            }
            (None, _) => None,
        };
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(ioctl("KVM_CREATE_PIT2"))?;

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .map_err(|e| VmError::Memory(e.to_string()))?;
        for (slot, region) in memory.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: memory
                    .get_host_address(region.start_addr())
                    .map_err(|e| VmError::Memory(e.to_string()))?
                    as u64,
                flags: 0,
            };
            // SAFETY: the region is mapped for the lifetime of `memory`, which the Vm owns and
            // which outlives the VM file descriptor's use of it.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // Console on COM1, interrupt through an irqfd on GSI 4.
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Device(e.to_string()))?;
        fd.register_irqfd(&serial_irq, SERIAL_GSI)
            .map_err(ioctl("KVM_IRQFD (serial)"))?;
        let log = match &config.console.log {
            Some(path) => Some(File::create(path).map_err(|source| VmError::ConsoleLog {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let console = ConsoleOutput {
            prefix: format!("[{}] ", config.name),
            log,
            stdout: config.console.stdout,
            line: Vec::new(),
            created,
            markers: config
                .console
                .markers
                .iter()
                .map(|m| (m.clone(), None))
                .collect(),
        };
        // Network interfaces: virtio-net over virtio-mmio, one window and one GSI each, backed by
        // a TAP device (opened in the named network namespace when one is given).
        if config.nets.len() + config.links.len() > VIRTIO_MAX_DEVICES as usize {
            return Err(VmError::Device(format!(
                "{} network interfaces asked for; at most {VIRTIO_MAX_DEVICES}",
                config.nets.len() + config.links.len()
            )));
        }
        let mut mmio = Vec::new();
        let mut mmio_infos = Vec::new();
        // TAP-backed interfaces first, then in-process links; each with its port's tenant.
        let mut backends: Vec<(Box<dyn FrameLink>, [u8; 6], u32)> = Vec::new();
        for (index, net) in config.nets.iter().enumerate() {
            let what = |e: &dyn std::fmt::Display| {
                VmError::Device(format!("network interface {index} ({}): {e}", net.backend))
            };
            let link: Box<dyn FrameLink> = match &net.backend {
                NetBackend::Tap { name, netns } => {
                    Box::new(Tap::open(name, netns.as_deref()).map_err(|e| what(&e))?)
                }
                NetBackend::Vxlan { local, peer, vni } => Box::new(
                    Vxlan::bind(*local, peer.iter().copied().collect(), *vni)
                        .map_err(|e| what(&e))?,
                ),
            };
            backends.push((link, net.mac, net.tenant));
        }
        for (index, link) in config.links.iter().enumerate() {
            let end = link.link.try_clone().map_err(|e| {
                VmError::Device(format!("link {index}: cannot duplicate its socket: {e}"))
            })?;
            backends.push((Box::new(end), link.mac, link.tenant));
        }
        let mut port_tenants = Vec::new();
        for (index, (backend, mac, tenant)) in backends.into_iter().enumerate() {
            let (base, size) = virtio_mmio_window(index as u32);
            let info = MmioDeviceInfo {
                base,
                size,
                gsi: VIRTIO_FIRST_GSI + index as u32,
            };
            let transport = MmioTransport::new(memory.clone(), Box::new(Net::new(backend, mac)))
                .map_err(|e| VmError::Device(format!("network interface {index}: {e}")))?;
            transport
                .register_with_kvm(&fd, &info)
                .map_err(|e| VmError::Device(format!("network interface {index}: {e}")))?;
            let device: Arc<Mutex<dyn MmioDevice>> = Arc::new(Mutex::new(transport));
            mmio.push(MmioSlot { base, size, device });
            mmio_infos.push(info);
            port_tenants.push(tenant);
        }
        let bus = Arc::new(Bus {
            serial: Mutex::new(Serial::new(EventFdTrigger(serial_irq), console)),
            mmio,
            exit_port,
        });

        let name = match &config.payload {
            Payload::Linux { kernel, .. } => kernel.display().to_string(),
            Payload::MicroVm { elf, .. } => elf.display().to_string(),
        };
        let kernel = boot::load_elf(&memory, &name, &elf)?;
        // Module 0: the initramfs of a Linux tenant, or Vigil's typed boot information for the
        // micro-VM (its role and RAM; devices and the verdict region join it with the switch).
        // The micro-VM's verdict region (ring + counters) at the top of its RAM, named in its boot
        // information, with the verdicts it starts with already in the ring.
        let verdict_region = match &config.payload {
            Payload::MicroVm { verdicts, .. } => {
                let region = VerdictRegion::reserve(&memory, mem_size).map_err(VmError::Device)?;
                region
                    .push(verdicts)
                    .map_err(|e| VmError::Device(format!("verdict ring: {e:?}")))?;
                Some(Arc::new(region))
            }
            Payload::Linux { .. } => None,
        };
        let boot_info = match &config.payload {
            Payload::MicroVm { role, .. } => {
                let mut info = vigil_wire::boot::BootInfo::new(*role, mem_size);
                // The switch ports, in order: the micro-VM finds them here (it has no ACPI).
                for (device, &tenant) in mmio_infos.iter().zip(&port_tenants) {
                    info.push_device(vigil_wire::boot::MmioDevice {
                        base: device.base,
                        size: device.size,
                        irq: device.gsi,
                        tenant,
                    })
                    .map_err(|e| VmError::Device(format!("boot information: {e:?}")))?;
                }
                if let Some(region) = &verdict_region {
                    info.verdict_base = region.gpa;
                    info.verdict_size = region.size();
                }
                Some(info.encode())
            }
            Payload::Linux { .. } => None,
        };
        let modules: Vec<BootModule<'_>> = match (&initramfs, &boot_info) {
            (Some(bytes), _) => vec![BootModule { bytes, at: None }],
            (None, Some(info)) => vec![BootModule {
                bytes: info,
                at: Some(VIGIL_BOOT_INFO_START),
            }],
            (None, None) => Vec::new(),
        };

        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let fd = Arc::new(fd);
        // Write traps guard the tenant's hooked kernel pages once it has booted.
        let write_traps = match &introspection {
            Some(_) => Some(Arc::new(WriteTraps::new(
                fd.clone(),
                RamSlot {
                    slot: 0,
                    size: mem_size,
                    host_addr: memory
                        .get_host_address(GuestAddress(0))
                        .map_err(|e| VmError::Memory(e.to_string()))?
                        as u64,
                },
                usize::from(config.vcpus),
            ))),
            None => None,
        };
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let vcpu_fd = fd
                .create_vcpu(u64::from(index))
                .map_err(ioctl("KVM_CREATE_VCPU"))?;
            patch_cpuid(&mut cpuid, index, host);
            vcpu_fd
                .set_cpuid2(&cpuid)
                .map_err(ioctl("KVM_SET_CPUID2"))?;
            if index == 0 {
                // The guest cannot calibrate its TSC against the PIT when its ring 0 is emulated
                // (the calibration loop is thousands of times slower than the PIT it counts):
                // tell it the frequency KVM runs its TSC at.
                if host == HostKind::Emulating && matches!(config.payload, Payload::Linux { .. }) {
                    if let Ok(khz) = vcpu_fd.get_tsc_khz() {
                        let dilation = tsc_dilation();
                        cmdline.push_str(&format!(
                            " tsc_early_khz={}",
                            u64::from(khz).saturating_mul(dilation)
                        ));
                    }
                }
                // The micro-VM keeps time with the TSC (conntrack timeouts, verdict lifetimes).
                if matches!(config.payload, Payload::MicroVm { .. }) {
                    if let Ok(khz) = vcpu_fd.get_tsc_khz() {
                        cmdline.push_str(&format!(" tsc_khz={khz}"));
                    }
                }
                // Linux learns its interrupt controllers and devices from ACPI; the micro-VM
                // needs neither (it polls).
                let rsdp = match config.payload {
                    Payload::Linux { .. } => Some(
                        crate::acpi::write_acpi_tables(&memory, config.vcpus, &mmio_infos)
                            .map_err(|e| VmError::Device(e.to_string()))?
                            .0,
                    ),
                    Payload::MicroVm { .. } => None,
                };
                let start_info = boot::write_pvh_start_info(
                    &memory, mem_size, &kernel, &cmdline, &modules, rsdp,
                )?;
                set_pvh_entry_state(&vcpu_fd, kernel.pvh_entry, start_info)?;
            }
            vcpus.push(Vcpu::new(
                index,
                vcpu_fd,
                memory.clone(),
                bus.clone(),
                host,
                introspection.clone(),
                write_traps.clone(),
            ));
        }
        Ok(Vm {
            introspection,
            verdict_region,
            stop: Arc::new(AtomicBool::new(false)),
            control: Arc::new(RunControl::default()),
            name: config.name.clone(),
            host,
            _kvm: kvm,
            fd,
            memory,
            bus,
            vcpus,
            created,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Stops the VM when set (its `run` returns with `StopReason::Requested`).
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// What the API needs to pause, capture and resume this VM while `run` owns it.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            fd: self.fd.clone(),
            bus: self.bus.clone(),
            memory: self.memory.clone(),
            control: self.control.clone(),
        }
    }

    /// Loads a snapshot into this freshly created VM (before `run`): RAM from `pages` (a
    /// `snapshot::write_memory` stream), then the VM, vCPU and device state. Returns the MSRs
    /// KVM refused (reported, not fatal).
    pub fn restore(
        &mut self,
        snapshot: &crate::snapshot::VmSnapshot,
        pages: &mut impl std::io::Read,
    ) -> Result<Vec<u32>, VmError> {
        let bad = |what: &str, e: String| VmError::Device(format!("restore: {what}: {e}"));
        let mem_size: u64 = self.memory.iter().map(|r| r.len()).sum();
        if snapshot.mem_bytes != mem_size || snapshot.vcpus.len() != self.vcpus.len() {
            return Err(bad(
                "shape",
                format!(
                    "the snapshot has {} MiB and {} vCPUs, this VM {} MiB and {}",
                    snapshot.mem_bytes >> 20,
                    snapshot.vcpus.len(),
                    mem_size >> 20,
                    self.vcpus.len()
                ),
            ));
        }
        // Start from zeroed RAM (what `create` loaded is not the guest's any more): give the
        // pages back to the kernel, which maps zero pages on the next touch.
        for region in self.memory.iter() {
            let host = self
                .memory
                .get_host_address(region.start_addr())
                .map_err(|e| bad("RAM", e.to_string()))?;
            // SAFETY: the range is one anonymous private mapping the VM owns; nothing else uses it
            // before the vCPUs run.
            let rc =
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(bad("RAM", std::io::Error::last_os_error().to_string()));
            }
        }
        crate::snapshot::read_memory(&self.memory, pages).map_err(|e| bad("RAM", e.to_string()))?;
        for chip in &snapshot.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| bad("KVM_SET_IRQCHIP", e.to_string()))?;
        }
        if let Some(pit) = &snapshot.pit {
            self.fd
                .set_pit2(pit)
                .map_err(|e| bad("KVM_SET_PIT2", e.to_string()))?;
        }
        if let Some(clock) = &snapshot.clock {
            // A KVM without a settable clock (or a guest without kvmclock) loses nothing here.
            let _ = self.fd.set_clock(clock);
        }
        let mut refused = Vec::new();
        for (vcpu, state) in self.vcpus.iter_mut().zip(&snapshot.vcpus) {
            refused.extend(vcpu.restore(state).map_err(|e| bad("vCPU", e))?);
        }
        self.bus.restore_serial(&snapshot.serial);
        self.bus
            .restore_devices(&snapshot.transports)
            .map_err(|e| bad("devices", e))?;
        Ok(refused)
    }

    /// Pauses and resumes the VM's vCPUs while it runs.
    pub fn run_control(&self) -> Arc<RunControl> {
        self.control.clone()
    }

    /// A firewall micro-VM's verdict ring and counters.
    pub fn verdict_region(&self) -> Option<Arc<VerdictRegion>> {
        self.verdict_region.clone()
    }

    /// A tenant's introspection (hooks, policy, event log), if it runs under a policy.
    pub fn introspection(&self) -> Option<Arc<crate::introspect::Introspection>> {
        self.introspection.clone()
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Adds an MMIO device at a window (before `run`).
    pub fn add_mmio_device(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), VmError> {
        let bus = Arc::get_mut(&mut self.bus)
            .ok_or_else(|| VmError::Device("devices must be added before the VM runs".into()))?;
        bus.mmio.push(MmioSlot { base, size, device });
        Ok(())
    }

    /// Runs the VM until it stops or `timeout` passes. vCPUs run on their own threads; a vCPU
    /// that fails stops its VM, never the process.
    pub fn run(self, timeout: Option<Duration>) -> Result<VmOutcome, VmError> {
        let started = self.created;
        let stop = self.stop.clone();
        let first_reason: Arc<(Mutex<Option<StopReason>>, Condvar)> =
            Arc::new((Mutex::new(None), Condvar::new()));
        install_kick_handler();
        let mut handles: Vec<std::thread::JoinHandle<_>> = Vec::new();
        for mut vcpu in self.vcpus {
            let stop = stop.clone();
            let control = self.control.clone();
            let first_reason = first_reason.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{}-vcpu{}", self.name, vcpu.index))
                .spawn(move || {
                    let reason = vcpu.run(&stop, &control);
                    stop.store(true, Ordering::Release);
                    let (lock, cvar) = &*first_reason;
                    let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.is_none() {
                        *slot = Some(reason);
                    }
                    cvar.notify_all();
                    (vcpu.stats, vcpu.rip_samples)
                })
                .map_err(VmError::Thread)?;
            handles.push(handle);
        }
        {
            use std::os::unix::thread::JoinHandleExt;
            self.control
                .set_threads(handles.iter().map(|h| h.as_pthread_t()).collect());
        }
        let sampler = std::env::var_os("VIGIL_PROFILE").map(|_| {
            use std::os::unix::thread::JoinHandleExt;
            let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10));
                    for &thread in &threads {
                        // SAFETY: the vCPU threads are joined only after this sampler is.
                        unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
                    }
                }
            })
        });
        // Wait for the first vCPU to stop (or the timeout), then stop the others.
        {
            let (lock, cvar) = &*first_reason;
            let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
            while slot.is_none() {
                // SIGTERM/SIGINT (see `stop_on_signals`) stop the VM cleanly.
                if STOP_SIGNALLED.load(Ordering::Acquire) || stop.load(Ordering::Acquire) {
                    *slot = Some(StopReason::Requested);
                    break;
                }
                let mut wait = SIGNAL_POLL;
                if let Some(limit) = timeout {
                    let left = limit.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        *slot = Some(StopReason::Crashed(format!(
                            "timed out after {} s",
                            limit.as_secs()
                        )));
                        break;
                    }
                    wait = wait.min(left);
                }
                slot = cvar
                    .wait_timeout(slot, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        stop.store(true, Ordering::Release);
        // No more pause kicks at threads that are about to end.
        self.control.set_threads(Vec::new());
        if let Some(sampler) = sampler {
            let _ = sampler.join();
        }
        let mut stats = VcpuStats::default();
        for handle in handles {
            // A vCPU blocked in KVM_RUN returns on a signal; repeat until it has noticed `stop`.
            while !handle.is_finished() {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: the pthread is alive (not finished, not joined yet).
                unsafe {
                    libc::pthread_kill(handle.as_pthread_t(), vmm_sys_util::signal::SIGRTMIN())
                };
                std::thread::sleep(Duration::from_millis(5));
            }
            match handle.join() {
                Ok((vcpu_stats, samples)) => {
                    stats.merge(&vcpu_stats);
                    if let Some(samples) = samples {
                        write_profile(&samples);
                    }
                }
                Err(_) => {
                    let (lock, _) = &*first_reason;
                    *lock.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(StopReason::Crashed("a vCPU thread panicked".into()));
                }
            }
        }
        // Every event of the run is out before the outcome line.
        if let Some(introspection) = &self.introspection {
            introspection.flush_events(Duration::from_secs(5));
        }
        let mut markers = BTreeMap::new();
        if let Ok(mut serial) = self.bus.serial.lock() {
            let console = serial.writer_mut();
            let _ = console.flush();
            for (marker, seen) in &console.markers {
                if let Some(ms) = seen {
                    markers.insert(marker.clone(), *ms);
                }
            }
        }
        let stop_reason = first_reason
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(StopReason::Requested);
        Ok(VmOutcome {
            name: self.name,
            stop: stop_reason,
            host: self.host.to_string(),
            wall_ms: started.elapsed().as_millis() as u64,
            markers,
            vmm_rss_kib: resident_kib(),
            stats,
            firewall: self
                .verdict_region
                .as_deref()
                .and_then(VerdictRegion::counters),
        })
    }
}

/// Where kernel profiles are cached: `VIGIL_CACHE_DIR`, else `$XDG_CACHE_HOME/vigil`, else
/// `$HOME/.cache/vigil`.
fn profile_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("VIGIL_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("vigil"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/vigil"))
}

/// The kernel's introspection profile (symbols from kallsyms, struct layouts from BTF), cached
/// per build id: the analysis reads the whole vmlinux, the cache one small JSON file.
fn kernel_profile(elf: &[u8]) -> Result<trap_handler::KernelProfile, VmError> {
    let build_id = trap_handler::elf::Elf::parse(elf)
        .ok()
        .and_then(|e| e.build_id().map(trap_handler::elf::hex));
    let dir = profile_cache_dir();
    if let (Some(dir), Some(id)) = (&dir, &build_id) {
        if let Some(profile) = trap_handler::KernelProfile::load_cached(dir, id) {
            eprintln!(
                "vigil: kernel profile {id} from the cache ({})",
                dir.display()
            );
            return Ok(profile);
        }
    }
    let analysis = trap_handler::analyze_vmlinux(elf)
        .map_err(|e| VmError::Device(format!("cannot introspect this kernel: {e}")))?;
    if let Some(dir) = &dir {
        match analysis.profile.save_cached(dir) {
            Ok(path) => eprintln!("vigil: kernel profile cached in {}", path.display()),
            Err(e) => eprintln!("vigil: kernel profile not cached ({}): {e}", dir.display()),
        }
    }
    Ok(analysis.profile)
}

/// Set by SIGTERM or SIGINT once [`stop_on_signals`] is installed: running VMs stop as if asked to
/// (`StopReason::Requested`), and report their outcome.
static STOP_SIGNALLED: AtomicBool = AtomicBool::new(false);
/// How often a waiting `Vm::run` looks at [`STOP_SIGNALLED`].
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Makes SIGTERM and SIGINT stop running VMs cleanly instead of killing the VMM.
/// Whether SIGTERM or SIGINT arrived since `stop_on_signals`.
pub fn stop_signalled() -> bool {
    STOP_SIGNALLED.load(Ordering::Acquire)
}

pub fn stop_on_signals() {
    extern "C" fn on_signal(_: libc::c_int) {
        // Only an atomic store: async-signal-safe.
        STOP_SIGNALLED.store(true, Ordering::Release);
    }
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Writes the RIP histogram to `VIGIL_PROFILE` (one "count rip" line each, most frequent first).
fn write_profile(samples: &BTreeMap<u64, u64>) {
    let Some(path) = std::env::var_os("VIGIL_PROFILE") else {
        return;
    };
    let mut rows: Vec<(u64, u64)> = samples.iter().map(|(rip, n)| (*n, *rip)).collect();
    rows.sort_unstable_by(|a, b| b.cmp(a));
    let text: String = rows
        .iter()
        .map(|(n, rip)| format!("{n} {rip:#x}\n"))
        .collect();
    if let Err(e) = fs::write(&path, text) {
        eprintln!(
            "vigil: cannot write the profile to {}: {e}",
            PathBuf::from(path).display()
        );
    }
}

/// How many times faster than it really runs an emulated tenant is told its TSC runs
/// (`VIGIL_TSC_DILATION`, default 1). Guest time then passes that many times slower than wall
/// time, and so do its timer ticks, each of which costs thousands of emulated instructions; every
/// guest timeout grows by the same factor in wall time.
fn tsc_dilation() -> u64 {
    std::env::var("VIGIL_TSC_DILATION")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|d| (1..=100).contains(d))
        .unwrap_or(1)
}

/// VmRSS of this process from /proc/self/status, KiB (0 if unreadable).
fn resident_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The vCPU kick signal only has to interrupt KVM_RUN; its handler does nothing.
fn install_kick_handler() {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let _ = vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), noop);
}

/// CPUID for one vCPU: its APIC ID in leaf 1 and 0xB. On an emulating host the KVM paravirt leaves
/// are removed (no kvmclock: kvm-here.md), since the hypervisor leaf is the part honoured there.
fn patch_cpuid(cpuid: &mut CpuId, index: u8, host: HostKind) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(index) << 24);
            }
            0xb => {
                entry.edx = u32::from(index);
            }
            0x4000_0000..=0x4000_00ff if host == HostKind::Emulating => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
}

/// PVH entry state (Xen docs/misc/pvh.pandoc): 32-bit protected mode, paging off, flat 4 GiB CS
/// (execute/read) and DS/ES/SS (read/write), EBX = start info, everything else zero.
fn set_pvh_entry_state(
    vcpu: &kvm_ioctls::VcpuFd,
    entry: u64,
    start_info: u64,
) -> Result<(), VmError> {
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    // 32-bit flat code and data (PVH: protected mode, paging off).
    let code = flat_segment(0x10, 0xb, false, true);
    let data = flat_segment(0x18, 0x3, false, true);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x1 | 0x10; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: entry,
        rbx: start_info,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
    Ok(())
}
