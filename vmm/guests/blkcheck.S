/*
 * blkcheck.S - cpr-vmm built-in guest "blkcheck": a virtio-blk driver (virtio 1.x, modern PCI
 * transport) that keeps N requests in flight and checks every sector it wrote.
 *
 * Built twice from this one source (vmm/build.rs):
 *   blkcheck.bin      flat built-in guest, loaded at 0x10000 by the VMM (`--guest blkcheck`);
 *                     parameters from the parameter block (abi.inc; PB_BLK_DEPTH below;
 *                     exit-after counts passes; PB_BLK_VERIFY, which the VMM leaves 0, is
 *                     blkcheck.verify below).
 *   blkcheck.bzImage  the same driver as a bzImage (assembled with --defsym BZIMAGE=1, linked
 *                     by blkcheck-bz.ld) that QEMU boots with -kernel through its real-mode
 *                     entry (setup code -> 32-bit startup_32 -> own page tables -> long mode),
 *                     or a 64-bit boot-protocol loader through startup_64 (payload + 0x200).
 *                     Options on the kernel command line: blkcheck.depth=N,
 *                     blkcheck.passes=N (exit after N passes), blkcheck.exit_code=N,
 *                     blkcheck.verify=G (the first pass only reads and verifies generation G,
 *                     left on the disk by an earlier run; the next pass writes G + 1).
 *                     The LAPIC timer runs at 100 Hz (1 GHz APIC bus).
 *
 * The timer only wakes the driver and counts ticks (counters +0x28, "ticks" per pass): on a slow
 * nested host a periodic LAPIC timer coalesces ticks, so they are not a clock to measure with.
 *
 * All driver state lives in RAM (below) or is re-read from the device, and the main loop takes
 * completions idempotently, so a save/restore of RAM, vCPU and device state continues the run.
 *
 * The driver (vCPU 0 only; other vCPUs halt):
 *   1. scans PCI bus 0 through configuration mechanism #1 (0xcf8/0xcfc) for vendor 0x1af4,
 *      device 0x1042 (or transitional 0x1001 with the modern capabilities), walks its
 *      capability list for the virtio common/notify/ISR/device configuration structures and
 *      MSI-X, takes the BAR addresses as assigned by firmware or the VMM, and enables memory
 *      space and bus mastering (and disables INTx);
 *   2. resets the device, ACKNOWLEDGE, DRIVER, negotiates VERSION_1 (required) and, when
 *      offered, RING_EVENT_IDX, BLK_F_FLUSH, BLK_F_RO, BLK_F_BLK_SIZE, BLK_F_SEG_MAX, checks
 *      FEATURES_OK, reads the configuration, sets up queue 0 as a split virtqueue (at most 256
 *      entries), MSI-X entry 0 (address 0xfee00000 | APIC id << 12, vector BLK_VECTOR) as the
 *      queue's vector, DRIVER_OK. Without MSI-X (no capability, or the vector does not read
 *      back) it polls and says so;
 *   3. runs passes over the region (the first min(capacity, 16 MiB) of the disk, in 4 KiB
 *      requests, `depth` in flight): write generation G into every sector, read every sector
 *      back and verify it, FLUSH (when offered), G += 1. Read-only devices get read-only passes
 *      without verification.
 *
 * Sector format (512 bytes, 64 little-endian u64 words q[0..63]), generation G, sector S:
 *   q[0] = 0x4b434548434b4c42 ("BLKCHECK"), q[1] = S, q[2] = G,
 *   q[i] = seed + i * K3 for i = 3..63, seed = S * K1 ^ G * K2 (all mod 2^64)
 * (tests/src/blkcheck.rs checks disk images with the same rule.)
 *
 * Console lines (COM1):
 *   blkcheck: pci 00:DD.F VVVV:DDDD                  every function found on bus 0
 *   blkcheck: no virtio-blk device found             then exit status EXIT_NO_DEVICE
 *   blkcheck: virtio-blk 00:DD.F common 0x.. notify 0x.. isr 0x.. device 0x..
 *   blkcheck: msix table 0x.. entries N vector 0x41 apic A   (or "blkcheck: msix unavailable,
 *                                                    polling" / "... not accepted, polling")
 *   blkcheck: features device 0x.. driver 0x.. event-idx E flush F ro R
 *   blkcheck: capacity C sectors blk-size B seg-max M queue-size Q depth D region R sectors
 *   blkcheck: pass G done requests N total T errors E mismatches M ticks K irqs I
 *   blkcheck: MISMATCH sector S expected gen G found sector X gen F [word W]
 *   blkcheck: I/O error status X sector S
 *   blkcheck: FAILED <reason>                         then exit status EXIT_DEVICE_ERROR
 *
 * Exit statuses (port 0x501): after exit-after passes, the parameter block's exit code if no
 * request failed and no sector mismatched, else EXIT_DATA_ERROR; EXIT_NO_DEVICE (0x20) when no
 * device is found; EXIT_DEVICE_ERROR (0x21) when the device cannot be driven.
 *
 * Counters block at BK_COUNTERS = 0x30000 (u64 each, written only by the guest; host tests read
 * it with pmemsave):
 *   +0x00 magic "BLKCHECK"   +0x08 completed requests  +0x10 passes completed (= the last
 *   generation fully written, verified and flushed)     +0x18 mismatched sectors
 *   +0x20 I/O errors         +0x28 timer ticks          +0x30 generation in flight
 *   +0x38 region sectors     +0x40 capacity (sectors)   +0x48 state (0 starting, 1 running,
 *   2 no device, 3 failed)   +0x50 queue interrupts taken
 *
 * Memory used below 1 MiB (free in both formats): 0x2f000 bzImage parameter block,
 * 0x30000..0x34fff counters, driver state, virtqueue, request headers and status bytes,
 * 0x40000..0x7ffff data buffers (4 KiB per slot, at most 64 slots), and for the bzImage only
 * 0x80000..0x85fff page tables and a stack below 0x90000.
 *
 * Device accesses: PCI configuration space with 32-bit reads and 16-bit writes (command, MSI-X
 * message control); common configuration with its fields' own widths (8, 16, 32 bits; 64-bit
 * fields as two 32-bit halves); notification by a 16-bit write of the queue index.
 *
 * Uses only instructions KVM's x86 emulator knows (no mfence: `lock orl` is the full barrier).
 */

    .include "abi.inc"

    .set PB_BLK_DEPTH,      0x30        /* u32 requests in flight, 0 = default (the VMM) */
    .set PB_BLK_VERIFY,     0x34        /* u32 generation the first pass verifies, 0 = none */
    .set DEFAULT_DEPTH,     8
    .set MAX_DEPTH,         64
    .set MAX_QUEUE,         256
    .set REGION_LIMIT,      32768       /* sectors: 16 MiB */
    .set REQ_SECTORS,       8           /* 4 KiB requests */
    .set BLK_VECTOR,        0x41
    .set APIC_ID,           0x020
    .set MAX_PRINTED_MISMATCHES, 20

    .set EXIT_NO_DEVICE,    0x20
    .set EXIT_DEVICE_ERROR, 0x21
    .set EXIT_DATA_ERROR,   0x22

    /* Counters block. */
    .set BK_COUNTERS,       0x30000
    .set C_MAGIC,           BK_COUNTERS + 0x00
    .set C_REQUESTS,        BK_COUNTERS + 0x08
    .set C_PASSES,          BK_COUNTERS + 0x10
    .set C_MISMATCHES,      BK_COUNTERS + 0x18
    .set C_ERRORS,          BK_COUNTERS + 0x20
    .set C_TICKS,           BK_COUNTERS + 0x28
    .set C_GEN,             BK_COUNTERS + 0x30
    .set C_REGION,          BK_COUNTERS + 0x38
    .set C_CAPACITY,        BK_COUNTERS + 0x40
    .set C_STATE,           BK_COUNTERS + 0x48
    .set C_IRQS,            BK_COUNTERS + 0x50
    .set STATE_RUNNING,     1
    .set STATE_NO_DEVICE,   2
    .set STATE_FAILED,      3

    /* Driver state (private). */
    .set ST,                0x30100
    .set S_BDF,             ST + 0x00   /* u32 config address of the device, bit 31 set */
    .set S_QSIZE,           ST + 0x04   /* u32 */
    .set S_DEPTH,           ST + 0x08   /* u32 */
    .set S_NREQ,            ST + 0x0c   /* u32 requests per phase */
    .set S_COMMON,          ST + 0x10   /* u64 */
    .set S_NOTIFY,          ST + 0x18   /* u64 notify base, then queue 0's notify address */
    .set S_ISR,             ST + 0x20   /* u64 */
    .set S_DEVCFG,          ST + 0x28   /* u64 */
    .set S_NOTIFY_MULT,     ST + 0x30   /* u32 */
    .set S_MSIX_CAP,        ST + 0x34   /* u32 config offset, 0 = none */
    .set S_FEATURES,        ST + 0x38   /* u64 negotiated */
    .set S_DEV_FEATURES,    ST + 0x40   /* u64 offered */
    .set S_AVAIL_IDX,       ST + 0x48   /* u32 (u16 arithmetic) */
    .set S_LAST_USED,       ST + 0x4c   /* u32 (u16 arithmetic) */
    .set S_KICKED_IDX,      ST + 0x50   /* u32 avail idx at the last notification decision */
    .set S_INFLIGHT,        ST + 0x54   /* u32 */
    .set S_NEXT,            ST + 0x58   /* u32 next request index of the phase */
    .set S_DONE,            ST + 0x5c   /* u32 completed requests of the phase */
    .set S_PHASE,           ST + 0x60   /* u32 PHASE_* */
    .set S_USE_MSIX,        ST + 0x64   /* u32 */
    .set S_EVENT_IDX,       ST + 0x68   /* u32 */
    .set S_RO,              ST + 0x6c   /* u32 */
    .set S_PASS_REQS,       ST + 0x70   /* u64 requests completed in this pass */
    .set S_PASS_TICKS,      ST + 0x78   /* u64 ticks at the start of this pass */
    .set S_PRINTED_MM,      ST + 0x80   /* u32 mismatch lines printed */
    .set S_FLUSH,           ST + 0x84   /* u32 BLK_F_FLUSH negotiated */
    .set S_APIC_ID,         ST + 0x88   /* u32 this vCPU's APIC id (the MSI-X destination) */
    .set ST_SIZE,           0x100
    .set PHASE_WRITE,       0
    .set PHASE_READ,        1
    .set PHASE_FLUSH,       2

    /* Virtqueue and request memory. */
    .set VQ_DESC,           0x31000     /* 16 * 256 */
    .set VQ_AVAIL,          0x32000     /* flags, idx, ring[256], used_event */
    .set VQ_USED,           0x33000     /* flags, idx, ring[256] (8 bytes), avail_event */
    .set REQ_HDRS,          0x34000     /* 16 bytes per slot: type, reserved, sector */
    .set REQ_STATUS,        0x34800     /* 1 byte per slot */
    .set BUFFERS,           0x40000     /* 4 KiB per slot */

    /* virtio */
    .set VIRTIO_VENDOR,     0x1af4
    .set VIRTIO_BLK_MODERN, 0x1042
    .set VIRTIO_BLK_TRANS,  0x1001
    .set CAP_VENDOR,        0x09
    .set CAP_MSIX,          0x11
    .set CFG_COMMON,        1
    .set CFG_NOTIFY,        2
    .set CFG_ISR,           3
    .set CFG_DEVICE,        4
    .set CC_DFSELECT,       0x00
    .set CC_DF,             0x04
    .set CC_GFSELECT,       0x08
    .set CC_GF,             0x0c
    .set CC_MSIX_CONFIG,    0x10
    .set CC_STATUS,         0x14
    .set CC_CFG_GEN,        0x15
    .set CC_Q_SELECT,       0x16
    .set CC_Q_SIZE,         0x18
    .set CC_Q_MSIX,         0x1a
    .set CC_Q_ENABLE,       0x1c
    .set CC_Q_NOTIFY_OFF,   0x1e
    .set CC_Q_DESC,         0x20
    .set CC_Q_DRIVER,       0x28
    .set CC_Q_DEVICE,       0x30
    .set ST_ACK,            1
    .set ST_DRIVER,         2
    .set ST_DRIVER_OK,      4
    .set ST_FEATURES_OK,    8
    .set ST_FAILED,         0x80
    .set F_SEG_MAX,         2
    .set F_RO,              5
    .set F_BLK_SIZE,        6
    .set F_FLUSH,           9
    .set F_EVENT_IDX,       29
    .set F_VERSION_1,       32
    .set WANTED_FEATURES,   (1 << F_SEG_MAX) | (1 << F_RO) | (1 << F_BLK_SIZE) | (1 << F_FLUSH) | (1 << F_EVENT_IDX)
    .set T_IN,              0           /* read */
    .set T_OUT,             1           /* write */
    .set T_FLUSH,           4
    .set D_NEXT,            1
    .set D_WRITE,           2
    .set NO_VECTOR,         0xffff

    /* Sector pattern. */
    .set PAT_MAGIC,         0x4b434548434b4c42
    .set PAT_K1,            0x9e3779b97f4a7c15
    .set PAT_K2,            0xc2b2ae3d27d4eb4f
    .set PAT_K3,            0x165667b19e3779f9

