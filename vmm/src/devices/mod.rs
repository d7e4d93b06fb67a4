//! Emulated devices and the bus that routes vCPU port-I/O and MMIO exits to them.
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

/// A device in guest-physical address space (MMIO). `offset` is relative to its base address.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest>;
}

/// Two devices claimed overlapping addresses: a bug in how the machine is put together.
#[derive(Debug, thiserror::Error)]
#[error("{space} range {base:#x}+{len:#x} overlaps one already on the bus")]
pub struct BusOverlap {
    pub space: &'static str,
    pub base: u64,
    pub len: u64,
}

struct BusRange<D: ?Sized> {
    base: u64,
    len: u64,
    device: Arc<Mutex<D>>,
}

fn find<D: ?Sized>(ranges: &[BusRange<D>], addr: u64) -> Option<&BusRange<D>> {
    ranges
        .iter()
        .find(|r| addr >= r.base && addr - r.base < r.len)
}

fn overlaps<D: ?Sized>(ranges: &[BusRange<D>], base: u64, len: u64) -> bool {
    let end = base.saturating_add(len);
    ranges
        .iter()
        .any(|r| base < r.base.saturating_add(r.len) && r.base < end)
}

/// Routes port I/O and MMIO exits to devices. Immutable once the machine is built, so vCPU
/// threads share it without a lock; each device has its own.
#[derive(Default)]
pub struct Bus {
    pio: Vec<BusRange<dyn PioDevice>>,
    mmio: Vec<BusRange<dyn MmioDevice>>,
}

impl Bus {
    pub fn insert_pio(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusOverlap> {
        let (base, len) = (u64::from(base), u64::from(len));
        if overlaps(&self.pio, base, len) {
            return Err(BusOverlap {
                space: "port",
                base,
                len,
            });
        }
        self.pio.push(BusRange { base, len, device });
        Ok(())
    }

    #[allow(dead_code)] // the PCI devices put their BARs here
    pub fn insert_mmio(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), BusOverlap> {
        if overlaps(&self.mmio, base, len) {
            return Err(BusOverlap {
                space: "MMIO",
                base,
                len,
            });
        }
        self.mmio.push(BusRange { base, len, device });
        Ok(())
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match find(&self.pio, u64::from(port)) {
            Some(r) => lock(&r.device).read((u64::from(port) - r.base) as u16, data),
            None => {
                data.fill(0xff);
                unknown_access("port read", u64::from(port), data.len());
            }
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<VmRequest> {
        match find(&self.pio, u64::from(port)) {
            Some(r) => lock(&r.device).write((u64::from(port) - r.base) as u16, data),
            None => {
                unknown_access("port write", u64::from(port), data.len());
                None
            }
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match find(&self.mmio, addr) {
            Some(r) => lock(&r.device).read(addr - r.base, data),
            None => {
                data.fill(0xff);
                unknown_access("MMIO read", addr, data.len());
            }
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<VmRequest> {
        match find(&self.mmio, addr) {
            Some(r) => lock(&r.device).write(addr - r.base, data),
            None => {
                unknown_access("MMIO write", addr, data.len());
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
        let mut bus = Bus::default();
        bus.insert_pio(0x100, 4, Arc::new(Mutex::new(Echo(10))))
            .unwrap();
        let mut b = [0u8; 1];
        bus.pio_read(0x102, &mut b);
        assert_eq!(b, [12]);
        bus.pio_write(0x100, &[20]);
        bus.pio_read(0x103, &mut b);
        assert_eq!(b, [23]);
        let mut w = [0u8; 4];
        bus.pio_read(0x104, &mut w);
        assert_eq!(w, [0xff; 4]);
        for _ in 0..100 {
            bus.pio_read(0x9999, &mut w);
        }
        // MMIO is a separate space: the same numbers mean nothing there.
        bus.mmio_read(0x102, &mut w);
        assert_eq!(w, [0xff; 4]);
    }

    struct Mem(Vec<u8>);
    impl MmioDevice for Mem {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
            None
        }
    }

    #[test]
    fn routes_mmio_by_address_and_refuses_overlaps() {
        let mut bus = Bus::default();
        bus.insert_mmio(
            0xfe00_0000,
            0x1000,
            Arc::new(Mutex::new(Mem(vec![0; 0x1000]))),
        )
        .unwrap();
        bus.mmio_write(0xfe00_0010, &[1, 2, 3, 4]);
        let mut w = [0u8; 4];
        bus.mmio_read(0xfe00_0010, &mut w);
        assert_eq!(w, [1, 2, 3, 4]);
        bus.mmio_read(0xfe00_1000, &mut w);
        assert_eq!(w, [0xff; 4]);
        let again = Arc::new(Mutex::new(Mem(vec![0; 16])));
        assert!(bus.insert_mmio(0xfe00_0ff0, 0x20, again.clone()).is_err());
        assert!(bus.insert_mmio(0xfdff_fff0, 0x20, again.clone()).is_err());
        bus.insert_mmio(0xfe00_1000, 0x10, again).unwrap();
        assert!(
            bus.insert_pio(0x10, 4, Arc::new(Mutex::new(Echo(0))))
                .is_ok()
        );
        assert!(
            bus.insert_pio(0x12, 1, Arc::new(Mutex::new(Echo(0))))
                .is_err()
        );
    }
}
