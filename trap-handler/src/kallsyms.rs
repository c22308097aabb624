//! Kernel symbols without System.map: find the compressed kallsyms tables inside a kernel image (the
//! vmlinux file, or the kernel's bytes read from guest memory) by their structure alone, and decode them.
//!
//! Table format (scripts/kallsyms.c and kernel/kallsyms.c, Linux 6.1, CONFIG_KALLSYMS_BASE_RELATIVE and
//! CONFIG_KALLSYMS_ABSOLUTE_PERCPU as in Debian's x86-64 config). Every table starts 8-byte aligned
//! (`ALGN` = `.balign 8`):
//! - `kallsyms_token_table`: 256 NUL-terminated strings; byte value b of a compressed name expands to
//!   token b.
//! - `kallsyms_token_index`: 256 u16, the offset of each token in the token table.
//! - `kallsyms_names`: per symbol a length (one byte, or two when bit 7 is set: "big" symbols, 6.1) then
//!   that many token bytes. The first expanded character is the symbol type (`T`, `d`, ...).
//! - `kallsyms_markers`: u32 offsets into `kallsyms_names` of every 256th symbol.
//! - `kallsyms_num_syms`: u32, directly before the names.
//! - `kallsyms_offsets`: s32 per symbol; `kallsyms_relative_base`: u64. Address of symbol i: a
//!   non-negative offset is the absolute value (per-CPU symbols), a negative one is
//!   `relative_base - 1 - offset`.
//! - `kallsyms_seqs_of_names` (optional; 6.2, backported to Debian's 6.1): 3 bytes per symbol, between
//!   the markers and the token table.
//!
//! Table order up to 6.3 (verified on Debian 6.1.0-56): offsets, relative_base, num_syms, names,
//! markers, [seqs_of_names], token_table, token_index. From 6.4: num_syms, names, markers,
//! [seqs_of_names], token_table, token_index, offsets, relative_base. Both are tried; the result must
//! decode cleanly and give addresses in sorted order (scripts/kallsyms.c sorts by address).

use std::collections::HashMap;

use crate::elf::{Elf, PT_LOAD};

/// Errors of kallsyms discovery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KallsymsError {
    #[error("no kallsyms_token_table/kallsyms_token_index pair found")]
    NoTokenTable,
    #[error(
        "no kallsyms_markers/kallsyms_names/kallsyms_num_syms consistent with the token table"
    )]
    NoNames,
    #[error("no kallsyms_offsets/kallsyms_relative_base giving sorted addresses")]
    NoOffsets,
    #[error("ELF has no loadable segment containing kallsyms")]
    NoImage,
    #[error("kallsyms search gave up after {SEARCH_BUDGET} steps (hostile or corrupt image)")]
    SearchBudget,
}

/// Total work (candidate positions tried plus name entries walked) one search may spend. A real search
/// spends ~10^5-10^6; the bound keeps a crafted guest image from making discovery quadratic.
pub const SEARCH_BUDGET: u64 = 1 << 26;
/// Candidate token tables and marker arrays examined, closest first.
const MAX_TOKEN_CANDIDATES: usize = 16;
const MAX_MARKER_CANDIDATES: usize = 64;

/// Work counter shared by one search.
struct Budget(u64);

impl Budget {
    fn spend(&mut self, n: u64) -> Result<(), KallsymsError> {
        self.0 = self.0.checked_sub(n).ok_or(KallsymsError::SearchBudget)?;
        Ok(())
    }
}

/// Positions of the tables, as offsets into the scanned image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KallsymsTables {
    pub offsets: usize,
    pub relative_base: usize,
    pub num_syms: usize,
    pub names: usize,
    pub markers: usize,
    pub seqs_of_names: Option<usize>,
    pub token_table: usize,
    pub token_index: usize,
    /// Whether the tables are in the 6.4+ order (offsets after the token index).
    pub offsets_last: bool,
}

