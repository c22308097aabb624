//! Boot information the VMM hands to the firewall micro-VM.
//!
//! The micro-VM is started through the PVH entry (32-bit protected mode, paging off) with EBX
//! pointing at a `hvm_start_info` (Xen's public `arch-x86/hvm/start_info.h`, version 1). That
//! structure carries the command line and the memory map; Vigil's own typed boot information rides
//! in the first module of its module list so that a VMM which does not know Vigil (QEMU) can boot the
//! same ELF with defaults taken from the command line.

/// Magic of Vigil's boot information block ("VIGILBOOT" truncated to 8 bytes, little endian).
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VIGILBT1");

/// Magic of `hvm_start_info` (Xen `XEN_HVM_START_MAGIC_VALUE`).
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

/// I/O port the micro-VM writes a one-byte exit code to when it stops (same port as QEMU's
/// `isa-debug-exit` default, so `-device isa-debug-exit` ends a QEMU run the same way).
pub const EXIT_PORT: u16 = 0xf4;

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

    pub fn name(self) -> &'static str {
        match self {
            Role::Switch => "switch",
            Role::Edge => "edge",
        }
    }
}
