/*
 * netcheck.S - cpr-vmm built-in guest "netcheck": a virtio-net driver (virtio 1.x, modern PCI
 * transport) that echoes the host's numbered frames and sends its own at a steady rate.
 *
 * Built twice from this one source (vmm/build.rs), like blkcheck.S:
 *   netcheck.bin      flat built-in guest, loaded at 0x10000 by the VMM (`--guest netcheck`);
 *                     the timer rate (`hz=`, default 100 for netcheck) is its sending rate;
 *                     exit-after counts the frames it sent.
 *   netcheck.bzImage  the same driver as a bzImage (--defsym BZIMAGE=1, linked by
 *                     blkcheck-bz.ld) that QEMU boots with -kernel. Kernel command-line
 *                     options: netcheck.frames=N (exit after sending N frames),
 *                     netcheck.exit_code=N. The LAPIC timer runs at 100 Hz (1 GHz APIC bus).
 *
 * The driver (vCPU 0 only; other vCPUs halt):
 *   1. finds vendor 0x1af4 device 0x1041 (or transitional 0x1000 with the modern
 *      capabilities) on PCI bus 0 (pci.inc, virtio.inc: no hard-coded addresses), negotiates
 *      VERSION_1 (required) and, when offered, MAC, STATUS, MRG_RXBUF and RING_EVENT_IDX, reads
 *      the MAC (52:54:00:12:34:56 without VIRTIO_NET_F_MAC), sets up queue 0 (receive) and
 *      queue 1 (transmit) on MSI-X entry 0 (vector 0x42), DRIVER_OK;
 *   2. keeps the receive queue full of 2 KiB buffers (one descriptor each; with MRG_RXBUF a
 *      frame spanning num_buffers > 1 buffers has its continuation buffers given back too);
 *   3. every frame received with ethertype 0x88b5, magic "NETCHECK" and kind HOST is echoed
 *      to its sender (dst = its src, src = our MAC) as kind ECHO with our echo counter filled
 *      in (sequence number and host timestamp kept); host sequence numbers are checked: one
 *      above the last is in order, higher is a gap (the missing ones are counted and printed),
 *      equal or lower is a duplicate (counted and printed). The first host frame sets the base;
 *   4. on every timer tick it sends one frame of kind GUEST, numbered 1, 2, 3, ... to the
 *      broadcast address, and every 100 frames prints a progress line.
 * A frame is echoed only when a transmit slot is free: otherwise it stays in the used ring
 * until one is, so no frame is dropped by the guest.
 *
 * All driver state lives in RAM (below) or is re-read from the device, so a save/restore of RAM,
 * vCPU and device state continues the run.
 *
 * Frame (64 bytes on the wire, little-endian fields; tests/src/netcheck.rs has the same layout):
 *   +0 dst[6] +6 src[6] +12 ethertype 0x88b5 (big-endian) +14 u64 magic "NETCHECK"
 *   +22 u32 kind (1 HOST, 2 ECHO, 3 GUEST) +26 u32 0 +30 u64 seq (host's for HOST and ECHO,
 *   the guest's own for GUEST) +38 u64 echo counter (ECHO: 1, 2, 3, ...) +46 u64 host
 *   timestamp (opaque, echoed back) +54..63 zero
 *
 * Console lines (COM1):
 *   netcheck: pci 00:DD.F VVVV:DDDD                  every function found on bus 0
 *   netcheck: no virtio-net device found             then exit status EXIT_NO_DEVICE
 *   netcheck: virtio-net 00:DD.F common 0x.. notify 0x.. isr 0x.. device 0x..
 *   netcheck: msix table 0x.. entries N vector 0x42 apic A   (or "... polling")
 *   netcheck: features device 0x.. driver 0x.. event-idx E mrg-rxbuf M
 *   netcheck: mac XX:XX:XX:XX:XX:XX rx-queue Q rx-buffers B tx-queue T tx-slots S
 *   netcheck: ready
 *   netcheck: sent N echoed E host H gaps G dups D other O irqs I
 *                                                    every 100 frames sent
 *   netcheck: GAP host seq expected X got Y
 *   netcheck: DUPLICATE host seq Y last L
 *   netcheck: FAILED <reason>                        then exit status EXIT_DEVICE_ERROR
 *
 * Exit statuses (port 0x501): after exit-after frames sent, the parameter block's exit code if
 * no gap and no duplicate was seen, else EXIT_DATA_ERROR (0x22); EXIT_NO_DEVICE (0x20) when no
 * device is found; EXIT_DEVICE_ERROR (0x21) when the device cannot be driven.
 *
 * Counters block at NC_COUNTERS = 0x30000 (u64 each, written only by the guest; host tests read
 * it with pmemsave or from the memfd; vmm/src/boot/mod.rs NETCHECK_COUNTERS_ADDR):
 *   +0x00 magic "NETCHECK"   +0x08 host frames received  +0x10 echoes sent
 *   +0x18 guest frames sent  +0x20 last host seq         +0x28 host seqs missing (gaps)
 *   +0x30 host duplicates    +0x38 other frames received +0x40 timer ticks
 *   +0x48 state (0 starting, 1 running, 2 no device, 3 failed)   +0x50 queue interrupts
 *   +0x58 frames in more than one buffer                 +0x60 transmissions completed
 *   +0x68 first host seq
 *
 * Memory used below 1 MiB (free in both formats): 0x2f000 bzImage parameter block,
 * 0x30000..0x36fff counters, driver state and the two virtqueues, 0x40000..0x5ffff receive
 * buffers (2 KiB each, at most 64), 0x60000..0x61fff transmit slots (256 bytes each, at most
 * 32), and for the bzImage only 0x80000..0x85fff page tables and a stack below 0x90000.
 *
 * Uses only instructions KVM's x86 emulator knows (no mfence: `lock orl` is the full barrier).
 */

    .include "abi.inc"
    .include "pci.inc"
    .set VIRTIO_ST,         0x30100     /* shared virtio driver state (virtio.inc) */
    .include "virtio.inc"

    .set MAX_QUEUE,         256
    .set MAX_RX_BUFFERS,    64
    .set RX_BUF_SIZE,       2048
    .set MAX_TX_SLOTS,      32
    .set TX_SLOT_SIZE,      256
    .set VIRTIO_VECTOR,     0x42
    .set PROGRESS_EVERY,    100
    .set MAX_PRINTED_ERRORS, 20

    .set EXIT_NO_DEVICE,    0x20
    .set EXIT_DEVICE_ERROR, 0x21
    .set EXIT_DATA_ERROR,   0x22

    /* Counters block. */
    .set NC_COUNTERS,       0x30000
    .set C_MAGIC,           NC_COUNTERS + 0x00
    .set C_HOST,            NC_COUNTERS + 0x08
    .set C_ECHOED,          NC_COUNTERS + 0x10
    .set C_SENT,            NC_COUNTERS + 0x18
    .set C_LAST_SEQ,        NC_COUNTERS + 0x20
    .set C_GAPS,            NC_COUNTERS + 0x28
    .set C_DUPS,            NC_COUNTERS + 0x30
    .set C_OTHER,           NC_COUNTERS + 0x38
    .set C_TICKS,           NC_COUNTERS + 0x40
    .set C_STATE,           NC_COUNTERS + 0x48
    .set C_IRQS,            NC_COUNTERS + 0x50
    .set C_MERGED,          NC_COUNTERS + 0x58
    .set C_TX_DONE,         NC_COUNTERS + 0x60
    .set C_FIRST_SEQ,       NC_COUNTERS + 0x68

    /* Driver state (private; the shared part is at VIRTIO_ST = 0x30100). */
    .set ST,                0x30180
    .set S_MAC,             ST + 0x00   /* 6 bytes (+2 padding) */
    .set S_MRG,             ST + 0x08   /* u32 MRG_RXBUF negotiated */
    .set S_RX_BUFS,         ST + 0x0c   /* u32 receive buffers posted */
    .set S_TX_SLOTS,        ST + 0x10   /* u32 transmit slots */
    .set S_TX_FREE,         ST + 0x14   /* u32 free slots (entries on the free stack) */
    .set S_RX_SKIP,         ST + 0x18   /* u32 continuation buffers still to take */
    .set S_SENT_TICK,       ST + 0x20   /* u64 C_TICKS when we last sent */
    .set S_PRINTED,         ST + 0x28   /* u32 gap/duplicate lines printed */
    .set S_BUSY,            ST + 0x2c   /* u32 the main loop's pass did something */
    .set RXQ,               ST + 0x40   /* queue 0 (virtio.inc Q_*) */
    .set TXQ,               ST + 0x80   /* queue 1 */
    .set TX_FREE_STACK,     0x30300     /* u32 slot numbers, MAX_TX_SLOTS of them */
    .set COUNTERS_START,    NC_COUNTERS
    .set COUNTERS_END,      TX_FREE_STACK + 4 * MAX_TX_SLOTS
    .set COUNTERS_MAGIC,    NC_MAGIC

    /* Virtqueues and buffers. */
    .set RX_DESC,           0x31000     /* + avail ring 0x32000, used ring 0x33000 */
    .set TX_DESC,           0x34000     /* + avail ring 0x35000, used ring 0x36000 */
    .set RX_BUFFERS,        0x40000
    .set TX_SLOTS,          0x60000

    /* virtio-net */
    .set VIRTIO_DEVICE_MODERN, 0x1041
    .set VIRTIO_DEVICE_TRANS,  0x1000
    .set F_MAC,             5
    .set F_MRG_RXBUF,       15
    .set F_STATUS,          16
    .set WANTED_FEATURES,   (1 << F_MAC) | (1 << F_MRG_RXBUF) | (1 << F_STATUS) | (1 << F_EVENT_IDX)
    .set NET_HDR_SIZE,      12          /* virtio_net_hdr with num_buffers (VERSION_1) */
    .set HDR_NUM_BUFFERS,   10

    /* Our frames. */
    .set FRAME_LEN,         64
    .set F_DST,             0
    .set F_SRC,             6
    .set F_TYPE,            12
    .set F_MAGIC,           14
    .set F_KIND,            22
    .set F_SEQ,             30
    .set F_ECHO,            38
    .set F_STAMP,           46
    .set ETHERTYPE_LE,      0xb588      /* 0x88b5 as stored, read as a little-endian u16 */
    .set KIND_HOST,         1
    .set KIND_ECHO,         2
    .set KIND_GUEST,        3
    .set NC_MAGIC,          0x4b4345484354454e  /* "NETCHECK" little-endian */

