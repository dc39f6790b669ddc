//! The boot state of a vCPU: GDT, IDT, page tables, segment, control and general registers,
//! FPU, boot MSRs and the local APIC's LINT pins. One small function per step.

use crate::memory::GuestRam;
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_ENTRIES, BOOT_GDT_START, BOOT_IDT_START, BOOT_PD_COUNT, BOOT_STACK_POINTER,
    PDPT_START, PD_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

// Control register and EFER bits.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// RFLAGS with only the always-one reserved bit 1 set (interrupts disabled).
const RFLAGS_RESERVED: u64 = 1 << 1;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PDE_PAGE_SIZE: u64 = 1 << 7;
/// Size of one large page mapped by a page-directory entry.
const LARGE_PAGE_SIZE: u64 = 2 << 20;

// Boot GDT selectors (index * 8).
const GDT_CODE_SELECTOR: u16 = 0x08;
const GDT_DATA_SELECTOR: u16 = 0x10;
const GDT_TSS_SELECTOR: u16 = 0x18;

// FPU reset values (Intel SDM vol. 1, 8.1.5 and 10.2.3).
const FPU_CONTROL_WORD: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

// MSR indices.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
// KVM paravirtual MSRs: zeroed at every boot so a reset guest starts without kvmclock,
// async page faults, steal time or PV EOI left enabled by its previous life.
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

// Local APIC LVT registers and delivery modes (Intel SDM vol. 3, 10.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors while putting a vCPU in its boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT to guest memory failed.
    #[error("cannot write the boot GDT: {0}")]
    WriteGdt(vm_memory::GuestMemoryError),
    /// Writing the IDT to guest memory failed.
    #[error("cannot write the boot IDT: {0}")]
    WriteIdt(vm_memory::GuestMemoryError),
    /// Writing the page tables to guest memory failed.
    #[error("cannot write the boot page tables: {0}")]
    WritePageTables(vm_memory::GuestMemoryError),
    /// KVM_GET_SREGS failed.
    #[error("cannot read the special registers: {0}")]
    GetSregs(kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("cannot set the special registers: {0}")]
    SetSregs(kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("cannot set the general registers: {0}")]
    SetRegs(kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("cannot set the FPU state: {0}")]
    SetFpu(kvm_ioctls::Error),
    /// KVM_SET_MSRS failed or set fewer MSRs than asked.
    #[error("cannot set the boot MSRs: {0}")]
    SetMsrs(String),
    /// KVM_GET_LAPIC or KVM_SET_LAPIC failed.
    #[error("cannot program the local APIC: {0}")]
    Lapic(kvm_ioctls::Error),
}

/// Which entry protocol the vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, RBX = `hvm_start_info`.
    Pvh,
}

/// A segment descriptor as the GDT stores it, built from its fields.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT for a protocol: null, code, data, TSS.
fn boot_gdt(protocol: BootProtocol) -> [u64; BOOT_GDT_ENTRIES] {
    match protocol {
        // Code: present, DPL 0, exec/read, long mode (L) with 4 KiB granularity.
        // Data: present, DPL 0, read/write, 32-bit default size, 4 KiB granularity.
        // TSS: present, busy 64-bit TSS.
        BootProtocol::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
        // Flat 32-bit code and data, as PVH requires; a minimal busy TSS.
        BootProtocol::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
    }
}

/// The `kvm_segment` matching a GDT entry, so the descriptor in memory and the cached segment
/// registers cannot disagree.
fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if granularity == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// Writes the GDT and the empty IDT to guest memory.
pub fn write_descriptor_tables(mem: &GuestRam, protocol: BootProtocol) -> Result<(), RegsError> {
    for (index, entry) in boot_gdt(protocol).iter().enumerate() {
        let addr = BOOT_GDT_START.unchecked_add(index as u64 * 8);
        mem.write_obj(*entry, addr).map_err(RegsError::WriteGdt)?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
        .map_err(RegsError::WriteIdt)
}

/// Writes page tables identity-mapping the first [`BOOT_PD_COUNT`] GiB with 2 MiB pages.
pub fn write_page_tables(mem: &GuestRam) -> Result<(), RegsError> {
    let table_flags = PTE_PRESENT | PTE_WRITABLE;
    mem.write_obj(PDPT_START.0 | table_flags, PML4_START)
        .map_err(RegsError::WritePageTables)?;
    for pd in 0..BOOT_PD_COUNT {
        let pd_addr = PD_START.0 + pd * 0x1000;
        mem.write_obj(pd_addr | table_flags, PDPT_START.unchecked_add(pd * 8))
            .map_err(RegsError::WritePageTables)?;
        for entry in 0..512u64 {
            let phys = (pd * 512 + entry) * LARGE_PAGE_SIZE;
            mem.write_obj(
                phys | table_flags | PDE_PAGE_SIZE,
                GuestAddress(pd_addr + entry * 8),
            )
            .map_err(RegsError::WritePageTables)?;
        }
    }
    Ok(())
}

/// The special registers for a protocol, starting from the vCPU's current ones.
pub fn boot_sregs(mut sregs: kvm_sregs, protocol: BootProtocol) -> kvm_sregs {
    let gdt = boot_gdt(protocol);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    debug_assert_eq!(code.selector, GDT_CODE_SELECTOR);
    debug_assert_eq!(data.selector, GDT_DATA_SELECTOR);
    debug_assert_eq!(tss.selector, GDT_TSS_SELECTOR);

    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// The general registers at the kernel entry point.
pub fn boot_regs(entry: GuestAddress, protocol: BootProtocol) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER.0;
            regs.rbp = BOOT_STACK_POINTER.0;
            regs.rsi = ZERO_PAGE_START.0;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START.0,
    }
    regs
}

