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
 *                     left on the disk by an earlier run; the next pass writes G + 1),
 *                     blkcheck.intx=1 (INTx instead of MSI-X, as `irq=intx` below),
 *                     blkcheck.order=random and blkcheck.bs=NK (as `order=`, `bs=` below).
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
 *      entries), MSI-X entry 0 (address 0xfee00000 | APIC id << 12, vector VIRTIO_VECTOR) as the
 *      queue's vector, DRIVER_OK. Without MSI-X (no capability, or the vector does not read
 *      back) it polls and says so. With `--guest blkcheck,irq=intx` (parameter block
 *      PB_BLK_INTX) it leaves MSI-X off and INTx on, reads the interrupt line from the
 *      configuration space and routes that IOAPIC pin (level, active low) to VIRTIO_VECTOR; its
 *      interrupt handler reads the ISR, then EOIs;
 *   3. runs passes over the region (the first min(capacity, 16 MiB) of the disk, in 4 KiB
 *      requests, `depth` in flight): write generation G into every sector, read every sector
 *      back and verify it, FLUSH (when offered), G += 1. Read-only devices get read-only passes
 *      without verification. `bs=8K|16K|32K|64K` (PB_BLK_BS_KIB) makes the requests larger
 *      (the region is then a whole number of them); `order=random` (PB_BLK_RANDOM) has both
 *      passes visit the requests in a full-period permutation, j -> (j * K + C) mod 2^n with K
 *      odd and 2^n the next power of two >= the requests, skipping the ones past the region,
 *      so every request is still made once per phase.
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
 *   blkcheck: intx pin 1 line L vector 0x41 apic A   (irq=intx instead of the msix line)
 *   blkcheck: features device 0x.. driver 0x.. event-idx E flush F ro R
 *   blkcheck: capacity C sectors blk-size B seg-max M queue-size Q depth D region R sectors
 *   blkcheck: request size B bytes order sequential|random     (only when not the defaults)
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
 * 0x40000..0x7ffff data buffers (4 KiB per slot, at most 64 slots; with bs > 4K, one request
 * per slot at 0x200000..0x5fffff instead, RAM the VMM's 16 MiB minimum has), and for the bzImage only
 * 0x80000..0x85fff page tables and a stack below 0x90000.
 *
 * PCI enumeration (pci.inc), the virtio PCI transport and virtqueue routines (virtio.inc) and the
 * bzImage boot (bzimage.inc) are shared with the netcheck guest.
 *
 * Uses only instructions KVM's x86 emulator knows (no mfence: `lock orl` is the full barrier).
 */

    .include "abi.inc"
    .include "pci.inc"
    .set VIRTIO_ST,         0x30100     /* shared virtio driver state (virtio.inc) */
    .include "virtio.inc"

    .set PB_BLK_DEPTH,      0x30        /* u32 requests in flight, 0 = default (the VMM) */
    .set PB_BLK_VERIFY,     0x34        /* u32 generation the first pass verifies, 0 = none */
    .set PB_BLK_INTX,       0x38        /* u32 nonzero: INTx, not MSI-X (blkcheck,irq=intx) */
    .set PB_BLK_RANDOM,     0x3c        /* u32 nonzero: order=random */
    .set PB_BLK_BS_KIB,     0x44        /* u32 request size in KiB, 0 = 4 (bs=N) */
    .set PB_VIRTIO_INTX,    PB_BLK_INTX
    .set DEFAULT_DEPTH,     8
    .set MAX_DEPTH,         64
    .set MAX_QUEUE,         256
    .set REGION_LIMIT,      32768       /* sectors: 16 MiB */
    .set DEFAULT_BS,        4096        /* bytes per request */
    .set MAX_BS,            65536
    .set PERM_K,            0x9e3779b1  /* order=random: block i -> (i * K + C) mod N, K odd */
    .set PERM_C,            0x5bd1e995
    .set VIRTIO_VECTOR,     0x41
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
    .set COUNTERS_START,    BK_COUNTERS
    .set COUNTERS_END,      ST_END
    .set COUNTERS_MAGIC,    PAT_MAGIC

    /* Driver state (private; the shared part is at VIRTIO_ST = 0x30100). */
    .set ST,                0x30180
    .set S_DEPTH,           ST + 0x00   /* u32 */
    .set S_NREQ,            ST + 0x04   /* u32 requests per phase */
    .set S_INFLIGHT,        ST + 0x08   /* u32 */
    .set S_NEXT,            ST + 0x0c   /* u32 next request index of the phase */
    .set S_DONE,            ST + 0x10   /* u32 completed requests of the phase */
    .set S_PHASE,           ST + 0x14   /* u32 PHASE_* */
    .set S_RO,              ST + 0x18   /* u32 */
    .set S_PRINTED_MM,      ST + 0x1c   /* u32 mismatch lines printed */
    .set S_PASS_REQS,       ST + 0x20   /* u64 requests completed in this pass */
    .set S_PASS_TICKS,      ST + 0x28   /* u64 ticks at the start of this pass */
    .set S_FLUSH,           ST + 0x30   /* u32 BLK_F_FLUSH negotiated */
    .set S_PERM_J,          ST + 0x34   /* u32 order=random: next index of the permutation */
    .set S_REQ_SECTORS,     ST + 0x38   /* u32 sectors per request */
    .set S_RANDOM,          ST + 0x3c   /* u32 order=random: permutation size - 1, else 0 */
    .set BQ,                ST + 0x40   /* queue 0 (virtio.inc Q_*) */
    .set S_QSIZE,           BQ + Q_SIZE
    .set ST_END,            BQ + Q_STRUCT_SIZE
    .set PHASE_WRITE,       0
    .set PHASE_READ,        1
    .set PHASE_FLUSH,       2

    /* Virtqueue and request memory. */
    .set VQ_DESC,           0x31000     /* 16 * 256 */
    .set VQ_AVAIL,          0x32000     /* flags, idx, ring[256], used_event */
    .set VQ_USED,           0x33000     /* flags, idx, ring[256] (8 bytes), avail_event */
    .set REQ_HDRS,          0x34000     /* 16 bytes per slot: type, reserved, sector */
    .set REQ_STATUS,        0x34800     /* 1 byte per slot */
    .set BUFFERS,           0x40000     /* 4 KiB requests: 4 KiB per slot */
    .set BIG_BUFFERS,       0x200000    /* larger requests: one request per slot, up to 4 MiB */

    /* virtio-blk */
    .set VIRTIO_DEVICE_MODERN, 0x1042
    .set VIRTIO_DEVICE_TRANS,  0x1001
    .set F_SEG_MAX,         2
    .set F_RO,              5
    .set F_BLK_SIZE,        6
    .set F_FLUSH,           9
    .set WANTED_FEATURES,   (1 << F_SEG_MAX) | (1 << F_RO) | (1 << F_BLK_SIZE) | (1 << F_FLUSH) | (1 << F_EVENT_IDX)
    .set T_IN,              0           /* read */
    .set T_OUT,             1           /* write */
    .set T_FLUSH,           4

    /* Sector pattern. */
    .set PAT_MAGIC,         0x4b434548434b4c42
    .set PAT_K1,            0x9e3779b97f4a7c15
    .set PAT_K2,            0xc2b2ae3d27d4eb4f
    .set PAT_K3,            0x165667b19e3779f9

.ifdef BZIMAGE
    .include "bzimage.inc"
    BZ_BOOT "cpr-vmm blkcheck 1"
bz_options:
    BZ_OPTION "blkcheck.depth=", PB_BLK_DEPTH
    BZ_OPTION "blkcheck.passes=", PB_EXIT_AFTER
    BZ_OPTION "blkcheck.exit_code=", PB_EXIT_CODE
    BZ_OPTION "blkcheck.verify=", PB_BLK_VERIFY
    BZ_OPTION "blkcheck.intx=", PB_BLK_INTX
    BZ_OPTION "blkcheck.bs=", PB_BLK_BS_KIB
    lea     1f(%rip), %rsi              /* blkcheck.order=random: a flag, not a number */
    call    option_value
    jc      2f
    movl    $1, BZ_PARAMS + PB_BLK_RANDOM
    jmp     2f
1:  .asciz  "blkcheck.order=random"
2:
    BZ_START blk_start

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
    call    driver_start
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
    call    driver_idle
    jmp     main_loop

/*
 * setup_device - enable the function, MSI-X, negotiate (virtio.inc), read the configuration,
 * configure queue 0, DRIVER_OK.
 *   out: CF clear on success; CF set after printing "blkcheck: FAILED ..."
 *   clobbers: everything but r12..r15
 */
setup_device:
    mov     PB_BLK_BS_KIB(%r13), %eax   /* bs: 4, 8, 16, 32 or 64 KiB */
    test    %eax, %eax
    jnz     1f
    mov     $(DEFAULT_BS / 1024), %eax
1:  shl     $10, %eax
    lea     fail_bs(%rip), %rsi
    cmp     $DEFAULT_BS, %eax
    jb      fail
    cmp     $MAX_BS, %eax
    ja      fail
    lea     -1(%rax), %ecx
    test    %eax, %ecx
    jnz     fail
    shr     $9, %eax
    mov     %eax, S_REQ_SECTORS
    call    virtio_begin                /* rbp = common configuration */
    jc      99f
    mov     S_FEATURES, %rax
    xor     %ecx, %ecx
    bt      $F_FLUSH, %rax
    setc    %cl
    mov     %ecx, S_FLUSH
    bt      $F_RO, %rax
    setc    %cl
    mov     %ecx, S_RO

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
    mov     S_REQ_SECTORS, %ecx
    xor     %edx, %edx
    div     %ecx                        /* eax = requests per phase */
    mov     %eax, S_NREQ
    test    %eax, %eax
    lea     fail_small(%rip), %rsi
    jz      fail
    imul    S_REQ_SECTORS, %eax
    mov     %rax, C_REGION
    xor     %edx, %edx                  /* order=random: permutation of the next power of */
    cmpl    $0, PB_BLK_RANDOM(%r13)     /* two >= requests, mask in S_RANDOM */
    je      4f
    mov     S_NREQ, %eax
    dec     %eax
    jz      4f
    bsr     %eax, %ecx
    inc     %ecx
    mov     $1, %edx
    shl     %cl, %edx
    dec     %edx
4:  mov     %edx, S_RANDOM

    mov     $BQ, %edi                   /* queue 0 */
    xor     %eax, %eax
    mov     $VQ_DESC, %edx
    call    virtio_queue
    jc      99f

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
    lea     fail_small_queue(%rip), %rsi
    jz      fail
    mov     %ebx, S_DEPTH

    call    virtio_driver_ok
    jc      99f

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
    cmpl    $(DEFAULT_BS / 512), S_REQ_SECTORS  /* the defaults print nothing more */
    jne     11f
    cmpl    $0, PB_BLK_RANDOM(%r13)
    je      12f
11: SAY     msg_bs
    mov     S_REQ_SECTORS, %eax
    shl     $9, %eax
    call    put_dec
    lea     msg_sequential(%rip), %rsi
    cmpl    $0, PB_BLK_RANDOM(%r13)
    je      13f
    lea     msg_random(%rip), %rsi
13: call    puts
    call    newline
12: cmpl    $0, S_RO
    je      10f
    SAY     msg_read_only
10: clc
99: ret

/* ------------------------------------------------------------------------------------------
 * The workload.
 * ------------------------------------------------------------------------------------------ */

/* start_phase - submit the first requests of the phase in S_PHASE. clobbers: all but r12..r15 */
start_phase:
    movl    $0, S_NEXT
    movl    $0, S_PERM_J
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
    mov     S_NEXT, %edx                /* edx = request index */
    incl    S_NEXT
    mov     S_RANDOM, %ecx
    test    %ecx, %ecx
    jz      2f
3:  mov     S_PERM_J, %edx              /* order=random: j -> (j * K + C) mod 2^n, skipping */
    incl    S_PERM_J                    /* the ones past the region */
    imul    $PERM_K, %edx, %edx
    add     $PERM_C, %edx
    and     %ecx, %edx
    cmp     S_NREQ, %edx
    jae     3b
2:  imul    S_REQ_SECTORS, %edx         /* rdx = first sector */
    mov     $T_IN, %eax
    cmpl    $PHASE_READ, S_PHASE
    je      1f
    push    %rdx
    call    slot_buffer
    call    fill_buffer
    pop     %rdx
    mov     $T_OUT, %eax
1:  jmp     submit

/* slot_buffer - rdi = the data buffer of slot ebx (one request). clobbers: nothing else */
slot_buffer:
    mov     %ebx, %edi
    imul    S_REQ_SECTORS, %edi
    shl     $9, %edi
    add     $BUFFERS, %edi
    cmpl    $(DEFAULT_BS / 512), S_REQ_SECTORS
    je      1f
    add     $(BIG_BUFFERS - BUFFERS), %edi
1:  ret

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
    call    slot_buffer                 /* data */
    mov     %rdi, 16(%rcx)
    mov     S_REQ_SECTORS, %edx
    shl     $9, %edx
    mov     %edx, 24(%rcx)
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
    mov     $BQ, %edi
    call    vq_push
    incl    S_INFLIGHT
    ret

/* kick - notify the device of queue 0's new requests (vq_kick). clobbers: rax, rcx, rdx, rdi */
kick:
    mov     $BQ, %edi
    jmp     vq_kick

/*
 * process_used - take every used entry: count it, check its status, verify reads, refill
 * its slot with the next request of the phase, move to the next phase when one is complete.
 *   out: eax = nonzero if anything happened
 *   clobbers: all but r12..r15
 */
process_used:
    xor     %ebp, %ebp                  /* ebp = entries taken */
1:  mov     $BQ, %edi
    call    vq_next_used
    jc      8f
    xor     %edx, %edx                  /* id: head descriptor = 3 * slot */
    mov     $3, %esi
    div     %esi
    mov     %eax, %ebx                  /* ebx = slot */
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
 * fill_buffer - write generation C_GEN of the request's sectors rdx.. into the buffer at rdi.
 *   clobbers: rax, rcx, rdx, rdi, r8, r9, r10
 */
fill_buffer:
    mov     S_REQ_SECTORS, %r9d
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
 * verify_slot - check the sectors read into slot ebx's buffer against generation C_GEN.
 *   clobbers: rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11 (keeps rbx, rbp)
 */
verify_slot:
    push    %rbx
    push    %rbp
    mov     %ebx, %eax
    shl     $4, %eax
    mov     REQ_HDRS + 8(%rax), %rdx    /* rdx = sector */
    call    slot_buffer                 /* rdi = data */
    mov     S_REQ_SECTORS, %ebp
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
fail_small:         .asciz  "the disk is smaller than one request"
fail_bs:            .asciz  "bs must be 4K, 8K, 16K, 32K or 64K"
msg_bs:             .asciz  "blkcheck: request size "
msg_sequential:     .asciz  " bytes order sequential"
msg_random:         .asciz  " bytes order random"
fail_small_queue:   .asciz  "queue 0 is too small for one request"

/* PCI enumeration and the virtio transport, shared with netcheck.S. */
    PCI_ROUTINES "blkcheck: "
    PRINT_HELPERS
    VIRTIO_ROUTINES "blkcheck: ", "virtio-blk"

    .include "lib.inc"
