//! A vCPU's registers as text, laid out like QEMU's HMP `info registers` for x86_64.

use std::fmt::Write;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

const RFLAGS_NAMES: [(u64, char); 7] = [
    (1 << 11, 'O'),
    (1 << 10, 'D'),
    (1 << 7, 'S'),
    (1 << 6, 'Z'),
    (1 << 4, 'A'),
    (1 << 2, 'P'),
    (1 << 0, 'C'),
];

fn flags_text(rflags: u64) -> String {
    RFLAGS_NAMES
        .iter()
        .map(|(bit, name)| if rflags & bit != 0 { *name } else { '-' })
        .collect()
}

/// The segment's attribute word as QEMU prints it (the descriptor's bits 8..23).
fn segment_flags(s: &kvm_segment) -> u32 {
    u32::from(s.type_) << 8
        | u32::from(s.s) << 12
        | u32::from(s.dpl) << 13
        | u32::from(s.present) << 15
        | u32::from(s.avl) << 20
        | u32::from(s.l) << 21
        | u32::from(s.db) << 22
        | u32::from(s.g) << 23
}

/// Formats registers read from a vCPU.
pub fn format_registers(r: &kvm_regs, s: &kvm_sregs) -> String {
    let mut out = String::new();
    let gprs = [
        ("RAX", r.rax),
        ("RBX", r.rbx),
        ("RCX", r.rcx),
        ("RDX", r.rdx),
        ("RSI", r.rsi),
        ("RDI", r.rdi),
        ("RBP", r.rbp),
        ("RSP", r.rsp),
        ("R8 ", r.r8),
        ("R9 ", r.r9),
        ("R10", r.r10),
        ("R11", r.r11),
        ("R12", r.r12),
        ("R13", r.r13),
        ("R14", r.r14),
        ("R15", r.r15),
    ];
    for row in gprs.chunks(4) {
        let line: Vec<String> = row.iter().map(|(n, v)| format!("{n}={v:016x}")).collect();
        let _ = writeln!(out, "{}", line.join(" "));
    }
    let cpl = s.cs.dpl;
    let _ = writeln!(
        out,
        "RIP={:016x} RFL={:08x} [{}] CPL={cpl}",
        r.rip,
        r.rflags,
        flags_text(r.rflags)
    );
    for (name, seg) in [
        ("ES", &s.es),
        ("CS", &s.cs),
        ("SS", &s.ss),
        ("DS", &s.ds),
        ("FS", &s.fs),
        ("GS", &s.gs),
        ("LDT", &s.ldt),
        ("TR", &s.tr),
    ] {
        let _ = writeln!(
            out,
            "{name:<3}={:04x} {:016x} {:08x} {:08x}",
            seg.selector,
            seg.base,
            seg.limit,
            segment_flags(seg)
        );
    }
    let _ = writeln!(out, "GDT=     {:016x} {:08x}", s.gdt.base, s.gdt.limit);
    let _ = writeln!(out, "IDT=     {:016x} {:08x}", s.idt.base, s.idt.limit);
    let _ = writeln!(
        out,
        "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}",
        s.cr0, s.cr2, s.cr3, s.cr4
    );
    let _ = writeln!(out, "EFER={:016x} APIC_BASE={:016x}", s.efer, s.apic_base);
    out
}

/// Reads and formats a vCPU's registers.
pub fn register_dump(vcpu: &VcpuFd) -> Result<String, kvm_ioctls::Error> {
    Ok(format_registers(&vcpu.get_regs()?, &vcpu.get_sregs()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu() {
        let regs = kvm_regs {
            rax: 0x1234,
            rip: 0x10_0000,
            rflags: 0x46,
            ..Default::default()
        };
        let text = format_registers(&regs, &kvm_sregs::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "RAX=0000000000001234 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000"
        );
        assert_eq!(
            lines[4],
            "RIP=0000000000100000 RFL=00000046 [---Z-P-] CPL=0"
        );
        assert!(lines[5].starts_with("ES =0000 0000000000000000"));
    }
}
