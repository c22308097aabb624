//! Building a VM, one named step per resource (Firecracker's `builder.rs`): read the inputs,
//! create the KVM VM, guest memory, the serial console, the network devices, the vCPUs, and load
//! the payload (kernel or micro-VM, its boot information, ACPI, the PVH entry state).
//!
//! Owns: the order of those steps and each step's KVM calls, the kernel-profile cache, CPUID
//! and the PVH entry state of the boot vCPU.
//! Must not: run the guest, or read the environment (knobs come in the config).

use std::fs::{self, File};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, kvm_regs, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{input_file, ioctl, Vm, VmError};
use crate::boot::{self, BootModule};
use crate::bus::{Bus, ConsoleOutput, MmioSlot};
use crate::config::{LinkEnd, NetBackend, Payload, VmConfig};
use crate::devices::tap::Tap;
use crate::devices::virtio::mmio::{MmioTransport, QueueRings};
use crate::devices::virtio::net::{FrameLink, Net};
use crate::devices::vxlan::Vxlan;
use crate::devices::{DeviceFault, MmioDevice, MmioDeviceInfo};
use crate::dirty_log::MemSlots;
use crate::host_kind::HostKind;
use crate::introspect::Introspection;
use crate::layout::*;
use crate::run_control::RunControl;
use crate::vcpu::{TenantGuard, Vcpu};
use crate::verdict_region::VerdictRegion;
use crate::write_trap::{DeviceWrites, RamSlot, WriteTraps};

/// Where KVM's TSS and identity-map pages go (below the 4 GiB boundary, inside the MMIO hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

impl Vm {
    /// Builds a VM: memory, irqchip, devices, payload loaded, vCPUs at the PVH entry.
    pub fn create(config: &VmConfig, host: HostKind) -> Result<Vm, VmError> {
        let created = Instant::now();
        let knobs = &config.debug;
        config.validate()?;
        // Read every input before touching KVM, so bad input fails fast and clearly.
        let inputs = BootInputs::read(config, host)?;
        let introspection = introspection(config, inputs.elf.bytes(), knobs)?;
        let (kvm, fd) = kvm_vm()?;
        let fd = Arc::new(fd);
        if knobs.irqchip_first {
            interrupt_controllers(&fd)?;
        }
        // A micro-VM never migrates: no dirty bitmap of the VMM's writes to keep.
        let track_dirty = !matches!(config.payload, Payload::MicroVm { .. });
        let (memory, slots) = guest_memory(&fd, config.mem_bytes(), track_dirty)?;
        if !knobs.irqchip_first {
            interrupt_controllers(&fd)?;
        }
        let (serial_irq, console) = serial_console(config, &fd, created)?;
        let stop = Arc::new(AtomicBool::new(false));
        let device_fault = Arc::new(DeviceFault::new(stop.clone()));
        // Before the devices: they keep their writes off the pages the traps will guard.
        let write_traps = write_traps(introspection.is_some(), &slots);
        let device_writes = write_traps
            .as_ref()
            .map(|traps| traps.device_writes())
            .unwrap_or_default();
        let nets = net_devices(config, &fd, &memory, &device_fault, &device_writes)?;
        let net_counters = nets.counters;
        let bus = Arc::new(Bus::new(serial_irq, console, nets.slots, inputs.exit_port));
        if inputs.exit_port {
            bus.set_console_memory(memory.clone());
        }
        let vcpu_fds = vcpu_fds(&kvm, &fd, config.vcpus, host)?;
        let Loaded {
            verdict_region,
            ports_base,
        } = load_payload(
            config,
            host,
            &memory,
            inputs,
            &nets.ports,
            &vcpu_fds[0],
            knobs.tsc_dilation,
        )?;
        if let Some(area) = ports_base {
            ready_ports(&nets.transports, area)?;
        }
        if let Some(region) = &verdict_region {
            bus.set_idle_doorbell(region.clone());
            // Frames put in its rings wake the micro-VM from its idle exit (it polls: no
            // interrupts), as verdict records do. `VIGIL_IDLE_WAKE=off`: they wait for its rest
            // to end (the benchmark's baseline).
            if std::env::var("VIGIL_IDLE_WAKE").as_deref() != Ok("off") {
                for interrupt in &nets.interrupts {
                    interrupt.set_poller(region.doorbell());
                }
            }
        }
        let debug_generation = Arc::new(AtomicU64::new(0));
        let guard = || match (&introspection, &write_traps) {
            (Some(introspection), Some(write_traps)) => Some(TenantGuard {
                introspection: introspection.clone(),
                write_traps: write_traps.clone(),
                debug_generation: debug_generation.clone(),
            }),
            _ => None,
        };
        let vcpus = vcpu_fds
            .into_iter()
            .zip(0..)
            .map(|(vcpu_fd, index)| {
                Vcpu::new(
                    index,
                    usize::from(config.vcpus),
                    vcpu_fd,
                    memory.clone(),
                    bus.clone(),
                    host,
                    guard(),
                    knobs,
                    !matches!(config.payload, Payload::MicroVm { .. }),
                )
            })
            .collect();
        release_freed_heap();
        Ok(Vm {
            introspection,
            verdict_region,
            net_counters,
            stop,
            device_fault,
            control: Arc::new(RunControl::default()),
            name: config.name.clone(),
            host,
            _kvm: kvm,
            fd,
            memory,
            slots,
            bus,
            vcpus,
            created,
            profile: knobs.profile.clone(),
        })
    }
}

