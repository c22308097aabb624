//! Extraction of the ELF vmlinux from a bzImage on the host (the guest never runs its own
//! decompressor: under an emulating KVM that costs ~90 s of ring-0 emulation).
