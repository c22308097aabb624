//! `attribute()` over synthetic guest memory laid out with the real kernel's BTF offsets.
//!
//! The profile (struct member offsets and sizes, the per-CPU offset of `current_task`) is built from the
//! real Debian vmlinux (located as in `common`); the guest is a synthetic physical image with 4-level
//! page tables: a per-CPU area on a 2 MiB page at the GS base, and a kernel "heap" of 4 KiB pages
//! mapped to scattered (never adjacent) physical pages, holding `task_struct`, `cred`, `mm_struct`,
//! `file`, dentry chains, `struct mount` objects (the embedded `vfsmount` included), `socket`,
//! `sock`, `msghdr` and `sockaddr` objects at the profile's offsets.
//!
//! The hostile images check that a guest can make attribution fail with a typed error or give a
//! bounded result, never panic, hang or read outside its RAM: every call runs on its own thread under
//! a time bound, through a guest-memory wrapper that counts physical reads and records their range.
//!
//! Unlike `real_kernel.rs` these tests skip (with a message) when no vmlinux is present: the
//! kernel itself is only the source of the offsets here, and `real_kernel.rs` already fails loudly
//! without one. An explicit `VIGIL_VMLINUX` that does not exist is still a failure.

mod common;

/// Counts the allocations of each thread: the trap path's are checked by
/// `the_trap_path_allocates_nothing`.
struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the count is a
// const-initialised thread-local without a destructor, which never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `layout` is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from the system allocator.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: CountingAlloc = CountingAlloc;

/// Allocations this thread makes while `f` runs.
fn allocations<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = ALLOCATIONS.with(|n| n.get());
    let out = f();
    (ALLOCATIONS.with(|n| n.get()) - before, out)
}

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use trap_handler::attribution::{
    attribute, attribute_with, current_process, Attribution, AttributionError, HookArgs, Process,
    RootsCache, SocketOp, TrapSymbols,
};
use trap_handler::btf::Btf;
use trap_handler::elf::{self, Elf};
use trap_handler::exec::{CodeOrigin, ExeFile, FileId, Steered};
use trap_handler::kallsyms::Kallsyms;
use trap_handler::mem::{
    GuestPhys, MemError, PageTableBuilder, PagingMode, PhysImage, VirtReader, PAGE_2M, PAGE_4K,
};
use trap_handler::policy::{Policy, Verdict};
use trap_handler::profile::{abi, Field, KernelProfile};

/// Guest RAM: page tables, heap pages, per-CPU area.
const RAM: u64 = 8 << 20;
const TABLES_GPA: u64 = 0x1000;
const TABLES_END: u64 = 0x10_0000;
/// The heap: `HEAP_PAGES` 4 KiB pages at `HEAP_VA` (a direct-map address), virtual page `i` mapped
/// to physical page `i * SCATTER mod HEAP_PAGES` above `HEAP_GPA`: consecutive virtual pages are never
/// physically adjacent, so every read that crosses a page must translate twice.
const HEAP_GPA: u64 = 0x10_0000;
const HEAP_PAGES: u64 = 1024;
const SCATTER: u64 = 389;
const HEAP_VA: u64 = 0xffff_8880_0400_0000;
/// First byte past the heap; the page there is not mapped.
const HEAP_END: u64 = HEAP_VA + HEAP_PAGES * PAGE_4K;
/// CPU 0's per-CPU area (MSR_GS_BASE in the kernel), one 2 MiB page.
const GS_BASE: u64 = 0xffff_8880_7fc0_0000;
const PERCPU_GPA: u64 = 0x60_0000;
/// A page mapped to guest-physical memory beyond RAM.
const ROGUE_VA: u64 = 0xffff_8880_9000_0000;
const ROGUE_GPA: u64 = 1 << 32;
/// A kernel address with no mapping at all.
const UNMAPPED_VA: u64 = 0xffff_8880_a000_0000;
/// The physical page behind the page of `init_task` that holds its `nsproxy`, and behind the
/// page of the `vmemmap_base` variable (the kernel image at its link address: KASLR slide 0).
const INIT_TASK_GPA: u64 = 0x50_0000;
const VMEMMAP_VAR_GPA: u64 = 0x50_1000;
/// The `struct page` array (`vmemmap_base`'s value): one page of it is mapped, at
/// [`STRUCT_PAGES_GPA`], holding the `struct page` of pfns 0x500..0x540, where the user pages are.
const VMEMMAP: u64 = 0xffff_ea00_0000_0000;
const STRUCT_PAGES_GPA: u64 = 0x52_0000;
/// The physical pages under the executable's text page at [`USER_RIP`], the library's first page
/// and the anonymous executable page.
const TEXT_GPA: u64 = 0x51_0000;
const LIB_GPA: u64 = 0x51_1000;
const ANON_GPA: u64 = 0x51_2000;
/// User addresses of the scene's process: its executable's text, a read-only page of it before
/// the text, a shared library's text, and an anonymous executable page.
const EXE_RO: (u64, u64) = (0x40_0000, 0x40_1000);
const EXE_TEXT: (u64, u64) = (0x40_1000, 0x4a_0000);
const LIB_TEXT: (u64, u64) = (0x7fff_f7a0_0000, 0x7fff_f7b8_0000);
const ANON_EXEC: (u64, u64) = (0x7fff_f7ff_0000, 0x7fff_f7ff_1000);
/// Where the process entered the kernel (`pt_regs->ip`): in its text.
const USER_RIP: u64 = 0x40_1234;
/// `struct vm_area_struct`, `struct inode`, `struct super_block` room (checked against the profile).
const VMA_SIZE: u64 = 256;
const INODE_SIZE: u64 = 1024;
const SB_SIZE: u64 = 2048;
/// `enum maple_type` and the encoding bits of lib/maple_tree.c (6.1).
const MAPLE_LEAF_64: u64 = 1;
const MAPLE_RANGE_64: u64 = 2;
const MAPLE_ARANGE_64: u64 = 3;
const MAPLE_ENODE_NULL: u64 = 0x04;
const MAPLE_ROOT_NODE: u64 = 0x02;

/// `MAX_PATH_DEPTH`, `MAX_PATH_STEPS` and `MAX_NAME` of trap-handler/src/attribution.rs.
const MAX_PATH_DEPTH: usize = 64;
const MAX_PATH_STEPS: usize = 128;
const MAX_NAME: usize = 255;
/// Bounds on one attribute() call: wall time and guest-physical reads (a normal one needs ~200).
const TIME_BOUND: Duration = Duration::from_secs(10);
const READ_BOUND: usize = 5_000;

/// Room allocated for the small objects (each checked against the profile).
const CRED_SIZE: u64 = 256;
const MM_SIZE: u64 = 2048;
const FILE_SIZE: u64 = 256;
const DENTRY_SIZE: u64 = 256;
const SOCKET_SIZE: u64 = 128;
const SOCK_SIZE: u64 = 2048;
const SOCKADDR_SIZE: u64 = 128;
/// `EXT4_SUPER_MAGIC` (include/uapi/linux/magic.h): the root filesystem's.
const EXT4_SUPER_MAGIC: u64 = 0xef53;
/// The `f_flags` of a file `execve` opened: `O_LARGEFILE | O_RDONLY | __FMODE_EXEC`.
const EXEC_OPEN_FLAGS: u32 = 0o100000 | abi::FMODE_EXEC_OPEN;
/// The `f_flags` of a file `open(path, O_RDONLY)` opened (glibc adds O_LARGEFILE).
const USER_OPEN_FLAGS: u32 = 0o100000;
const MSGHDR_SIZE: u64 = 128;

// ------------------------------------------------------------------------------------------------
// The profile, from the real vmlinux.

/// The vmlinux, if there is one: `$VIGIL_VMLINUX` (must exist when set), else the paths `common`
/// searches.
fn vmlinux_if_present() -> Option<PathBuf> {
    let ws = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let present = std::env::var_os("VIGIL_VMLINUX").is_some()
        || ["build/tenant/vmlinux", "build/vmi/vmlinux"]
            .iter()
            .any(|rel| ws.join(rel).is_file());
    present.then(common::vmlinux_path)
}

fn profile() -> Option<&'static KernelProfile> {
    static P: OnceLock<Option<KernelProfile>> = OnceLock::new();
    P.get_or_init(|| {
        let path = vmlinux_if_present()?;
        let bytes = std::fs::read(&path).expect("read vmlinux");
        let elf = Elf::parse(&bytes).expect("vmlinux is ELF64");
        let btf = Btf::from_elf(&elf).expect("BTF");
        let (kallsyms, _) = Kallsyms::from_elf(&elf).expect("kallsyms");
        let build_id = elf.build_id().map(elf::hex);
        Some(KernelProfile::build(&btf, Some(&kallsyms), build_id).expect("profile"))
    })
    .as_ref()
}

/// The profile, or return from the test with a skip message.
macro_rules! profile_or_skip {
    () => {
        match profile() {
            Some(p) => p,
            None => {
                eprintln!(
                    "SKIPPED: no vmlinux (VIGIL_VMLINUX, build/tenant/vmlinux, build/vmi/vmlinux); \
                     run scripts/build-tenant-image to run the synthetic attribution tests"
                );
                return;
            }
        }
    };
}

// ------------------------------------------------------------------------------------------------
// Guest memory that counts what is read.

struct Counted<'a> {
    img: &'a PhysImage,
    reads: Cell<usize>,
    lo: Cell<u64>,
    hi: Cell<u64>,
}

impl GuestPhys for Counted<'_> {
    fn ram_size(&self) -> u64 {
        self.img.ram_size()
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.reads.set(self.reads.get() + 1);
        self.lo.set(self.lo.get().min(gpa));
        self.hi
            .set(self.hi.get().max(gpa.saturating_add(buf.len() as u64)));
        self.img.read_phys(gpa, buf)
    }
}

/// One attribute() (or current_process()) call and what it read.
#[derive(Debug)]
struct Outcome<T = Attribution> {
    result: Result<T, AttributionError>,
    phys_reads: usize,
    /// Lowest guest-physical address read and one past the highest (attempts, refused ones included).
    gpa_lo: u64,
    gpa_hi: u64,
}

impl<T: std::fmt::Debug> Outcome<T> {
    fn ok(self) -> T {
        match self.result {
            Ok(a) => a,
            Err(e) => panic!("attribution failed: {e}"),
        }
    }

    fn mem_err(self) -> MemError {
        match self.result {
            Err(AttributionError::Memory(e)) => e,
            other => panic!("expected a memory error, got {other:?}"),
        }
    }
}

/// Runs attribute() on its own thread: a hang fails the test after `TIME_BOUND` instead of blocking
/// it, a panic fails it with a clear message, and the physical reads are bounded.
fn run_bounded(
    img: &PhysImage,
    cr3: u64,
    profile: &KernelProfile,
    op: SocketOp,
    args: HookArgs,
) -> Outcome {
    run_bounded_fn(img, cr3, profile, move |r, p| attribute(r, p, op, args))
}

/// Runs `f` (an attribution entry point) under the bounds of [`run_bounded`].
fn run_bounded_fn<T, F>(img: &PhysImage, cr3: u64, profile: &KernelProfile, f: F) -> Outcome<T>
where
    T: Send + 'static,
    F: FnOnce(&VirtReader<'_, Counted<'_>>, &KernelProfile) -> Result<T, AttributionError>
        + Send
        + 'static,
{
    let (img, profile) = (img.clone(), profile.clone());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mem = Counted {
            img: &img,
            reads: Cell::new(0),
            lo: Cell::new(u64::MAX),
            hi: Cell::new(0),
        };
        let r = VirtReader::new(&mem, cr3, PagingMode::Level4);
        let result = f(&r, &profile);
        let _ = tx.send(Outcome {
            result,
            phys_reads: mem.reads.get(),
            gpa_lo: mem.lo.get(),
            gpa_hi: mem.hi.get(),
        });
    });
    let out = match rx.recv_timeout(TIME_BOUND) {
        Ok(out) => out,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("attribution did not return within {TIME_BOUND:?}: an unbounded walk")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("attribution panicked (see the thread's message above)")
        }
    };
    assert!(
        out.phys_reads <= READ_BOUND,
        "{} guest-physical reads for one attribution",
        out.phys_reads
    );
    out
}

// ------------------------------------------------------------------------------------------------
// The synthetic guest.

struct Guest {
    img: PhysImage,
    cr3: u64,
    /// Next free heap address.
    next: u64,
}

impl Guest {
    /// `extra`: more 4 KiB pages to map (virtual, physical).
    fn new(extra: &[(u64, u64)]) -> Guest {
        let mut img = PhysImage::new(RAM as usize);
        let cr3 = {
            let mut b = PageTableBuilder::new(&mut img, PagingMode::Level4, TABLES_GPA, TABLES_END)
                .unwrap();
            for i in 0..HEAP_PAGES {
                let gpa = HEAP_GPA + (i * SCATTER % HEAP_PAGES) * PAGE_4K;
                b.map(HEAP_VA + i * PAGE_4K, gpa, PAGE_4K).unwrap();
            }
            b.map(GS_BASE, PERCPU_GPA, PAGE_2M).unwrap();
            b.map(ROGUE_VA, ROGUE_GPA, PAGE_4K).unwrap();
            for &(va, gpa) in extra {
                b.map(va & !(PAGE_4K - 1), gpa, PAGE_4K).unwrap();
            }
            b.root()
        };
        Guest {
            img,
            cr3,
            next: HEAP_VA,
        }
    }

    fn reader(&self) -> VirtReader<'_, PhysImage> {
        VirtReader::new(&self.img, self.cr3, PagingMode::Level4)
    }

    fn gpa(&self, va: u64) -> u64 {
        self.reader().translate(va).expect("mapped").gpa
    }

    fn read_u8(&self, va: u64) -> u8 {
        self.reader().read_u8(va).expect("mapped")
    }

    /// Writes `data` at a mapped virtual address, page by page.
    fn write(&mut self, va: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let t = self
                .reader()
                .translate(va + done as u64)
                .unwrap_or_else(|e| panic!("test object at {va:#x} not mapped: {e}"));
            let n = (t.bytes_left_in_page() as usize).min(data.len() - done);
            self.img.write(t.gpa, &data[done..done + n]).unwrap();
            done += n;
        }
    }

    fn alloc(&mut self, size: u64) -> u64 {
        let va = (self.next + 63) & !63;
        self.next = va + size;
        assert!(self.next <= HEAP_END, "synthetic heap exhausted");
        va
    }

    /// An object of `size` bytes placed so that the `len`-byte field at `field_offset` straddles a page
    /// boundary (half on each side).
    fn alloc_straddling(&mut self, size: u64, field_offset: u64, len: u64) -> u64 {
        let page = (self.next + PAGE_4K - 1) & !(PAGE_4K - 1);
        let want = PAGE_4K - len / 2;
        let va = page + (want + PAGE_4K - field_offset % PAGE_4K) % PAGE_4K;
        self.next = va + size;
        assert!(self.next <= HEAP_END, "synthetic heap exhausted");
        va
    }

    /// A NUL-terminated string on the heap.
    fn string(&mut self, s: &[u8]) -> u64 {
        let va = self.alloc(s.len() as u64 + 1);
        self.write(va, s);
        self.write(va + s.len() as u64, &[0]);
        va
    }

    /// Writes a struct member, checking the profile agrees on its size.
    fn set(&mut self, base: u64, f: Field, bytes: &[u8]) {
        assert_eq!(f.size, bytes.len() as u64, "field at +{:#x}", f.offset);
        self.write(base + f.offset, bytes);
    }
    fn set_u16(&mut self, base: u64, f: Field, v: u16) {
        self.set(base, f, &v.to_le_bytes());
    }
    fn set_u32(&mut self, base: u64, f: Field, v: u32) {
        self.set(base, f, &v.to_le_bytes());
    }
    fn set_u64(&mut self, base: u64, f: Field, v: u64) {
        self.set(base, f, &v.to_le_bytes());
    }
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut b = vec![0xaa; abi::SOCKADDR_IN_LEN]; // sin_zero is not read: garbage there
    b[abi::SIN_FAMILY..abi::SIN_FAMILY + 2].copy_from_slice(&abi::AF_INET.to_le_bytes());
    b[abi::SIN_PORT..abi::SIN_PORT + 2].copy_from_slice(&port.to_be_bytes());
    b[abi::SIN_ADDR..abi::SIN_ADDR + 4].copy_from_slice(&ip.octets());
    b
}