.macro SAY msg
    lea     \msg(%rip), %rsi
    call    puts
.endm

.ifdef BZIMAGE
    .set BZ_PARAMS,         0x2f000
    .set BZ_PML4,           0x80000
    .set BZ_STACK_TOP,      0x90000
    .set BZ_TIMER_COUNT,    625000      /* 1 GHz / 16 / 100 Hz */
    .set BZ_CS32,           0x18
    .set BZ_DS,             0x10
    .set BP_EXT_CMD_LINE_PTR, 0x0c8
    .set BP_CMD_LINE_PTR,   0x228

/* Real-mode setup: boot sector and setup header (boot protocol 2.12), 1 KiB. */
    .section .setup, "ax"
    .code16
setup_start:
    cli
1:  hlt
    jmp     1b

    .org    0x1f1
    .byte   1                           /* setup_sects */
    .word   0                           /* root_flags */
    .long   _bk_syssize                 /* syssize (linker) */
    .word   0                           /* ram_size */
    .word   0xffff                      /* vid_mode */
    .word   0                           /* root_dev */
    .word   0xaa55                      /* boot_flag */
    .byte   0xeb, setup_entry - 1f      /* jump */
1:  .ascii  "HdrS"
    .word   0x020c                      /* boot protocol 2.12 */
    .long   0                           /* realmode_swtch */
    .word   0x1000                      /* start_sys_seg */
    .word   bk_version - setup_start - 0x200
    .byte   0                           /* type_of_loader */
    .byte   0x01                        /* loadflags: LOADED_HIGH */
    .word   0x8000                      /* setup_move_size */
code32_start:
    .long   0x100000                    /* code32_start */
    .long   0, 0, 0                     /* ramdisk_image, ramdisk_size, bootsect_kludge */
    .word   0                           /* heap_end_ptr */
    .byte   0, 0                        /* ext_loader_ver, ext_loader_type */
    .long   0                           /* cmd_line_ptr */
    .long   0x7fffffff                  /* initrd_addr_max */
    .long   0x200000                    /* kernel_alignment */
    .byte   1, 21                       /* relocatable_kernel, min_alignment */
    .word   0x0001                      /* xloadflags: XLF_KERNEL_64 */
    .long   2047                        /* cmdline_size */
    .long   0                           /* hardware_subarch */
    .quad   0                           /* hardware_subarch_data */
    .long   0, 0                        /* payload_offset, payload_length */
    .quad   0                           /* setup_data */
    .quad   0x1000000                   /* pref_address */
    .long   _bk_init_size               /* init_size (linker) */
    .long   0                           /* handover_offset */

