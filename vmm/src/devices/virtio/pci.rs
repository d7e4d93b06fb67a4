//! The virtio 1.x PCI transport ("modern" device, virtio spec 4.1): one PCI function per device.
//!
//! BAR 0 (64-bit memory, 32 KiB) holds every structure the capabilities point at:
//!
//! ```text
//! 0x0000  common configuration (features, status, queue setup)   VIRTIO_PCI_CAP_COMMON_CFG
//! 0x1000  ISR status (read clears)                               VIRTIO_PCI_CAP_ISR_CFG
//! 0x2000  device-specific configuration                          VIRTIO_PCI_CAP_DEVICE_CFG
//! 0x3000  queue notifications, queue N at 0x3000 + 4 N           VIRTIO_PCI_CAP_NOTIFY_CFG
//! 0x4000  MSI-X table                                             (MSI-X capability)
//! 0x6000  MSI-X pending-bit array
//! ```
//!
//! Common configuration (little-endian):
//!
//! ```text
//! 0x00 device_feature_select u32   0x04 device_feature u32 (ro)
//! 0x08 driver_feature_select u32   0x0c driver_feature u32
//! 0x10 config_msix_vector u16      0x12 num_queues u16 (ro)
//! 0x14 device_status u8            0x15 config_generation u8 (ro)
//! 0x16 queue_select u16            0x18 queue_size u16
//! 0x1a queue_msix_vector u16       0x1c queue_enable u16
//! 0x1e queue_notify_off u16 (ro)   0x20 queue_desc u64
//! 0x28 queue_driver u64            0x30 queue_device u64
//! ```
//!
//! A queue notification is a write to its notify address; once the driver sets DRIVER_OK each
//! enabled queue's address is an ioeventfd, so a notification wakes the device's I/O thread
//! without a VM exit to this process. The device works the queues only after DRIVER_OK, and a
//! driver that breaks the rules (features it was not offered, a queue size that is not a power
//! of two, rings outside guest RAM) gets the device in the state the spec says, never a crash.
//!
//! Interrupts: with MSI-X enabled, each queue's vector; otherwise INTx (pin INTA, the line the
//! slot is wired to, see [`crate::devices::pci::intx`]): the device sets the ISR's queue bit and
//! asserts the pin, the driver's read of the ISR clears it. The ISR's state crosses updates as
//! the configuration space's interrupt-status bit.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    Activation, ISR_QUEUE, NO_VECTOR, VIRTIO_F_VERSION_1, VirtioDevice, VirtioError,
    VirtioInterrupt,
};
use crate::devices::pci::config_space::{
    BarSpec, COMMAND_INTX_DISABLE, ConfigSpace, ConfigSpaceState, FunctionId,
};
use crate::devices::pci::intx::{INTERRUPT_PIN_INTA, Intx};
use crate::devices::pci::msix::{MSIX_CAPABILITY_ID, Msix, MsixState};
use crate::devices::pci::{PciError, PciFunction, intx_gsi};
use crate::devices::{DeviceContext, DeviceError, VmRequest, lock};

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern devices are 0x1040 + the virtio device id.
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const VENDOR_CAPABILITY_ID: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
/// One MSI-X vector per queue and one for configuration changes, within the table's space.
const MAX_QUEUES: usize = 255;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;

/// One queue as the driver configured it, and where its rings stood when saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub msix_vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The transport's saved state; the device's own comes beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub config_space: ConfigSpaceState,
    pub msix: MsixState,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub config_msix_vector: u16,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueConfig>,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    config: ConfigSpace,
    msix: Arc<Mutex<Msix>>,
    /// Where the MSI-X capability is in the configuration space.
    msix_cap: usize,
    vm: Arc<VmFd>,
    memory: Arc<GuestMemoryMmap>,
    max_sizes: Vec<u16>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    /// While active: the live queues (shared with the device) and their notification eventfds.
    active: Option<ActiveQueues>,
    /// INTA and the ISR (shared with the device's interrupt while active).
    intx: Arc<Intx>,
    /// Restored from a saved state: the interrupt line register is the saved one, not the
    /// slot's power-on value.
    restored: bool,
}