fn sockaddr_in6(ip: Ipv6Addr, port: u16) -> Vec<u8> {
    let mut b = vec![0; abi::SOCKADDR_IN6_LEN];
    b[abi::SIN6_FAMILY..abi::SIN6_FAMILY + 2].copy_from_slice(&abi::AF_INET6.to_le_bytes());
    b[abi::SIN6_PORT..abi::SIN6_PORT + 2].copy_from_slice(&port.to_be_bytes());
    b[abi::SIN6_FLOWINFO..abi::SIN6_FLOWINFO + 4].copy_from_slice(&0x000f_1234u32.to_be_bytes());
    b[abi::SIN6_ADDR..abi::SIN6_ADDR + 16].copy_from_slice(&ip.octets());
    b[abi::SIN6_SCOPE_ID..abi::SIN6_SCOPE_ID + 4].copy_from_slice(&7u32.to_le_bytes());
    b
}

/// Room for a `struct mount`: past the last member the path walk reads (the profile gives the
/// offsets only, not the size of the struct).
fn mount_size(p: &KernelProfile) -> u64 {
    let m = &p.mount;
    [
        m.mnt.offset,
        m.mnt_parent.offset,
        m.mnt_mountpoint.offset,
        m.mnt.offset + m.vfsmount_mnt_root.offset,
        m.mnt.offset + p.exec.vfsmount_mnt_sb.offset,
        p.exec.mount_mnt_ns.offset,
    ]
    .into_iter()
    .max()
    .unwrap()
        + 8
}

/// A guest stopped in `security_socket_connect` of `curl` (pid 4242, a thread of tgid 4240, uid 1000,
/// started by `bash`, tgid 77), with `/usr/bin/curl` on the root mount as its executable and a
/// TCP/IPv4 socket connecting to 203.0.113.7:443 (the same destination in its `msghdr` for sendmsg).
struct Scene {
    p: &'static KernelProfile,
    g: Guest,
    task: u64,
    parent: u64,
    cred: u64,
    mm: u64,
    file: u64,
    /// The dentries of `/`, `/usr`, `/usr/bin`, `/usr/bin/curl`.
    root: u64,
    usr: u64,
    bin: u64,
    exe: u64,
    /// The `struct mount` of `/`: the root of the mount tree (its own parent).
    root_mount: u64,
    socket: u64,
    sk: u64,
    addr: u64,
    addrlen: u64,
    /// The kernel's copy of the `msghdr` of a sendmsg, naming `addr`.
    msghdr: u64,
    /// Init's mount namespace (`init_task.nsproxy->mnt_ns`), where the root mount is.
    init_ns: u64,
    /// The root filesystem's superblock, the executable's inode, its `pt_regs` on the kernel
    /// stack.
    sb: u64,
    inode: u64,
    regs: u64,
    /// The VMAs: the executable's read-only page and text, a library's text (inode `lib_inode`),
    /// an anonymous executable page.
    vma_ro: u64,
    vma_text: u64,
    vma_lib: u64,
    vma_anon: u64,
    lib_inode: u64,
    /// The maple tree's root node (an arange_64 over two leaves) and its leaves.
    maple_root: u64,
    maple_leaves: [u64; 2],
}

impl Scene {
    fn new(p: &'static KernelProfile) -> Scene {
        let t = &p.task_struct;
        for (what, size, end) in [
            ("cred", CRED_SIZE, p.cred.egid.offset + 4),
            ("mm_struct", MM_SIZE, p.mm_struct.exe_file.offset + 8),
            (
                "file",
                FILE_SIZE,
                (p.file.f_path.offset + p.file.f_path.size)
                    .max(p.exec.file_f_flags.unwrap().offset + 4),
            ),
            (
                "dentry",
                DENTRY_SIZE,
                (p.dentry.d_name.offset + p.dentry.d_name.size).max(p.dentry.d_parent.offset + 8),
            ),
            ("socket", SOCKET_SIZE, p.socket.sk.offset + 8),
            (
                "sock",
                SOCK_SIZE,
                [
                    p.sock.sk_protocol.offset + 2,
                    p.sock.skc_v6_rcv_saddr.offset + 16,
                    p.sock.skc_num.offset + 2,
                ]
                .into_iter()
                .max()
                .unwrap(),
            ),
            (
                "msghdr",
                MSGHDR_SIZE,
                (p.msghdr.msg_name.offset + 8).max(p.msghdr.msg_namelen.offset + 4),
            ),
        ] {
            assert!(
                end <= size,
                "{what} needs {end} bytes, the test gives it {size}"
            );
        }
        let current_task = *p
            .symbols
            .get("current_task")
            .expect("the profile has current_task");
        assert!(
            current_task + 8 <= PAGE_2M,
            "current_task {current_task:#x}"
        );

        let init_task = *p
            .symbols
            .get("init_task")
            .expect("the profile has init_task");
        let init_nsproxy_field = init_task + p.exec.task_nsproxy.offset;
        let vmemmap_var = *p
            .symbols
            .get("vmemmap_base")
            .expect("the profile has vmemmap_base");
        let struct_pages = VMEMMAP + (TEXT_GPA >> 12) * p.exec.page_size;
        let mut g = Guest::new(&[
            (init_nsproxy_field, INIT_TASK_GPA),
            (vmemmap_var, VMEMMAP_VAR_GPA),
            (struct_pages, STRUCT_PAGES_GPA),
            (USER_RIP, TEXT_GPA),
            (LIB_TEXT.0, LIB_GPA),
            (ANON_EXEC.0, ANON_GPA),
        ]);
        g.write(vmemmap_var, &VMEMMAP.to_le_bytes());
        // `comm` straddles two (physically distant) pages.
        let task = g.alloc_straddling(t.size, t.comm.offset, t.comm.size);
        let parent = g.alloc(t.size);
        let cred = g.alloc(CRED_SIZE);
        let real_cred = g.alloc(CRED_SIZE);
        let parent_cred = g.alloc(CRED_SIZE);
        let mm = g.alloc(MM_SIZE);
        let file = g.alloc(FILE_SIZE);
        let socket = g.alloc(SOCKET_SIZE);
        let sk = g.alloc(SOCK_SIZE);
        let addr = g.alloc(SOCKADDR_SIZE);
        let msghdr = g.alloc(MSGHDR_SIZE);

        let mut s = Scene {
            p,
            g,
            task,
            parent,
            cred,
            mm,
            file,
            root: 0,
            usr: 0,
            bin: 0,
            exe: 0,
            root_mount: 0,
            socket,
            sk,
            addr,
            addrlen: 0,
            msghdr,
            init_ns: 0,
            sb: 0,
            inode: 0,
            regs: 0,
            vma_ro: 0,
            vma_text: 0,
            vma_lib: 0,
            vma_anon: 0,
            lib_inode: 0,
            maple_root: 0,
            maple_leaves: [0; 2],
        };
        s.g.write(GS_BASE + current_task, &task.to_le_bytes());

        // The task: a thread (pid != tgid), with distinct cred and real_cred.
        s.g.set_u32(task, t.pid, 4242);
        s.g.set_u32(task, t.tgid, 4240);
        s.set_comm(task, b"curl");
        s.g.set_u64(task, t.cred, cred);
        s.g.set_u64(task, t.real_cred, real_cred);
        s.g.set_u64(task, t.real_parent, parent);
        s.g.set_u64(task, t.parent, parent);
        s.g.set_u64(task, t.group_leader, task);
        s.g.set_u64(task, t.mm, mm);
        s.g.set_u64(task, t.active_mm, mm);
        // Every credential field differs, so a wrong offset shows.
        for (c, base) in [(cred, 1000), (real_cred, 5000), (parent_cred, 9000)] {
            s.g.set_u32(c, p.cred.uid, base);
            s.g.set_u32(c, p.cred.gid, base + 1);
            s.g.set_u32(c, p.cred.euid, base + 2);
            s.g.set_u32(c, p.cred.egid, base + 3);
        }
        // The parent: pid differs from tgid, so ppid must be its tgid.
        s.g.set_u32(parent, t.pid, 78);
        s.g.set_u32(parent, t.tgid, 77);
        s.set_comm(parent, b"bash");
        s.g.set_u64(parent, t.cred, parent_cred);
        s.g.set_u64(parent, t.real_cred, parent_cred);
        s.g.set_u64(parent, t.real_parent, parent);
        s.g.set_u64(parent, t.mm, UNMAPPED_VA); // never followed

        // mm->exe_file->f_path: /usr/bin/curl on the root mount.
        s.g.set_u64(mm, p.mm_struct.exe_file, file);
        s.root = s.dentry(b"/", None);
        s.usr = s.dentry(b"usr", Some(s.root));
        s.bin = s.dentry(b"bin", Some(s.usr));
        s.exe = s.dentry(b"curl", Some(s.bin));
        // Init's mount namespace, and the root filesystem (its superblock's root is `/`).
        let nsproxy = s.g.alloc(64);
        s.init_ns = s.g.alloc(64);
        s.g.write(init_nsproxy_field, &nsproxy.to_le_bytes());
        s.g.set_u64(nsproxy, p.exec.nsproxy_mnt_ns, s.init_ns);
        s.sb = s.superblock(s.root, 0x0080_0001);
        s.root_mount = s.mount(s.root, None);
        s.set_exe(s.exe, s.root_mount);
        // The executable's inode, and a library's.
        s.inode = s.inode(s.sb, 1234, 0x5eed, (1_700_000_000, 42));
        s.lib_inode = s.inode(s.sb, 777, 0x1111, (1_600_000_000, 7));
        s.g.set_u64(file, p.exec.file_f_inode, s.inode);
        // Opened by execve: O_LARGEFILE | O_RDONLY | __FMODE_EXEC (fs/exec.c, do_open_execat).
        s.g.set_u32(file, p.exec.file_f_flags.unwrap(), EXEC_OPEN_FLAGS);
        // The pages under the user addresses: the text's and the library's are their files' page
        // cache (`page->mapping == inode->i_mapping`), the anonymous one an anon_vma (bit 0).
        for (inode, gpa) in [(s.inode, TEXT_GPA), (s.lib_inode, LIB_GPA)] {
            let mapping = s.page_cache(inode);
            s.set_page_mapping(gpa, mapping);
        }
        let anon_vma = s.g.alloc(64);
        s.set_page_mapping(ANON_GPA, anon_vma | 1);
        // The kernel stack (THREAD_SIZE, 16 KiB) and the user registers at its top.
        let stack = s.g.alloc(p.exec.thread_size);
        s.g.set_u64(task, p.exec.task_stack, stack);
        s.regs = stack + p.exec.thread_size - p.exec.pt_regs_size;
        s.g.set_u64(s.regs, p.exec.pt_regs_cs, 0x33); // __USER_CS
        s.set_rip(USER_RIP);
        // The VMAs (the text mapped through a `file` of its own, as mmap leaves it) and the maple
        // tree of 6.1 over them: an arange_64 root over two leaf_64 nodes.
        let (exe_map, lib_map) = (s.g.alloc(FILE_SIZE), s.g.alloc(FILE_SIZE));
        s.g.set_u64(exe_map, p.exec.file_f_inode, s.inode);
        s.g.set_u64(lib_map, p.exec.file_f_inode, s.lib_inode);
        s.vma_ro = s.vma(EXE_RO, 0x1, exe_map);
        s.vma_text = s.vma(EXE_TEXT, 0x5, exe_map);
        s.vma_lib = s.vma(LIB_TEXT, 0x5, lib_map);
        s.vma_anon = s.vma(ANON_EXEC, 0x7, 0);
        s.g.set_u64(mm, p.exec.mm_start_code, EXE_TEXT.0);
        let leaf0 = s.maple_node(
            &[EXE_RO.0 - 1, EXE_RO.1 - 1, EXE_TEXT.1 - 1],
            &[0, s.vma_ro, s.vma_text, 0],
        );
        let leaf1 = s.maple_node(
            &[
                LIB_TEXT.0 - 1,
                LIB_TEXT.1 - 1,
                ANON_EXEC.0 - 1,
                ANON_EXEC.1 - 1,
            ],
            &[0, s.vma_lib, 0, s.vma_anon, 0],
        );
        s.maple_leaves = [leaf0, leaf1];
        let root = s.maple_node_of(
            MAPLE_ARANGE_64,
            &[EXE_TEXT.1 - 1],
            &[encode(leaf0, MAPLE_LEAF_64), encode(leaf1, MAPLE_LEAF_64)],
        );
        s.maple_root = root;
        s.set_maple_root(encode(root, MAPLE_ARANGE_64) | MAPLE_ROOT_NODE);

        // A TCP/IPv4 socket; the connected/bound address fields of sock hold decoys.
        s.g.set_u32(socket, p.socket.state, 1); // SS_UNCONNECTED
        s.g.set_u16(socket, p.socket.type_, abi::SOCK_STREAM);
        s.g.set_u64(socket, p.socket.sk, sk);
        s.set_sock(abi::AF_INET, abi::SOCK_STREAM, abi::IPPROTO_TCP);
        s.g.set(sk, p.sock.skc_rcv_saddr, &[10, 0, 0, 5]);
        s.g.set_u16(sk, p.sock.skc_num, 8080);
        s.g.set(sk, p.sock.skc_daddr, &[192, 0, 2, 99]);
        s.g.set_u16(sk, p.sock.skc_dport, 9999u16.to_be());
        s.g.set(sk, p.sock.skc_v6_rcv_saddr, &[0xee; 16]);
        s.g.set_u64(msghdr, p.msghdr.msg_name, addr);
        s.set_sockaddr(&sockaddr_in(Ipv4Addr::new(203, 0, 113, 7), 443));
        s
    }

    /// A superblock of device `dev` whose root dentry is `root`.
    fn superblock(&mut self, root: u64, dev: u32) -> u64 {
        let sb = self.g.alloc(SB_SIZE);
        let e = &self.p.exec;
        assert!(e.sb_s_root.offset + 8 <= SB_SIZE && e.sb_s_dev.offset + 4 <= SB_SIZE);
        assert!(e.sb_s_magic.unwrap().offset + 8 <= SB_SIZE);
        self.g.set_u64(sb, e.sb_s_root, root);
        self.g.set_u32(sb, e.sb_s_dev, dev);
        self.g.set_u64(sb, e.sb_s_magic.unwrap(), EXT4_SUPER_MAGIC);
        sb
    }

    /// The page cache (`struct address_space`) of `inode`, its `host`.
    fn page_cache(&mut self, inode: u64) -> u64 {
        let mapping = self.g.alloc(64);
        let e = &self.p.exec;
        let host = e.mapping_host.unwrap();
        assert!(host.offset + 8 <= 64);
        self.g.set_u64(mapping, host, inode);
        self.g.set_u64(inode, e.inode_i_mapping, mapping);
        mapping
    }

    /// An inode of superblock `sb` (one link: a directory names it).
    fn inode(&mut self, sb: u64, ino: u64, generation: u32, ctime: (i64, u32)) -> u64 {
        let inode = self.g.alloc(INODE_SIZE);
        let e = &self.p.exec;
        assert!(e.inode_i_generation.offset + 4 <= INODE_SIZE);
        assert!(e.inode_i_nlink.unwrap().offset + 4 <= INODE_SIZE);
        self.g.set_u32(inode, e.inode_i_nlink.unwrap(), 1);
        // A system file: root's (the zeroed `i_uid`), rwxr-xr-x.
        assert!(e.inode_i_mode.unwrap().offset + 2 <= INODE_SIZE);
        self.g.set_u16(inode, e.inode_i_mode.unwrap(), 0o100_755);
        self.g.set_u64(inode, e.inode_i_sb, sb);
        self.g.set_u64(inode, e.inode_i_ino, ino);
        self.g.set_u32(inode, e.inode_i_generation, generation);
        self.g.set_u64(inode, e.inode_ctime_sec, ctime.0 as u64);
        self.g
            .set_u64(inode, e.inode_ctime_nsec, u64::from(ctime.1));
        inode
    }

    /// A VMA over `range` with `flags` (VM_READ 1, VM_WRITE 2, VM_EXEC 4), mapped from `file`.
    fn vma(&mut self, range: (u64, u64), flags: u64, file: u64) -> u64 {
        let vma = self.g.alloc(VMA_SIZE);
        let e = &self.p.exec;
        assert!(e.vma_vm_file.offset + 8 <= VMA_SIZE);
        self.g.set_u64(vma, e.vma_vm_start, range.0);
        self.g.set_u64(vma, e.vma_vm_end, range.1);
        self.g.set_u64(vma, e.vma_vm_flags, flags);
        self.g.set_u64(vma, e.vma_vm_file, file);
        vma
    }