.ifndef BZIMAGE
    .text
    .code64
    .globl  _start
_start:                                 /* the flat image's first byte */
    jmp     net_start
.else
    .include "bzimage.inc"
    BZ_BOOT "cpr-vmm netcheck 1"
bz_options:
    BZ_OPTION "netcheck.frames=", PB_EXIT_AFTER
    BZ_OPTION "netcheck.exit_code=", PB_EXIT_CODE
    BZ_START net_start
.endif

net_start:
    call    driver_start                /* vCPU 0, device found and set up */
    SAY     msg_ready
    mov     C_TICKS, %rax
    mov     %rax, S_SENT_TICK

/*
 * The main loop: take received frames (echo them), take finished transmissions, send our own
 * frame when the timer ticked, sleep until the next interrupt.
 */
main_loop:
    cli
    movl    $0, S_BUSY
    call    process_tx
    or      %eax, S_BUSY
    call    process_rx
    or      %eax, S_BUSY
    call    maybe_send
    or      %eax, S_BUSY
    mov     $RXQ, %edi
    call    vq_kick
    mov     $TXQ, %edi
    call    vq_kick
    cmpl    $0, S_BUSY
    jne     main_loop                   /* progress: look again before sleeping */
    call    driver_idle
    jmp     main_loop

/*
 * process_tx - return every finished transmission's slot to the free stack.
 *   out: eax = nonzero if anything happened.  clobbers: rax, rcx, rdx, rdi, rsi
 */