/*
 * Real-mode entry (CS base = setup_start + 0x200, as a 16-bit loader such as QEMU's
 * linuxboot option ROM jumps here): load the payload's GDT, enter protected mode and
 * far-return to startup_32 at code32_start with esi = the setup (boot_params) address.
 */
setup_entry:
    cli
    cld
    mov     $0xff, %al                  /* mask both 8259s: no BIOS timer interrupts */
    out     %al, $0x21
    out     %al, $0xa1
    xor     %esi, %esi
    mov     %cs, %si
    sub     $0x20, %si
    shl     $4, %esi                    /* esi = linear address of setup_start */
    mov     %cs:(code32_start - setup_start - 0x200), %ebx
    mov     %ebx, %eax
    add     $(bk_gdt - startup_32), %eax
    mov     %eax, %cs:(gdt_desc_base - setup_start - 0x200)
    lgdtl   %cs:(gdt_desc - setup_start - 0x200)
    mov     %cr0, %eax
    or      $1, %eax                    /* PE */
    mov     %eax, %cr0
    pushl   $BZ_CS32
    pushl   %ebx
    lretl

    .balign 8
gdt_desc:
    .word   4 * 8 - 1
gdt_desc_base:
    .long   0
bk_version:
    .asciz  "cpr-vmm blkcheck 1"

/* Protected-mode payload: position independent (RIP/EIP-relative). */
    .text
    .code32
    .globl  startup_32
startup_32:
    cli
    mov     $BZ_DS, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    mov     $BZ_STACK_TOP, %esp
    call    1f
1:  pop     %ebp
    sub     $(1b - startup_32), %ebp    /* ebp = where we run */

    /* Page tables: PML4, PDPT, 4 page directories, 0..4 GiB identity, 2 MiB pages, the
     * 3..4 GiB MMIO range uncached. */
    mov     $BZ_PML4, %edi
    xor     %eax, %eax
    mov     $(6 * 4096 / 4), %ecx
    rep stosl
    movl    $(BZ_PML4 + 0x1003), BZ_PML4
    mov     $BZ_PML4 + 0x1000, %edi
    mov     $(BZ_PML4 + 0x2003), %eax
    xor     %ecx, %ecx
2:  mov     %eax, (%edi,%ecx,8)
    add     $0x1000, %eax
    inc     %ecx
    cmp     $4, %ecx
    jb      2b
    mov     $BZ_PML4 + 0x2000, %edi
    xor     %ecx, %ecx
3:  mov     %ecx, %eax
    shl     $21, %eax
    or      $0x83, %eax                 /* present, writable, 2 MiB */
    cmp     $1536, %ecx
    jb      4f
    or      $0x18, %eax                 /* PWT, PCD */
4:  mov     %eax, (%edi,%ecx,8)
    inc     %ecx
    cmp     $2048, %ecx
    jb      3b

    mov     %cr4, %eax
    or      $0x620, %eax                /* PAE, OSFXSR, OSXMMEXCPT */
    mov     %eax, %cr4
    mov     $BZ_PML4, %eax
    mov     %eax, %cr3
    mov     $0xc0000080, %ecx           /* EFER.LME */
    rdmsr
    or      $0x100, %eax
    wrmsr
    mov     %cr0, %eax
    and     $0x9fffffff, %eax           /* caches on (CD, NW clear) */
    or      $0x80010023, %eax           /* PG, WP, NE, MP, PE */
    mov     %eax, %cr0
    lea     (from_32 - startup_32)(%ebp), %eax
    push    $KERNEL_CS
    push    %eax
    lret

    .balign 8
bk_gdt:
    .quad   0
    .quad   0x00af9a000000ffff          /* 0x08: 64-bit code (KERNEL_CS) */
    .quad   0x00cf92000000ffff          /* 0x10: flat data */
    .quad   0x00cf9a000000ffff          /* 0x18: 32-bit code */

    .org    0x200
    .code64
    .globl  startup_64
startup_64:                             /* 64-bit boot protocol: rsi = boot_params */
    cli
    jmp     bz_common
from_32:
    mov     %esi, %esi                  /* zero-extend boot_params */
bz_common:
    cld
    mov     $BZ_STACK_TOP, %esp
    mov     $0xff, %al
    out     %al, $0x21
    out     %al, $0xa1
    mov     BP_CMD_LINE_PTR(%rsi), %ebx
    mov     BP_EXT_CMD_LINE_PTR(%rsi), %eax
    shl     $32, %rax
    or      %rax, %rbx                  /* rbx = command line or 0 */
    /* A parameter block like the VMM's, for the common start-up. */
    mov     $BZ_PARAMS, %edi
    xor     %eax, %eax
    mov     $0x1000, %ecx
    rep stosb
    movabs  $PB_MAGIC_VALUE, %rax
    mov     %rax, BZ_PARAMS + PB_MAGIC
    movl    $PB_VERSION_VALUE, BZ_PARAMS + PB_VERSION
    movl    $1, BZ_PARAMS + PB_VCPU_COUNT
    movl    $BZ_TIMER_COUNT, BZ_PARAMS + PB_TIMER_COUNT
    lea     key_depth(%rip), %rsi
    call    option_value
    jc      1f
    mov     %eax, BZ_PARAMS + PB_BLK_DEPTH
1:  lea     key_passes(%rip), %rsi
    call    option_value
    jc      2f
    mov     %eax, BZ_PARAMS + PB_EXIT_AFTER
2:  lea     key_exit_code(%rip), %rsi
    call    option_value
    jc      3f
    mov     %eax, BZ_PARAMS + PB_EXIT_CODE
3:  lea     key_verify(%rip), %rsi
    call    option_value
    jc      4f
    mov     %eax, BZ_PARAMS + PB_BLK_VERIFY
4:  xor     %edi, %edi
    mov     $BZ_PARAMS, %esi
    jmp     blk_start

/*
 * option_value - the decimal value of `key` (rsi, NUL-terminated, ending in '=') at the start
 * of a word of the command line at rbx (0 = none).
 *   out: eax = value and CF clear if found, CF set if not
 *   clobbers: rax, rcx, rdx, rdi, r8
 */
option_value:
    test    %rbx, %rbx
    jz      9f
    mov     %rbx, %rdi                  /* rdi = start of the current word */
1:  cmpb    $0, (%rdi)
    je      9f
    xor     %ecx, %ecx
2:  movb    (%rsi,%rcx), %al
    test    %al, %al
    jz      5f                          /* the whole key matched */
    cmpb    %al, (%rdi,%rcx)
    jne     3f
    inc     %ecx
    jmp     2b
3:  movb    (%rdi), %al                 /* skip past the next space */
    test    %al, %al
    jz      9f
    inc     %rdi
    cmp     $' ', %al
    jne     3b
    jmp     1b
5:  lea     (%rdi,%rcx), %r8
    xor     %eax, %eax
6:  movzbl  (%r8), %edx
    inc     %r8
    lea     -'0'(%rdx), %ecx
    cmp     $10, %ecx
    jae     7f                          /* not a digit: the number ends */
    lea     (%rax,%rax,4), %eax
    lea     (%rcx,%rax,2), %eax         /* eax = eax * 10 + digit */
    jmp     6b
7:  clc
    ret
9:  stc
    ret

key_depth:      .asciz  "blkcheck.depth="
key_passes:     .asciz  "blkcheck.passes="
key_exit_code:  .asciz  "blkcheck.exit_code="
key_verify:     .asciz  "blkcheck.verify="

.else
    .text
    .code64
    .globl  _start
_start:
.endif

/* ------------------------------------------------------------------------------------------
 * Common start-up (rdi = vCPU index, rsi = parameter block).
 * ------------------------------------------------------------------------------------------ */