/// Gives the heap pages the build freed back to the kernel: the kernel image, its decompressed
/// ELF, the initramfs and the kernel analysis are gone by now, but glibc keeps freed heap memory
/// resident (its mmap threshold rises after large frees, so later large buffers land on the
/// heap too) and only trims the top. One call per VM built.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads a tenant's input file whole, within `max` bytes, if any user of the host may read it
/// ([`input_file::read_public`]: its guest will).
fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, VmError> {
    input_file::read_public(path, max).map_err(|source| VmError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// The ELF to load.
enum ElfImage {
    /// A Linux vmlinux, extracted from a bzImage if need be (introspection reads all of it).
    Bytes(Vec<u8>),
    /// The micro-VM's ELF, opened: only its headers and segments are read, at load. The rest is
    /// never read (fw-guest's debug information is 2 of its 2.2 MB, and reading it was 2 ms of
    /// the boot to its first forward).
    File(File),
}

impl ElfImage {
    /// The bytes, for introspection: none for a file (a micro-VM takes no policy).
    fn bytes(&self) -> &[u8] {
        match self {
            ElfImage::Bytes(bytes) => bytes,
            ElfImage::File(_) => &[],
        }
    }
}

/// What the payload needs, read (or, the micro-VM's ELF, opened) before KVM is touched.
struct BootInputs {
    elf: ElfImage,
    initramfs: Option<Vec<u8>>,
    /// The kernel command line so far (the host profile's part included).
    cmdline: String,
    /// The micro-VM's exit port is live.
    exit_port: bool,
}

impl BootInputs {
    fn read(config: &VmConfig, host: HostKind) -> Result<BootInputs, VmError> {
        Ok(match &config.payload {
            Payload::Linux {
                kernel,
                initramfs,
                cmdline,
            } => {
                let image = read_file(kernel, input_file::MAX_KERNEL_BYTES)?;
                let elf = boot::kernel_elf(&image).map_err(|source| VmError::KernelImage {
                    path: kernel.clone(),
                    source,
                })?;
                let initramfs = initramfs
                    .as_deref()
                    .map(|path| read_file(path, input_file::max_initramfs_bytes(config.mem_mib)))
                    .transpose()?;
                let profile = host.linux_cmdline();
                let cmdline = if profile.is_empty() {
                    cmdline.clone()
                } else {
                    format!("{cmdline} {profile}")
                };
                BootInputs {
                    elf: ElfImage::Bytes(elf),
                    initramfs,
                    cmdline,
                    exit_port: false,
                }
            }
            Payload::MicroVm { elf, role, .. } => BootInputs {
                elf: ElfImage::File(
                    input_file::open(elf, input_file::MAX_MICROVM_ELF_BYTES)
                        .map_err(|source| VmError::ReadFile {
                            path: elf.clone(),
                            source,
                        })?
                        .0,
                ),
                initramfs: None,
                cmdline: format!("role={}", role.name()),
                exit_port: true,
            },
        })
    }
}

/// A Linux tenant under a policy: its kernel's hooks and the policy, compiled.
fn introspection(
    config: &VmConfig,
    elf: &[u8],
    knobs: &crate::knobs::DebugKnobs,
) -> Result<Option<Arc<Introspection>>, VmError> {
    let Some(policy) = &config.policy else {
        return Ok(None);
    };
    let profile = kernel_profile(elf, knobs.cache_dir.as_deref())?;
    let introspection = Introspection::new(
        &config.name,
        profile,
        policy.clone(),
        config.verdict_sink.as_ref().map(|sink| sink.0.clone()),
        knobs.bare_hooks.as_deref(),
    )
    .map_err(VmError::Introspection)?;
    Ok(Some(Arc::new(introspection)))
}

/// Kernel profiles this process has in memory, by build id: a host creates, migrates in and
/// restores many VMs of the same kernel, and each profile is hundreds of thousands of symbols
/// (reading one from the JSON cache made about 2 million allocations, 90 MB at its peak, per
/// VM). At most [`PROFILES_KEPT`] kernels.
static PROFILES: std::sync::OnceLock<
    std::sync::Mutex<std::collections::HashMap<String, Arc<trap_handler::KernelProfile>>>,
> = std::sync::OnceLock::new();
const PROFILES_KEPT: usize = 8;

/// The kernel's introspection profile (symbols from kallsyms, struct layouts from BTF): shared
/// in this process per build id ([`PROFILES`]), and cached per build id in `cache` (see
/// [`crate::knobs::DebugKnobs::cache_dir`]): the analysis reads the whole vmlinux, the cache one
/// JSON file.
fn kernel_profile(
    elf: &[u8],
    cache: Option<&Path>,
) -> Result<Arc<trap_handler::KernelProfile>, VmError> {
    let build_id = trap_handler::elf::Elf::parse(elf)
        .ok()
        .and_then(|e| e.build_id().map(trap_handler::elf::hex));
    let Some(id) = build_id else {
        return kernel_profile_uncached(elf, cache, None).map(Arc::new);
    };
    let profiles = PROFILES.get_or_init(Default::default);
    if let Some(profile) = profiles.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        return Ok(profile.clone());
    }
    let profile = Arc::new(kernel_profile_uncached(elf, cache, Some(&id))?);
    let mut kept = profiles.lock().unwrap_or_else(|p| p.into_inner());
    if kept.len() >= PROFILES_KEPT {
        kept.clear();
    }
    kept.insert(id, profile.clone());
    Ok(profile)
}

fn kernel_profile_uncached(
    elf: &[u8],
    cache: Option<&Path>,
    build_id: Option<&String>,
) -> Result<trap_handler::KernelProfile, VmError> {
    if let (Some(dir), Some(id)) = (cache, build_id) {
        if let Some(profile) = trap_handler::KernelProfile::load_cached(dir, id) {
            log::info!(
                "vigil: kernel profile {id} from the cache ({})",
                dir.display()
            );
            return Ok(profile);
        }
    }
    let analysis = trap_handler::analyze_vmlinux(elf).map_err(VmError::KernelAnalysis)?;
    if let Some(dir) = cache {
        match analysis.profile.save_cached(dir) {
            Ok(path) => log::info!("vigil: kernel profile cached in {}", path.display()),
            Err(e) => log::warn!("vigil: kernel profile not cached ({}): {e}", dir.display()),
        }
    }
    Ok(analysis.profile)
}

/// The KVM VM, without devices yet (see [`interrupt_controllers`] for why).
fn kvm_vm() -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    Ok((kvm, fd))
}

