//! MSI-X: a function's capability, vector table and pending-bit array, delivered through KVM.
//!
//! ```text
//! capability (12 bytes):  id 0x11 | next | message control u16 | table offset|BIR u32 | PBA offset|BIR u32
//!   message control: bits 0-10 table size - 1, bit 14 function mask, bit 15 enable
//! table entry (16 bytes): address low u32 | address high u32 | data u32 | vector control u32 (bit 0: masked)
//! PBA: one pending bit per vector, in u64 words
//! ```
//!
//! Each vector is a [`MsiVector`] (a GSI routed to the entry's message, raised through its
//! irqfd). A vector raised while masked (its own mask bit or the function mask) sets its pending
//! bit instead and is delivered when unmasked, as the PCI spec requires. The table, the PBA and
//! the control bits are the device's state; routes are programmed again from them at restore.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::devices::interrupts::{GsiRouter, InterruptError, MsiMessage, MsiVector};

pub const MSIX_CAPABILITY_ID: u8 = 0x11;
pub const MSIX_ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// The largest table a function may have (the control field's 11 bits).
pub const MAX_VECTORS: u16 = 2048;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub control: u32,
}

/// The saved form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

pub struct Msix {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<MsiVector>,
}

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("MSI-X: {0}")]
    Interrupt(#[from] InterruptError),
    #[error("MSI-X: the saved table has {saved} vectors, this device has {ours}")]
    TableSize { saved: usize, ours: usize },
}

impl Msix {
    /// A table of `count` vectors, all masked, as at power-on.
    pub fn new(count: u16, router: &Arc<GsiRouter>) -> Result<Self, MsixError> {
        let count = count.clamp(1, MAX_VECTORS);
        let vectors = (0..count)
            .map(|_| router.vector())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Msix {
            entries: vec![
                MsixEntry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                usize::from(count)
            ],
            pending: vec![0; usize::from(count).div_ceil(64)],
            enabled: false,
            function_masked: false,
            vectors,
        })
    }

    /// The capability's enable bit: while it is set the function may not use INTx.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn count(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability body (after id and next) and which of its bits the guest may write.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(self.count() - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(table_bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(pba_bar)).to_le_bytes());
        let mut writable = vec![0u8; 10];
        writable[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, writable)
    }

    /// The guest wrote the capability's message control word.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for i in 0..self.entries.len() {
            self.sync(i);
        }
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.entry_bytes(offset);
        copy_out(&bytes, offset % MSIX_ENTRY_SIZE, data);
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        if index >= self.entries.len() {
            return;
        }
        let mut bytes = self.entry_bytes(offset);
        let start = (offset % MSIX_ENTRY_SIZE) as usize;
        let end = (start + data.len()).min(bytes.len());
        bytes[start..end].copy_from_slice(&data[..end - start]);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        self.entries[index] = MsixEntry {
            address: u64::from(word(0)) | u64::from(word(4)) << 32,
            data: word(8),
            control: word(12) & VECTOR_MASKED,
        };
        self.sync(index);
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = Vec::with_capacity(self.pending.len() * 8);
        for w in &self.pending {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        copy_out(&bytes, offset, data);
    }

    fn entry_bytes(&self, offset: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        if let Some(e) = self.entries.get((offset / MSIX_ENTRY_SIZE) as usize) {
            b[0..8].copy_from_slice(&e.address.to_le_bytes());
            b[8..12].copy_from_slice(&e.data.to_le_bytes());
            b[12..16].copy_from_slice(&e.control.to_le_bytes());
        }
        b
    }

    fn masked(&self, index: usize) -> bool {
        !self.enabled || self.function_masked || self.entries[index].control & VECTOR_MASKED != 0
    }

    /// Programs vector `index`'s route from its entry, and delivers it if it became unmasked
    /// with its pending bit set.
    fn sync(&mut self, index: usize) {
        let entry = self.entries[index];
        let route = (self.enabled && entry.control & VECTOR_MASKED == 0).then_some(MsiMessage {
            address: entry.address,
            data: entry.data,
        });
        if let Err(e) = self.vectors[index].set_route(route) {
            log::warn!("MSI-X vector {index}: {e}");
        }
        if !self.masked(index) && self.take_pending(index) {
            self.vectors[index].raise();
        }
    }

    fn take_pending(&mut self, index: usize) -> bool {
        let (word, bit) = (index / 64, 1u64 << (index % 64));
        let was = self.pending[word] & bit != 0;
        self.pending[word] &= !bit;
        was
    }

    /// Raises vector `index` (from the device's I/O thread), or marks it pending while masked.
    pub fn trigger(&mut self, index: u16) {
        let index = usize::from(index);
        if index >= self.entries.len() {
            return;
        }
        if self.masked(index) {
            self.pending[index / 64] |= 1 << (index % 64);
        } else {
            self.vectors[index].raise();
        }
    }

    pub fn save(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Puts back a saved table over this device's fresh vectors and programs their routes.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), MsixError> {
        if state.entries.len() != self.entries.len() || state.pending.len() != self.pending.len() {
            return Err(MsixError::TableSize {
                saved: state.entries.len(),
                ours: self.entries.len(),
            });
        }
        self.entries = state.entries.clone();
        self.pending = state.pending.clone();
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for i in 0..self.entries.len() {
            self.sync(i);
        }
        Ok(())
    }
}