process_tx:
    xor     %esi, %esi
1:  mov     $TXQ, %edi
    call    vq_next_used
    jc      2f
    mov     S_TX_FREE, %ecx             /* id = slot */
    mov     %eax, TX_FREE_STACK(,%rcx,4)
    incl    S_TX_FREE
    incq    C_TX_DONE
    inc     %esi
    jmp     1b
2:  mov     %esi, %eax
    ret

/*
 * process_rx - take received frames while a transmit slot is free (an echo may need it):
 * check and echo ours, count others, give every buffer back to the device.
 *   out: eax = nonzero if anything happened.  clobbers: all but r12..r15
 */
process_rx:
    xor     %ebp, %ebp                  /* ebp = buffers taken */
1:  cmpl    $0, S_TX_FREE
    je      9f                          /* no slot for an echo: later */
    mov     $RXQ, %edi
    call    vq_next_used
    jc      9f
    inc     %ebp
    mov     %eax, %ebx                  /* ebx = buffer = descriptor index */
    cmpl    $0, S_RX_SKIP
    je      2f
    decl    S_RX_SKIP                   /* a continuation buffer of a merged frame */
    jmp     8f
2:  mov     %ebx, %esi
    shl     $11, %esi
    add     $RX_BUFFERS, %esi           /* rsi = header, then the frame */
    cmpl    $0, S_MRG
    je      3f
    movzwl  HDR_NUM_BUFFERS(%rsi), %eax
    cmp     $1, %eax
    jbe     3f
    dec     %eax
    mov     %eax, S_RX_SKIP
    incq    C_MERGED
