/*
 * linux-probe.S - a boot-protocol test guest in real bzImage format.
 *
 * The VMM loads it exactly like a Linux kernel (`-kernel`, `-initrd`, `-append`): a setup
 * header at 0x1f1 ("HdrS", boot protocol 2.12, XLF_KERNEL_64, relocatable, pref_address
 * 16 MiB), followed by the protected-mode payload whose 64-bit entry point (startup_64) is at
 * offset 0x200 of the payload, as in Linux's arch/x86/boot/compressed/head_64.S. Linked by
 * linux-probe.ld; `objcopy -O binary` then gives the bzImage file.
 *
 * On the bootstrap processor it reads boot_params from RSI and prints what it found:
 *
 *   probe: linux-probe 1 at 0xLOAD boot_params 0xADDR
 *   probe: hdr version 0xVER loader 0xTYPE code32_start 0xADDR magic ok|bad
 *   probe: e820 N entries
 *   probe: e820 0xADDR 0xSIZE TYPE              (N lines; TYPE in decimal)
 *   probe: cmdline TEXT                         (empty TEXT if there is none)
 *   probe: initrd 0xADDR 0xSIZE 0xCRC           (or "probe: initrd none")
 *   probe: mptable cpus N ioapic ID 0xADDR checksum ok|bad   (or "probe: mptable none")
 *   probe: acpi rsdp 0xADDR madt cpus N ioapic ID 0xADDR checksum ok|bad
 *                                               (or "probe: acpi none"; from acpi_rsdp_addr)
 *   probe: pci 00:DD.F VVVV:DDDD                (every function on PCI bus 0, then:)
 *   probe: pci 00:DD.F bar I 0xADDR mem32|mem64|io   (each BAR that is set)
 *   probe: pci 00:DD.F cap 0xID at 0xOFF [msix table-size N table bar B +0xOFF pba bar B
 *          +0xOFF | virtio type T bar B +0xOFF len 0xLEN]   (each capability)
 *   probe: heartbeat hz HZ
 *   probe: cpu I apic A started                 (one per AP; "did not start" on timeout)
 *   probe: ready
 *   probe: reset                                (later, only with probe.reset_after=N)
 *
 * Numbers are hex with 0x (minimal digits) unless said otherwise. CRC is the CRC-32C
 * (Castagnoli, the iSCSI/SSE4.2 CRC: init ~0, reflected polynomial 0x82f63b78, final ~) of the
 * whole initrd.
 *
 * Then every vCPU runs the heartbeat loop of guests/heartbeat.S (guests/heartbeat.inc, which
 * both include; the serial output routines are guests/console.inc): a periodic LAPIC timer
 * (vector 0x40, divide by 16, KVM's 1 GHz APIC bus) and the lines
 *   heartbeat: cpu N start
 *   heartbeat: cpu N tick T        (T = 1, 2, 3, ... per vCPU, never skipping or repeating)
 * With more than one processor in the MP table, the BSP starts each AP through its local APIC
 * (INIT, then SIPI with vector 0x06, once more if the AP did not answer) into a real-mode
 * trampoline at 0x6000 that switches to long mode and joins the heartbeat.
 *
 * Command-line options: probe.hz=N (ticks per second, 1..5000, default 10),
 * probe.exit_after=N and probe.exit_code=N (vCPU 0 writes the code to the debug exit port 0x501
 * after it printed tick N; 0 = run forever), probe.reset_after=N (after tick N, vCPU 0 prints
 * "probe: reset" and resets the machine the way Linux's `reboot` does by default: it waits for
 * the i8042's input buffer to drain and writes 0xfe, pulse reset, to port 0x64).
 *
 * Memory the probe owns outside its image (all below 1 MiB, none of it used by the VMM's boot
 * structures: GDT 0x500, boot_params 0x7000, page tables 0x9000..0xefff, command line 0x20000,
 * MP table 0x9fc00, ACPI tables 0xe0000):
 *   0x2000..0x2fff  IDT (256 gates), shared by all vCPUs
 *   0x4000..0x40ff  globals (print lock, AP start-up count, timer count, APIC ids, ...)
 *   0x5000 + 64*i   per-vCPU area of vCPU i (i < 16): +0 u64 ticks taken, +8 u64 last tick
 *                   printed (the same layout as the built-in heartbeat's areas at 0x7100)
 *   0x6000..0x60ff  AP trampoline (GDT, code, start-up data); the SIPI vector is 0x06
 * The probe zeroes its globals and per-vCPU areas at start (RAM survives a VM reset). Its
 * stacks (4 KiB per vCPU) and CRC tables are in its .bss, covered by init_size.
 *
 * All state lives in RAM or registers, so a save/restore of RAM plus vCPU state (live update,
 * migration) continues the tick numbering exactly.
 *
 * Register conventions after start-up (never changed again; the interrupt handlers rely on
 * r14 and r15):
 *   r12 = vCPU index (0 = BSP, APs numbered in MP table order)
 *   r13 = boot_params (BSP, during the probe only)
 *   r14 = this vCPU's per-vCPU area
 *   r15 = LAPIC MMIO base
 */

    .set PROBE_VERSION,     1
    .set SETUP_SECTS,       1           /* setup = boot sector + 1 sector = 1 KiB */

    .set SERIAL_PORT,       0x3f8       /* COM1 THR; always ready here, no LSR polling */
    .set I8042_COMMAND,     0x64
    .set I8042_INPUT_FULL,  0x02        /* status bit 1 */
    .set I8042_PULSE_RESET, 0xfe
    .set DEBUG_EXIT_PORT,   0x501
    .set FAULT_EXIT_CODE,   0xfe

    .set IDT_BASE,          0x2000
    .set IDT_ENTRIES,       256
    .set GLOBALS,           0x4000
    .set G_PRINT_LOCK,      0x00        /* u32 */
    .set G_STARTED,         0x04        /* u32 APs that reached long mode */
    .set G_TIMER_COUNT,     0x08        /* u32 LAPIC timer initial count */
    .set G_CPUS,            0x0c        /* u32 processors to run (BSP + APs) */
    .set G_EXIT_AFTER,      0x10        /* u64 */
    .set G_EXIT_CODE,       0x18        /* u32 */
    .set G_CMDLINE,         0x20        /* u64 command line address, 0 if none */
    .set G_RESET_AFTER,     0x28        /* u64 */
    .set G_PCI_BDF,         0x30        /* u32 PCI function being listed (pci.inc S_BDF) */
    .set G_APIC_IDS,        0x40        /* u8[MAX_CPUS] APIC id of vCPU i */
    .set GLOBALS_SIZE,      0x100
    .set PERCPU_BASE,       0x5000
    .set PERCPU_SHIFT,      6
    .set PC_TICKS,          0x00
    .set PC_PRINTED,        0x08
    .set MAX_CPUS,          16
    .set TRAMPOLINE,        0x6000
    .set SIPI_VECTOR,       TRAMPOLINE >> 12
    .set STACK_SIZE,        4096

    .set KERNEL_CS32,       0x08        /* probe GDT: 32-bit code */
    .set KERNEL_DS,         0x10        /* flat data */
    .set KERNEL_CS,         0x18        /* 64-bit code */

    .set LAPIC_BASE,        0xfee00000
    .set APIC_ID,           0x020
    .set APIC_EOI,          0x0b0
    .set APIC_SVR,          0x0f0
    .set APIC_ICR_LOW,      0x300
    .set APIC_ICR_HIGH,     0x310
    .set APIC_LVT_TIMER,    0x320
    .set APIC_TIMER_INIT,   0x380
    .set APIC_TIMER_DIV,    0x3e0
    .set APIC_SVR_ENABLE,   0x100
    .set APIC_LVT_PERIODIC, 0x20000
    .set APIC_DIV_16,       0x3
    .set ICR_INIT,          0x4500      /* INIT, level assert */
    .set ICR_STARTUP,       0x4600      /* start-up IPI, | vector */
    .set ICR_BUSY,          0x1000      /* delivery status */
    .set LAPIC_HZ_DIV16,    62500000    /* 1 GHz bus / 16 */
    .set DEFAULT_HZ,        10
    .set MAX_HZ,            5000
    .set TIMER_VECTOR,      0x40
    .set SPURIOUS_VECTOR,   0xff

    /* boot_params offsets */
    .set BP_ACPI_RSDP_ADDR,    0x070
    .set BP_EXT_RAMDISK_IMAGE, 0x0c0
    .set BP_EXT_RAMDISK_SIZE,  0x0c4
    .set BP_EXT_CMD_LINE_PTR,  0x0c8
    .set BP_E820_ENTRIES,      0x1e8
    .set BP_BOOT_FLAG,         0x1fe
    .set BP_HEADER,            0x202
    .set BP_VERSION,           0x206
    .set BP_TYPE_OF_LOADER,    0x210
    .set BP_CODE32_START,      0x214
    .set BP_RAMDISK_IMAGE,     0x218
    .set BP_RAMDISK_SIZE,      0x21c
    .set BP_CMD_LINE_PTR,      0x228
    .set BP_E820_TABLE,        0x2d0
    .set E820_ENTRY_SIZE,      20
    .set MAX_CMDLINE,          4096

    .include "console.inc"              /* print lock, puts, put_dec, put_hex_digits */
    .include "heartbeat.inc"            /* the heartbeat, shared with heartbeat.S */
    .set S_BDF,             GLOBALS + G_PCI_BDF
    .include "pci.inc"                  /* PCI bus 0 enumeration, shared with the driver guests */

