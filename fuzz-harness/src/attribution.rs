//! Process attribution (`trap_handler::attribution`) over a synthetic guest whose memory comes
//! from the input: page tables, the per-CPU area, `task_struct`, `cred`, `mm_struct`, files,
//! dentries, mounts, sockets and addresses, all where a hostile guest kernel would put them.
//!
//! The layout is the real Debian kernel's (its kernel profile, `kernel-profile.json`, generated
//! by `KernelProfile::build` from the tenant's vmlinux BTF and kallsyms and committed so the
//! target needs no vmlinux). The harness builds fixed 4-level page tables: a 32-page kernel heap
//! at a direct-map address (virtual pages scattered over physical ones), the per-CPU page holding
//! `current_task`, the pages of `init_task` and `vmemmap_base` (KASLR slide 0) and one page of
//! the `struct page` array; then the input writes over any of them, page tables included (heap writes at virtual offsets).
//!
//! Input: op byte (connect, bind, listen, sendmsg), `rdi` and `rsi` (u16, heap offsets in
//! 8-byte units), `rdx` byte, the task (u16, heap offset in 8-byte units; stored as
//! `current_task`), then writes until the input ends: region byte (heap, per-CPU page, init_task,
//! vmemmap_base page, struct page page, page tables), u16 offset (in 2-byte units on the heap,
//! bytes elsewhere), length byte, bytes. In written
//! bytes, an 8-byte word (at an 8-byte offset of the write) whose top 16 bits are `0xaaaa` becomes
//! a heap address (its low 32 bits modulo the heap size), `0xaaab` a `struct page` address: so
//! the fuzzer can build pointer structures without guessing 64-bit addresses.
//!
//! Invariants: attribution returns a result or a typed error; it reads guest memory a bounded
//! number of times; what it returns is bounded (comm at most 16 characters, paths bounded).

use std::cell::Cell;
use std::sync::OnceLock;

use trap_handler::attribution::{attribute, current_process, HookArgs, SocketOp};
use trap_handler::mem::{
    GuestPhys, MemError, PageTableBuilder, PagingMode, PhysImage, VirtReader, PAGE_4K,
};
use trap_handler::policy::Policy;
use trap_handler::profile::KernelProfile;

use crate::Input;

const RAM: u64 = 0x40000;
const TABLES: (u64, u64) = (0x1000, 0x10000);
const HEAP_GPA: u64 = 0x10000;
const HEAP_PAGES: u64 = 32;
const HEAP_LEN: u64 = HEAP_PAGES * PAGE_4K;
const HEAP_VA: u64 = 0xffff_8880_0400_0000;
const GS_BASE: u64 = 0xffff_8880_7fc0_0000;
const PERCPU_GPA: u64 = 0x30000;
const INIT_TASK_GPA: u64 = 0x31000;
const INIT_TASK_PAGES: u64 = 4;
const VMEMMAP_VAR_GPA: u64 = 0x35000;
const STRUCT_PAGES_GPA: u64 = 0x36000;
const VMEMMAP: u64 = 0xffff_ea00_0000_0000;
/// Guest-physical reads one attribution may make (a normal one needs ~200; the tables bound
/// every walk well below this).
const READ_BOUND: u64 = 20_000;

struct Scene {
    image: PhysImage,
    cr3: u64,
    profile: KernelProfile,
    policy: Policy,
    /// Guest-physical page of the per-CPU area's `current_task`, and the offset in it.
    current_task: (u64, u64),
}

