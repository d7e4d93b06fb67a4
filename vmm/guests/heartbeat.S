/*
 * heartbeat.S - cpr-vmm built-in guest "heartbeat".
 *
 * Every vCPU enables its local APIC, runs the LAPIC timer in periodic mode
 * (vector TIMER_VECTOR, divide-by-16, initial count from the parameter block)
 * and prints
 *     heartbeat: cpu N start
 *     heartbeat: cpu N tick 1
 *     heartbeat: cpu N tick 2
 *     ...
 * The timer handler only counts ticks in the per-vCPU area; the main loop
 * prints every tick that has not been printed yet (so the numbering stays
 * strictly consecutive even if several ticks arrive between two wake-ups).
 * Whole lines are printed under the spinlock in the parameter block.
 *
 * All state is in RAM (per-vCPU area) or in registers, so a save/restore of
 * RAM plus vCPU state continues the numbering exactly.
 *
 * If exit_after_ticks != 0, vCPU 0 writes exit_code to DEBUG_EXIT_PORT once it
 * has printed tick exit_after_ticks, then halts forever.
 *
 * Assembled with `as --64`, linked at LOAD_ADDR by guests/guest.ld; the entry
 * point is the first byte of the image.
 */

    .include "abi.inc"

    .text
    .code64
    .globl  _start
_start:
    lea     timer_isr(%rip), %rbx
    call    guest_init                  /* r12..r15, IDT (interrupts still off) */

    /* Local APIC: software-enable with the spurious vector, then the timer. */
    movl    $(APIC_SVR_ENABLE | SPURIOUS_VECTOR), APIC_SVR(%r15)
    movl    $APIC_DIV_16, APIC_TIMER_DIV(%r15)
    movl    $(APIC_LVT_PERIODIC | TIMER_VECTOR), APIC_LVT_TIMER(%r15)
    mov     PB_TIMER_COUNT(%r13), %eax
    mov     %eax, APIC_TIMER_INIT(%r15) /* writing the count starts the timer */

    /* "heartbeat: cpu N start\n" */
    call    print_lock
    lea     msg_prefix(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    put_dec
    lea     msg_start(%rip), %rsi
    call    puts
    call    print_unlock

/*
 * Main loop. The check for unprinted ticks is done with interrupts disabled
 * and `sti; hlt` is atomic (sti's one-instruction interrupt shadow), so a
 * tick arriving after the check always wakes us up.
 */
main_loop:
    cli
    mov     PC_TICKS(%r14), %rax
    cmp     PC_PRINTED(%r14), %rax
    ja      print_ticks
    sti
    hlt
    jmp     main_loop

/*
 * Print every tick that has not been printed yet, one locked line each.
 * Interrupts are enabled while printing, so ticks keep being counted.
 *   rbx = number of the tick being printed
 */
print_ticks:
    sti
1:  call    print_lock
    mov     PC_PRINTED(%r14), %rbx
    inc     %rbx
    lea     msg_prefix(%rip), %rsi      /* "heartbeat: cpu N tick T\n" */
    call    puts
    mov     %r12, %rax
    call    put_dec
    lea     msg_tick(%rip), %rsi
    call    puts
    mov     %rbx, %rax
    call    put_dec
    mov     $'\n', %al
    mov     $SERIAL_PORT, %edx
    out     %al, %dx
    mov     %rbx, PC_PRINTED(%r14)      /* only now is the line complete */
    call    print_unlock
    cmp     PC_TICKS(%r14), %rbx
    jb      1b                          /* more ticks arrived meanwhile */

    /* vCPU 0 ends the VM after exit_after_ticks ticks (0 = never). */
    test    %r12d, %r12d
    jnz     main_loop
    mov     PB_EXIT_AFTER(%r13), %eax
    test    %eax, %eax
    jz      main_loop
    cmp     %rax, %rbx
    jb      main_loop
    mov     PB_EXIT_CODE(%r13), %al
    mov     $DEBUG_EXIT_PORT, %dx
    out     %al, %dx
    jmp     halt_forever                /* the VMM should be gone by now */

/*
 * LAPIC timer interrupt: count the tick and acknowledge it. Uses only the
 * global registers r14 (per-vCPU area) and r15 (LAPIC); `inc` on memory and
 * the store change no register, and iretq restores RFLAGS.
 */
timer_isr:
    incq    PC_TICKS(%r14)              /* only this vCPU writes its counter */
    movl    $0, APIC_EOI(%r15)
    iretq

msg_prefix:
    .asciz  "heartbeat: cpu "
msg_start:
    .asciz  " start\n"
msg_tick:
    .asciz  " tick "

    .include "lib.inc"