/* ------------------------------------------------------------------------------------------
 * Real-mode setup: boot sector and the setup header. A 16-bit bootloader that runs the setup
 * code gets a message and a halted CPU: only the 64-bit boot protocol is supported.
 * ------------------------------------------------------------------------------------------ */
    .section .setup, "ax"
    .code16
setup_start:
    cli                                 /* booted as a boot sector: nothing to do */
1:  hlt
    jmp     1b

    .org    0x1f1
    .byte   SETUP_SECTS                 /* setup_sects */
    .word   0                           /* root_flags */
    .long   _probe_syssize              /* syssize: payload in 16-byte units (linker) */
    .word   0                           /* ram_size */
    .word   0xffff                      /* vid_mode: normal */
    .word   0                           /* root_dev */
    .word   0xaa55                      /* boot_flag */
    .byte   0xeb, setup_entry - 1f      /* jump: short jmp to the real-mode entry */
1:  .ascii  "HdrS"                      /* header */
    .word   0x020c                      /* version: boot protocol 2.12 */
    .long   0                           /* realmode_swtch */
    .word   0x1000                      /* start_sys_seg */
    .word   version_string - setup_start - 0x200  /* kernel_version */
    .byte   0                           /* type_of_loader: filled by the loader */
    .byte   0x01                        /* loadflags: LOADED_HIGH */
    .word   0x8000                      /* setup_move_size */
    .long   0x100000                    /* code32_start */
    .long   0                           /* ramdisk_image */
    .long   0                           /* ramdisk_size */
    .long   0                           /* bootsect_kludge */
    .word   0                           /* heap_end_ptr */
    .byte   0                           /* ext_loader_ver */
    .byte   0                           /* ext_loader_type */
    .long   0                           /* cmd_line_ptr */
    .long   0x7fffffff                  /* initrd_addr_max */
    .long   0x200000                    /* kernel_alignment: 2 MiB */
    .byte   1                           /* relocatable_kernel */
    .byte   21                          /* min_alignment: 2^21 */
    .word   0x0001                      /* xloadflags: XLF_KERNEL_64 */
    .long   2047                        /* cmdline_size (without the NUL) */
    .long   0                           /* hardware_subarch */
    .quad   0                           /* hardware_subarch_data */
    .long   0                           /* payload_offset: no compressed payload */
    .long   0                           /* payload_length */
    .quad   0                           /* setup_data */
    .quad   0x1000000                   /* pref_address: 16 MiB */
    .long   _probe_init_size            /* init_size: payload + bss (linker) */
    .long   0                           /* handover_offset: no EFI handover */

/* The real-mode entry (CS:0 is setup_start + 0x200): say why nothing happens. */
setup_entry:
    cli
    push    %cs
    pop     %ds
    mov     $(msg16 - setup_start - 0x200), %si
    mov     $SERIAL_PORT, %dx
1:  lodsb
    test    %al, %al
    jz      2f
    out     %al, %dx
    jmp     1b
2:  hlt
    jmp     2b
msg16:
    .asciz  "probe: only the 64-bit boot protocol is supported\n"

version_string:
    .asciz  "cpr-vmm linux-probe 1"

/* ------------------------------------------------------------------------------------------
 * Protected-mode payload. Position independent (RIP-relative) except for the trampoline,
 * which is copied to TRAMPOLINE and addresses itself absolutely.
 * ------------------------------------------------------------------------------------------ */
    .text
    .code32
    .globl  startup_32
startup_32:
    cli
    call    1f                          /* find out where we run */
1:  pop     %esi
    add     $(msg32 - 1b), %esi
    mov     $SERIAL_PORT, %dx
2:  lodsb
    test    %al, %al
    jz      3f
    out     %al, %dx
    jmp     2b
