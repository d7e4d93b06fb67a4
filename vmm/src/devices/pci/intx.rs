//! A PCI function's INTx pin (INTA): the legacy, level-triggered interrupt a driver uses when
//! it does not enable MSI-X.
//!
//! The function keeps an interrupt status: a byte of cause bits (for virtio, the ISR: bit 0
//! queue, bit 1 configuration) that the device sets from any thread ([`Intx::raise`]) and the
//! driver's read of the ISR clears ([`Intx::take`]). The pin's level is
//!
//! ```text
//! level = status != 0  &&  command.INTx-disable == 0  &&  MSI-X disabled
//! ```
//!
//! and the configuration space's status register shows `status != 0` in its interrupt-status
//! bit (0x06 bit 3), which is also how the status crosses a migration: that bit is part of the
//! saved configuration space (so the state format is unchanged, and a VMM without INTx reads it
//! as "nothing pending"). Only the queue cause exists today, so a restored status is the queue
//! bit.
//!
//! Wiring: the PCI bus gives the function its slot's IOAPIC pin ([`super::intx_gsi`]) when it
//! attaches it; from then on the pin is an [`IntxLine`] (an irqfd with a resample fd). KVM
//! de-asserts the pin at the guest's EOI and the line asserts it again while the level is high,
//! so a cause raised between the driver's ISR read and its EOI is never lost. A raise is two
//! atomic operations and an eventfd write: no lock, from the device's I/O thread.
//!
//! A driver setting INTx-disable (or enabling MSI-X) while the pin is asserted: nothing is
//! asserted any more, and KVM drops the pin at the next EOI (an irqfd cannot be de-asserted
//! from user space); at worst the guest sees one interrupt with an empty ISR, which drivers
//! accept as spurious.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_ioctls::VmFd;

use crate::devices::interrupts::{InterruptError, IntxLine, IntxSource};

/// The interrupt pin register's value for INTA.
pub const INTERRUPT_PIN_INTA: u8 = 1;

/// The part the line's resample thread reads.
struct Level {
    status: AtomicU8,
    enabled: AtomicBool,
}

impl IntxSource for Level {
    fn level(&self) -> bool {
        self.enabled.load(Ordering::SeqCst) && self.status.load(Ordering::SeqCst) != 0
    }
}

/// A function's INTx pin and interrupt status.
pub struct Intx {
    level: Arc<Level>,
    line: OnceLock<IntxLine>,
}

impl Default for Intx {
    fn default() -> Self {
        Self::new()
    }
}

impl Intx {
    /// As at power-on: nothing pending, enabled (INTx-disable is 0 at reset, MSI-X off), not
    /// wired to a pin yet.
    pub fn new() -> Self {
        Intx {
            level: Arc::new(Level {
                status: AtomicU8::new(0),
                enabled: AtomicBool::new(true),
            }),
            line: OnceLock::new(),
        }
    }

    /// Connects the pin to IOAPIC pin `gsi` (once; the slot does not change). If the level is
    /// high already (a restored status), the line is asserted when the machine resumes
    /// ([`Intx::resume`]).
    pub fn wire(&self, vm: Arc<VmFd>, gsi: u32) -> Result<(), InterruptError> {
        if self.line.get().is_some() {
            return Ok(());
        }
        let line = IntxLine::new(vm, gsi, self.level.clone())?;
        // A second wire() racing this one loses and drops its line (never happens: the bus
        // attaches a function once).
        let _ = self.line.set(line);
        Ok(())
    }

    /// The device wants an interrupt for `cause` (from any thread).
    pub fn raise(&self, cause: u8) {
        self.level.status.fetch_or(cause, Ordering::SeqCst);
        if self.level.enabled.load(Ordering::SeqCst) {
            self.assert();
        }
    }

    /// The driver read the ISR: returns the causes and clears them. The pin drops at the EOI
    /// that follows (the resample finds nothing pending).
    pub fn take(&self) -> u8 {
        self.level.status.swap(0, Ordering::SeqCst)
    }

    /// Whether any cause is pending (the status register's interrupt-status bit).
    pub fn pending(&self) -> bool {
        self.level.status.load(Ordering::SeqCst) != 0
    }

    /// Puts back a saved status without asserting anything (see [`Intx::resume`]).
    pub fn restore_status(&self, status: u8) {
        self.level.status.store(status, Ordering::SeqCst);
    }

    /// The command register's INTx-disable bit and MSI-X enable decide whether the pin may be
    /// asserted; enabling it with a cause pending asserts it.
    pub fn set_enabled(&self, enabled: bool) {
        self.level.enabled.store(enabled, Ordering::SeqCst);
        if enabled && self.pending() {
            self.assert();
        }
    }

    /// The machine runs again (after a restore, a rollback or `cont`): a pending, enabled
    /// interrupt is asserted again, so none is lost across an update. Asserting a pin that is
    /// still asserted changes nothing.
    pub fn resume(&self) {
        if self.level.level() {
            self.assert();
        }
    }

    fn assert(&self) {
        if let Some(line) = self.line.get() {
            line.assert();
        }
    }

    /// The pin it is wired to, and how often it was asserted.
    #[cfg(test)]
    pub fn line(&self) -> Option<&IntxLine> {
        self.line.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wired() -> Intx {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let intx = Intx::new();
        intx.wire(vm, 17).unwrap();
        intx
    }

    fn asserts(intx: &Intx) -> u64 {
        intx.line().unwrap().asserts()
    }

    #[test]
    fn a_raise_asserts_the_pin_and_reading_the_isr_clears_the_level() {
        let intx = wired();
        assert!(!intx.level.level());
        intx.raise(1);
        assert_eq!(asserts(&intx), 1);
        assert!(intx.pending());
        assert!(intx.level.level(), "the resample would assert again");
        assert_eq!(intx.take(), 1);
        assert_eq!(intx.take(), 0, "read clears");
        assert!(
            !intx.level.level(),
            "the resample after the EOI leaves it down"
        );
    }

    #[test]
    fn a_disabled_pin_is_not_asserted_until_enabled_with_a_cause_pending() {
        let intx = wired();
        intx.set_enabled(false);
        intx.raise(1);
        assert_eq!(asserts(&intx), 0);
        assert!(intx.pending(), "the status still shows it");
        assert!(!intx.level.level());
        intx.resume();
        assert_eq!(asserts(&intx), 0);
        intx.set_enabled(true);
        assert_eq!(asserts(&intx), 1);
        intx.take();
        intx.set_enabled(true);
        assert_eq!(asserts(&intx), 1, "nothing pending: nothing asserted");
    }

    #[test]
    fn a_restored_status_is_asserted_when_the_machine_resumes() {
        let intx = wired();
        intx.restore_status(1);
        assert_eq!(asserts(&intx), 0, "not while the machine is stopped");
        intx.resume();
        assert_eq!(asserts(&intx), 1);
        intx.take();
        intx.resume();
        assert_eq!(asserts(&intx), 1);
    }
}