/// One kernel symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    /// Address as the scanned image has it: the link address in a vmlinux file, the runtime (KASLR)
    /// address in a running guest's memory (the kernel relocates `kallsyms_relative_base`). Per-CPU
    /// symbols are offsets into the per-CPU area.
    pub addr: u64,
    /// `nm`-style type character (`T` text, `D` data, `A` absolute/per-CPU, lower case = local...).
    pub kind: char,
}

/// The decoded symbol table.
#[derive(Debug, Clone)]
pub struct Kallsyms {
    /// Sorted by address (the kernel's order).
    symbols: Vec<Symbol>,
    by_name: HashMap<String, usize>,
    pub tables: KallsymsTables,
    /// `kallsyms_relative_base` as found in the image.
    pub relative_base: u64,
}

/// Upper bound on symbols we accept: a distribution kernel has ~90k; allmodconfig builds ~300k.
const MAX_SYMS: u32 = 4_000_000;
/// Longest compressed name entry (two-byte length form: 14 bits).
const MAX_NAME_ENTRY: usize = 2 + 0x3fff;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}
fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Token table: its start, and each token as a byte range.
struct Tokens {
    table: usize,
    index: usize,
    tokens: Vec<(usize, usize)>,
}

/// Finds `kallsyms_token_index`: 256 u16 starting at 0, strictly increasing, each step the length of a
/// short token plus its NUL; confirmed by a token table ending right before it whose NULs sit exactly
/// at the boundaries the index says.
fn find_tokens(img: &[u8]) -> Vec<Tokens> {
    let mut out = Vec::new();
    let mut p = 0;
    while p + 512 <= img.len() {
        // Cheap pre-filter on the first three entries.
        if img[p] == 0 && img[p + 1] == 0 {
            let a = u16_at(img, p + 2).unwrap_or(0);
            let b = u16_at(img, p + 4).unwrap_or(0);
            if (2..=64).contains(&a) && b > a && b - a <= 64 {
                if let Some(t) = check_token_index(img, p) {
                    out.push(t);
                }
            }
        }
        p += 8;
    }
    out
}

fn check_token_index(img: &[u8], p: usize) -> Option<Tokens> {
    let mut idx = [0usize; 256];
    for (i, v) in idx.iter_mut().enumerate() {
        *v = u16_at(img, p + 2 * i)? as usize;
    }
    if idx
        .windows(2)
        .any(|w| w[1] <= w[0] + 1 || w[1] - w[0] > 256)
    {
        return None;
    }
    // The table ends (last token + NUL, then padding to 8) right before the index. The last token is
    // 1..=255 bytes long.
    for last_len in 1..=255usize {
        let table_len = idx[255] + last_len + 1;
        let Some(table) = p.checked_sub(align8(table_len)) else {
            break;
        };
        if table % 8 != 0 {
            continue;
        }
        let t = &img[table..p];
        let ok = (0..256).all(|i| {
            let end = if i == 255 {
                table_len - 1
            } else {
                idx[i + 1] - 1
            };
            t.get(end) == Some(&0) && t[idx[i]..end].iter().all(|&c| c != 0)
        });
        if ok {
            let tokens = (0..256)
                .map(|i| {
                    let end = if i == 255 {
                        table_len - 1
                    } else {
                        idx[i + 1] - 1
                    };
                    (table + idx[i], table + end)
                })
                .collect();
            return Some(Tokens {
                table,
                index: p,
                tokens,
            });
        }
    }
    None
}

/// A candidate `kallsyms_markers` array: start and values.
struct Markers {
    start: usize,
    values: Vec<u32>,
}