    /// A leaf_64 maple node with these pivots and slots.
    fn maple_node(&mut self, pivots: &[u64], slots: &[u64]) -> u64 {
        self.maple_node_of(MAPLE_LEAF_64, pivots, slots)
    }

    /// A maple node (256-byte aligned, as the kernel's slab gives them) of type `ty`.
    fn maple_node_of(&mut self, ty: u64, pivots: &[u64], slots: &[u64]) -> u64 {
        let va = self.g.alloc(512);
        let node = (va + 255) & !255;
        self.fill_maple_node(node, ty, pivots, slots);
        node
    }

    /// (Re)writes a maple node: unused pivots and slots are zero, the metadata's data end is
    /// the last slot given (as the kernel keeps it for a node that is not full).
    fn fill_maple_node(&mut self, node: u64, ty: u64, pivots: &[u64], slots: &[u64]) {
        let e = &self.p.exec;
        let (pf, sf, mf) = if ty == MAPLE_ARANGE_64 {
            (e.ma64_pivot, e.ma64_slot, e.ma64_meta_end)
        } else {
            (e.mr64_pivot, e.mr64_slot, e.mr64_meta_end)
        };
        assert!(pivots.len() as u64 <= pf.size / 8 && slots.len() as u64 <= sf.size / 8);
        let mut pb = vec![0u8; pf.size as usize];
        for (i, v) in pivots.iter().enumerate() {
            pb[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let mut sb = vec![0u8; sf.size as usize];
        for (i, v) in slots.iter().enumerate() {
            sb[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        self.g.set(node, pf, &pb);
        self.g.set(node, sf, &sb);
        // A full node has no metadata: it shares the last slot (maple_range_64's union).
        if (slots.len() as u64) < sf.size / 8 {
            self.g.set(node, mf, &[slots.len() as u8 - 1]);
        }
    }

    fn set_maple_root(&mut self, entry: u64) {
        let (mm, f) = (self.mm, self.p.exec.mm_mt_root);
        self.g.set_u64(mm, f, entry);
    }

    /// The `struct page` of the physical page `gpa`.
    fn struct_page(&self, gpa: u64) -> u64 {
        VMEMMAP + (gpa >> 12) * self.p.exec.page_size
    }

    fn set_page_mapping(&mut self, gpa: u64, mapping: u64) {
        let (page, f) = (self.struct_page(gpa), self.p.exec.page_mapping);
        self.g.set_u64(page, f, mapping);
    }

    /// The caller's user instruction pointer (`pt_regs->ip`).
    fn set_rip(&mut self, rip: u64) {
        let (regs, f) = (self.regs, self.p.exec.pt_regs_ip);
        self.g.set_u64(regs, f, rip);
    }

    /// The identity the scene's executable has.
    fn exe_id(&self) -> FileId {
        FileId {
            dev: 0x0080_0001,
            ino: 1234,
            generation: 0x5eed,
            ctime_sec: 1_700_000_000,
            ctime_nsec: 42,
        }
    }

    /// The executable file as attribute() reports it for the scene.
    fn exe_file(&self) -> ExeFile {
        ExeFile {
            id: self.exe_id(),
            init_mnt_ns: true,
            bind_mount: false,
            code: CodeOrigin::Exe,
            from_exec: true,
            steered: None,
            rip: USER_RIP,
        }
    }

    fn set_comm(&mut self, task: u64, name: &[u8]) {
        let mut b = [0u8; abi::TASK_COMM_LEN];
        b[..name.len()].copy_from_slice(name);
        self.g.set(task, self.p.task_struct.comm, &b);
    }

    /// Points a dentry's `d_name` at `name` (of recorded length `len`).
    fn set_name(&mut self, dentry: u64, len: u32, name: u64) {
        let qstr = dentry + self.p.dentry.d_name.offset;
        self.g.set_u32(qstr, self.p.qstr.len, len);
        self.g.set_u64(qstr, self.p.qstr.name, name);
    }

    fn set_parent(&mut self, dentry: u64, parent: u64) {
        self.g.set_u64(dentry, self.p.dentry.d_parent, parent);
    }

    /// A dentry named `name` under `parent` (none: a root, its own parent).
    fn dentry(&mut self, name: &[u8], parent: Option<u64>) -> u64 {
        let d = self.g.alloc(DENTRY_SIZE);
        let name_va = self.g.string(name);
        self.set_name(d, name.len() as u32, name_va);
        self.set_parent(d, parent.unwrap_or(d));
        d
    }

    fn set_sock(&mut self, family: u16, sock_type: u16, protocol: u16) {
        let (sk, s) = (self.sk, &self.p.sock);
        self.g.set_u16(sk, s.skc_family, family);
        self.g.set_u16(sk, s.sk_type, sock_type);
        self.g.set_u16(sk, s.sk_protocol, protocol);
        self.g.set_u16(self.socket, self.p.socket.type_, sock_type);
    }

    fn set_sockaddr(&mut self, b: &[u8]) {
        self.g.write(self.addr, b);
        self.addrlen = b.len() as u64;
        let (msghdr, namelen) = (self.msghdr, self.p.msghdr.msg_namelen);
        self.g.set_u32(msghdr, namelen, b.len() as u32);
    }

    /// A `struct mount` for the filesystem whose root dentry is `root`, mounted on the dentry
    /// `mountpoint` of the mount `parent`; `None`: the root of a mount tree, its own parent and
    /// mounted on its own root (as the kernel leaves it). Returns the `struct mount`.
    fn mount(&mut self, root: u64, on: Option<(u64, u64)>) -> u64 {
        let p = self.p;
        let m = &p.mount;
        let mnt = self.g.alloc(mount_size(p));
        let (parent, mountpoint) = on.unwrap_or((mnt, root));
        self.g.set_u64(mnt, m.mnt_parent, parent);
        self.g.set_u64(mnt, m.mnt_mountpoint, mountpoint);
        self.g
            .set_u64(mnt + m.mnt.offset, m.vfsmount_mnt_root, root);
        // In init's namespace, on the root filesystem (a bind mount unless `root` is `/`).
        let (ns, sb) = (self.init_ns, self.sb);
        self.g.set_u64(mnt, p.exec.mount_mnt_ns, ns);
        self.g
            .set_u64(mnt + m.mnt.offset, p.exec.vfsmount_mnt_sb, sb);
        mnt
    }

    /// The `vfsmount` embedded in a `struct mount` (what `struct path` points at).
    fn vfsmount(&self, mount: u64) -> u64 {
        mount + self.p.mount.mnt.offset
    }

    /// Makes the executable (`mm->exe_file->f_path`) the dentry `dentry` on the mount `mount`.
    fn set_exe(&mut self, dentry: u64, mount: u64) {
        let (f_path, vfsmount) = (self.file + self.p.file.f_path.offset, self.vfsmount(mount));
        self.g.set_u64(f_path, self.p.path.dentry, dentry);
        self.g.set_u64(f_path, self.p.path.mnt, vfsmount);
    }

    /// Dentries named `names`, each under the one before, the first under `parent`; the last one.
    fn chain<S: AsRef<[u8]>>(&mut self, parent: u64, names: impl IntoIterator<Item = S>) -> u64 {
        names
            .into_iter()
            .fold(parent, |d, name| self.dentry(name.as_ref(), Some(d)))
    }

    /// The executable's path as attribute() reports it (the whole result, errors included).
    fn exe_result(&self) -> Result<Option<String>, AttributionError> {
        let out = self.run(SocketOp::Connect);
        out.result.map(|a| a.process.exe.map(|e| e.to_string()))
    }

    /// The registers at the hook of `op`.
    fn args(&self, op: SocketOp) -> HookArgs {
        let (rsi, rdx) = match op {
            SocketOp::Connect | SocketOp::Bind => (self.addr, self.addrlen),
            // listen(sock, backlog): RDX is whatever the caller left there.
            SocketOp::Listen => (4096, 0xdead_beef),
            // sendmsg(sock, msg, size): the payload's size.
            SocketOp::Sendmsg => (self.msghdr, 1200),
        };
        HookArgs {
            rdi: self.socket,
            rsi,
            rdx,
            gs_base: GS_BASE,
            kaslr_slide: 0,
        }
    }

    fn run_with(&self, op: SocketOp, args: HookArgs) -> Outcome {
        run_bounded(&self.g.img, self.g.cr3, self.p, op, args)
    }

    fn run(&self, op: SocketOp) -> Outcome {
        self.run_with(op, self.args(op))
    }

    /// The process as attribute() reports it, less its executable file (see [`bare`]).
    fn process(&self) -> Process {
        Process {
            pid: 4242,
            tgid: 4240,
            comm: "curl".into(),
            exe: Some("/usr/bin/curl".into()),
            uid: 1000,
            ppid: 77,
            parent_comm: "bash".into(),
            exe_file: None,
            exe_error: None,
        }
    }
}

/// The encoded pointer of a maple node of type `ty` in its parent's slot (`mt_mk_node`).
fn encode(node: u64, ty: u64) -> u64 {
    node | (ty << 3) | MAPLE_ENODE_NULL
}

/// A process less its executable file: what the path and task tests compare (the identity has
/// tests of its own).
/// The bytes of a `task_struct` attribution reads in one pass (pid, tgid, comm, cred,
/// real_parent, mm): its first offset and its length.
fn task_span(p: &KernelProfile) -> (u64, u64) {
    let t = &p.task_struct;
    let fields = [t.pid, t.tgid, t.comm, t.cred, t.real_parent, t.mm];
    let lo = fields.iter().map(|f| f.offset).min().unwrap();
    let hi = fields.iter().map(|f| f.offset + f.size).max().unwrap();
    (lo, hi - lo)
}

fn bare(mut p: Process) -> Process {
    p.exe_file = None;
    p.exe_error = None;
    p
}

// ------------------------------------------------------------------------------------------------
// Well-formed guests.

#[test]
fn connect_ipv4_attributes_process_and_destination() {
    let p = profile_or_skip!();
    let s = Scene::new(p);
    // The image really exercises page crossing: comm spans two physically distant pages.
    let comm = s.task + p.task_struct.comm.offset;
    assert_ne!(s.g.gpa(comm) + 15, s.g.gpa(comm + 15));
    assert_eq!(s.g.gpa(comm + 15) & (PAGE_4K - 1), 15 - 8);

    let out = s.run(SocketOp::Connect);
    // Everything read is guest RAM.
    assert!(out.gpa_hi <= RAM, "read up to {:#x}", out.gpa_hi);
    assert_eq!(
        out.ok(),
        Attribution {
            op: SocketOp::Connect,
            family: abi::AF_INET,
            sock_type: abi::SOCK_STREAM,
            protocol: abi::IPPROTO_TCP,
            addr: Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))),
            port: Some(443),
            foreign_sockaddr: None,
            v6only: false,
            process: Process {
                exe_file: Some(s.exe_file()),
                ..s.process()
            },
            identity_error: None,
        }
    );
}

#[test]
fn connect_ipv6_udp() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    s.set_sock(abi::AF_INET6, abi::SOCK_DGRAM, abi::IPPROTO_UDP);
    let dst: Ipv6Addr = "2001:db8::53".parse().unwrap();
    s.set_sockaddr(&sockaddr_in6(dst, 53));
    let a = s.run(SocketOp::Connect).ok();
    assert_eq!(
        (a.family, a.sock_type, a.protocol),
        (abi::AF_INET6, abi::SOCK_DGRAM, abi::IPPROTO_UDP)
    );
    assert_eq!((a.addr, a.port), (Some(IpAddr::V6(dst)), Some(53)));
    assert_eq!(bare(a.process), s.process());
}

#[test]
fn bind_ipv4_and_ipv6() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    s.set_sockaddr(&sockaddr_in(Ipv4Addr::UNSPECIFIED, 443));
    let a = s.run(SocketOp::Bind).ok();
    assert_eq!(a.op, SocketOp::Bind);
    assert_eq!(
        (a.addr, a.port),
        (Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), Some(443))
    );

    s.set_sock(abi::AF_INET6, abi::SOCK_STREAM, abi::IPPROTO_TCP);
    s.set_sockaddr(&sockaddr_in6(Ipv6Addr::LOCALHOST, 8443));
    let a = s.run(SocketOp::Bind).ok();
    assert_eq!(a.family, abi::AF_INET6);
    assert_eq!(
        (a.addr, a.port),
        (Some(IpAddr::V6(Ipv6Addr::LOCALHOST)), Some(8443))
    );
    assert_eq!(bare(a.process), s.process());
}

#[test]
fn listen_ipv4_reports_local_address_from_sock() {
    let p = profile_or_skip!();
    let s = Scene::new(p);
    // RSI is the backlog, not a sockaddr: the address comes from sock (skc_rcv_saddr, skc_num in host
    // order), not from the remote-address decoys (skc_daddr, skc_dport).
    let a = s.run(SocketOp::Listen).ok();
    assert_eq!(
        (a.op, a.family, a.sock_type, a.protocol),
        (
            SocketOp::Listen,
            abi::AF_INET,
            abi::SOCK_STREAM,
            abi::IPPROTO_TCP
        )
    );
    assert_eq!(
        (a.addr, a.port),
        (Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))), Some(8080))
    );
    assert_eq!(bare(a.process), s.process());
}

#[test]
fn listen_ipv6_reports_v6_local_address() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    s.set_sock(abi::AF_INET6, abi::SOCK_STREAM, abi::IPPROTO_TCP);
    // What inet6_bind leaves for [::1]:8443: the v6 address, and LOOPBACK4_IPV6 (127.0.0.6) in the
    // IPv4 field (net/ipv6/af_inet6.c).
    s.g.set(s.sk, p.sock.skc_v6_rcv_saddr, &Ipv6Addr::LOCALHOST.octets());
    s.g.set(s.sk, p.sock.skc_rcv_saddr, &[127, 0, 0, 6]);
    s.g.set_u16(s.sk, p.sock.skc_num, 8443);
    let a = s.run(SocketOp::Listen).ok();
    assert_eq!(
        (a.addr, a.port),
        (Some(IpAddr::V6(Ipv6Addr::LOCALHOST)), Some(8443))
    );
}

#[test]
fn listen_on_non_ip_socket_has_no_address() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    // An AF_UNIX listener: sock still holds the IPv4/IPv6 local-address decoys of the scene, which
    // must not be read as its address.
    s.set_sock(abi::AF_UNIX, abi::SOCK_STREAM, 0);
    let a = s.run(SocketOp::Listen).ok();
    assert_eq!(
        (a.family, a.sock_type, a.protocol),
        (abi::AF_UNIX, abi::SOCK_STREAM, 0)
    );
    assert_eq!((a.addr, a.port), (None, None));
    assert_eq!(bare(a.process), s.process());
    // Nor for a family Vigil does not know.
    s.set_sock(0x4242, abi::SOCK_STREAM, 0);
    let a = s.run(SocketOp::Listen).ok();
    assert_eq!((a.family, a.addr, a.port), (0x4242, None, None));
}

#[test]
fn sendmsg_reports_the_named_destination() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    s.set_sock(abi::AF_INET, abi::SOCK_DGRAM, abi::IPPROTO_UDP);
    s.set_sockaddr(&sockaddr_in(Ipv4Addr::new(198, 51, 100, 1), 53));
    let a = s.run(SocketOp::Sendmsg).ok();
    assert_eq!(
        (a.op, a.family, a.sock_type, a.protocol),
        (
            SocketOp::Sendmsg,
            abi::AF_INET,
            abi::SOCK_DGRAM,
            abi::IPPROTO_UDP
        )
    );
    assert_eq!(
        (a.addr, a.port),
        (Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))), Some(53))
    );
    assert_eq!(bare(a.process), s.process());

    // IPv6.
    let dst: Ipv6Addr = "2001:db8::53".parse().unwrap();
    s.set_sock(abi::AF_INET6, abi::SOCK_DGRAM, abi::IPPROTO_UDP);
    s.set_sockaddr(&sockaddr_in6(dst, 853));
    let a = s.run(SocketOp::Sendmsg).ok();
    assert_eq!((a.addr, a.port), (Some(IpAddr::V6(dst)), Some(853)));

    // A send on a connected socket names no destination (msg_name NULL), whatever msg_namelen says.
    let (msghdr, msg_name) = (s.msghdr, p.msghdr.msg_name);
    s.g.set_u64(msghdr, msg_name, 0);
    let a = s.run(SocketOp::Sendmsg).ok();
    assert_eq!((a.addr, a.port), (None, None));

    // A msghdr pointer that is not mapped.
    let args = HookArgs {
        rsi: UNMAPPED_VA,
        ..s.args(SocketOp::Sendmsg)
    };
    let e = s.run_with(SocketOp::Sendmsg, args).mem_err();
    assert!(
        matches!(e, MemError::NotPresent { gva, .. } if gva == UNMAPPED_VA + msg_name.offset),
        "{e}"
    );
}