3:  hlt
    jmp     3b
msg32:
    .asciz  "probe: the 32-bit entry point is not supported\n"

    .org    0x200
    .code64
    .globl  startup_64
startup_64:
    cli
    cld
    mov     %rsi, %r13                  /* r13 = boot_params */
    lea     stacks + STACK_SIZE(%rip), %rsp
    xor     %r12d, %r12d                /* the BSP is vCPU 0 */
    mov     $PERCPU_BASE, %r14d
    mov     $LAPIC_BASE, %r15d

    /* Zero the globals and per-vCPU areas (RAM is not cleared by a VM reset). */
    xor     %eax, %eax
    mov     $GLOBALS, %edi
    mov     $GLOBALS_SIZE, %ecx
    rep stosb
    mov     $PERCPU_BASE, %edi
    mov     $(MAX_CPUS << PERCPU_SHIFT), %ecx
    rep stosb

    call    install_trampoline
    call    load_gdt
    call    build_idt
    call    load_idt

    /* "probe: linux-probe 1 at 0xLOAD boot_params 0xADDR" */
    lea     msg_hello(%rip), %rsi
    call    puts
    lea     startup_32(%rip), %rax
    call    put_hex
    lea     msg_boot_params(%rip), %rsi
    call    puts
    mov     %r13, %rax
    call    put_hex
    call    newline

    call    probe_header
    call    probe_e820
    call    probe_cmdline
    call    probe_initrd
    call    probe_mptable
    call    probe_acpi
    call    probe_pci
    call    read_options

    /* The BSP's own heartbeat, then the APs. */
    call    start_heartbeat
    mov     $1, %ebx
1:  cmp     GLOBALS + G_CPUS, %ebx
    jae     2f
    call    start_ap
    inc     %ebx
    jmp     1b
2:  call    print_lock
    lea     msg_ready(%rip), %rsi
    call    puts
    call    print_unlock
    jmp     main_loop

/*
 * probe_header - the setup header copy in boot_params.
 *   clobbers: rax, rcx, rdx, rsi, r8
 */
probe_header:
    lea     msg_hdr(%rip), %rsi
    call    puts
    movzwl  BP_VERSION(%r13), %eax
    call    put_hex
    lea     msg_loader(%rip), %rsi
    call    puts
    movzbl  BP_TYPE_OF_LOADER(%r13), %eax
    call    put_hex
    lea     msg_code32(%rip), %rsi
    call    puts
    mov     BP_CODE32_START(%r13), %eax
    call    put_hex
    lea     msg_magic_ok(%rip), %rsi
    cmpl    $0x53726448, BP_HEADER(%r13)    /* "HdrS" */
    jne     1f
    cmpw    $0xaa55, BP_BOOT_FLAG(%r13)
    je      2f
1:  lea     msg_magic_bad(%rip), %rsi
2:  jmp     puts                        /* tail call; the message ends the line */

/*
 * probe_e820 - the e820 map.
 *   clobbers: rax, rbx, rcx, rdx, rsi, rbp, r8
 */
probe_e820:
    lea     msg_e820(%rip), %rsi
    call    puts
    movzbl  BP_E820_ENTRIES(%r13), %ebx
    mov     %rbx, %rax
    call    put_dec
    lea     msg_entries(%rip), %rsi
    call    puts
    lea     BP_E820_TABLE(%r13), %rbp
1:  test    %ebx, %ebx
    jz      2f
    lea     msg_e820(%rip), %rsi
    call    puts
    mov     0(%rbp), %rax               /* addr */
    call    put_hex
    call    space
    mov     8(%rbp), %rax               /* size */
    call    put_hex
    call    space
    mov     16(%rbp), %eax              /* type */
    call    put_dec
    call    newline
    add     $E820_ENTRY_SIZE, %rbp
    dec     %ebx
    jmp     1b
2:  ret

/*
 * probe_cmdline - print the command line and remember where it is.
 *   clobbers: rax, rcx, rdx, rsi
 */
probe_cmdline:
    lea     msg_cmdline(%rip), %rsi
    call    puts
    mov     BP_CMD_LINE_PTR(%r13), %esi
    mov     BP_EXT_CMD_LINE_PTR(%r13), %eax
    shl     $32, %rax
    or      %rax, %rsi
    mov     %rsi, GLOBALS + G_CMDLINE
    test    %rsi, %rsi
    jz      2f
    mov     $MAX_CMDLINE, %ecx
    mov     $SERIAL_PORT, %edx
1:  lodsb
    test    %al, %al
    jz      2f
    out     %al, %dx
    dec     %ecx
    jnz     1b
2:  jmp     newline

/*
 * probe_initrd - address, size and CRC-32C of the initrd.
 *   clobbers: rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9
 */
probe_initrd:
    mov     BP_RAMDISK_IMAGE(%r13), %ebx
    mov     BP_EXT_RAMDISK_IMAGE(%r13), %eax
    shl     $32, %rax
    or      %rax, %rbx                  /* rbx = address */
    mov     BP_RAMDISK_SIZE(%r13), %ebp
    mov     BP_EXT_RAMDISK_SIZE(%r13), %eax
    shl     $32, %rax
    or      %rax, %rbp                  /* rbp = size */
    lea     msg_initrd(%rip), %rsi
    call    puts
    test    %rbp, %rbp
    jnz     1f
    lea     msg_none(%rip), %rsi
    jmp     puts
1:  mov     %rbx, %rax
    call    put_hex
    call    space
    mov     %rbp, %rax
    call    put_hex
    call    space
    mov     %rbx, %rsi
    mov     %rbp, %rcx
    call    crc32c
    call    put_hex
    jmp     newline

/*
 * crc32c - CRC-32C of a buffer, slice-by-8 (eight table lookups per 8-byte load).
 *
 * Only instructions KVM's x86 emulator knows are used here and everywhere in the probe: on
 * hosts that emulate guest kernel mode (this project's nested, software-assisted KVM), an
 * instruction it does not know (SSE4.2's crc32, mfence, ...) stops the vCPU with an emulation
 * error. Guest kernel code runs at about a million instructions per second there, so the
 * checksum costs a few seconds per MiB of initrd.
 *   in:  rsi = address, rcx = length
 *   out: rax = CRC (zero-extended)
 *   clobbers: rcx, rdx, rsi, rdi, r8, r9, r10
 */
crc32c:
    mov     %rcx, %r8                   /* r8 = bytes left */
    lea     crc_tables(%rip), %r9       /* T0..T7, 256 u32 each */
    xor     %ecx, %ecx                  /* T0[i] = CRC of byte i */
