//! Boot information the VMM hands to the firewall micro-VM.
//!
//! The micro-VM is started through the PVH entry (32-bit protected mode, paging off) with EBX
//! pointing at a `hvm_start_info` (Xen's public `arch-x86/hvm/start_info.h`, version 1). That
//! structure carries the command line and the memory map; Vigil's own typed boot information rides
//! in the first module of its module list so that a VMM which does not know Vigil (QEMU) can boot the
//! same ELF with defaults taken from the command line.
//!
//! Everything here parses from byte slices with explicit length checks and little-endian field
//! reads: the same code runs in the VMM (writing) and in the guest (reading what the VMM wrote), and
//! neither side trusts a length or count it did not check.

/// Magic of Vigil's boot information block ("VIGILBT1", little endian).
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VIGILBT1");

/// Layout version of [`BootInfo`] this crate writes and accepts.
pub const BOOT_INFO_VERSION: u32 = 2;

/// [`MmioDevice::tenant`] of a switch port provisioned with no tenant behind it yet (an
/// [`crate::verdict::Op::Attach`] record assigns one at run time). The micro-VM drops frames that
/// arrive from such a port and sends none to it.
pub const TENANT_UNASSIGNED: u32 = u32::MAX;

/// Most virtio-mmio devices a [`BootInfo`] describes.
pub const MAX_MMIO_DEVICES: usize = 8;

/// Encoded size of [`BootInfo`] (version 2).
pub const BOOT_INFO_LEN: usize = core::mem::size_of::<BootInfo>();

/// Magic of `hvm_start_info` (Xen `XEN_HVM_START_MAGIC_VALUE`).
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

/// Bytes of `hvm_start_info` version 0 (up to and including `rsdp_paddr`), Xen start_info.h.
pub const HVM_START_INFO_V0_LEN: usize = 40;
/// Bytes of `hvm_start_info` version 1 (adds `memmap_paddr`, `memmap_entries`, `reserved`).
pub const HVM_START_INFO_V1_LEN: usize = 56;
/// Bytes of one `hvm_modlist_entry` (paddr, size, cmdline_paddr, reserved: four u64).
pub const HVM_MODLIST_ENTRY_LEN: usize = 32;
/// Bytes of one `hvm_memmap_table_entry` (addr u64, size u64, type u32, reserved u32).
pub const HVM_MEMMAP_ENTRY_LEN: usize = 24;
/// `hvm_memmap_table_entry.type` for usable RAM (E820 / ACPI "AddressRangeMemory").
pub const HVM_MEMMAP_TYPE_RAM: u32 = 1;

/// I/O port the micro-VM writes a one-byte exit code to when it stops (same port as QEMU's
/// `isa-debug-exit` default, so `-device isa-debug-exit` ends a QEMU run the same way; QEMU's
/// process exit status is then `code << 1 | 1`).
pub const EXIT_PORT: u16 = 0xf4;

/// Guest-physical address the micro-VM writes (32 bits) when its packet loop has found nothing to
/// do for a while: the number of microseconds (at most [`IDLE_MAX_US`]) the VMM may keep its vCPU
/// off the CPU. A polling loop then costs a busy core only while there is traffic. The address
/// is outside RAM and every device window (an MMIO exit straight to the VMM, no ring-0 work).
pub const IDLE_MMIO_ADDR: u64 = 0xd0ff_f000;
pub const IDLE_MAX_US: u32 = 1000;

/// Guest-physical address the micro-VM writes a 64-bit value to, to put up to [`CONSOLE_MAX`]
/// bytes on its console in one exit (`console_write`), where the UART costs an exit for every
/// byte or two (on an emulating host, each byte of a `rep outsb` is one): the low 32 bits are
/// the guest-physical address of the bytes, the high 32 bits their count. Offered by the VMM
/// with [`BOOT_FLAG_CONSOLE_MMIO`]; outside RAM and every device window, like the idle address.
pub const CONSOLE_MMIO_ADDR: u64 = 0xd0ff_e000;
/// Most bytes of one console write by address.
pub const CONSOLE_MAX: usize = 256;

/// The value written to [`CONSOLE_MMIO_ADDR`] for `len` bytes at guest-physical `addr`.
pub const fn console_write(addr: u32, len: u32) -> u64 {
    addr as u64 | (len as u64) << 32
}