#[test]
fn current_process_outside_socket_hooks() {
    let p = profile_or_skip!();
    let s = Scene::new(p);
    let run = |s: &Scene, profile: &KernelProfile| {
        run_bounded_fn(&s.g.img, s.g.cr3, profile, |r, p| {
            current_process(r, p, GS_BASE)
        })
    };
    assert_eq!(run(&s, p).ok(), s.process());

    // Its errors are attribution errors: a path walk that does not end, a missing symbol, memory.
    let mut s = Scene::new(p);
    let (bin, exe) = (s.bin, s.exe);
    s.set_parent(bin, exe);
    assert!(matches!(
        run(&s, p).result,
        Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))
    ));
    let mut stripped = p.clone();
    stripped.symbols.remove("current_task");
    let out = run(&s, &stripped);
    assert!(matches!(
        out.result,
        Err(AttributionError::MissingSymbol("current_task"))
    ));
    assert_eq!(out.phys_reads, 0);
    let mut s = Scene::new(p);
    let task = s.task;
    s.g.set_u64(task, p.task_struct.cred, UNMAPPED_VA);
    let e = run(&s, p).mem_err();
    assert!(
        matches!(e, MemError::NotPresent { gva, .. } if gva == UNMAPPED_VA + p.cred.uid.offset),
        "{e}"
    );
}

#[test]
fn listen_without_sk_has_no_address() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    s.g.set_u64(s.socket, p.socket.sk, 0);
    let a = s.run(SocketOp::Listen).ok();
    assert_eq!((a.family, a.protocol), (0, 0));
    assert_eq!(a.sock_type, abi::SOCK_STREAM);
    assert_eq!((a.addr, a.port), (None, None));
    assert_eq!(bare(a.process), s.process());
}

#[test]
fn kernel_thread_and_missing_exe_file() {
    let p = profile_or_skip!();
    let t = &p.task_struct;
    let mut s = Scene::new(p);
    // A kworker: no mm (active_mm is borrowed), started by kthreadd.
    let task = s.task;
    s.g.set_u32(task, t.pid, 37);
    s.g.set_u32(task, t.tgid, 37);
    s.set_comm(task, b"kworker/0:1");
    s.g.set_u64(task, t.mm, 0);
    let cred = s.cred;
    s.g.set_u32(cred, p.cred.uid, 0);
    s.g.set_u32(s.parent, t.pid, 2);
    s.g.set_u32(s.parent, t.tgid, 2);
    s.set_comm(s.parent, b"kthreadd");
    let a = s.run(SocketOp::Connect).ok();
    assert_eq!(
        a.process,
        Process {
            pid: 37,
            tgid: 37,
            comm: "kworker/0:1".into(),
            exe: None,
            uid: 0,
            ppid: 2,
            parent_comm: "kthreadd".into(),
            exe_file: None,
            exe_error: None,
        }
    );

    // A user process whose mm has no exe_file (it was never set, or was cleared by prctl).
    s.g.set_u64(task, t.mm, s.mm);
    s.g.set_u64(s.mm, p.mm_struct.exe_file, 0);
    assert_eq!(s.run(SocketOp::Connect).ok().process.exe, None);
    // And with it back, the path again.
    s.g.set_u64(s.mm, p.mm_struct.exe_file, s.file);
    assert_eq!(
        s.run(SocketOp::Connect).ok().process.exe.as_deref(),
        Some("/usr/bin/curl")
    );
}

#[test]
fn missing_current_task_symbol_is_an_error() {
    let p = profile_or_skip!();
    let s = Scene::new(p);
    let mut stripped = p.clone();
    stripped.symbols.remove("current_task");
    let out = run_bounded(
        &s.g.img,
        s.g.cr3,
        &stripped,
        SocketOp::Connect,
        s.args(SocketOp::Connect),
    );
    assert!(matches!(
        out.result,
        Err(AttributionError::MissingSymbol("current_task"))
    ));
    assert_eq!(out.phys_reads, 0);
}

// ------------------------------------------------------------------------------------------------
// Hostile page tables.

#[test]
fn pml4_entry_pointing_back_at_the_pml4() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    let cr3 = s.g.cr3;
    let (i4, i3) = ((GS_BASE >> 39) & 0x1ff, (GS_BASE >> 30) & 0x1ff);
    // The kernel half's slot now loops back: the PML4 is read again as the PDPT, and its slot i3 is
    // empty.
    s.g.img.write_u64(cr3 + i4 * 8, cr3 | 0x3).unwrap();
    let out = s.run(SocketOp::Connect);
    assert!(out.gpa_lo >= cr3 && out.gpa_hi <= cr3 + PAGE_4K);
    let e = out.mem_err();
    assert!(
        matches!(e, MemError::NotPresent { level: 3, entry_gpa, .. } if entry_gpa == cr3 + i3 * 8),
        "{e}"
    );
}

#[test]
fn fully_self_mapped_pml4_stays_in_one_page() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    let cr3 = s.g.cr3;
    // Every PML4 entry points at the PML4: every walk is 4 reads of the PML4 and every address
    // resolves into the PML4 page itself (what hardware would do, too).
    for i in 0..512 {
        s.g.img.write_u64(cr3 + i * 8, cr3 | 0x3).unwrap();
    }
    for op in [SocketOp::Connect, SocketOp::Bind, SocketOp::Listen] {
        let out = s.run(op);
        assert!(
            out.gpa_lo >= cr3 && out.gpa_hi <= cr3 + PAGE_4K,
            "{op:?} read {:#x}..{:#x}",
            out.gpa_lo,
            out.gpa_hi
        );
        // `current` is the entry value itself (cr3 | 3) and the task's fields are PML4 bytes read at
        // unaligned offsets, which give a non-canonical pointer before any path walk.
        let e = out.mem_err();
        assert!(matches!(e, MemError::NonCanonical { levels: 4, .. }), "{e}");
    }
}

#[test]
fn pointers_outside_guest_ram() {
    let p = profile_or_skip!();
    let t = &p.task_struct;
    let current_task = GS_BASE + p.symbols["current_task"];
    let outside = |out: Outcome| match out.mem_err() {
        MemError::OutsideRam { gpa, len } => (gpa, len),
        e => panic!("expected OutsideRam, got {e}"),
    };

    // `current` in a page mapped beyond RAM.
    let mut s = Scene::new(p);
    s.g.write(current_task, &ROGUE_VA.to_le_bytes());
    let (lo, len) = task_span(p);
    assert_eq!(outside(s.run(SocketOp::Connect)), (ROGUE_GPA + lo, len));

    // cred there.
    let mut s = Scene::new(p);
    s.g.set_u64(s.task, t.cred, ROGUE_VA + 0x100);
    assert_eq!(
        outside(s.run(SocketOp::Connect)),
        (ROGUE_GPA + 0x100 + p.cred.uid.offset, 4)
    );

    // The executable's d_name.name there.
    let mut s = Scene::new(p);
    let exe = s.exe;
    s.set_name(exe, 4, ROGUE_VA + 0x800);
    assert_eq!(outside(s.run(SocketOp::Connect)), (ROGUE_GPA + 0x800, 4));

    // A page-table entry beyond RAM: the walk's own read is refused.
    let mut s = Scene::new(p);
    let vmalloc = 0xffff_c900_0000_0000u64;
    let (i4, i3) = ((vmalloc >> 39) & 0x1ff, (vmalloc >> 30) & 0x1ff);
    let cr3 = s.g.cr3;
    s.g.img
        .write_u64(cr3 + i4 * 8, 0x2_0000_0000 | 0x3)
        .unwrap();
    s.g.write(current_task, &vmalloc.to_le_bytes());
    assert_eq!(
        outside(s.run(SocketOp::Connect)),
        (0x2_0000_0000 + i3 * 8, 8)
    );
}

#[test]
fn unmapped_and_null_pointers() {
    let p = profile_or_skip!();
    let not_present = |out: Outcome| match out.mem_err() {
        MemError::NotPresent { gva, .. } => gva,
        e => panic!("expected NotPresent, got {e}"),
    };
    type Mutation = fn(&mut Scene) -> u64;
    let cases: [(&str, Mutation); 6] = [
        ("real_parent unmapped", |s| {
            s.g.set_u64(s.task, s.p.task_struct.real_parent, UNMAPPED_VA);
            UNMAPPED_VA + s.p.task_struct.tgid.offset
        }),
        ("cred null", |s| {
            s.g.set_u64(s.task, s.p.task_struct.cred, 0);
            s.p.cred.uid.offset
        }),
        ("mm unmapped", |s| {
            s.g.set_u64(s.task, s.p.task_struct.mm, UNMAPPED_VA);
            UNMAPPED_VA + s.p.mm_struct.exe_file.offset
        }),
        ("d_parent unmapped", |s| {
            let bin = s.bin;
            s.set_parent(bin, UNMAPPED_VA);
            UNMAPPED_VA + s.p.dentry.d_parent.offset
        }),
        ("sk unmapped", |s| {
            s.g.set_u64(s.socket, s.p.socket.sk, UNMAPPED_VA);
            // The sock is read in one pass, from its lowest field attribution takes.
            let k = &s.p.sock;
            let lo = [k.skc_family, k.sk_protocol, k.skc_rcv_saddr, k.skc_num]
                .iter()
                .map(|f| f.offset)
                .min()
                .unwrap();
            UNMAPPED_VA + lo
        }),
        ("socket null", |s| {
            s.socket = 0;
            s.p.socket.type_.offset
        }),
    ];
    for (what, mutate) in cases {
        let mut s = Scene::new(p);
        let want = mutate(&mut s);
        assert_eq!(not_present(s.run(SocketOp::Connect)), want, "{what}");
    }
    // A sockaddr pointer that is not mapped, with a plausible length.
    let s = Scene::new(p);
    let args = HookArgs {
        rsi: UNMAPPED_VA,
        ..s.args(SocketOp::Connect)
    };
    assert_eq!(
        not_present(s.run_with(SocketOp::Connect, args)),
        UNMAPPED_VA
    );
}

#[test]
fn non_canonical_addresses() {
    let p = profile_or_skip!();
    let t = &p.task_struct;
    let current_task = p.symbols["current_task"];
    let bad = 0x0000_8000_0000_1000u64; // bit 47 set, bits 63:48 clear
    let non_canonical = |out: Outcome| match out.mem_err() {
        MemError::NonCanonical { gva, levels: 4 } => gva,
        e => panic!("expected NonCanonical, got {e}"),
    };

    let mut s = Scene::new(p);
    s.g.write(GS_BASE + current_task, &bad.to_le_bytes());
    assert_eq!(
        non_canonical(s.run(SocketOp::Connect)),
        bad + task_span(p).0
    );

    let s = Scene::new(p);
    let gs = 0x1234_0000_0000_0000u64;
    let args = HookArgs {
        gs_base: gs,
        ..s.args(SocketOp::Connect)
    };
    assert_eq!(
        non_canonical(s.run_with(SocketOp::Connect, args)),
        gs + current_task
    );

    let mut s = Scene::new(p);
    s.g.set_u64(s.task, t.cred, bad);
    assert_eq!(
        non_canonical(s.run(SocketOp::Connect)),
        bad + p.cred.uid.offset
    );

    let mut s = Scene::new(p);
    let usr = s.usr;
    s.set_parent(usr, bad);
    assert_eq!(
        non_canonical(s.run(SocketOp::Connect)),
        bad + p.dentry.d_parent.offset
    );

    let s = Scene::new(p);
    for op in [SocketOp::Connect, SocketOp::Listen] {
        let args = HookArgs {
            rdi: bad,
            ..s.args(op)
        };
        assert_eq!(
            non_canonical(s.run_with(op, args)),
            bad + p.socket.type_.offset
        );
    }

    let s = Scene::new(p);
    let args = HookArgs {
        rsi: bad,
        ..s.args(SocketOp::Bind)
    };
    assert_eq!(non_canonical(s.run_with(SocketOp::Bind, args)), bad);
}

#[test]
fn pointer_arithmetic_overflow() {
    let p = profile_or_skip!();
    // A task pointer so high that task + offsetof(pid) wraps.
    let mut s = Scene::new(p);
    let top = u64::MAX - 8;
    s.g.write(GS_BASE + p.symbols["current_task"], &top.to_le_bytes());
    assert_eq!(
        s.run(SocketOp::Connect).mem_err(),
        MemError::Overflow {
            addr: top,
            len: task_span(p).0
        }
    );
    // A GS base that wraps when current_task is added reads a low (user, unmapped) address (the
    // scene maps user pages elsewhere in the low half, so the walk stops below the top level).
    let s = Scene::new(p);
    let args = HookArgs {
        gs_base: 0u64.wrapping_sub(8),
        ..s.args(SocketOp::Connect)
    };
    let e = s.run_with(SocketOp::Connect, args).mem_err();
    assert!(
        matches!(e, MemError::NotPresent { gva, .. } if gva == p.symbols["current_task"] - 8),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------------
// Paths: mounts, pseudo files, hostile dentries and strings.

#[test]
fn dentry_cycle_is_path_too_deep() {
    let p = profile_or_skip!();
    // bin -> curl -> bin: never reaches the mount's root.
    let mut s = Scene::new(p);
    let (bin, exe) = (s.bin, s.exe);
    s.set_parent(bin, exe);
    let out = s.run(SocketOp::Connect);
    let reads = out.phys_reads;
    assert!(
        matches!(
            out.result,
            Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))
        ),
        "{:?} after {reads} reads",
        out.result
    );
    // MAX_PATH_DEPTH names of two dentries each (~300 reads): cut at the depth limit, not run to the
    // read bound.
    assert!(reads < 1000, "{reads} reads");

    // A three-dentry ring that the executable is on: usr -> curl -> bin -> usr.
    let mut s = Scene::new(p);
    let (usr, exe) = (s.usr, s.exe);
    s.set_parent(usr, exe);
    assert!(matches!(
        s.exe_result(),
        Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))
    ));

    // A ring above the executable that does not contain it: curl -> bin -> usr -> bin.
    let mut s = Scene::new(p);
    let (usr, bin) = (s.usr, s.bin);
    s.set_parent(usr, bin);
    assert!(matches!(
        s.exe_result(),
        Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))
    ));
}

#[test]
fn deep_paths_come_back_whole_up_to_the_depth_limit() {
    let p = profile_or_skip!();
    let names = |n: usize| (0..n).map(|i| format!("d{i}")).collect::<Vec<_>>();
    // An executable `n` components deep: /d0/d1/.../d{n-2}/curl.
    let exe_at_depth = |n: usize| {
        let mut s = Scene::new(p);
        let (root, exe) = (s.root, s.exe);
        let dir = s.chain(root, names(n - 1));
        s.set_parent(exe, dir);
        let out = s.run(SocketOp::Connect);
        (out.result.map(|a| a.process.exe), out.phys_reads)
    };

    let (got, _) = exe_at_depth(41);
    let got = got.unwrap().unwrap();
    let parts: Vec<&str> = got.strip_prefix('/').unwrap().split('/').collect();
    assert_eq!(parts.len(), 41, "{got}");
    assert!(got.starts_with("/d0/"), "{got}");
    assert_eq!(got, format!("/{}/curl", names(40).join("/")));

    // Exactly at the limit: still whole.
    let (got, reads) = exe_at_depth(MAX_PATH_DEPTH);
    let got = got.unwrap().unwrap();
    assert_eq!(
        got,
        format!("/{}/curl", names(MAX_PATH_DEPTH - 1).join("/"))
    );
    assert!(reads < READ_BOUND / 2, "{reads} reads");

    // One past it and well past it: an error, never a suffix that could pass for an absolute path.
    for n in [MAX_PATH_DEPTH + 1, 70] {
        let (got, _) = exe_at_depth(n);
        assert!(
            matches!(got, Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))),
            "{n} components: {got:?}"
        );
    }

    // The limit counts components across mounts: 30 in the root filesystem above a mount with 40
    // more (70 in all) is too deep; 30 + 34 is not.
    for (inner, ok) in [(40, false), (34, true)] {
        let mut s = Scene::new(p);
        let (root, root_mount) = (s.root, s.root_mount);
        let outer: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
        let mountpoint = s.chain(root, &outer);
        let fs_root = s.dentry(b"/", None);
        let mnt = s.mount(fs_root, Some((root_mount, mountpoint)));
        let dir = s.chain(fs_root, names(inner - 1));
        let exe = s.dentry(b"curl", Some(dir));
        s.set_exe(exe, mnt);
        let got = s.exe_result();
        if ok {
            let want = format!("/{}/{}/curl", outer.join("/"), names(inner - 1).join("/"));
            assert_eq!(got.unwrap().unwrap(), want);
        } else {
            assert!(
                matches!(got, Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))),
                "{got:?}"
            );
        }
    }
}

