//! Minimal, bounds-checked reader for the ELF64 little-endian `vmlinux` image: section headers (to find
//! `.BTF`), program headers (to know where each byte is loaded) and the GNU build-id note (the key under
//! which a kernel profile is cached). Everything is validated against the file length; a malformed file
//! gives an [`ElfError`], never a panic.
//!
//! Layouts follow the System V gABI (`Elf64_Ehdr`, `Elf64_Shdr`, `Elf64_Phdr`, `Elf64_Nhdr`).

use std::ops::Range;

/// ELF identification bytes (gABI, `e_ident[EI_MAG0..EI_MAG3]`).
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// `e_ident[EI_CLASS]` value for 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]` value for little-endian objects.
const ELFDATA2LSB: u8 = 1;
/// `sizeof(Elf64_Ehdr)`.
const EHDR_SIZE: usize = 64;
/// `sizeof(Elf64_Shdr)`.
const SHDR_SIZE: usize = 64;
/// `sizeof(Elf64_Phdr)`.
const PHDR_SIZE: usize = 56;
/// Section type of sections that occupy no file space (`SHT_NOBITS`).
const SHT_NOBITS: u32 = 8;
/// Program header type of loadable segments (`PT_LOAD`).
pub const PT_LOAD: u32 = 1;
/// Program header type of note segments (`PT_NOTE`).
const PT_NOTE: u32 = 4;
/// Note type of the GNU build id (`NT_GNU_BUILD_ID`, elf.h).
const NT_GNU_BUILD_ID: u32 = 3;
/// Upper bound on section and segment counts we accept: far above any kernel's (~40 sections).
const MAX_HEADERS: usize = 4096;

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

fn rd_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn rd_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}
fn rd_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
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

impl<'a> Elf<'a> {
    /// Parses the headers of an ELF64 little-endian file.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        if bytes.len() < EHDR_SIZE
            || bytes[..4] != ELF_MAGIC
            || bytes[4] != ELFCLASS64
            || bytes[5] != ELFDATA2LSB
        {
            return Err(ElfError::NotElf64Le);
        }
        let entry = rd_u64(bytes, 24);
        let phoff = rd_u64(bytes, 32);
        let shoff = rd_u64(bytes, 40);
        let phentsize = rd_u16(bytes, 54) as usize;
        let phnum = rd_u16(bytes, 56) as usize;
        let shentsize = rd_u16(bytes, 58) as usize;
        let shnum = rd_u16(bytes, 60) as usize;
        let shstrndx = rd_u16(bytes, 62) as usize;

        let mut segments = Vec::new();
        if phnum > 0 {
            if phentsize < PHDR_SIZE || phnum > MAX_HEADERS {
                return Err(ElfError::BadHeader {
                    what: "e_phentsize/e_phnum",
                    value: phentsize as u64,
                });
            }
            let r = range(
                "program headers",
                phoff,
                (phentsize * phnum) as u64,
                bytes.len(),
            )?;
            for i in 0..phnum {
                let p = &bytes[r.start + i * phentsize..];
                segments.push(Segment {
                    p_type: rd_u32(p, 0),
                    offset: rd_u64(p, 8),
                    vaddr: rd_u64(p, 16),
                    paddr: rd_u64(p, 24),
                    filesz: rd_u64(p, 32),
                    memsz: rd_u64(p, 40),
                });
            }
        }

        let mut sections = Vec::new();
        if shnum > 0 {
            if shentsize < SHDR_SIZE || shnum > MAX_HEADERS || shstrndx >= shnum {
                return Err(ElfError::BadHeader {
                    what: "e_shentsize/e_shnum/e_shstrndx",
                    value: shnum as u64,
                });
            }
            let r = range(
                "section headers",
                shoff,
                (shentsize * shnum) as u64,
                bytes.len(),
            )?;
            let shdr = |i: usize| &bytes[r.start + i * shentsize..r.start + (i + 1) * shentsize];
            let strtab = shdr(shstrndx);
            let strtab = range(
                "section name table",
                rd_u64(strtab, 24),
                rd_u64(strtab, 32),
                bytes.len(),
            )?;
            let names = &bytes[strtab];
            for i in 0..shnum {
                let h = shdr(i);
                let name_off = rd_u32(h, 0) as usize;
                let name = names
                    .get(name_off..)
                    .and_then(|s| s.iter().position(|&c| c == 0).map(|n| &s[..n]))
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .unwrap_or_default();
                sections.push(Section {
                    name,
                    sh_type: rd_u32(h, 4),
                    addr: rd_u64(h, 16),
                    offset: rd_u64(h, 24),
                    size: rd_u64(h, 32),
                });
            }
        }
        Ok(Elf {
            bytes,
            entry,
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
        if s.sh_type == SHT_NOBITS {
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
            .filter(|s| s.p_type == PT_NOTE)
            .filter_map(|s| self.segment_data(s).ok())
            .find_map(find_build_id_note)
    }
}

/// Scans a run of `Elf64_Nhdr` notes for the GNU build id. Notes are 4-byte aligned (gABI).
pub fn find_build_id_note(mut notes: &[u8]) -> Option<&[u8]> {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    while notes.len() >= 12 {
        let namesz = rd_u32(notes, 0) as usize;
        let descsz = rd_u32(notes, 4) as usize;
        let ntype = rd_u32(notes, 8);
        let name_end = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = name_end.checked_add(align4(descsz)?)?;
        if desc_end > notes.len() {
            return None;
        }
        if ntype == NT_GNU_BUILD_ID && namesz == 4 && &notes[12..16] == b"GNU\0" {
            return Some(&notes[name_end..name_end + descsz]);
        }
        notes = &notes[desc_end..];
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

    #[test]
    fn rejects_non_elf_and_truncated_headers() {
        assert_eq!(Elf::parse(b"not an elf").unwrap_err(), ElfError::NotElf64Le);
        let mut h = vec![0u8; EHDR_SIZE];
        h[..4].copy_from_slice(&ELF_MAGIC);
        h[4] = ELFCLASS64;
        h[5] = ELFDATA2LSB;
        // One program header claimed at an offset past the end of the file.
        h[32..40].copy_from_slice(&0x1000u64.to_le_bytes());
        h[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        h[56..58].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(Elf::parse(&h), Err(ElfError::OutOfBounds { .. })));
    }

    #[test]
    fn build_id_note_is_found_and_bounded() {
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&3u32.to_le_bytes());
        n.extend_from_slice(&NT_GNU_BUILD_ID.to_le_bytes());
        n.extend_from_slice(b"GNU\0");
        n.extend_from_slice(&[1, 2, 3, 0]);
        assert_eq!(find_build_id_note(&n), Some(&[1u8, 2, 3][..]));
        // A descriptor size running past the end is rejected, not read.
        n[4..8].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert_eq!(find_build_id_note(&n), None);
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
