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
 */

    .include "abi.inc"

    .set    MEM_START,  0x100000        /* 1 MiB */
    .set    MEM_LIMIT,  100 << 20       /* 100 MiB */
    .set    PAGE_SIZE,  0x1000

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

/* Secondary vCPUs: nothing to do; with interrupts off hlt never returns. */
idle:
    cli
    hlt
    jmp     idle

    .include "lib.inc"