#[test]
fn paths_cross_mounts_up_to_the_root_of_the_mount_tree() {
    let p = profile_or_skip!();

    // /usr is its own filesystem: /usr/bin/curl is bin/curl under that filesystem's root, which is
    // mounted on the `usr` dentry of the root filesystem.
    let mut s = Scene::new(p);
    let (usr, root_mount) = (s.usr, s.root_mount);
    let usr_root = s.dentry(b"/", None);
    let usr_mount = s.mount(usr_root, Some((root_mount, usr)));
    let exe = s.chain(usr_root, ["bin", "curl"]);
    s.set_exe(exe, usr_mount);
    let out = s.run(SocketOp::Connect);
    assert!(out.gpa_hi <= RAM, "read up to {:#x}", out.gpa_hi);
    assert_eq!(bare(out.ok().process), s.process());

    // The old bug: the walk stopped at the root of the executable's filesystem, so a binary at
    // /tmp/x/usr/bin/curl, with /tmp/x a mount, passed for /usr/bin/curl.
    let mut s = Scene::new(p);
    let (root, root_mount) = (s.root, s.root_mount);
    let x = s.chain(root, ["tmp", "x"]);
    let x_root = s.dentry(b"/", None);
    let x_mount = s.mount(x_root, Some((root_mount, x)));
    let exe = s.chain(x_root, ["usr", "bin", "curl"]);
    s.set_exe(exe, x_mount);
    assert_eq!(
        s.exe_result().unwrap().as_deref(),
        Some("/tmp/x/usr/bin/curl")
    );

    // Nested: /tmp a mount in /, /tmp/x a mount in /tmp.
    let mut s = Scene::new(p);
    let (root, root_mount) = (s.root, s.root_mount);
    let tmp = s.dentry(b"tmp", Some(root));
    let tmp_root = s.dentry(b"/", None);
    let tmp_mount = s.mount(tmp_root, Some((root_mount, tmp)));
    let x = s.dentry(b"x", Some(tmp_root));
    let x_root = s.dentry(b"/", None);
    let x_mount = s.mount(x_root, Some((tmp_mount, x)));
    let exe = s.chain(x_root, ["usr", "bin", "curl"]);
    s.set_exe(exe, x_mount);
    assert_eq!(
        s.exe_result().unwrap().as_deref(),
        Some("/tmp/x/usr/bin/curl")
    );

    // Stacked: a second filesystem mounted over the /usr mount (its mountpoint is the root of the
    // filesystem below): the walk crosses both, with no component for either root.
    let mut s = Scene::new(p);
    let (usr, root_mount) = (s.usr, s.root_mount);
    let lower_root = s.dentry(b"/", None);
    let lower = s.mount(lower_root, Some((root_mount, usr)));
    let upper_root = s.dentry(b"/", None);
    let upper = s.mount(upper_root, Some((lower, lower_root)));
    let exe = s.chain(upper_root, ["bin", "curl"]);
    s.set_exe(exe, upper);
    assert_eq!(s.exe_result().unwrap().as_deref(), Some("/usr/bin/curl"));

    // A file bind-mounted over /usr/bin/curl: the mount's root is the file itself (`evil`, in
    // another directory of its filesystem) and the path is where it is mounted, as d_path says.
    let mut s = Scene::new(p);
    let (exe, root_mount) = (s.exe, s.root_mount);
    let src_root = s.dentry(b"/", None);
    let evil = s.chain(src_root, ["home", "evil"]);
    let bind = s.mount(evil, Some((root_mount, exe)));
    s.set_exe(evil, bind);
    assert_eq!(s.exe_result().unwrap().as_deref(), Some("/usr/bin/curl"));

    // The executable is the root of the mount tree itself.
    let mut s = Scene::new(p);
    let (root, root_mount) = (s.root, s.root_mount);
    s.set_exe(root, root_mount);
    assert_eq!(s.exe_result().unwrap().as_deref(), Some("/"));
}

#[test]
fn mount_loops_are_path_too_deep() {
    let p = profile_or_skip!();

    // Two mounts, each the other's parent, each mounted on the other's root: after `curl` the walk
    // only ever crosses mounts and never adds a component, so only MAX_PATH_STEPS ends it.
    let mut s = Scene::new(p);
    let (ra, rb) = (s.dentry(b"/", None), s.dentry(b"/", None));
    let (a, b) = (s.mount(ra, None), s.mount(rb, None));
    let m = &p.mount;
    s.g.set_u64(a, m.mnt_parent, b);
    s.g.set_u64(a, m.mnt_mountpoint, rb);
    s.g.set_u64(b, m.mnt_parent, a);
    s.g.set_u64(b, m.mnt_mountpoint, ra);
    let exe = s.dentry(b"curl", Some(ra));
    s.set_exe(exe, a);
    let out = s.run(SocketOp::Connect);
    let reads = out.phys_reads;
    assert!(
        matches!(
            out.result,
            Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))
        ),
        "{:?}",
        out.result
    );
    // MAX_PATH_STEPS crossings of three 8-byte reads each, page walks included, at most.
    assert!(reads <= MAX_PATH_STEPS * 3 * 5 + 100, "{reads} reads");

    // The same loop with a directory at each mountpoint (A on `a` under B's root, B on `b` under A's
    // root): every other step adds a component, and either limit cuts it.
    let mut s = Scene::new(p);
    let (ra, rb) = (s.dentry(b"/", None), s.dentry(b"/", None));
    let (a, b) = (s.mount(ra, None), s.mount(rb, None));
    let (in_b, in_a) = (s.dentry(b"a", Some(rb)), s.dentry(b"b", Some(ra)));
    s.g.set_u64(a, m.mnt_parent, b);
    s.g.set_u64(a, m.mnt_mountpoint, in_b);
    s.g.set_u64(b, m.mnt_parent, a);
    s.g.set_u64(b, m.mnt_mountpoint, in_a);
    let exe = s.dentry(b"curl", Some(ra));
    s.set_exe(exe, a);
    let got = s.exe_result();
    assert!(
        matches!(got, Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))),
        "{got:?}"
    );
}

#[test]
fn pseudo_files_have_their_bare_name() {
    let p = profile_or_skip!();
    // A memfd: its dentry is its own parent on the internal shm mount, whose root it is not.
    let mut s = Scene::new(p);
    let shm_root = s.dentry(b"/", None);
    let shm = s.mount(shm_root, None);
    let memfd = s.dentry(b"memfd:evil", None);
    s.set_exe(memfd, shm);
    let a = s.run(SocketOp::Connect).ok();
    assert_eq!(a.process.exe.as_deref(), Some("memfd:evil"));
    assert_eq!(
        bare(a.process),
        Process {
            exe: Some("memfd:evil".into()),
            ..s.process()
        }
    );

    // The same dentry with the root mount as its vfsmount: still not the mount's root.
    let root_mount = s.root_mount;
    s.set_exe(memfd, root_mount);
    assert_eq!(s.exe_result().unwrap().as_deref(), Some("memfd:evil"));

    // A file under a directory that is its own parent (a tree mounted nowhere): relative, no
    // leading slash either.
    let mut s = Scene::new(p);
    let (bin, exe, root_mount) = (s.bin, s.exe, s.root_mount);
    let loose = s.dentry(b"anon_inode:[x]", None);
    s.set_parent(bin, loose);
    s.set_exe(exe, root_mount);
    assert_eq!(
        s.exe_result().unwrap().as_deref(),
        Some("anon_inode:[x]/bin/curl")
    );
}

#[test]
fn hostile_mount_pointers() {
    let p = profile_or_skip!();
    let m = &p.mount;

    // A `struct mount` is read in one pass, from its lowest field the walk and the identity
    // checks take (`mnt_parent` on 6.1).
    let mount_lo = [
        m.mnt_parent.offset,
        m.mnt_mountpoint.offset,
        m.mnt.offset + m.vfsmount_mnt_root.offset,
        m.mnt.offset + p.exec.vfsmount_mnt_sb.offset,
        p.exec.mount_mnt_ns.offset,
    ]
    .into_iter()
    .min()
    .unwrap();

    // The vfsmount pointer itself unmapped, or null: its mount (container_of) is the first thing
    // read.
    let mut s = Scene::new(p);
    let f_path = s.file + p.file.f_path.offset;
    for mnt in [UNMAPPED_VA, 0] {
        s.g.set_u64(f_path, p.path.mnt, mnt);
        let e = s.run(SocketOp::Connect).mem_err();
        let want = mnt.wrapping_sub(m.mnt.offset).wrapping_add(mount_lo);
        // A null vfsmount's mount is just below 2^64: its span wraps.
        assert!(
            matches!(e, MemError::NotPresent { gva, .. } if gva == want)
                || (mnt == 0 && matches!(e, MemError::Overflow { .. })),
            "{e}"
        );
    }

    // A parent mount that is not mapped: read through the container_of'd address.
    let mut s = Scene::new(p);
    let root_mount = s.root_mount;
    s.g.set_u64(root_mount, m.mnt_parent, UNMAPPED_VA);
    let e = s.run(SocketOp::Connect).mem_err();
    assert!(
        matches!(e, MemError::NotPresent { gva, .. } if gva == UNMAPPED_VA + mount_lo),
        "{e}"
    );

    // A mountpoint that is not mapped: the walk reads its d_parent.
    let mut s = Scene::new(p);
    let (usr, root_mount) = (s.usr, s.root_mount);
    let usr_root = s.dentry(b"/", None);
    let usr_mount = s.mount(usr_root, Some((root_mount, UNMAPPED_VA)));
    let exe = s.chain(usr_root, ["bin", "curl"]);
    s.set_exe(exe, usr_mount);
    let e = s.run(SocketOp::Connect).mem_err();
    assert!(
        matches!(e, MemError::NotPresent { gva, .. } if gva == UNMAPPED_VA + p.dentry.d_parent.offset),
        "{e}"
    );
    // ...and with the right mountpoint, the path.
    s.g.set_u64(usr_mount, m.mnt_mountpoint, usr);
    assert_eq!(s.exe_result().unwrap().as_deref(), Some("/usr/bin/curl"));
}

/// In a build with overflow checks (debug) this panics in src/attribution.rs: `exe_path`'s
/// `mount + m.mnt.offset` (the read of a parent mount's `mnt_root`) and `read_process`'s
/// `file + p.file.f_path.offset` add without `checked_add`/`wrapping_add`; a release build wraps
/// and fails the read, as asserted here.
#[test]
fn pointers_whose_offsets_wrap_are_typed_errors() {
    let p = profile_or_skip!();
    // A parent mount or an exe_file so high that adding a member's offset wraps: a typed error, no
    // panic, nothing read outside guest RAM.
    type Mutation = fn(&mut Scene);
    let cases: [(&str, Mutation); 3] = [
        ("mnt_parent at the top", |s| {
            let root_mount = s.root_mount;
            s.g.set_u64(root_mount, s.p.mount.mnt_parent, u64::MAX - 8);
        }),
        ("vfsmount at the top", |s| {
            let f_path = s.file + s.p.file.f_path.offset;
            s.g.set_u64(f_path, s.p.path.mnt, u64::MAX - 8);
        }),
        ("exe_file at the top", |s| {
            let mm = s.mm;
            s.g.set_u64(mm, s.p.mm_struct.exe_file, u64::MAX - 8);
        }),
    ];
    for (what, mutate) in cases {
        let mut s = Scene::new(p);
        mutate(&mut s);
        let out = s.run(SocketOp::Connect);
        assert!(out.gpa_hi <= RAM, "{what}: read up to {:#x}", out.gpa_hi);
        assert!(
            matches!(out.result, Err(AttributionError::Memory(_))),
            "{what}: {:?}",
            out.result
        );
    }
}

#[test]
fn huge_qstr_len_is_capped_at_name_max() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    let long = s.g.string(&[b'x'; 300]);
    let exe = s.exe;
    s.set_name(exe, u32::MAX, long);
    let got = s.run(SocketOp::Connect).ok().process.exe.unwrap();
    assert_eq!(got, format!("/usr/bin/{}", "x".repeat(MAX_NAME)));

    // The recorded length is trusted up to the cap, NULs included (the kernel keeps it exact).
    let curl = s.g.string(b"curl");
    s.set_name(exe, 6, curl);
    let got = s.run(SocketOp::Connect).ok().process.exe.unwrap();
    assert_eq!(got, "/usr/bin/curl\0\0");

    // A short name at the very end of the mapped heap: its true length reads fine, a huge one runs
    // into the unmapped page and fails there instead of reading past it.
    let at_end = HEAP_END - 4;
    s.g.write(at_end, b"curl");
    s.set_name(exe, 4, at_end);
    assert_eq!(
        s.run(SocketOp::Connect).ok().process.exe.as_deref(),
        Some("/usr/bin/curl")
    );
    s.set_name(exe, 0x8000_0000, at_end);
    assert!(matches!(
        s.run(SocketOp::Connect).mem_err(),
        MemError::NotPresent { gva: HEAP_END, .. }
    ));
}

#[test]
fn unterminated_and_invalid_comm() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    let comm = p.task_struct.comm;
    // 16 bytes and no NUL, followed by more non-NUL bytes: exactly TASK_COMM_LEN bytes are taken.
    let task = s.task;
    s.g.set(task, comm, b"ABCDEFGHIJKLMNOP");
    s.g.write(task + comm.offset + comm.size, b"ZZZZZZZZ");
    // Invalid UTF-8 in the parent's name.
    let parent = s.parent;
    s.set_comm(parent, &[0xff, 0xfe, b'a', 0, b'b']);
    let a = s.run(SocketOp::Connect).ok();
    assert_eq!(a.process.comm, "ABCDEFGHIJKLMNOP");
    assert_eq!(a.process.parent_comm, "\u{fffd}\u{fffd}a");
    // Bytes after the first NUL are not part of the name.
    s.set_comm(task, b"nc\0hidden");
    assert_eq!(s.run(SocketOp::Connect).ok().process.comm, "nc");
}

// ------------------------------------------------------------------------------------------------
// Hostile socket addresses.

#[test]
fn short_and_odd_sockaddr_lengths() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    let v4 = (Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))), Some(443));
    let dst6: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let v6 = (Some(IpAddr::V6(dst6)), Some(443));
    let run = |s: &Scene, op, rsi, rdx| {
        let args = HookArgs {
            rsi,
            rdx,
            ..s.args(op)
        };
        let a = s.run_with(op, args).ok();
        assert_eq!(bare(a.process), s.process());
        (a.addr, a.port)
    };
    for op in [SocketOp::Connect, SocketOp::Bind] {
        // Too short to hold a family, or a family but no address: nothing decoded.
        for len in [0, 1, 7] {
            assert_eq!(run(&s, op, s.addr, len), (None, None), "addrlen {len}");
        }
        // Family + port + address (sin_zero is padding): decoded. Absurd lengths read no further.
        for len in [8, 16, 128, u64::MAX] {
            assert_eq!(run(&s, op, s.addr, len), v4, "addrlen {len}");
        }
        // A null sockaddr.
        assert_eq!(run(&s, op, 0, 16), (None, None));
    }

    s.set_sockaddr(&sockaddr_in6(dst6, 443));
    s.set_sock(abi::AF_INET6, abi::SOCK_STREAM, abi::IPPROTO_TCP);
    for len in [8, 16, 23] {
        assert_eq!(
            run(&s, SocketOp::Connect, s.addr, len),
            (None, None),
            "addrlen {len}"
        );
    }
    for len in [24, 28, u64::MAX] {
        assert_eq!(run(&s, SocketOp::Connect, s.addr, len), v6, "addrlen {len}");
    }

    // A sockaddr_in in the last 8 bytes of the mapped heap, with addrlen 16: only the 8 bytes that
    // carry data are read (an IPv6 socket that takes IPv4 destinations: a dual-stack UDP one).
    s.set_sock(abi::AF_INET6, abi::SOCK_DGRAM, abi::IPPROTO_UDP);
    let at_end = HEAP_END - 8;
    s.g.write(
        at_end,
        &sockaddr_in(Ipv4Addr::new(203, 0, 113, 7), 443)[..8],
    );
    assert_eq!(run(&s, SocketOp::Connect, at_end, 16), v4);
    // Whereas a sockaddr_in6 there is cut by the unmapped page.
    s.g.write(at_end, &sockaddr_in6(dst6, 443)[..8]);
    let args = HookArgs {
        rsi: at_end,
        rdx: 28,
        ..s.args(SocketOp::Connect)
    };
    assert!(matches!(
        s.run_with(SocketOp::Connect, args).mem_err(),
        MemError::NotPresent { gva: HEAP_END, .. }
    ));
}

