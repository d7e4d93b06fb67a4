//! PCI: bus 0 behind configuration mechanism #1, its functions, and the MMIO window their BARs
//! live in.
//!
//! The configuration ports 0xcf8..=0xcff:
//! - 0xcf8, 32-bit: the configuration address (enable bit 31, bus 23:16, device 15:11,
//!   function 10:8, register 7:2); stored and read back, so the guest's mechanism check passes
//!   (Linux writes 0x80000000 and expects to read it back).
//! - 0xcfc..=0xcff (the data window), any size: the addressed function's configuration space
//!   ([`PciBus`]); all-ones ("no device": vendor ID 0xffff) where there is none, or when the
//!   enable bit is clear.
//! - 0xcf9, 8-bit: the chipset's reset control register (as on a PIIX/ICH): a write with bit 2
//!   (reset CPU) set asks for a reset ([`VmRequest::Reset`]); Linux uses it for `reboot=pci`.
//! - Any other access inside 0xcf8..=0xcfb reads all-ones and is otherwise ignored.
//!
//! Register it with `len` [`PCI_CONFIG_PORT_COUNT`] at [`PCI_CONFIG_BASE_PORT`]. Its state is the
//! address and reset-control registers ([`PciConfigSnapshot`]); each function saves its own.
//!
//! Functions are devices in the machine's device list placed at a slot of bus 0
//! ([`super::DeviceSpec::pci`]); they are function 0 of their slot. Their memory BARs are
//! assigned at power-on from the 32-bit MMIO window [`PCI_MMIO_BASE`]..+[`PCI_MMIO_SIZE`] (below
//! the IOAPIC), and the window ([`PciMmioWindow`]) routes each access to the function whose BAR
//! decodes it now, so a BAR the guest moves keeps working.
//!
//! INTx: a function that has an interrupt pin uses INTA, wired by the slot it sits in to one
//! IOAPIC pin ([`intx_gsi`]): slot `s` to GSI `16 + s % 8`. Pins 16-23 are the IOAPIC's PCI pins
//! on a PC (ISA IRQs 0-15 keep theirs: PIT, keyboard, serial, RTC...), so slots 1-7 get a pin of
//! their own and slots 8 and up share them (level-triggered, so sharing works). When the bus
//! attaches a function it tells it its slot ([`PciFunction::attached`]); the function puts the
//! pin in its interrupt line register, as firmware does, and wires its INTx to it. The MP table
//! (`boot/mptable.rs`) describes the same wiring to the guest.

pub mod config_space;
pub mod host_bridge;
pub mod intx;
pub mod msix;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{DeviceContext, DeviceError, MmioDevice, Persist, PioDevice, VmRequest, lock};

/// Where PCI memory BARs are placed: above 32-bit RAM (which ends at 3 GiB), below the IOAPIC.
pub const PCI_MMIO_BASE: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x3e00_0000;
/// Slots on bus 0 (device numbers 0..=31).
pub const PCI_SLOTS: u8 = 32;
/// The first IOAPIC pin PCI INTx lines use, and how many there are.
const FIRST_INTX_GSI: u32 = 16;
const INTX_GSIS: u32 = 8;
const DATA_OFFSET: u16 = 4;
const CONFIG_ENABLE: u32 = 1 << 31;

/// The IOAPIC pin (GSI) that INTA of a function in `slot` of bus 0 is wired to.
pub fn intx_gsi(slot: u8) -> u32 {
    FIRST_INTX_GSI + u32::from(slot) % INTX_GSIS
}

/// One PCI function as the bus sees it: its configuration space and its BARs.
pub trait PciFunction: Send {
    /// The bus placed it in `slot` (once, after it was built or restored): a function with an
    /// interrupt pin wires it to [`intx_gsi`]`(slot)` here.
    fn attached(&mut self, _slot: u8) -> Result<(), PciError> {
        Ok(())
    }
    /// `offset` is the byte offset in the configuration space (0..256).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Every BAR that decodes now: (BAR index, guest address, size).
    fn bar_ranges(&self) -> Vec<(usize, u64, u64)>;
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> Option<VmRequest>;
}

