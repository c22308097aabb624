//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) that describe the vCPUs, the interrupt controllers and
//! the virtio-mmio devices ("LNRO0005"), because Debian's kernel lacks
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`.
