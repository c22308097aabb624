//! BPF Type Format (BTF) reader: the kernel's own description of its types, from the `.BTF` section of
//! `vmlinux` or from raw bytes found in guest memory. Used to learn struct layouts (member offsets and
//! sizes) of the exact kernel build a guest runs, with no debug package and no System.map.
//!
//! Format: Documentation/bpf/btf.rst and include/uapi/linux/btf.h. All kinds up to `BTF_KIND_ENUM64`
//! (19) are parsed for their length; struct/union members, arrays and int encodings are kept. Bytes
//! from a guest are hostile: every offset is checked, type chains and nesting are depth-limited, and
//! errors are typed.

use std::collections::HashMap;

use crate::elf::{Elf, ElfError};

/// `BTF_MAGIC` (include/uapi/linux/btf.h), stored little-endian on x86: bytes 9f eb.
pub const BTF_MAGIC: u16 = 0xeb9f;
/// `BTF_VERSION`.
pub const BTF_VERSION: u8 = 1;
/// `sizeof(struct btf_header)`.
const BTF_HEADER_LEN: usize = 24;
/// `sizeof(struct btf_type)`.
const BTF_TYPE_LEN: usize = 12;
/// Longest modifier/typedef chain we follow. Real chains are a handful long (`const volatile typedef`).
const MAX_TYPE_CHAIN: usize = 64;
/// Deepest nesting of anonymous members (and of arrays in a size computation) we search.
const MAX_NESTING: usize = 32;
/// Pointer size on x86-64.
const POINTER_SIZE: u64 = 8;

/// BTF kinds (`BTF_KIND_*`, include/uapi/linux/btf.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(k: u32) -> Option<Kind> {
        use Kind::*;
        Some(match k {
            0 => Void,
            1 => Int,
            2 => Ptr,
            3 => Array,
            4 => Struct,
            5 => Union,
            6 => Enum,
            7 => Fwd,
            8 => Typedef,
            9 => Volatile,
            10 => Const,
            11 => Restrict,
            12 => Func,
            13 => FuncProto,
            14 => Var,
            15 => Datasec,
            16 => Float,
            17 => DeclTag,
            18 => TypeTag,
            19 => Enum64,
            _ => return None,
        })
    }

    /// Bytes that follow the fixed `struct btf_type` for this kind with `vlen` items (btf.rst §2.2).
    fn trailer_len(self, vlen: usize) -> usize {
        use Kind::*;
        match self {
            Int | Var | DeclTag => 4,
            Array => 12,
            Struct | Union | Datasec | Enum64 => 12 * vlen,
            Enum | FuncProto => 8 * vlen,
            Void | Ptr | Fwd | Typedef | Volatile | Const | Restrict | Func | Float | TypeTag => 0,
        }
    }

    fn is_modifier(self) -> bool {
        matches!(
            self,
            Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag
        )
    }
}