blk_start:
    lea     timer_isr(%rip), %rbx
    call    guest_init                  /* r12..r15, IDT; interrupts off */
    test    %r12d, %r12d
    jnz     halt_forever                /* one driver: vCPU 0 */

    /* The queue interrupt's gate (guest_init routes only the timer and spurious vectors). */
    lea     blk_isr(%rip), %rax         /* field by field: interrupts are still off */
    mov     $(IDT_BASE + BLK_VECTOR * 16), %edi
    mov     %ax, 0(%rdi)                /* offset 15:0 */
    movw    $KERNEL_CS, 2(%rdi)         /* selector */
    movw    $0x8e00, 4(%rdi)            /* present, DPL 0, 64-bit interrupt gate */
    shr     $16, %rax
    mov     %ax, 6(%rdi)                /* offset 31:16 */
    shr     $16, %rax
    mov     %rax, 8(%rdi)               /* offset 63:32, reserved 0 */

    /* Counters and state start at zero. */
    mov     $BK_COUNTERS, %edi
    xor     %eax, %eax
    mov     $(0x100 + ST_SIZE), %ecx
    rep stosb
    movabs  $PAT_MAGIC, %rax
    mov     %rax, C_MAGIC

    /* LAPIC timer: the progress clock and the fallback wake-up. */
    movl    $(APIC_SVR_ENABLE | SPURIOUS_VECTOR), APIC_SVR(%r15)
    mov     PB_TIMER_COUNT(%r13), %eax
    test    %eax, %eax
    jz      1f
    movl    $APIC_DIV_16, APIC_TIMER_DIV(%r15)
    movl    $(APIC_LVT_PERIODIC | TIMER_VECTOR), APIC_LVT_TIMER(%r15)
    mov     %eax, APIC_TIMER_INIT(%r15)
1:
    call    find_device
    jnc     2f
    movq    $STATE_NO_DEVICE, C_STATE
    SAY     msg_no_device
    mov     $EXIT_NO_DEVICE, %al
    jmp     exit_with
2:  call    setup_device
    jnc     3f
    movq    $STATE_FAILED, C_STATE
    mov     $EXIT_DEVICE_ERROR, %al
    jmp     exit_with
3:  movq    $STATE_RUNNING, C_STATE
    movq    $1, C_GEN
    mov     C_TICKS, %rax
    mov     %rax, S_PASS_TICKS
    mov     PB_BLK_VERIFY(%r13), %eax
    test    %eax, %eax
    jz      4f
    mov     %rax, C_GEN                 /* first pass: verify what an earlier run left */
    movl    $PHASE_READ, S_PHASE
    SAY     msg_verify_first
    mov     C_GEN, %rax
    call    put_dec
    call    newline
4:  cmpl    $0, S_RO
    je      5f
    movl    $PHASE_READ, S_PHASE        /* read-only device: read passes only */
5:  call    start_phase

/*
 * The main loop: take completions, move the workload on, sleep until the next interrupt (the
 * queue's MSI-X vector or the timer) or, without MSI-X, poll.
 */
main_loop:
    cli
    call    process_used
    test    %eax, %eax
    jnz     main_loop                   /* progress: look again before sleeping */
    sti
    cmpl    $0, S_USE_MSIX
    je      1f
    hlt                                 /* sti's shadow: no wake-up is lost */
    jmp     main_loop
1:  pause
    jmp     main_loop

timer_isr:
    incq    C_TICKS
    movl    $0, APIC_EOI(%r15)
    iretq

blk_isr:
    incq    C_IRQS
    movl    $0, APIC_EOI(%r15)
    iretq

/* exit_with - al = status to the debug exit port, then halt. */
exit_with:
    mov     $DEBUG_EXIT_PORT, %dx
    out     %al, %dx
    jmp     halt_forever

/* ------------------------------------------------------------------------------------------
 * PCI configuration mechanism #1, for the function in S_BDF.
 * ------------------------------------------------------------------------------------------ */

/* pci_read32 - in: eax = register. out: eax. clobbers: rdx */
pci_read32:
    and     $0xfc, %eax
    or      S_BDF, %eax
    mov     $0xcf8, %dx
    out     %eax, %dx
    mov     $0xcfc, %dx
    in      %dx, %eax
    ret

/* pci_read16 / pci_read8 - in: eax = register. out: eax zero-extended. clobbers: rcx, rdx */
pci_read16:
    mov     %eax, %ecx
    call    pci_read32
    and     $2, %ecx
    shl     $3, %ecx
    shr     %cl, %eax
    movzwl  %ax, %eax
    ret
pci_read8:
    mov     %eax, %ecx
    call    pci_read32
    and     $3, %ecx
    shl     $3, %ecx
    shr     %cl, %eax
    movzbl  %al, %eax
    ret

/* pci_write16 - in: eax = register, ecx = value. clobbers: rax, rdx */
pci_write16:
    push    %rax
    and     $0xfc, %eax
    or      S_BDF, %eax
    mov     $0xcf8, %dx
    out     %eax, %dx
    pop     %rdx
    and     $2, %edx
    add     $0xcfc, %edx
    mov     %ecx, %eax
    out     %ax, %dx
    ret

/*
 * bar_address - in: eax = BAR index. out: rax = its memory address, 0 if it is not a usable
 * memory BAR. clobbers: rcx, rdx, r8
 */
bar_address:
    cmp     $5, %eax
    ja      8f
    lea     0x10(,%rax,4), %r8d         /* r8 = BAR register */
    mov     %r8d, %eax
    call    pci_read32
    test    $1, %al
    jnz     8f                          /* I/O BAR */
    mov     %eax, %ecx
    and     $0xfffffff0, %ecx           /* rcx = low address (zero-extended) */
    and     $6, %eax
    cmp     $4, %eax
    jne     1f                          /* 32-bit BAR */
    lea     4(%r8), %eax
    call    pci_read32
    shl     $32, %rax
    or      %rax, %rcx
1:  mov     %rcx, %rax
    ret
8:  xor     %eax, %eax
    ret

/*
 * find_device - scan bus 0 for a virtio-blk function with the modern capabilities.
 *   out: CF clear and S_BDF, S_COMMON, S_NOTIFY, S_ISR, S_DEVCFG, S_NOTIFY_MULT, S_MSIX_CAP
 *        set if found; CF set if not.
 *   clobbers: rax, rbx, rcx, rdx, rsi, rbp, r8, r9
 */
find_device:
    xor     %ebp, %ebp                  /* ebp = devfn */
1:  mov     %ebp, %eax
    shl     $8, %eax
    or      $0x80000000, %eax
    mov     %eax, S_BDF
    xor     %eax, %eax
    call    pci_read32
    cmp     $0xffff, %ax
    jne     2f
    test    $7, %ebp                    /* no function 0: no device */
    jnz     6f
    or      $7, %ebp
    jmp     6f
2:  mov     %eax, %ebx                  /* ebx = device << 16 | vendor */
    SAY     msg_pci
    call    put_devfn
    mov     $' ', %al
    call    putc
    mov     %ebx, %eax
    call    put_ids
    call    newline
    cmp     $VIRTIO_VENDOR, %bx
    jne     5f
    mov     %ebx, %eax
    shr     $16, %eax
    cmp     $VIRTIO_BLK_MODERN, %eax
    je      3f
    cmp     $VIRTIO_BLK_TRANS, %eax
    jne     5f
3:  call    find_caps
    jnc     4f
    SAY     msg_no_caps
    jmp     5f
4:  clc
    ret
5:  test    $7, %ebp                    /* function 0 of a single-function device: skip 1-7 */
    jnz     6f
    mov     $0x0e, %eax
    call    pci_read8
    test    $0x80, %al
    jnz     6f
    or      $7, %ebp
6:  inc     %ebp
    cmp     $256, %ebp
    jb      1b
    stc
    ret

/*
 * find_caps - walk the capability list of S_BDF.
 *   out: CF clear if the common, notify, ISR and device structures were all found
 *   clobbers: rax, rcx, rdx, rsi, r8, r9, r10, r11
 */
find_caps:
    xor     %eax, %eax
    mov     %rax, S_COMMON
    mov     %rax, S_NOTIFY
    mov     %rax, S_ISR
    mov     %rax, S_DEVCFG
    mov     %eax, S_MSIX_CAP
    mov     $0x06, %eax                 /* status: capability list? */
    call    pci_read16
    test    $0x10, %al
    jz      9f
    mov     $0x34, %eax
    call    pci_read8
    mov     %eax, %r9d                  /* r9 = capability offset */
    mov     $48, %r10d                  /* at most 48 capabilities: no endless loop */