/// The MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
        entry(MSR_KVM_WALL_CLOCK_NEW, 0),
        entry(MSR_KVM_SYSTEM_TIME_NEW, 0),
        entry(MSR_KVM_ASYNC_PF_EN, 0),
        entry(MSR_KVM_STEAL_TIME, 0),
        entry(MSR_KVM_PV_EOI_EN, 0),
    ]
}

/// Sets the boot MSRs on a vCPU. MSRs the host KVM does not know (KVM PV MSRs on a host
/// without them) are skipped; any other shortfall is an error.
pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .filter(|e| supported.contains(&e.index))
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| RegsError::SetMsrs(format!("{e:?}")))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::SetMsrs(e.to_string()))?;
    if set != entries.len() {
        let failed = entries.get(set).map_or(0, |e| e.index);
        return Err(RegsError::SetMsrs(format!(
            "KVM accepted {set} of {} MSRs; MSR {failed:#x} was refused",
            entries.len()
        )));
    }
    Ok(())
}

/// Sets the FPU to its reset state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Sets the general and special registers for the entry point.
pub fn setup_registers(
    vcpu: &VcpuFd,
    entry: GuestAddress,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry, protocol))
        .map_err(RegsError::SetRegs)?;
    let sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&boot_sregs(sregs, protocol))
        .map_err(RegsError::SetSregs)
}

fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_register(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

/// Replaces the delivery mode (bits 8..10) of an LVT register value.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 as ExtINT and LINT1 as NMI ("virtual wire" mode), so PIC interrupts reach
/// the boot CPU before the guest programs the IOAPIC.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::Lapic)?;
    let lvt0 = lapic_register(&lapic, APIC_LVT0);
    set_lapic_register(
        &mut lapic,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_register(&lapic, APIC_LVT1);
    set_lapic_register(
        &mut lapic,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(RegsError::Lapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MIB;

    fn guest_memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap()
    }

    #[test]
    fn gdt_entries_have_the_expected_bytes() {
        let gdt = boot_gdt(BootProtocol::Linux64);
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[3], 0x008f_8b00_0000_ffff);
        let pvh = boot_gdt(BootProtocol::Pvh);
        assert_eq!(pvh[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(pvh[2], 0x00cf_9300_0000_ffff);
        assert_eq!(pvh[3], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn segments_decode_their_descriptors() {
        let gdt = boot_gdt(BootProtocol::Linux64);
        let code = segment_from_gdt(gdt[1], 1);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.g),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(
            (code.base, code.limit, code.present, code.s),
            (0, 0xffff_ffff, 1, 1)
        );
        let data = segment_from_gdt(gdt[2], 2);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l),
            (0x10, 3, 1, 0)
        );
        let tss = segment_from_gdt(gdt[3], 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }

    #[test]
    fn descriptor_tables_land_in_guest_memory() {
        let mem = guest_memory();
        write_descriptor_tables(&mem, BootProtocol::Linux64).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(0x508)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let idt: u64 = mem.read_obj(BOOT_IDT_START).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = guest_memory();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(PML4_START).unwrap();
        assert_eq!(pml4, 0xa003);
        for pd in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(0xa000 + pd * 8)).unwrap();
            assert_eq!(pdpte, (0xb000 + pd * 0x1000) | 3);
        }
        let first: u64 = mem.read_obj(GuestAddress(0xb000)).unwrap();
        assert_eq!(first, 0x83);
        let last: u64 = mem.read_obj(GuestAddress(0xe000 + 511 * 8)).unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn linux_entry_registers() {
        let regs = boot_regs(GuestAddress(0x100_0000), BootProtocol::Linux64);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
        let pvh = boot_regs(GuestAddress(0x100_0000), BootProtocol::Pvh);
        assert_eq!((pvh.rbx, pvh.rsi), (0x6000, 0));
    }

    #[test]
    fn long_mode_sregs() {
        let sregs = boot_sregs(kvm_sregs::default(), BootProtocol::Linux64);
        assert_eq!(sregs.cr0, 0x8000_0011);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0x9000, 0x20, 0x500));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
        let pvh = boot_sregs(kvm_sregs::default(), BootProtocol::Pvh);
        assert_eq!((pvh.cr0, pvh.cr4, pvh.efer), (0x11, 0, 0));
    }

    #[test]
    fn lint_delivery_modes() {
        assert_eq!(
            with_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(with_delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
    }

    /// Reads the registers back from a real vCPU (skips without /dev/kvm).
    #[test]
    fn registers_read_back_from_a_real_vcpu() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED: /dev/kvm is not available");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_registers(&vcpu, GuestAddress(0x20_0000), BootProtocol::Linux64).unwrap();
        setup_fpu(&vcpu).unwrap();
        setup_lint(&vcpu).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert_eq!((regs.rip, regs.rsi), (0x20_0000, 0x7000));
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!((sregs.cr3, sregs.cs.selector, sregs.cs.l), (0x9000, 8, 1));
        assert_eq!(vcpu.get_fpu().unwrap().fcw, FPU_CONTROL_WORD);
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!(
            (lapic_register(&lapic, APIC_LVT0) >> 8) & 7,
            APIC_MODE_EXTINT
        );
        assert_eq!((lapic_register(&lapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
