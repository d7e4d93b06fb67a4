//! The PCI configuration ports 0xcf8..=0xcff (configuration mechanism #1) with no PCI bus behind
//! them: a guest finds the mechanism but no device.
//!
//! - 0xcf8, 32-bit: the configuration address; stored and read back, so the guest's mechanism
//!   check passes (Linux writes 0x80000000 and expects to read it back).
//! - 0xcfc..=0xcff (the data window), any size: reads are all-ones ("no device": vendor ID
//!   0xffff), writes are dropped.
//! - 0xcf9, 8-bit: the chipset's reset control register (as on a PIIX/ICH): a write with bit 2
//!   (reset CPU) set asks for a reset ([`VmRequest::Reset`]); Linux uses it for `reboot=pci`.
//! - Any other access inside 0xcf8..=0xcfb reads all-ones and is otherwise ignored.
//!
//! Register it with `len` [`PCI_CONFIG_PORT_COUNT`] at [`PCI_CONFIG_BASE_PORT`]. Its state is the
//! address and reset-control registers ([`PciConfigSnapshot`]).

use serde::{Deserialize, Serialize};

use super::{DeviceContext, DeviceError, Persist, PioDevice, VmRequest};

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

/// PCI configuration mechanism #1 with an empty bus.
#[derive(Debug, Default)]
pub struct PciConfigPorts {
    address: u32,
    reset_control: u8,
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
        }
    }
}

impl Persist for PciConfigPorts {
    type State = PciConfigSnapshot;

    fn power_on(_: &mut DeviceContext<'_>) -> Result<Self, DeviceError> {
        Ok(PciConfigPorts::default())
    }

    fn save(&self) -> PciConfigSnapshot {
        self.snapshot()
    }

    fn restore(_: &mut DeviceContext<'_>, state: &PciConfigSnapshot) -> Result<Self, DeviceError> {
        Ok(PciConfigPorts::from_snapshot(state))
    }
}

impl PioDevice for PciConfigPorts {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (ADDRESS_OFFSET, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (RESET_CONTROL_OFFSET, 1) => data[0] = self.reset_control,
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
            // Configuration data writes go nowhere (there is no device), and other accesses to
            // 0xcf8..=0xcfb are not part of mechanism #1.
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0xcfc, the configuration data window.
    const DATA_OFFSET: u16 = 4;

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
}
