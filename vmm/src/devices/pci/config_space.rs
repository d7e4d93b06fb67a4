//! A PCI function's type-0 configuration space: the standard header, its BARs and a capability
//! list, with the write masks a real function has.
//!
//! ```text
//! 0x00  vendor id u16 | device id u16
//! 0x04  command u16   | status u16          (status bit 3: interrupt status, bit 4: capability
//!                                           list present)
//! 0x08  revision u8   | class code u24      (prog-if, subclass, class)
//! 0x0c  cache line u8 | latency u8 | header type u8 (0) | BIST u8
//! 0x10  BAR0 .. BAR5 (0x10..0x28)           32-bit memory BARs, or 64-bit pairs
//! 0x2c  subsystem vendor u16 | subsystem id u16
//! 0x34  capabilities pointer u8
//! 0x3c  interrupt line u8 | interrupt pin u8 | min grant | max latency
//! 0x40..0x100  capabilities, each: id u8 | next u8 | body
//! ```
//!
//! The guest can write only what a function lets it write (command bits, BAR address bits,
//! interrupt line, and the bytes a capability marks writable); reads of a BAR after writing
//! all-ones return its size mask, which is how drivers and firmware size BARs. The whole space
//! is the function's saved state, so BARs a guest moved stay where it put them after an update.
//! The interrupt pin (0x3d) is read-only; the interrupt line (0x3c) is what firmware (here: the
//! VMM, see [`super::intx_gsi`]) wrote there, plain storage the guest may overwrite. The status
//! register's interrupt-status bit is the function's (see [`super::intx`]) and is restored with
//! the guest-writable bytes.

use serde::{Deserialize, Serialize};

pub const CONFIG_SPACE_SIZE: usize = 256;
pub const BAR_COUNT: usize = 6;
const BAR0: usize = 0x10;
const CAPABILITIES_POINTER: usize = 0x34;
const FIRST_CAPABILITY: usize = 0x40;
const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Status register bit 3: the function has an INTx interrupt pending.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
const STATUS: usize = 0x06;
/// Command register bits a guest may set: I/O space, memory space, bus master, INTx disable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 = 0x1 | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
const BAR_MEMORY_64: u32 = 0b100;

/// What a function is, as its header says.
#[derive(Clone, Copy, Debug)]
pub struct FunctionId {
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// One memory BAR: its size (a power of two, at least 4 KiB) and whether it is 64-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarSpec {
    pub size: u64,
    pub is_64bit: bool,
}

/// The saved form: the bytes (the layout itself, BAR sizes, capabilities and write masks, is
/// rebuilt by the function at restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    pub bytes: Vec<u8>,
}

impl ConfigSpaceState {
    /// The saved interrupt-status bit (false for a state too short to have one).
    pub fn interrupt_status(&self) -> bool {
        self.bytes
            .get(STATUS)
            .is_some_and(|b| u16::from(*b) & STATUS_INTERRUPT != 0)
    }

    /// Records the function's interrupt status (it lives outside the bytes while it runs).
    pub fn set_interrupt_status(&mut self, pending: bool) {
        if let Some(b) = self.bytes.get_mut(STATUS) {
            *b =
                (*b & !(STATUS_INTERRUPT as u8)) | if pending { STATUS_INTERRUPT as u8 } else { 0 };
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// Bit set: the guest may write that bit.
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarSpec>; BAR_COUNT],
    /// Where the next capability goes.
    next_capability: usize,
    /// The offset of the last capability's `next` byte (0: none yet).
    last_next_pointer: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("BAR {index}: size {size:#x} is not a power of two of at least 4 KiB")]
    BarSize { index: usize, size: u64 },
    #[error("BAR {index} is taken (or is the upper half of a 64-bit BAR)")]
    BarTaken { index: usize },
    #[error("capabilities do not fit in the configuration space")]
    CapabilitiesFull,
    #[error("saved configuration space has the wrong size ({0} bytes)")]
    StateSize(usize),
}