/// Errors parsing or querying BTF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("BTF truncated: {what} at byte {offset:#x}")]
    Truncated { what: &'static str, offset: usize },
    #[error("bad BTF magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported BTF version {0}")]
    BadVersion(u8),
    #[error("bad BTF header: {0}")]
    BadHeader(&'static str),
    #[error("unknown BTF kind {kind} for type id {id}")]
    UnknownKind { kind: u32, id: u32 },
    #[error("type id {id} out of range")]
    BadTypeId { id: u32 },
    #[error("type chain from id {id} is longer than {MAX_TYPE_CHAIN} or nested deeper than {MAX_NESTING}")]
    TooDeep { id: u32 },
    #[error("struct or union `{0}` not found")]
    StructNotFound(String),
    #[error("member `{path}` not found in `{ty}`")]
    MemberNotFound { ty: String, path: String },
    #[error("`{path}` in `{ty}` goes through type id {id}, which is not a struct or union")]
    NotComposite { ty: String, path: String, id: u32 },
    #[error("type id {id} ({kind:?}) has no size")]
    NoSize { id: u32, kind: Kind },
    #[error("member `{path}` of `{ty}` is a bitfield not on a byte boundary")]
    Bitfield { ty: String, path: String },
    #[error("member `{path}` of `{ty}` is not a one-bit bitfield")]
    NotAFlag { ty: String, path: String },
    #[error("ELF has no .BTF section")]
    NoBtfSection,
    #[error(transparent)]
    Elf(#[from] ElfError),
}

#[derive(Debug, Clone, Copy)]
struct TypeEntry {
    name_off: u32,
    kind: Kind,
    kind_flag: bool,
    vlen: u16,
    /// `size` for sized kinds, referenced `type` for the others (one union in the C struct).
    size_or_type: u32,
    /// Struct/union: index of the first member in `members`; array: index in `arrays`; int: encoding.
    aux: u32,
}

#[derive(Debug, Clone, Copy)]
struct RawMember {
    name_off: u32,
    type_id: u32,
    offset: u32,
}

#[derive(Debug, Clone, Copy)]
struct ArrayInfo {
    elem_type: u32,
    nelems: u32,
}

/// Where a member lives inside its (outermost) struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    /// Offset from the start of the outer struct, in bits.
    pub bit_offset: u64,
    /// Width in bits if the member is a bitfield, else 0.
    pub bitfield_size: u32,
    /// BTF type id of the member.
    pub type_id: u32,
    /// Size of the member's type in bytes.
    pub size: u64,
}

impl MemberInfo {
    /// Byte offset, if the member starts on a byte boundary.
    pub fn byte_offset(&self) -> Option<u64> {
        self.bit_offset
            .is_multiple_of(8)
            .then_some(self.bit_offset / 8)
    }
}

/// Parsed BTF (one blob: vmlinux BTF, or a split blob treated standalone).
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id; entry 0 is `void`.
    types: Vec<TypeEntry>,
    members: Vec<RawMember>,
    arrays: Vec<ArrayInfo>,
    /// Named structs and unions, first definition wins.
    composites: HashMap<Box<str>, u32>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Btf({} types, {} string bytes)",
            self.types.len(),
            self.strings.len()
        )
    }
}

fn u32_at(b: &[u8], off: usize, what: &'static str) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BtfError::Truncated { what, offset: off })
}

/// The layout of a BTF blob starting at some offset, as read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BtfHeader {
    pub hdr_len: u32,
    pub type_off: u32,
    pub type_len: u32,
    pub str_off: u32,
    pub str_len: u32,
}

impl BtfHeader {
    /// Reads and validates the header at the start of `b` against the length of `b`.
    pub fn parse(b: &[u8]) -> Result<BtfHeader, BtfError> {
        if b.len() < BTF_HEADER_LEN {
            return Err(BtfError::Truncated {
                what: "header",
                offset: 0,
            });
        }
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        if b[2] != BTF_VERSION {
            return Err(BtfError::BadVersion(b[2]));
        }
        let h = BtfHeader {
            hdr_len: u32_at(b, 4, "header")?,
            type_off: u32_at(b, 8, "header")?,
            type_len: u32_at(b, 12, "header")?,
            str_off: u32_at(b, 16, "header")?,
            str_len: u32_at(b, 20, "header")?,
        };
        if (h.hdr_len as usize) < BTF_HEADER_LEN {
            return Err(BtfError::BadHeader(
                "hdr_len shorter than struct btf_header",
            ));
        }
        if !h.type_len.is_multiple_of(4) {
            return Err(BtfError::BadHeader(
                "type section length not a multiple of 4",
            ));
        }
        if h.total_len().is_none_or(|t| t > b.len() as u64) {
            return Err(BtfError::Truncated {
                what: "sections",
                offset: b.len(),
            });
        }
        if h.str_len == 0 {
            return Err(BtfError::BadHeader("empty string section"));
        }
        Ok(h)
    }

    /// Total bytes of the blob (header plus both sections).
    pub fn total_len(&self) -> Option<u64> {
        let t = self.type_off as u64 + self.type_len as u64;
        let s = self.str_off as u64 + self.str_len as u64;
        Some(self.hdr_len as u64 + t.max(s))
    }
}