1:  mov     %ecx, %eax
    mov     $8, %edx
2:  shr     $1, %eax
    jnc     3f
    xor     $0x82f63b78, %eax           /* reflected Castagnoli polynomial */
3:  dec     %edx
    jnz     2b
    mov     %eax, (%r9,%rcx,4)
    inc     %ecx
    cmp     $256, %ecx
    jb      1b
    mov     $256, %ecx                  /* Tk[i] = Tk-1[i] >> 8 ^ T0[Tk-1[i] & 0xff] */
4:  mov     -1024(%r9,%rcx,4), %eax
    movzbl  %al, %edx
    shr     $8, %eax
    xor     (%r9,%rdx,4), %eax
    mov     %eax, (%r9,%rcx,4)
    inc     %ecx
    cmp     $(8 * 256), %ecx
    jb      4b

    mov     $0xffffffff, %eax
5:  cmp     $8, %r8
    jb      6f
    mov     (%rsi), %rdx
    xor     %rax, %rdx                  /* the CRC so far goes into the low 4 bytes */
    movzbl  %dl, %ecx
    mov     7 * 1024(%r9,%rcx,4), %eax
    .irp    k, 6, 5, 4, 3, 2, 1
    shr     $8, %rdx
    movzbl  %dl, %ecx
    xor     \k * 1024(%r9,%rcx,4), %eax
    .endr
    shr     $8, %rdx
    xor     (%r9,%rdx,4), %eax
    add     $8, %rsi
    sub     $8, %r8
    jmp     5b
6:  test    %r8, %r8                    /* the last 0..7 bytes, one at a time */
    jz      7f
    movzbl  (%rsi), %edx
    xor     %al, %dl
    shr     $8, %eax
    xor     (%r9,%rdx,4), %eax
    inc     %rsi
    dec     %r8
    jmp     6b
7:  not     %eax                        /* also zero-extends into rax */
    ret

/*
 * probe_mptable - find the MP floating pointer in the last KiB below 640 KiB, check both
 * checksums, and collect the enabled processors' APIC ids (BSP first) into G_APIC_IDS.
 *   clobbers: rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11
 */
probe_mptable:
    mov     APIC_ID(%r15), %eax
    shr     $24, %eax
    mov     %al, GLOBALS + G_APIC_IDS   /* vCPU 0 is this CPU */
    movl    $1, GLOBALS + G_CPUS
    mov     $0x9fc00, %esi
1:  cmpl    $0x5f504d5f, (%rsi)         /* "_MP_" */
    je      2f
    add     $16, %esi
    cmp     $0xa0000, %esi
    jb      1b
    lea     msg_mptable_none(%rip), %rsi
    jmp     puts
2:  mov     %rsi, %rbx                  /* rbx = floating pointer */
    xor     %r10d, %r10d                /* r10 = IOAPIC id */
    xor     %r9d, %r9d                  /* r9 = IOAPIC address */
    xor     %edi, %edi                  /* edi = enabled processors */
    mov     $1, %r8d                    /* r8 = next AP slot */
    mov     $16, %ecx
    call    byte_sum
    mov     %eax, %r11d                 /* r11b = sum of everything checked */
    mov     4(%rbx), %ebp               /* rbp = configuration table */
    cmpl    $0x504d4350, (%rbp)         /* "PCMP" */
    je      3f
    inc     %r11d                       /* a missing table counts as a bad checksum */
    jmp     8f
3:  mov     %rbp, %rsi
    movzwl  4(%rbp), %ecx
    call    byte_sum
    add     %eax, %r11d
    movzwl  34(%rbp), %ecx              /* entry count */
    lea     44(%rbp), %rsi
4:  test    %ecx, %ecx
    jz      8f
    movzbl  (%rsi), %eax
    test    %eax, %eax
    jnz     6f
    /* processor: +1 APIC id, +3 flags (bit 0 enabled, bit 1 BSP) */
    testb   $1, 3(%rsi)
    jz      5f
    inc     %edi
    testb   $2, 3(%rsi)
    jnz     5f
    cmp     $MAX_CPUS, %r8d
    jae     5f
    movzbl  1(%rsi), %eax
    mov     %al, GLOBALS + G_APIC_IDS(%r8)
    inc     %r8d
5:  add     $20, %rsi
    dec     %ecx
    jmp     4b
6:  cmp     $2, %eax
    jne     7f
    movzbl  1(%rsi), %r10d              /* I/O APIC: +1 id, +4 address */
    mov     4(%rsi), %r9d
7:  add     $8, %rsi
    dec     %ecx
    jmp     4b
8:  mov     %r8d, GLOBALS + G_CPUS
    lea     msg_mptable(%rip), %rsi
    call    puts
    jmp     put_cpus_ioapic_checksum    /* tail call */

/*
 * probe_acpi - follow boot_params.acpi_rsdp_addr to the RSDP, its XSDT and the MADT; check all
 * checksums and count the enabled local APICs.
 *   clobbers: rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11
 */
probe_acpi:
    mov     BP_ACPI_RSDP_ADDR(%r13), %rbx
    test    %rbx, %rbx
    jz      9f
    movabs  $0x2052545020445352, %rax   /* "RSD PTR " */
    cmp     %rax, (%rbx)
    jne     9f
    mov     %rbx, %rsi                  /* r11b: sum of everything checked */
    mov     $20, %ecx
    call    byte_sum
    mov     %eax, %r11d
    mov     %rbx, %rsi
    mov     20(%rbx), %ecx              /* RSDP length (extended checksum) */
    call    byte_sum
    add     %eax, %r11d
    mov     24(%rbx), %rbp              /* rbp = XSDT */
    mov     %rbp, %rsi
    mov     4(%rbp), %ecx
    call    byte_sum
    add     %eax, %r11d
    xor     %r10d, %r10d                /* r10 = IOAPIC id */
    xor     %r9d, %r9d                  /* r9 = IOAPIC address */
    xor     %edi, %edi                  /* edi = enabled local APICs */
    mov     4(%rbp), %r8d
    sub     $36, %r8d
    shr     $3, %r8d                    /* r8 = XSDT entries */
    lea     36(%rbp), %rbx              /* rbx = next entry */
1:  test    %r8d, %r8d
    jz      8f
    mov     (%rbx), %rdx                /* a table */
    add     $8, %rbx
    dec     %r8d
    cmpl    $0x43495041, (%rdx)         /* "APIC" */
    jne     1b
    mov     %rdx, %rbp                  /* rbp = MADT */
    mov     %rdx, %rsi
    mov     4(%rbp), %ecx
    call    byte_sum
    add     %eax, %r11d
    lea     44(%rbp), %rsi              /* entries */
    mov     4(%rbp), %ecx
    add     %rbp, %rcx                  /* rcx = end of the MADT */