/// The bytes a value written to [`CONSOLE_MMIO_ADDR`] names: (guest-physical address, count),
/// or None when the count is 0 or above [`CONSOLE_MAX`].
pub fn parse_console_write(value: u64) -> Option<(u64, usize)> {
    let len = (value >> 32) as usize;
    (1..=CONSOLE_MAX)
        .contains(&len)
        .then_some((value & 0xffff_ffff, len))
}

/// Exit codes the micro-VM writes to [`EXIT_PORT`].
pub mod exit_code {
    /// Ran to completion.
    pub const OK: u8 = 0;
    /// A Rust panic (message on the serial console).
    pub const PANIC: u8 = 1;
    /// The boot information was missing or malformed (reason on the serial console).
    pub const BAD_BOOT_INFO: u8 = 2;
    /// A CPU exception (vector, error code and RIP on the serial console).
    pub const CPU_EXCEPTION: u8 = 3;
}

/// Role of the micro-VM image.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Virtual-switch tier on a host.
    Switch = 1,
    /// Edge tier between the cloud and the outside world.
    Edge = 2,
}

impl Role {
    pub fn from_u32(value: u32) -> Option<Role> {
        match value {
            1 => Some(Role::Switch),
            2 => Some(Role::Edge),
            _ => None,
        }
    }

    /// The role named `name` (`switch` or `edge`, as on the command line).
    pub fn from_name(name: &[u8]) -> Option<Role> {
        match name {
            b"switch" => Some(Role::Switch),
            b"edge" => Some(Role::Edge),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Switch => "switch",
            Role::Edge => "edge",
        }
    }
}

/// A `role=` command-line argument whose value is neither `switch` nor `edge`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadRoleArg;

/// The role a command line asks for: the last `role=` argument (arguments are separated by ASCII
/// whitespace; the line ends at the first NUL). `Ok(None)` when there is none.
pub fn cmdline_role(cmdline: &[u8]) -> Result<Option<Role>, BadRoleArg> {
    let line = match cmdline.iter().position(|&b| b == 0) {
        Some(end) => &cmdline[..end],
        None => cmdline,
    };
    let mut role = None;
    for arg in line.split(|b| b.is_ascii_whitespace()) {
        if let Some(value) = arg.strip_prefix(b"role=") {
            role = Some(Role::from_name(value).ok_or(BadRoleArg)?);
        }
    }
    Ok(role)
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// One virtio-mmio device window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// Interrupt line (GSI); the micro-VM polls, so this is informational.
    pub irq: u32,
    /// For a switch port: the tenant behind it (the `tenant` of its verdicts); 0 for the
    /// uplink, the port that leads out of the host; [`TENANT_UNASSIGNED`] for a port with no
    /// tenant yet. In the edge role: 0 for the outside port(s), anything else marks a cloud port
    /// (which carries many tenants, told apart by address).
    pub tenant: u32,
}

/// Vigil's boot information block (layout version [`BOOT_INFO_VERSION`]).
///
/// Layout (byte offsets, little endian): 0 magic u64, 8 version u32, 12 role u32, 16 ram_size u64,
/// 24 device_count u32, 28 flags u32 ([`BOOT_FLAG_RAM_ZEROED`]), 32 devices (8 × 24 bytes: base u64, size u64, irq u32,
/// tenant u32), 224 verdict_base u64, 232 verdict_size u64, 240 ports_base u64; 248 bytes in all.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    /// [`Role`] as its `u32` value.
    pub role: u32,
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// Valid entries at the start of `devices`.
    pub device_count: u32,
    /// [`BOOT_FLAG_RAM_ZEROED`]; other bits are 0.
    pub flags: u32,
    pub devices: [MmioDevice; MAX_MMIO_DEVICES],
    /// Guest-physical region reserved for the verdict ring (size 0: none).
    pub verdict_base: u64,
    pub verdict_size: u64,
    /// With [`BOOT_FLAG_PORTS_READY`]: where the ports' queues start ([`BootInfo::port_queues`]);
    /// 0 otherwise.
    pub ports_base: u64,
}

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_ROLE: usize = 12;
const OFF_RAM_SIZE: usize = 16;
const OFF_DEVICE_COUNT: usize = 24;
const OFF_FLAGS: usize = 28;