fn scene() -> &'static Scene {
    static SCENE: OnceLock<Scene> = OnceLock::new();
    SCENE.get_or_init(|| {
        let profile: KernelProfile =
            serde_json::from_str(include_str!("kernel-profile.json")).expect("kernel profile");
        let symbol = |n: &str| *profile.symbols.get(n).expect("profile symbol");
        let mut image = PhysImage::new(RAM as usize);
        let current_task = GS_BASE + symbol("current_task");
        let init_task_page = symbol("init_task") & !(PAGE_4K - 1);
        let vmemmap_var = symbol("vmemmap_base");
        let cr3 = {
            let mut b = PageTableBuilder::new(&mut image, PagingMode::Level4, TABLES.0, TABLES.1)
                .expect("page tables");
            for i in 0..HEAP_PAGES {
                // Never physically adjacent: a read across a page translates twice.
                b.map(HEAP_VA + i * PAGE_4K, heap_gpa(i * PAGE_4K), PAGE_4K)
                    .expect("heap");
            }
            b.map(current_task & !(PAGE_4K - 1), PERCPU_GPA, PAGE_4K)
                .expect("per-CPU");
            for i in 0..INIT_TASK_PAGES {
                b.map(
                    init_task_page + i * PAGE_4K,
                    INIT_TASK_GPA + i * PAGE_4K,
                    PAGE_4K,
                )
                .expect("init_task");
            }
            b.map(vmemmap_var & !(PAGE_4K - 1), VMEMMAP_VAR_GPA, PAGE_4K)
                .expect("vmemmap_base");
            b.map(VMEMMAP, STRUCT_PAGES_GPA, PAGE_4K)
                .expect("struct page");
            b.root()
        };
        image
            .write_u64(
                vmemmap_var - (vmemmap_var & !(PAGE_4K - 1)) + VMEMMAP_VAR_GPA,
                VMEMMAP,
            )
            .expect("vmemmap_base value");
        let policy = Policy::from_json(include_str!("../../config/default-policy.json"))
            .expect("default policy");
        Scene {
            image,
            cr3,
            profile,
            policy,
            current_task: (PERCPU_GPA, current_task & (PAGE_4K - 1)),
        }
    })
}

/// Guest memory that counts its reads.
struct Counted<'a> {
    image: &'a PhysImage,
    reads: Cell<u64>,
}

impl GuestPhys for Counted<'_> {
    fn ram_size(&self) -> u64 {
        self.image.ram_size()
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.reads.set(self.reads.get() + 1);
        self.image.read_phys(gpa, buf)
    }
}

fn swizzle(word: u64) -> u64 {
    match word >> 48 {
        0xaaaa => HEAP_VA + (word & 0xffff_ffff) % HEAP_LEN,
        0xaaab => VMEMMAP + (word & 0xffff_ffff) % PAGE_4K,
        _ => word,
    }
}