/// A function on the bus, shared by the bus and the device list.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI slot {0} is taken")]
    SlotTaken(u8),
    #[error("PCI slot {0} does not exist (bus 0 has slots 0-31)")]
    NoSuchSlot(u8),
    #[error("the PCI MMIO window has no room for a {0:#x}-byte BAR")]
    WindowFull(u64),
    #[error("PCI slot {slot}: wiring its INTx pin: {detail}")]
    Intx { slot: u8, detail: String },
}

/// Bus 0: which function sits in which slot, and the BAR allocator of the MMIO window.
#[derive(Default)]
pub struct PciBus {
    state: Mutex<BusState>,
}

#[derive(Default)]
struct BusState {
    slots: Vec<(u8, SharedFunction)>,
    next_bar: u64,
}

impl PciBus {
    pub fn new() -> Arc<Self> {
        Arc::new(PciBus::default())
    }

    pub fn attach(&self, slot: u8, function: SharedFunction) -> Result<(), PciError> {
        if slot >= PCI_SLOTS {
            return Err(PciError::NoSuchSlot(slot));
        }
        let mut s = lock(&self.state);
        if s.slots.iter().any(|(n, _)| *n == slot) {
            return Err(PciError::SlotTaken(slot));
        }
        lock(&function).attached(slot)?;
        s.slots.push((slot, function));
        Ok(())
    }

    pub fn allocate_bar(&self, size: u64) -> Result<u64, PciError> {
        let mut s = lock(&self.state);
        let size = size.max(0x1000).next_power_of_two();
        let at = (PCI_MMIO_BASE + s.next_bar).next_multiple_of(size);
        if at + size > PCI_MMIO_BASE + PCI_MMIO_SIZE {
            return Err(PciError::WindowFull(size));
        }
        s.next_bar = at + size - PCI_MMIO_BASE;
        Ok(at)
    }

    fn function(&self, slot: u8) -> Option<SharedFunction> {
        lock(&self.state)
            .slots
            .iter()
            .find(|(n, _)| *n == slot)
            .map(|(_, f)| f.clone())
    }

    /// A configuration access through mechanism #1's address register.
    fn config_read(&self, address: u32, byte: u16, data: &mut [u8]) {
        match self.addressed(address) {
            Some(f) => lock(&f).config_read(register(address, byte), data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&self, address: u32, byte: u16, data: &[u8]) {
        if let Some(f) = self.addressed(address) {
            lock(&f).config_write(register(address, byte), data);
        }
    }

    fn addressed(&self, address: u32) -> Option<SharedFunction> {
        let bus = (address >> 16) & 0xff;
        let slot = ((address >> 11) & 0x1f) as u8;
        let function = (address >> 8) & 0x7;
        if address & CONFIG_ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        self.function(slot)
    }

    /// The function and BAR that decode guest address `addr` now.
    fn decoding(&self, addr: u64) -> Option<(SharedFunction, usize, u64)> {
        let slots = lock(&self.state).slots.clone();
        slots.into_iter().find_map(|(_, f)| {
            let hit = lock(&f)
                .bar_ranges()
                .into_iter()
                .find(|(_, base, len)| addr >= *base && addr - base < *len);
            hit.map(|(bar, base, _)| (f.clone(), bar, addr - base))
        })
    }
}

/// The byte offset in the configuration space: the dword register plus the port's byte lane.
fn register(address: u32, byte: u16) -> usize {
    (address & 0xfc) as usize + usize::from(byte)
}

/// The part of the address space where PCI BARs live; routes each access to the function whose
/// BAR decodes it now. Stateless: the BARs are in the functions' configuration spaces.
pub struct PciMmioWindow {
    bus: Arc<PciBus>,
}

impl Persist for PciMmioWindow {
    type State = ();
    type Config = ();

    fn power_on(ctx: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
        Ok(PciMmioWindow {
            bus: ctx.pci.clone(),
        })
    }

    fn save(&self) {}

    fn restore(ctx: &mut DeviceContext<'_>, _: &(), _: &()) -> Result<Self, DeviceError> {
        Self::power_on(ctx, &())
    }
}

impl MmioDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.bus.decoding(PCI_MMIO_BASE + offset) {
            Some((f, bar, at)) => lock(&f).bar_read(bar, at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let (f, bar, at) = self.bus.decoding(PCI_MMIO_BASE + offset)?;
        let mut f = lock(&f);
        f.bar_write(bar, at, data)
    }
}

/// The configuration address port.
pub const PCI_CONFIG_BASE_PORT: u16 = 0xcf8;
/// 0xcf8..=0xcff.
pub const PCI_CONFIG_PORT_COUNT: u16 = 8;

const ADDRESS_OFFSET: u16 = 0;
const RESET_CONTROL_OFFSET: u16 = 1;
/// Reset control register: bit 2 starts the reset (bit 1 selects a hard reset; both mean a
/// machine reset here).
const RESET_CONTROL_RESET_CPU: u8 = 1 << 2;

/// Saved state of the PCI configuration ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigSnapshot {
    /// The last configuration address written to 0xcf8.
    pub address: u32,
    /// The reset control register at 0xcf9.
    pub reset_control: u8,
}

/// PCI configuration mechanism #1 in front of bus 0.
#[derive(Default)]
pub struct PciConfigPorts {
    address: u32,
    reset_control: u8,
    bus: Arc<PciBus>,
}

impl PciConfigPorts {
    fn snapshot(&self) -> PciConfigSnapshot {
        PciConfigSnapshot {
            address: self.address,
            reset_control: self.reset_control,
        }
    }

