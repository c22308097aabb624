//! Guest-physical memory layout shared by every VM the VMM builds.
//!
//! ```text
//! 0x0000_0000  real-mode area, left empty
//! 0x0000_6000  PVH hvm_start_info (+ memory map, module list)
//! 0x0000_7000  kernel command line (up to CMDLINE_MAX bytes)
//! 0x0000_9000  Vigil boot information block (micro-VM only)
//! 0x000e_0000  ACPI tables (RSDP first), 128 KiB, reserved in the memory map
//! 0x0010_0000  RAM usable by the guest; kernels load at their ELF physical addresses
//! ...          initramfs, placed high below the end of RAM
//! 0xd000_0000  virtio-mmio device windows, MMIO_DEVICE_SIZE each
//! 0xfec0_0000  IOAPIC
//! 0xfee0_0000  local APIC
//! ```
//!
//! Owns: these addresses and sizes, the interrupt lines of the devices, and the flat segment
//! descriptors that PVH entry and the syscall fix load.
//! Must not: hold anything per VM or touch guest memory.

/// Where the PVH `hvm_start_info` lives.
pub const PVH_INFO_START: u64 = 0x6000;
/// Memory-map entries follow the start info in the same page.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Module list entries (initramfs, Vigil boot info).
pub const PVH_MODLIST_START: u64 = 0x6800;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x7000;
/// Longest command line we accept (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX: usize = 2048;
/// Vigil's typed boot information for the micro-VM.
pub const VIGIL_BOOT_INFO_START: u64 = 0x9000;
/// ACPI tables; the RSDP is written first.
pub const ACPI_START: u64 = 0x000e_0000;
/// Size of the ACPI region.
pub const ACPI_SIZE: u64 = 0x2_0000;
/// First byte of RAM the guest may use freely.
pub const HIGH_RAM_START: u64 = 0x0010_0000;
/// Start of the 32-bit MMIO hole; guest RAM ends below it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// The most RAM a VM may have: everything must fit below the MMIO hole.
pub const MAX_RAM: u64 = MMIO_HOLE_START;
/// The least RAM we let a VM start with.
pub const MIN_RAM: u64 = 4 << 20;
/// GSI of the first virtio-mmio device; device `i` uses `VIRTIO_FIRST_GSI + i`.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Largest number of virtio-mmio devices per VM (GSIs 5..=23 on the IOAPIC).
pub const VIRTIO_MAX_DEVICES: u32 = 19;
/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;

/// Guest-physical window of virtio-mmio device number `index`.
pub fn virtio_mmio_window(index: u32) -> (u64, u64) {
    (
        VIRTIO_MMIO_START + u64::from(index) * MMIO_DEVICE_SIZE,
        MMIO_DEVICE_SIZE,
    )
}

/// A flat (base 0, 4 GiB limit, page granular), present, ring-0 segment: what PVH entry and the
/// `syscall` fix load. `type_` is the descriptor type (0xb: code, execute/read, accessed; 0x3: data,
/// read/write, accessed); `long` sets L (64-bit code), `default_big` sets D/B.
pub fn flat_segment(
    selector: u16,
    type_: u8,
    long: bool,
    default_big: bool,
) -> kvm_bindings::kvm_segment {
    kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(default_big),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}
