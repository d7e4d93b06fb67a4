/*
 * memcheck.S - cpr-vmm built-in guest "memcheck" (QEMU migration-test "a-b"
 * style memory-consistency checker).
 *
 * vCPU 0 prints "A" once, then forever: increments the first byte of every
 * 4 KiB page in [MEM_START, min(ram_end, MEM_LIMIT)) and prints "B" after each
 * complete sweep (no newline). The other vCPUs print nothing and idle with
 * interrupts disabled.
 *
 * Checking a stopped VM: dump the first byte of every page in that range.
 * Pages already visited in the current sweep hold v+1, the others v, so all
 * bytes are equal except at most one place where the value drops by exactly
 * 1 (mod 256). Anything else means guest memory was lost or corrupted (e.g.
 * by a broken save/restore or dirty-page tracking).
 *
 * The sweep position lives only in registers (rax) and the counters only in
 * RAM, so a save/restore of RAM plus vCPU state keeps the rule intact.
 * Expects the pages to start out equal (fresh, zeroed RAM).
 *
 * Sampled mode (`--guest memcheck,sweep=sampled`, parameter block
 * PB_MEMCHECK_SAMPLED = 1): each sweep increments the first byte of one page
 * every SAMPLE_STRIDE bytes of all RAM instead, in this order: MEM_START,
 * MEM_START + stride, ... below ram_end, then 4 GiB, 4 GiB + stride, ...
 * below PB_HIGH_RAM_END (0: no RAM above 4 GiB). The same rule holds for the
 * sampled bytes taken in that order. RAM above 4 GiB is reached through a
 * 1 GiB window: PDPT entry 4 (virtual [4 GiB, 5 GiB)) points at a page
 * directory this guest owns (WINDOW_PD), whose 2 MiB entries it points at one
 * GiB of RAM after the other, reloading CR3 to flush the old translations.
 * The window's state (the page directory in RAM, the position in rbx/rsi)
 * survives a save/restore like the rest.
 */

    .include "abi.inc"

    .set    MEM_START,  0x100000        /* 1 MiB */
    .set    MEM_LIMIT,  100 << 20       /* 100 MiB */
    .set    PAGE_SIZE,  0x1000

/* Sampled mode. The parameter block fields are written by vmm/src/boot/mod.rs. */
    .set    PB_MEMCHECK_SAMPLED, 0x24   /* u32: 1 = sampled sweep of all RAM */
    .set    PB_HIGH_RAM_END,    0x28    /* u64: end of RAM from 4 GiB, 0 = none */
    .set    SAMPLE_STRIDE,      16 << 20
    .set    GIB,                1 << 30
    .set    WINDOW_PD,          0x3000  /* guest-owned (abi.inc), after the IDT */
    .set    PDE_2M,             0x83    /* present, writable, 2 MiB page */

    .text
    .code64
    .globl  _start
_start:
    /* No timer in this guest: its vector reports like any unexpected one. */
    lea     vector_stubs + 16 * TIMER_VECTOR(%rip), %rbx
    call    guest_init                  /* r12..r15, IDT (interrupts stay off) */

    test    %r12d, %r12d
    jnz     idle

    mov     $SERIAL_PORT, %edx
    mov     $'A', %al
    out     %al, %dx

    cmpl    $1, PB_MEMCHECK_SAMPLED(%r13)
    je      sampled

    /* rcx = end of the checked range = min(ram_end, MEM_LIMIT) */
    mov     PB_RAM_END(%r13), %rcx
    mov     $MEM_LIMIT, %eax
    cmp     %rax, %rcx
    cmova   %rax, %rcx

sweep:
    mov     $MEM_START, %eax            /* rax = page being incremented */
1:  incb    (%rax)
    add     $PAGE_SIZE, %rax
    cmp     %rcx, %rax
    jb      1b
    mov     $'B', %al                   /* edx is still SERIAL_PORT */
    out     %al, %dx
    jmp     sweep

sampled:
    /* PDPT[4] = WINDOW_PD: the window at virtual [4 GiB, 5 GiB). */
    mov     %cr3, %rax
    and     $~0xfff, %rax               /* PML4 */
    mov     (%rax), %rax
    and     $~0xfff, %rax               /* PDPT (from PML4[0]) */
    movq    $(WINDOW_PD | 3), 32(%rax)
    mov     PB_RAM_END(%r13), %r8       /* r8 = end of the low RAM */
    mov     PB_HIGH_RAM_END(%r13), %r9  /* r9 = end of the RAM from 4 GiB, or 0 */

sweep_sampled:
    mov     $MEM_START, %eax            /* rax = low page being incremented */
1:  cmp     %r8, %rax
    jae     2f
    incb    (%rax)
    add     $SAMPLE_STRIDE, %rax
    jmp     1b
2:  movabs  $(4 << 30), %rbx            /* rbx = physical GiB under the window */
3:  cmp     %r9, %rbx
    jae     6f
    mov     $WINDOW_PD, %edi            /* map [rbx, rbx + 1 GiB) in the window */
    mov     %rbx, %rax
    or      $PDE_2M, %rax
    mov     $512, %ecx
4:  mov     %rax, (%rdi)
    add     $8, %rdi
    add     $0x200000, %rax
    dec     %ecx
    jnz     4b
    mov     %cr3, %rax                  /* flush the window's old translations */
    mov     %rax, %cr3
    xor     %esi, %esi                  /* rsi = offset in this GiB */
5:  lea     (%rbx,%rsi), %rax
    cmp     %r9, %rax
    jae     6f
    movabs  $(4 << 30), %rax            /* the window's virtual base */
    incb    (%rax,%rsi)
    add     $SAMPLE_STRIDE, %rsi
    cmp     $GIB, %rsi
    jb      5b
    add     $GIB, %rbx
    jmp     3b
6:  mov     $SERIAL_PORT, %edx
    mov     $'B', %al
    out     %al, %dx
    jmp     sweep_sampled

/* Secondary vCPUs: nothing to do; with interrupts off hlt never returns. */
idle:
    cli
    hlt
    jmp     idle

    .include "lib.inc"
