//! The text of HMP's `info registers` (QMP `x-query-registers`), laid out as QEMU's x86
//! `cpu_dump_state` prints it for a 64-bit guest, so that an operator reads it the same way.

use std::fmt::Write as _;

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

const FLAG_CHARS: [(u64, char); 7] = [
    (1 << 10, 'D'),
    (1 << 11, 'O'),
    (1 << 7, 'S'),
    (1 << 6, 'Z'),
    (1 << 4, 'A'),
    (1 << 2, 'P'),
    (1 << 0, 'C'),
];

/// One vCPU's registers; `halted` is its `HLT=` flag.
pub fn dump(regs: &kvm_regs, sregs: &kvm_sregs, halted: bool) -> String {
    let mut out = String::new();
    let gpr = [
        ("RAX", regs.rax),
        ("RBX", regs.rbx),
        ("RCX", regs.rcx),
        ("RDX", regs.rdx),
        ("RSI", regs.rsi),
        ("RDI", regs.rdi),
        ("RBP", regs.rbp),
        ("RSP", regs.rsp),
        ("R8 ", regs.r8),
        ("R9 ", regs.r9),
        ("R10", regs.r10),
        ("R11", regs.r11),
        ("R12", regs.r12),
        ("R13", regs.r13),
        ("R14", regs.r14),
        ("R15", regs.r15),
    ];
    for row in gpr.chunks(4) {
        let line: Vec<String> = row.iter().map(|(n, v)| format!("{n}={v:016x}")).collect();
        let _ = writeln!(out, "{}", line.join(" "));
    }
    let flags: String = FLAG_CHARS
        .iter()
        .map(|&(bit, c)| if regs.rflags & bit != 0 { c } else { '-' })
        .collect();
    let smm = 0;
    let _ = writeln!(
        out,
        "RIP={:016x} RFL={:08x} [{flags}] CPL={} II=0 A20=1 SMM={smm} HLT={}",
        regs.rip,
        regs.rflags,
        sregs.cs.selector & 3,
        u8::from(halted)
    );
    for (name, seg) in [
        ("ES ", &sregs.es),
        ("CS ", &sregs.cs),
        ("SS ", &sregs.ss),
        ("DS ", &sregs.ds),
        ("FS ", &sregs.fs),
        ("GS ", &sregs.gs),
        ("LDT", &sregs.ldt),
        ("TR ", &sregs.tr),
    ] {
        let _ = writeln!(out, "{}", segment(name, seg));
    }
    for (name, t) in [("GDT", &sregs.gdt), ("IDT", &sregs.idt)] {
        let _ = writeln!(out, "{}", table(name, t));
    }
    let _ = writeln!(
        out,
        "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}",
        sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4
    );
    let _ = writeln!(out, "EFER={:016x}", sregs.efer);
    out
}

/// `NAME=selector base limit flags DPL=n`, flags in QEMU's descriptor-word layout.
fn segment(name: &str, s: &kvm_segment) -> String {
    let flags: u32 = (u32::from(s.type_) << 8)
        | (u32::from(s.s) << 12)
        | (u32::from(s.dpl) << 13)
        | (u32::from(s.present) << 15)
        | (u32::from(s.avl) << 20)
        | (u32::from(s.l) << 21)
        | (u32::from(s.db) << 22)
        | (u32::from(s.g) << 23);
    format!(
        "{name}={:04x} {:016x} {:08x} {flags:08x} DPL={}",
        s.selector, s.base, s.limit, s.dpl
    )
}

fn table(name: &str, t: &kvm_dtable) -> String {
    format!("{name}=     {:016x} {:08x}", t.base, t.limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_out_registers_as_qemu_does() {
        let regs = kvm_regs {
            rax: 0x1234,
            r8: 8,
            rip: 0x10_0000,
            rflags: 0x46,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x8;
        sregs.cs.l = 1;
        sregs.cs.present = 1;
        sregs.cr0 = 0x8000_0011;
        let text = dump(&regs, &sregs, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "RAX=0000000000001234 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000"
        );
        assert!(
            lines[2].starts_with("R8 =0000000000000008 R9 ="),
            "{}",
            lines[2]
        );
        assert_eq!(
            lines[4],
            "RIP=0000000000100000 RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1"
        );
        assert_eq!(
            lines[6],
            "CS =0008 0000000000000000 00000000 00208000 DPL=0"
        );
        assert!(text.contains("CR0=80000011 "), "{text}");
        assert!(text.ends_with("EFER=0000000000000000\n"));
    }
}