/// Candidate marker arrays below `limit`: u32 runs starting with 0 whose steps are the size of 256
/// compressed names (each at least 2 bytes).
fn find_markers(img: &[u8], limit: usize) -> Vec<Markers> {
    let mut out = Vec::new();
    let mut p = 0;
    let step_ok = |d: u32| (512..=256 * MAX_NAME_ENTRY as u32).contains(&d);
    while p + 12 <= limit {
        if u32_at(img, p) == Some(0) {
            let m1 = u32_at(img, p + 4).unwrap_or(0);
            let m2 = u32_at(img, p + 8).unwrap_or(0);
            if step_ok(m1) && m2 > m1 && step_ok(m2 - m1) {
                let mut values = vec![0, m1, m2];
                let mut q = p + 12;
                while q + 4 <= limit {
                    let v = u32_at(img, q).unwrap_or(0);
                    if v <= *values.last().unwrap_or(&0)
                        || !step_ok(v - values.last().copied().unwrap_or(0))
                    {
                        break;
                    }
                    values.push(v);
                    q += 4;
                }
                out.push(Markers { start: p, values });
            }
        }
        p += 8;
    }
    out
}

/// Decodes one name entry at `p`: (token bytes range, next entry).
fn name_entry(img: &[u8], p: usize) -> Option<(usize, usize, usize)> {
    let b0 = *img.get(p)? as usize;
    let (len, hdr) = if b0 & 0x80 != 0 {
        ((b0 & 0x7f) | ((*img.get(p + 1)? as usize) << 7), 2)
    } else {
        (b0, 1)
    };
    if len == 0 {
        return None;
    }
    let start = p + hdr;
    let end = start.checked_add(len)?;
    (end <= img.len()).then_some((start, end, end))
}

/// Checks that `num` names start at `names` and agree with every marker; returns the end of the names.
fn check_names(
    img: &[u8],
    names: usize,
    num: u32,
    markers: &[u32],
    budget: &mut Budget,
) -> Result<Option<usize>, KallsymsError> {
    let mut p = names;
    for i in 0..num as usize {
        if i % 256 == 0 {
            budget.spend(256)?;
            if markers.get(i / 256).map(|&m| m as usize) != Some(p - names) {
                return Ok(None);
            }
        }
        match name_entry(img, p) {
            Some((_, _, next)) => p = next,
            None => return Ok(None),
        }
    }
    Ok(Some(p))
}

impl Kallsyms {
    /// Finds and decodes the kallsyms tables in `img` (a kernel image: vmlinux segment or guest bytes).
    pub fn find(img: &[u8]) -> Result<Kallsyms, KallsymsError> {
        let token_cands = find_tokens(img);
        if token_cands.is_empty() {
            return Err(KallsymsError::NoTokenTable);
        }
        let mut names_found = false;
        let mut budget = Budget(SEARCH_BUDGET);
        for tok in token_cands.iter().take(MAX_TOKEN_CANDIDATES) {
            // The markers come before the token table (both orders), closest first.
            let mut markers = find_markers(img, tok.table);
            markers.sort_by_key(|m| std::cmp::Reverse(m.start));
            for m in markers.iter().take(MAX_MARKER_CANDIDATES) {
                let Some((names, num, names_end)) = locate_names(img, m, &mut budget)? else {
                    continue;
                };
                // Between the markers and the token table: nothing, or 3 bytes per symbol.
                let markers_end = align8(m.start + 4 * m.values.len());
                let gap = tok.table.checked_sub(markers_end);
                let seqs = match gap {
                    Some(0) => None,
                    Some(g) if g == align8(3 * num as usize) => Some(markers_end),
                    _ => continue,
                };
                names_found = true;
                let layouts = [false, true];
                for offsets_last in layouts {
                    let (offsets, relbase) = if offsets_last {
                        let o = align8(tok.index + 512);
                        (o, align8(o + 4 * num as usize))
                    } else {
                        let Some(rb) = names.checked_sub(16) else {
                            continue;
                        };
                        let Some(o) = rb.checked_sub(align8(4 * num as usize)) else {
                            continue;
                        };
                        (o, rb)
                    };
                    let tables = KallsymsTables {
                        offsets,
                        relative_base: relbase,
                        num_syms: names - 8,
                        names,
                        markers: m.start,
                        seqs_of_names: seqs,
                        token_table: tok.table,
                        token_index: tok.index,
                        offsets_last,
                    };
                    if let Some(k) = decode(img, tables, tok, num, names_end) {
                        return Ok(k);
                    }
                }
            }
        }
        Err(if names_found {
            KallsymsError::NoOffsets
        } else {
            KallsymsError::NoNames
        })
    }

