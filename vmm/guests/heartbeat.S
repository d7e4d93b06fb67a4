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
 * The start, the loop and the timer interrupt are in heartbeat.inc, shared
 * with the linux-probe (linux-probe.S).
 *
 * Assembled with `as --64`, linked at LOAD_ADDR by guests/guest.ld; the entry
 * point is the first byte of the image.
 */

    .include "abi.inc"
    .include "heartbeat.inc"

    .text
    .code64
    .globl  _start
_start:
    lea     timer_isr(%rip), %rbx
    call    guest_init                  /* r12..r15, IDT (interrupts still off) */
    HEARTBEAT_START PB_TIMER_COUNT(%r13)

    HEARTBEAT_LOOP
    /* vCPU 0 ends the VM after exit_after_ticks ticks (0 = never). */
    mov     PB_EXIT_AFTER(%r13), %eax
    HEARTBEAT_EXIT_AT PB_EXIT_CODE(%r13), main_loop

    HEARTBEAT_TIMER_ISR
    HEARTBEAT_STRINGS

    .include "lib.inc"