3:  sub     $NET_HDR_SIZE, %edx         /* edx = frame length */
    jb      7f
    cmp     $FRAME_LEN, %edx
    jb      7f
    add     $NET_HDR_SIZE, %rsi         /* rsi = frame */
    cmpw    $ETHERTYPE_LE, F_TYPE(%rsi)
    jne     7f
    movabs  $NC_MAGIC, %rax
    cmp     %rax, F_MAGIC(%rsi)
    jne     7f
    cmpl    $KIND_HOST, F_KIND(%rsi)
    jne     7f
    call    check_seq
    call    echo
    cmp     $1, %ebp                    /* the first echo of a pass leaves at once: a burst */
    jne     8f                          /* (frames that waited through a live update) does */
    mov     $TXQ, %edi                  /* not hold it back until the whole burst is echoed */
    call    vq_kick
    jmp     8f
7:  incq    C_OTHER
8:  mov     %ebx, %esi                  /* the buffer goes back to the device */
    mov     $RXQ, %edi
    call    vq_push
    jmp     1b
9:  mov     %ebp, %eax
    ret

/*
 * check_seq - account the host sequence number of the frame at rsi. keeps rbx, rbp, rsi
 *   clobbers: rax, rcx, rdx, rdi, r8
 */
check_seq:
    incq    C_HOST
    mov     F_SEQ(%rsi), %rax
    cmpq    $0, C_FIRST_SEQ
    jne     1f
    mov     %rax, C_FIRST_SEQ           /* the first one sets the base */
    jmp     5f
1:  mov     C_LAST_SEQ, %rcx
    lea     1(%rcx), %rdx
    cmp     %rdx, %rax
    je      5f                          /* in order */
    jb      3f                          /* not above the last: a duplicate */
    mov     %rax, %rdi                  /* a gap: seq - last - 1 missing */
    sub     %rdx, %rdi
    add     %rdi, C_GAPS
    call    may_print
    jc      5f
    push    %rsi
    push    %rax
    push    %rdx
    SAY     msg_gap
    pop     %rax
    call    put_dec
    SAY     msg_got
    mov     (%rsp), %rax
    call    put_dec
    call    newline
    pop     %rax
    pop     %rsi
    jmp     5f