/// The VMM hands over RAM that is all zero but for what it wrote there (the image, this block,
/// the page tables, the verdict region): fresh anonymous memory. The micro-VM then need not
/// clear its tables, nor fault in every page of them at boot.
pub const BOOT_FLAG_RAM_ZEROED: u32 = 1 << 0;
/// The VMM takes console writes by address at [`CONSOLE_MMIO_ADDR`].
pub const BOOT_FLAG_CONSOLE_MMIO: u32 = 1 << 1;
/// The VMM has initialized every device as the micro-VM's driver would (virtio 1.2 §3.1.1:
/// VERSION_1 only, both queues [`port_queue::SIZE`] entries, DRIVER_OK set), its queues laid out
/// as [`port_queue`] says at [`BootInfo::port_queues`] in the area from
/// [`BootInfo::ports_base`]. The micro-VM then writes no device register but a queue notify: on
/// an emulating host each register access is an exit, ~36 a port, 2.6 ms of a two-port boot.
/// Set only with [`BOOT_FLAG_RAM_ZEROED`] (the rings start zero, as a driver's do).
pub const BOOT_FLAG_PORTS_READY: u32 = 1 << 2;

/// Where the micro-VM's two queues of a port (receive, then transmit) lie in guest RAM when the
/// VMM readies its ports ([`BOOT_FLAG_PORTS_READY`]): each one `BYTES` long, page aligned, its
/// descriptor table, driver (avail) and device (used) rings at these offsets, its buffers after
/// them. The micro-VM's queue type is checked against these at compile time.
pub mod port_queue {
    /// Entries per queue.
    pub const SIZE: u16 = 256;
    /// Offset of the descriptor table.
    pub const DESC: u64 = 0;
    /// Offset of the driver area (avail ring).
    pub const AVAIL: u64 = 4096;
    /// Offset of the device area (used ring).
    pub const USED: u64 = 4616;
    /// Bytes of one queue with its buffers (a multiple of the page size).
    pub const BYTES: u64 = 401_408;

    /// The guest-physical bases of port `index`'s receive and transmit queues in the area at
    /// `ports_base`.
    pub const fn bases(ports_base: u64, index: usize) -> [u64; 2] {
        let rx = ports_base + 2 * index as u64 * BYTES;
        [rx, rx + BYTES]
    }
}

/// The page-aligned base of the ports' queue area for `device_count` ports, right below the
/// verdict region at `verdict_base`; None when it does not fit below it.
pub fn ports_area_below(verdict_base: u64, device_count: usize) -> Option<u64> {
    let bytes = (2 * device_count as u64).checked_mul(port_queue::BYTES)?;
    Some(verdict_base.checked_sub(bytes)? & !0xfff)
}
const OFF_DEVICES: usize = 32;
const DEVICE_LEN: usize = core::mem::size_of::<MmioDevice>();
const OFF_VERDICT_BASE: usize = OFF_DEVICES + MAX_MMIO_DEVICES * DEVICE_LEN;
const OFF_VERDICT_SIZE: usize = OFF_VERDICT_BASE + 8;
const OFF_PORTS_BASE: usize = OFF_VERDICT_SIZE + 8;

// The documented layout and the #[repr(C)] struct must agree: VMM and guest may be built apart.
const _: () = assert!(DEVICE_LEN == 24);
const _: () = assert!(OFF_PORTS_BASE + 8 == BOOT_INFO_LEN);
const _: () = assert!(BOOT_INFO_LEN == 248);
const _: () = assert!(port_queue::BYTES.is_multiple_of(4096));

/// Why a block is not a valid [`BootInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    Truncated {
        have: usize,
        need: usize,
    },
    BadMagic(u64),
    BadVersion(u32),
    BadRole(u32),
    TooManyDevices(u32),
    /// Device `index` has size 0 or its window wraps around the address space.
    BadDevice {
        index: usize,
    },
    /// The verdict region wraps around the address space.
    BadVerdictRegion,
    /// [`BOOT_FLAG_PORTS_READY`] with a queue area that is not page aligned, wraps around the
    /// address space, or comes without [`BOOT_FLAG_RAM_ZEROED`].
    BadPortsArea,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BootInfoError::Truncated { have, need } => {
                write!(f, "boot info has {have} bytes, needs {need}")
            }
            BootInfoError::BadMagic(m) => write!(f, "bad boot info magic 0x{m:016x}"),
            BootInfoError::BadVersion(v) => write!(f, "unsupported boot info version {v}"),
            BootInfoError::BadRole(r) => write!(f, "unknown role {r}"),
            BootInfoError::TooManyDevices(n) => {
                write!(f, "{n} devices, at most {MAX_MMIO_DEVICES}")
            }
            BootInfoError::BadDevice { index } => write!(f, "device {index}: bad window"),
            BootInfoError::BadVerdictRegion => write!(f, "verdict region wraps"),
            BootInfoError::BadPortsArea => write!(f, "bad ports queue area"),
        }
    }
}

