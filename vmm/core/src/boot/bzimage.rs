//! Extraction of the ELF vmlinux from a bzImage on the host (the guest never runs its own
//! decompressor: under an emulating KVM that costs ~90 s of ring-0 emulation).
//!
//! Owns: parsing the x86 boot protocol's setup header just far enough to find the compressed
//! payload, decompressing it (LZ4 legacy frame, gzip, xz, zstd), and checking that the result is
//! an x86-64 ELF executable.
//! Must not: trust the image. Every offset is bounds-checked, the decompressed size is capped, and
//! no input makes this module panic or allocate without bound.
//!
//! Layout (Linux `Documentation/arch/x86/boot.rst`, `arch/x86/boot/header.S`,
//! `arch/x86/boot/compressed/mkpiggy.c`): the real-mode setup occupies `setup_sects + 1` sectors of
//! 512 bytes; the protected-mode code follows. `payload_offset`/`payload_length` locate the
//! compressed `vmlinux.bin` relative to that protected-mode start. The payload is produced by the
//! kernel's `cmd_<codec>_with_size` rules (gzip: plain `cmd_gzip`, whose ISIZE field plays the same
//! role), so its last 4 bytes are the uncompressed size (LE).
//! The decompressed data is `objcopy -S vmlinux` (an ELF, stripped of symbols but keeping
//! `.notes` and `.BTF`), followed by the relocation table when KASLR is configured.

use std::fmt;
use std::io::Read;

use thiserror::Error;

/// Default cap on the decompressed kernel. Real kernels are tens of MiB; anything claiming more
/// than this is treated as hostile.
pub const DEFAULT_MAX_DECOMPRESSED: u64 = 1 << 30;

// Setup header offsets, from the start of the file (boot.rst, "The Real-Mode Kernel Header").
const OFF_SETUP_SECTS: usize = 0x1f1;
const OFF_BOOT_FLAG: usize = 0x1fe;
const OFF_HEADER: usize = 0x202;
const OFF_VERSION: usize = 0x206;
const OFF_KERNEL_VERSION: usize = 0x20e;
const OFF_PAYLOAD_OFFSET: usize = 0x248;
const OFF_PAYLOAD_LENGTH: usize = 0x24c;
/// End of the last header field this module reads (`payload_length`).
const SETUP_HEADER_END: usize = OFF_PAYLOAD_LENGTH + 4;
const BOOT_FLAG: u16 = 0xaa55;
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
/// `payload_offset`/`payload_length` exist from boot protocol 2.08 on.
const MIN_PROTOCOL_WITH_PAYLOAD: u16 = 0x0208;
/// boot.rst: "If this field is 0, the real value is 4" (very old boot loaders' assumption).
const SETUP_SECTS_IF_ZERO: usize = 4;
const SECTOR_SIZE: usize = 512;
/// `kernel_version` is a pointer into the setup code, relative to 0x200 (boot.rst, "kernel_version").
const KERNEL_VERSION_BASE: usize = 0x200;
/// Longest version string we read (the Debian one is ~110 bytes).
const MAX_VERSION_STRING: usize = 512;

// Compression magics (lib/decompress.c `compressed_formats[]`, and each format's spec).
/// LZ4 legacy frame (`ARCHIVE_MAGICNUMBER` 0x184C2102 in lib/decompress_unlz4.c), LE on disk.
const MAGIC_LZ4_LEGACY: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// gzip, RFC 1952 ID1 ID2.
const MAGIC_GZIP: [u8; 2] = [0x1f, 0x8b];
/// xz, ".xz File Format" 2.1.1.1 Header Magic Bytes.
const MAGIC_XZ: [u8; 6] = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
/// zstd frame magic 0xFD2FB528, RFC 8878 3.1.1, LE on disk.
const MAGIC_ZSTD: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Formats the kernel supports that we do not decode; named in the error so the user knows why.
const KNOWN_UNSUPPORTED: &[(&[u8], &str)] = &[
    (b"BZh", "bzip2"),
    (&[0x5d, 0x00, 0x00], "lzma"),
    (&[0x89, 0x4c, 0x5a, 0x4f], "lzo"),
];