3:  incq    C_DUPS
    call    may_print
    jc      4f
    push    %rsi
    push    %rax
    push    %rcx
    SAY     msg_dup
    mov     8(%rsp), %rax
    call    put_dec
    SAY     msg_last
    mov     (%rsp), %rax
    call    put_dec
    call    newline
    pop     %rcx
    pop     %rax
    pop     %rsi
4:  ret                                 /* the last stays the highest seen */
5:  mov     %rax, C_LAST_SEQ
    ret

/* may_print - CF clear if another gap/duplicate line may be printed. clobbers: nothing else */
may_print:
    cmpl    $MAX_PRINTED_ERRORS, S_PRINTED
    jae     1f
    incl    S_PRINTED
    clc
    ret
1:  stc
    ret

/*
 * echo - send the HOST frame at rsi back to its sender as an ECHO with our next echo counter.
 * A transmit slot is free (process_rx checked).  keeps rbx, rbp.  clobbers: rax, rcx, rdx,
 * rsi, rdi, r8
 */
echo:
    call    take_slot                   /* rdi = frame in the slot */
    mov     $(FRAME_LEN / 8), %ecx
    push    %rdi
    rep movsq
    pop     %rdi
    mov     F_SRC(%rdi), %eax           /* dst = the sender */
    mov     %eax, F_DST(%rdi)
    movzwl  F_SRC + 4(%rdi), %eax
    mov     %ax, F_DST + 4(%rdi)
    mov     $KIND_ECHO, %eax
    call    put_header
    incq    C_ECHOED
    mov     C_ECHOED, %rax
    mov     %rax, F_ECHO(%rdi)
    jmp     send_slot

/*
 * maybe_send - when the timer ticked since the last one, send our next GUEST frame (if a slot
 * is free; else at the next look) and report progress every PROGRESS_EVERY frames; end the VM
 * after exit-after frames.  out: eax = nonzero if it sent.  clobbers: all but r12..r15
 */
maybe_send:
    mov     C_TICKS, %rax
    cmp     S_SENT_TICK, %rax
    je      8f
    cmpl    $0, S_TX_FREE
    je      8f
    mov     %rax, S_SENT_TICK
    call    take_slot
    mov     $(FRAME_LEN / 8), %ecx      /* zero the frame */
    push    %rdi
    xor     %eax, %eax
    rep stosq
    pop     %rdi
    movl    $0xffffffff, F_DST(%rdi)    /* broadcast */
    movw    $0xffff, F_DST + 4(%rdi)
    mov     $KIND_GUEST, %eax
    call    put_header
    incq    C_SENT
    mov     C_SENT, %rax
    mov     %rax, F_SEQ(%rdi)
    call    send_slot
    mov     C_SENT, %rax
    xor     %edx, %edx
    mov     $PROGRESS_EVERY, %ecx
    div     %rcx
    test    %rdx, %rdx
    jnz     1f
    call    progress
1:  mov     PB_EXIT_AFTER(%r13), %eax
    test    %eax, %eax
    jz      2f
    cmp     C_SENT, %rax
    ja      2f
    mov     $TXQ, %edi                  /* let the last frames go out first */
    call    vq_kick
    mov     $1000000, %ebx
3:  call    process_tx
    mov     S_TX_FREE, %eax
    cmp     S_TX_SLOTS, %eax
    jae     4f
    pause
    dec     %ebx
    jnz     3b
4:  call    progress
    mov     PB_EXIT_CODE(%r13), %al
    mov     C_GAPS, %rcx
    or      C_DUPS, %rcx
    jz      exit_with
    mov     $EXIT_DATA_ERROR, %al
    jmp     exit_with
2:  mov     $1, %eax
    ret
8:  xor     %eax, %eax
    ret

