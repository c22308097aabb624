//! Completion of instructions this host's KVM could not emulate.
//!
//! On an emulating KVM host (see [`crate::host_kind::HostKind`]) guest ring 0 runs through KVM's
//! instruction emulator, which lacks a few instructions a stock Linux executes. KVM then stops the
//! vCPU with `KVM_EXIT_INTERNAL_ERROR` (suberror 1, emulation failure) with RIP at the instruction.
//! The VMM decodes it (iced-x86) and finishes it here, or names it in an error that stops the VM.
//! Everything read here comes from the guest and is treated as hostile: reads are bounded to guest
//! RAM through [`GuestView`], and an instruction we do not know is an error, never a guess.
//!
//! Code the kernel patches while another vCPU runs it (jump labels, static calls: `text_poke_bp`)
//! also ends here: the emulator may fetch the site while it holds the temporary `int3`, and by the
//! time the VMM reads it the patch is done, so the VMM finds an instruction KVM emulates well
//! (a NOP form, `jmp rel8/rel32`, `call rel32`). `text_poke_bp` writes `int3` over the first byte,
//! then the other bytes, then the new first byte (Linux `arch/x86/kernel/alternative.c`), so a
//! first byte other than `int3` means the whole instruction is either the old or the new one, and
//! the kernel accepts either running on another CPU meanwhile. Running what memory holds now is
//! therefore what a CPU fetching a moment later would do: NOPs are skipped, jumps taken, and a
//! `call` is handed back to KVM to run again (a push the VMM would write past the write traps).
//!
//! Owns: decoding the faulting instruction and completing the ones listed here (registers, flags,
//! guest memory), the errors that name an instruction it cannot complete.
//! Must not: guess at an instruction it does not know, or read past guest RAM.

use crate::GuestMemoryMmap;
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use thiserror::Error;
use trap_handler::mem::{self, PagingMode};
use vm_memory::{Bytes, GuestAddress};

use crate::guest_ram::GuestRam;

/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// CR0.PG: paging enabled.
const CR0_PG: u64 = 1 << 31;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bits popcnt defines: OF SF ZF AF PF CF.
const RFLAGS_OSZAPC: u64 = 0x8d5;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_CF: u64 = 1 << 0;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EmulationError {
    #[error(
        "guest address {0:#x} is not mapped by the guest page tables or lies outside guest RAM"
    )]
    Unmapped(u64),
    #[error("could not decode the instruction at {rip:#x} (bytes {bytes:02x?})")]
    Undecodable { rip: u64, bytes: Vec<u8> },
    #[error(
        "the guest executed `{text}` at {rip:#x}, which this host's KVM cannot emulate and Vigil \
         cannot complete; hide the feature on the kernel command line (clearcpuid=...) or run on a \
         hardware-virtualization host"
    )]
    Unsupported { rip: u64, text: String },
}

/// What the VMM did with an instruction KVM could not emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// `int3` in guest ring 0: RIP moved past it and #BP injected, as the CPU would have done.
    Int3Injected,
    /// An instruction with no architectural effect in this context (`fwait` with no pending x87
    /// exception, since the guest never sees unmasked x87 exceptions here): RIP moved past it.
    Skipped(Mnemonic),
    /// Computed by the VMM and written back to the registers (`popcnt`, a patched `jmp`).
    Computed(Mnemonic),
    /// An instruction KVM emulates, found at a site the kernel was patching when KVM fetched it
    /// (`call rel32`): nothing changed, the vCPU runs it again. The caller refuses a second retry
    /// at the same RIP in a row (then it was not a patch race).
    Retry(Mnemonic),
}

impl Completion {
    /// The instruction's name, for the per-instruction counters.
    pub fn name(&self) -> String {
        match self {
            Completion::Int3Injected => "int3".to_string(),
            Completion::Skipped(m) | Completion::Computed(m) => format!("{m:?}").to_lowercase(),
            Completion::Retry(m) => format!("{m:?}-retry").to_lowercase(),
        }
    }
}