impl BootInfo {
    /// A block for `role` with `ram_size` bytes of RAM, no devices and no verdict region.
    pub fn new(role: Role, ram_size: u64) -> BootInfo {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            role: role as u32,
            ram_size,
            device_count: 0,
            flags: 0,
            devices: [MmioDevice::default(); MAX_MMIO_DEVICES],
            verdict_base: 0,
            verdict_size: 0,
            ports_base: 0,
        }
    }

    /// Appends a device; `Err` when all [`MAX_MMIO_DEVICES`] slots are taken.
    pub fn push_device(&mut self, device: MmioDevice) -> Result<(), BootInfoError> {
        let index = self.device_count as usize;
        let slot = self
            .devices
            .get_mut(index)
            .ok_or(BootInfoError::TooManyDevices(self.device_count + 1))?;
        *slot = device;
        self.device_count += 1;
        Ok(())
    }

    /// Whether `bytes` starts with [`BOOT_INFO_MAGIC`] (a block meant to be a `BootInfo`, valid or
    /// not).
    pub fn has_magic(bytes: &[u8]) -> bool {
        bytes.len() >= 8 && u64_at(bytes, OFF_MAGIC) == BOOT_INFO_MAGIC
    }

    /// Parses and validates a block. Bytes past [`BOOT_INFO_LEN`] are ignored.
    pub fn parse(bytes: &[u8]) -> Result<BootInfo, BootInfoError> {
        if bytes.len() < BOOT_INFO_LEN {
            return Err(BootInfoError::Truncated {
                have: bytes.len(),
                need: BOOT_INFO_LEN,
            });
        }
        let magic = u64_at(bytes, OFF_MAGIC);
        if magic != BOOT_INFO_MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let version = u32_at(bytes, OFF_VERSION);
        if version != BOOT_INFO_VERSION {
            return Err(BootInfoError::BadVersion(version));
        }
        let role = u32_at(bytes, OFF_ROLE);
        if Role::from_u32(role).is_none() {
            return Err(BootInfoError::BadRole(role));
        }
        let device_count = u32_at(bytes, OFF_DEVICE_COUNT);
        if device_count as usize > MAX_MMIO_DEVICES {
            return Err(BootInfoError::TooManyDevices(device_count));
        }
        let mut devices = [MmioDevice::default(); MAX_MMIO_DEVICES];
        for (index, device) in devices.iter_mut().enumerate() {
            let at = OFF_DEVICES + index * DEVICE_LEN;
            *device = MmioDevice {
                base: u64_at(bytes, at),
                size: u64_at(bytes, at + 8),
                irq: u32_at(bytes, at + 16),
                tenant: u32_at(bytes, at + 20),
            };
            let valid = device.size != 0 && device.base.checked_add(device.size).is_some();
            if index < device_count as usize && !valid {
                return Err(BootInfoError::BadDevice { index });
            }
        }
        let verdict_base = u64_at(bytes, OFF_VERDICT_BASE);
        let verdict_size = u64_at(bytes, OFF_VERDICT_SIZE);
        if verdict_base.checked_add(verdict_size).is_none() {
            return Err(BootInfoError::BadVerdictRegion);
        }
        let flags = u32_at(bytes, OFF_FLAGS);
        let ports_base = u64_at(bytes, OFF_PORTS_BASE);
        if flags & BOOT_FLAG_PORTS_READY != 0 {
            let span = 2 * u64::from(device_count) * port_queue::BYTES;
            if !ports_base.is_multiple_of(4096)
                || ports_base.checked_add(span).is_none()
                || flags & BOOT_FLAG_RAM_ZEROED == 0
            {
                return Err(BootInfoError::BadPortsArea);
            }
        }
        Ok(BootInfo {
            magic,
            version,
            role,
            ram_size: u64_at(bytes, OFF_RAM_SIZE),
            device_count,
            flags,
            devices,
            verdict_base,
            verdict_size,
            ports_base,
        })
    }

    /// The little-endian encoding [`BootInfo::parse`] reads (what the VMM writes to guest memory).
    pub fn encode(&self) -> [u8; BOOT_INFO_LEN] {
        let mut out = [0u8; BOOT_INFO_LEN];
        out[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&self.magic.to_le_bytes());
        out[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&self.version.to_le_bytes());
        out[OFF_ROLE..OFF_ROLE + 4].copy_from_slice(&self.role.to_le_bytes());
        out[OFF_RAM_SIZE..OFF_RAM_SIZE + 8].copy_from_slice(&self.ram_size.to_le_bytes());
        out[OFF_DEVICE_COUNT..OFF_DEVICE_COUNT + 4]
            .copy_from_slice(&self.device_count.to_le_bytes());
        out[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&self.flags.to_le_bytes());
        for (index, device) in self.devices.iter().enumerate() {
            let at = OFF_DEVICES + index * DEVICE_LEN;
            out[at..at + 8].copy_from_slice(&device.base.to_le_bytes());
            out[at + 8..at + 16].copy_from_slice(&device.size.to_le_bytes());
            out[at + 16..at + 20].copy_from_slice(&device.irq.to_le_bytes());
            out[at + 20..at + 24].copy_from_slice(&device.tenant.to_le_bytes());
        }
        out[OFF_VERDICT_BASE..OFF_VERDICT_BASE + 8]
            .copy_from_slice(&self.verdict_base.to_le_bytes());
        out[OFF_VERDICT_SIZE..OFF_VERDICT_SIZE + 8]
            .copy_from_slice(&self.verdict_size.to_le_bytes());
        out[OFF_PORTS_BASE..OFF_PORTS_BASE + 8].copy_from_slice(&self.ports_base.to_le_bytes());
        out
    }

    /// The role (always valid in a block returned by [`BootInfo::parse`]).
    pub fn role(&self) -> Option<Role> {
        Role::from_u32(self.role)
    }

    /// The guest-physical bases of device `index`'s receive and transmit queues, when the VMM
    /// readied the ports ([`BOOT_FLAG_PORTS_READY`]).
    pub fn port_queues(&self, index: usize) -> Option<[u64; 2]> {
        if self.flags & BOOT_FLAG_PORTS_READY == 0 || index >= self.devices().len() {
            return None;
        }
        Some(port_queue::bases(self.ports_base, index))
    }

    /// The described devices (clamped to [`MAX_MMIO_DEVICES`]).
    pub fn devices(&self) -> &[MmioDevice] {
        let count = (self.device_count as usize).min(MAX_MMIO_DEVICES);
        &self.devices[..count]
    }
}