struct ActiveQueues {
    queues: Vec<(usize, Arc<Mutex<Queue>>, Arc<EventFd>)>,
    /// Where the ioeventfds are registered (BAR 0's address when activated).
    notify_base: Option<u64>,
    interrupt: Arc<VirtioInterrupt>,
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// The function as at power-on, BAR 0 placed by the PCI bus.
    pub fn new(ctx: &mut DeviceContext<'_>, device: D) -> Result<Self, DeviceError> {
        let setup = |e: &dyn std::fmt::Display| DeviceError::Setup(e.to_string());
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(DeviceError::Setup(format!(
                "a virtio device needs 1 to {MAX_QUEUES} queues, this one has {}",
                max_sizes.len()
            )));
        }
        let (class, subclass) = device.pci_class();
        let mut config = ConfigSpace::new(FunctionId {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device.device_type(),
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40 + device.device_type(),
        });
        let bar = ctx.pci.allocate_bar(BAR_SIZE).map_err(|e| setup(&e))?;
        config
            .add_bar(
                0,
                BarSpec {
                    size: BAR_SIZE,
                    is_64bit: true,
                },
                bar,
            )
            .map_err(|e| setup(&e))?;
        for (kind, offset, length) in [
            (CAP_COMMON, COMMON_OFFSET, 0x38),
            (CAP_ISR, ISR_OFFSET, 1),
            (CAP_DEVICE, DEVICE_OFFSET, REGION_SIZE),
        ] {
            let body = vendor_capability(kind, offset, length, None);
            config
                .add_capability(VENDOR_CAPABILITY_ID, &body, &vec![0; body.len()])
                .map_err(|e| setup(&e))?;
        }
        let notify_len = max_sizes.len() as u64 * u64::from(NOTIFY_MULTIPLIER);
        let body = vendor_capability(
            CAP_NOTIFY,
            NOTIFY_OFFSET,
            notify_len,
            Some(NOTIFY_MULTIPLIER),
        );
        config
            .add_capability(VENDOR_CAPABILITY_ID, &body, &vec![0; body.len()])
            .map_err(|e| setup(&e))?;
        let msix = Msix::new(max_sizes.len() as u16 + 1, &ctx.interrupts).map_err(|e| setup(&e))?;
        if msix.table_size() > MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET
            || msix.pba_size() > BAR_SIZE - MSIX_PBA_OFFSET
        {
            return Err(DeviceError::Setup(format!(
                "{} MSI-X vectors do not fit in the BAR",
                msix.count()
            )));
        }
        let (body, writable) =
            msix.capability(0, MSIX_TABLE_OFFSET as u32, 0, MSIX_PBA_OFFSET as u32);
        let msix_cap = config
            .add_capability(MSIX_CAPABILITY_ID, &body, &writable)
            .map_err(|e| setup(&e))?;
        config.set_interrupt_pin(INTERRUPT_PIN_INTA);
        let queues = max_sizes
            .iter()
            .map(|&size| QueueConfig {
                size,
                msix_vector: NO_VECTOR,
                ..QueueConfig::default()
            })
            .collect();
        Ok(VirtioPciDevice {
            device,
            config,
            msix: Arc::new(Mutex::new(msix)),
            msix_cap,
            vm: ctx.vm.clone(),
            memory: ctx.memory.clone(),
            max_sizes,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            active: None,
            intx: Arc::new(Intx::new()),
            restored: false,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn save_transport(&self) -> TransportState {
        let mut queues = self.queues.clone();
        if let Some(active) = &self.active {
            for (index, queue, _) in &active.queues {
                let q = lock(queue);
                if let Some(saved) = queues.get_mut(*index) {
                    saved.next_avail = q.next_avail();
                    saved.next_used = q.next_used();
                }
            }
        }
        let mut config_space = self.config.save();
        config_space.set_interrupt_status(self.intx.pending());
        TransportState {
            config_space,
            msix: lock(&self.msix).save(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            config_msix_vector: self.config_msix_vector,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            queues,
        }
    }

    /// Puts back a saved transport over this freshly built one; a device the driver had
    /// started is started again with its queues where they were (paused until resume).
    pub fn restore_transport(&mut self, s: &TransportState) -> Result<(), DeviceError> {
        let invalid = |e: &dyn std::fmt::Display| DeviceError::InvalidState(e.to_string());
        if s.queues.len() != self.max_sizes.len() {
            return Err(DeviceError::InvalidState(format!(
                "the saved device has {} queues, this one {}",
                s.queues.len(),
                self.max_sizes.len()
            )));
        }
        self.config
            .restore_values(&s.config_space)
            .map_err(|e| invalid(&e))?;
        lock(&self.msix).restore(&s.msix).map_err(|e| invalid(&e))?;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.config_msix_vector = s.config_msix_vector;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.queue_select = s.queue_select;
        self.queues = s.queues.clone();
        self.restored = true;
        // The ISR: only the queue cause exists, so the interrupt-status bit says it all.
        self.intx.restore_status(if self.config.interrupt_status() {
            ISR_QUEUE
        } else {
            0
        });
        self.update_intx_enable();
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0 {
            self.activate().map_err(|e| invalid(&e))?;
        }
        Ok(())
    }

    /// INTx may be asserted while the command register allows it and MSI-X is off.
    fn update_intx_enable(&self) {
        let enabled =
            self.config.command() & COMMAND_INTX_DISABLE == 0 && !lock(&self.msix).enabled();
        self.intx.set_enabled(enabled);
    }

    fn offered(&self) -> u64 {
        self.device.device_features() | 1 << VIRTIO_F_VERSION_1
    }

    fn bar0(&self) -> Option<u64> {
        self.config.bar_range(0).map(|(addr, _)| addr)
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let value: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.offered() & 0xffff_ffff,
                1 => self.offered() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_msix_vector),
            0x12 => self.max_sizes.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => self.selected().map_or(0, |q| u64::from(q.size)),
            0x1a => self
                .selected()
                .map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            0x1c => self.selected().map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select),
            0x20 => self.selected().map_or(0, |q| q.desc),
            0x24 => self.selected().map_or(0, |q| q.desc >> 32),
            0x28 => self.selected().map_or(0, |q| q.driver),
            0x2c => self.selected().map_or(0, |q| q.driver >> 32),
            0x30 => self.selected().map_or(0, |q| q.device),
            0x34 => self.selected().map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        // Queue setup is frozen once the driver has started the device.
        let live = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            0x10 => self.config_msix_vector = v as u16,
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 if !live => {
                let max = self
                    .max_sizes
                    .get(usize::from(self.queue_select))
                    .copied()
                    .unwrap_or(0);
                if let Some(q) = self.selected() {
                    // Larger than offered is ignored; a non-power-of-two size is refused when the
                    // queue is validated at DRIVER_OK.
                    if v as u16 <= max {
                        q.size = v as u16;
                    }
                }
            }
            0x1a => {
                let index = usize::from(self.queue_select);
                if let Some(q) = self.selected() {
                    q.msix_vector = v as u16;
                }
                if let Some(active) = &self.active {
                    active.interrupt.set_queue_vector(index, v as u16);
                }
            }
            0x1c if !live => {
                if let Some(q) = self.selected() {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20 if !live => set_low(self.selected().map(|q| &mut q.desc), v),
            0x24 if !live => set_high(self.selected().map(|q| &mut q.desc), v),
            0x28 if !live => set_low(self.selected().map(|q| &mut q.driver), v),
            0x2c if !live => set_high(self.selected().map(|q| &mut q.driver), v),
            0x30 if !live => set_low(self.selected().map(|q| &mut q.device), v),
            0x34 if !live => set_high(self.selected().map(|q| &mut q.device), v),
            _ => {}
        }
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        // FEATURES_OK only if the driver accepted a subset of what was offered, VERSION_1 in it.
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.offered() == 0
                && self.driver_features & 1 << VIRTIO_F_VERSION_1 != 0;
            if !ok {
                log::warn!(
                    "virtio: driver features {:#x} refused (offered {:#x})",
                    self.driver_features,
                    self.offered()
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        let starting = status & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        if starting && status & STATUS_FEATURES_OK == 0 {
            status = self.status | STATUS_FAILED;
            self.status = status;
            return;
        }
        self.status = status
            & (STATUS_ACKNOWLEDGE
                | STATUS_DRIVER
                | STATUS_FEATURES_OK
                | STATUS_DRIVER_OK
                | STATUS_FAILED
                | STATUS_NEEDS_RESET)
            | (self.status & STATUS_NEEDS_RESET);
        if starting {
            match self.activate() {
                Ok(()) => self.device.resume(),
                Err(e) => {
                    log::warn!("virtio: the driver's setup is not usable: {e}");
                    self.status |= STATUS_NEEDS_RESET;
                    self.config_generation = self.config_generation.wrapping_add(1);
                }
            }
        }
    }

    /// Builds the live queues from the configuration, registers their notifications and
    /// hands them to the device (which stays paused until resumed).
    fn activate(&mut self) -> Result<(), VirtioError> {
        let features = self.driver_features;
        let event_idx = features & 1 << super::VIRTIO_RING_F_EVENT_IDX != 0;
        let vectors: Vec<u16> = self.queues.iter().map(|q| q.msix_vector).collect();
        let interrupt = Arc::new(VirtioInterrupt::with_intx(
            self.msix.clone(),
            &vectors,
            self.intx.clone(),
        ));
        let mut live = Vec::new();
        for (index, cfg) in self.queues.iter().enumerate() {
            if !cfg.enabled {
                continue;
            }
            let state = QueueState {
                max_size: self.max_sizes[index],
                next_avail: cfg.next_avail,
                next_used: cfg.next_used,
                event_idx_enabled: event_idx,
                size: cfg.size,
                ready: true,
                desc_table: cfg.desc,
                avail_ring: cfg.driver,
                used_ring: cfg.device,
            };
            let queue = Queue::try_from(state).map_err(|e| VirtioError::Queue {
                index,
                detail: format!("{e:?}"),
            })?;
            if !queue.is_valid(self.memory.as_ref()) {
                return Err(VirtioError::Queue {
                    index,
                    detail: "its rings are not in guest RAM or not aligned".into(),
                });
            }
            let eventfd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| {
                VirtioError::Device(format!("creating a notification eventfd: {e}"))
            })?;
            live.push((index, Arc::new(Mutex::new(queue)), Arc::new(eventfd)));
        }
        let mut active = ActiveQueues {
            queues: live,
            notify_base: None,
            interrupt: interrupt.clone(),
        };
        self.register_notifications(&mut active)?;
        self.device.activate(Activation {
            features,
            queues: active
                .queues
                .iter()
                .map(|(_, q, e)| (q.clone(), e.clone()))
                .collect(),
            memory: self.memory.clone(),
            interrupt,
        })?;
        self.active = Some(active);
        Ok(())
    }

    fn register_notifications(&self, active: &mut ActiveQueues) -> Result<(), VirtioError> {
        let Some(base) = self.bar0() else {
            return Ok(());
        };
        for (index, _, eventfd) in &active.queues {
            let addr = notify_address(base, *index);
            self.vm
                .register_ioevent(eventfd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|source| VirtioError::Ioeventfd {
                    index: *index,
                    source,
                })?;
        }
        active.notify_base = Some(base);
        Ok(())
    }

    fn unregister_notifications(&self, active: &mut ActiveQueues) {
        if let Some(base) = active.notify_base.take() {
            for (index, _, eventfd) in &active.queues {
                let addr = notify_address(base, *index);
                let _ =
                    self.vm
                        .unregister_ioevent(eventfd, &IoEventAddress::Mmio(addr), NoDatamatch);
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        if let Some(mut active) = self.active.take() {
            self.unregister_notifications(&mut active);
        }
        self.intx.take();
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_msix_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        for (q, &max) in self.queues.iter_mut().zip(&self.max_sizes) {
            *q = QueueConfig {
                size: max,
                msix_vector: NO_VECTOR,
                ..QueueConfig::default()
            };
        }
    }

    pub fn pause(&mut self) {
        self.device.pause();
    }

    pub fn resume(&mut self) {
        if self.active.is_some() {
            self.device.resume();
        }
        self.intx.resume();
    }
}

fn set_low(field: Option<&mut u64>, v: u64) {
    if let Some(f) = field {
        *f = (*f & !0xffff_ffff) | (v & 0xffff_ffff);
    }
}

fn set_high(field: Option<&mut u64>, v: u64) {
    if let Some(f) = field {
        *f = (*f & 0xffff_ffff) | (v << 32);
    }
}

fn notify_address(bar0: u64, queue: usize) -> u64 {
    bar0 + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
}

/// `struct virtio_pci_cap` after its id and next bytes (and `notify_off_multiplier` for the
/// notify capability).
fn vendor_capability(kind: u8, offset: u64, length: u64, multiplier: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if multiplier.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, kind, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = multiplier {
        body.extend_from_slice(&m.to_le_bytes());
    }
    body
}

impl<D: VirtioDevice> PciFunction for VirtioPciDevice<D> {
    fn attached(&mut self, slot: u8) -> Result<(), PciError> {
        let gsi = intx_gsi(slot);
        if !self.restored {
            // What firmware does: the pin's IOAPIC input, for drivers that read it.
            self.config.set_interrupt_line(gsi as u8);
        }
        self.intx
            .wire(self.vm.clone(), gsi)
            .map_err(|e| PciError::Intx {
                slot,
                detail: e.to_string(),
            })
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.set_interrupt_status(self.intx.pending());
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let before = self.bar0();
        self.config.write(offset, data);
        // The MSI-X capability's control word (enable, function mask).
        let control = self.msix_cap + 2;
        if offset < control + 2 && control < offset + data.len() {
            lock(&self.msix).set_control(self.config.u16_at(control));
        }
        // The command register's INTx-disable, or MSI-X enable, may have changed.
        if offset < 0x06 && 0x04 < offset + data.len()
            || offset < control + 2 && control < offset + data.len()
        {
            self.update_intx_enable();
        }
        // A BAR the guest moved (or turned off) takes the queue notifications with it.
        if self.bar0() != before
            && let Some(mut active) = self.active.take()
        {
            self.unregister_notifications(&mut active);
            if let Err(e) = self.register_notifications(&mut active) {
                log::warn!("virtio: moving the queue notifications: {e}");
            }
            self.active = Some(active);
        }
    }

    fn bar_ranges(&self) -> Vec<(usize, u64, u64)> {
        self.config
            .bar_range(0)
            .map(|(addr, len)| vec![(0, addr, len)])
            .unwrap_or_default()
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < ISR_OFFSET => self.common_read(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                if let Some(first) = data.first_mut() {
                    *first = self.intx.take();
                }
            }
            o if o < ISR_OFFSET + REGION_SIZE => {}
            o if o < DEVICE_OFFSET + REGION_SIZE => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if o < NOTIFY_OFFSET + REGION_SIZE => {}
            o if o < MSIX_PBA_OFFSET => lock(&self.msix).table_read(o - MSIX_TABLE_OFFSET, data),
            o if o < BAR_SIZE => lock(&self.msix).pba_read(o - MSIX_PBA_OFFSET, data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) -> Option<VmRequest> {
        match offset {
            o if o < ISR_OFFSET => self.common_write(o - COMMON_OFFSET, data),
            o if o < DEVICE_OFFSET => {}
            o if o < DEVICE_OFFSET + REGION_SIZE => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if o < NOTIFY_OFFSET + REGION_SIZE => {
                // A notification that reached us instead of its ioeventfd (registered only
                // while the device runs): pass it on the same way.
                let index = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(active) = &self.active
                    && let Some((_, _, eventfd)) =
                        active.queues.iter().find(|(i, _, _)| *i == index)
                {
                    let _ = eventfd.write(1);
                }
            }
            o if o < MSIX_PBA_OFFSET => lock(&self.msix).table_write(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
        None
    }
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    #[cfg(test)]
    fn config_byte(&self, at: usize) -> u8 {
        let mut b = [0u8; 1];
        self.config.read(at, &mut b);
        b[0]
    }
}

impl<D: VirtioDevice> Drop for VirtioPciDevice<D> {
    fn drop(&mut self) {
        if let Some(mut active) = self.active.take() {
            self.device.reset();
            self.unregister_notifications(&mut active);
        }
    }
}

/// A virtio device on PCI is a device of the machine like any other: its state is the
/// transport's and the device's, its config and host fds are the device's.
impl<D> crate::devices::Persist for VirtioPciDevice<D>
where
    D: VirtioDevice + crate::devices::Persist,
{
    type State = (TransportState, D::State);
    type Config = D::Config;

    fn power_on(ctx: &mut DeviceContext<'_>, config: &D::Config) -> Result<Self, DeviceError> {
        let device = D::power_on(ctx, config)?;
        VirtioPciDevice::new(ctx, device)
    }

    fn save(&self) -> Self::State {
        (
            self.save_transport(),
            crate::devices::Persist::save(&self.device),
        )
    }

    fn restore(
        ctx: &mut DeviceContext<'_>,
        config: &D::Config,
        state: &Self::State,
    ) -> Result<Self, DeviceError> {
        let device = D::restore(ctx, config, &state.1)?;
        let mut pci = VirtioPciDevice::new(ctx, device)?;
        pci.restore_transport(&state.0)?;
        Ok(pci)
    }

    fn host_fds(&self) -> Vec<crate::devices::HostFd> {
        crate::devices::Persist::host_fds(&self.device)
    }

    fn pause(&mut self) {
        VirtioPciDevice::pause(self);
    }

    fn resume(&mut self) {
        VirtioPciDevice::resume(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Persist;
    use vm_memory::{Bytes, GuestAddress};

    /// A device with two queues that records what it was given.
    #[derive(Default)]
    struct Probe {
        activations: Vec<(u64, usize)>,
        interrupt: Option<Arc<VirtioInterrupt>>,
        ram: u64,
        resets: usize,
        running: bool,
        config: [u8; 8],
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u16 {
            2
        }
        fn pci_class(&self) -> (u8, u8) {
            (0x01, 0x80)
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn device_features(&self) -> u64 {
            1 << super::super::VIRTIO_RING_F_EVENT_IDX
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
            use vm_memory::GuestMemoryBackend;
            self.activations.push((a.features, a.queues.len()));
            self.ram = a.memory.last_addr().0 + 1;
            self.interrupt = Some(a.interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.running = false;
        }
        fn resume(&mut self) {
            self.running = true;
        }
        fn pause(&mut self) {
            self.running = false;
        }
    }

    impl Persist for Probe {
        type State = u8;
        type Config = ();
        fn power_on(_: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
            Ok(Probe {
                config: *b"cpr-blk\0",
                ..Probe::default()
            })
        }
        fn save(&self) -> u8 {
            self.activations.len() as u8
        }
        fn restore(_: &mut DeviceContext<'_>, _: &(), _: &u8) -> Result<Self, DeviceError> {
            Self::power_on_probe()
        }
    }

    impl Probe {
        fn power_on_probe() -> Result<Self, DeviceError> {
            Ok(Probe {
                config: *b"cpr-blk\0",
                ..Probe::default()
            })
        }
    }

    struct Machine {
        vm: Arc<VmFd>,
        memory: Arc<GuestMemoryMmap>,
        interrupts: Arc<crate::devices::interrupts::GsiRouter>,
    }

    impl Machine {
        fn new() -> Self {
            let kvm = kvm_ioctls::Kvm::new().unwrap();
            let vm = Arc::new(kvm.create_vm().unwrap());
            vm.create_irq_chip().unwrap();
            let memory =
                Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
            let interrupts = crate::devices::interrupts::GsiRouter::new(vm.clone());
            Machine {
                vm,
                memory,
                interrupts,
            }
        }

        fn with<R>(&self, f: impl FnOnce(&mut DeviceContext<'_>) -> R) -> R {
            let console =
                crate::devices::console::Console::open(&crate::cli::SerialSpec::Null, |_, _| None)
                    .unwrap()
                    .output();
            let drained = Arc::new(EventFd::new(0).unwrap());
            let mut ctx = DeviceContext {
                vm: &self.vm,
                memory: self.memory.clone(),
                interrupts: self.interrupts.clone(),
                pci: crate::devices::pci::PciBus::new(),
                console: &console,
                input_drained: &drained,
                serial_irq: None,
                host_fds: Default::default(),
            };
            f(&mut ctx)
        }
    }

    fn w(dev: &mut VirtioPciDevice<Probe>, offset: u64, v: u64, len: usize) {
        dev.bar_write(0, offset, &v.to_le_bytes()[..len]);
    }

    fn r(dev: &mut VirtioPciDevice<Probe>, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        dev.bar_read(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// What a driver does up to FEATURES_OK, then queue 0 at `size` in RAM at 0x10000.
    fn driver_setup(dev: &mut VirtioPciDevice<Probe>, features: u64, size: u16) {
        dev.config_write(0x04, &0x06u16.to_le_bytes());
        w(dev, 0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        w(dev, 0x08, 0, 4);
        w(dev, 0x0c, features & 0xffff_ffff, 4);
        w(dev, 0x08, 1, 4);
        w(dev, 0x0c, features >> 32, 4);
        w(
            dev,
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
        w(dev, 0x16, 0, 2);
        w(dev, 0x18, u64::from(size), 2);
        w(dev, 0x20, 0x10000, 4);
        w(dev, 0x28, 0x11000, 4);
        w(dev, 0x30, 0x12000, 4);
        w(dev, 0x1c, 1, 2);
    }

    const ALL_OK: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn a_driver_finds_the_capabilities_negotiates_and_starts_the_device() {
        let m = Machine::new();
        let mut dev = m
            .with(|ctx| VirtioPciDevice::<Probe>::power_on(ctx, &()))
            .unwrap();
        let mut b = [0u8; 4];
        dev.config_read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1042_1af4);
        // Walk the capability list as a driver does: the four virtio structures and MSI-X.
        let mut kinds = Vec::new();
        let mut at = usize::from(dev.config_byte(0x34));
        while at != 0 {
            match dev.config_byte(at) {
                VENDOR_CAPABILITY_ID => kinds.push(dev.config_byte(at + 3)),
                MSIX_CAPABILITY_ID => kinds.push(0x11),
                other => panic!("unexpected capability {other:#x}"),
            }
            at = usize::from(dev.config_byte(at + 1));
        }
        assert_eq!(kinds, [CAP_COMMON, CAP_ISR, CAP_DEVICE, CAP_NOTIFY, 0x11]);
        // Offered: VERSION_1 and EVENT_IDX.
        w(&mut dev, 0x00, 1, 4);
        assert_eq!(r(&mut dev, 0x04, 4), 1, "VERSION_1 is bit 32");
        w(&mut dev, 0x00, 0, 4);
        assert_eq!(r(&mut dev, 0x04, 4), 1 << 29);
        assert_eq!(r(&mut dev, 0x12, 2), 2, "two queues");
        assert_eq!(
            r(&mut dev, DEVICE_OFFSET, 4),
            u64::from_le_bytes(*b"cpr-blk\0") & 0xffff_ffff
        );

        driver_setup(&mut dev, 1 << 32 | 1 << 29, 8);
        assert_eq!(
            r(&mut dev, 0x14, 1) as u8 & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        w(&mut dev, 0x14, u64::from(ALL_OK), 1);
        assert_eq!(r(&mut dev, 0x14, 1) as u8, ALL_OK);
        assert_eq!(dev.device().activations, [(1 << 32 | 1 << 29, 1)]);
        assert!(dev.device().running);
        // Queue setup is frozen while the device runs.
        w(&mut dev, 0x18, 4, 2);
        assert_eq!(r(&mut dev, 0x18, 2), 8);
        // Reset: everything back to power-on.
        w(&mut dev, 0x14, 0, 1);
        assert_eq!(r(&mut dev, 0x14, 1), 0);
        assert_eq!(r(&mut dev, 0x18, 2), 16);
        assert_eq!(dev.device().resets, 1);
    }

    fn probe(m: &Machine) -> VirtioPciDevice<Probe> {
        m.with(|ctx| VirtioPciDevice::<Probe>::power_on(ctx, &()))
            .unwrap()
    }

    #[test]
    fn features_that_were_not_offered_do_not_start_the_device() {
        let m = Machine::new();
        let mut dev = probe(&m);
        driver_setup(&mut dev, 1 << 32 | 1 << 5, 8);
        assert_eq!(r(&mut dev, 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        w(&mut dev, 0x14, u64::from(ALL_OK), 1);
        assert_ne!(r(&mut dev, 0x14, 1) as u8 & STATUS_FAILED, 0);
        assert!(dev.device().activations.is_empty());
    }

    #[test]
    fn a_legacy_driver_without_version_1_is_refused() {
        let m = Machine::new();
        let mut dev = probe(&m);
        driver_setup(&mut dev, 1 << 29, 8);
        assert_eq!(r(&mut dev, 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        w(&mut dev, 0x14, u64::from(ALL_OK), 1);
        assert!(dev.device().activations.is_empty());
    }

    #[test]
    fn a_queue_size_that_is_not_a_power_of_two_needs_a_reset_and_nothing_runs() {
        let m = Machine::new();
        let mut dev = probe(&m);
        driver_setup(&mut dev, 1 << 32, 6);
        w(&mut dev, 0x14, u64::from(ALL_OK), 1);
        assert_ne!(r(&mut dev, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
        assert!(dev.device().activations.is_empty());
        assert!(!dev.device().running);
        // After a reset, the same driver with a good size starts it.
        w(&mut dev, 0x14, 0, 1);
        driver_setup(&mut dev, 1 << 32, 8);
        w(&mut dev, 0x14, u64::from(ALL_OK), 1);
        assert_eq!(dev.device().activations.len(), 1);
    }

    #[test]
    fn a_queue_larger_than_offered_keeps_the_offered_size() {
        let m = Machine::new();
        let mut dev = probe(&m);
        driver_setup(&mut dev, 1 << 32, 32);
        assert_eq!(r(&mut dev, 0x18, 2), 16);
    }

    #[test]
    fn rings_outside_guest_ram_need_a_reset_and_nothing_runs() {
        let m = Machine::new();
        let mut dev = probe(&m);
        driver_setup(&mut dev, 1 << 32, 8);
        // Guest RAM is 1 MiB here.
        w(&mut dev, 0x30, 0x4000_0000, 4);
        w(&mut dev, 0x14, u64::from(ALL_OK), 1);
        assert_ne!(r(&mut dev, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
        assert!(dev.device().activations.is_empty());
    }

    #[test]
    fn notifications_before_driver_ok_go_nowhere() {
        let m = Machine::new();
        let mut dev = probe(&m);
        // Before anything, and with the queue set up but DRIVER_OK not yet written.
        w(&mut dev, NOTIFY_OFFSET, 0, 2);
        driver_setup(&mut dev, 1 << 32, 8);
        w(&mut dev, NOTIFY_OFFSET, 0, 2);
        w(&mut dev, NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER), 1, 2);
        assert!(dev.device().activations.is_empty());
        assert!(!dev.device().running);
        assert!(dev.active.is_none(), "no queue exists to be notified");
        // DRIVER_OK then starts it once.
        w(&mut dev, 0x14, u64::from(ALL_OK), 1);
        assert_eq!(dev.device().activations, [(1 << 32, 1)]);
        assert!(dev.device().running);
    }

    #[test]
    fn a_queue_that_does_not_exist_reads_as_size_0_and_takes_no_writes() {
        let m = Machine::new();
        let mut dev = probe(&m);
        w(&mut dev, 0x16, 9, 2);
        assert_eq!(r(&mut dev, 0x18, 2), 0);
        w(&mut dev, 0x18, 4, 2);
        assert_eq!(r(&mut dev, 0x18, 2), 0);
        w(&mut dev, 0x1c, 1, 2);
        assert_eq!(r(&mut dev, 0x1c, 2), 0);
    }

    #[test]
    fn a_running_device_restores_with_its_queues_where_they_were() {
        let m = Machine::new();
        let mut dev = m
            .with(|ctx| VirtioPciDevice::<Probe>::power_on(ctx, &()))
            .unwrap();
        driver_setup(&mut dev, 1 << 32, 8);
        w(&mut dev, 0x1a, 1, 2);
        w(&mut dev, 0x14, u64::from(ALL_OK), 1);
        // The device consumed three requests.
        {
            let active = dev.active.as_ref().unwrap();
            let mut q = lock(&active.queues[0].1);
            q.set_next_avail(3);
            q.set_next_used(3);
        }
        m.memory.write_obj(3u16, GuestAddress(0x11002)).unwrap();
        dev.pause();
        let saved = dev.save();
        assert_eq!(saved.0.queues[0].next_avail, 3);
        assert_eq!(saved.0.queues[0].msix_vector, 1);
        let bytes = crate::devices::encode_state(&saved).unwrap();
        drop(dev);
        let back = crate::devices::decode_state(&bytes).unwrap();
        let mut restored = m
            .with(|ctx| VirtioPciDevice::<Probe>::restore(ctx, &(), &back))
            .unwrap();
        assert_eq!(r(&mut restored, 0x14, 1) as u8, ALL_OK);
        assert_eq!(restored.device().activations, [(1 << 32, 1)]);
        assert!(
            !restored.device().running,
            "paused until the machine resumes"
        );
        restored.resume();
        assert!(restored.device().running);
        let active = restored.active.as_ref().unwrap();
        assert_eq!(lock(&active.queues[0].1).next_avail(), 3);
        // A notification written to the BAR reaches the queue's eventfd.
        let eventfd = active.queues[0].2.clone();
        w(&mut restored, NOTIFY_OFFSET, 0, 2);
        assert_eq!(eventfd.read().unwrap(), 1);
        // The device's interrupt: with MSI-X enabled (function masked), queue 0 has vector 1
        // (masked, so pending); a queue without a vector sets the ISR bit, which a read clears.
        assert_eq!(restored.device().ram, 1 << 20);
        let control = restored.msix_cap + 2;
        restored.config_write(control, &0xc000u16.to_le_bytes());
        let interrupt = restored.device().interrupt.clone().unwrap();
        interrupt.notify_queue(0);
        assert_eq!(r(&mut restored, MSIX_PBA_OFFSET, 1), 0b10);
        interrupt.notify_queue(1);
        assert_eq!(r(&mut restored, ISR_OFFSET, 1), 1);
        assert_eq!(r(&mut restored, ISR_OFFSET, 1), 0);
        // A state from a device with another queue count is refused.
        let mut wrong = back.clone();
        wrong.0.queues.pop();
        assert!(
            m.with(|ctx| VirtioPciDevice::<Probe>::restore(ctx, &(), &wrong))
                .is_err()
        );
    }

    /// A started device (queue 0, no MSI-X vector) attached in `slot` of a bus, as a driver
    /// that stays on INTx leaves it.
    fn on_intx(m: &Machine, slot: u8) -> Arc<Mutex<VirtioPciDevice<Probe>>> {
        let dev = Arc::new(Mutex::new(probe(m)));
        let bus = crate::devices::pci::PciBus::new();
        bus.attach(slot, dev.clone()).unwrap();
        let mut d = lock(&dev);
        driver_setup(&mut d, 1 << 32, 8);
        w(&mut d, 0x14, u64::from(ALL_OK), 1);
        drop(d);
        dev
    }

    /// [`on_intx`] in slot 2 of its own machine, and the interrupt the device was given.
    struct IntxRig {
        dev: Arc<Mutex<VirtioPciDevice<Probe>>>,
        interrupt: Arc<VirtioInterrupt>,
        _machine: Machine,
    }

    impl IntxRig {
        fn new() -> Self {
            let machine = Machine::new();
            let dev = on_intx(&machine, 2);
            let interrupt = lock(&dev).device().interrupt.clone().unwrap();
            IntxRig {
                dev,
                interrupt,
                _machine: machine,
            }
        }
    }

    fn queue_0_vector_0(d: &mut VirtioPciDevice<Probe>) {
        w(d, 0x16, 0, 2);
        w(d, 0x1a, 0, 2);
    }

    fn asserts(dev: &VirtioPciDevice<Probe>) -> u64 {
        dev.intx.line().unwrap().asserts()
    }

    fn status_interrupt(dev: &mut VirtioPciDevice<Probe>) -> bool {
        let mut b = [0u8; 2];
        dev.config_read(0x06, &mut b);
        u16::from_le_bytes(b) & crate::devices::pci::config_space::STATUS_INTERRUPT != 0
    }

    #[test]
    fn the_function_has_pin_inta_and_the_line_of_its_slot() {
        let m = Machine::new();
        for slot in [1u8, 3, 9] {
            let dev = on_intx(&m, slot);
            let mut d = lock(&dev);
            assert_eq!(d.config_byte(0x3d), 1, "INTA");
            assert_eq!(u32::from(d.config_byte(0x3c)), intx_gsi(slot));
            assert_eq!(d.intx.line().unwrap().gsi(), intx_gsi(slot));
            d.config_write(0x3c, &[0x0b]);
            assert_eq!(
                d.config_byte(0x3c),
                0x0b,
                "the line is storage the guest may write"
            );
        }
        assert_eq!((intx_gsi(1), intx_gsi(7), intx_gsi(8)), (17, 23, 16));
    }

    #[test]
    fn a_queue_interrupt_without_msix_sets_the_isr_and_asserts_inta_until_read() {
        let rig = IntxRig::new();
        let (mut d, interrupt) = (lock(&rig.dev), rig.interrupt.clone());
        assert!(!status_interrupt(&mut d));
        interrupt.notify_queue(0);
        assert_eq!(asserts(&d), 1);
        assert!(status_interrupt(&mut d), "status register bit 3");
        assert!(d.intx.pending());
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 1);
        assert!(!status_interrupt(&mut d), "reading the ISR clears it");
        assert!(
            !d.intx.pending(),
            "so the EOI's resample leaves the pin down"
        );
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 0);
        // A queue vector the driver wrote counts only while MSI-X is enabled.
        queue_0_vector_0(&mut d);
        interrupt.notify_queue(0);
        assert_eq!(asserts(&d), 2);
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 1);
    }

    #[test]
    fn intx_disable_in_the_command_register_keeps_the_pin_down() {
        let rig = IntxRig::new();
        let (mut d, interrupt) = (lock(&rig.dev), rig.interrupt.clone());
        d.config_write(0x04, &(0x06 | COMMAND_INTX_DISABLE).to_le_bytes());
        interrupt.notify_queue(0);
        assert_eq!(asserts(&d), 0);
        assert!(status_interrupt(&mut d), "the status shows it all the same");
        // Enabling INTx again with the interrupt pending asserts the pin.
        d.config_write(0x04, &0x06u16.to_le_bytes());
        assert_eq!(asserts(&d), 1);
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 1);
    }

    #[test]
    fn with_msix_enabled_nothing_goes_through_intx() {
        let rig = IntxRig::new();
        let (mut d, interrupt) = (lock(&rig.dev), rig.interrupt.clone());
        queue_0_vector_0(&mut d);
        let control = d.msix_cap + 2;
        d.config_write(control, &0xc000u16.to_le_bytes()); // enabled, function masked
        interrupt.notify_queue(0);
        assert_eq!(r(&mut d, MSIX_PBA_OFFSET, 1), 1, "vector 0 pending");
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 0);
        // A queue without a vector sets the ISR (a polling driver may read it), no INTx.
        interrupt.notify_queue(1);
        assert_eq!(asserts(&d), 0);
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 1);
        // MSI-X off again: INTx.
        d.config_write(control, &0u16.to_le_bytes());
        interrupt.notify_queue(0);
        assert_eq!(asserts(&d), 1);
    }

    #[test]
    fn a_pending_intx_and_the_line_the_guest_wrote_cross_a_save_and_restore() {
        let m = Machine::new();
        let dev = on_intx(&m, 2);
        let bytes = {
            let mut d = lock(&dev);
            d.config_write(0x3c, &[0x0b]);
            d.device().interrupt.clone().unwrap().notify_queue(0);
            d.pause();
            crate::devices::encode_state(&d.save()).unwrap()
        };
        drop(dev);
        let back = crate::devices::decode_state(&bytes).unwrap();
        let restored = Arc::new(Mutex::new(
            m.with(|ctx| VirtioPciDevice::<Probe>::restore(ctx, &(), &back))
                .unwrap(),
        ));
        crate::devices::pci::PciBus::new()
            .attach(2, restored.clone())
            .unwrap();
        let mut d = lock(&restored);
        assert_eq!(
            d.config_byte(0x3c),
            0x0b,
            "the guest's line, not the slot's"
        );
        assert_eq!(asserts(&d), 0, "nothing while the machine is stopped");
        d.resume();
        assert_eq!(asserts(&d), 1, "asserted again: the interrupt is not lost");
        assert!(status_interrupt(&mut d));
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 1);
        // Saved with nothing pending: restored with nothing pending.
        d.pause();
        let quiet = d.save();
        drop(d);
        drop(restored); // its queue notifications go with it
        let again = m
            .with(|ctx| VirtioPciDevice::<Probe>::restore(ctx, &(), &quiet))
            .unwrap();
        assert!(!again.intx.pending());
    }
}