1:  and     $0xfc, %r9d
    cmp     $0x40, %r9d
    jb      8f
    dec     %r10d
    jz      8f
    mov     %r9d, %eax
    call    pci_read32                  /* id, next, len, cfg_type */
    mov     %eax, %r11d
    cmp     $CAP_MSIX, %al
    jne     2f
    mov     %r9d, S_MSIX_CAP
    jmp     7f
2:  cmp     $CAP_VENDOR, %al
    jne     7f
    shr     $24, %eax                   /* cfg_type */
    lea     S_COMMON, %rsi
    cmp     $CFG_COMMON, %eax
    je      3f
    lea     S_NOTIFY, %rsi
    cmp     $CFG_NOTIFY, %eax
    je      3f
    lea     S_ISR, %rsi
    cmp     $CFG_ISR, %eax
    je      3f
    lea     S_DEVCFG, %rsi
    cmp     $CFG_DEVICE, %eax
    jne     7f
3:  cmpq    $0, (%rsi)
    jne     7f                          /* the first one of each type counts */
    lea     4(%r9), %eax
    call    pci_read8                   /* bar */
    call    bar_address
    test    %rax, %rax
    jz      7f
    push    %rax
    lea     8(%r9), %eax
    call    pci_read32                  /* offset */
    mov     %eax, %eax
    pop     %rcx
    add     %rcx, %rax
    mov     %rax, (%rsi)
    lea     S_NOTIFY, %rax
    cmp     %rax, %rsi
    jne     7f
    lea     16(%r9), %eax
    call    pci_read32                  /* notify_off_multiplier */
    mov     %eax, S_NOTIFY_MULT
7:  mov     %r11d, %r9d
    shr     $8, %r9d                    /* next */
    jmp     1b
8:  cmpq    $0, S_COMMON
    je      9f
    cmpq    $0, S_NOTIFY
    je      9f
    cmpq    $0, S_ISR
    je      9f
    cmpq    $0, S_DEVCFG
    je      9f
    clc
    ret
9:  stc
    ret

/*
 * setup_device - enable the function, MSI-X, negotiate, configure queue 0, DRIVER_OK.
 *   out: CF clear on success; CF set after printing "blkcheck: FAILED ..."
 *   clobbers: everything but r12..r15
 */
setup_device:
    SAY     msg_found
    call    put_devfn
    SAY     msg_common
    mov     S_COMMON, %rax
    call    put_hx
    SAY     msg_notify
    mov     S_NOTIFY, %rax
    call    put_hx
    SAY     msg_isr
    mov     S_ISR, %rax
    call    put_hx
    SAY     msg_devcfg
    mov     S_DEVCFG, %rax
    call    put_hx
    call    newline
    /* Our page tables map 0..4 GiB. */
    mov     S_COMMON, %rax
    or      S_NOTIFY, %rax
    or      S_ISR, %rax
    or      S_DEVCFG, %rax
    shr     $32, %rax
    lea     fail_high_bar(%rip), %rsi
    jnz     fail

    /* Command: memory space, bus master, INTx disabled. */
    mov     $0x04, %eax
    call    pci_read16
    or      $0x406, %eax
    mov     %eax, %ecx
    mov     $0x04, %eax
    call    pci_write16

    call    setup_msix

    mov     S_COMMON, %rbp              /* rbp = common configuration */
    movb    $0, CC_STATUS(%rbp)         /* reset, and wait until it reads 0 */
    mov     $1000000, %ecx
1:  cmpb    $0, CC_STATUS(%rbp)
    je      2f
    pause
    dec     %ecx
    jnz     1b
    lea     fail_reset(%rip), %rsi
    jmp     fail
2:  movb    $ST_ACK, CC_STATUS(%rbp)
    movb    $(ST_ACK | ST_DRIVER), CC_STATUS(%rbp)

    /* Features. */
    movl    $1, CC_DFSELECT(%rbp)
    mov     CC_DF(%rbp), %eax
    shl     $32, %rax
    movl    $0, CC_DFSELECT(%rbp)
    mov     CC_DF(%rbp), %ecx
    or      %rcx, %rax
    mov     %rax, S_DEV_FEATURES
    bt      $F_VERSION_1, %rax
    lea     fail_version(%rip), %rsi
    jnc     fail
    movabs  $((1 << F_VERSION_1) | WANTED_FEATURES), %rcx
    and     %rcx, %rax
    mov     %rax, S_FEATURES
    movl    $0, CC_GFSELECT(%rbp)
    mov     %eax, CC_GF(%rbp)
    shr     $32, %rax
    movl    $1, CC_GFSELECT(%rbp)
    mov     %eax, CC_GF(%rbp)
    movb    $(ST_ACK | ST_DRIVER | ST_FEATURES_OK), CC_STATUS(%rbp)
    testb   $ST_FEATURES_OK, CC_STATUS(%rbp)
    lea     fail_features(%rip), %rsi
    jz      fail
    mov     S_FEATURES, %rax
    xor     %ecx, %ecx
    bt      $F_EVENT_IDX, %rax
    setc    %cl
    mov     %ecx, S_EVENT_IDX
    bt      $F_FLUSH, %rax
    setc    %cl
    mov     %ecx, S_FLUSH
    bt      $F_RO, %rax
    setc    %cl
    mov     %ecx, S_RO

    SAY     msg_features
    mov     S_DEV_FEATURES, %rax
    call    put_hx
    SAY     msg_driver
    mov     S_FEATURES, %rax
    call    put_hx
    SAY     msg_event_idx
    mov     S_EVENT_IDX, %eax
    call    put_dec
    SAY     msg_flush
    mov     S_FLUSH, %eax
    call    put_dec
    SAY     msg_ro
    mov     S_RO, %eax
    call    put_dec
    call    newline

    /* Device configuration: capacity (consistent by config_generation), blk_size, seg_max. */
    mov     S_DEVCFG, %rbx
3:  movzbl  CC_CFG_GEN(%rbp), %r8d
    mov     4(%rbx), %eax
    shl     $32, %rax
    mov     0(%rbx), %ecx
    or      %rcx, %rax
    movzbl  CC_CFG_GEN(%rbp), %r9d
    cmp     %r8d, %r9d
    jne     3b
    mov     %rax, C_CAPACITY
    mov     $REGION_LIMIT, %ecx
    cmp     %rcx, %rax
    cmova   %rcx, %rax
    and     $~(REQ_SECTORS - 1), %eax
    mov     %rax, C_REGION
    shr     $3, %eax
    mov     %eax, S_NREQ
    lea     fail_small(%rip), %rsi
    jz      fail

    /* Queue 0. */
    movw    $0, CC_Q_SELECT(%rbp)
    movzwl  CC_Q_SIZE(%rbp), %eax
    test    %eax, %eax
    lea     fail_queue(%rip), %rsi
    jz      fail
    cmp     $MAX_QUEUE, %eax
    jbe     4f
    mov     $MAX_QUEUE, %eax
    mov     %ax, CC_Q_SIZE(%rbp)
4:  mov     %eax, S_QSIZE
    mov     $VQ_DESC, %edi              /* zero the rings */
    mov     $(VQ_USED + 0x1000 - VQ_DESC), %ecx
    xor     %eax, %eax
    rep stosb
    movl    $VQ_DESC, CC_Q_DESC(%rbp)
    movl    $0, CC_Q_DESC + 4(%rbp)
    movl    $VQ_AVAIL, CC_Q_DRIVER(%rbp)
    movl    $0, CC_Q_DRIVER + 4(%rbp)
    movl    $VQ_USED, CC_Q_DEVICE(%rbp)
    movl    $0, CC_Q_DEVICE + 4(%rbp)
    cmpl    $0, S_USE_MSIX
    je      5f
    movw    $NO_VECTOR, CC_MSIX_CONFIG(%rbp)
    movw    $0, CC_Q_MSIX(%rbp)
    cmpw    $0, CC_Q_MSIX(%rbp)
    je      5f
    movl    $0, S_USE_MSIX
    SAY     msg_msix_refused
