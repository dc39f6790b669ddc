//! Building tiny guests with iced-x86's [`CodeAssembler`].
//!
//! A tiny guest is 64-bit code entered by the VMM through the Linux 64-bit boot protocol:
//! long mode, identity map of the first 4 GiB (PML4 at 0x9000), flat code/data segments
//! (CS=0x08, DS/ES/SS=0x10), interrupts off, an empty IDT (any exception triple-faults), a stack
//! at 0x8ff0. All code is produced by the assembler; no machine code bytes are written by hand.
//!
//! [`Asm`] wraps a [`CodeAssembler`] (it dereferences to it, so every instruction method is
//! available) and adds helpers for the devices of the Skiff machine. [`Image`] lays out several
//! assembled blocks at fixed guest physical addresses inside the one ELF segment, and
//! [`ap_trampoline`] builds the real-mode entry code of application processors.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use super::elf::{self, LOAD_ADDR};

/// Result of the assembler helpers.
pub type AsmResult<T = ()> = Result<T, IcedError>;

/// COM1 transmit holding / receive buffer register.
pub const COM1: u16 = 0x3f8;
/// COM1 line status register (bit 0: data ready, bit 5: THR empty).
pub const COM1_LSR: u16 = 0x3fd;
/// Skiff exit device: `out` of a byte N ends the VM, skiff exits with status N.
pub const EXIT_PORT: u16 = 0x501;
/// CMOS/RTC index register.
pub const CMOS_INDEX: u16 = 0x70;
/// CMOS/RTC data register.
pub const CMOS_DATA: u16 = 0x71;
/// A CMOS RAM byte with no RTC meaning, used by tests as a boot counter (survives resets).
pub const CMOS_BOOT_COUNTER: u8 = 0x40;
/// i8042 command port (`0xfe` written here pulses the CPU reset line).
pub const I8042_COMMAND: u16 = 0x64;
/// Local APIC MMIO base.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Local APIC ID register (the APIC id is in bits 31:24).
pub const LAPIC_ID: u64 = LAPIC_BASE + 0x20;
/// Local APIC spurious interrupt vector register (bit 8: APIC software enable).
pub const LAPIC_SVR: u64 = LAPIC_BASE + 0xf0;
/// Local APIC end-of-interrupt register.
pub const LAPIC_EOI: u64 = LAPIC_BASE + 0xb0;
/// Local APIC interrupt command register, low half (writing it sends the IPI).
pub const LAPIC_ICR_LOW: u64 = LAPIC_BASE + 0x300;
/// Local APIC interrupt command register, high half (destination in bits 31:24).
pub const LAPIC_ICR_HIGH: u64 = LAPIC_BASE + 0x310;
/// IOAPIC MMIO base (IOREGSEL at +0, IOWIN at +0x10).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// A scratch data area for guests (locks, counters), zero at boot, clear of the image.
pub const DATA_AREA: u64 = 0x20_0000;
/// Where [`ap_trampoline`] must be copied: application processors start at `vector << 12`.
pub const AP_TRAMPOLINE_ADDR: u64 = 0x8000;
/// The SIPI vector that starts APs at [`AP_TRAMPOLINE_ADDR`].
pub const AP_SIPI_VECTOR: u8 = (AP_TRAMPOLINE_ADDR >> 12) as u8;
/// Base of the AP stacks: the AP with APIC id `n` gets the 4 KiB below
/// `AP_STACKS + (n + 1) * 0x1000`.
pub const AP_STACKS: u64 = 0x30_0000;
/// Page-table root the VMM built (identity map of the first 4 GiB); APs load it into CR3.
pub const BOOT_PML4: u32 = 0x9000;

/// A [`CodeAssembler`] with helpers for the Skiff machine's devices.
///
/// Helpers document the registers they clobber. Port I/O helpers use `al`/`dx`; memory helpers
/// use `rbx` for addresses (64-bit immediates above 2 GiB cannot be encoded as displacements).
pub struct Asm {
    inner: CodeAssembler,
}

