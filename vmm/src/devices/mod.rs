//! Emulated devices and the port-I/O bus that routes vCPU exits to them.
//!
//! Everything else the guest might poke (unknown ports, unknown MMIO) is answered here too:
//! reads return all-ones and writes are dropped, logged with a rate limit, so a misbehaving
//! guest can neither crash the VMM nor flood its log.

pub mod console;
pub mod debug_exit;
pub mod i8042;
pub mod pci;
pub mod rtc;
pub mod serial;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What a device write asks of the machine (the vCPU thread forwards it to the VMM thread).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// End the VMM with this exit status (debug exit port).
    Exit(u8),
    /// Reset the machine (i8042 reset pulse, PCI reset control register).
    Reset,
}

/// A device on the port-I/O bus. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmRequest>;
}

struct PioRange {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Routes port I/O to devices. Immutable once the machine is built, so vCPU threads share it
/// without a lock; each device has its own.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<PioRange>,
}

impl PioBus {
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) {
        self.ranges.push(PioRange { base, len, device });
    }

    fn find(&self, port: u16) -> Option<&PioRange> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && port - r.base < r.len)
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some(r) => lock(&r.device).read(port - r.base, data),
            None => {
                data.fill(0xff);
                unknown_access("port read", u64::from(port), data.len());
            }
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> Option<VmRequest> {
        match self.find(port) {
            Some(r) => lock(&r.device).write(port - r.base, data),
            None => {
                unknown_access("port write", u64::from(port), data.len());
                None
            }
        }
    }
}

/// Locks a device, carrying on if another thread panicked while holding it: device state is
/// plain registers, and stopping the VM over a poisoned lock would lose the guest.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Answers an MMIO read nobody claims.
pub fn unknown_mmio_read(addr: u64, data: &mut [u8]) {
    data.fill(0xff);
    unknown_access("MMIO read", addr, data.len());
}

pub fn unknown_mmio_write(addr: u64, data: &[u8]) {
    unknown_access("MMIO write", addr, data.len());
}

/// At most this many unknown-access log lines per second.
const UNKNOWN_ACCESS_LOGS_PER_SECOND: u64 = 10;
static UNKNOWN_ACCESS_WINDOW: AtomicU64 = AtomicU64::new(0);
static UNKNOWN_ACCESS_COUNT: AtomicU64 = AtomicU64::new(0);
static UNKNOWN_ACCESS_SUPPRESSED: AtomicU64 = AtomicU64::new(0);

fn unknown_access(kind: &str, addr: u64, len: usize) {
    let second = cpr_common::timing::monotonic_ns() / 1_000_000_000;
    if UNKNOWN_ACCESS_WINDOW.swap(second, Ordering::Relaxed) != second {
        UNKNOWN_ACCESS_COUNT.store(0, Ordering::Relaxed);
        let suppressed = UNKNOWN_ACCESS_SUPPRESSED.swap(0, Ordering::Relaxed);
        if suppressed > 0 {
            log::warn!("{suppressed} more unknown guest accesses were not logged");
        }
    }
    if UNKNOWN_ACCESS_COUNT.fetch_add(1, Ordering::Relaxed) < UNKNOWN_ACCESS_LOGS_PER_SECOND {
        log::warn!("guest {kind} at {addr:#x} ({len} bytes): no device there");
    } else {
        UNKNOWN_ACCESS_SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) -> Option<VmRequest> {
            self.0 = data[0];
            None
        }
    }

    #[test]
    fn routes_by_port_and_answers_unknown_with_ones() {
        let mut bus = PioBus::default();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Echo(10))));
        let mut b = [0u8; 1];
        bus.read(0x102, &mut b);
        assert_eq!(b, [12]);
        bus.write(0x100, &[20]);
        bus.read(0x103, &mut b);
        assert_eq!(b, [23]);
        let mut w = [0u8; 4];
        bus.read(0x104, &mut w);
        assert_eq!(w, [0xff; 4]);
        for _ in 0..100 {
            bus.read(0x9999, &mut w);
        }
    }
}