5:  movzwl  CC_Q_NOTIFY_OFF(%rbp), %eax
    imul    S_NOTIFY_MULT, %eax
    add     %rax, S_NOTIFY
    movw    $1, CC_Q_ENABLE(%rbp)

    /* Depth: as asked (default 8), at most MAX_DEPTH and a third of the queue. */
    mov     PB_BLK_DEPTH(%r13), %eax
    test    %eax, %eax
    jnz     6f
    mov     $DEFAULT_DEPTH, %eax
6:  cmp     $MAX_DEPTH, %eax
    jbe     7f
    mov     $MAX_DEPTH, %eax
7:  mov     %eax, %ebx
    mov     S_QSIZE, %eax
    xor     %edx, %edx
    mov     $3, %ecx
    div     %ecx
    cmp     %eax, %ebx
    cmova   %eax, %ebx
    test    %ebx, %ebx
    lea     fail_queue(%rip), %rsi
    jz      fail
    mov     %ebx, S_DEPTH

    movb    $(ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK), CC_STATUS(%rbp)
    testb   $ST_FAILED, CC_STATUS(%rbp)
    lea     fail_driver_ok(%rip), %rsi
    jnz     fail

    SAY     msg_capacity
    mov     C_CAPACITY, %rax
    call    put_dec
    SAY     msg_blk_size
    xor     %eax, %eax
    btq     $F_BLK_SIZE, S_FEATURES
    jnc     8f
    mov     S_DEVCFG, %rax
    mov     0x14(%rax), %eax
8:  call    put_dec
    SAY     msg_seg_max
    xor     %eax, %eax
    btq     $F_SEG_MAX, S_FEATURES
    jnc     9f
    mov     S_DEVCFG, %rax
    mov     0x0c(%rax), %eax
9:  call    put_dec
    SAY     msg_qsize
    mov     S_QSIZE, %eax
    call    put_dec
    SAY     msg_depth
    mov     S_DEPTH, %eax
    call    put_dec
    SAY     msg_region
    mov     C_REGION, %rax
    call    put_dec
    SAY     msg_sectors
    cmpl    $0, S_RO
    je      10f
    SAY     msg_read_only
10: clc
    ret

/* fail - rsi = reason: print "blkcheck: FAILED reason", set FAILED, CF set (from setup_device). */
fail:
    push    %rsi
    SAY     msg_failed
    pop     %rsi
    call    puts
    call    newline
    mov     S_COMMON, %rax
    test    %rax, %rax
    jz      1f
    orb     $ST_FAILED, CC_STATUS(%rax)
1:  stc
    ret

/*
 * setup_msix - program MSI-X table entry 0 (BLK_VECTOR to this LAPIC) and enable MSI-X.
 * Sets S_USE_MSIX, or prints why it polls.  clobbers: rax, rbx, rcx, rdx, rsi, r8, r9
 */
setup_msix:
    movl    $0, S_USE_MSIX
    mov     S_MSIX_CAP, %r9d
    test    %r9d, %r9d
    jz      8f
    lea     4(%r9), %eax
    call    pci_read32                  /* table offset | BIR */
    mov     %eax, %ebx
    and     $7, %eax
    call    bar_address
    test    %rax, %rax
    jz      8f
    and     $~7, %ebx
    add     %rax, %rbx                  /* rbx = table */
    mov     %rbx, %rax
    shr     $32, %rax
    jnz     8f
    mov     APIC_ID(%r15), %eax
    shr     $24, %eax
    mov     %eax, S_APIC_ID
    shl     $12, %eax
    or      $LAPIC_BASE, %eax
    mov     %eax, 0(%rbx)               /* message address */
    movl    $0, 4(%rbx)
    movl    $BLK_VECTOR, 8(%rbx)        /* data: fixed, edge, vector */
    movl    $0, 12(%rbx)                /* unmasked */
    lea     2(%r9), %eax
    call    pci_read16                  /* message control */
    push    %rax
    or      $0x8000, %eax               /* enable */
    and     $~0x4000, %eax              /* no function mask */
    mov     %eax, %ecx
    lea     2(%r9), %eax
    call    pci_write16
    movl    $1, S_USE_MSIX
    SAY     msg_msix
    mov     %rbx, %rax
    call    put_hx
    SAY     msg_entries
    pop     %rax
    and     $0x7ff, %eax
    inc     %eax
    call    put_dec
    SAY     msg_vector
    mov     S_APIC_ID, %eax
    call    put_dec
    jmp     newline
8:  SAY     msg_no_msix
    ret

/* ------------------------------------------------------------------------------------------
 * The workload.
 * ------------------------------------------------------------------------------------------ */

/* start_phase - submit the first requests of the phase in S_PHASE. clobbers: all but r12..r15 */
start_phase:
    movl    $0, S_NEXT
    movl    $0, S_DONE
    cmpl    $PHASE_FLUSH, S_PHASE
    jne     1f
    xor     %ebx, %ebx
    call    submit_flush
    jmp     kick
1:  xor     %ebx, %ebx                  /* ebx = slot */
2:  mov     S_NEXT, %eax
    cmp     S_NREQ, %eax
    jae     kick
    call    submit_next
    inc     %ebx
    cmp     S_DEPTH, %ebx
    jb      2b
    jmp     kick

/*
 * submit_next - slot ebx gets request S_NEXT of the phase (a write is filled first).
 *   clobbers: rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11 (keeps rbx, rbp)
 */
submit_next:
    mov     S_NEXT, %edx
    incl    S_NEXT
    shl     $3, %edx                    /* rdx = first sector */
    mov     $T_IN, %eax
    cmpl    $PHASE_READ, S_PHASE
    je      1f
    push    %rdx
    mov     %ebx, %edi
    shl     $12, %edi
    add     $BUFFERS, %edi
    call    fill_buffer
    pop     %rdx
    mov     $T_OUT, %eax
1:  jmp     submit

/* submit_flush - slot ebx gets a FLUSH. clobbers: as submit */
submit_flush:
    mov     $T_FLUSH, %eax
    xor     %edx, %edx

/*
 * submit - put the request (eax = type, rdx = sector) of slot ebx on the avail ring:
 * descriptors 3*slot (header) -> 3*slot+1 (4 KiB data, not for FLUSH) -> 3*slot+2 (status).
 *   clobbers: rax, rcx, rdx, rsi, rdi
 */
submit:
    mov     %ebx, %edi
    shl     $4, %edi
    add     $REQ_HDRS, %edi             /* rdi = header */
    mov     %eax, 0(%rdi)
    movl    $0, 4(%rdi)
    mov     %rdx, 8(%rdi)
    movb    $0xff, REQ_STATUS(%rbx)
    lea     (%rbx,%rbx,2), %esi         /* esi = head descriptor index */
    mov     %esi, %ecx
    shl     $4, %ecx
    add     $VQ_DESC, %ecx              /* rcx = head descriptor */
    mov     %rdi, 0(%rcx)
    movl    $16, 8(%rcx)
    movw    $D_NEXT, 12(%rcx)
    lea     1(%esi), %edx
    cmp     $T_FLUSH, %eax
    jne     1f
    inc     %edx                        /* FLUSH: straight to the status */
1:  mov     %dx, 14(%rcx)
    mov     %ebx, %edx                  /* data */
    shl     $12, %edx
    add     $BUFFERS, %edx
    mov     %rdx, 16(%rcx)
    movl    $(REQ_SECTORS * 512), 24(%rcx)
    xor     %edx, %edx
    cmp     $T_IN, %eax
    jne     2f
    mov     $D_WRITE, %edx