impl Btf {
    /// Parses a BTF blob (header, types, strings). Trailing bytes after the blob are ignored.
    pub fn parse(b: &[u8]) -> Result<Btf, BtfError> {
        let h = BtfHeader::parse(b)?;
        let hdr = h.hdr_len as usize;
        let s0 = hdr + h.str_off as usize;
        let strings = b[s0..s0 + h.str_len as usize].to_vec();
        if strings[0] != 0 {
            return Err(BtfError::BadHeader(
                "string section must start with an empty string",
            ));
        }
        let t0 = hdr + h.type_off as usize;
        let tsec = &b[t0..t0 + h.type_len as usize];

        // A type is at least 12 bytes: this bounds the table before any allocation.
        let max_types = tsec.len() / BTF_TYPE_LEN + 1;
        let mut types = Vec::with_capacity(max_types.min(1 << 20));
        types.push(TypeEntry {
            name_off: 0,
            kind: Kind::Void,
            kind_flag: false,
            vlen: 0,
            size_or_type: 0,
            aux: 0,
        });
        let mut members = Vec::new();
        let mut arrays = Vec::new();
        let mut composites = HashMap::new();
        let mut off = 0usize;
        while off < tsec.len() {
            let id = types.len() as u32;
            if off + BTF_TYPE_LEN > tsec.len() {
                return Err(BtfError::Truncated {
                    what: "struct btf_type",
                    offset: t0 + off,
                });
            }
            let name_off = u32_at(tsec, off, "btf_type")?;
            let info = u32_at(tsec, off + 4, "btf_type")?;
            let size_or_type = u32_at(tsec, off + 8, "btf_type")?;
            // info: bits 0-15 vlen, bits 24-28 kind, bit 31 kind_flag (btf.h).
            let vlen = (info & 0xffff) as u16;
            let raw_kind = (info >> 24) & 0x1f;
            let kind =
                Kind::from_raw(raw_kind).ok_or(BtfError::UnknownKind { kind: raw_kind, id })?;
            if kind == Kind::Void {
                return Err(BtfError::UnknownKind { kind: 0, id });
            }
            let kind_flag = info >> 31 != 0;
            let body = off + BTF_TYPE_LEN;
            let end = body + kind.trailer_len(vlen as usize);
            if end > tsec.len() {
                return Err(BtfError::Truncated {
                    what: "type trailer",
                    offset: t0 + off,
                });
            }
            let mut aux = 0;
            match kind {
                Kind::Int => aux = u32_at(tsec, body, "int encoding")?,
                Kind::Array => {
                    aux = arrays.len() as u32;
                    arrays.push(ArrayInfo {
                        elem_type: u32_at(tsec, body, "btf_array")?,
                        nelems: u32_at(tsec, body + 8, "btf_array")?,
                    });
                }
                Kind::Struct | Kind::Union => {
                    aux = members.len() as u32;
                    for i in 0..vlen as usize {
                        let m = body + 12 * i;
                        members.push(RawMember {
                            name_off: u32_at(tsec, m, "btf_member")?,
                            type_id: u32_at(tsec, m + 4, "btf_member")?,
                            offset: u32_at(tsec, m + 8, "btf_member")?,
                        });
                    }
                    if let Some(name) = cstr_at(&strings, name_off) {
                        if !name.is_empty() {
                            composites.entry(name.into()).or_insert(id);
                        }
                    }
                }
                _ => {}
            }
            types.push(TypeEntry {
                name_off,
                kind,
                kind_flag,
                vlen,
                size_or_type,
                aux,
            });
            off = end;
        }
        Ok(Btf {
            strings,
            types,
            members,
            arrays,
            composites,
        })
    }

    /// Parses the `.BTF` section of a vmlinux ELF image.
    pub fn from_elf(elf: &Elf<'_>) -> Result<Btf, BtfError> {
        let s = elf.section(".BTF").ok_or(BtfError::NoBtfSection)?;
        Btf::parse(elf.section_data(s)?)
    }