    /// Finds kallsyms in a vmlinux ELF: scans each loadable segment (the tables are in `.rodata`).
    /// Returns the symbols and the link address of the segment holding them (table positions in
    /// [`Kallsyms::tables`] are offsets from it).
    pub fn from_elf(elf: &Elf<'_>) -> Result<(Kallsyms, u64), KallsymsError> {
        let mut last = KallsymsError::NoImage;
        for seg in elf.segments.iter().filter(|s| s.p_type == PT_LOAD) {
            let Ok(data) = elf.segment_data(seg) else {
                continue;
            };
            match Kallsyms::find(data) {
                Ok(k) => return Ok((k, seg.vaddr)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// All symbols, sorted by address.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// The symbol called `name`: the global one if there is one, else the lowest-addressed local one
    /// (static symbols of different files may share a name; see [`Kallsyms::lookup_all`]).
    pub fn lookup(&self, name: &str) -> Option<&Symbol> {
        self.by_name.get(name).map(|&i| &self.symbols[i])
    }

    /// Every symbol called `name` (linear scan).
    pub fn lookup_all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s Symbol> + 's {
        self.symbols.iter().filter(move |s| s.name == name)
    }

    /// Address of `name`.
    pub fn addr(&self, name: &str) -> Option<u64> {
        self.lookup(name).map(|s| s.addr)
    }

    /// The symbol containing `addr` (the last one at or below it) and the offset into it.
    pub fn symbolize(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let i = self.symbols.partition_point(|s| s.addr <= addr);
        let s = self.symbols.get(i.checked_sub(1)?)?;
        Some((s, addr - s.addr))
    }
}

/// From a marker array, finds `kallsyms_names` and `kallsyms_num_syms` (u32 right before the names,
/// followed by 4 bytes of padding) such that the names walk agrees with every marker.
fn locate_names(
    img: &[u8],
    m: &Markers,
    budget: &mut Budget,
) -> Result<Option<(usize, u32, usize)>, KallsymsError> {
    let n = m.values.len();
    let Some(&last) = m.values.last() else {
        return Ok(None);
    };
    let last = last as usize;
    // The names end at most 7 bytes of padding before the markers; the last block holds 1..=256 names.
    let Some(hi) = m.start.checked_sub(last + 2).map(|h| h & !7) else {
        return Ok(None);
    };
    let lo = m.start.saturating_sub(last + 256 * MAX_NAME_ENTRY).max(8);
    let mut names = hi;
    while names >= lo {
        budget.spend(1)?;
        let num = u32_at(img, names - 8).unwrap_or(0);
        if num > 0
            && num <= MAX_SYMS
            && (num as usize).div_ceil(256) == n
            && u32_at(img, names - 4) == Some(0)
        {
            if let Some(end) = check_names(img, names, num, &m.values, budget)? {
                if end <= m.start && m.start - end < 8 {
                    return Ok(Some((names, num, end)));
                }
            }
        }
        names -= 8;
    }
    Ok(None)
}

fn decode(
    img: &[u8],
    t: KallsymsTables,
    tok: &Tokens,
    num: u32,
    names_end: usize,
) -> Option<Kallsyms> {
    let relbase = u64_at(img, t.relative_base)?;
    let offs = img.get(t.offsets..t.offsets + 4 * num as usize)?;
    // Relocatable x86-64 kernels live in the top 2 GiB (__START_KERNEL_map and above).
    if relbase < crate::kaslr::START_KERNEL_MAP {
        return None;
    }
    let mut symbols = Vec::with_capacity(num as usize);
    let mut p = t.names;
    let mut prev = 0u64;
    let mut buf = Vec::with_capacity(128);
    for i in 0..num as usize {
        let (s, e, next) = name_entry(img, p)?;
        buf.clear();
        for &b in &img[s..e] {
            let (ts, te) = tok.tokens[b as usize];
            buf.extend_from_slice(&img[ts..te]);
        }
        p = next;
        let off = i32::from_le_bytes(offs[4 * i..4 * i + 4].try_into().ok()?);
        let addr = if off >= 0 {
            off as u64
        } else {
            relbase.wrapping_sub(1).wrapping_sub(off as i64 as u64)
        };
        if addr < prev {
            return None;
        }
        prev = addr;
        let (&kind, name) = buf.split_first()?;
        symbols.push(Symbol {
            name: String::from_utf8_lossy(name).into_owned(),
            addr,
            kind: kind as char,
        });
    }
    if p != names_end {
        return None;
    }
    let mut by_name: HashMap<String, usize> = HashMap::with_capacity(symbols.len());
    for (i, s) in symbols.iter().enumerate() {
        match by_name.get_mut(&s.name) {
            // A global symbol wins over a local (static) one of the same name, whatever the order.
            Some(prev)
                if symbols[*prev].kind.is_ascii_lowercase() && s.kind.is_ascii_uppercase() =>
            {
                *prev = i
            }
            Some(_) => {}
            None => {
                by_name.insert(s.name.clone(), i);
            }
        }
    }
    Some(Kallsyms {
        symbols,
        by_name,
        tables: t,
        relative_base: relbase,
    })
}

/// Test support (the unit tests below and the fuzz seeds): lays out synthetic tables in the 6.1
/// order: `syms` as (type+name, address), all names single bytes-per-char except that token 0x01
/// expands to "sec_" (compression exercised). Not for production use.
#[cfg(any(test, feature = "synthetic"))]
#[doc(hidden)]
pub fn encode_synthetic_tables(syms: &[(&str, u64)], relbase: u64, with_seqs: bool) -> Vec<u8> {
    let mut img = vec![0xeeu8; 64];
    let pad = |v: &mut Vec<u8>| {
        while !v.len().is_multiple_of(8) {
            v.push(0)
        }
    };
    // offsets
    for &(_, a) in syms {
        let off: i32 = if a < 0x1_0000_0000 {
            a as i32
        } else {
            (relbase as i64 - 1 - a as i64) as i32
        };
        img.extend_from_slice(&off.to_le_bytes());
    }
    pad(&mut img);
    img.extend_from_slice(&relbase.to_le_bytes());
    img.extend_from_slice(&(syms.len() as u32).to_le_bytes());
    pad(&mut img);
    let names_start = img.len();
    let mut markers = Vec::new();
    for (i, &(n, _)) in syms.iter().enumerate() {
        if i % 256 == 0 {
            markers.push((img.len() - names_start) as u32);
        }
        let enc: Vec<u8> = n.replace("sec_", "\x01").into_bytes();
        img.push(enc.len() as u8);
        img.extend_from_slice(&enc);
    }
    pad(&mut img);
    for m in markers {
        img.extend_from_slice(&m.to_le_bytes());
    }
    pad(&mut img);
    if with_seqs {
        img.extend(std::iter::repeat_n(0x5a, 3 * syms.len()));
        pad(&mut img);
    }
    let table = img.len();
    let mut index = Vec::new();
    for b in 0..=255u8 {
        index.push((img.len() - table) as u16);
        match b {
            1 => img.extend_from_slice(b"sec_"),
            0 => img.extend_from_slice(b"zz"),
            b if b.is_ascii_graphic() => img.push(b),
            b => img.extend_from_slice(&[b'~', b | 0x80]),
        }
        img.push(0);
    }
    pad(&mut img);
    for i in index {
        img.extend_from_slice(&i.to_le_bytes());
    }
    img.extend_from_slice(&[0xee; 64]);
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_syms() -> Vec<(String, u64)> {
        let mut v = vec![
            ("Afixed_percpu_data".to_string(), 0),
            ("Acurrent_task".to_string(), 0x1fb80),
        ];
        for i in 0..700u64 {
            v.push((format!("Tfunc_{i}"), 0xffff_ffff_8100_0000 + 0x40 * i));
        }
        v.push((
            "Tsecurity_socket_connect".to_string(),
            0xffff_ffff_8110_0000,
        ));
        v
    }

    #[test]
    fn finds_and_decodes_synthetic_tables_with_and_without_seqs() {
        let syms = sample_syms();
        let refs: Vec<(&str, u64)> = syms.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        for with_seqs in [false, true] {
            let img = encode_synthetic_tables(&refs, 0xffff_ffff_8100_0000, with_seqs);
            let k = Kallsyms::find(&img).unwrap();
            assert_eq!(k.symbols().len(), syms.len());
            assert_eq!(k.tables.seqs_of_names.is_some(), with_seqs);
            let s = k.lookup("security_socket_connect").unwrap();
            assert_eq!((s.addr, s.kind), (0xffff_ffff_8110_0000, 'T'));
            assert_eq!(k.addr("current_task"), Some(0x1fb80));
            assert_eq!(k.addr("func_699"), Some(0xffff_ffff_8100_0000 + 0x40 * 699));
            let (sym, off) = k.symbolize(0xffff_ffff_8100_0045).unwrap();
            assert_eq!((sym.name.as_str(), off), ("func_1", 5));
        }
    }

    #[test]
    fn many_decoy_marker_arrays_stay_bounded() {
        // 1 MiB of marker-like runs (0, 600, 1200) in front of a genuine token table and index, but no
        // names: every decoy is examined within the candidate and work limits, then rejected.
        let syms = sample_syms();
        let refs: Vec<(&str, u64)> = syms.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        let real = encode_synthetic_tables(&refs, 0xffff_ffff_8100_0000, false);
        let tok = Kallsyms::find(&real).unwrap().tables.token_table;
        let mut img = Vec::new();
        while img.len() < 1 << 20 {
            for w in [0u32, 600, 1200, 7] {
                img.extend_from_slice(&w.to_le_bytes());
            }
        }
        img.extend_from_slice(&real[tok..]);
        assert!(matches!(
            Kallsyms::find(&img),
            Err(KallsymsError::NoNames | KallsymsError::SearchBudget)
        ));
    }

    #[test]
    fn corrupted_tables_are_rejected_not_misread() {
        let syms = sample_syms();
        let refs: Vec<(&str, u64)> = syms.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        let img = encode_synthetic_tables(&refs, 0xffff_ffff_8100_0000, false);
        // Unsorted addresses: swap two offsets.
        let mut bad = img.clone();
        bad.copy_within(64 + 8 * 4..64 + 9 * 4, 64 + 20 * 4);
        assert_eq!(Kallsyms::find(&bad).unwrap_err(), KallsymsError::NoOffsets);
        // A name length byte that disagrees with the markers.
        let mut bad = img.clone();
        let names = Kallsyms::find(&img).unwrap().tables.names;
        bad[names] = 0x7f;
        assert_eq!(Kallsyms::find(&bad).unwrap_err(), KallsymsError::NoNames);
        // No token table at all.
        assert_eq!(
            Kallsyms::find(&[0u8; 4096]).unwrap_err(),
            KallsymsError::NoTokenTable
        );
        // Truncation and byte corruption anywhere never panic; a result that survives corruption
        // still has sorted addresses.
        for cut in (0..img.len()).step_by(97) {
            let _ = Kallsyms::find(&img[..cut]);
        }
        for i in (0..img.len()).step_by(13) {
            for v in [0x00, 0xff] {
                let mut b = img.clone();
                b[i] = v;
                if let Ok(k) = Kallsyms::find(&b) {
                    assert!(k.symbols().windows(2).all(|w| w[0].addr <= w[1].addr));
                }
            }
        }
    }
}
