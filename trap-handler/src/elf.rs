//! Bounds-checked reader for the ELF64 little-endian `vmlinux` image, on the `object` crate's ELF
//! reader: section headers (to find `.BTF`), program headers (to know where each byte is loaded) and
//! the GNU build-id note (the key under which a kernel profile is cached). Everything is validated
//! against the file length; a malformed file gives an [`ElfError`], never a panic.
//!
//! Layouts follow the System V gABI (`Elf64_Ehdr`, `Elf64_Shdr`, `Elf64_Phdr`, `Elf64_Nhdr`); `object`
//! reads them with no alignment requirement on the bytes (its `unaligned` feature), so a note found
//! at any offset of a guest's memory reads as well as one in a file.

use std::ops::Range;

use object::elf::{FileHeader64, NT_GNU_BUILD_ID, PT_NOTE, SHT_NOBITS};
use object::read::elf::{FileHeader, NoteIterator, ProgramHeader, SectionHeader};
use object::LittleEndian;

/// Program header type of loadable segments (`PT_LOAD`).
pub const PT_LOAD: u32 = object::elf::PT_LOAD.0;
/// Upper bound on section and segment counts we accept: far above any kernel's (~40 sections).
const MAX_HEADERS: usize = 4096;
/// Alignment of `Elf64_Nhdr` notes: their fields are 4-byte words (gABI, "Note Section").
const NOTE_ALIGN: u64 = 4;
/// Name of the GNU notes, with its terminating NUL (`namesz` 4).
const GNU_NOTE_NAME: &[u8] = b"GNU\0";

/// The ELF64 little-endian file header as `object` reads it.
type Header = FileHeader64<LittleEndian>;

/// Errors reading an ELF image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF64 little-endian file")]
    NotElf64Le,
    #[error(
        "ELF {what} out of file bounds (offset {offset:#x}, length {len:#x}, file {file_len:#x})"
    )]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: usize,
    },
    #[error("ELF header field {what} is invalid ({value:#x})")]
    BadHeader { what: &'static str, value: u64 },
    /// The headers of `what` do not fit the file or each other (the `object` crate's reason).
    #[error("malformed ELF {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

/// One section header, with its name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub sh_type: u32,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
}

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub p_type: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// A parsed view of an ELF64 file held in memory.
#[derive(Debug, Clone)]
pub struct Elf<'a> {
    bytes: &'a [u8],
    pub entry: u64,
    pub sections: Vec<Section>,
    pub segments: Vec<Segment>,
}

fn range(
    what: &'static str,
    offset: u64,
    len: u64,
    file_len: usize,
) -> Result<Range<usize>, ElfError> {
    let err = ElfError::OutOfBounds {
        what,
        offset,
        len,
        file_len,
    };
    let end = offset.checked_add(len).ok_or(err.clone())?;
    if end > file_len as u64 {
        return Err(err);
    }
    Ok(offset as usize..end as usize)
}

fn malformed(what: &'static str) -> impl Fn(object::read::Error) -> ElfError {
    move |e| ElfError::Malformed {
        what,
        reason: e.to_string(),
    }
}

impl<'a> Elf<'a> {
    /// Parses the headers of an ELF64 little-endian file.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        let header = Header::parse(bytes).map_err(|_| ElfError::NotElf64Le)?;
        let endian = header.endian().map_err(|_| ElfError::NotElf64Le)?;

        let phdrs = header
            .program_headers(endian, bytes)
            .map_err(malformed("program headers"))?;
        if phdrs.len() > MAX_HEADERS {
            return Err(ElfError::BadHeader {
                what: "e_phnum",
                value: phdrs.len() as u64,
            });
        }
        let segments = phdrs
            .iter()
            .map(|p| Segment {
                p_type: p.p_type(endian).0,
                offset: p.p_offset(endian),
                vaddr: p.p_vaddr(endian),
                paddr: p.p_paddr(endian),
                filesz: p.p_filesz(endian),
                memsz: p.p_memsz(endian),
            })
            .collect();