impl Deref for Asm {
    type Target = CodeAssembler;
    fn deref(&self) -> &CodeAssembler {
        &self.inner
    }
}

impl DerefMut for Asm {
    fn deref_mut(&mut self) -> &mut CodeAssembler {
        &mut self.inner
    }
}

impl Asm {
    /// An assembler for `bitness` (16, 32 or 64) bit code.
    pub fn new(bitness: u32) -> Asm {
        Asm {
            inner: CodeAssembler::new(bitness).expect("valid bitness"),
        }
    }

    /// An assembler for 64-bit code (what tiny guests are).
    pub fn new64() -> Asm {
        Asm::new(64)
    }

    /// Assembles everything added so far for address `ip`.
    pub fn assemble(&mut self, ip: u64) -> Vec<u8> {
        self.inner
            .assemble(ip)
            .unwrap_or_else(|e| panic!("assembling guest code at {ip:#x} failed: {e}"))
    }

    /// Assembles for address `ip` and also returns the address of each label in `labels`
    /// (each must have been placed with `set_label` before an instruction).
    pub fn assemble_with_labels(&mut self, ip: u64, labels: &[CodeLabel]) -> (Vec<u8>, Vec<u64>) {
        let result = self
            .inner
            .assemble_options(ip, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .unwrap_or_else(|e| panic!("assembling guest code at {ip:#x} failed: {e}"));
        let addrs = labels
            .iter()
            .map(|l| result.label_ip(l).expect("label placed on an instruction"))
            .collect();
        (result.inner.code_buffer, addrs)
    }

    /// Writes the bytes of `text` to COM1, one `out` per byte. Clobbers `al`, `dx`.
    pub fn print(&mut self, text: &str) -> AsmResult {
        self.mov(dx, u32::from(COM1))?;
        for byte in text.bytes() {
            self.mov(al, u32::from(byte))?;
            self.out(dx, al)?;
        }
        Ok(())
    }

    /// Writes `al` to COM1. Clobbers `dx`.
    pub fn putc_al(&mut self) -> AsmResult {
        self.mov(dx, u32::from(COM1))?;
        self.out(dx, al)
    }

    /// Writes `al` (0..=9) to COM1 as a decimal digit. Clobbers `al`, `dx`.
    pub fn put_digit_al(&mut self) -> AsmResult {
        self.add(al, i32::from(b'0'))?;
        self.putc_al()
    }

    /// Ends the VM with exit status `code` (Skiff exit device). Clobbers `al`, `dx`.
    pub fn exit(&mut self, code: u8) -> AsmResult {
        self.mov(al, u32::from(code))?;
        self.exit_al()
    }

    /// Ends the VM with exit status `al`. Clobbers `dx`.
    pub fn exit_al(&mut self) -> AsmResult {
        self.mov(dx, u32::from(EXIT_PORT))?;
        self.out(dx, al)?;
        // Not reached if the exit device works; never run into whatever follows.
        self.halt_forever()
    }

    /// `cli; hlt` forever.
    pub fn halt_forever(&mut self) -> AsmResult {
        let mut again = self.create_label();
        self.set_label(&mut again)?;
        self.cli()?;
        self.hlt()?;
        self.jmp(again)
    }

    /// Loads the IDT [`write_interrupt_guest`] lays out, software-enables the local APIC
    /// (spurious vector 0xff) and masks both 8259 PICs, so interrupts arrive only through the
    /// IOAPIC or the local APIC. Clobbers `rax`, `rbx`.
    pub fn setup_interrupts(&mut self) -> AsmResult {
        self.mov(rax, IDTR)?;
        self.lidt(ptr(rax))?;
        self.mov(rbx, LAPIC_SVR)?;
        self.mov(dword_ptr(rbx), 0x1ff)?;
        self.mov(al, 0xff)?;
        self.out(0x21, al)?;
        self.out(0xa1, al)
    }

    /// Signals the end of the interrupt to the local APIC. Clobbers `rbx`.
    pub fn lapic_eoi(&mut self) -> AsmResult {
        self.mov(rbx, LAPIC_EOI)?;
        self.mov(dword_ptr(rbx), 0)
    }

    /// Routes IOAPIC pin `pin` to `vector`: fixed delivery, physical destination APIC 0, edge
    /// triggered, active high, unmasked. Clobbers `rbx`.
    pub fn ioapic_route(&mut self, pin: u8, vector: u8) -> AsmResult {
        self.mov(rbx, IOAPIC_BASE)?;
        self.mov(dword_ptr(rbx), 0x10 + 2 * i32::from(pin))?;
        self.mov(dword_ptr(rbx + 0x10), i32::from(vector))?;
        self.mov(dword_ptr(rbx), 0x11 + 2 * i32::from(pin))?;
        self.mov(dword_ptr(rbx + 0x10), 0)
    }

    /// Resets the machine through the i8042 (command 0xfe), then halts. Clobbers `al`.
    pub fn i8042_reset(&mut self) -> AsmResult {
        self.mov(al, 0xfe)?;
        self.out(u32::from(I8042_COMMAND), al)?;
        self.halt_forever()
    }

    /// `al` = CMOS RAM byte `index`.
    pub fn cmos_read(&mut self, index: u8) -> AsmResult {
        self.mov(al, u32::from(index))?;
        self.out(u32::from(CMOS_INDEX), al)?;
        self.in_(al, u32::from(CMOS_DATA))
    }

    /// CMOS RAM byte `index` = `bl`. Clobbers `al`.
    pub fn cmos_write_bl(&mut self, index: u8) -> AsmResult {
        self.mov(al, u32::from(index))?;
        self.out(u32::from(CMOS_INDEX), al)?;
        self.mov(al, bl)?;
        self.out(u32::from(CMOS_DATA), al)
    }

    /// Acquires the spin lock (a dword, 0 = free) at `addr` with `xchg`. Clobbers `eax`, `rbx`.
    pub fn spin_lock(&mut self, addr: u64) -> AsmResult {
        let mut retry = self.create_label();
        let mut wait = self.create_label();
        let mut acquired = self.create_label();
        self.mov(rbx, addr)?;
        self.set_label(&mut retry)?;
        self.mov(eax, 1)?;
        self.xchg(dword_ptr(rbx), eax)?;
        self.test(eax, eax)?;
        self.jz(acquired)?;
        // Held: spin reading (no locked bus cycles) until it looks free, then try again.
        self.set_label(&mut wait)?;
        self.cmp(dword_ptr(rbx), 0)?;
        self.jne(wait)?;
        self.jmp(retry)?;
        self.set_label(&mut acquired)?;
        self.nop()
    }

    /// Releases the spin lock at `addr` (x86 stores are release stores). Clobbers `rbx`.
    pub fn spin_unlock(&mut self, addr: u64) -> AsmResult {
        self.mov(rbx, addr)?;
        self.mov(dword_ptr(rbx), 0)
    }

    /// `eax` = this CPU's local APIC id (LAPIC ID register bits 31:24). Clobbers `rbx`.
    pub fn lapic_id_eax(&mut self) -> AsmResult {
        self.mov(rbx, LAPIC_ID)?;
        self.mov(eax, dword_ptr(rbx))?;
        self.shr(eax, 24)
    }

    /// Copies `len` bytes (rounded up to 8) from `src` to `dst`, a qword at a time.
    /// Clobbers `rax`, `rcx`, `rsi`, `rdi`.
    pub fn copy_memory(&mut self, src: u64, dst: u64, len: usize) -> AsmResult {
        let qwords = u32::try_from(len.div_ceil(8)).expect("small copy");
        let mut next = self.create_label();
        self.mov(rsi, src)?;
        self.mov(rdi, dst)?;
        self.mov(ecx, qwords)?;
        self.set_label(&mut next)?;
        self.mov(rax, qword_ptr(rsi))?;
        self.mov(qword_ptr(rdi), rax)?;
        self.add(rsi, 8)?;
        self.add(rdi, 8)?;
        self.dec(ecx)?;
        self.jnz(next)
    }

    /// Starts every other CPU at `vector << 12` in real mode: software-enables the local APIC,
    /// then sends INIT and SIPI(`vector`) to all excluding self. Clobbers `rbx`.
    pub fn start_aps(&mut self, vector: u8) -> AsmResult {
        /// ICR delivery mode INIT.
        const ICR_INIT: u32 = 0b101 << 8;
        /// ICR delivery mode start-up.
        const ICR_STARTUP: u32 = 0b110 << 8;
        /// ICR level: assert.
        const ICR_ASSERT: u32 = 1 << 14;
        /// ICR destination shorthand: all excluding self.
        const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
        // Spurious vector 0xff, bit 8 = APIC software enable.
        self.mov(rbx, LAPIC_SVR)?;
        self.mov(dword_ptr(rbx), 0x1ffu32)?;
        self.mov(rbx, LAPIC_ICR_HIGH)?;
        self.mov(dword_ptr(rbx), 0u32)?;
        self.mov(rbx, LAPIC_ICR_LOW)?;
        self.mov(dword_ptr(rbx), ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT)?;
        self.mov(
            dword_ptr(rbx),
            ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | u32::from(vector),
        )
    }
}

/// A guest image: assembled blocks at fixed guest physical addresses from [`LOAD_ADDR`] up,
/// written as the one segment of an ELF executable (gaps are zero).
#[derive(Default)]
pub struct Image {
    bytes: Vec<u8>,
}

impl Image {
    /// An empty image.
    pub fn new() -> Image {
        Image::default()
    }