/// Why bytes are not a usable `hvm_start_info` or table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    Truncated { have: usize, need: usize },
    BadMagic(u32),
}

impl core::fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            StartInfoError::Truncated { have, need } => {
                write!(f, "start info has {have} bytes, needs {need}")
            }
            StartInfoError::BadMagic(m) => write!(f, "bad hvm_start_info magic 0x{m:08x}"),
        }
    }
}

fn need(bytes: &[u8], len: usize) -> Result<(), StartInfoError> {
    if bytes.len() < len {
        Err(StartInfoError::Truncated {
            have: bytes.len(),
            need: len,
        })
    } else {
        Ok(())
    }
}

/// The fields of Xen's `hvm_start_info` (arch-x86/hvm/start_info.h). Addresses are guest-physical;
/// 0 means "absent". A version-0 structure has no memory map (`memmap_entries` = 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HvmStartInfo {
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

impl HvmStartInfo {
    /// Parses the structure at the start of `bytes` (at least [`HVM_START_INFO_V0_LEN`] bytes;
    /// [`HVM_START_INFO_V1_LEN`] when it claims version 1 or later).
    pub fn parse(bytes: &[u8]) -> Result<HvmStartInfo, StartInfoError> {
        need(bytes, HVM_START_INFO_V0_LEN)?;
        let magic = u32_at(bytes, 0);
        if magic != HVM_START_MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let version = u32_at(bytes, 4);
        let mut info = HvmStartInfo {
            version,
            flags: u32_at(bytes, 8),
            nr_modules: u32_at(bytes, 12),
            modlist_paddr: u64_at(bytes, 16),
            cmdline_paddr: u64_at(bytes, 24),
            rsdp_paddr: u64_at(bytes, 32),
            memmap_paddr: 0,
            memmap_entries: 0,
        };
        if version >= 1 {
            need(bytes, HVM_START_INFO_V1_LEN)?;
            info.memmap_paddr = u64_at(bytes, 40);
            info.memmap_entries = u32_at(bytes, 48);
        }
        Ok(info)
    }
}