/// lib/decompress_unlz4.c: each legacy-frame block decompresses to at most `LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE`.
const LZ4_LEGACY_BLOCK_MAX: usize = 8 << 20;
/// LZ4_COMPRESSBOUND(8 MiB) (lz4.h: `isize + isize/255 + 16`); a larger block size is corrupt.
const LZ4_LEGACY_COMPRESSED_MAX: usize = LZ4_LEGACY_BLOCK_MAX + LZ4_LEGACY_BLOCK_MAX / 255 + 16;

/// liblzma decoder memory limit: room for the largest dictionary a kernel build uses (32 MiB)
/// several times over.
const XZ_MEMLIMIT: u64 = 256 << 20;

// ELF identification (System V gABI, "ELF Header"; x86-64 psABI for EM_X86_64).
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const ELF64_EHDR_SIZE: usize = 64;

/// A payload compression format this module can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Lz4Legacy,
    Gzip,
    Xz,
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Lz4Legacy => "LZ4 (legacy frame)",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KernelImageError {
    #[error("not a bzImage (or x86-64 ELF kernel): {0}")]
    NotBzImage(String),
    #[error(
        "boot protocol {:x}.{:02x} is too old: the payload location needs 2.08 or later",
        .0 >> 8,
        .0 & 0xff
    )]
    ProtocolTooOld(u16),
    #[error("image truncated: {what} needs bytes {start}..{end} but the image is {len} bytes")]
    Truncated {
        what: &'static str,
        start: u64,
        end: u64,
        len: usize,
    },
    #[error("unsupported payload compression {name} (first bytes {magic})")]
    UnsupportedCompression { name: &'static str, magic: String },
    #[error("{codec} decompression failed: {detail}")]
    Decompress { codec: Compression, detail: String },
    #[error(
        "the decompressed kernel would exceed the {limit}-byte limit (claimed {claimed} bytes)"
    )]
    TooLarge { limit: u64, claimed: u64 },
    #[error("{codec} payload decompressed to {actual} bytes but its size trailer says {expected}")]
    SizeMismatch {
        codec: Compression,
        expected: u64,
        actual: u64,
    },
    #[error("the decompressed payload is not an x86-64 ELF executable: {0}")]
    NotElf(String),
}

/// What the setup header says about the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BzImageInfo {
    /// Boot protocol version (e.g. 0x020f for 2.15).
    pub protocol: u16,
    /// File offset of the protected-mode code.
    pub protected_mode_start: usize,
    /// File offset and length of the compressed payload (including its 4-byte size trailer).
    pub payload_start: usize,
    pub payload_len: usize,
    pub compression: Compression,
    /// The uncompressed size from the payload's trailer.
    pub uncompressed_size: u64,
}

/// Returns the ELF vmlinux inside `image`: an x86-64 ELF is returned as it is, a bzImage is
/// decompressed (capped at [`DEFAULT_MAX_DECOMPRESSED`]).
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, KernelImageError> {
    extract_vmlinux_with_limit(image, DEFAULT_MAX_DECOMPRESSED)
}

/// [`extract_vmlinux`] with an explicit cap on the decompressed size.
pub fn extract_vmlinux_with_limit(image: &[u8], limit: u64) -> Result<Vec<u8>, KernelImageError> {
    if image.starts_with(ELF_MAGIC) {
        check_elf(image)?;
        return Ok(image.to_vec());
    }
    let info = inspect(image)?;
    if info.uncompressed_size > limit {
        return Err(KernelImageError::TooLarge {
            limit,
            claimed: info.uncompressed_size,
        });
    }
    let payload = &image[info.payload_start..info.payload_start + info.payload_len];
    // The size trailer is appended after the stream (`cmd_*_with_size`), except for gzip, whose
    // own ISIZE field is the last 4 bytes (the kernel builds it with plain `cmd_gzip`). The claimed
    // size becomes the decompression limit, so a stream that inflates past its claim stops there.
    let stream = match info.compression {
        Compression::Gzip => payload,
        _ => &payload[..payload.len() - 4],
    };
    let out = decompress(info.compression, stream, info.uncompressed_size)?;
    if out.len() as u64 != info.uncompressed_size {
        return Err(KernelImageError::SizeMismatch {
            codec: info.compression,
            expected: info.uncompressed_size,
            actual: out.len() as u64,
        });
    }
    check_elf(&out)?;
    Ok(out)
}