#[test]
fn unknown_and_non_ip_families() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    // A socket family Vigil has no decoder for is reported as is; the sockaddr of an unknown family
    // (and of AF_UNSPEC, AF_UNIX, AF_PACKET) has no IP address or port.
    s.set_sock(0x4242, abi::SOCK_RAW, 0x99);
    for family in [0x4242u16, 0, abi::AF_UNIX, abi::AF_PACKET, u16::MAX] {
        let mut b = sockaddr_in(Ipv4Addr::new(203, 0, 113, 7), 443);
        b[..2].copy_from_slice(&family.to_le_bytes());
        s.set_sockaddr(&b);
        for op in [SocketOp::Connect, SocketOp::Bind] {
            let a = s.run(op).ok();
            assert_eq!(
                (a.family, a.sock_type, a.protocol),
                (0x4242, abi::SOCK_RAW, 0x99)
            );
            assert_eq!((a.addr, a.port), (None, None), "sockaddr family {family}");
            assert_eq!(bare(a.process), s.process());
        }
    }
    // The family of the socket does not pick the decoder: an AF_INET6 socket given a sockaddr_in
    // (as IPv4-mapped UDP sockets are) is decoded as IPv4.
    s.set_sock(abi::AF_INET6, abi::SOCK_DGRAM, abi::IPPROTO_UDP);
    s.set_sockaddr(&sockaddr_in(Ipv4Addr::new(198, 51, 100, 1), 53));
    let a = s.run(SocketOp::Connect).ok();
    assert_eq!(a.family, abi::AF_INET6);
    assert_eq!(
        (a.addr, a.port),
        (Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))), Some(53))
    );
}

/// An IPv6 socket takes a `sockaddr_in` only where its kernel code does: a dual-stack UDP
/// socket's `connect` and `sendmsg`. `inet6_bind` and `tcp_v6_connect` refuse one, and an
/// `IPV6_V6ONLY` socket refuses IPv4 peers; decoded as IPv4, such a call was decided (and its
/// verdict opened) for an IPv4 port or flow its socket never has. The flag is read, and
/// reported, from `sock_common`.
#[test]
fn an_ipv6_socket_takes_an_ipv4_sockaddr_only_where_the_kernel_does() {
    let p = profile_or_skip!();
    let flag = p.sock.skc_ipv6only.unwrap();
    let v4 = Ipv4Addr::new(198, 51, 100, 1);
    let set_v6only = |s: &mut Scene, on: bool| {
        let at = s.sk + flag.offset;
        let mut byte = [0u8; 1];
        byte[0] = s.g.read_u8(at) & !(1 << flag.bit) | (u8::from(on) << flag.bit);
        s.g.write(at, &byte);
    };
    let mut s = Scene::new(p);
    s.set_sockaddr(&sockaddr_in(v4, 53));
    // Dual-stack UDP: connect and sendto take IPv4.
    s.set_sock(abi::AF_INET6, abi::SOCK_DGRAM, abi::IPPROTO_UDP);
    for op in [SocketOp::Connect, SocketOp::Sendmsg] {
        let a = s.run(op).ok();
        assert_eq!(
            (a.addr, a.port, a.v6only),
            (Some(IpAddr::V4(v4)), Some(53), false)
        );
    }
    // Its bind does not; nor does a TCP socket, nor an IPv6-only UDP socket.
    let a = s.run(SocketOp::Bind).ok();
    assert_eq!(
        (a.addr, a.foreign_sockaddr),
        (None, Some(abi::AF_INET)),
        "bind"
    );
    s.set_sock(abi::AF_INET6, abi::SOCK_STREAM, abi::IPPROTO_TCP);
    for op in [SocketOp::Connect, SocketOp::Bind, SocketOp::Sendmsg] {
        let a = s.run(op).ok();
        assert_eq!(
            (a.addr, a.foreign_sockaddr),
            (None, Some(abi::AF_INET)),
            "tcp {op:?}"
        );
    }
    s.set_sock(abi::AF_INET6, abi::SOCK_DGRAM, abi::IPPROTO_UDP);
    set_v6only(&mut s, true);
    for op in [SocketOp::Connect, SocketOp::Sendmsg] {
        let a = s.run(op).ok();
        assert!(a.v6only);
        assert_eq!(
            (a.addr, a.foreign_sockaddr),
            (None, Some(abi::AF_INET)),
            "v6only {op:?}"
        );
    }
    // The flag is reported for a listener on the IPv6 wildcard (which then opens no IPv4 port),
    // and only for an IPv6 socket.
    s.set_sock(abi::AF_INET6, abi::SOCK_STREAM, abi::IPPROTO_TCP);
    s.g.set(
        s.sk,
        p.sock.skc_v6_rcv_saddr,
        &Ipv6Addr::UNSPECIFIED.octets(),
    );
    let a = s.run(SocketOp::Listen).ok();
    assert_eq!(
        (a.addr, a.v6only),
        (Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), true)
    );
    set_v6only(&mut s, false);
    assert!(!s.run(SocketOp::Listen).ok().v6only);
    set_v6only(&mut s, true);
    s.set_sock(abi::AF_INET, abi::SOCK_STREAM, abi::IPPROTO_TCP);
    assert!(!s.run(SocketOp::Listen).ok().v6only);
}

// ------------------------------------------------------------------------------------------------
// The executable as a file: identity, mount namespace, the code that makes the call; and the
// policy's pins over them, end to end (attribute(), then decide()).

/// The scene's connect is allowed by this policy if its executable is `/usr/bin/curl`'s file.
const CURL_POLICY: &str = r#"{"allow": [
    {"op": "connect", "exe": "/usr/bin/curl", "protocol": "tcp", "cidr": "203.0.113.0/24", "ports": "443"}
]}"#;

/// attribute() then the policy's decision (with its explanation).
fn decide(s: &Scene, policy: &Policy) -> (Verdict, Attribution) {
    let mut a = s.run(SocketOp::Connect).ok();
    let v = policy.decide_noting(&mut a);
    (v, a)
}

/// A policy that has pinned `/usr/bin/curl` to the scene's genuine executable.
fn pinned_policy(s: &Scene) -> Policy {
    let policy = Policy::from_json(CURL_POLICY).unwrap();
    let (v, a) = decide(s, &policy);
    assert_eq!(v, Verdict::Allow, "{a:?}");
    assert_eq!(policy.pinned("/usr/bin/curl"), Some(s.exe_id()));
    policy
}

impl Scene {
    /// Another mount namespace whose root mount shows the same root filesystem (a container's,
    /// or one made by `unshare -Urm`): its root `struct mount`.
    fn private_namespace(&mut self) -> u64 {
        let ns = self.g.alloc(64);
        let root = self.mount(self.root, None);
        self.g.set_u64(root, self.p.exec.mount_mnt_ns, ns);
        root
    }

    /// Another program (inode `ino`) whose file is the dentry `evil` under `/tmp`, running: the
    /// executable's file and its text VMA are that program's. Returns the dentry.
    fn run_other_program(&mut self, ino: u64) -> u64 {
        let tmp = self.dentry(b"tmp", Some(self.root));
        let evil = self.dentry(b"evil", Some(tmp));
        let inode = self.inode(self.sb, ino, 0xbad, (1_750_000_000, 1));
        // Its text page is its own file's page cache.
        let mapping = self.page_cache(inode);
        self.set_page_mapping(TEXT_GPA, mapping);
        let (file, f_inode) = (self.file, self.p.exec.file_f_inode);
        self.g.set_u64(file, f_inode, inode);
        let map = self.g.alloc(FILE_SIZE);
        self.g.set_u64(map, f_inode, inode);
        let (text, vm_file) = (self.vma_text, self.p.exec.vma_vm_file);
        self.g.set_u64(text, vm_file, map);
        evil
    }

    /// `evil` bind-mounted over `/usr/bin/curl` in the namespace whose root mount is `ns_root`,
    /// and the process run from there: its path is `/usr/bin/curl`.
    fn bind_over_curl(&mut self, evil: u64, ns_root: u64) {
        let ns = self.g.read_u64(ns_root + self.p.exec.mount_mnt_ns.offset);
        let bind = self.mount(evil, Some((ns_root, self.exe)));
        self.g.set_u64(bind, self.p.exec.mount_mnt_ns, ns);
        self.set_exe(evil, bind);
    }
}

impl Guest {
    fn read_u64(&self, va: u64) -> u64 {
        self.reader().read_u64(va).unwrap()
    }

    /// The 4 KiB page-table entry that maps `va` (present up to the last level).
    fn pte_gpa(&self, va: u64) -> u64 {
        let mut table = self.cr3 & !0xfff;
        for level in (2..=4u32).rev() {
            let entry = self
                .img
                .read_phys_u64(table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8)
                .unwrap();
            table = entry & 0x000f_ffff_ffff_f000;
        }
        table + ((va >> 12) & 0x1ff) * 8
    }

    /// Rewrites the flags of the 4 KiB page mapping `va`: `set` bits on, `clear` bits off.
    fn set_pte_flags(&mut self, va: u64, set: u64, clear: u64) {
        let pte = self.pte_gpa(va);
        let e = self.img.read_phys_u64(pte).unwrap();
        self.img.write_u64(pte, (e | set) & !clear).unwrap();
    }
}

#[test]
fn genuine_executable_in_init_namespace_is_pinned_and_allowed() {
    let p = profile_or_skip!();
    let s = Scene::new(p);
    let policy = Policy::from_json(CURL_POLICY).unwrap();
    let (v, a) = decide(&s, &policy);
    assert_eq!(v, Verdict::Allow);
    assert_eq!(a.process.exe_file, Some(s.exe_file()));
    assert_eq!(a.identity_error, None);
    assert_eq!(policy.pinned("/usr/bin/curl"), Some(s.exe_id()));
    // Again, with the pin in place.
    assert_eq!(decide(&s, &policy).0, Verdict::Allow);
}

#[test]
fn bind_mount_over_the_executable_in_a_private_namespace_is_denied() {
    let p = profile_or_skip!();
    // uid 1000 (the scene's) in a user+mount namespace, or root in a private mount namespace:
    // the same guest memory. Before and after the genuine file was pinned.
    for pin_first in [false, true] {
        let mut s = Scene::new(p);
        let policy = if pin_first {
            pinned_policy(&s)
        } else {
            Policy::from_json(CURL_POLICY).unwrap()
        };
        let evil = s.run_other_program(9999);
        let ns_root = s.private_namespace();
        s.bind_over_curl(evil, ns_root);
        let (v, a) = decide(&s, &policy);
        assert_eq!(
            a.process.exe.as_deref(),
            Some("/usr/bin/curl"),
            "the path lies"
        );
        let f = a.process.exe_file.clone().unwrap();
        assert!(!f.init_mnt_ns && f.bind_mount, "{f:?}");
        assert_eq!((f.id.ino, f.code), (9999, CodeOrigin::Exe));
        assert_eq!(v, Verdict::Deny, "{a:?}");
        let why = a.identity_error.unwrap();
        assert!(why.contains("not pinned"), "{why}");
        assert_eq!(
            policy.pinned("/usr/bin/curl"),
            pin_first.then(|| s.exe_id())
        );
    }
}

#[test]
fn bind_mount_over_the_executable_in_init_namespace_is_never_pinned() {
    let p = profile_or_skip!();
    // Root binds its program over the path in init's own namespace before anything ran it.
    let mut s = Scene::new(p);
    let policy = Policy::from_json(CURL_POLICY).unwrap();
    let evil = s.run_other_program(9999);
    let root_mount = s.root_mount;
    s.bind_over_curl(evil, root_mount);
    let (v, a) = decide(&s, &policy);
    let f = a.process.exe_file.clone().unwrap();
    assert!(f.init_mnt_ns && f.bind_mount, "{f:?}");
    assert_eq!(v, Verdict::Deny);
    assert!(a.identity_error.unwrap().contains("bind mount"));
    assert_eq!(policy.pinned("/usr/bin/curl"), None);
}

#[test]
fn genuine_file_in_a_container_namespace_is_allowed_by_its_pin() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    let policy = pinned_policy(&s);
    let ns_root = s.private_namespace();
    let exe = s.exe;
    s.set_exe(exe, ns_root);
    let (v, a) = decide(&s, &policy);
    let f = a.process.exe_file.clone().unwrap();
    assert!(!f.init_mnt_ns && !f.bind_mount);
    assert_eq!(f.id, s.exe_id());
    assert_eq!(v, Verdict::Allow, "{a:?}");
    // Not pinned yet: a container's file pins nothing and is not allowed.
    let fresh = Policy::from_json(CURL_POLICY).unwrap();
    assert_eq!(decide(&s, &fresh).0, Verdict::Deny);
    assert_eq!(fresh.pinned("/usr/bin/curl"), None);
}

#[test]
fn replaced_file_after_pinning_is_denied() {
    let p = profile_or_skip!();
    // Renamed onto the path (another inode), or written in place (same inode, new ctime).
    for replace in ["rename", "write"] {
        let mut s = Scene::new(p);
        let policy = pinned_policy(&s);
        let (inode, e) = (s.inode, p.exec.clone());
        match replace {
            "rename" => s.g.set_u64(inode, e.inode_i_ino, 5555),
            _ => s.g.set_u64(inode, e.inode_ctime_sec, 1_800_000_000),
        }
        let (v, a) = decide(&s, &policy);
        assert_eq!(v, Verdict::Deny, "{replace}");
        let why = a.identity_error.unwrap();
        assert!(
            why.starts_with("identity mismatch: /usr/bin/curl is pinned to dev 8:1 ino 1234"),
            "{why}"
        );
    }
}

#[test]
fn a_hard_link_is_the_same_file() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    let policy = pinned_policy(&s);
    let tmp = s.dentry(b"tmp", Some(s.root));
    let link = s.dentry(b"c", Some(tmp));
    let root_mount = s.root_mount;
    s.set_exe(link, root_mount);
    let (v, a) = decide(&s, &policy);
    assert_eq!(a.process.exe.as_deref(), Some("/tmp/c"));
    assert_eq!(v, Verdict::Allow);
    // A copy (another inode) under that name is not.
    s.run_other_program(4321);
    assert_eq!(decide(&s, &policy).0, Verdict::Deny);
}