    /// Places `bytes` at guest physical address `addr` (at or above [`LOAD_ADDR`], after
    /// everything placed so far).
    pub fn place(&mut self, addr: u64, bytes: &[u8]) -> &mut Image {
        assert!(addr >= LOAD_ADDR, "{addr:#x} is below the load address");
        let offset = usize::try_from(addr - LOAD_ADDR).expect("small image");
        assert!(
            offset >= self.bytes.len(),
            "block at {addr:#x} overlaps the previous one (image ends at {:#x})",
            LOAD_ADDR + self.bytes.len() as u64
        );
        self.bytes.resize(offset, 0);
        self.bytes.extend_from_slice(bytes);
        self
    }

    /// The image's bytes, starting at [`LOAD_ADDR`].
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Writes the image as an ELF executable to `path` and returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        elf::write_elf(path, &self.bytes, 0);
        path.to_path_buf()
    }
}

/// Assembles a single-block guest (entered at its first instruction) with `body` and writes
/// it as `dir/name` (an ELF executable). Returns the file's path.
pub fn write_guest(dir: &Path, name: &str, body: impl FnOnce(&mut Asm) -> AsmResult) -> PathBuf {
    let mut a = Asm::new64();
    body(&mut a).unwrap_or_else(|e| panic!("building guest {name}: {e}"));
    let code = a.assemble(LOAD_ADDR);
    Image::new().place(LOAD_ADDR, &code).write(&dir.join(name))
}