/// Writes `bytes` at guest-physical `gpa` (clipped to `limit`), swizzling tagged words.
fn write(image: &mut PhysImage, gpa: u64, limit: u64, bytes: &[u8]) {
    let mut data = bytes.to_vec();
    for chunk in data.chunks_exact_mut(8) {
        let w = swizzle(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    let len = (data.len() as u64).min(limit.saturating_sub(gpa));
    let _ = image.write(gpa, &data[..len as usize]);
}

/// Guest-physical address of heap offset `off` (virtual pages are scattered).
fn heap_gpa(off: u64) -> u64 {
    let page = off / PAGE_4K % HEAP_PAGES;
    HEAP_GPA + (page * 5 % HEAP_PAGES) * PAGE_4K + off % PAGE_4K
}

/// Writes `bytes` at heap offset `off` (virtual: page by page), swizzling tagged words.
fn write_heap(image: &mut PhysImage, off: u64, bytes: &[u8]) {
    let mut done = 0usize;
    while done < bytes.len() {
        let at = off + done as u64;
        if at >= HEAP_LEN {
            return;
        }
        let room = (PAGE_4K - at % PAGE_4K) as usize;
        // Swizzling looks at 8-byte words from the start of the write.
        let n = room.min(bytes.len() - done) / 8 * 8;
        let n = if n == 0 {
            room.min(bytes.len() - done)
        } else {
            n
        };
        let gpa = heap_gpa(at);
        write(image, gpa, gpa + n as u64, &bytes[done..done + n]);
        done += n;
    }
}

/// The guest image, hook arguments and operation an input describes.
fn build(data: &[u8]) -> (PhysImage, HookArgs, SocketOp) {
    let s = scene();
    let mut input = Input::new(data);
    let op = [
        SocketOp::Connect,
        SocketOp::Bind,
        SocketOp::Listen,
        SocketOp::Sendmsg,
    ][usize::from(input.u8() % 4)];
    let heap = |v: u16| HEAP_VA + (u64::from(v) * 8) % HEAP_LEN;
    let rdi = heap(input.u16());
    let rsi = heap(input.u16());
    let rdx = u64::from(input.u8());
    let task = heap(input.u16());
    let mut image = s.image.clone();
    let (page, off) = s.current_task;
    image.write_u64(page + off, task).expect("current_task");
    while !input.is_empty() {
        let region = input.u8() % 6;
        let offset = u64::from(input.u16());
        let len = usize::from(input.u8());
        let bytes = input.bytes(len);
        let (base, size) = match region {
            0 => (HEAP_GPA, HEAP_LEN),
            1 => (PERCPU_GPA, PAGE_4K),
            2 => (INIT_TASK_GPA, INIT_TASK_PAGES * PAGE_4K),
            3 => (VMEMMAP_VAR_GPA, PAGE_4K),
            4 => (STRUCT_PAGES_GPA, PAGE_4K),
            _ => (TABLES.0, TABLES.1 - TABLES.0),
        };
        if region == 0 {
            write_heap(&mut image, (offset * 2) % HEAP_LEN, bytes);
        } else {
            let at = base + offset % size;
            write(&mut image, at, base + size, bytes);
        }
    }
    let args = HookArgs {
        rdi,
        rsi,
        rdx,
        gs_base: GS_BASE,
        kaslr_slide: 0,
    };
    (image, args, op)
}

pub fn run(data: &[u8]) {
    let s = scene();
    let (image, args, op) = build(data);
    let mem = Counted {
        image: &image,
        reads: Cell::new(0),
    };
    let reader = VirtReader::new(&mem, s.cr3, PagingMode::Level4);
    match attribute(&reader, &s.profile, op, args) {
        Ok(mut a) => {
            assert_eq!(a.op, op);
            check_process(&a.process);
            let _ = s.policy.decide_explained(&a);
            let _ = s.policy.decide_noting(&mut a);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    assert!(
        mem.reads.get() <= READ_BOUND,
        "attribution read guest memory {} times",
        mem.reads.get()
    );
    mem.reads.set(0);
    reader.flush();
    if let Ok(p) = current_process(&reader, &s.profile, GS_BASE) {
        check_process(&p);
    }
    assert!(mem.reads.get() <= READ_BOUND);
}

fn check_process(p: &trap_handler::attribution::Process) {
    assert!(p.comm.text().chars().count() <= 16, "comm {:?}", p.comm);
    assert!(
        p.parent_comm.text().chars().count() <= 16,
        "comm {:?}",
        p.parent_comm
    );
    if let Some(exe) = &p.exe {
        // MAX_PATH_DEPTH (64) components of at most 255 bytes (lossy UTF-8: 3 bytes each).
        assert!(
            exe.len() <= 64 * (255 * 3 + 1),
            "exe of {} bytes",
            exe.len()
        );
    }
}

/// What attribution makes of input `data` (Debug text of the result), for the seed's test.
#[doc(hidden)]
pub fn attribute_seed_for_test(data: &[u8]) -> String {
    let (image, args, op) = build(data);
    let mem = Counted {
        image: &image,
        reads: Cell::new(0),
    };
    let reader = VirtReader::new(&mem, scene().cr3, PagingMode::Level4);
    format!("{:?}", attribute(&reader, &scene().profile, op, args))
}