#[test]
fn code_outside_the_executable_is_denied() {
    let p = profile_or_skip!();
    let policy_for = |s: &Scene| pinned_policy(s);
    // RIP in the executable's text: allowed (the scene). In a library while the executable's
    // text is the executable: allowed.
    let mut s = Scene::new(p);
    let policy = policy_for(&s);
    s.set_rip(LIB_TEXT.0 + 0x234);
    let (v, a) = decide(&s, &policy);
    assert_eq!(
        a.process.exe_file.as_ref().unwrap().code,
        CodeOrigin::Library
    );
    assert_eq!(v, Verdict::Allow);

    // Anonymous executable memory (injected code under the executable's name).
    s.set_rip(ANON_EXEC.0 + 0x10);
    let (v, a) = decide(&s, &policy);
    let f = a.process.exe_file.clone().unwrap();
    assert_eq!((f.code, f.rip), (CodeOrigin::Anonymous, ANON_EXEC.0 + 0x10));
    assert_eq!(v, Verdict::Deny);
    assert!(a.identity_error.unwrap().contains("not the executable's"));

    // A page that is not executable, and an address with no VMA.
    for rip in [EXE_RO.0 + 8, 0x1000, u64::MAX - 4] {
        s.set_rip(rip);
        let (v, a) = decide(&s, &policy);
        assert_eq!(
            a.process.exe_file.unwrap().code,
            CodeOrigin::Foreign,
            "{rip:#x}"
        );
        assert_eq!(v, Verdict::Deny);
    }

    // PR_SET_MM_EXE_FILE to the genuine file after unmapping its own image: exe_file is the
    // genuine one, its text is gone; from anonymous memory, or through a library's code.
    let (leaf0, ro) = (s.maple_leaves[0], s.vma_ro);
    s.fill_maple_node(
        leaf0,
        MAPLE_LEAF_64,
        &[EXE_RO.0 - 1, EXE_RO.1 - 1, EXE_TEXT.1 - 1],
        &[0, ro, 0, 0],
    );
    // munmap() takes the text's page-table entries with its VMA.
    s.g.set_pte_flags(USER_RIP, 0, 1);
    for (rip, code) in [
        (ANON_EXEC.0 + 0x10, CodeOrigin::Anonymous),
        (LIB_TEXT.0 + 0x10, CodeOrigin::Foreign),
        (USER_RIP, CodeOrigin::Foreign),
    ] {
        s.set_rip(rip);
        let (v, a) = decide(&s, &policy);
        let f = a.process.exe_file.unwrap();
        assert_eq!((f.id, f.code), (s.exe_id(), code), "{rip:#x}");
        assert_eq!(v, Verdict::Deny);
    }

    // The instruction that entered the kernel is the byte before the saved RIP: a `syscall`
    // that ends where another mapping starts is the first mapping's code.
    let mut s = Scene::new(p);
    let policy = policy_for(&s);
    for (rip, code) in [
        (ANON_EXEC.1, CodeOrigin::Anonymous),
        (EXE_TEXT.0, CodeOrigin::Foreign),
    ] {
        s.set_rip(rip);
        let (v, a) = decide(&s, &policy);
        assert_eq!(a.process.exe_file.unwrap().code, code, "{rip:#x}");
        assert_eq!(v, Verdict::Deny);
    }

    // The executable's own page, but the page tables do not let user mode execute it (NX at
    // the last level, or a supervisor page): not code the caller ran from the file.
    for (set, clear) in [(1u64 << 63, 0), (0, 1u64 << 2)] {
        let mut s = Scene::new(p);
        let policy = policy_for(&s);
        s.g.set_pte_flags(USER_RIP, set, clear);
        let (v, a) = decide(&s, &policy);
        assert_eq!(a.process.exe_file.unwrap().code, CodeOrigin::Foreign);
        assert_eq!(v, Verdict::Deny);
    }

    // Registers that are not user mode's (a kernel worker).
    let mut s = Scene::new(p);
    let policy = policy_for(&s);
    let (regs, cs) = (s.regs, p.exec.pt_regs_cs);
    s.g.set_u64(regs, cs, 0x10);
    let (v, a) = decide(&s, &policy);
    assert_eq!(a.process.exe_file.unwrap().code, CodeOrigin::Kernel);
    assert_eq!(v, Verdict::Deny);
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP, {.exe_fd = ...})` in a user namespace of its own (Linux 6.1
/// checks only `CAP_CHECKPOINT_RESTORE` there), after unmapping its own image: `mm->exe_file` is
/// the pinned executable, opened with `open()`, and the genuine file is mapped at `start_code`.
/// Its payload calls the genuine copy's own `connect` wrapper (code classified `Exe`) or a
/// library's (`Library`): neither carries the identity, pinned or not.
#[test]
fn an_executable_named_by_prctl_lends_no_identity() {
    let p = profile_or_skip!();
    for pin_first in [true, false] {
        let mut s = Scene::new(p);
        let policy = if pin_first {
            pinned_policy(&s)
        } else {
            Policy::from_json(CURL_POLICY).unwrap()
        };
        let (file, flags) = (s.file, p.exec.file_f_flags.unwrap());
        s.g.set_u32(file, flags, USER_OPEN_FLAGS);
        for (rip, code) in [
            (USER_RIP, CodeOrigin::Exe),
            (LIB_TEXT.0 + 0x234, CodeOrigin::Library),
        ] {
            s.set_rip(rip);
            let (v, a) = decide(&s, &policy);
            let f = a.process.exe_file.clone().unwrap();
            assert_eq!((f.id, f.code, f.from_exec), (s.exe_id(), code, false));
            assert_eq!(v, Verdict::Deny, "{code:?}");
            let why = a.identity_error.unwrap();
            assert!(why.contains("did not execute it"), "{why}");
        }
        assert_eq!(
            policy.pinned("/usr/bin/curl"),
            pin_first.then(|| s.exe_id()),
            "a named executable pins nothing"
        );
        // The same process as execve left it: allowed.
        s.g.set_u32(file, flags, EXEC_OPEN_FLAGS);
        assert_eq!(decide(&s, &policy).0, Verdict::Allow);
    }
}

/// The genuine executable runs; a payload it was made to load (ptrace, an `LD_PRELOAD` stub)
/// runs from shared memory no directory names, a page cache like a library's: a memfd (tmpfs,
/// or hugetlbfs with `MFD_HUGETLB`) or `MAP_SHARED | MAP_ANONYMOUS` (shmem), their inode
/// unlinked. Not a library of the executable's.
#[test]
fn code_in_shared_memory_is_not_a_library() {
    let p = profile_or_skip!();
    let e = &p.exec;
    let (nlink, magic) = (e.inode_i_nlink.unwrap(), e.sb_s_magic.unwrap());
    for fs_magic in [abi::TMPFS_MAGIC, abi::HUGETLBFS_MAGIC] {
        let mut s = library_scene(p);
        let policy = pinned_policy(&Scene::new(p));
        // The library's page now belongs to an unlinked inode of a shared-memory filesystem.
        let shm_root = s.dentry(b"/", None);
        let shm_sb = s.superblock(shm_root, 0x0000_0005);
        s.g.set_u64(shm_sb, magic, fs_magic);
        let (lib, i_sb) = (s.lib_inode, e.inode_i_sb);
        s.g.set_u64(lib, i_sb, shm_sb);
        s.g.set_u32(lib, nlink, 0);
        let (v, a) = decide(&s, &policy);
        let f = a.process.exe_file.clone().unwrap();
        assert_eq!(
            (f.code, f.rip),
            (CodeOrigin::Anonymous, LIB_TEXT.0 + 0x234),
            "{fs_magic:#x}"
        );
        assert_eq!(v, Verdict::Deny);
        assert!(a.identity_error.unwrap().contains("not the executable's"));
        // A file of that filesystem a directory names (a library on a tmpfs root, as an
        // initramfs has) is a library.
        s.g.set_u32(lib, nlink, 1);
        let (v, a) = decide(&s, &policy);
        assert_eq!(a.process.exe_file.unwrap().code, CodeOrigin::Library);
        assert_eq!(v, Verdict::Allow);
    }
    // A library deleted on a disk filesystem while mapped (replaced by an upgrade) is still one.
    let mut s = library_scene(p);
    let policy = pinned_policy(&Scene::new(p));
    let lib = s.lib_inode;
    s.g.set_u32(lib, nlink, 0);
    let (v, a) = decide(&s, &policy);
    assert_eq!(a.process.exe_file.unwrap().code, CodeOrigin::Library);
    assert_eq!(v, Verdict::Allow);
}

/// The genuine executable runs, with a library only root could not have been alone to write:
/// the caller's own `LD_PRELOAD` (or `LD_AUDIT`, `LD_LIBRARY_PATH`) library, or its own libc or
/// dynamic loader bind-mounted over the system's in a private mount namespace (a file it made,
/// owned by its uid whatever its user namespace says), or a root-owned library anyone may
/// write. Its code is the caller's, not a library of the executable's; a system library (root's,
/// written by no one else) still is.
#[test]
fn a_library_someone_but_root_could_write_is_not_the_executables() {
    let p = profile_or_skip!();
    let e = &p.exec;
    let (mode, uid, nlink) = (
        e.inode_i_mode.unwrap(),
        e.inode_i_uid.unwrap(),
        e.inode_i_nlink.unwrap(),
    );
    for (owner, perm, linked) in [
        (1000, 0o100_755, 1),
        (1000, 0o100_555, 1),
        (0, 0o100_757, 1),
        (0, 0o100_775, 1),
        // Deleted on a disk filesystem (the caller unlinked its own library once mapped).
        (1000, 0o100_755, 0),
    ] {
        let mut s = library_scene(p);
        let policy = pinned_policy(&Scene::new(p));
        let lib = s.lib_inode;
        s.g.set_u32(lib, uid, owner);
        s.g.set_u16(lib, mode, perm);
        s.g.set_u32(lib, nlink, linked);
        let (v, a) = decide(&s, &policy);
        let f = a.process.exe_file.clone().unwrap();
        let case = format!("uid {owner} mode {perm:o} nlink {linked}");
        assert_eq!(
            (f.code, f.rip),
            (CodeOrigin::UntrustedLibrary, LIB_TEXT.0 + 0x234),
            "{case}"
        );
        assert_eq!(v, Verdict::Deny, "{case}");
        assert!(
            a.identity_error.unwrap().contains("not the executable's"),
            "{case}"
        );
    }
    // Root's as its FUSE server says (any user may mount one with fusermount3): not root's.
    let mut s = library_scene(p);
    let policy = pinned_policy(&Scene::new(p));
    let fuse_root = s.dentry(b"/", None);
    let fuse_sb = s.superblock(fuse_root, 0x0000_002d);
    s.g.set_u64(fuse_sb, e.sb_s_magic.unwrap(), abi::FUSE_SUPER_MAGIC);
    let lib = s.lib_inode;
    s.g.set_u64(lib, e.inode_i_sb, fuse_sb);
    let (v, a) = decide(&s, &policy);
    assert_eq!(
        a.process.exe_file.unwrap().code,
        CodeOrigin::UntrustedLibrary,
        "fuse"
    );
    assert_eq!(v, Verdict::Deny);
    // A system library: root's, read-only or rwxr-xr-x, linked or replaced by an upgrade.
    for (perm, linked) in [(0o100_755, 1), (0o100_644, 1), (0o100_444, 0)] {
        let mut s = library_scene(p);
        let policy = pinned_policy(&Scene::new(p));
        let lib = s.lib_inode;
        s.g.set_u16(lib, mode, perm);
        s.g.set_u32(lib, nlink, linked);
        let (v, a) = decide(&s, &policy);
        assert_eq!(
            a.process.exe_file.unwrap().code,
            CodeOrigin::Library,
            "mode {perm:o}"
        );
        assert_eq!(v, Verdict::Allow, "mode {perm:o}");
    }
}

/// The genuine program runs its own code, but another process steers its system calls: a
/// tracer (which rewrites its registers at each stop), or a seccomp filter that hands calls to
/// a user-notification listener, whose holder may put its own socket in place of the program's
/// descriptor (`SECCOMP_IOCTL_NOTIF_ADDFD`) and let the `connect` go on. Any user can do either
/// to a program it starts. The holder may close the listener once it has let the call go on,
/// so a filter is judged by its program: one that can return `SECCOMP_RET_USER_NOTIF` (or the
/// accumulator) steers, listener or not. Filters that return other actions (a systemd
/// service's) are no one's; a chain too long, looping, or whose programs cannot be read is
/// unknown.
#[test]
fn a_task_another_process_steers_lends_no_identity() {
    let p = profile_or_skip!();
    let e = &p.exec;
    let (ptrace, mode, filter) = (
        e.task_ptrace.unwrap(),
        e.task_seccomp_mode.unwrap(),
        e.task_seccomp_filter.unwrap(),
    );
    let sc = e.seccomp.clone().unwrap();
    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO_EPERM: u32 = 0x0005_0001;
    const USER_NOTIF: u32 = 0x7fc0_0000;
    // `ld [0]; jeq #42, 0, 1; ret #k_hit; ret #k_other` (BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K).
    let program = |hit: u32, other: u32| -> Vec<(u16, u32)> {
        vec![(0x20, 0), (0x15, 42), (0x06, hit), (0x06, other)]
    };
    // A filter with `notif`, its `bpf_prog` keeping `insns` as loaded (None: none kept).
    let add_filter = |s: &mut Scene, prev: u64, notif: u64, insns: Option<&[(u16, u32)]>| {
        let size = [sc.filter_prev, sc.filter_notif, sc.filter_prog]
            .iter()
            .map(|f| f.offset + 8)
            .max()
            .unwrap();
        let f = s.g.alloc(size);
        s.g.set_u64(f, sc.filter_prev, prev);
        s.g.set_u64(f, sc.filter_notif, notif);
        let prog = s.g.alloc(sc.prog_orig_prog.offset + 8);
        s.g.set_u64(f, sc.filter_prog, prog);
        if let Some(insns) = insns {
            let fprog = s.g.alloc(sc.fprog_filter.offset + 8);
            let code = s.g.alloc(insns.len() as u64 * 8 + 8);
            for (i, &(op, k)) in insns.iter().enumerate() {
                let mut b = [0u8; 8];
                b[..2].copy_from_slice(&op.to_le_bytes());
                b[4..].copy_from_slice(&k.to_le_bytes());
                s.g.write(code + i as u64 * 8, &b);
            }
            s.g.set_u16(fprog, sc.fprog_len, insns.len() as u16);
            s.g.set_u64(fprog, sc.fprog_filter, code);
            s.g.set_u64(prog, sc.prog_orig_prog, fprog);
        }
        f
    };
    let check = |s: &Scene, steered: Option<Steered>, case: &str| {
        let policy = pinned_policy(&Scene::new(p));
        let (v, a) = decide(s, &policy);
        let f = a.process.exe_file.clone().unwrap();
        assert_eq!((f.code, f.steered), (CodeOrigin::Exe, steered), "{case}");
        if steered.is_some() {
            assert_eq!(v, Verdict::Deny, "{case}");
            let why = a.identity_error.unwrap();
            assert!(why.contains("steers its system calls"), "{case}: {why}");
        } else {
            assert_eq!(v, Verdict::Allow, "{case}");
        }
    };
    // A tracer attached.
    let mut s = Scene::new(p);
    check(&s, None, "untraced, unfiltered");
    let task = s.task;
    s.g.set_u32(task, ptrace, 1);
    check(&s, Some(Steered::Traced), "traced");
    s.g.set_u32(task, ptrace, 0);
    // Filters as a systemd service has them: no one's.
    let quiet = [program(ERRNO_EPERM, ALLOW), program(ALLOW, ERRNO_EPERM)];
    let older = add_filter(&mut s, 0, 0, Some(&quiet[0]));
    let newer = add_filter(&mut s, older, 0, Some(&quiet[1]));
    s.g.set_u32(task, mode, abi::SECCOMP_MODE_FILTER);
    s.g.set_u64(task, filter, newer);
    check(&s, None, "filters without a listener");
    // The older filter hands a call to a listener: closed since (notif NULL), or still open.
    let notify = program(USER_NOTIF, ALLOW);
    let older = add_filter(&mut s, 0, 0, Some(&notify));
    let newer = add_filter(&mut s, older, 0, Some(&quiet[1]));
    s.g.set_u64(task, filter, newer);
    check(
        &s,
        Some(Steered::SeccompListener),
        "a program that notifies",
    );
    let open = add_filter(&mut s, 0, 0xffff_8880_0123_4000, Some(&quiet[0]));
    s.g.set_u64(task, filter, open);
    check(&s, Some(Steered::SeccompListener), "a live listener");
    // A program returning its accumulator could return anything.
    let by_a = add_filter(&mut s, 0, 0, Some(&[(0x20, 0), (0x16, 0)]));
    s.g.set_u64(task, filter, by_a);
    check(&s, Some(Steered::SeccompListener), "ret a");
    // Strict mode has no filters: whatever the pointer says.
    s.g.set_u32(task, mode, 1);
    check(&s, None, "strict mode");
    s.g.set_u32(task, mode, abi::SECCOMP_MODE_FILTER);
    // Unknown: no program kept, a chain that loops, programs longer than the bound.
    let unkept = add_filter(&mut s, 0, 0, None);
    s.g.set_u64(task, filter, unkept);
    check(&s, Some(Steered::Unknown), "no program kept");
    let a = add_filter(&mut s, 0, 0, Some(&quiet[0]));
    let b = add_filter(&mut s, a, 0, Some(&quiet[1]));
    s.g.set_u64(a, sc.filter_prev, b);
    s.g.set_u64(task, filter, b);
    check(&s, Some(Steered::Unknown), "a loop");
    let long = vec![(0x06u16, ALLOW); 2100];
    let older = add_filter(&mut s, 0, 0, Some(&long));
    let newer = add_filter(&mut s, older, 0, Some(&long));
    s.g.set_u64(task, filter, newer);
    check(&s, Some(Steered::Unknown), "past the instruction bound");
}