    /// Finds BTF blobs in raw bytes (for example the kernel image read from guest memory): offsets of
    /// valid headers (magic, version 1, sections inside `bytes`), with the blob lengths, largest first.
    /// The kernel's own BTF is the largest blob in its image by far.
    pub fn find_in(bytes: &[u8]) -> Vec<(usize, usize)> {
        let magic = BTF_MAGIC.to_le_bytes();
        let mut found = Vec::new();
        let mut i = 0;
        while i + BTF_HEADER_LEN <= bytes.len() {
            if bytes[i] == magic[0] && bytes[i + 1] == magic[1] && bytes[i + 2] == BTF_VERSION {
                if let Ok(h) = BtfHeader::parse(&bytes[i..]) {
                    // A real blob has a non-empty type section and strings beginning with NUL.
                    let s0 = i + h.hdr_len as usize + h.str_off as usize;
                    if h.type_len > 0 && bytes.get(s0) == Some(&0) {
                        found.push((i, h.total_len().unwrap_or(0) as usize));
                    }
                }
            }
            i += 1;
        }
        found.sort_by_key(|&(_, len)| std::cmp::Reverse(len));
        found
    }

    /// Number of types, `void` included.
    pub fn type_count(&self) -> u32 {
        self.types.len() as u32
    }

    fn entry(&self, id: u32) -> Result<&TypeEntry, BtfError> {
        self.types
            .get(id as usize)
            .ok_or(BtfError::BadTypeId { id })
    }

    /// Kind of a type id.
    pub fn kind(&self, id: u32) -> Result<Kind, BtfError> {
        Ok(self.entry(id)?.kind)
    }

    /// Name of a type id (empty for anonymous types).
    pub fn name(&self, id: u32) -> Result<&str, BtfError> {
        Ok(cstr_at(&self.strings, self.entry(id)?.name_off).unwrap_or(""))
    }

    /// The struct or union called `name`.
    pub fn find_struct(&self, name: &str) -> Option<u32> {
        self.composites.get(name).copied()
    }

    /// The first type of `kind` called `name` (linear scan: for occasional lookups of other kinds).
    pub fn find_type(&self, name: &str, kind: Kind) -> Option<u32> {
        (1..self.types.len() as u32).find(|&id| {
            let t = &self.types[id as usize];
            t.kind == kind && cstr_at(&self.strings, t.name_off) == Some(name)
        })
    }

    /// Follows typedefs and cv-qualifiers to the underlying type.
    pub fn resolve(&self, id: u32) -> Result<u32, BtfError> {
        let mut cur = id;
        for _ in 0..MAX_TYPE_CHAIN {
            let t = self.entry(cur)?;
            if !t.kind.is_modifier() {
                return Ok(cur);
            }
            cur = t.size_or_type;
        }
        Err(BtfError::TooDeep { id })
    }

    /// Size of a type in bytes.
    pub fn type_size(&self, id: u32) -> Result<u64, BtfError> {
        self.type_size_depth(id, 0)
    }

    fn type_size_depth(&self, id: u32, depth: usize) -> Result<u64, BtfError> {
        if depth > MAX_NESTING {
            return Err(BtfError::TooDeep { id });
        }
        let rid = self.resolve(id)?;
        let t = self.entry(rid)?;
        match t.kind {
            Kind::Int
            | Kind::Struct
            | Kind::Union
            | Kind::Enum
            | Kind::Enum64
            | Kind::Float
            | Kind::Datasec => Ok(t.size_or_type as u64),
            Kind::Ptr => Ok(POINTER_SIZE),
            Kind::Array => {
                let a = self.arrays[t.aux as usize];
                let elem = self.type_size_depth(a.elem_type, depth + 1)?;
                elem.checked_mul(a.nelems as u64)
                    .ok_or(BtfError::TooDeep { id })
            }
            kind => Err(BtfError::NoSize { id: rid, kind }),
        }
    }