    fn from_snapshot(snap: &PciConfigSnapshot) -> Self {
        PciConfigPorts {
            address: snap.address,
            reset_control: snap.reset_control,
            bus: Arc::default(),
        }
    }
}

impl Persist for PciConfigPorts {
    type State = PciConfigSnapshot;
    type Config = ();

    fn power_on(ctx: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
        Ok(PciConfigPorts {
            bus: ctx.pci.clone(),
            ..PciConfigPorts::default()
        })
    }

    fn save(&self) -> PciConfigSnapshot {
        self.snapshot()
    }

    fn restore(
        ctx: &mut DeviceContext<'_>,
        _: &(),
        state: &PciConfigSnapshot,
    ) -> Result<Self, DeviceError> {
        Ok(PciConfigPorts {
            bus: ctx.pci.clone(),
            ..PciConfigPorts::from_snapshot(state)
        })
    }
}

impl PioDevice for PciConfigPorts {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (ADDRESS_OFFSET, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (RESET_CONTROL_OFFSET, 1) => data[0] = self.reset_control,
            (o, n) if in_data_window(o, n) => {
                self.bus.config_read(self.address, o - DATA_OFFSET, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmRequest> {
        match (offset, data) {
            (ADDRESS_OFFSET, &[a, b, c, d]) => self.address = u32::from_le_bytes([a, b, c, d]),
            (RESET_CONTROL_OFFSET, &[value]) => {
                // The reset bit is self-clearing; keep only the mode bits.
                self.reset_control = value & !RESET_CONTROL_RESET_CPU;
                if value & RESET_CONTROL_RESET_CPU != 0 {
                    return Some(VmRequest::Reset);
                }
            }
            (o, d) if in_data_window(o, d.len()) => {
                self.bus.config_write(self.address, o - DATA_OFFSET, d)
            }
            // Other accesses to 0xcf8..=0xcfb are not part of mechanism #1.
            _ => {}
        }
        None
    }
}

/// An access within the data window's dword (0xcfc..=0xcff).
fn in_data_window(offset: u16, len: usize) -> bool {
    offset >= DATA_OFFSET && usize::from(offset - DATA_OFFSET) + len <= 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(dev: &mut PciConfigPorts, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn address_register_reads_back() {
        let mut dev = PciConfigPorts::default();
        assert_eq!(read32(&mut dev, ADDRESS_OFFSET), 0);
        dev.write(ADDRESS_OFFSET, &0x8000_0000u32.to_le_bytes());
        assert_eq!(read32(&mut dev, ADDRESS_OFFSET), 0x8000_0000);
        dev.write(ADDRESS_OFFSET, &0x8000_f808u32.to_le_bytes());
        assert_eq!(read32(&mut dev, ADDRESS_OFFSET), 0x8000_f808);
    }

    #[test]
    fn data_port_answers_no_device() {
        let mut dev = PciConfigPorts::default();
        dev.write(ADDRESS_OFFSET, &0x8000_0000u32.to_le_bytes());
        assert_eq!(read32(&mut dev, DATA_OFFSET), 0xffff_ffff);
        for offset in DATA_OFFSET..DATA_OFFSET + 4 {
            let mut b = [0u8; 1];
            dev.read(offset, &mut b);
            assert_eq!(b, [0xff]);
        }
        let mut w = [0u8; 2];
        dev.read(DATA_OFFSET + 2, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        assert_eq!(dev.write(DATA_OFFSET, &[1, 2, 3, 4]), None);
        assert_eq!(read32(&mut dev, DATA_OFFSET), 0xffff_ffff);
    }

    #[test]
    fn narrow_accesses_to_the_address_port_do_not_touch_it() {
        let mut dev = PciConfigPorts::default();
        dev.write(ADDRESS_OFFSET, &0x8000_0000u32.to_le_bytes());
        // Linux's mechanism #2 probe writes bytes to 0xcf8 and 0xcfa and expects to read 0 back;
        // here it reads all-ones, so mechanism #2 is (correctly) not found.
        dev.write(ADDRESS_OFFSET, &[0]);
        dev.write(2, &[0]);
        let mut b = [0u8; 1];
        dev.read(ADDRESS_OFFSET, &mut b);
        assert_eq!(b, [0xff]);
        assert_eq!(read32(&mut dev, ADDRESS_OFFSET), 0x8000_0000);
    }

    #[test]
    fn reset_control_register_resets() {
        let mut dev = PciConfigPorts::default();
        assert_eq!(dev.write(RESET_CONTROL_OFFSET, &[0x02]), None);
        let mut b = [0u8; 1];
        dev.read(RESET_CONTROL_OFFSET, &mut b);
        assert_eq!(b, [0x02]);
        assert_eq!(
            dev.write(RESET_CONTROL_OFFSET, &[0x06]),
            Some(VmRequest::Reset)
        );
    }

    #[test]
    fn snapshot_round_trips_through_serde() {
        let mut dev = PciConfigPorts::default();
        dev.write(ADDRESS_OFFSET, &0x8000_1234u32.to_le_bytes());
        let snap = dev.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: PciConfigSnapshot = serde_json::from_str(&json).unwrap();
        let mut restored = PciConfigPorts::from_snapshot(&back);
        assert_eq!(read32(&mut restored, ADDRESS_OFFSET), 0x8000_1234);
    }

    /// A function with one 8 KiB BAR that remembers what was written to it.
    struct Scratch {
        config: config_space::ConfigSpace,
        mem: Vec<u8>,
    }

    impl Scratch {
        fn new(bus: &PciBus) -> Self {
            let mut config = config_space::ConfigSpace::new(config_space::FunctionId {
                vendor: 0x1234,
                device: 0x5678,
                class: 0xff,
                subclass: 0,
                prog_if: 0,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            });
            let size = 0x2000;
            let addr = bus.allocate_bar(size).unwrap();
            config
                .add_bar(
                    0,
                    config_space::BarSpec {
                        size,
                        is_64bit: false,
                    },
                    addr,
                )
                .unwrap();
            Scratch {
                config,
                mem: vec![0; size as usize],
            }
        }
    }

    impl PciFunction for Scratch {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bar_ranges(&self) -> Vec<(usize, u64, u64)> {
            self.config
                .bar_range(0)
                .map(|(a, l)| vec![(0, a, l)])
                .unwrap_or_default()
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.mem[o..o + data.len()]);
        }
        fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) -> Option<VmRequest> {
            let o = offset as usize;
            self.mem[o..o + data.len()].copy_from_slice(data);
            None
        }
    }

    fn config_addr(slot: u32, reg: u32) -> u32 {
        CONFIG_ENABLE | (slot << 11) | reg
    }

    fn cfg_read32(ports: &mut PciConfigPorts, slot: u32, reg: u32) -> u32 {
        ports.write(ADDRESS_OFFSET, &config_addr(slot, reg).to_le_bytes());
        read32(ports, DATA_OFFSET)
    }

    #[test]
    fn functions_answer_configuration_cycles_and_their_bars_follow_the_guest() {
        let bus = PciBus::new();
        let scratch = Arc::new(Mutex::new(Scratch::new(&bus)));
        bus.attach(3, scratch.clone()).unwrap();
        assert_eq!(bus.attach(3, scratch.clone()), Err(PciError::SlotTaken(3)));
        assert_eq!(bus.attach(32, scratch), Err(PciError::NoSuchSlot(32)));
        let mut ports = PciConfigPorts {
            bus: bus.clone(),
            ..PciConfigPorts::default()
        };
        assert_eq!(cfg_read32(&mut ports, 3, 0), 0x5678_1234);
        assert_eq!(cfg_read32(&mut ports, 4, 0), 0xffff_ffff, "empty slot");
        // Function 1 of a present slot, and the enable bit clear, find nothing.
        ports.write(ADDRESS_OFFSET, &(config_addr(3, 0) | 1 << 8).to_le_bytes());
        assert_eq!(read32(&mut ports, DATA_OFFSET), 0xffff_ffff);
        ports.write(
            ADDRESS_OFFSET,
            &((3u32 << 11) & !CONFIG_ENABLE).to_le_bytes(),
        );
        assert_eq!(read32(&mut ports, DATA_OFFSET), 0xffff_ffff);
        // A 16-bit read of the device id through the upper half of the data window.
        ports.write(ADDRESS_OFFSET, &config_addr(3, 0).to_le_bytes());
        let mut w = [0u8; 2];
        ports.read(DATA_OFFSET + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);

        let bar = cfg_read32(&mut ports, 3, 0x10);
        assert_eq!(bar, PCI_MMIO_BASE as u32);
        let mut window = PciMmioWindow { bus: bus.clone() };
        let mut b = [0u8; 4];
        window.read(0x10, &mut b);
        assert_eq!(b, [0xff; 4], "memory decoding is still off");
        // The guest enables memory decoding, writes through the BAR, then moves it.
        ports.write(ADDRESS_OFFSET, &config_addr(3, 4).to_le_bytes());
        ports.write(DATA_OFFSET, &[0x02, 0, 0, 0]);
        window.write(0x10, &[1, 2, 3, 4]);
        window.read(0x10, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        ports.write(ADDRESS_OFFSET, &config_addr(3, 0x10).to_le_bytes());
        ports.write(DATA_OFFSET, &0xd000_0000u32.to_le_bytes());
        window.read(0x10, &mut b);
        assert_eq!(b, [0xff; 4], "nothing at the old place");
        window.read(0xd000_0000 - PCI_MMIO_BASE + 0x10, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
    }

    #[test]
    fn bars_are_allocated_aligned_and_the_window_can_fill_up() {
        let bus = PciBus::new();
        assert_eq!(bus.allocate_bar(0x1000).unwrap(), PCI_MMIO_BASE);
        assert_eq!(bus.allocate_bar(0x4000).unwrap(), PCI_MMIO_BASE + 0x4000);
        assert_eq!(bus.allocate_bar(0x100).unwrap(), PCI_MMIO_BASE + 0x8000);
        assert_eq!(
            bus.allocate_bar(PCI_MMIO_SIZE),
            Err(PciError::WindowFull(PCI_MMIO_SIZE.next_power_of_two()))
        );
    }
}