/// A scene whose call comes from the library's code.
fn library_scene(p: &'static KernelProfile) -> Scene {
    let mut s = Scene::new(p);
    s.set_rip(LIB_TEXT.0 + 0x234);
    s
}

#[test]
fn hostile_maple_trees_are_errors_not_hangs() {
    let p = profile_or_skip!();
    // The tree is walked when the call comes from a library's code (is the executable's text,
    // at `mm->start_code`, the executable?) or from code that is no file's executable page. The
    // executable's own page needs no walk: a hostile tree cannot deny (or allow) it.
    let mut s = Scene::new(p);
    let root = s.maple_root;
    let rooted = encode(root, MAPLE_ARANGE_64);
    s.fill_maple_node(root, MAPLE_ARANGE_64, &[EXE_TEXT.1 - 1], &[rooted, rooted]);
    let policy = pinned_policy(&s);
    let (v, a) = decide(&s, &policy);
    assert_eq!(
        (v, a.process.exe_file.unwrap().code),
        (Verdict::Allow, CodeOrigin::Exe)
    );
    let policy_json = CURL_POLICY;
    let check = |s: &Scene, expect: &str| {
        let policy = Policy::from_json(policy_json).unwrap();
        let (v, a) = decide(s, &policy);
        assert_eq!(v, Verdict::Deny);
        let err = a.process.exe_error.clone().unwrap_or_default();
        assert!(
            err.contains(expect),
            "expected `{expect}`, got `{err}`: {a:?}"
        );
        assert!(a.identity_error.unwrap().contains("identity is unknown"));
        // The path, comm and the rest are still reported.
        assert_eq!(bare(a.process), s.process());
    };
    // A cycle: the root's child is the root itself.
    let mut s = library_scene(p);
    let root = s.maple_root;
    let rooted = encode(root, MAPLE_ARANGE_64);
    s.fill_maple_node(root, MAPLE_ARANGE_64, &[EXE_TEXT.1 - 1], &[rooted, rooted]);
    check(&s, "deeper than 8");
    // A chain deeper than any real tree.
    let mut s = library_scene(p);
    let mut next = encode(s.maple_leaves[0], MAPLE_LEAF_64);
    for _ in 0..12 {
        let n = s.maple_node_of(MAPLE_RANGE_64, &[u64::MAX], &[next]);
        next = encode(n, MAPLE_RANGE_64);
    }
    s.set_maple_root(next | MAPLE_ROOT_NODE);
    check(&s, "deeper than 8");
    // Child pointers outside guest RAM, unmapped, non-canonical, or below the reserved range.
    for (child, expect) in [
        (encode(ROGUE_VA, MAPLE_LEAF_64), "outside"),
        (encode(UNMAPPED_VA, MAPLE_LEAF_64), "not present"),
        (encode(0x0000_8000_0000_0000, MAPLE_LEAF_64), "canonical"),
        (encode(0, MAPLE_LEAF_64), "not a node"),
    ] {
        let mut s = library_scene(p);
        let (root, leaf1) = (s.maple_root, s.maple_leaves[1]);
        s.fill_maple_node(
            root,
            MAPLE_ARANGE_64,
            &[EXE_TEXT.1 - 1],
            &[child, encode(leaf1, MAPLE_LEAF_64)],
        );
        // (The rogue read is attempted and refused by the bounded reader: the error says so.)
        let a = s.run(SocketOp::Connect).ok();
        let err = a.process.exe_error.unwrap_or_default().to_lowercase();
        assert!(err.contains(expect), "expected `{expect}`, got `{err}`");
    }
    // Pivots that fall, a VMA that does not hold the address, a node type that does not exist.
    let mut s = library_scene(p);
    let (leaf0, ro, text) = (s.maple_leaves[0], s.vma_ro, s.vma_text);
    s.fill_maple_node(
        leaf0,
        MAPLE_LEAF_64,
        &[EXE_RO.1 - 1, EXE_RO.0 - 1, EXE_TEXT.1 - 1],
        &[0, ro, text, 0],
    );
    check(&s, "pivots out of order");
    let mut s = library_scene(p);
    let leaf0 = s.maple_leaves[0];
    let ro = s.vma_ro;
    s.fill_maple_node(
        leaf0,
        MAPLE_LEAF_64,
        &[EXE_RO.0 - 1, EXE_TEXT.1 - 1],
        &[0, ro, 0],
    );
    check(&s, "the VMA found for 0x401000");
    let mut s = library_scene(p);
    let root = s.maple_root;
    s.set_maple_root(root | (9 << 3) | MAPLE_ROOT_NODE);
    check(&s, "unknown node type");
    // Metadata that puts the end of the data past the node's slots.
    let mut s = library_scene(p);
    let (leaf0, meta_end) = (s.maple_leaves[0], p.exec.mr64_meta_end);
    s.g.set(leaf0, meta_end, &[200]);
    check(&s, "data end past");
}

#[test]
fn packet_sockets_are_not_ip_whatever_their_sockaddr_says() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    // An AF_PACKET socket of ethertype 0x0600 (sk_protocol htons(0x0600) = 6, "tcp"), and a
    // sockaddr_ll crafted to read as sockaddr_in 203.0.113.7:443.
    s.set_sock(abi::AF_PACKET, abi::SOCK_RAW, 0x0600u16.to_be());
    s.set_sockaddr(&sockaddr_in(Ipv4Addr::new(203, 0, 113, 7), 443));
    let any_ip = Policy::from_json(
        r#"{"allow": [
            {"op": "connect", "exe": "/usr/bin/curl", "protocol": "tcp", "cidr": "203.0.113.0/24"},
            {"op": "connect", "exe": "/usr/bin/curl"}
        ]}"#,
    )
    .unwrap();
    let packet = Policy::from_json(
        r#"{"allow": [{"op": "connect", "exe": "/usr/bin/curl", "family": "packet"}]}"#,
    )
    .unwrap();
    for op in [SocketOp::Sendmsg, SocketOp::Connect, SocketOp::Bind] {
        let mut a = s.run(op).ok();
        assert_eq!((a.family, a.protocol), (abi::AF_PACKET, abi::IPPROTO_TCP));
        assert_eq!((a.addr, a.port), (None, None), "{op:?}");
        assert_eq!(a.foreign_sockaddr, Some(abi::AF_INET));
        assert_eq!(any_ip.decide_noting(&mut a), Verdict::Deny, "{op:?}");
        if op != SocketOp::Bind {
            assert_eq!(packet.decide(&a), Verdict::Allow, "{op:?}");
        }
    }
    // A genuine sockaddr_ll: no address, nothing foreign.
    let mut ll = vec![0u8; 20];
    ll[..2].copy_from_slice(&abi::AF_PACKET.to_le_bytes());
    s.set_sockaddr(&ll);
    let a = s.run(SocketOp::Sendmsg).ok();
    assert_eq!((a.addr, a.foreign_sockaddr), (None, None));
    assert_eq!(any_ip.decide(&a), Verdict::Deny);
    assert_eq!(packet.decide(&a), Verdict::Allow);

    // An IPv4 socket given a sockaddr_in6 (or a sockaddr_ll): not its address.
    s.set_sock(abi::AF_INET, abi::SOCK_STREAM, abi::IPPROTO_TCP);
    s.set_sockaddr(&sockaddr_in6("2001:db8::1".parse().unwrap(), 443));
    let a = s.run(SocketOp::Connect).ok();
    assert_eq!((a.addr, a.foreign_sockaddr), (None, Some(abi::AF_INET6)));
    assert_eq!(any_ip.decide(&a), Verdict::Deny);
    // AF_UNSPEC on an IPv4 socket is read as sockaddr_in, as inet_bind and udp_sendmsg read it.
    let mut unspec = sockaddr_in(Ipv4Addr::UNSPECIFIED, 7000);
    unspec[..2].copy_from_slice(&0u16.to_le_bytes());
    s.set_sockaddr(&unspec);
    let a = s.run(SocketOp::Bind).ok();
    assert_eq!(
        (a.addr, a.port, a.foreign_sockaddr),
        (Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), Some(7000), None)
    );
}

/// The identity check's own cost (the `exec::exe_file` reads: inode, superblock, mount
/// namespace, pt_regs, two maple nodes, the VMA and its file) against a whole attribute(), each
/// with a fresh reader as a trap has. Meaningful with `--release`:
/// `cargo test --release -p trap-handler --test attribution_synthetic identity_check_cost -- --nocapture`.
#[test]
fn identity_check_cost() {
    let p = profile_or_skip!();
    let s = Scene::new(p);
    let (init_task, vmemmap_var) = (p.symbols["init_task"], p.symbols["vmemmap_base"]);
    // VIGIL_COST_N: fewer rounds, for a run under callgrind.
    let n = std::env::var("VIGIL_COST_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            2_000
        } else {
            100_000
        });
    let t = std::time::Instant::now();
    for _ in 0..n {
        let r = s.g.reader();
        let roots = trap_handler::exec::kernel_roots(&r, p, init_task, vmemmap_var, None).unwrap();
        let f = trap_handler::exec::exe_file(
            &r,
            p,
            &roots,
            s.task,
            s.mm,
            s.file,
            s.vfsmount(s.root_mount),
        )
        .unwrap();
        assert_eq!(f.code, CodeOrigin::Exe);
    }
    let identity = t.elapsed() / n;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let r = s.g.reader();
        let a = attribute(&r, p, SocketOp::Connect, s.args(SocketOp::Connect)).unwrap();
        assert!(a.process.exe_file.is_some());
    }
    let whole = t.elapsed() / n;
    let policy = pinned_policy(&s);
    let a = s.run(SocketOp::Connect).ok();
    let t = std::time::Instant::now();
    for _ in 0..n {
        assert_eq!(policy.decide(&a), Verdict::Allow);
    }
    let decision = t.elapsed() / n;
    eprintln!(
        "identity check {identity:?}, whole attribute() {whole:?}, pinned decision {decision:?} \
         per call ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
}

#[test]
fn full_maple_nodes_end_as_the_kernel_says() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    // A full leaf (16 slots, its last pivot not 0): no metadata read, the last slot reaches the
    // node's max. The text is the last slot, past 14 one-page VMAs before it.
    let leaf0 = s.maple_leaves[0];
    let mut pivots: Vec<u64> = (0..15).map(|i| 0x1000 * (i + 1) - 1).collect();
    pivots[14] = EXE_TEXT.0 - 1;
    let mut slots = vec![0u64; 16];
    slots[15] = s.vma_text;
    s.fill_maple_node(leaf0, MAPLE_LEAF_64, &pivots, &slots);
    // (The metadata's byte is the last slot's lowest: there is none to read.)
    let policy = Policy::from_json(CURL_POLICY).unwrap();
    let (v, a) = decide(&s, &policy);
    assert_eq!(a.process.exe_file.unwrap().code, CodeOrigin::Exe);
    assert_eq!(v, Verdict::Allow);
}

#[test]
fn text_written_after_exec_is_not_the_file() {
    let p = profile_or_skip!();
    // ptrace(POKETEXT) or a write to /proc/PID/mem into the genuine executable's text (any
    // user may do it to its own processes): the VMA is still the file's, the page under RIP is
    // an anonymous copy.
    let mut s = Scene::new(p);
    let policy = pinned_policy(&s);
    let anon_vma = s.g.alloc(64);
    s.set_page_mapping(TEXT_GPA, anon_vma | 1);
    let (v, a) = decide(&s, &policy);
    let f = a.process.exe_file.clone().unwrap();
    assert_eq!((f.id, f.code), (s.exe_id(), CodeOrigin::ModifiedText));
    assert_eq!(v, Verdict::Deny);
    assert!(a.identity_error.unwrap().contains("not the executable's"));
    // A tail page of a large folio of the file: its head's mapping counts.
    let head_page = s.g.alloc(64);
    let (inode, im) = (s.inode, p.exec.inode_i_mapping);
    let mapping = s.g.read_u64(inode + im.offset);
    let (pm, ch) = (p.exec.page_mapping, p.exec.page_compound_head);
    s.g.set_u64(head_page, pm, mapping);
    let tail = s.struct_page(TEXT_GPA);
    s.g.set_u64(tail, ch, head_page | 1);
    s.g.set_u64(tail, pm, 0x400); // TAIL_MAPPING
    let (v, a) = decide(&s, &policy);
    assert_eq!(a.process.exe_file.unwrap().code, CodeOrigin::Exe);
    assert_eq!(v, Verdict::Allow);
}

/// The trap path allocates nothing of its own: attribution makes the three strings the event
/// carries (comm, the parent's comm, the executable's path), the identity check and a pinned
/// decision make none.
#[test]
fn the_trap_path_allocates_nothing() {
    let p = profile_or_skip!();
    let s = Scene::new(p);
    let policy = pinned_policy(&s);
    let (init_task, vmemmap_var) = (p.symbols["init_task"], p.symbols["vmemmap_base"]);
    let syms = TrapSymbols::of(p).unwrap();
    let roots = RootsCache::default();
    let args = s.args(SocketOp::Connect);
    // The first attribution on a thread makes its scratch buffer and the exe path it has not
    // seen; every later one of the same process allocates nothing, comm and path included.
    let first = {
        let r = s.g.reader();
        attribute_with(&r, p, &syms, &roots, SocketOp::Connect, args).unwrap()
    };
    for _ in 0..3 {
        let (n, a) = allocations(|| {
            let r = s.g.reader();
            attribute_with(&r, p, &syms, &roots, SocketOp::Connect, args).unwrap()
        });
        assert_eq!(a.process.exe_file.as_ref().unwrap().code, CodeOrigin::Exe);
        assert_eq!(a, first);
        assert_eq!(n, 0, "allocations in one attribution");
        // The path is shared, not copied.
        assert!(std::ptr::eq(
            a.process.exe.as_deref().unwrap(),
            first.process.exe.as_deref().unwrap()
        ));
    }
    // The names by name lookup (attribute) too.
    let (n, _) = allocations(|| {
        let r = s.g.reader();
        attribute(&r, p, SocketOp::Connect, args).unwrap()
    });
    assert_eq!(n, 0, "attribute()");
    let (n, f) = allocations(|| {
        let r = s.g.reader();
        let roots = trap_handler::exec::kernel_roots(&r, p, init_task, vmemmap_var, None).unwrap();
        let mount = s.vfsmount(s.root_mount);
        trap_handler::exec::exe_file(&r, p, &roots, s.task, s.mm, s.file, mount).unwrap()
    });
    assert_eq!((n, f.code), (0, CodeOrigin::Exe));
    let (n, v) = allocations(|| policy.decide(&first));
    assert_eq!((n, v), (0, Verdict::Allow));
}

#[test]
fn the_kernel_roots_are_read_once_per_vm_and_slide() {
    let p = profile_or_skip!();
    let mut s = Scene::new(p);
    let syms = TrapSymbols::of(p).unwrap();
    let roots = RootsCache::default();
    let args = s.args(SocketOp::Connect);
    let run = |s: &Scene, roots: &RootsCache, args: HookArgs| {
        let r = s.g.reader();
        attribute_with(&r, p, &syms, roots, SocketOp::Connect, args).unwrap()
    };
    let first = run(&s, &roots, args);
    assert!(first.process.exe_file.as_ref().unwrap().init_mnt_ns);
    // init_task's nsproxy made unreadable: this VM's cache still knows init's namespace...
    let init_nsproxy = p.symbols["init_task"] + p.exec.task_nsproxy.offset;
    s.g.write(init_nsproxy, &UNMAPPED_VA.to_le_bytes());
    assert_eq!(run(&s, &roots, args), first);
    // ...a VM that never read it does not, and neither does another slide.
    for (roots, slide) in [(&RootsCache::default(), 0), (&roots, 0x20_0000)] {
        let a = run(
            &s,
            roots,
            HookArgs {
                kaslr_slide: slide,
                ..args
            },
        );
        assert!(a.process.exe_file.is_none(), "{slide:#x}");
        assert!(a.process.exe_error.unwrap().contains("not mapped"));
    }
}
