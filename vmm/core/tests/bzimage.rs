//! bzImage → vmlinux extraction: synthetic images for every payload compression and for broken
//! inputs, then the real Debian cloud kernel and initramfs that scripts/build-tenant-image
//! produces (those tests fail, not skip, when the tenant image has not been built).

use std::io::Write;
use std::path::PathBuf;

use vmm_core::boot::bzimage::{
    detect_compression, extract_vmlinux, extract_vmlinux_with_limit, inspect, kernel_release,
    Compression, KernelImageError,
};

// ---------------------------------------------------------------------------------------------
// Synthetic images

/// A minimal ELF64 x86-64 executable header followed by `body` (enough for the checks made on
/// the decompressed payload).
fn fake_elf(body: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // ELFDATA2LSB
    elf[6] = 1; // EV_CURRENT
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[24..32].copy_from_slice(&0x0100_0000u64.to_le_bytes()); // e_entry
    elf.extend_from_slice(body);
    elf
}

/// Compressible but not trivial content, starting with a kernel-style banner.
fn body(len: usize) -> Vec<u8> {
    let mut b = b"Linux version 9.9.9-test (x) #1 SMP\0".to_vec();
    b.extend((b.len()..len).map(|i| (i / 97 + i % 13) as u8));
    b
}

/// The kernel's `cmd_lz4_with_size` stream without the trailer: the legacy magic then
/// [u32 LE size][block] per 8 MiB of input.
fn lz4_legacy(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x02, 0x21, 0x4c, 0x18];
    for chunk in data.chunks(8 << 20) {
        let block = lz4_flex::block::compress(chunk);
        out.extend_from_slice(&(block.len() as u32).to_le_bytes());
        out.extend_from_slice(&block);
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// As scripts/xz_wrap.sh does for x86: x86 BCJ filter, LZMA2, CRC32 check.
fn xz(data: &[u8]) -> Vec<u8> {
    let opts = xz2::stream::LzmaOptions::new_preset(1).unwrap();
    let mut filters = xz2::stream::Filters::new();
    filters.x86().lzma2(&opts);
    let stream =
        xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc32).unwrap();
    let mut enc = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// The payload as the kernel build lays it out: the stream, then the uncompressed size (LE), except
/// for gzip whose own ISIZE trailer is that size.
fn payload(codec: Compression, data: &[u8]) -> Vec<u8> {
    let mut p = match codec {
        Compression::Lz4Legacy => lz4_legacy(data),
        Compression::Gzip => return gzip(data),
        Compression::Xz => xz(data),
        Compression::Zstd => zstd(data),
    };
    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
    p
}

/// A bzImage with `setup_sects` setup sectors, a version string, and `payload` placed 0x40 bytes
/// into the protected-mode part (as in real kernels, where it sits after the decompressor's head).
fn bzimage(setup_sects: u8, payload: &[u8]) -> Vec<u8> {
    let sects = if setup_sects == 0 {
        4
    } else {
        setup_sects as usize
    };
    let pm = (sects + 1) * 512;
    let mut img = vec![0u8; pm + 0x40];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    let version = b"9.9.9-test (builder@example) #1 SMP\0";
    img[0x280..0x280 + version.len()].copy_from_slice(version);
    img[0x20e..0x210].copy_from_slice(&0x80u16.to_le_bytes()); // 0x200 + 0x80
    img[0x248..0x24c].copy_from_slice(&0x40u32.to_le_bytes());
    img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    img.extend_from_slice(payload);
    img.extend_from_slice(&[0xcc; 100]); // the decompressor's code after the payload
    img
}

const ALL: [Compression; 4] = [
    Compression::Lz4Legacy,
    Compression::Gzip,
    Compression::Xz,
    Compression::Zstd,
];

#[test]
fn every_compression_round_trips() {
    let elf = fake_elf(&body(300_000));
    for codec in ALL {
        for setup_sects in [0u8, 1, 39] {
            let img = bzimage(setup_sects, &payload(codec, &elf));
            let info = inspect(&img).unwrap_or_else(|e| panic!("{codec}: {e}"));
            assert_eq!(info.compression, codec);
            assert_eq!(info.uncompressed_size, elf.len() as u64);
            let out = extract_vmlinux(&img).unwrap_or_else(|e| panic!("{codec}: {e}"));
            assert!(out == elf, "{codec}: extracted bytes differ");
            assert_eq!(kernel_release(&img).as_deref(), Some("9.9.9-test"));
        }
    }
}

#[test]
fn lz4_spanning_several_blocks() {
    // 8 MiB blocks: 9 MiB of input gives two blocks, as a real kernel gives seven.
    let elf = fake_elf(&body(9 << 20));
    let img = bzimage(39, &payload(Compression::Lz4Legacy, &elf));
    assert!(extract_vmlinux(&img).unwrap() == elf);
}

#[test]
fn an_elf_is_returned_unchanged_and_its_release_read_from_the_banner() {
    let elf = fake_elf(&body(5000));
    assert!(extract_vmlinux(&elf).unwrap() == elf);
    assert_eq!(kernel_release(&elf).as_deref(), Some("9.9.9-test"));
}

#[test]
fn a_foreign_elf_is_refused() {
    let mut elf = fake_elf(&body(100));
    elf[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    let err = extract_vmlinux(&elf).unwrap_err();
    assert!(matches!(err, KernelImageError::NotElf(_)), "{err}");
    assert!(err.to_string().contains("e_machine 183"), "{err}");
    // The same as the payload of a bzImage.
    let img = bzimage(1, &payload(Compression::Gzip, &elf));
    assert!(matches!(
        extract_vmlinux(&img),
        Err(KernelImageError::NotElf(_))
    ));
}

#[test]
fn a_payload_that_is_not_elf_is_refused() {
    let text = body(4096);
    for codec in ALL {
        let err = extract_vmlinux(&bzimage(1, &payload(codec, &text))).unwrap_err();
        assert!(
            err.to_string().contains("not an x86-64 ELF executable"),
            "{codec}: {err}"
        );
    }
}

#[test]
fn garbage_is_not_a_bzimage() {
    for input in [&b""[..], b"MZ", &[0u8; 4096], &body(100_000)] {
        let err = extract_vmlinux(input).unwrap_err();
        assert!(matches!(err, KernelImageError::NotBzImage(_)), "{err}");
    }
    let mut img = bzimage(1, &payload(Compression::Gzip, &fake_elf(b"")));
    img[0x1fe] = 0;
    let err = extract_vmlinux(&img).unwrap_err();
    assert!(err.to_string().contains("boot_flag"), "{err}");
}

#[test]
fn old_boot_protocol_is_refused() {
    let mut img = bzimage(1, &payload(Compression::Gzip, &fake_elf(b"")));
    img[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    assert_eq!(
        extract_vmlinux(&img),
        Err(KernelImageError::ProtocolTooOld(0x0206))
    );
    assert!(KernelImageError::ProtocolTooOld(0x0206)
        .to_string()
        .contains("2.06"));
}

#[test]
fn unsupported_compression_names_its_magic() {
    let mut p = b"BZh91AY&SY".to_vec();
    p.extend_from_slice(&100u32.to_le_bytes());
    let err = extract_vmlinux(&bzimage(1, &p)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported payload compression bzip2 (first bytes 42 5a 68 39 31 41)"
    );
    let err = extract_vmlinux(&bzimage(1, &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported payload compression (unknown) (first bytes de ad be ef 00 00)"
    );
}

#[test]
fn truncated_images_say_what_is_missing() {
    let elf = fake_elf(&body(50_000));
    for codec in ALL {
        let img = bzimage(3, &payload(codec, &elf));
        // Cut inside the payload: the header's payload_length no longer fits.
        let info = inspect(&img).unwrap();
        let cut = &img[..info.payload_start + info.payload_len / 2];
        match extract_vmlinux(cut) {
            Err(KernelImageError::Truncated {
                what, start, end, ..
            }) => {
                assert_eq!(what, "compressed payload");
                assert_eq!(start, info.payload_start as u64);
                assert_eq!(end, (info.payload_start + info.payload_len) as u64);
            }
            other => panic!("{codec}: {other:?}"),
        }
        // Cut inside the setup header.
        assert!(matches!(
            extract_vmlinux(&img[..0x240]),
            Err(KernelImageError::Truncated {
                what: "setup header",
                ..
            })
        ));
    }
}

#[test]
fn a_stream_cut_short_inside_a_consistent_header_fails_to_decompress() {
    // The header is rewritten to match the shortened payload, so only the decoder can notice.
    let elf = fake_elf(&body(200_000));
    for codec in ALL {
        let mut p = payload(codec, &elf);
        let trailer = p.split_off(p.len() - 4);
        p.truncate(p.len() / 2);
        p.extend_from_slice(&trailer);
        let err = extract_vmlinux(&bzimage(1, &p)).unwrap_err();
        assert!(
            matches!(
                err,
                KernelImageError::Decompress { .. } | KernelImageError::SizeMismatch { .. }
            ),
            "{codec}: {err}"
        );
    }
}

#[test]
fn corrupt_streams_give_errors_not_panics() {
    let elf = fake_elf(&body(100_000));
    for codec in ALL {
        let clean = payload(codec, &elf);
        // Flip bytes at several places in the stream (not the magic, not the trailer).
        for frac in [3usize, 5, 7, 11] {
            let mut p = clean.clone();
            let at = 8 + (p.len() - 16) / frac;
            for b in &mut p[at..at + 8] {
                *b ^= 0x5a;
            }
            match extract_vmlinux(&bzimage(1, &p)) {
                // Some corruptions land in literals and still produce bytes of the right length;
                // a real decoder with a checksum (gzip, xz) catches them, LZ4 legacy has none.
                Ok(out) => assert_eq!(codec, Compression::Lz4Legacy, "{codec}: {}", out.len()),
                Err(
                    KernelImageError::Decompress { .. }
                    | KernelImageError::SizeMismatch { .. }
                    | KernelImageError::NotElf(_),
                ) => {}
                Err(other) => panic!("{codec}: unexpected {other}"),
            }
        }
    }
}

#[test]
fn size_trailer_mismatch_is_reported() {
    let elf = fake_elf(&body(10_000));
    for codec in [Compression::Lz4Legacy, Compression::Xz, Compression::Zstd] {
        let mut p = payload(codec, &elf);
        let n = p.len();
        // Claim one byte less than the stream holds: the decoder is stopped at the claim.
        p[n - 4..].copy_from_slice(&(elf.len() as u32 - 1).to_le_bytes());
        match extract_vmlinux(&bzimage(1, &p)) {
            Err(KernelImageError::SizeMismatch { expected, .. }) => {
                assert_eq!(expected, elf.len() as u64 - 1)
            }
            other => panic!("{codec}: {other:?}"),
        }
        // Claim more: the stream ends early.
        p[n - 4..].copy_from_slice(&(elf.len() as u32 + 1).to_le_bytes());
        match extract_vmlinux(&bzimage(1, &p)) {
            Err(KernelImageError::SizeMismatch {
                expected, actual, ..
            }) => {
                assert_eq!((expected, actual), (elf.len() as u64 + 1, elf.len() as u64))
            }
            other => panic!("{codec}: {other:?}"),
        }
    }
}

#[test]
fn the_size_limit_is_checked_before_decompressing() {
    let elf = fake_elf(&body(100_000));
    for codec in ALL {
        let img = bzimage(1, &payload(codec, &elf));
        assert_eq!(
            extract_vmlinux_with_limit(&img, 4096),
            Err(KernelImageError::TooLarge {
                limit: 4096,
                claimed: elf.len() as u64
            })
        );
    }
    // A claim of 4 GiB - 1 exceeds the default 1 GiB cap without allocating anything.
    let mut p = payload(Compression::Lz4Legacy, &elf);
    let n = p.len();
    p[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        extract_vmlinux(&bzimage(1, &p)),
        Err(KernelImageError::TooLarge { .. })
    ));
}

#[test]
fn a_decompression_bomb_stops_at_the_claimed_size() {
    // 16 MiB of zeros compresses to ~16 KiB of gzip; the header claims 1 MiB.
    let zeros = vec![0u8; 16 << 20];
    let mut p = gzip(&zeros);
    let n = p.len();
    p[n - 4..].copy_from_slice(&(1u32 << 20).to_le_bytes());
    match extract_vmlinux(&bzimage(1, &p)) {
        Err(KernelImageError::SizeMismatch { actual, .. }) => assert_eq!(actual, (1 << 20) + 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn header_fields_pointing_anywhere_never_panic() {
    let img = bzimage(1, &payload(Compression::Lz4Legacy, &fake_elf(&body(3000))));
    for field in [0x1f1usize, 0x20e, 0x248, 0x24c] {
        for value in [0u32, 1, 0x7fff, 0xffff, 0x7fff_ffff, u32::MAX] {
            let mut bad = img.clone();
            let width = if field == 0x1f1 {
                1
            } else if field == 0x20e {
                2
            } else {
                4
            };
            bad[field..field + width].copy_from_slice(&value.to_le_bytes()[..width]);
            let _ = extract_vmlinux(&bad);
            let _ = kernel_release(&bad);
        }
    }
    assert!(detect_compression(&[0x02, 0x21]).is_err());
}

// ---------------------------------------------------------------------------------------------
// The real tenant image

fn tenant_dir() -> PathBuf {
    match std::env::var_os("VIGIL_TENANT_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/tenant"),
    }
}

fn tenant_file(name: &str) -> Vec<u8> {
    let path = tenant_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/build-tenant-image first",
            path.display()
        )
    })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Section name → (offset, size), from the section header table (gABI "Sections").
fn sections(elf: &[u8]) -> Vec<(String, usize, usize, u32)> {
    let shoff = u64_at(elf, 0x28) as usize;
    let shentsize = u16_at(elf, 0x3a) as usize;
    let shnum = u16_at(elf, 0x3c) as usize;
    let shstrndx = u16_at(elf, 0x3e) as usize;
    let sh = |i: usize| &elf[shoff + i * shentsize..shoff + (i + 1) * shentsize];
    let strtab_off = u64_at(sh(shstrndx), 0x18) as usize;
    (0..shnum)
        .map(|i| {
            let s = sh(i);
            let name_off = strtab_off + u32_at(s, 0) as usize;
            let name_len = elf[name_off..].iter().position(|&b| b == 0).unwrap();
            (
                String::from_utf8_lossy(&elf[name_off..name_off + name_len]).into_owned(),
                u64_at(s, 0x18) as usize,
                u64_at(s, 0x20) as usize,
                u32_at(s, 4),
            )
        })
        .collect()
}

/// The descriptor of the first note with `name` and `ntype` in any SHT_NOTE section.
fn find_note(elf: &[u8], name: &[u8], ntype: u32) -> Option<Vec<u8>> {
    const SHT_NOTE: u32 = 7;
    let align4 = |n: usize| (n + 3) & !3;
    for (_, off, size, kind) in sections(elf) {
        if kind != SHT_NOTE {
            continue;
        }
        let notes = &elf[off..off + size];
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = u32_at(notes, at) as usize;
            let descsz = u32_at(notes, at + 4) as usize;
            let t = u32_at(notes, at + 8);
            let name_at = at + 12;
            let desc_at = name_at + align4(namesz);
            let n = &notes[name_at..name_at + namesz];
            if t == ntype && n.strip_suffix(b"\0").unwrap_or(n) == name {
                return Some(notes[desc_at..desc_at + descsz].to_vec());
            }
            at = desc_at + align4(descsz);
        }
    }
    None
}

#[test]
fn real_debian_kernel_extracts_to_a_pvh_bootable_vmlinux() {
    let vmlinuz = tenant_file("vmlinuz");
    let info = inspect(&vmlinuz).expect("the Debian kernel's setup header");
    assert_eq!(info.compression, Compression::Lz4Legacy);
    let started = std::time::Instant::now();
    let elf = extract_vmlinux(&vmlinuz).expect("extracting the Debian kernel");
    let took = started.elapsed();
    assert_eq!(elf.len() as u64, info.uncompressed_size);

    let entry = u64_at(&elf, 0x18);
    // XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h) = 18: the PVH 32-bit entry.
    let pvh = find_note(&elf, b"Xen", 18).expect("PVH note (Xen, type 18)");
    let pvh_entry = match pvh.len() {
        4 => u64::from(u32_at(&pvh, 0)),
        8 => u64_at(&pvh, 0),
        n => panic!("PVH note descriptor of {n} bytes"),
    };
    let secs = sections(&elf);
    let btf = secs
        .iter()
        .find(|(name, ..)| name == ".BTF")
        .expect(".BTF section");
    // BTF header magic 0xeB9F (include/uapi/linux/btf.h).
    assert_eq!(
        u16_at(&elf, btf.1),
        0xeb9f,
        ".BTF does not start with BTF magic"
    );
    assert!(
        pvh_entry > 0 && pvh_entry < 1 << 32,
        "PVH entry {pvh_entry:#x}"
    );

    let release = kernel_release(&vmlinuz).expect("kernel_version string");
    assert_eq!(kernel_release(&elf).as_deref(), Some(release.as_str()));
    println!(
        "{release}: {} -> {} bytes in {took:?}; entry {entry:#x}, PVH entry {pvh_entry:#x}, \
         .BTF {} bytes",
        vmlinuz.len(),
        elf.len(),
        btf.2
    );

    // The script's outputs agree with this extraction.
    let script_release = String::from_utf8(tenant_file("kernel.release")).unwrap();
    assert_eq!(script_release.trim(), release);
    assert!(
        tenant_file("vmlinux") == elf,
        "build/tenant/vmlinux differs from the extraction of build/tenant/vmlinuz"
    );
}

/// One newc entry (`cpio(5)`, "New ASCII Format"; the kernel's init/initramfs.c reads the same).
struct CpioEntry {
    name: String,
    mode: u32,
    data: Vec<u8>,
}

fn parse_newc(archive: &[u8]) -> Vec<CpioEntry> {
    let hex = |field: &[u8]| u32::from_str_radix(std::str::from_utf8(field).unwrap(), 16).unwrap();
    let pad4 = |n: usize| (n + 3) & !3;
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let h = &archive[at..at + 110];
        assert_eq!(&h[..6], b"070701", "bad newc magic at offset {at}");
        let mode = hex(&h[14..22]);
        let filesize = hex(&h[54..62]) as usize;
        let namesize = hex(&h[94..102]) as usize;
        let name_bytes = &archive[at + 110..at + 110 + namesize];
        assert_eq!(
            name_bytes.last(),
            Some(&0),
            "name not NUL-terminated at {at}"
        );
        let name = String::from_utf8(name_bytes[..namesize - 1].to_vec()).unwrap();
        let data_at = pad4(at + 110 + namesize);
        let data = archive[data_at..data_at + filesize].to_vec();
        at = pad4(data_at + filesize);
        if name == "TRAILER!!!" {
            // Only zero padding may follow.
            assert!(archive[at.min(archive.len())..].iter().all(|&b| b == 0));
            return entries;
        }
        entries.push(CpioEntry { name, mode, data });
    }
}

#[test]
fn real_initramfs_is_a_well_formed_uncompressed_newc_archive() {
    let cpio = tenant_file("initramfs.cpio");
    let entries = parse_newc(&cpio);
    let get = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing from initramfs.cpio"))
    };
    const S_IFMT: u32 = 0o170000;
    const S_IFREG: u32 = 0o100000;
    const S_IFLNK: u32 = 0o120000;
    let init = get("init");
    assert_eq!(init.mode & S_IFMT, S_IFREG);
    assert_ne!(init.mode & 0o111, 0, "/init is not executable");
    assert!(init.data.starts_with(b"#!/bin/sh"));
    let busybox = get("bin/busybox");
    assert!(busybox.data.starts_with(b"\x7fELF"));
    let sh = get("bin/sh");
    assert_eq!(sh.mode & S_IFMT, S_IFLNK);
    let release = String::from_utf8(tenant_file("kernel.release")).unwrap();
    for module in [
        "virtio",
        "virtio_ring",
        "virtio_mmio",
        "failover",
        "net_failover",
        "virtio_net",
    ] {
        let ko = entries
            .iter()
            .find(|e| {
                e.name.starts_with("lib/modules/") && e.name.ends_with(&format!("/{module}.ko"))
            })
            .unwrap_or_else(|| panic!("{module}.ko missing from initramfs.cpio"));
        assert!(
            ko.data.starts_with(b"\x7fELF"),
            "{module}.ko is not an ELF (compressed?)"
        );
        assert!(
            ko.name.contains(release.trim()),
            "{} is not under lib/modules/{}",
            ko.name,
            release.trim()
        );
    }
    println!(
        "initramfs.cpio: {} bytes, {} entries",
        cpio.len(),
        entries.len()
    );
}