/// Parses the setup header and locates and identifies the payload, without decompressing.
pub fn inspect(image: &[u8]) -> Result<BzImageInfo, KernelImageError> {
    if image.len() < OFF_HEADER + 4 {
        return Err(KernelImageError::NotBzImage(format!(
            "{} bytes is too short to hold a setup header",
            image.len()
        )));
    }
    if &image[OFF_HEADER..OFF_HEADER + 4] != HEADER_MAGIC {
        return Err(KernelImageError::NotBzImage(
            "no \"HdrS\" magic at offset 0x202 and no ELF magic at offset 0".to_string(),
        ));
    }
    let boot_flag = le16(image, OFF_BOOT_FLAG).unwrap_or(0);
    if boot_flag != BOOT_FLAG {
        return Err(KernelImageError::NotBzImage(format!(
            "boot_flag at 0x1fe is {boot_flag:#06x}, expected 0xaa55"
        )));
    }
    let protocol = header_field(image, OFF_VERSION, le16, "boot protocol version")?;
    if protocol < MIN_PROTOCOL_WITH_PAYLOAD {
        return Err(KernelImageError::ProtocolTooOld(protocol));
    }
    if image.len() < SETUP_HEADER_END {
        return Err(truncated("setup header", 0, SETUP_HEADER_END as u64, image));
    }
    let setup_sects = match image[OFF_SETUP_SECTS] as usize {
        0 => SETUP_SECTS_IF_ZERO,
        n => n,
    };
    let protected_mode_start = (setup_sects + 1) * SECTOR_SIZE;
    let payload_offset = header_field(image, OFF_PAYLOAD_OFFSET, le32, "payload_offset")?;
    let payload_len = header_field(image, OFF_PAYLOAD_LENGTH, le32, "payload_length")?;
    // u64 arithmetic: none of these sums can overflow.
    let start = protected_mode_start as u64 + u64::from(payload_offset);
    let end = start + u64::from(payload_len);
    if end > image.len() as u64 {
        return Err(truncated("compressed payload", start, end, image));
    }
    let (payload_start, payload_len) = (start as usize, payload_len as usize);
    let payload = &image[payload_start..payload_start + payload_len];
    let compression = detect_compression(payload)?;
    // A payload without room for at least one byte of stream plus the size trailer is not one.
    if payload.len() < 5 {
        return Err(KernelImageError::Decompress {
            codec: compression,
            detail: format!(
                "payload is {} bytes, too short for a stream and its 4-byte size trailer",
                payload.len()
            ),
        });
    }
    let uncompressed_size = u64::from(le32(payload, payload.len() - 4).unwrap_or(0));
    Ok(BzImageInfo {
        protocol,
        protected_mode_start,
        payload_start,
        payload_len,
        compression,
        uncompressed_size,
    })
}

/// Identifies the payload compression from its magic bytes.
pub fn detect_compression(payload: &[u8]) -> Result<Compression, KernelImageError> {
    if payload.starts_with(&MAGIC_LZ4_LEGACY) {
        return Ok(Compression::Lz4Legacy);
    }
    if payload.starts_with(&MAGIC_GZIP) {
        return Ok(Compression::Gzip);
    }
    if payload.starts_with(&MAGIC_XZ) {
        return Ok(Compression::Xz);
    }
    if payload.starts_with(&MAGIC_ZSTD) {
        return Ok(Compression::Zstd);
    }
    let name = KNOWN_UNSUPPORTED
        .iter()
        .find(|(magic, _)| payload.starts_with(magic))
        .map_or("(unknown)", |(_, name)| name);
    Err(KernelImageError::UnsupportedCompression {
        name,
        magic: spaced_hex(&payload[..payload.len().min(6)]),
    })
}