fn copy_out(bytes: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| bytes.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msix(count: u16) -> (Msix, Arc<GsiRouter>) {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = GsiRouter::new(vm);
        (Msix::new(count, &router).unwrap(), router)
    }

    fn program(m: &mut Msix, i: u64, data: u32, masked: bool) {
        let base = i * MSIX_ENTRY_SIZE;
        m.table_write(base, &0xfee0_0000u32.to_le_bytes());
        m.table_write(base + 4, &0u32.to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn pending(m: &Msix) -> u64 {
        let mut b = [0u8; 8];
        m.pba_read(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn table_reads_back_and_masked_vectors_stay_pending_until_unmasked() {
        let (mut m, _router) = msix(3);
        program(&mut m, 1, 0x51, true);
        let mut b = [0u8; 4];
        m.table_read(MSIX_ENTRY_SIZE + 8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x51);
        m.table_read(MSIX_ENTRY_SIZE + 12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        // Not enabled yet: pending.
        m.trigger(1);
        assert_eq!(pending(&m), 0b010);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(pending(&m), 0b010, "the vector itself is still masked");
        m.table_write(MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(pending(&m), 0, "delivered on unmask");
        // Function mask holds every vector back.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(1);
        m.trigger(7);
        assert_eq!(pending(&m), 0b010, "out-of-range vectors are ignored");
        m.set_control(CONTROL_ENABLE);
        assert_eq!(pending(&m), 0);
    }

    #[test]
    fn state_survives_a_restore_onto_fresh_vectors() {
        let (mut m, router) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0x60, false);
        program(&mut m, 1, 0x61, true);
        m.trigger(1);
        let saved = m.save();
        let mut fresh = Msix::new(2, &router).unwrap();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.save(), saved);
        assert_eq!(pending(&fresh), 0b10);
        let mut other = Msix::new(3, &router).unwrap();
        assert!(matches!(
            other.restore(&saved),
            Err(MsixError::TableSize { saved: 2, ours: 3 })
        ));
    }

    #[test]
    fn capability_describes_the_table_and_pba() {
        let (mut m, _router) = msix(4);
        let (body, writable) = m.capability(0, 0x1000, 0, 0x1800);
        let mut config = crate::devices::pci::config_space::ConfigSpace::new(
            crate::devices::pci::config_space::FunctionId {
                vendor: 0x1af4,
                device: 0x1042,
                class: 1,
                subclass: 0,
                prog_if: 0,
                revision: 1,
                subsystem_vendor: 0,
                subsystem: 0,
            },
        );
        let at = config
            .add_capability(MSIX_CAPABILITY_ID, &body, &writable)
            .unwrap();
        // The guest sets enable and function mask; the table size field stays.
        config.write(at + 2, &0xffffu16.to_le_bytes());
        let control = config.u16_at(at + 2);
        assert_eq!(control, 0xc003);
        m.set_control(control);
        assert!(m.enabled && m.function_masked);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 3);
        assert_eq!(
            u32::from_le_bytes([body[2], body[3], body[4], body[5]]),
            0x1000
        );
        assert_eq!(
            u32::from_le_bytes([body[6], body[7], body[8], body[9]]),
            0x1800
        );
        assert_eq!(writable[1], 0xc0);
        assert_eq!(m.table_size(), 64);
        assert_eq!(m.pba_size(), 8);
    }
}