/// Where [`write_interrupt_guest`] places the interrupt handlers.
pub const HANDLERS: u64 = LOAD_ADDR + 0x2000;
/// Where [`write_interrupt_guest`] places the IDT (256 16-byte gates).
pub const IDT: u64 = LOAD_ADDR + 0x3000;
/// The IDT pseudo-descriptor (limit, base), right after the IDT.
pub const IDTR: u64 = IDT + 256 * 16;
/// Exit status of an interrupt guest when an interrupt or exception it has no handler for
/// arrives.
pub const UNEXPECTED_VECTOR_EXIT: u8 = 77;

/// Encodes a 64-bit interrupt gate (present, DPL 0, type 0xE) to `handler` in code segment
/// 0x08.
pub fn interrupt_gate(handler: u64) -> [u8; 16] {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x08u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    gate
}

/// Builds a guest that takes interrupts and writes it as `dir/name`; returns the file's path.
///
/// `main` is assembled at the load address and should start with
/// [`Asm::setup_interrupts`]. `handlers` assembles the guest's own interrupt handlers (at
/// [`HANDLERS`]) and returns the vector and label of each; the spurious vector 0xff returns at
/// once and any other vector prints `unexpected interrupt or exception` and exits with
/// [`UNEXPECTED_VECTOR_EXIT`]. The IDT and its pseudo-descriptor follow at [`IDT`].
pub fn write_interrupt_guest(
    dir: &Path,
    name: &str,
    handlers: impl FnOnce(&mut Asm) -> AsmResult<Vec<(u8, CodeLabel)>>,
    main: impl FnOnce(&mut Asm) -> AsmResult,
) -> PathBuf {
    let build = || -> AsmResult<Image> {
        let mut a = Asm::new64();
        let own = handlers(&mut a)?;
        let mut spurious = a.create_label();
        let mut unexpected = a.create_label();
        a.set_label(&mut spurious)?;
        a.iretq()?;
        a.set_label(&mut unexpected)?;
        a.print("unexpected interrupt or exception\n")?;
        a.exit(UNEXPECTED_VECTOR_EXIT)?;
        let mut labels: Vec<CodeLabel> = own.iter().map(|&(_, label)| label).collect();
        labels.extend([spurious, unexpected]);
        let (code, addrs) = a.assemble_with_labels(HANDLERS, &labels);
        let mut idt = Vec::with_capacity(256 * 16 + 10);
        for vector in 0..=255u8 {
            let handler = match own.iter().position(|&(v, _)| v == vector) {
                Some(i) => addrs[i],
                None if vector == 0xff => addrs[own.len()],
                None => addrs[own.len() + 1],
            };
            idt.extend_from_slice(&interrupt_gate(handler));
        }
        idt.extend_from_slice(&(256u16 * 16 - 1).to_le_bytes());
        idt.extend_from_slice(&IDT.to_le_bytes());

        let mut a = Asm::new64();
        main(&mut a)?;
        let main = a.assemble(LOAD_ADDR);
        let mut image = Image::new();
        image
            .place(LOAD_ADDR, &main)
            .place(HANDLERS, &code)
            .place(IDT, &idt);
        Ok(image)
    };
    build()
        .unwrap_or_else(|e| panic!("building guest {name}: {e}"))
        .write(&dir.join(name))
}

