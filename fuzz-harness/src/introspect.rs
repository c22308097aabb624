//! The kernel discovery parsers over bytes a guest controls (its kernel image in guest memory):
//! BTF and kallsyms.
//!
//! Input: the bytes of a BTF blob (`btf`) or of a kernel image region (`kallsyms`).
//!
//! Invariants: parsing returns a value or a typed error; every query on a parsed value (types,
//! names, sizes, member paths, the kernel profile; symbol lookups and symbolization) does too; a
//! symbol found by name has that name.

use trap_handler::btf::Btf;
use trap_handler::kallsyms::Kallsyms;
use trap_handler::profile::KernelProfile;

/// Member paths the profile walks, tried on every struct the blob names.
const PATHS: &[&str] = &[
    "pid",
    "comm",
    "cred",
    "mm.exe_file",
    "f_path.dentry",
    "a.b.c",
    "x",
];
const STRUCTS: &[&str] = &[
    "task_struct",
    "cred",
    "file",
    "sock",
    "socket",
    "mm_struct",
    "s",
];

pub fn btf(data: &[u8]) {
    for (start, len) in Btf::find_in(data) {
        assert!(
            start <= data.len() && len <= data.len() - start,
            "blob outside the input"
        );
    }
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    let count = btf.type_count();
    for id in 0..count.min(512) + 2 {
        let _ = btf.kind(id);
        let _ = btf.name(id);
        if let Ok(r) = btf.resolve(id) {
            let _ = btf.kind(r);
        }
        let _ = btf.type_size(id);
        let _ = btf.array_len(id);
        for path in PATHS {
            if let Ok(m) = btf.member_in(id, path) {
                let _ = m.byte_offset();
            }
        }
    }
    for s in STRUCTS {
        if let Some(id) = btf.find_struct(s) {
            assert_eq!(
                btf.name(id).ok(),
                Some(*s),
                "find_struct({s}) found another name"
            );
        }
        let _ = btf.struct_size(s);
        for path in PATHS {
            let _ = btf.member(s, path);
            let _ = btf.member_offset(s, path);
        }
    }
    let _ = KernelProfile::build(&btf, None, None);
}

pub fn kallsyms(data: &[u8]) {
    let Ok(k) = Kallsyms::find(data) else {
        return;
    };
    let symbols = k.symbols();
    for s in symbols.iter().take(64) {
        let found = k.lookup(&s.name).expect("a listed symbol is found by name");
        assert_eq!(found.name, s.name);
        assert!(k.addr(&s.name).is_some());
        for n in k.lookup_all(&s.name) {
            assert_eq!(n.name, s.name);
        }
        for delta in [0u64, 1, 0x1000] {
            if let Some((sym, off)) = k.symbolize(s.addr.wrapping_add(delta)) {
                assert_eq!(sym.addr.wrapping_add(off), s.addr.wrapping_add(delta));
            }
        }
    }
    let _ = k.symbolize(0);
    let _ = k.symbolize(u64::MAX);
    let _ = k.lookup("current_task");
}