2:  cmp     %rcx, %rsi
    jae     8f
    movzbl  (%rsi), %eax                /* type */
    movzbl  1(%rsi), %edx               /* length */
    test    %edx, %edx
    jz      8f                          /* malformed: stop */
    cmp     $0, %eax
    jne     3f
    testb   $1, 4(%rsi)                 /* local APIC: +4 flags, bit 0 enabled */
    jz      4f
    inc     %edi
    jmp     4f
3:  cmp     $1, %eax
    jne     4f
    movzbl  2(%rsi), %r10d              /* I/O APIC: +2 id, +4 address */
    mov     4(%rsi), %r9d
4:  add     %rdx, %rsi
    jmp     2b
8:  lea     msg_acpi(%rip), %rsi
    call    puts
    mov     BP_ACPI_RSDP_ADDR(%r13), %rax
    call    put_hex
    lea     msg_madt(%rip), %rsi
    call    puts
    jmp     put_cpus_ioapic_checksum    /* tail call */
9:  lea     msg_acpi_none(%rip), %rsi
    jmp     puts

/*
 * put_cpus_ioapic_checksum - the end of the mptable and acpi lines:
 * "N ioapic ID 0xADDR checksum ok|bad\n".
 *   in:  rdi = enabled processors (N), r10 = I/O APIC id, r9 = I/O APIC address,
 *        r11b = sum of all the checksummed bytes (0: ok)
 *   clobbers: rax, rcx, rdx, rsi, r8
 */
put_cpus_ioapic_checksum:
    mov     %rdi, %rax
    call    put_dec
    lea     msg_ioapic(%rip), %rsi
    call    puts
    mov     %r10, %rax
    call    put_dec
    call    space
    mov     %r9, %rax
    call    put_hex
    lea     msg_checksum_ok(%rip), %rsi
    test    %r11b, %r11b
    jz      1f
    lea     msg_checksum_bad(%rip), %rsi
1:  jmp     puts

/*
 * byte_sum - sum of bytes.
 *   in:  rsi = address, ecx = count
 *   out: eax = sum (mod 2^32)
 *   clobbers: rcx, rdx, rsi
 */
byte_sum:
    xor     %eax, %eax
1:  test    %ecx, %ecx
    jz      2f
    movzbl  (%rsi), %edx
    add     %edx, %eax
    inc     %rsi
    dec     %ecx
    jmp     1b
2:  ret

/*
 * read_options - probe.hz, probe.exit_after, probe.exit_code from the command line.
 *   clobbers: rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11
 */
read_options:
    lea     key_hz(%rip), %rdi
    mov     $DEFAULT_HZ, %eax
    call    cmdline_param
    test    %rax, %rax
    jz      1f
    cmp     $MAX_HZ, %rax
    jbe     2f
1:  mov     $DEFAULT_HZ, %eax
2:  mov     %rax, %rcx
    push    %rax
    mov     $LAPIC_HZ_DIV16, %eax
    xor     %edx, %edx
    div     %rcx
    mov     %eax, GLOBALS + G_TIMER_COUNT
    lea     msg_hz(%rip), %rsi
    call    puts
    pop     %rax
    call    put_dec
    call    newline
    lea     key_exit_after(%rip), %rdi
    xor     %eax, %eax
    call    cmdline_param
    mov     %rax, GLOBALS + G_EXIT_AFTER
    lea     key_exit_code(%rip), %rdi
    xor     %eax, %eax
    call    cmdline_param
    mov     %eax, GLOBALS + G_EXIT_CODE
    lea     key_reset_after(%rip), %rdi
    xor     %eax, %eax
    call    cmdline_param
    mov     %rax, GLOBALS + G_RESET_AFTER
    ret

/*
 * cmdline_param - the decimal value of the command-line word that starts with a key.
 *   in:  rdi = key including '=' (NUL-terminated), rax = default
 *   out: rax = value, or the default if the key is absent
 *   clobbers: rdx, rsi, r8, r9, r10, r11
 */
cmdline_param:
    mov     %rax, %r9                   /* r9 = default */
    mov     GLOBALS + G_CMDLINE, %rsi
    test    %rsi, %rsi
    jz      6f
    mov     $1, %r10d                   /* r10 = at the start of a word */
1:  movzbl  (%rsi), %eax
    test    %eax, %eax
    jz      6f
    test    %r10d, %r10d
    jz      3f
    mov     %rsi, %r8                   /* compare the key here */
    mov     %rdi, %r11
2:  movzbl  (%r11), %edx
    test    %edx, %edx
    jz      4f                          /* whole key matched */
    cmp     %dl, (%r8)
    jne     3f
    inc     %r8
    inc     %r11
    jmp     2b
3:  xor     %r10d, %r10d
    cmpb    $' ', (%rsi)
    sete    %r10b
    inc     %rsi
    jmp     1b
4:  xor     %eax, %eax                  /* parse digits at r8 */
5:  movzbl  (%r8), %edx
    sub     $'0', %edx
    cmp     $9, %edx
    ja      7f
    imul    $10, %rax, %rax
    add     %rdx, %rax
    inc     %r8
    jmp     5b
6:  mov     %r9, %rax
7:  ret

/*
 * start_heartbeat - enable this vCPU's LAPIC and start its periodic timer, then print
 * "heartbeat: cpu N start" (HEARTBEAT_START in heartbeat.inc).
 *   clobbers: rax, rcx, rdx, rsi
 */
start_heartbeat:
    HEARTBEAT_START GLOBALS+G_TIMER_COUNT
    ret

/*
 * start_ap - start vCPU ebx (its APIC id is G_APIC_IDS[ebx]) with INIT + SIPI and wait until
 * it has reached long mode (G_STARTED == ebx).
 *   clobbers: rax, rcx, rdx, rsi, rdi, r8, r9
 */
start_ap:
    /* Start-up data for the trampoline: CR3, entry, stack and index of this AP. */
    mov     %cr3, %rax
    mov     %eax, TRAMPOLINE + (t_cr3 - trampoline)
    lea     ap_entry64(%rip), %rax
    mov     %rax, TRAMPOLINE + (t_entry - trampoline)
    lea     stacks(%rip), %rax
    lea     1(%rbx), %ecx
    shl     $12, %rcx                   /* STACK_SIZE */
    add     %rcx, %rax
    mov     %rax, TRAMPOLINE + (t_stack - trampoline)
    mov     %ebx, TRAMPOLINE + (t_cpu - trampoline)

    movzbl  GLOBALS + G_APIC_IDS(%rbx), %edi
    mov     $ICR_INIT, %eax
    call    send_ipi
    mov     $(ICR_STARTUP | SIPI_VECTOR), %eax
    call    send_ipi
    mov     $31, %ecx                   /* wait ~2^31 TSC cycles */
    call    wait_started
    jz      2f
    mov     $(ICR_STARTUP | SIPI_VECTOR), %eax
    call    send_ipi                    /* the specification's second SIPI */
    mov     $34, %ecx
    call    wait_started
    jz      2f
    lea     msg_ap_failed(%rip), %r9
    jmp     3f