    /// Size of the struct or union `name`.
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        let id = self
            .find_struct(name)
            .ok_or_else(|| BtfError::StructNotFound(name.to_string()))?;
        self.type_size(id)
    }

    /// Number of elements of an array type (after typedefs), if it is one.
    pub fn array_len(&self, id: u32) -> Result<Option<u32>, BtfError> {
        let t = self.entry(self.resolve(id)?)?;
        Ok((t.kind == Kind::Array).then(|| self.arrays[t.aux as usize].nelems))
    }

    fn members_of(&self, t: &TypeEntry) -> &[RawMember] {
        let start = t.aux as usize;
        &self.members[start..start + t.vlen as usize]
    }

    /// `(bit offset, bitfield size)` of a raw member in a struct whose kind_flag is `kind_flag`.
    fn member_bits(&self, kind_flag: bool, m: &RawMember) -> (u64, u32) {
        if kind_flag {
            // kind_flag set: offset = bitfield_size << 24 | bit_offset (btf.rst 2.2.5).
            ((m.offset & 0x00ff_ffff) as u64, m.offset >> 24)
        } else {
            // Old encoding: a bitfield is an INT whose encoding bits are narrower than its size.
            let bits = self
                .resolve(m.type_id)
                .ok()
                .and_then(|r| self.types.get(r as usize))
                .filter(|t| t.kind == Kind::Int)
                .map(|t| (t.aux & 0xff, t.size_or_type as u64 * 8))
                .filter(|&(nbits, size_bits)| nbits as u64 != size_bits)
                .map_or(0, |(nbits, _)| nbits);
            (m.offset as u64, bits)
        }
    }

    /// Finds `name` among the members of composite `id`, descending into anonymous structs and unions.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        depth: usize,
    ) -> Result<Option<(u64, u32, u32)>, BtfError> {
        if depth > MAX_NESTING {
            return Err(BtfError::TooDeep { id });
        }
        let t = self.entry(id)?;
        if !matches!(t.kind, Kind::Struct | Kind::Union) {
            return Ok(None);
        }
        for m in self.members_of(t) {
            if cstr_at(&self.strings, m.name_off) == Some(name) {
                let (bits, bf) = self.member_bits(t.kind_flag, m);
                return Ok(Some((bits, bf, m.type_id)));
            }
        }
        for m in self.members_of(t) {
            if m.name_off != 0 && cstr_at(&self.strings, m.name_off) != Some("") {
                continue;
            }
            let inner = self.resolve(m.type_id)?;
            if let Some((bits, bf, ty)) = self.find_member(inner, name, depth + 1)? {
                let (base, _) = self.member_bits(t.kind_flag, m);
                return Ok(Some((base + bits, bf, ty)));
            }
        }
        Ok(None)
    }

    /// Locates a member by dotted path (e.g. `"__sk_common.skc_family"`, `"uid.val"`) in the type `id`.
    /// Each component is searched in the current struct, anonymous nested structs/unions included.
    pub fn member_in(&self, id: u32, path: &str) -> Result<MemberInfo, BtfError> {
        let ty_name = || self.name(id).unwrap_or("").to_string();
        let mut cur = id;
        let mut bit_offset = 0u64;
        let mut bitfield_size = 0;
        for comp in path.split('.') {
            let rid = self.resolve(cur)?;
            if !matches!(self.kind(rid)?, Kind::Struct | Kind::Union) {
                return Err(BtfError::NotComposite {
                    ty: ty_name(),
                    path: path.to_string(),
                    id: rid,
                });
            }
            let (bits, bf, ty) =
                self.find_member(rid, comp, 0)?
                    .ok_or_else(|| BtfError::MemberNotFound {
                        ty: ty_name(),
                        path: path.to_string(),
                    })?;
            bit_offset += bits;
            bitfield_size = bf;
            cur = ty;
        }
        Ok(MemberInfo {
            bit_offset,
            bitfield_size,
            type_id: cur,
            size: self.type_size(cur)?,
        })
    }

    /// Locates a member by dotted path in the struct or union called `struct_name`.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<MemberInfo, BtfError> {
        let id = self
            .find_struct(struct_name)
            .ok_or_else(|| BtfError::StructNotFound(struct_name.to_string()))?;
        self.member_in(id, path)
    }

    /// Byte offset of a member; a bitfield or a member not on a byte boundary is an error.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> Result<u64, BtfError> {
        let m = self.member(struct_name, path)?;
        match m.byte_offset() {
            Some(o) if m.bitfield_size == 0 => Ok(o),
            _ => Err(BtfError::Bitfield {
                ty: struct_name.to_string(),
                path: path.to_string(),
            }),
        }
    }
}