/* progress - the progress line. clobbers: rax, rcx, rdx, rsi */
progress:
    SAY     msg_sent
    mov     C_SENT, %rax
    call    put_dec
    SAY     msg_echoed
    mov     C_ECHOED, %rax
    call    put_dec
    SAY     msg_host
    mov     C_HOST, %rax
    call    put_dec
    SAY     msg_gaps
    mov     C_GAPS, %rax
    call    put_dec
    SAY     msg_dups
    mov     C_DUPS, %rax
    call    put_dec
    SAY     msg_other
    mov     C_OTHER, %rax
    call    put_dec
    SAY     msg_irqs
    mov     C_IRQS, %rax
    call    put_dec
    jmp     newline

/*
 * take_slot - pop a free transmit slot (one is free), zero its virtio_net_hdr.
 *   out: rdi = the frame in it, eax = slot.  clobbers: rax, rcx, rdx
 */
take_slot:
    decl    S_TX_FREE
    mov     S_TX_FREE, %ecx
    mov     TX_FREE_STACK(,%rcx,4), %eax
    mov     %eax, %edi
    shl     $8, %edi
    add     $TX_SLOTS, %edi
    movq    $0, 0(%rdi)                 /* header: no offloads, num_buffers 0 */
    movl    $0, 8(%rdi)
    add     $NET_HDR_SIZE, %rdi
    ret

/* put_header - our MAC as the frame's (rdi) source, the ethertype, magic and kind eax. */
put_header:
    mov     %eax, F_KIND(%rdi)
    mov     S_MAC, %eax
    mov     %eax, F_SRC(%rdi)
    movzwl  S_MAC + 4, %eax
    mov     %ax, F_SRC + 4(%rdi)
    movw    $ETHERTYPE_LE, F_TYPE(%rdi)
    movabs  $NC_MAGIC, %rax
    mov     %rax, F_MAGIC(%rdi)
    ret

/*
 * send_slot - put the slot whose frame is at rdi on the transmit queue (header + FRAME_LEN
 * bytes in its one descriptor).  clobbers: rax, rcx, rdx, rsi, rdi
 */
send_slot:
    sub     $(TX_SLOTS + NET_HDR_SIZE), %edi
    shr     $8, %edi                    /* slot */
    mov     %edi, %esi
    shl     $4, %edi
    movl    $(NET_HDR_SIZE + FRAME_LEN), TX_DESC + 8(%rdi)
    movw    $0, TX_DESC + 12(%rdi)
    mov     $TXQ, %edi
    jmp     vq_push

/*
 * setup_device - negotiate (virtio.inc), read the MAC, set up both queues, post the receive
 * buffers, DRIVER_OK.  out: CF clear on success, CF set after FAILED.  clobbers: all but r12..r15
 */
setup_device:
    call    virtio_begin                /* rbp = common configuration */
    jc      99f
    xor     %ecx, %ecx
    btq     $F_MRG_RXBUF, S_FEATURES
    setc    %cl
    mov     %ecx, S_MRG
    SAY     msg_mrg
    mov     S_MRG, %eax
    call    put_dec
    call    newline

    /* The MAC: from the device configuration, or our default. */
    movabs  $0x563412005452, %rax       /* 52:54:00:12:34:56 */
    btq     $F_MAC, S_FEATURES
    jnc     1f
    mov     S_DEVCFG, %rcx
    movzwl  4(%rcx), %eax               /* mac[4..5] */
    shl     $32, %rax
    mov     0(%rcx), %ecx
    or      %rcx, %rax
1:  mov     %rax, S_MAC

    mov     $RXQ, %edi                  /* queue 0: receive */
    xor     %eax, %eax
    mov     $RX_DESC, %edx
    call    virtio_queue
    jc      99f
    mov     $TXQ, %edi                  /* queue 1: transmit */
    mov     $1, %eax
    mov     $TX_DESC, %edx
    call    virtio_queue
    jc      99f

    /* Transmit slots: min(queue size, MAX_TX_SLOTS), all free, one descriptor each. */
    mov     TXQ + Q_SIZE, %eax
    mov     $MAX_TX_SLOTS, %ecx
    cmp     %ecx, %eax
    cmova   %ecx, %eax
    mov     %eax, S_TX_SLOTS
    xor     %ecx, %ecx