/// The kernel release (`uname -r`, e.g. "6.1.0-56-cloud-amd64"): from the setup header's
/// `kernel_version` string for a bzImage, or from the "Linux version " banner for an ELF vmlinux.
pub fn kernel_release(image: &[u8]) -> Option<String> {
    if image.starts_with(ELF_MAGIC) {
        return release_from_banner(image);
    }
    if image.get(OFF_HEADER..OFF_HEADER + 4)? != HEADER_MAGIC {
        return None;
    }
    // kernel_version exists from protocol 2.00; a zero pointer means "not provided".
    if le16(image, OFF_VERSION)? < 0x0200 {
        return None;
    }
    let ptr = le16(image, OFF_KERNEL_VERSION)? as usize;
    if ptr == 0 {
        return None;
    }
    let start = KERNEL_VERSION_BASE + ptr;
    let window = image.get(start..image.len().min(start + MAX_VERSION_STRING))?;
    let text = &window[..window.iter().position(|&b| b == 0)?];
    first_word(text)
}

/// Scans an ELF vmlinux for the `linux_banner` string ("Linux version <release> (...").
fn release_from_banner(image: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let at = image.windows(BANNER.len()).position(|w| w == BANNER)?;
    let rest = &image[at + BANNER.len()..];
    first_word(&rest[..rest.len().min(MAX_VERSION_STRING)])
}

fn first_word(text: &[u8]) -> Option<String> {
    let word: Vec<u8> = text
        .iter()
        .copied()
        .take_while(|b| b.is_ascii_graphic())
        .collect();
    if word.is_empty() {
        None
    } else {
        String::from_utf8(word).ok()
    }
}

/// Checks that `elf` is an ELF64, little-endian, x86-64 executable.
pub fn check_elf(elf: &[u8]) -> Result<(), KernelImageError> {
    if elf.len() < ELF64_EHDR_SIZE {
        return Err(KernelImageError::NotElf(format!(
            "{} bytes is shorter than an ELF64 header",
            elf.len()
        )));
    }
    if !elf.starts_with(ELF_MAGIC) {
        return Err(KernelImageError::NotElf(format!(
            "starts with {} instead of 7f 45 4c 46",
            spaced_hex(&elf[..4])
        )));
    }
    if elf[4] != ELFCLASS64 || elf[5] != ELFDATA2LSB {
        return Err(KernelImageError::NotElf(format!(
            "class {} / data {} (want ELF64 little-endian: 2 / 1)",
            elf[4], elf[5]
        )));
    }
    let e_type = le16(elf, 16).unwrap_or(0);
    let e_machine = le16(elf, 18).unwrap_or(0);
    if e_machine != EM_X86_64 {
        return Err(KernelImageError::NotElf(format!(
            "e_machine {e_machine} (want {EM_X86_64}, x86-64)"
        )));
    }
    if e_type != ET_EXEC {
        return Err(KernelImageError::NotElf(format!(
            "e_type {e_type} (want {ET_EXEC}, executable)"
        )));
    }
    Ok(())
}

/// Decompresses `stream` to exactly `expected` bytes at most; the caller compares the length.
fn decompress(
    codec: Compression,
    stream: &[u8],
    expected: u64,
) -> Result<Vec<u8>, KernelImageError> {
    let fail = |detail: String| KernelImageError::Decompress { codec, detail };
    match codec {
        Compression::Lz4Legacy => lz4_legacy(stream, expected),
        Compression::Gzip => read_bounded(flate2::read::GzDecoder::new(stream), codec, expected),
        Compression::Xz => {
            // liblzma's default is no memory limit; a hostile header could ask for a 1.5 GiB
            // dictionary. Kernels use at most 32 MiB (scripts/xz_wrap.sh).
            let decoder = xz2::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0)
                .map_err(|e| fail(e.to_string()))?;
            read_bounded(
                xz2::read::XzDecoder::new_stream(stream, decoder),
                codec,
                expected,
            )
        }
        Compression::Zstd => {
            let mut input = stream;
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut input)
                .map_err(|e| fail(e.to_string()))?;
            let out = read_bounded(&mut decoder, codec, expected)?;
            // ruzstd computes the content checksum but leaves comparing it to the caller.
            let frame = decoder.into_frame_decoder();
            if let (Some(stored), Some(computed)) = (
                frame.get_checksum_from_data(),
                frame.get_calculated_checksum(),
            ) {
                if stored != computed {
                    return Err(fail(format!(
                        "content checksum {computed:#010x} does not match the frame's {stored:#010x}"
                    )));
                }
            }
            Ok(out)
        }
    }
}