/// The in-kernel interrupt controllers and PIT. Created after the RAM memslot, as Firecracker
/// does. Measured on the `kvm_pvm` host: a 32 MiB `KVM_SET_USER_MEMORY_REGION` takes 6-8 ms once
/// an irqchip exists and 0.02 ms before (the TSS address and the PIT make no difference); that
/// was half of a micro-VM's boot.
fn interrupt_controllers(fd: &VmFd) -> Result<(), VmError> {
    fd.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    fd.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(ioctl("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// Guest RAM from 0, registered with KVM as one memslot.
fn guest_memory(
    fd: &Arc<VmFd>,
    mem_size: u64,
    track_dirty: bool,
) -> Result<(GuestMemoryMmap, Arc<MemSlots>), VmError> {
    let memory =
        crate::anonymous_memory(mem_size as usize, track_dirty).map_err(VmError::Memory)?;
    let host_addr = memory
        .get_host_address(GuestAddress(0))
        .map_err(VmError::HostAddress)? as u64;
    // The mapping lives as long as `memory`, which the Vm owns and which outlives the VM file
    // descriptor's use of it.
    let slots = MemSlots::new(
        fd.clone(),
        RamSlot {
            slot: 0,
            size: mem_size,
            host_addr,
        },
    )
    .map_err(VmError::MemSlots)?;
    Ok((memory, Arc::new(slots)))
}

/// The console on COM1: its interrupt (an irqfd on GSI 4) and its output.
fn serial_console(
    config: &VmConfig,
    fd: &VmFd,
    created: Instant,
) -> Result<(EventFd, ConsoleOutput), VmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::SerialIrq)?;
    fd.register_irqfd(&serial_irq, SERIAL_GSI)
        .map_err(ioctl("KVM_IRQFD (serial)"))?;
    let log = match &config.console.log {
        Some(path) => Some(File::create(path).map_err(|source| VmError::ConsoleLog {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let console = ConsoleOutput::new(
        &config.name,
        log,
        config.console.stdout,
        created,
        &config.console.markers,
    );
    Ok((serial_irq, console))
}

/// The network devices on the bus, and what the payload must know of them.
struct NetDevices {
    slots: Vec<MmioSlot>,
    /// Each device's window and GSI, with the tenant behind it (a switch port's).
    ports: Vec<(MmioDeviceInfo, u32)>,
    /// Each device's counters, in device order.
    counters: Vec<Arc<crate::devices::virtio::net::NetCounters>>,
    /// Each device's interrupt (a micro-VM's devices ring its idle doorbell through it).
    interrupts: Vec<Arc<crate::devices::virtio::Interrupt>>,
    /// Each device's transport, in device order (a micro-VM's are readied for its driver once
    /// its image is loaded: [`ready_ports`]).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Network interfaces: virtio-net over virtio-mmio, one window and one GSI each; TAP or VXLAN
/// backed ones first (a TAP opened in the named network namespace when one is given), then the
/// in-process links.
fn net_devices(
    config: &VmConfig,
    fd: &VmFd,
    memory: &GuestMemoryMmap,
    fault: &Arc<DeviceFault>,
    writes: &DeviceWrites,
) -> Result<NetDevices, VmError> {
    let mut backends: Vec<(Net, u32)> = Vec::new();
    for (index, net) in config.nets.iter().enumerate() {
        let backend = || net.backend.to_string();
        let link: Box<dyn FrameLink> = match &net.backend {
            NetBackend::Tap { name, netns } => Box::new(
                Tap::open(name, netns.as_deref()).map_err(|source| VmError::Tap {
                    index,
                    backend: backend(),
                    source,
                })?,
            ),
            NetBackend::Vxlan {
                local,
                peer,
                vni,
                trust,
            } => {
                let vxlan = Vxlan::bind(*local, peer.iter().copied().collect(), *vni).map_err(
                    |source| VmError::Vxlan {
                        index,
                        backend: backend(),
                        source,
                    },
                )?;
                Box::new(match &trust.0 {
                    Some(trust) => vxlan.with_trust(trust.clone()),
                    None => vxlan,
                })
            }
        };
        backends.push((Net::new(link, net.mac), net.tenant));
    }
    for (index, link) in config.links.iter().enumerate() {
        let device = match &link.link {
            LinkEnd::Memory(end) => Net::with_memory_link(end.clone(), link.mac),
            LinkEnd::Socket(socket) => {
                let end = socket
                    .try_clone()
                    .map_err(|source| VmError::LinkSocket { index, source })?;
                Net::new(Box::new(end), link.mac)
            }
        };
        backends.push((device, link.tenant));
    }
    let mut devices = NetDevices {
        slots: Vec::new(),
        ports: Vec::new(),
        counters: Vec::new(),
        interrupts: Vec::new(),
        transports: Vec::new(),
    };
    for (index, (net, tenant)) in backends.into_iter().enumerate() {
        let (base, size) = virtio_mmio_window(index as u32);
        let info = MmioDeviceInfo {
            base,
            size,
            gsi: VIRTIO_FIRST_GSI + index as u32,
        };
        let net_error = |source| VmError::NetDevice { index, source };
        let net = net.with_fault(format!("{}-net{index}", config.name), fault.clone());
        devices.counters.push(net.counters());
        let transport = MmioTransport::new(memory.clone(), Box::new(net))
            .map_err(net_error)?
            .with_device_writes(writes.clone());
        transport.register_with_kvm(fd, &info).map_err(net_error)?;
        devices.interrupts.push(transport.interrupt().clone());
        let transport = Arc::new(Mutex::new(transport));
        devices.transports.push(transport.clone());
        let device: Arc<Mutex<dyn MmioDevice>> = transport;
        devices.slots.push(MmioSlot { base, size, device });
        devices.ports.push((info, tenant));
    }
    Ok(devices)
}

/// Where a micro-VM's ports' queues go: right below its verdict region, above its image (which
/// ends at `image_end`). None where they do not fit there, or the knob leaves the ports to the
/// micro-VM's driver: then it sets them up itself.
fn ports_area(config: &VmConfig, ports: usize, image_end: u64) -> Option<u64> {
    if ports == 0 || config.debug.driver_sets_up_ports {
        return None;
    }
    let verdicts = VerdictRegion::gpa_for(config.mem_bytes())?;
    vigil_wire::boot::ports_area_below(verdicts, ports).filter(|&area| area >= image_end)
}

/// Readies a micro-VM's ports for its driver (before its vCPU runs): port `i`'s queues where the
/// micro-VM's layout puts them in the area at `area` (`vigil_wire::boot::port_queue`),
/// VERSION_1 only, as its driver would set them up itself.
fn ready_ports(transports: &[Arc<Mutex<MmioTransport>>], area: u64) -> Result<(), VmError> {
    use vigil_wire::boot::port_queue;
    let queue = |base: u64| QueueRings {
        size: port_queue::SIZE,
        desc: base + port_queue::DESC,
        avail: base + port_queue::AVAIL,
        used: base + port_queue::USED,
    };
    for (index, transport) in transports.iter().enumerate() {
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ready_for_driver(
                crate::devices::virtio::features::VERSION_1,
                &port_queue::bases(area, index).map(queue),
            )
            .map_err(|source| VmError::NetDevice { index, source })?;
    }
    Ok(())
}

/// The vCPUs' file descriptors, each with its CPUID.
fn vcpu_fds(kvm: &Kvm, fd: &VmFd, count: u8, host: HostKind) -> Result<Vec<VcpuFd>, VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for index in 0..count {
        let vcpu_fd = fd
            .create_vcpu(u64::from(index))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        patch_cpuid(&mut cpuid, index, host);
        vcpu_fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        vcpus.push(vcpu_fd);
    }
    Ok(vcpus)
}

/// Loads the payload and everything it starts with: the ELF; module 0 (the initramfs of a Linux
/// tenant, or Vigil's typed boot information for the micro-VM, naming its RAM, devices and
/// verdict region); the micro-VM's verdict region (ring + counters) at the top of its RAM, with
/// the verdicts it starts with already in the ring; the command line; ACPI for Linux; and the
/// PVH entry state of the boot vCPU. Returns the verdict region.
fn load_payload(
    config: &VmConfig,
    host: HostKind,
    memory: &GuestMemoryMmap,
    mut inputs: BootInputs,
    ports: &[(MmioDeviceInfo, u32)],
    boot_vcpu: &VcpuFd,
    tsc_dilation: u64,
) -> Result<Loaded, VmError> {
    let mem_size = config.mem_bytes();
    let name = match &config.payload {
        Payload::Linux { kernel, .. } => kernel.display().to_string(),
        Payload::MicroVm { elf, .. } => elf.display().to_string(),
    };
    let kernel = match &mut inputs.elf {
        ElfImage::Bytes(bytes) => {
            boot::load_elf(memory, &name, &mut std::io::Cursor::new(bytes.as_slice()))
        }
        ElfImage::File(file) => boot::load_elf(memory, &name, file),
    }?;
    let verdict_region = match &config.payload {
        Payload::MicroVm { verdicts, .. } => {
            let region =
                VerdictRegion::reserve(memory, mem_size).map_err(VmError::VerdictRegion)?;
            region.push(verdicts).map_err(VmError::VerdictRing)?;
            Some(Arc::new(region))
        }
        Payload::Linux { .. } => None,
    };
    let mut ports_base = None;
    let boot_info = match &config.payload {
        Payload::MicroVm { role, .. } => {
            let mut info = vigil_wire::boot::BootInfo::new(*role, mem_size);
            // Guest RAM is a fresh anonymous mapping (`guest_memory`): zero but for what this
            // builder writes into it.
            info.flags |= vigil_wire::boot::BOOT_FLAG_RAM_ZEROED;
            // Console lines by address: one exit a line (`Bus::set_console_memory`).
            info.flags |= vigil_wire::boot::BOOT_FLAG_CONSOLE_MMIO;
            // The switch ports, in order: the micro-VM finds them here (it has no ACPI).
            for (device, tenant) in ports {
                info.push_device(vigil_wire::boot::MmioDevice {
                    base: device.base,
                    size: device.size,
                    irq: device.gsi,
                    tenant: *tenant,
                })
                .map_err(VmError::BootInfo)?;
            }
            if let Some(region) = &verdict_region {
                info.verdict_base = region.gpa;
                info.verdict_size = region.size();
            }
            ports_base = ports_area(config, ports.len(), kernel.end);
            if let Some(area) = ports_base {
                info.flags |= vigil_wire::boot::BOOT_FLAG_PORTS_READY;
                info.ports_base = area;
            }
            Some(info.encode())
        }
        Payload::Linux { .. } => None,
    };
    let modules: Vec<BootModule<'_>> = match (&inputs.initramfs, &boot_info) {
        (Some(bytes), _) => vec![BootModule { bytes, at: None }],
        (None, Some(info)) => vec![BootModule {
            bytes: info,
            at: Some(VIGIL_BOOT_INFO_START),
        }],
        (None, None) => Vec::new(),
    };
    let mut cmdline = inputs.cmdline;
    cmdline.push_str(&tsc_cmdline(config, host, boot_vcpu, tsc_dilation));
    cmdline.push_str(&seed_cmdline(config));
    // Linux learns its interrupt controllers and devices from ACPI; the micro-VM needs neither
    // (it polls).
    let rsdp = match config.payload {
        Payload::Linux { .. } => {
            let infos: Vec<MmioDeviceInfo> = ports.iter().map(|(info, _)| *info).collect();
            Some(
                crate::acpi::write_acpi_tables(memory, config.vcpus, &infos)
                    .map_err(VmError::Acpi)?
                    .0,
            )
        }
        Payload::MicroVm { .. } => None,
    };
    let start_info =
        boot::write_pvh_start_info(memory, mem_size, &kernel, &cmdline, &modules, rsdp)?;
    set_pvh_entry_state(boot_vcpu, kernel.pvh_entry, start_info)?;
    Ok(Loaded {
        verdict_region,
        ports_base,
    })
}

/// What [`load_payload`] leaves for the rest of the build.
struct Loaded {
    verdict_region: Option<Arc<VerdictRegion>>,
    /// A micro-VM's ports' queue area, which its boot information names: its devices are to be
    /// readied there ([`ready_ports`]).
    ports_base: Option<u64>,
}

/// What the command line says about the TSC. The guest cannot calibrate its TSC against the PIT
/// when its ring 0 is emulated (the calibration loop is thousands of times slower than the PIT it
/// counts): tell it the frequency KVM runs its TSC at (times the knob's dilation). The micro-VM
/// keeps time with the TSC (conntrack timeouts, verdict lifetimes).
fn tsc_cmdline(config: &VmConfig, host: HostKind, boot_vcpu: &VcpuFd, tsc_dilation: u64) -> String {
    match config.payload {
        Payload::Linux { .. } if host == HostKind::Emulating => match boot_vcpu.get_tsc_khz() {
            Ok(khz) => format!(
                " tsc_early_khz={}",
                u64::from(khz).saturating_mul(tsc_dilation)
            ),
            Err(_) => String::new(),
        },
        Payload::Linux { .. } => String::new(),
        Payload::MicroVm { .. } => match boot_vcpu.get_tsc_khz() {
            Ok(khz) => format!(" tsc_khz={khz}"),
            Err(_) => String::new(),
        },
    }
}

/// The micro-VM's secret: 128 random bits from the host (`fw.seed=`, 32 hex digits), the key of
/// its SYN cookies and table hashes (the micro-VM mixes in RDRAND where the CPU has it). Only
/// the micro-VM's own memory holds its command line. Empty if the host has no randomness to give.
fn seed_cmdline(config: &VmConfig) -> String {
    use std::io::Read;
    if !matches!(config.payload, Payload::MicroVm { .. }) {
        return String::new();
    }
    let mut seed = [0u8; 16];
    match fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed)) {
        Ok(()) => format!(" fw.seed={}", hex::encode(seed)),
        Err(e) => {
            log::warn!("no randomness for the micro-VM's seed: {e}");
            String::new()
        }
    }
}

/// Write traps guard a tenant's hooked kernel pages once it has booted (with introspection).
fn write_traps(introspection: bool, slots: &Arc<MemSlots>) -> Option<Arc<WriteTraps>> {
    introspection.then(|| Arc::new(WriteTraps::new(slots.clone())))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid() -> CpuId {
        let mut cpuid = CpuId::new(3).unwrap();
        let entries = cpuid.as_mut_slice();
        entries[0].function = 1;
        entries[0].ebx = 0xaa12_3456;
        entries[1].function = 0xb;
        entries[2].function = 0x4000_0000;
        entries[2].eax = 0x4000_0001;
        entries[2].ebx = 0x4b4d_564b;
        cpuid
    }

    #[test]
    fn inputs_are_read_before_kvm_and_bad_ones_fail_clearly() {
        let elf = std::env::temp_dir().join(format!("vigil-inputs-{}.elf", std::process::id()));
        fs::write(&elf, b"\x7fELF not really").unwrap();
        let config = VmConfig::micro_vm("fw", &elf, vigil_wire::boot::Role::Edge);
        let inputs = BootInputs::read(&config, HostKind::Emulating).unwrap();
        assert_eq!(inputs.cmdline, "role=edge");
        assert!(inputs.exit_port && inputs.initramfs.is_none());
        assert!(matches!(inputs.elf, ElfImage::File(_)));
        let _ = fs::remove_file(&elf);
        let e = BootInputs::read(&config, HostKind::Emulating)
            .err()
            .expect("the ELF is gone");
        assert!(matches!(e, VmError::ReadFile { .. }), "{e}");
        let linux = VmConfig {
            payload: Payload::Linux {
                kernel: "/nonexistent/bzImage".into(),
                initramfs: None,
                cmdline: "console=ttyS0".into(),
            },
            ..config
        };
        let e = BootInputs::read(&linux, HostKind::Hardware)
            .err()
            .expect("no kernel there");
        assert!(
            e.to_string()
                .starts_with("cannot read /nonexistent/bzImage"),
            "{e}"
        );
        assert!(
            introspection(&linux, b"", &crate::knobs::DebugKnobs::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn ports_are_readied_only_where_their_queues_fit_above_the_image() {
        use vigil_wire::boot::port_queue;
        let elf = Path::new("/fw.elf");
        let config =
            |mib| VmConfig::micro_vm("fw", elf, vigil_wire::boot::Role::Switch).with_mem_mib(mib);
        let image_end = 0x28_0000;
        let area = ports_area(&config(64), 3, image_end).expect("room in 64 MiB");
        let verdicts = VerdictRegion::gpa_for(64 << 20).unwrap();
        assert!(area >= image_end && area + 6 * port_queue::BYTES <= verdicts);
        assert_eq!(area % 4096, 0);
        // 4 MiB: the queues would reach down into the image; its driver sets them up.
        assert_eq!(ports_area(&config(4), 3, image_end), None);
        assert_eq!(
            ports_area(&config(64), 0, image_end),
            None,
            "no ports, nothing to ready"
        );
        let by_driver = config(64).with_debug(crate::knobs::DebugKnobs {
            driver_sets_up_ports: true,
            ..Default::default()
        });
        assert_eq!(ports_area(&by_driver, 3, image_end), None);
    }

    #[test]
    fn a_bad_memory_size_stays_its_own_error() {
        let e = VmError::from(crate::config::ConfigError::BadMemorySize(1));
        assert!(matches!(e, VmError::BadMemorySize(_)));
        assert!(e.to_string().contains("1 MiB was asked for"));
        let e = VmError::from(crate::config::ConfigError::NoVcpus);
        assert!(matches!(e, VmError::Config(_)));
    }

    #[test]
    fn cpuid_names_each_vcpu_and_hides_kvm_on_emulating_hosts() {
        let mut emulating = cpuid();
        patch_cpuid(&mut emulating, 3, HostKind::Emulating);
        let e = emulating.as_slice();
        assert_eq!(e[0].ebx, 0x0312_3456, "APIC ID in leaf 1 EBX[31:24]");
        assert_eq!(e[1].edx, 3, "x2APIC ID in leaf 0xB");
        assert_eq!((e[2].eax, e[2].ebx), (0, 0), "no KVM signature");
        let mut hardware = cpuid();
        patch_cpuid(&mut hardware, 1, HostKind::Hardware);
        let h = hardware.as_slice();
        assert_eq!(h[0].ebx, 0x0112_3456);
        assert_eq!(h[2].ebx, 0x4b4d_564b, "the KVM leaves stay on hardware");
    }
}