/// Encodes a GDT segment descriptor.
///
/// `access` is the access byte (bit 7 present, bits 6:5 DPL, bit 4 code/data, bits 3:0 type),
/// `flags` the high nibble of byte 6 (bit 3 granularity 4 KiB, bit 2 default size 32-bit,
/// bit 1 long mode), `limit` is 20 bits.
pub const fn segment_descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((flags as u64) & 0xf) << 52)
        | (((base as u64) >> 24) << 56)
}

/// Access byte: present, DPL 0, code, execute/read.
const ACCESS_CODE: u8 = 0x80 | 0x10 | 0xa;
/// Access byte: present, DPL 0, data, read/write.
const ACCESS_DATA: u8 = 0x80 | 0x10 | 0x2;
/// Flags: 4 KiB granularity, 32-bit default size.
const FLAGS_32: u8 = 0x8 | 0x4;
/// Flags: 4 KiB granularity, long mode.
const FLAGS_64: u8 = 0x8 | 0x2;

/// Trampoline layout, as offsets from [`AP_TRAMPOLINE_ADDR`]: 16-bit code, then the GDT
/// pseudo-descriptor and GDT, then 32-bit code, then 64-bit code.
const TRAMP_GDTR: u64 = 0x100;
const TRAMP_GDT: u64 = 0x108;
const TRAMP_CODE32: u64 = 0x200;
const TRAMP_CODE64: u64 = 0x300;
const TRAMP_END: u64 = 0x400;
/// Selectors of the trampoline's own GDT.
const SEL_CODE32: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_CODE64: u16 = 0x18;