/// One `hvm_modlist_entry`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HvmModule {
    pub paddr: u64,
    pub size: u64,
    pub cmdline_paddr: u64,
}

impl HvmModule {
    pub fn parse(bytes: &[u8]) -> Result<HvmModule, StartInfoError> {
        need(bytes, HVM_MODLIST_ENTRY_LEN)?;
        Ok(HvmModule {
            paddr: u64_at(bytes, 0),
            size: u64_at(bytes, 8),
            cmdline_paddr: u64_at(bytes, 16),
        })
    }
}

/// One `hvm_memmap_table_entry`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HvmMemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl HvmMemmapEntry {
    pub fn parse(bytes: &[u8]) -> Result<HvmMemmapEntry, StartInfoError> {
        need(bytes, HVM_MEMMAP_ENTRY_LEN)?;
        Ok(HvmMemmapEntry {
            addr: u64_at(bytes, 0),
            size: u64_at(bytes, 8),
            kind: u32_at(bytes, 16),
        })
    }
}

/// End of the highest RAM range in a packed memory map (`entries` whole entries of
/// [`HVM_MEMMAP_ENTRY_LEN`] bytes; a trailing partial entry is ignored). Ranges that wrap the
/// address space are skipped. 0 when there is no RAM entry.
pub fn memmap_ram_top(table: &[u8]) -> u64 {
    table
        .chunks_exact(HVM_MEMMAP_ENTRY_LEN)
        .filter_map(|chunk| HvmMemmapEntry::parse(chunk).ok())
        .filter(|entry| entry.kind == HVM_MEMMAP_TYPE_RAM)
        .filter_map(|entry| entry.addr.checked_add(entry.size))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    use std::vec::Vec;

    #[test]
    fn a_console_write_names_its_bytes_and_nothing_else() {
        assert_eq!(
            parse_console_write(console_write(0x1234, 5)),
            Some((0x1234, 5))
        );
        assert_eq!(
            parse_console_write(console_write(u32::MAX, CONSOLE_MAX as u32)),
            Some((u64::from(u32::MAX), CONSOLE_MAX))
        );
        assert_eq!(parse_console_write(console_write(0x1234, 0)), None);
        assert_eq!(
            parse_console_write(console_write(0x1234, CONSOLE_MAX as u32 + 1)),
            None
        );
        assert_eq!(parse_console_write(u64::MAX), None);
    }

    fn sample() -> BootInfo {
        let mut info = BootInfo::new(Role::Edge, 64 << 20);
        info.push_device(MmioDevice {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
            tenant: 0,
        })
        .unwrap();
        info.push_device(MmioDevice {
            base: 0xd000_1000,
            size: 0x1000,
            irq: 6,
            tenant: 0,
        })
        .unwrap();
        info.verdict_base = 0x0300_0000;
        info.verdict_size = 0x10_0000;
        info
    }

    #[test]
    fn boot_info_round_trips() {
        let info = sample();
        let bytes = info.encode();
        assert_eq!(bytes.len(), BOOT_INFO_LEN);
        assert!(BootInfo::has_magic(&bytes));
        let parsed = BootInfo::parse(&bytes).unwrap();
        assert_eq!(parsed, info);
        assert_eq!(parsed.role(), Some(Role::Edge));
        assert_eq!(parsed.devices().len(), 2);
        assert_eq!(parsed.devices()[1].base, 0xd000_1000);
        assert_eq!(parsed.devices()[1].irq, 6);
        // Trailing bytes (a module rounded up to a page) are ignored.
        let mut longer = Vec::from(&bytes[..]);
        longer.resize(4096, 0xaa);
        assert_eq!(BootInfo::parse(&longer).unwrap(), info);
    }

    #[test]
    fn boot_info_encoding_matches_repr_c_layout() {
        let info = sample();
        let bytes = info.encode();
        // SAFETY: BootInfo is #[repr(C)] plain data without padding (asserted by size); this
        // reads its in-memory representation, which on a little-endian host must equal the
        // documented encoding.
        let raw = unsafe {
            core::slice::from_raw_parts((&info as *const BootInfo).cast::<u8>(), BOOT_INFO_LEN)
        };
        assert_eq!(raw, &bytes[..]);
    }

    #[test]
    fn readied_ports_name_their_queues_in_the_area_and_nothing_past_it() {
        let mut info = sample();
        assert_eq!(info.port_queues(0), None, "no queues without the flag");
        let base = ports_area_below(info.verdict_base, 2).unwrap();
        assert_eq!(base % 4096, 0);
        assert!(base + 4 * port_queue::BYTES <= info.verdict_base);
        info.flags = BOOT_FLAG_RAM_ZEROED | BOOT_FLAG_PORTS_READY;
        info.ports_base = base;
        let parsed = BootInfo::parse(&info.encode()).unwrap();
        assert_eq!(
            parsed.port_queues(0),
            Some([base, base + port_queue::BYTES])
        );
        assert_eq!(
            parsed.port_queues(1),
            Some([base + 2 * port_queue::BYTES, base + 3 * port_queue::BYTES])
        );
        assert_eq!(
            parsed.port_queues(2),
            None,
            "only described devices have queues"
        );
        assert_eq!(ports_area_below(port_queue::BYTES, 1), None);

        let mut bad = info;
        bad.ports_base = base + 8;
        assert_eq!(
            BootInfo::parse(&bad.encode()),
            Err(BootInfoError::BadPortsArea)
        );
        let mut bad = info;
        bad.ports_base = !0xfff;
        assert_eq!(
            BootInfo::parse(&bad.encode()),
            Err(BootInfoError::BadPortsArea)
        );
        let mut bad = info;
        bad.flags = BOOT_FLAG_PORTS_READY;
        assert_eq!(
            BootInfo::parse(&bad.encode()),
            Err(BootInfoError::BadPortsArea)
        );
    }

    #[test]
    fn boot_info_truncated_is_an_error_at_every_length() {
        let bytes = sample().encode();
        for len in 0..BOOT_INFO_LEN {
            assert_eq!(
                BootInfo::parse(&bytes[..len]),
                Err(BootInfoError::Truncated {
                    have: len,
                    need: BOOT_INFO_LEN
                })
            );
        }
        assert!(!BootInfo::has_magic(&bytes[..7]));
    }

    #[test]
    fn boot_info_bad_fields_are_errors() {
        let good = sample().encode();

        let mut bad = good;
        bad[0] ^= 1;
        assert!(!BootInfo::has_magic(&bad));
        assert!(matches!(
            BootInfo::parse(&bad),
            Err(BootInfoError::BadMagic(_))
        ));

        let mut bad = good;
        bad[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(BootInfo::parse(&bad), Err(BootInfoError::BadVersion(1)));

        let mut bad = good;
        bad[12..16].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(BootInfo::parse(&bad), Err(BootInfoError::BadRole(7)));

        let mut bad = good;
        bad[24..28].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(BootInfo::parse(&bad), Err(BootInfoError::TooManyDevices(9)));
        bad[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            BootInfo::parse(&bad),
            Err(BootInfoError::TooManyDevices(u32::MAX))
        );

        // Device 1's window wraps the address space.
        let mut bad = good;
        bad[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            BootInfo::parse(&bad),
            Err(BootInfoError::BadDevice { index: 1 })
        );
        // A zero-sized window in an unused slot is fine; in a used one it is not.
        let mut bad = good;
        bad[64..72].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            BootInfo::parse(&bad),
            Err(BootInfoError::BadDevice { index: 1 })
        );

        let mut bad = good;
        bad[224..232].copy_from_slice(&(u64::MAX - 4).to_le_bytes());
        assert_eq!(BootInfo::parse(&bad), Err(BootInfoError::BadVerdictRegion));
    }

    #[test]
    fn push_device_stops_at_capacity() {
        let mut info = BootInfo::new(Role::Switch, 1 << 30);
        for i in 0..MAX_MMIO_DEVICES as u64 {
            info.push_device(MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                irq: 5 + i as u32,
                tenant: 0,
            })
            .unwrap();
        }
        assert!(info.push_device(MmioDevice::default()).is_err());
        assert_eq!(BootInfo::parse(&info.encode()).unwrap().devices().len(), 8);
    }

    fn start_info_bytes(version: u32) -> [u8; HVM_START_INFO_V1_LEN] {
        let mut b = [0u8; HVM_START_INFO_V1_LEN];
        b[0..4].copy_from_slice(&HVM_START_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&version.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16..24].copy_from_slice(&0x6800u64.to_le_bytes());
        b[24..32].copy_from_slice(&0x7000u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x6100u64.to_le_bytes());
        b[48..52].copy_from_slice(&3u32.to_le_bytes());
        b
    }

    #[test]
    fn start_info_parses_versions_and_rejects_garbage() {
        let v1 = HvmStartInfo::parse(&start_info_bytes(1)).unwrap();
        assert_eq!(v1.nr_modules, 1);
        assert_eq!(v1.modlist_paddr, 0x6800);
        assert_eq!(v1.cmdline_paddr, 0x7000);
        assert_eq!(v1.memmap_paddr, 0x6100);
        assert_eq!(v1.memmap_entries, 3);

        // Version 0 has no memory map, and 40 bytes are enough for it.
        let v0 = HvmStartInfo::parse(&start_info_bytes(0)[..HVM_START_INFO_V0_LEN]).unwrap();
        assert_eq!(v0.memmap_entries, 0);
        assert_eq!(v0.cmdline_paddr, 0x7000);

        assert_eq!(
            HvmStartInfo::parse(&start_info_bytes(1)[..HVM_START_INFO_V0_LEN]),
            Err(StartInfoError::Truncated {
                have: HVM_START_INFO_V0_LEN,
                need: HVM_START_INFO_V1_LEN
            })
        );
        let mut bad = start_info_bytes(1);
        bad[0] = 0;
        assert!(matches!(
            HvmStartInfo::parse(&bad),
            Err(StartInfoError::BadMagic(_))
        ));
        assert!(HvmStartInfo::parse(&[]).is_err());
    }

    #[test]
    fn memmap_top_takes_the_highest_ram_range() {
        let mut table = Vec::new();
        for (addr, size, kind) in [
            (0u64, 0x9fc00u64, 1u32),
            (0xe0000, 0x20000, 2),
            (0x10_0000, (64 << 20) - 0x10_0000, 1),
            (0xfee0_0000, 0x1000, 2),
            (u64::MAX - 1, 16, 1), // wraps: ignored
        ] {
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&size.to_le_bytes());
            table.extend_from_slice(&kind.to_le_bytes());
            table.extend_from_slice(&0u32.to_le_bytes());
        }
        assert_eq!(memmap_ram_top(&table), 64 << 20);
        // A partial trailing entry is ignored, not read past.
        assert_eq!(memmap_ram_top(&table[..HVM_MEMMAP_ENTRY_LEN + 5]), 0x9fc00);
        assert_eq!(memmap_ram_top(&[]), 0);
        let module = HvmModule::parse(&[0u8; 31]);
        assert!(module.is_err());
    }

    #[test]
    fn cmdline_role_finds_the_argument() {
        assert_eq!(cmdline_role(b""), Ok(None));
        assert_eq!(cmdline_role(b"console=ttyS0"), Ok(None));
        assert_eq!(cmdline_role(b"role=edge"), Ok(Some(Role::Edge)));
        assert_eq!(
            cmdline_role(b"quiet  role=switch\tx=1"),
            Ok(Some(Role::Switch))
        );
        assert_eq!(
            cmdline_role(b"role=edge role=switch"),
            Ok(Some(Role::Switch))
        );
        // Everything after a NUL is not part of the line.
        assert_eq!(cmdline_role(b"a\0role=edge"), Ok(None));
        assert_eq!(cmdline_role(b"role=router"), Err(BadRoleArg));
        assert_eq!(cmdline_role(b"role="), Err(BadRoleArg));
        assert_eq!(cmdline_role(b"xrole=edge"), Ok(None));
    }
}