2:  lea     msg_ap_started(%rip), %r9
3:  call    print_lock
    lea     msg_cpu(%rip), %rsi
    call    puts
    mov     %rbx, %rax
    call    put_dec
    lea     msg_apic(%rip), %rsi
    call    puts
    mov     %rdi, %rax
    call    put_dec
    mov     %r9, %rsi
    call    puts
    jmp     print_unlock

/*
 * send_ipi - send an IPI through the ICR and wait until the LAPIC accepted it.
 *   in:  edi = destination APIC id, eax = ICR low word
 */
send_ipi:
    mov     %edi, %edx
    shl     $24, %edx
    mov     %edx, APIC_ICR_HIGH(%r15)
    mov     %eax, APIC_ICR_LOW(%r15)    /* writing the low word sends */
1:  testl   $ICR_BUSY, APIC_ICR_LOW(%r15)
    jz      2f
    pause
    jmp     1b
2:  ret

/*
 * wait_started - wait until G_STARTED >= ebx or about 2^cl TSC cycles passed.
 *   in:  ebx = AP index, cl = log2 of the timeout in TSC cycles
 *   out: ZF set if the AP started
 *   clobbers: rax, rdx, r8
 */
wait_started:
    rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
    mov     $1, %r8d
    shl     %cl, %r8
    add     %rdx, %r8                   /* r8 = deadline */
1:  cmp     GLOBALS + G_STARTED, %ebx
    jbe     2f
    pause
    rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
    cmp     %r8, %rdx
    jb      1b
    or      $1, %eax                    /* clear ZF: timed out */
    test    %eax, %eax
    ret
2:  xor     %eax, %eax                  /* set ZF: started */
    ret

/*
 * ap_entry64 - an AP arrives here from the trampoline in long mode (CS 0x18, data 0x10,
 * paging with the BSP's CR3, interrupts off).
 */
ap_entry64:
    mov     TRAMPOLINE + (t_stack - trampoline), %rsp
    mov     TRAMPOLINE + (t_cpu - trampoline), %r12d
    mov     %r12, %r14
    shl     $PERCPU_SHIFT, %r14
    add     $PERCPU_BASE, %r14
    mov     $LAPIC_BASE, %r15d
    call    load_idt
    lock incl GLOBALS + G_STARTED       /* the BSP may reuse the start-up data now */
    call    start_heartbeat
    jmp     main_loop

/*
 * main_loop - print every tick not printed yet; sleep with `sti; hlt` (HEARTBEAT_LOOP in
 * heartbeat.inc). Then vCPU 0 ends or resets the VM after N ticks, if told to.
 */
    HEARTBEAT_LOOP
    mov     GLOBALS + G_EXIT_AFTER, %rax
    HEARTBEAT_EXIT_AT GLOBALS+G_EXIT_CODE, 2f
2:  mov     GLOBALS + G_RESET_AFTER, %rax
    test    %rax, %rax
    jz      main_loop
    cmp     %rax, %rbx
    jb      main_loop
    cli
    call    print_lock
    lea     msg_reset(%rip), %rsi
    call    puts
    call    print_unlock
    mov     $0x10000, %ecx              /* like Linux's kb_wait: bounded */
3:  in      $I8042_COMMAND, %al
    test    $I8042_INPUT_FULL, %al
    jz      4f
    pause
    dec     %ecx
    jnz     3b
4:  mov     $I8042_PULSE_RESET, %al
    out     %al, $I8042_COMMAND
    jmp     halt_forever

/* timer_isr - count the tick, acknowledge it. Changes no register. */
    HEARTBEAT_TIMER_ISR

spurious_isr:
    iretq

/*
 * install_trampoline - copy the trampoline (and the probe's GDT in it) to TRAMPOLINE.
 *   clobbers: rcx, rsi, rdi
 */
install_trampoline:
    lea     trampoline(%rip), %rsi
    mov     $TRAMPOLINE, %edi
    mov     $(trampoline_end - trampoline), %ecx
    rep movsb
    ret

/*
 * load_gdt - switch the BSP to the probe's GDT (the one the APs use) and reload all segments.
 *   clobbers: rax
 */
load_gdt:
    lgdt    TRAMPOLINE + (t_gdt_desc - trampoline)
    mov     $KERNEL_DS, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    pushq   $KERNEL_CS
    lea     1f(%rip), %rax
    pushq   %rax
    lretq
1:  ret

/* load_idt - load the shared IDT. */
load_idt:
    lidt    TRAMPOLINE + (t_idt_desc - trampoline)
    ret

/*
 * build_idt - fill the IDT at IDT_BASE: vector v goes to vector_stubs + 16*v (report and end
 * the VM), except the timer and spurious vectors.
 *   clobbers: rax, rcx, rdx, rsi, rdi, r8, r9, r10
 */
build_idt:
    xor     %ecx, %ecx
    mov     $IDT_BASE, %edi
    lea     vector_stubs(%rip), %rsi
    lea     timer_isr(%rip), %r8
    lea     spurious_isr(%rip), %r9
1:  mov     %rsi, %rax
    cmp     $TIMER_VECTOR, %ecx
    cmove   %r8, %rax
    cmp     $SPURIOUS_VECTOR, %ecx
    cmove   %r9, %rax
    /* 64-bit interrupt gate: offset[15:0], selector, type 0x8e, offset[31:16], offset[63:32] */
    mov     %rax, %rdx
    and     $0xffff, %eax
    mov     %rdx, %r10
    shr     $16, %r10
    and     $0xffff, %r10d
    shl     $48, %r10
    or      %r10, %rax
    movabs  $((0x8e << 40) | (KERNEL_CS << 16)), %r10
    or      %r10, %rax
    mov     %rax, (%rdi)
    shr     $32, %rdx
    mov     %rdx, 8(%rdi)
    add     $16, %rsi
    add     $16, %rdi
    inc     %ecx
    cmp     $IDT_ENTRIES, %ecx
    jb      1b
    ret