2:  or      $D_NEXT, %edx
    mov     %dx, 28(%rcx)
    lea     2(%esi), %edx
    mov     %dx, 30(%rcx)
    lea     REQ_STATUS(%rbx), %edx      /* status */
    mov     %rdx, 32(%rcx)
    movl    $1, 40(%rcx)
    movw    $D_WRITE, 44(%rcx)
    movw    $0, 46(%rcx)
    /* avail.ring[idx % qsize] = head; then publish idx + 1 (x86 keeps stores in order). */
    mov     S_AVAIL_IDX, %eax
    mov     S_QSIZE, %ecx
    dec     %ecx
    and     %eax, %ecx
    mov     %si, VQ_AVAIL + 4(,%rcx,2)
    inc     %eax
    mov     %eax, S_AVAIL_IDX
    mov     %ax, VQ_AVAIL + 2
    incl    S_INFLIGHT
    ret

/*
 * kick - notify the device of new avail entries unless it asked not to be (avail_event with
 * RING_EVENT_IDX, else VRING_USED_F_NO_NOTIFY).  clobbers: rax, rcx, rdx
 */
kick:
    lock orl $0, (%rsp)                 /* idx store before the event/flags load */
    mov     S_AVAIL_IDX, %eax           /* new */
    mov     S_KICKED_IDX, %edx          /* old */
    mov     %eax, S_KICKED_IDX
    cmp     %eax, %edx
    je      9f                          /* nothing new */
    cmpl    $0, S_EVENT_IDX
    je      2f
    mov     S_QSIZE, %ecx
    movzwl  VQ_USED + 4(,%rcx,8), %ecx  /* avail_event */
    sub     %edx, %eax                  /* new - old */
    movzwl  %ax, %eax
    mov     S_AVAIL_IDX, %edx
    sub     %ecx, %edx
    dec     %edx                        /* new - event - 1 */
    movzwl  %dx, %edx
    cmp     %eax, %edx
    jae     9f
    jmp     3f
2:  testw   $1, VQ_USED                 /* VRING_USED_F_NO_NOTIFY */
    jnz     9f
3:  mov     S_NOTIFY, %rcx
    movw    $0, (%rcx)                  /* queue 0 */
9:  ret

/*
 * process_used - take every used entry: count it, check its status, verify reads, refill
 * its slot with the next request of the phase, move to the next phase when one is complete.
 *   out: eax = nonzero if anything happened
 *   clobbers: all but r12..r15
 */
process_used:
    xor     %ebp, %ebp                  /* ebp = entries taken */
1:  movzwl  VQ_USED + 2, %eax
    mov     S_LAST_USED, %ecx
    cmp     %ax, %cx
    jne     2f
    cmpl    $0, S_EVENT_IDX             /* caught up: interrupt at the next entry */
    je      8f
    mov     S_QSIZE, %eax
    mov     %cx, VQ_AVAIL + 4(,%rax,2)  /* used_event */
    lock orl $0, (%rsp)
    movzwl  VQ_USED + 2, %eax           /* anything that raced with the store? */
    cmp     %ax, %cx
    je      8f
2:  mov     S_QSIZE, %eax
    dec     %eax
    and     %ecx, %eax
    mov     VQ_USED + 4(,%rax,8), %eax  /* id: head descriptor = 3 * slot */
    xor     %edx, %edx
    mov     $3, %esi
    div     %esi
    mov     %eax, %ebx                  /* ebx = slot */
    inc     %ecx
    movzwl  %cx, %ecx
    mov     %ecx, S_LAST_USED
    inc     %ebp
    decl    S_INFLIGHT
    incq    C_REQUESTS
    incq    S_PASS_REQS
    incl    S_DONE
    movzbl  REQ_STATUS(%rbx), %eax
    test    %eax, %eax
    jz      3f
    call    report_error
    jmp     4f
3:  mov     %ebx, %eax
    shl     $4, %eax
    cmpl    $T_IN, REQ_HDRS(%rax)
    jne     4f
    cmpl    $0, S_RO
    jne     4f
    call    verify_slot
4:  cmpl    $PHASE_FLUSH, S_PHASE       /* refill the slot */
    je      5f
    mov     S_NEXT, %eax
    cmp     S_NREQ, %eax
    jae     5f
    call    submit_next
5:  mov     S_DONE, %eax                /* phase complete? */
    cmpl    $PHASE_FLUSH, S_PHASE
    je      6f
    cmp     S_NREQ, %eax
    jb      1b
    call    next_phase
    jmp     1b
6:  call    pass_done
    jmp     1b
8:  call    kick
    mov     %ebp, %eax
    ret

/*
 * next_phase - after all writes: reads; after all reads: FLUSH (or the pass is done, without
 * BLK_F_FLUSH or on a read-only device, which has nothing to flush).
 */
next_phase:
    cmpl    $PHASE_WRITE, S_PHASE
    jne     1f
    movl    $PHASE_READ, S_PHASE
    jmp     start_phase
1:  cmpl    $0, S_FLUSH
    je      pass_done
    cmpl    $0, S_RO
    jne     pass_done
    movl    $PHASE_FLUSH, S_PHASE
    jmp     start_phase

/*
 * pass_done - the generation is written, verified and flushed: count and report it, end the
 * VM after exit-after passes, else start the next generation.
 */
pass_done:
    push    %rbp
    mov     C_GEN, %rax
    mov     %rax, C_PASSES
    SAY     msg_pass
    mov     C_PASSES, %rax
    call    put_dec
    SAY     msg_requests
    mov     S_PASS_REQS, %rax
    call    put_dec
    SAY     msg_total
    mov     C_REQUESTS, %rax
    call    put_dec
    SAY     msg_errors
    mov     C_ERRORS, %rax
    call    put_dec
    SAY     msg_mismatches
    mov     C_MISMATCHES, %rax
    call    put_dec
    SAY     msg_ticks
    mov     C_TICKS, %rax
    sub     S_PASS_TICKS, %rax
    call    put_dec
    SAY     msg_irqs
    mov     C_IRQS, %rax
    call    put_dec
    call    newline
    pop     %rbp
    mov     PB_EXIT_AFTER(%r13), %eax
    test    %eax, %eax
    jz      1f
    cmp     C_PASSES, %rax
    ja      1f
    mov     PB_EXIT_CODE(%r13), %al
    mov     C_ERRORS, %rcx
    or      C_MISMATCHES, %rcx
    jz      exit_with
    mov     $EXIT_DATA_ERROR, %al
    jmp     exit_with
1:  incq    C_GEN
    movq    $0, S_PASS_REQS
    mov     C_TICKS, %rax
    mov     %rax, S_PASS_TICKS
    movl    $PHASE_WRITE, S_PHASE
    cmpl    $0, S_RO
    je      start_phase
    movl    $PHASE_READ, S_PHASE        /* read-only device: read passes only */
    jmp     start_phase

/* report_error - slot ebx completed with status eax != OK. keeps rbx, rbp */
report_error:
    incq    C_ERRORS
    push    %rax
    SAY     msg_io_error
    pop     %rax
    call    put_dec
    SAY     msg_sector
    mov     %ebx, %eax
    shl     $4, %eax
    mov     REQ_HDRS + 8(%rax), %rax
    call    put_dec
    jmp     newline

/* The expected word i of a sector (pattern_seed: rax = seed for sector rdx, generation C_GEN). */
pattern_seed:
    movabs  $PAT_K1, %rax
    imul    %rdx, %rax
    movabs  $PAT_K2, %rcx
    imul    C_GEN, %rcx
    xor     %rcx, %rax
    ret

/*
 * fill_buffer - write generation C_GEN of sectors rdx..rdx+7 into the buffer at rdi.
 *   clobbers: rax, rcx, rdx, rdi, r8, r9, r10
 */
fill_buffer:
    mov     $REQ_SECTORS, %r9d
    movabs  $PAT_K3, %r10