/// A bounded view of guest memory through the guest's current paging mode.
pub struct GuestView<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl<'a> GuestView<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, sregs: &kvm_sregs) -> Self {
        GuestView {
            mem,
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        }
    }

    /// Linear → guest-physical. Without paging linear is physical; in long mode the guest's
    /// 4- or 5-level tables are walked by trap-handler's bounded walker (fixed depth, every read
    /// checked against guest RAM).
    pub fn translate(&self, linear: u64) -> Result<u64, EmulationError> {
        if self.cr0 & CR0_PG == 0 {
            return Ok(linear & 0xffff_ffff);
        }
        if self.efer & EFER_LMA == 0 {
            // 32-bit paging is never used by the guests Vigil boots (PVH enters long mode directly).
            return Err(EmulationError::Unmapped(linear));
        }
        mem::translate(
            &GuestRam(self.mem),
            self.cr3,
            PagingMode::from_cr4(self.cr4),
            linear,
        )
        .map(|t| t.gpa)
        .map_err(|_| EmulationError::Unmapped(linear))
    }

    /// Reads `buf.len()` bytes at a linear address, page by page.
    pub fn read(&self, linear: u64, buf: &mut [u8]) -> Result<(), EmulationError> {
        let mut done = 0usize;
        while done < buf.len() {
            let addr = linear.wrapping_add(done as u64);
            let in_page = (0x1000 - (addr & 0xfff)) as usize;
            let chunk = in_page.min(buf.len() - done);
            let phys = self.translate(addr)?;
            self.mem
                .read_slice(&mut buf[done..done + chunk], GuestAddress(phys))
                .map_err(|_| EmulationError::Unmapped(addr))?;
            done += chunk;
        }
        Ok(())
    }

    pub fn read_u64(&self, linear: u64) -> Result<u64, EmulationError> {
        let mut b = [0u8; 8];
        self.read(linear, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Decodes the instruction at the vCPU's RIP.
pub fn decode_at_rip(
    view: &GuestView<'_>,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Instruction, EmulationError> {
    let bitness = if sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    };
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    // Read up to 15 bytes, but not across into an unmapped page we do not need.
    let mut bytes = [0u8; MAX_INSN_LEN];
    let first = (0x1000 - (linear & 0xfff)) as usize;
    // The next page wraps to 0 at the top of the address space, as the CPU's fetch does (and
    // as `read` below steps): a guest RIP there must not overflow the VMM's arithmetic.
    let next_page = linear.wrapping_add(first as u64);
    let len = if first >= MAX_INSN_LEN || view.translate(next_page).is_ok() {
        MAX_INSN_LEN
    } else {
        first
    };
    view.read(linear, &mut bytes[..len])?;
    let mut decoder = Decoder::with_ip(bitness, &bytes[..len], regs.rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(EmulationError::Undecodable {
            rip: regs.rip,
            bytes: bytes[..len].to_vec(),
        });
    }
    Ok(insn)
}

/// Completes the instruction at RIP. On success the registers to write back are in `regs`; a
/// returned `Int3Injected` also asks the caller to inject #BP.
pub fn complete(
    view: &GuestView<'_>,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Completion, EmulationError> {
    let insn = decode_at_rip(view, regs, sregs)?;
    let next_rip = regs.rip.wrapping_add(insn.len() as u64);
    match insn.mnemonic() {
        Mnemonic::Int3 => {
            regs.rip = next_rip;
            Ok(Completion::Int3Injected)
        }
        Mnemonic::Wait => {
            regs.rip = next_rip;
            Ok(Completion::Skipped(Mnemonic::Wait))
        }
        // A patched jump-label or static-call site (see the module doc): what memory holds now.
        _ if is_skippable_at_hook(&insn) => {
            regs.rip = next_rip;
            Ok(Completion::Skipped(insn.mnemonic()))
        }
        _ if matches!(insn.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64) => {
            regs.rip = insn.near_branch_target();
            Ok(Completion::Computed(Mnemonic::Jmp))
        }
        _ if insn.code() == Code::Call_rel32_64 => Ok(Completion::Retry(Mnemonic::Call)),
        Mnemonic::Popcnt => {
            let source = read_source_operand(view, regs, sregs, &insn, 1)?;
            let count = u64::from(source.count_ones());
            write_register(regs, insn.op0_register(), count).ok_or_else(|| unsupported(&insn))?;
            regs.rflags &= !RFLAGS_OSZAPC;
            if source == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            regs.rip = next_rip;
            Ok(Completion::Computed(Mnemonic::Popcnt))
        }
        Mnemonic::Rdrand | Mnemonic::Rdseed => {
            // The host's own generator stands in for the CPU's (both are the kernel's CSPRNG-grade
            // sources; `getrandom` draws from the host kernel's crng). A failed draw reports
            // "no random number available" (CF = 0), which the guest must already handle.
            let mut bytes = [0u8; 8];
            // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
            let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
            regs.rflags &= !RFLAGS_OSZAPC;
            if got == bytes.len() as isize {
                write_register(regs, insn.op0_register(), u64::from_le_bytes(bytes))
                    .ok_or_else(|| unsupported(&insn))?;
                regs.rflags |= RFLAGS_CF;
            } else {
                write_register(regs, insn.op0_register(), 0).ok_or_else(|| unsupported(&insn))?;
            }
            regs.rip = next_rip;
            Ok(Completion::Computed(insn.mnemonic()))
        }
        _ => Err(unsupported(&insn)),
    }
}

fn unsupported(insn: &Instruction) -> EmulationError {
    EmulationError::Unsupported {
        rip: insn.ip(),
        text: format!("{insn}"),
    }
}

/// Reads operand `op` (register or memory) zero-extended to 64 bits.
fn read_source_operand(
    view: &GuestView<'_>,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    insn: &Instruction,
    op: u32,
) -> Result<u64, EmulationError> {
    match insn.op_kind(op) {
        OpKind::Register => {
            read_register(regs, insn.op_register(op)).ok_or_else(|| unsupported(insn))
        }
        OpKind::Memory => {
            let size = insn.memory_size().size();
            if !(1..=8).contains(&size) {
                return Err(unsupported(insn));
            }
            // iced-x86 asks for the segment base too: flat in long mode except FS and GS.
            let linear = insn
                .virtual_address(op, 0, |reg, _, _| match reg {
                    Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
                    Register::FS => Some(sregs.fs.base),
                    Register::GS => Some(sregs.gs.base),
                    _ => read_register(regs, reg),
                })
                .ok_or_else(|| unsupported(insn))?;
            let mut bytes = [0u8; 8];
            view.read(linear, &mut bytes[..size])?;
            Ok(u64::from_le_bytes(bytes))
        }
        _ => Err(unsupported(insn)),
    }
}

/// Value of a general-purpose register (any width) or RIP.
pub fn read_register(regs: &kvm_regs, reg: Register) -> Option<u64> {
    let full = match reg.full_register() {
        Register::RAX => regs.rax,
        Register::RBX => regs.rbx,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::RSP => regs.rsp,
        Register::RBP => regs.rbp,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        Register::RIP => regs.rip,
        _ => return None,
    };
    if reg.is_gpr8() {
        // AH/CH/DH/BH are the second byte of their register.
        let high = matches!(
            reg,
            Register::AH | Register::CH | Register::DH | Register::BH
        );
        return Some(if high {
            (full >> 8) & 0xff
        } else {
            full & 0xff
        });
    }
    Some(match reg.size() {
        2 => full & 0xffff,
        4 => full & 0xffff_ffff,
        _ => full,
    })
}

/// Writes a general-purpose register with x86 semantics: a 32-bit write zero-extends, a 16-bit write
/// keeps the upper bits. Byte registers are not needed by the instructions completed here.
pub fn write_register(regs: &mut kvm_regs, reg: Register, value: u64) -> Option<()> {
    if !(reg.is_gpr16() || reg.is_gpr32() || reg.is_gpr64()) {
        return None;
    }
    let slot = match reg.full_register() {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    };
    *slot = match reg.size() {
        2 => (*slot & !0xffff) | (value & 0xffff),
        4 => value & 0xffff_ffff,
        _ => value,
    };
    Some(())
}

/// Whether the instruction can be stepped over by moving RIP alone (used to resume past our own
/// breakpoints without single-stepping): `endbr64` and the NOP forms compilers put at function
/// entry for tracing.
pub fn is_skippable_at_hook(insn: &Instruction) -> bool {
    matches!(
        insn.code(),
        Code::Endbr64
            | Code::Endbr32
            | Code::Nopw
            | Code::Nopd
            | Code::Nopq
            | Code::Nop_rm16
            | Code::Nop_rm32
            | Code::Nop_rm64
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory_with(code: &[u8], at: u64) -> GuestMemoryMmap {
        let mem = crate::anonymous_memory(1 << 20, true).unwrap();
        mem.write_slice(code, GuestAddress(at)).unwrap();
        mem
    }

    fn flat64() -> kvm_sregs {
        let mut sregs = kvm_sregs::default();
        sregs.cs.l = 1;
        sregs
    }

    /// Long-mode paging over `mem`: the top page of the address space and page 0 mapped to
    /// `top_gpa` and `zero_gpa` (4-level tables at 0x10000..0x17000).
    fn paged_top_and_zero(mem: &GuestMemoryMmap, top_gpa: u64, zero_gpa: u64) -> kvm_sregs {
        const PRESENT_RW_USER: u64 = 0x7;
        let tables = [0x10_000u64, 0x11_000, 0x12_000, 0x13_000];
        let low = [0x10_000u64, 0x14_000, 0x15_000, 0x16_000];
        for pair in tables.windows(2) {
            mem.write_obj(pair[1] | PRESENT_RW_USER, GuestAddress(pair[0] + 511 * 8))
                .unwrap();
        }
        mem.write_obj(top_gpa | PRESENT_RW_USER, GuestAddress(tables[3] + 511 * 8))
            .unwrap();
        for pair in low.windows(2) {
            mem.write_obj(pair[1] | PRESENT_RW_USER, GuestAddress(pair[0]))
                .unwrap();
        }
        mem.write_obj(zero_gpa | PRESENT_RW_USER, GuestAddress(low[3]))
            .unwrap();
        let mut sregs = flat64();
        sregs.cr0 = CR0_PG | 1;
        sregs.cr4 = 1 << 5; // PAE
        sregs.efer = EFER_LMA;
        sregs.cr3 = tables[0];
        sregs
    }

    /// A guest RIP in the last bytes of the address space (a hostile kernel can jump there):
    /// the fetch wraps to page 0 as the CPU's does, and the VMM's arithmetic never overflows
    /// (a debug build panicked computing the next page).
    #[test]
    fn an_instruction_at_the_top_of_the_address_space_wraps_to_page_zero() {
        // `nop dword [rax]` (0f 1f 00): two bytes in the top page, one in page 0.
        let mem = memory_with(&[0x0f, 0x1f], 0x20_ffe);
        mem.write_slice(&[0x00], GuestAddress(0x21_000)).unwrap();
        let sregs = paged_top_and_zero(&mem, 0x20_000, 0x21_000);
        let view = GuestView::new(&mem, &sregs);
        let regs = kvm_regs {
            rip: u64::MAX - 1,
            ..Default::default()
        };
        let insn = decode_at_rip(&view, &regs, &sregs).unwrap();
        assert_eq!((insn.mnemonic(), insn.len()), (Mnemonic::Nop, 3));
        // An int3 in the last byte of the address space: RIP moves past it, to 0.
        let mem = memory_with(&[0xcc], 0x20_fff);
        let sregs = paged_top_and_zero(&mem, 0x20_000, 0x21_000);
        let mut regs = kvm_regs {
            rip: u64::MAX,
            ..Default::default()
        };
        let view = GuestView::new(&mem, &sregs);
        assert_eq!(
            complete(&view, &mut regs, &sregs),
            Ok(Completion::Int3Injected)
        );
        assert_eq!(regs.rip, 0, "RIP wraps past the int3");
    }

    #[test]
    fn int3_advances_rip_and_asks_for_bp() {
        let mem = memory_with(&[0xcc], 0x1000);
        let sregs = flat64();
        let view = GuestView::new(&mem, &sregs);
        let mut regs = kvm_regs {
            rip: 0x1000,
            ..Default::default()
        };
        assert_eq!(
            complete(&view, &mut regs, &sregs),
            Ok(Completion::Int3Injected)
        );
        assert_eq!(regs.rip, 0x1001);
    }

    #[test]
    fn popcnt_register_and_memory_forms() {
        // popcnt rax, rbx ; popcnt ecx, dword [rdx+8]
        let mem = memory_with(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3], 0x2000);
        mem.write_obj(0xf0f0_0001u32, GuestAddress(0x3008)).unwrap();
        mem.write_slice(&[0xf3, 0x0f, 0xb8, 0x4a, 0x08], GuestAddress(0x2005))
            .unwrap();
        let sregs = flat64();
        let view = GuestView::new(&mem, &sregs);
        let mut regs = kvm_regs {
            rip: 0x2000,
            rbx: 0xff00_0000_0000_0003,
            rflags: 0x2 | RFLAGS_ZF | 1,
            ..Default::default()
        };
        assert_eq!(
            complete(&view, &mut regs, &sregs),
            Ok(Completion::Computed(Mnemonic::Popcnt))
        );
        assert_eq!(regs.rax, 10);
        assert_eq!(
            regs.rflags & RFLAGS_OSZAPC,
            0,
            "popcnt clears ZF and CF for a nonzero source"
        );
        assert_eq!(regs.rip, 0x2005);
        regs.rcx = 0xdead_beef_0000_0000;
        regs.rdx = 0x3000;
        complete(&view, &mut regs, &sregs).unwrap();
        assert_eq!(regs.rcx, 9, "a 32-bit destination is zero-extended");
        assert_eq!(regs.rip, 0x200a);
    }

    #[test]
    fn popcnt_of_zero_sets_zf() {
        let mem = memory_with(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3], 0x2000);
        let sregs = flat64();
        let view = GuestView::new(&mem, &sregs);
        let mut regs = kvm_regs {
            rip: 0x2000,
            rax: 77,
            ..Default::default()
        };
        complete(&view, &mut regs, &sregs).unwrap();
        assert_eq!(regs.rax, 0);
        assert_ne!(regs.rflags & RFLAGS_ZF, 0);
    }

    #[test]
    fn rdrand_and_rdseed_fill_the_register_and_set_cf() {
        // rdrand rax; rdseed ecx
        let mem = memory_with(&[0x48, 0x0f, 0xc7, 0xf0, 0x0f, 0xc7, 0xf9], 0x1000);
        let sregs = flat64();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let mut regs = kvm_regs {
                rip: 0x1000,
                rcx: u64::MAX,
                rflags: 0x2 | RFLAGS_ZF,
                ..Default::default()
            };
            let view = GuestView::new(&mem, &sregs);
            let done = complete(&view, &mut regs, &sregs).unwrap();
            assert_eq!(done.name(), "rdrand");
            assert_eq!(regs.rip, 0x1004);
            assert_eq!(
                regs.rflags & RFLAGS_OSZAPC,
                RFLAGS_CF,
                "CF set, others clear"
            );
            seen.push(regs.rax);
            let done = complete(&view, &mut regs, &sregs).unwrap();
            assert_eq!(done.name(), "rdseed");
            assert_eq!(regs.rip, 0x1007);
            assert_eq!(regs.rcx >> 32, 0, "a 32-bit destination zero-extends");
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 4, "four draws, four different values");
    }

    #[test]
    fn patched_sites_run_what_memory_holds_now() {
        // nopl 0x0(%rax,%rax,1) (the 5-byte NOP of a jump label) at 0x1000; jmp rel8 +0x19 at
        // 0x1005; jmp rel32 -0x10 at 0x1007; call rel32 at 0x100c; xchg ax,ax (66 90) at 0x1011.
        let code = [
            0x0f, 0x1f, 0x44, 0x00, 0x00, 0xeb, 0x19, 0xe9, 0xf0, 0xff, 0xff, 0xff, 0xe8, 0x00,
            0x01, 0x00, 0x00, 0x66, 0x90,
        ];
        let mem = memory_with(&code, 0x1000);
        let sregs = flat64();
        let view = GuestView::new(&mem, &sregs);
        let mut regs = kvm_regs {
            rip: 0x1000,
            rsp: 0x8000,
            ..Default::default()
        };
        let run = |regs: &mut kvm_regs, rip| {
            regs.rip = rip;
            complete(&view, regs, &sregs)
        };
        assert_eq!(
            run(&mut regs, 0x1000),
            Ok(Completion::Skipped(Mnemonic::Nop))
        );
        assert_eq!(regs.rip, 0x1005);
        assert_eq!(
            run(&mut regs, 0x1005),
            Ok(Completion::Computed(Mnemonic::Jmp))
        );
        assert_eq!(regs.rip, 0x1007 + 0x19);
        run(&mut regs, 0x1007).unwrap();
        assert_eq!(regs.rip, 0x100c - 0x10);
        assert_eq!(
            run(&mut regs, 0x100c),
            Ok(Completion::Retry(Mnemonic::Call))
        );
        assert_eq!((regs.rip, regs.rsp), (0x100c, 0x8000), "nothing done");
        assert_eq!(Completion::Retry(Mnemonic::Call).name(), "call-retry");
        run(&mut regs, 0x1011).unwrap();
        assert_eq!(regs.rip, 0x1013);
    }

    #[test]
    fn a_site_still_holding_the_patch_int3_goes_to_the_guest() {
        // text_poke_bp mid-way: int3 over the first byte, the new tail behind it.
        let mem = memory_with(&[0xcc, 0x1f, 0x44, 0x00, 0x00], 0x1000);
        let sregs = flat64();
        let view = GuestView::new(&mem, &sregs);
        let mut regs = kvm_regs {
            rip: 0x1000,
            ..Default::default()
        };
        assert_eq!(
            complete(&view, &mut regs, &sregs),
            Ok(Completion::Int3Injected)
        );
        assert_eq!(regs.rip, 0x1001);
    }

    #[test]
    fn unknown_instruction_is_named_not_guessed() {
        // xrstor [rdi]
        let mem = memory_with(&[0x0f, 0xae, 0x2f], 0x1000);
        let sregs = flat64();
        let view = GuestView::new(&mem, &sregs);
        let mut regs = kvm_regs {
            rip: 0x1000,
            ..Default::default()
        };
        match complete(&view, &mut regs, &sregs) {
            Err(EmulationError::Unsupported { rip, text }) => {
                assert_eq!(rip, 0x1000);
                assert!(text.contains("xrstor"), "{text}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        assert_eq!(regs.rip, 0x1000, "nothing changes when we refuse");
    }

    #[test]
    fn rip_outside_ram_is_an_error() {
        let mem = memory_with(&[], 0);
        let sregs = flat64();
        let view = GuestView::new(&mem, &sregs);
        let mut regs = kvm_regs {
            rip: 0x7fff_0000,
            ..Default::default()
        };
        assert!(matches!(
            complete(&view, &mut regs, &sregs),
            Err(EmulationError::Unmapped(_))
        ));
    }

    #[test]
    fn long_mode_walk_follows_huge_pages_and_rejects_missing_entries() {
        let mem = crate::anonymous_memory(4 << 20, true).unwrap();
        // PML4 at 0x10000 -> PDPT at 0x11000 -> PD at 0x12000 with a 2 MiB page at 0x200000.
        mem.write_obj(0x11000u64 | 3, GuestAddress(0x10000))
            .unwrap();
        mem.write_obj(0x12000u64 | 3, GuestAddress(0x11000))
            .unwrap();
        mem.write_obj(0x200000u64 | 0x83, GuestAddress(0x12000))
            .unwrap();
        let sregs = kvm_sregs {
            cr0: CR0_PG | 1,
            cr3: 0x10000,
            efer: EFER_LMA,
            ..Default::default()
        };
        let view = GuestView::new(&mem, &sregs);
        assert_eq!(view.translate(0x1234), Ok(0x201234));
        assert_eq!(
            view.translate(0x200000),
            Err(EmulationError::Unmapped(0x200000))
        );
    }
}