/*
 * probe_pci - list every function on PCI bus 0 (pci.inc's scan) with its BARs and capabilities:
 * what Linux's PCI core and virtio-pci driver would read (BARs as assigned, not sized).
 *   clobbers: rax, rbx, rcx, rdx, rsi, rdi, rbp, r8..r11
 */
probe_pci:
    xor     %ebp, %ebp
    lea     pci_describe(%rip), %rsi
    jmp     pci_scan                    /* the callback takes no function: all are listed */

/* pci_describe - pci_scan's callback: the BAR and capability lines of S_BDF. out: CF set */
pci_describe:
    xor     %ebx, %ebx                  /* ebx = BAR index */
1:  lea     0x10(,%rbx,4), %eax
    call    pci_read32
    mov     %eax, %r9d                  /* r9 = the BAR register */
    test    $~0xf, %eax
    jz      5f                          /* not set */
    call    pci_line_start
    lea     msg_pci_bar(%rip), %rsi
    call    puts
    mov     %ebx, %eax
    call    put_dec
    call    space
    lea     msg_pci_io(%rip), %rdi
    mov     %r9d, %eax
    and     $~3, %eax
    test    $1, %r9b
    jnz     3f                          /* I/O BAR */
    mov     %ebx, %eax
    call    bar_address                 /* 64-bit BARs: both halves */
    lea     msg_pci_mem32(%rip), %rdi
    mov     %r9d, %ecx
    and     $6, %ecx
    cmp     $4, %ecx
    jne     3f
    lea     msg_pci_mem64(%rip), %rdi
    inc     %ebx                        /* the upper half is not a BAR of its own */
3:  call    put_hex
    mov     %rdi, %rsi
    call    puts
    call    newline
5:  inc     %ebx
    cmp     $6, %ebx
    jb      1b

    mov     $PCI_STATUS, %eax           /* capabilities */
    call    pci_read16
    test    $PCI_STATUS_CAPS, %al
    jz      9f
    mov     $PCI_CAP_PTR, %eax
    call    pci_read8
    mov     %eax, %ebx                  /* ebx = capability offset */
    mov     $48, %r10d                  /* at most 48: no endless loop */
6:  and     $0xfc, %ebx
    cmp     $0x40, %ebx
    jb      9f
    dec     %r10d
    jz      9f
    mov     %ebx, %eax
    call    pci_read32
    mov     %eax, %r9d                  /* r9 = id, next, control / len, cfg_type */
    call    pci_line_start
    movzbl  %r9b, %eax
    lea     msg_pci_cap(%rip), %rsi
    call    puts_hex
    mov     %ebx, %eax
    lea     msg_pci_at(%rip), %rsi
    call    puts_hex
    cmp     $CAP_MSIX, %r9b
    je      7f
    cmp     $CAP_VENDOR, %r9b
    je      8f
    jmp     2f
7:  mov     %r9d, %eax                  /* MSI-X: table size, table and PBA */
    shr     $16, %eax
    and     $0x7ff, %eax
    inc     %eax
    lea     msg_pci_msix(%rip), %rsi
    call    puts_dec
    lea     msg_pci_table(%rip), %rsi
    lea     4(%rbx), %eax
    call    put_bir_offset
    lea     msg_pci_pba(%rip), %rsi
    lea     8(%rbx), %eax
    call    put_bir_offset
    jmp     2f
8:  lea     4(%rbx), %eax               /* a virtio structure: type, bar, offset, length */
    call    pci_read8
    mov     %eax, %r11d                 /* r11 = bar */
    mov     %r9d, %eax
    shr     $24, %eax
    lea     msg_pci_virtio(%rip), %rsi
    call    puts_dec
    mov     %r11d, %eax
    lea     msg_pci_bar(%rip), %rsi
    call    puts_dec
    lea     8(%rbx), %eax
    lea     msg_pci_plus(%rip), %rsi
    call    puts_cfg32
    lea     12(%rbx), %eax
    lea     msg_pci_len(%rip), %rsi
    call    puts_cfg32
2:  call    newline
    mov     %r9d, %ebx
    shr     $8, %ebx                    /* next */
    jmp     6b
9:  stc
    ret

/* pci_line_start - "probe: pci 00:DD.F". clobbers: rax, rcx, rdx, rsi, r8 */
pci_line_start:
    lea     msg_pci(%rip), %rsi
    call    puts
    jmp     put_devfn

/* put_bir_offset - rsi, then " bar B +0xOFF" of the table/PBA register at config offset eax. */
put_bir_offset:
    push    %rsi
    call    pci_read32
    mov     %eax, %r11d
    pop     %rsi
    call    puts
    mov     %r11d, %eax
    and     $7, %eax
    lea     msg_pci_bar(%rip), %rsi
    call    puts_dec
    mov     %r11d, %eax
    and     $~7, %eax
    lea     msg_pci_plus(%rip), %rsi
    jmp     puts_hex

/* puts_cfg32 - the string at rsi, then the configuration dword at offset eax in hex. */
puts_cfg32:
    call    pci_read32

/* puts_hex, puts_dec - the string at rsi, then rax (put_hex / put_dec). clobbers: theirs */
puts_hex:
    push    %rax
    call    puts
    pop     %rax
    jmp     put_hex
puts_dec:
    push    %rax
    call    puts
    pop     %rax
    jmp     put_dec

    PCI_ROUTINES "probe: "

/* print_lock, print_unlock, puts, put_dec, put_hex_digits (see console.inc). */
    CONSOLE_ROUTINES GLOBALS+G_PRINT_LOCK

newline:
    mov     $'\n', %al
    jmp     putc
space:
    mov     $' ', %al
putc:
    push    %rdx
    mov     $SERIAL_PORT, %edx
    out     %al, %dx
    pop     %rdx
    ret

/*
 * put_hex - "0x" and the hex digits without leading zeros.  in: rax.  clobbers: rax, rcx,
 * rdx, r8
 */
put_hex:
    mov     %rax, %r8
    mov     $SERIAL_PORT, %edx
    mov     $'0', %al
    out     %al, %dx
    mov     $'x', %al
    out     %al, %dx
    mov     $60, %ecx
1:  test    %ecx, %ecx                  /* skip leading zero digits, keep the last */
    jz      2f
    mov     %r8, %rax
    shr     %cl, %rax
    test    $0xf, %al
    jnz     2f
    sub     $4, %ecx
    jmp     1b
2:  jmp     put_hex_digits              /* tail call */

/*
 * fault_common - report an unexpected exception or interrupt and end the VM with
 * FAULT_EXIT_CODE. Frame: [rsp] vector, [rsp+8] error code, [rsp+16] rip. Takes no lock (this
 * vCPU may hold it).
 */