1:  movabs  $PAT_MAGIC, %rax
    mov     %rax, 0(%rdi)
    mov     %rdx, 8(%rdi)
    mov     C_GEN, %rax
    mov     %rax, 16(%rdi)
    call    pattern_seed
    lea     (%r10,%r10,2), %rcx
    add     %rcx, %rax                  /* word 3 */
    .set    w, 3                        /* unrolled: guest code is slow on nested hosts */
    .rept   61
    mov     %rax, w * 8(%rdi)
    add     %r10, %rax
    .set    w, w + 1
    .endr
    add     $512, %rdi
    inc     %rdx
    dec     %r9d
    jnz     1b
    ret

/*
 * verify_slot - check the 8 sectors read into slot ebx's buffer against generation C_GEN.
 *   clobbers: rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11 (keeps rbx, rbp)
 */
verify_slot:
    push    %rbx
    push    %rbp
    mov     %ebx, %eax
    shl     $4, %eax
    mov     REQ_HDRS + 8(%rax), %rdx    /* rdx = sector */
    mov     %ebx, %edi
    shl     $12, %edi
    add     $BUFFERS, %edi              /* rdi = data */
    mov     $REQ_SECTORS, %ebp
1:  xor     %r11d, %r11d                /* r11 = bad word, 0 = none */
    movabs  $PAT_MAGIC, %rax
    cmp     %rax, 0(%rdi)
    jne     3f
    cmp     %rdx, 8(%rdi)
    jne     3f
    mov     C_GEN, %rax
    cmp     %rax, 16(%rdi)
    jne     3f
    call    pattern_seed
    movabs  $PAT_K3, %r10
    lea     (%r10,%r10,2), %rcx
    add     %rcx, %rax                  /* word 3 */
    mov     %rax, %r8
    .set    w, 3                        /* unrolled fast path */
    .rept   61
    cmp     %rax, w * 8(%rdi)
    jne     2f
    add     %r10, %rax
    .set    w, w + 1
    .endr
    jmp     5f
2:  mov     %r8, %rax                   /* slow path: which word? */
    mov     $3, %ecx
4:  cmp     %rax, (%rdi,%rcx,8)
    jne     6f
    add     %r10, %rax
    inc     %ecx
    jmp     4b                          /* a word differs: the loop ends there */
6:  mov     %ecx, %r11d
3:  call    report_mismatch
5:  add     $512, %rdi
    inc     %rdx
    dec     %ebp
    jnz     1b
    pop     %rbp
    pop     %rbx
    ret

/* report_mismatch - sector rdx at rdi is wrong (r11 = bad word or 0). keeps rdx, rdi */
report_mismatch:
    incq    C_MISMATCHES
    cmpl    $MAX_PRINTED_MISMATCHES, S_PRINTED_MM
    jae     9f
    incl    S_PRINTED_MM
    push    %rdx
    push    %rdi
    push    %r11
    SAY     msg_mismatch
    mov     16(%rsp), %rax
    call    put_dec
    SAY     msg_expected
    mov     C_GEN, %rax
    call    put_dec
    SAY     msg_found_sector
    mov     8(%rsp), %rdi
    mov     8(%rdi), %rax
    call    put_dec
    SAY     msg_gen
    mov     8(%rsp), %rdi
    mov     16(%rdi), %rax
    call    put_dec
    pop     %r11
    test    %r11d, %r11d
    jz      1f
    SAY     msg_word
    mov     %r11, %rax
    call    put_dec
1:  call    newline
    pop     %rdi
    pop     %rdx
9:  ret

/* ------------------------------------------------------------------------------------------
 * Output helpers (puts, put_dec, put_hex_digits come from lib.inc / console.inc).
 * ------------------------------------------------------------------------------------------ */
/* newline / putc - "\n" / the byte in al to COM1. clobbers: rdx (and rax for newline) */
newline:
    mov     $'\n', %al
putc:
    mov     $SERIAL_PORT, %dx
    out     %al, %dx
    ret

/* put_hx - "0x" and the hex digits of rax without leading zeros. clobbers: rax, rcx, rdx, r8 */
put_hx:
    mov     %rax, %r8
    mov     $'0', %al
    call    putc
    mov     $'x', %al
    call    putc
    xor     %ecx, %ecx                  /* 0: one digit */
    test    %r8, %r8
    jz      1f
    bsr     %r8, %rcx                   /* highest set bit -> its digit's position */
    and     $~3, %ecx
1:  jmp     put_hex_digits

/* put_devfn - "00:DD.F" of S_BDF. clobbers: rax, rcx, rdx, r8 */
put_devfn:
    mov     $'0', %al
    call    putc
    call    putc
    mov     $':', %al
    call    putc
    mov     S_BDF, %r8d
    shr     $11, %r8d
    and     $0x1f, %r8d
    mov     $4, %ecx
    call    put_hex_digits
    mov     $'.', %al
    call    putc
    mov     S_BDF, %r8d
    shr     $8, %r8d
    and     $7, %r8d
    xor     %ecx, %ecx
    jmp     put_hex_digits

/* put_ids - "VVVV:DDDD" of eax = device << 16 | vendor. clobbers: rax, rcx, rdx, r8 */
put_ids:
    mov     %eax, %r8d
    push    %r8
    and     $0xffff, %r8d
    mov     $12, %ecx
    call    put_hex_digits
    mov     $':', %al
    call    putc
    pop     %r8
    shr     $16, %r8d
    mov     $12, %ecx
    jmp     put_hex_digits

msg_pci:            .asciz  "blkcheck: pci "
msg_no_caps:        .asciz  "blkcheck: virtio device without the modern capabilities, skipped\n"
msg_no_device:      .asciz  "blkcheck: no virtio-blk device found\n"
msg_found:          .asciz  "blkcheck: virtio-blk "
msg_common:         .asciz  " common "
msg_notify:         .asciz  " notify "
msg_isr:            .asciz  " isr "
msg_devcfg:         .asciz  " device "
msg_msix:           .asciz  "blkcheck: msix table "
msg_entries:        .asciz  " entries "
msg_vector:         .asciz  " vector 0x41 apic "
msg_no_msix:        .asciz  "blkcheck: msix unavailable, polling\n"
msg_msix_refused:   .asciz  "blkcheck: msix vector not accepted, polling\n"
msg_features:       .asciz  "blkcheck: features device "
msg_driver:         .asciz  " driver "
msg_event_idx:      .asciz  " event-idx "
msg_flush:          .asciz  " flush "
msg_ro:             .asciz  " ro "
msg_capacity:       .asciz  "blkcheck: capacity "
msg_blk_size:       .asciz  " sectors blk-size "
msg_seg_max:        .asciz  " seg-max "
msg_qsize:          .asciz  " queue-size "
msg_depth:          .asciz  " depth "
msg_region:         .asciz  " region "
msg_sectors:        .asciz  " sectors\n"
msg_verify_first:   .asciz  "blkcheck: first pass verifies the disk's generation "
msg_read_only:      .asciz  "blkcheck: device is read-only: read passes only, no writes\n"
msg_pass:           .asciz  "blkcheck: pass "
msg_requests:       .asciz  " done requests "
msg_total:          .asciz  " total "
msg_errors:         .asciz  " errors "
msg_mismatches:     .asciz  " mismatches "
msg_ticks:          .asciz  " ticks "
msg_irqs:           .asciz  " irqs "
msg_io_error:       .asciz  "blkcheck: I/O error status "
msg_sector:         .asciz  " sector "
msg_mismatch:       .asciz  "blkcheck: MISMATCH sector "
msg_expected:       .asciz  " expected gen "
msg_found_sector:   .asciz  " found sector "
msg_gen:            .asciz  " gen "
msg_word:           .asciz  " word "
msg_failed:         .asciz  "blkcheck: FAILED "
fail_high_bar:      .asciz  "a virtio structure is above 4 GiB (not mapped)"
fail_reset:         .asciz  "the device did not reset"
fail_version:       .asciz  "the device does not offer VIRTIO_F_VERSION_1"
fail_features:      .asciz  "the device did not accept the features (FEATURES_OK)"
fail_small:         .asciz  "the disk is smaller than 4 KiB"
fail_queue:         .asciz  "queue 0 is not available"
fail_driver_ok:     .asciz  "the device failed at DRIVER_OK"

    .include "lib.inc"