/// Builds the application-processor trampoline, to be copied to [`AP_TRAMPOLINE_ADDR`] and
/// started with SIPI vector [`AP_SIPI_VECTOR`].
///
/// The AP starts in real mode with CS base = the trampoline address and IP 0. It loads the
/// trampoline's own GDT (null, 32-bit code, data, 64-bit code), enters protected mode, enables
/// PAE, loads CR3 with the VMM's identity-map page tables ([`BOOT_PML4`]), sets EFER.LME,
/// enables paging and far-jumps to 64-bit code, which sets up a private stack (see
/// [`AP_STACKS`]) and jumps to `ap_entry` with its APIC id in `edi`.
pub fn ap_trampoline(ap_entry: u64) -> Vec<u8> {
    let base = AP_TRAMPOLINE_ADDR;
    let build = || -> AsmResult<Vec<u8>> {
        // ---- 16-bit real mode, at base ----
        let mut a = Asm::new(16);
        a.cli()?;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.lgdt(ptr(base + TRAMP_GDTR))?;
        a.mov(eax, cr0)?;
        a.or(eax, 1)?; // CR0.PE
        a.mov(cr0, eax)?;
        a.jmp_far(SEL_CODE32, (base + TRAMP_CODE32) as u32)?;
        let code16 = a.assemble(base);

        // ---- 32-bit protected mode ----
        let mut a = Asm::new(32);
        a.mov(ax, u32::from(SEL_DATA))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(eax, cr4)?;
        a.or(eax, 1 << 5)?; // CR4.PAE
        a.mov(cr4, eax)?;
        a.mov(eax, BOOT_PML4)?;
        a.mov(cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?; // IA32_EFER
        a.rdmsr()?;
        a.or(eax, 1 << 8)?; // EFER.LME
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32)?; // CR0.PG
        a.mov(cr0, eax)?;
        a.jmp_far(SEL_CODE64, (base + TRAMP_CODE64) as u32)?;
        let code32 = a.assemble(base + TRAMP_CODE32);

        // ---- 64-bit long mode ----
        let mut a = Asm::new64();
        a.mov(ax, u32::from(SEL_DATA))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.lapic_id_eax()?;
        a.mov(edi, eax)?;
        // rsp = AP_STACKS + (id + 1) * 4 KiB
        a.inc(eax)?;
        a.shl(eax, 12)?;
        a.add(rax, i32::try_from(AP_STACKS).expect("low stacks"))?;
        a.mov(rsp, rax)?;
        a.mov(rax, ap_entry)?;
        a.jmp(rax)?;
        let code64 = a.assemble(base + TRAMP_CODE64);

        // ---- GDT pseudo-descriptor and GDT (data, not code) ----
        let gdt = [
            0,
            segment_descriptor(0, 0xf_ffff, ACCESS_CODE, FLAGS_32),
            segment_descriptor(0, 0xf_ffff, ACCESS_DATA, FLAGS_32),
            segment_descriptor(0, 0xf_ffff, ACCESS_CODE, FLAGS_64),
        ];
        let mut gdt_bytes = Vec::new();
        gdt_bytes.extend_from_slice(&((gdt.len() * 8 - 1) as u16).to_le_bytes()); // limit
        gdt_bytes.extend_from_slice(&((base + TRAMP_GDT) as u32).to_le_bytes()); // base
        gdt_bytes.resize((TRAMP_GDT - TRAMP_GDTR) as usize, 0);
        for entry in gdt {
            gdt_bytes.extend_from_slice(&entry.to_le_bytes());
        }

        let mut out = Vec::with_capacity(TRAMP_END as usize);
        for (offset, block) in [
            (0, code16),
            (TRAMP_GDTR, gdt_bytes),
            (TRAMP_CODE32, code32),
            (TRAMP_CODE64, code64),
        ] {
            assert!(
                out.len() as u64 <= offset,
                "trampoline block overflows into {offset:#x}"
            );
            out.resize(offset as usize, 0);
            out.extend_from_slice(&block);
        }
        assert!(out.len() as u64 <= TRAMP_END, "trampoline too long");
        Ok(out)
    };
    build().unwrap_or_else(|e| panic!("building the AP trampoline: {e}"))
}