        let table = header
            .sections(endian, bytes)
            .map_err(malformed("section headers"))?;
        if table.len() > MAX_HEADERS {
            return Err(ElfError::BadHeader {
                what: "e_shnum",
                value: table.len() as u64,
            });
        }
        let sections = table
            .iter()
            .map(|h| Section {
                // A name outside the name table reads as no name.
                name: table
                    .section_name(endian, h)
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default(),
                sh_type: h.sh_type(endian).0,
                addr: h.sh_addr(endian),
                offset: h.sh_offset(endian),
                size: h.sh_size(endian),
            })
            .collect();
        Ok(Elf {
            bytes,
            entry: header.e_entry(endian),
            sections,
            segments,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The first section called `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The file bytes of a section (empty for `SHT_NOBITS`).
    pub fn section_data(&self, s: &Section) -> Result<&'a [u8], ElfError> {
        if s.sh_type == SHT_NOBITS.0 {
            return Ok(&[]);
        }
        let r = range("section data", s.offset, s.size, self.bytes.len())?;
        Ok(&self.bytes[r])
    }

    /// The file bytes of a segment (its `p_filesz` part).
    pub fn segment_data(&self, s: &Segment) -> Result<&'a [u8], ElfError> {
        let r = range("segment data", s.offset, s.filesz, self.bytes.len())?;
        Ok(&self.bytes[r])
    }

    /// Loadable segments, in file order.
    pub fn load_segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|s| s.p_type == PT_LOAD)
    }

    /// The GNU build id (`NT_GNU_BUILD_ID` note), searched in every `PT_NOTE` segment.
    pub fn build_id(&self) -> Option<&'a [u8]> {
        self.segments
            .iter()
            .filter(|s| s.p_type == PT_NOTE.0)
            .filter_map(|s| self.segment_data(s).ok())
            .find_map(find_build_id_note)
    }
}

/// Scans a run of `Elf64_Nhdr` notes (any bytes: a file's or a guest's) for the GNU build id; a
/// note that runs past the end stops the scan.
pub fn find_build_id_note(notes: &[u8]) -> Option<&[u8]> {
    let mut notes = NoteIterator::<Header>::new(LittleEndian, NOTE_ALIGN, notes).ok()?;
    while let Ok(Some(note)) = notes.next() {
        if note.n_type(LittleEndian) == NT_GNU_BUILD_ID && note.name_bytes() == GNU_NOTE_NAME {
            return Some(note.desc());
        }
    }
    None
}

/// Lower-case hex of a byte string (build ids are printed this way by `file` and `readelf -n`).
/// A thin wrapper over [`::hex::encode`], kept as the name callers (vmm-core) use.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 little-endian header (gABI `Elf64_Ehdr`, 64 bytes) with no headers behind it.
    fn bare_header() -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(&object::elf::ELFMAG);
        h[4] = object::elf::ELFCLASS64.0;
        h[5] = object::elf::ELFDATA2LSB.0;
        h[6] = object::elf::EV_CURRENT.0;
        h
    }

    #[test]
    fn rejects_non_elf_and_truncated_headers() {
        assert_eq!(Elf::parse(b"not an elf").unwrap_err(), ElfError::NotElf64Le);
        let mut big_endian = bare_header();
        big_endian[5] = object::elf::ELFDATA2MSB.0;
        assert_eq!(Elf::parse(&big_endian).unwrap_err(), ElfError::NotElf64Le);
        let mut h = bare_header();
        // One program header (56 bytes, `Elf64_Phdr`) claimed at an offset past the end of the file.
        h[32..40].copy_from_slice(&0x1000u64.to_le_bytes());
        h[54..56].copy_from_slice(&56u16.to_le_bytes());
        h[56..58].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(
            Elf::parse(&h),
            Err(ElfError::Malformed {
                what: "program headers",
                ..
            })
        ));
        // Section headers of the wrong entry size.
        let mut h = bare_header();
        h[40..48].copy_from_slice(&64u64.to_le_bytes());
        h[58..60].copy_from_slice(&8u16.to_le_bytes());
        h[60..62].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(
            Elf::parse(&h),
            Err(ElfError::Malformed {
                what: "section headers",
                ..
            })
        ));
        // No headers at all is a (useless) valid file.
        let bare = bare_header();
        let elf = Elf::parse(&bare).unwrap();
        assert!(elf.sections.is_empty() && elf.segments.is_empty());
        assert_eq!(elf.build_id(), None);
    }

    #[test]
    fn build_id_note_is_found_and_bounded() {
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&3u32.to_le_bytes());
        n.extend_from_slice(&NT_GNU_BUILD_ID.0.to_le_bytes());
        n.extend_from_slice(b"GNU\0");
        n.extend_from_slice(&[1, 2, 3, 0]);
        assert_eq!(find_build_id_note(&n), Some(&[1u8, 2, 3][..]));
        // A descriptor size running past the end is rejected, not read.
        n[4..8].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert_eq!(find_build_id_note(&n), None);
        // At any alignment (a guest's `__start_notes` need not be aligned in our copy).
        n[4..8].copy_from_slice(&3u32.to_le_bytes());
        let mut shifted = vec![0xaa];
        shifted.extend_from_slice(&n);
        assert_eq!(find_build_id_note(&shifted[1..]), Some(&[1u8, 2, 3][..]));
        // Another vendor's note of the same type is skipped.
        shifted[13..17].copy_from_slice(b"XYZ\0");
        assert_eq!(find_build_id_note(&shifted[1..]), None);
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