2:  mov     %ecx, TX_FREE_STACK(,%rcx,4)
    mov     %ecx, %edx
    shl     $4, %edx
    mov     %ecx, %esi
    shl     $8, %esi                    /* TX_SLOT_SIZE */
    add     $TX_SLOTS, %esi
    mov     %rsi, TX_DESC(%rdx)         /* addr; len and flags when sent */
    inc     %ecx
    cmp     %eax, %ecx
    jb      2b
    mov     %eax, S_TX_FREE

    /* Receive buffers: min(queue size, MAX_RX_BUFFERS), device-writable, all posted. */
    mov     RXQ + Q_SIZE, %eax
    mov     $MAX_RX_BUFFERS, %ecx
    cmp     %ecx, %eax
    cmova   %ecx, %eax
    mov     %eax, S_RX_BUFS
    xor     %ebx, %ebx
3:  mov     %ebx, %edx
    shl     $4, %edx
    mov     %ebx, %esi
    shl     $11, %esi                   /* RX_BUF_SIZE */
    add     $RX_BUFFERS, %esi
    mov     %rsi, RX_DESC(%rdx)
    movl    $RX_BUF_SIZE, RX_DESC + 8(%rdx)
    movw    $D_WRITE, RX_DESC + 12(%rdx)
    mov     %ebx, %esi
    mov     $RXQ, %edi
    call    vq_push
    inc     %ebx
    cmp     S_RX_BUFS, %ebx
    jb      3b

    call    virtio_driver_ok
    jc      99f

    SAY     msg_mac
    call    put_mac
    SAY     msg_rxq
    mov     RXQ + Q_SIZE, %eax
    call    put_dec
    SAY     msg_rxbufs
    mov     S_RX_BUFS, %eax
    call    put_dec
    SAY     msg_txq
    mov     TXQ + Q_SIZE, %eax
    call    put_dec
    SAY     msg_txslots
    mov     S_TX_SLOTS, %eax
    call    put_dec
    call    newline
    clc
99: ret

/* put_mac - "XX:XX:XX:XX:XX:XX" of S_MAC. clobbers: rax, rcx, rdx, r8, rbx */
put_mac:
    xor     %ebx, %ebx
1:  movzbl  S_MAC(%rbx), %r8d
    mov     $4, %ecx
    call    put_hex_digits
    inc     %ebx
    cmp     $6, %ebx
    je      2f
    mov     $':', %al
    call    putc
    jmp     1b
2:  ret

msg_mrg:            .asciz  " mrg-rxbuf "
msg_mac:            .asciz  "netcheck: mac "
msg_rxq:            .asciz  " rx-queue "
msg_rxbufs:         .asciz  " rx-buffers "
msg_txq:            .asciz  " tx-queue "
msg_txslots:        .asciz  " tx-slots "
msg_ready:          .asciz  "netcheck: ready\n"
msg_sent:           .asciz  "netcheck: sent "
msg_echoed:         .asciz  " echoed "
msg_host:           .asciz  " host "
msg_gaps:           .asciz  " gaps "
msg_dups:           .asciz  " dups "
msg_other:          .asciz  " other "
msg_irqs:           .asciz  " irqs "
msg_gap:            .asciz  "netcheck: GAP host seq expected "
msg_got:            .asciz  " got "
msg_dup:            .asciz  "netcheck: DUPLICATE host seq "
msg_last:           .asciz  " last "

/* PCI enumeration and the virtio transport, shared with blkcheck.S. */
    PCI_ROUTINES "netcheck: "
    PRINT_HELPERS
    VIRTIO_ROUTINES "netcheck: ", "virtio-net"

    .include "lib.inc"