/// Reads a decoder to the end, never holding more than `expected + 1` bytes (the extra byte tells
/// "more than claimed" apart from "exactly as claimed").
fn read_bounded<R: Read>(
    reader: R,
    codec: Compression,
    expected: u64,
) -> Result<Vec<u8>, KernelImageError> {
    // The claim is capped by the caller; reserving it up front avoids repeated reallocation of a
    // ~50 MiB buffer. Hostile claims cost at most the limit, which is the point of the limit.
    let mut out = Vec::with_capacity(expected as usize);
    reader
        .take(expected + 1)
        .read_to_end(&mut out)
        .map_err(|e| KernelImageError::Decompress {
            codec,
            detail: e.to_string(),
        })?;
    if out.len() as u64 > expected {
        return Err(KernelImageError::SizeMismatch {
            codec,
            expected,
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

/// LZ4 legacy frame, as lib/decompress_unlz4.c reads it: the magic, then blocks of
/// [u32 LE compressed size][LZ4 block], each decompressing to at most 8 MiB. A repeated magic in
/// place of a block size starts a concatenated frame and is skipped.
fn lz4_legacy(stream: &[u8], expected: u64) -> Result<Vec<u8>, KernelImageError> {
    let codec = Compression::Lz4Legacy;
    let fail = |detail: String| KernelImageError::Decompress { codec, detail };
    let mut out: Vec<u8> = Vec::with_capacity(expected as usize);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK_MAX];
    let mut pos = MAGIC_LZ4_LEGACY.len();
    while pos < stream.len() {
        let size_bytes = stream
            .get(pos..pos + 4)
            .ok_or_else(|| fail(format!("block size at offset {pos} is cut off")))?;
        pos += 4;
        if size_bytes == MAGIC_LZ4_LEGACY {
            continue;
        }
        let size = u32::from_le_bytes([size_bytes[0], size_bytes[1], size_bytes[2], size_bytes[3]])
            as usize;
        if size == 0 || size > LZ4_LEGACY_COMPRESSED_MAX {
            return Err(fail(format!(
                "block at offset {} has impossible compressed size {size}",
                pos - 4
            )));
        }
        let data = stream.get(pos..pos.saturating_add(size)).ok_or_else(|| {
            fail(format!(
                "block at offset {} claims {size} bytes but only {} remain",
                pos - 4,
                stream.len() - pos
            ))
        })?;
        pos += size;
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| fail(format!("block at offset {}: {e}", pos - size - 4)))?;
        if (out.len() + n) as u64 > expected {
            return Err(KernelImageError::SizeMismatch {
                codec,
                expected,
                actual: (out.len() + n) as u64,
            });
        }
        out.extend_from_slice(&block[..n]);
    }
    Ok(out)
}

fn header_field<T>(
    image: &[u8],
    offset: usize,
    read: fn(&[u8], usize) -> Option<T>,
    what: &'static str,
) -> Result<T, KernelImageError> {
    read(image, offset).ok_or_else(|| truncated(what, 0, (offset + 4) as u64, image))
}

fn truncated(what: &'static str, start: u64, end: u64, image: &[u8]) -> KernelImageError {
    KernelImageError::Truncated {
        what,
        start,
        end,
        len: image.len(),
    }
}

fn le16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Bytes as hex pairs separated by spaces ("7f 45 4c 46"), for error messages.
fn spaced_hex(bytes: &[u8]) -> String {
    bytes
        .chunks(1)
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest image this module accepts as a bzImage header, with `payload` after one setup
    /// sector.
    fn image_with_payload(payload: &[u8]) -> Vec<u8> {
        let pm_start = 2 * SECTOR_SIZE;
        let mut img = vec![0u8; pm_start];
        img[OFF_SETUP_SECTS] = 1;
        img[OFF_BOOT_FLAG..OFF_BOOT_FLAG + 2].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[OFF_HEADER..OFF_HEADER + 4].copy_from_slice(HEADER_MAGIC);
        img[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[OFF_PAYLOAD_OFFSET..OFF_PAYLOAD_OFFSET + 4].copy_from_slice(&16u32.to_le_bytes());
        img[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 16]);
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn magic_bytes_print_as_spaced_lowercase_hex() {
        assert_eq!(spaced_hex(&[0x7f, b'E', b'L', b'F']), "7f 45 4c 46");
        assert_eq!(spaced_hex(&[0xfd, 0x37, 0x7a]), "fd 37 7a");
        assert_eq!(spaced_hex(&[]), "");
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let mut img = image_with_payload(&[]);
        img[OFF_SETUP_SECTS] = 0;
        // Payload offset 16 after a 5-sector setup lies past the end: the error names it.
        match inspect(&img) {
            Err(KernelImageError::Truncated { what, start, .. }) => {
                assert_eq!(what, "compressed payload");
                assert_eq!(start, 5 * 512 + 16);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn detects_every_magic() {
        assert_eq!(
            detect_compression(&[2, 0x21, 0x4c, 0x18, 0]),
            Ok(Compression::Lz4Legacy)
        );
        assert_eq!(detect_compression(&[0x1f, 0x8b, 8]), Ok(Compression::Gzip));
        assert_eq!(detect_compression(&MAGIC_XZ), Ok(Compression::Xz));
        assert_eq!(detect_compression(&MAGIC_ZSTD), Ok(Compression::Zstd));
        assert_eq!(
            detect_compression(b"BZh91AY"),
            Err(KernelImageError::UnsupportedCompression {
                name: "bzip2",
                magic: "42 5a 68 39 31 41".into()
            })
        );
        assert!(matches!(
            detect_compression(&[]),
            Err(KernelImageError::UnsupportedCompression {
                name: "(unknown)",
                ..
            })
        ));
    }

    #[test]
    fn lz4_block_size_past_end_is_an_error() {
        let mut stream = MAGIC_LZ4_LEGACY.to_vec();
        stream.extend_from_slice(&100u32.to_le_bytes());
        stream.extend_from_slice(&[0u8; 10]);
        let err = lz4_legacy(&stream, 1000).unwrap_err();
        assert!(
            err.to_string()
                .contains("claims 100 bytes but only 10 remain"),
            "{err}"
        );
    }

    #[test]
    fn lz4_concatenated_magic_is_skipped() {
        let data = b"hello hello hello hello";
        let block = lz4_flex::block::compress(data);
        let mut stream = MAGIC_LZ4_LEGACY.to_vec();
        for _ in 0..2 {
            stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
            stream.extend_from_slice(&block);
            stream.extend_from_slice(&MAGIC_LZ4_LEGACY);
        }
        let out = lz4_legacy(&stream, 2 * data.len() as u64).unwrap();
        assert_eq!(out, [&data[..], &data[..]].concat());
        // One block more than claimed is refused before it is appended.
        assert!(matches!(
            lz4_legacy(&stream, data.len() as u64),
            Err(KernelImageError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn release_from_setup_header() {
        let mut img = image_with_payload(&[]);
        let text = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1\0";
        img[0x300..0x300 + text.len()].copy_from_slice(text);
        img[OFF_KERNEL_VERSION..OFF_KERNEL_VERSION + 2].copy_from_slice(&0x100u16.to_le_bytes());
        assert_eq!(
            kernel_release(&img).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        // A pointer past the end gives None, not a panic.
        img[OFF_KERNEL_VERSION..OFF_KERNEL_VERSION + 2].copy_from_slice(&0xfff0u16.to_le_bytes());
        assert_eq!(kernel_release(&img), None);
    }

    #[test]
    fn short_inputs_never_panic() {
        let full = image_with_payload(&[0x1f, 0x8b, 0, 0, 0, 0, 0, 0, 0]);
        for len in 0..full.len() {
            let _ = extract_vmlinux(&full[..len]);
            let _ = kernel_release(&full[..len]);
        }
    }
}
