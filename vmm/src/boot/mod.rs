//! Boot: kernel image extraction and loading, PVH start info, initramfs.

pub mod bzimage;