/// The NUL-terminated UTF-8 string at `off` in a string section.
fn cstr_at(strings: &[u8], off: u32) -> Option<&str> {
    let s = strings.get(off as usize..)?;
    let n = s.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&s[..n]).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Assembles BTF blobs for tests.
    #[derive(Default)]
    pub(crate) struct BtfBuilder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl BtfBuilder {
        pub fn new() -> Self {
            BtfBuilder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }
        pub fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }
        fn push(
            &mut self,
            name: &str,
            kind: u32,
            kind_flag: bool,
            vlen: u32,
            size_or_type: u32,
            trailer: &[u32],
        ) -> u32 {
            let n = self.str(name);
            let info = vlen | kind << 24 | (kind_flag as u32) << 31;
            for w in [n, info, size_or_type].iter().chain(trailer) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }
        pub fn int(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            self.push(name, 1, false, 0, size, &[bits])
        }
        pub fn ptr(&mut self, to: u32) -> u32 {
            self.push("", 2, false, 0, to, &[])
        }
        pub fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.push("", 3, false, 0, 0, &[elem, index, n])
        }
        pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.push(name, 8, false, 0, to, &[])
        }
        /// members: (name, type, bit offset, bitfield size)
        pub fn composite(
            &mut self,
            union: bool,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let kind_flag = members.iter().any(|m| m.3 != 0);
            let mut tr = Vec::new();
            for &(n, t, off, bf) in members {
                tr.extend_from_slice(&[self.str(n), t, off | bf << 24]);
            }
            self.push(
                name,
                if union { 5 } else { 4 },
                kind_flag,
                members.len() as u32,
                size,
                &tr,
            )
        }
        pub fn raw(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            size_or_type: u32,
            trailer: &[u32],
        ) -> u32 {
            self.push(name, kind, false, vlen, size_or_type, trailer)
        }
        pub fn build(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            b.extend_from_slice(&[BTF_VERSION, 0]);
            for w in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                b.extend_from_slice(&w.to_le_bytes());
            }
            b.extend_from_slice(&self.types);
            b.extend_from_slice(&self.strings);
            b
        }
    }

    /// struct inner { int a; int b; };
    /// struct outer { long x; union { struct { int hidden; int len; }; long both; }; struct inner in;
    ///                unsigned flags:3, mode:5; char name[16]; struct outer *self; };
    fn sample() -> Vec<u8> {
        let mut b = BtfBuilder::new();
        let int = b.int("int", 4, 32);
        let long = b.int("long", 8, 64);
        let chr = b.int("char", 1, 8);
        let uns = b.int("unsigned int", 4, 32);
        let inner = b.composite(false, "inner", 8, &[("a", int, 0, 0), ("b", int, 32, 0)]);
        let anon_s = b.composite(false, "", 8, &[("hidden", int, 0, 0), ("len", int, 32, 0)]);
        let anon_u = b.composite(true, "", 8, &[("", anon_s, 0, 0), ("both", long, 0, 0)]);
        let name_arr = b.array(chr, int, 16);
        let td = b.typedef("inner_t", inner);
        let outer_fwd_ptr = b.ptr(11); // id 11 = outer, defined next
        let _outer = b.composite(
            false,
            "outer",
            56,
            &[
                ("x", long, 0, 0),
                ("", anon_u, 64, 0),
                ("in", td, 128, 0),
                ("flags", uns, 192, 3),
                ("mode", uns, 195, 5),
                ("name", name_arr, 224, 0),
                ("self", outer_fwd_ptr, 384, 0),
            ],
        );
        // Kinds we only skip: enum (2 values), func_proto (1 param), var, datasec, float, decl_tag,
        // type_tag, enum64.
        b.raw("e", 6, 2, 4, &[b.strings.len() as u32, 1, 0, 2]);
        b.raw("", 13, 1, int, &[0, int]);
        b.raw("v", 14, 0, int, &[1]);
        b.raw(".data", 15, 1, 0, &[13, 0, 4]);
        b.raw("double", 16, 0, 8, &[]);
        b.raw("tag", 17, 0, int, &[0xffff_ffff]);
        b.raw("user", 18, 0, int, &[]);
        b.raw("e64", 19, 1, 8, &[0, 1, 2]);
        b.build()
    }

    #[test]
    fn members_through_anonymous_unions_typedefs_and_bitfields() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.type_count(), 20);
        assert_eq!(btf.struct_size("outer").unwrap(), 56);
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "len").unwrap(), 12);
        assert_eq!(btf.member_offset("outer", "both").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "in.b").unwrap(), 20);
        let name = btf.member("outer", "name").unwrap();
        assert_eq!((name.byte_offset(), name.size), (Some(28), 16));
        assert_eq!(btf.array_len(name.type_id).unwrap(), Some(16));
        assert_eq!(btf.member("outer", "self").unwrap().size, 8);
        let mode = btf.member("outer", "mode").unwrap();
        assert_eq!((mode.bit_offset, mode.bitfield_size), (195, 5));
        assert!(matches!(
            btf.member_offset("outer", "mode"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            btf.member_offset("outer", "nope"),
            Err(BtfError::MemberNotFound { .. })
        ));
        assert!(matches!(
            btf.member_offset("outer", "x.y"),
            Err(BtfError::NotComposite { .. })
        ));
        assert!(matches!(
            btf.member_offset("missing", "x"),
            Err(BtfError::StructNotFound(_))
        ));
        assert_eq!(btf.find_type("double", Kind::Float), Some(16));
    }

    #[test]
    fn truncated_and_garbage_blobs_are_errors() {
        let good = sample();
        for cut in [0, 3, 23, 24, 30, good.len() - 1] {
            assert!(Btf::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadMagic(_))));
        let mut bad = good.clone();
        bad[2] = 2;
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadVersion(2))));
        // A huge vlen on the first struct runs past the type section.
        let mut bad = good.clone();
        let first_struct_info = 24 + 4 * 16 + 4;
        bad[first_struct_info..first_struct_info + 2].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(matches!(Btf::parse(&bad), Err(BtfError::Truncated { .. })));
        // An unknown kind.
        let mut bad = good;
        bad[24 + 7] = 25;
        assert!(matches!(
            Btf::parse(&bad),
            Err(BtfError::UnknownKind { kind: 25, id: 1 })
        ));
    }

    #[test]
    fn typedef_loops_and_bad_ids_are_bounded() {
        let mut b = BtfBuilder::new();
        let t1 = b.typedef("a", 2);
        let _t2 = b.typedef("b", t1);
        let s = b.composite(false, "s", 8, &[("m", t1, 0, 0), ("far", 999, 32, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.resolve(t1), Err(BtfError::TooDeep { id: t1 }));
        assert!(matches!(
            btf.member_in(s, "m"),
            Err(BtfError::TooDeep { .. })
        ));
        assert_eq!(
            btf.member_in(s, "far"),
            Err(BtfError::BadTypeId { id: 999 })
        );
        assert_eq!(btf.type_size(12345), Err(BtfError::BadTypeId { id: 12345 }));
    }

    #[test]
    fn every_single_byte_corruption_is_an_error_or_a_bounded_answer() {
        let good = sample();
        for i in 0..good.len() {
            for v in [0x00u8, 0x01, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                if let Ok(btf) = Btf::parse(&b) {
                    for s in ["outer", "inner"] {
                        for path in ["x", "len", "both", "in.b", "mode", "name", "self"] {
                            let _ = btf.member(s, path);
                            let _ = btf.member_offset(s, path);
                        }
                        let _ = btf.struct_size(s);
                    }
                    for id in 0..btf.type_count() + 2 {
                        let _ = btf.type_size(id);
                        let _ = btf.array_len(id);
                    }
                }
            }
        }
    }

    #[test]
    fn finds_blob_in_raw_memory() {
        let blob = sample();
        let mut mem = vec![0xccu8; 4096];
        // A decoy magic with an impossible header.
        mem[100..104].copy_from_slice(&[0x9f, 0xeb, 1, 0]);
        mem[100 + 4..100 + 8].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        mem[1000..1000 + blob.len()].copy_from_slice(&blob);
        assert_eq!(Btf::find_in(&mem), vec![(1000, blob.len())]);
        let btf = Btf::parse(&mem[1000..]).unwrap();
        assert_eq!(btf.member_offset("outer", "len").unwrap(), 12);
    }
}