impl ConfigSpace {
    pub fn new(id: FunctionId) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_next_pointer: 0,
        };
        c.set_u16(0x00, id.vendor);
        c.set_u16(0x02, id.device);
        c.bytes[0x08] = id.revision;
        c.bytes[0x09] = id.prog_if;
        c.bytes[0x0a] = id.subclass;
        c.bytes[0x0b] = id.class;
        c.set_u16(0x2c, id.subsystem_vendor);
        c.set_u16(0x2e, id.subsystem);
        c.writable[0x04..0x06].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Declares memory BAR `index` at guest address `addr` (aligned to its size).
    pub fn add_bar(
        &mut self,
        index: usize,
        spec: BarSpec,
        addr: u64,
    ) -> Result<(), ConfigSpaceError> {
        if spec.size < 0x1000 || !spec.size.is_power_of_two() {
            return Err(ConfigSpaceError::BarSize {
                index,
                size: spec.size,
            });
        }
        let slots = if spec.is_64bit { 2 } else { 1 };
        if index + slots > BAR_COUNT
            || self.bar_slot_used(index)
            || (slots == 2 && self.bar_slot_used(index + 1))
        {
            return Err(ConfigSpaceError::BarTaken { index });
        }
        self.bars[index] = Some(spec);
        let mask = !(spec.size - 1);
        let off = BAR0 + index * 4;
        let low_flags = if spec.is_64bit { BAR_MEMORY_64 } else { 0 };
        self.set_u32(off, (addr as u32 & mask as u32) | low_flags);
        self.writable[off..off + 4].copy_from_slice(&(mask as u32).to_le_bytes());
        if spec.is_64bit {
            self.set_u32(off + 4, (addr >> 32) as u32);
            self.writable[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    fn bar_slot_used(&self, index: usize) -> bool {
        self.bars[index].is_some()
            || (index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64bit))
    }

    /// Appends a capability: `body` follows the id and next-pointer bytes; `writable` (same
    /// length as `body`) says which of its bits the guest may write. Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigSpaceError> {
        let off = self.next_capability;
        let len = (2 + body.len() + 3) & !3;
        if off + len > CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::CapabilitiesFull);
        }
        self.bytes[off] = id;
        self.bytes[off + 2..off + 2 + body.len()].copy_from_slice(body);
        for (i, w) in writable.iter().enumerate().take(body.len()) {
            self.writable[off + 2 + i] = *w;
        }
        if self.last_next_pointer == 0 {
            self.bytes[CAPABILITIES_POINTER] = off as u8;
            let status = self.u16_at(0x06) | STATUS_CAPABILITIES;
            self.set_u16(0x06, status);
        } else {
            self.bytes[self.last_next_pointer] = off as u8;
        }
        self.last_next_pointer = off + 1;
        self.next_capability = off + len;
        Ok(off)
    }

    /// A configuration read of `data.len()` bytes at `offset` (any alignment within the space;
    /// beyond it reads as zero, as an absent extended space does).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A configuration write: only writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SPACE_SIZE {
                break;
            }
            let w = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !w) | (v & w);
        }
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    fn set_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn command(&self) -> u16 {
        self.u16_at(0x04)
    }

    /// Sets the read-only interrupt pin register (1 = INTA .. 4 = INTD, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    /// What firmware writes to the interrupt line register (the guest may change it later).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.bytes[INTERRUPT_LINE] = line;
    }

    /// The status register's interrupt-status bit.
    pub fn interrupt_status(&self) -> bool {
        self.u16_at(STATUS) & STATUS_INTERRUPT != 0
    }

    pub fn set_interrupt_status(&mut self, pending: bool) {
        let status = self.u16_at(STATUS) & !STATUS_INTERRUPT;
        self.set_u16(STATUS, status | if pending { STATUS_INTERRUPT } else { 0 });
    }

    /// Where BAR `index` decodes now: (guest address, size), or None when it is not a BAR,
    /// memory decoding is off, or the guest left it unassigned (0, or all-ones while sizing).
    pub fn bar_range(&self, index: usize) -> Option<(u64, u64)> {
        let spec = (*self.bars.get(index)?)?;
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let off = BAR0 + index * 4;
        let mask = !(spec.size - 1);
        let mut addr = u64::from(self.u32_at(off)) & 0xffff_fff0;
        if spec.is_64bit {
            addr |= u64::from(self.u32_at(off + 4)) << 32;
        }
        addr &= mask;
        if addr == 0 || addr.checked_add(spec.size).is_none() || addr == mask {
            return None;
        }
        Some((addr, spec.size))
    }

    pub fn save(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Puts back the bytes a function saved. The function is rebuilt as at power-on first, so
    /// its layout (BAR sizes, capabilities, write masks) is this build's; only the values the
    /// guest could change, and the interrupt-status bit, come from the state.
    pub fn restore_values(&mut self, state: &ConfigSpaceState) -> Result<(), ConfigSpaceError> {
        if state.bytes.len() != CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::StateSize(state.bytes.len()));
        }
        for at in 0..CONFIG_SPACE_SIZE {
            let w = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !w) | (state.bytes[at] & w);
        }
        self.set_interrupt_status(state.interrupt_status());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> FunctionId {
        FunctionId {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x0002,
        }
    }

    fn read32(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_says_what_the_function_is() {
        let mut c = ConfigSpace::new(id());
        c.write(0x3d, &[4]);
        assert_eq!(c.bytes[0x3d], 0, "the interrupt pin is read-only");
        c.write(INTERRUPT_LINE, &[11]);
        assert_eq!(c.bytes[INTERRUPT_LINE], 11);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8) >> 8, 0x01_00_00);
        assert_eq!(read32(&c, 0x2c), 0x0002_1af4);
        assert_eq!(c.u16_at(0x06) & STATUS_CAPABILITIES, 0);
    }

    #[test]
    fn bars_size_and_move_as_the_guest_writes_them() {
        let mut c = ConfigSpace::new(id());
        c.add_bar(
            0,
            BarSpec {
                size: 0x4000,
                is_64bit: true,
            },
            0xc000_4000,
        )
        .unwrap();
        assert_eq!(c.bar_range(0), None, "memory decoding is off");
        c.write(0x04, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_range(0), Some((0xc000_4000, 0x4000)));
        assert_eq!(read32(&c, 0x10) & 0xf, BAR_MEMORY_64);
        // Sizing: all-ones reads back the size mask.
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(read32(&c, 0x10), 0xffff_c000 | BAR_MEMORY_64);
        assert_eq!(read32(&c, 0x14), 0xffff_ffff);
        assert_eq!(c.bar_range(0), None, "a BAR being sized does not decode");
        // Moved above 4 GiB.
        c.write(0x10, &0xe000_0000u32.to_le_bytes());
        c.write(0x14, &1u32.to_le_bytes());
        assert_eq!(c.bar_range(0), Some((0x1_e000_0000, 0x4000)));
        // Read-only parts stay.
        c.write(0, &[0; 4]);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert!(
            c.add_bar(
                1,
                BarSpec {
                    size: 0x1000,
                    is_64bit: false
                },
                0
            )
            .is_err()
        );
        assert!(
            c.add_bar(
                2,
                BarSpec {
                    size: 0x1800,
                    is_64bit: false
                },
                0
            )
            .is_err()
        );
    }

    #[test]
    fn capabilities_chain_and_only_marked_bits_are_writable() {
        let mut c = ConfigSpace::new(id());
        let a = c
            .add_capability(0x11, &[0xaa, 0xbb], &[0xff, 0x00])
            .unwrap();
        let b = c.add_capability(0x09, &[1, 2, 3, 4, 5], &[0; 5]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_ne!(c.u16_at(0x06) & STATUS_CAPABILITIES, 0);
        assert_eq!(c.bytes[CAPABILITIES_POINTER], 0x40);
        assert_eq!(c.bytes[0x41], 0x44);
        assert_eq!(c.bytes[0x45], 0);
        c.write(a + 2, &[0x12, 0x34]);
        assert_eq!(c.bytes[a + 2..a + 4], [0x12, 0xbb]);
    }

    #[test]
    fn pin_and_line_read_back_and_only_the_line_is_writable() {
        let mut c = ConfigSpace::new(id());
        c.set_interrupt_pin(1);
        c.set_interrupt_line(17);
        assert_eq!(read32(&c, INTERRUPT_LINE) & 0xffff, 0x01_11);
        c.write(INTERRUPT_PIN, &[3]);
        c.write(INTERRUPT_LINE, &[5]);
        assert_eq!(read32(&c, INTERRUPT_LINE) & 0xffff, 0x01_05);
        // The interrupt-status bit is the function's: not writable, but saved and restored.
        c.write(0x06, &STATUS_INTERRUPT.to_le_bytes());
        assert!(!c.interrupt_status());
        c.set_interrupt_status(true);
        assert_eq!(c.u16_at(0x06), STATUS_INTERRUPT);
        let saved = c.save();
        assert!(saved.interrupt_status());
        let mut fresh = ConfigSpace::new(id());
        fresh.restore_values(&saved).unwrap();
        assert!(fresh.interrupt_status());
        assert_eq!(fresh.bytes[INTERRUPT_LINE], 5, "the line the guest wrote");
        assert_eq!(
            fresh.bytes[INTERRUPT_PIN], 0,
            "the pin is the rebuilt function's"
        );
        let mut quiet = c.save();
        quiet.set_interrupt_status(false);
        fresh.restore_values(&quiet).unwrap();
        assert!(!fresh.interrupt_status());
    }

    #[test]
    fn restore_takes_only_what_the_guest_could_change() {
        let mut c = ConfigSpace::new(id());
        c.add_bar(
            0,
            BarSpec {
                size: 0x1000,
                is_64bit: false,
            },
            0xc000_0000,
        )
        .unwrap();
        c.write(0x04, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        let mut saved = c.save();
        saved.bytes[0] = 0x99; // vendor id: not writable, not restored
        let mut fresh = ConfigSpace::new(id());
        fresh
            .add_bar(
                0,
                BarSpec {
                    size: 0x1000,
                    is_64bit: false,
                },
                0xc000_0000,
            )
            .unwrap();
        fresh.restore_values(&saved).unwrap();
        assert_eq!(fresh.bar_range(0), Some((0xd000_0000, 0x1000)));
        assert_eq!(fresh.u16_at(0), 0x1af4);
        saved.bytes.pop();
        assert!(fresh.restore_values(&saved).is_err());
    }
}