fault_common:
    lea     msg_fault_cpu(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    put_dec
    lea     msg_fault_vector(%rip), %rsi
    call    puts
    mov     (%rsp), %rax
    call    put_dec
    lea     msg_fault_error(%rip), %rsi
    call    puts
    mov     8(%rsp), %rax
    call    put_hex
    lea     msg_fault_rip(%rip), %rsi
    call    puts
    mov     16(%rsp), %rax
    call    put_hex
    call    newline
    mov     $FAULT_EXIT_CODE, %al
    mov     $DEBUG_EXIT_PORT, %dx
    out     %al, %dx
halt_forever:
    cli
    hlt
    jmp     halt_forever

/* One 16-byte stub per vector; vectors 8, 10-14, 17, 21, 29, 30 push their own error code. */
    .balign 16
vector_stubs:
    .set    vec, 0
    .rept   IDT_ENTRIES
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq   $0
    .endif
    pushq   $vec
    jmp     fault_common
    .set    vec, vec + 1
    .endr

/* ------------------------------------------------------------------------------------------
 * The AP trampoline, copied to TRAMPOLINE (page aligned: the SIPI vector is its page number).
 * An AP starts here in real mode with CS = TRAMPOLINE >> 4, IP = 0; it loads the GDT below,
 * enters protected mode, enables PAE, loads the BSP's CR3, sets EFER.LME, enables paging and
 * far-jumps to 64-bit code, which jumps to t_entry.
 * ------------------------------------------------------------------------------------------ */
    .balign 16
trampoline:
    .code16
    cli
    xor     %ax, %ax
    mov     %ax, %ds
    lgdtl   TRAMPOLINE + (t_gdt_desc - trampoline)
    mov     %cr0, %eax
    or      $1, %eax                    /* PE */
    mov     %eax, %cr0
    ljmpl   $KERNEL_CS32, $(TRAMPOLINE + (t_protected - trampoline))

    .code32
t_protected:
    mov     $KERNEL_DS, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    mov     %cr4, %eax
    or      $0x620, %eax                /* PAE, OSFXSR, OSXMMEXCPT */
    mov     %eax, %cr4
    mov     TRAMPOLINE + (t_cr3 - trampoline), %eax
    mov     %eax, %cr3
    mov     $0xc0000080, %ecx           /* EFER */
    rdmsr
    or      $0x100, %eax                /* LME */
    wrmsr
    mov     %cr0, %eax
    or      $0x80010022, %eax           /* PG, WP, NE, MP */
    mov     %eax, %cr0
    ljmp    $KERNEL_CS, $(TRAMPOLINE + (t_long - trampoline))

    .code64
t_long:
    mov     TRAMPOLINE + (t_entry - trampoline), %rax
    jmp     *%rax

    .balign 8
t_gdt:
    .quad   0
    .quad   0x00cf9a000000ffff          /* 0x08: 32-bit code, flat */
    .quad   0x00cf92000000ffff          /* 0x10: data, flat */
    .quad   0x00af9a000000ffff          /* 0x18: 64-bit code */
t_gdt_desc:
    .word   4 * 8 - 1
    .quad   TRAMPOLINE + (t_gdt - trampoline)
t_idt_desc:
    .word   IDT_ENTRIES * 16 - 1
    .quad   IDT_BASE
    .balign 8
t_entry:
    .quad   0                           /* 64-bit entry of the AP (written by the BSP) */
t_stack:
    .quad   0                           /* its stack top */
t_cr3:
    .long   0                           /* the BSP's CR3 */
t_cpu:
    .long   0                           /* its vCPU index */
trampoline_end:

/* Read-only data (kept in .text: the payload is one blob). */
msg_hello:          .asciz  "probe: linux-probe 1 at "
msg_boot_params:    .asciz  " boot_params "
msg_hdr:            .asciz  "probe: hdr version "
msg_loader:         .asciz  " loader "
msg_code32:         .asciz  " code32_start "
msg_magic_ok:       .asciz  " magic ok\n"
msg_magic_bad:      .asciz  " magic bad\n"
msg_e820:           .asciz  "probe: e820 "
msg_entries:        .asciz  " entries\n"
msg_cmdline:        .asciz  "probe: cmdline "
msg_initrd:         .asciz  "probe: initrd "
msg_none:           .asciz  "none\n"
msg_mptable:        .asciz  "probe: mptable cpus "
msg_mptable_none:   .asciz  "probe: mptable none\n"
msg_acpi:           .asciz  "probe: acpi rsdp "
msg_madt:           .asciz  " madt cpus "
msg_acpi_none:      .asciz  "probe: acpi none\n"
msg_ioapic:         .asciz  " ioapic "
msg_checksum_ok:    .asciz  " checksum ok\n"
msg_checksum_bad:   .asciz  " checksum bad\n"
msg_hz:             .asciz  "probe: heartbeat hz "
msg_cpu:            .asciz  "probe: cpu "
msg_apic:           .asciz  " apic "
msg_ap_started:     .asciz  " started\n"
msg_ap_failed:      .asciz  " did not start\n"
msg_ready:          .asciz  "probe: ready\n"
msg_pci_bar:        .asciz  " bar "
msg_pci_io:         .asciz  " io"
msg_pci_mem32:      .asciz  " mem32"
msg_pci_mem64:      .asciz  " mem64"
msg_pci_cap:        .asciz  " cap "
msg_pci_at:         .asciz  " at "
msg_pci_msix:       .asciz  " msix table-size "
msg_pci_table:      .asciz  " table"
msg_pci_pba:        .asciz  " pba"
msg_pci_virtio:     .asciz  " virtio type "
msg_pci_plus:       .asciz  " +"
msg_pci_len:        .asciz  " len "
    HEARTBEAT_STRINGS
msg_fault_cpu:      .asciz  "\nprobe: cpu "
msg_fault_vector:   .asciz  ": unexpected exception/interrupt, vector "
msg_fault_error:    .asciz  " error "
msg_fault_rip:      .asciz  " rip "
key_hz:             .asciz  "probe.hz="
key_exit_after:     .asciz  "probe.exit_after="
key_exit_code:      .asciz  "probe.exit_code="
key_reset_after:    .asciz  "probe.reset_after="
msg_reset:          .asciz  "probe: reset\n"

/* Per-vCPU stacks (vCPU i uses stacks + i*STACK_SIZE .. + (i+1)*STACK_SIZE). */
    .bss
    .balign 4096
stacks:
    .skip   STACK_SIZE * MAX_CPUS
crc_tables:
    .skip   8 * 256 * 4

    .section .note.GNU-stack, "", @progbits
