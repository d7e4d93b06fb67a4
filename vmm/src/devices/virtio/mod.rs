//! Virtio devices (virtio 1.x) and their PCI transport.
//!
//! A device ([`VirtioDevice`]) says what it offers (type, features, queue sizes, its
//! configuration space) and works its queues once the driver has set it up; the transport
//! ([`pci::VirtioPciDevice`]) is everything between it and the guest: the PCI function with its
//! virtio capabilities, feature negotiation, the device status machine, queue configuration
//! (split virtqueues, rust-vmm's `virtio-queue`), notifications through ioeventfds and
//! interrupts through MSI-X. The transport saves and restores all of it (negotiated features,
//! status, every queue's addresses and ring positions, MSI-X vectors) in the one state walk, so a
//! device gets back the same queues after any migration mode.

pub mod block;
pub mod net;
pub mod pci;
pub mod tap;
pub mod worker;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::lock;
use super::pci::intx::Intx;
use super::pci::msix::Msix;

/// Feature bit numbers common to every device type (virtio 1.x section 6).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// "No MSI-X vector" in the common configuration's vector fields.
pub const NO_VECTOR: u16 = 0xffff;

/// ISR status bits (read-to-clear), for a driver on INTx.
pub(crate) const ISR_QUEUE: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("queue {index}: {detail}")]
    Queue { index: usize, detail: String },
    #[error("registering the queue notification for queue {index}: {source}")]
    Ioeventfd {
        index: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Device(String),
}

/// What a device gets when the driver sets DRIVER_OK (or when a restore finds it set).
pub struct Activation {
    /// The features both sides agreed on.
    pub features: u64,
    /// The queues the driver enabled, each with the eventfd its notifications arrive on.
    /// Shared with the transport, which saves their positions while the device is paused.
    pub queues: Vec<(Arc<Mutex<Queue>>, Arc<EventFd>)>,
    pub memory: Arc<GuestMemoryMmap>,
    pub interrupt: Arc<VirtioInterrupt>,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2: block, 1: network).
    fn device_type(&self) -> u16;
    /// PCI class and subclass for its function.
    fn pci_class(&self) -> (u8, u8);
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Everything it offers, VERSION_1 included.
    fn device_features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts working the queues (typically on an I/O thread).
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// The driver reset the device: stop working the queues and drop them.
    fn reset(&mut self);
    /// Stop touching the queues and guest memory (requests in flight complete first).
    fn pause(&mut self) {}
    /// Carry on; look at every queue once, since notifications may have come while paused.
    fn resume(&mut self) {}
}

/// How a device raises its interrupts: per queue, through the MSI-X vector the driver chose
/// while MSI-X is enabled, else by setting the ISR bit and asserting the function's INTx pin
/// (as QEMU's virtio-pci does: a driver that left MSI-X off gets INTx whatever the vectors say).
pub struct VirtioInterrupt {
    msix: Arc<Mutex<Msix>>,
    queue_vectors: Vec<AtomicU16>,
    intx: Arc<Intx>,
}

impl VirtioInterrupt {
    /// For device tests: `queues` queues with no MSI-X vector and an INTx pin wired to
    /// nothing (the ISR alone), over the GSI router of a fresh KVM VM (keep it alive as long).
    #[cfg(test)]
    fn for_tests(queues: usize) -> (Arc<super::interrupts::GsiRouter>, Arc<Self>) {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = super::interrupts::GsiRouter::new(vm);
        let vectors = u16::try_from(queues + 1).unwrap();
        let msix = Arc::new(Mutex::new(Msix::new(vectors, &router).unwrap()));
        let interrupt = Self::with_intx(msix, &vec![NO_VECTOR; queues], Arc::new(Intx::new()));
        (router, Arc::new(interrupt))
    }

    fn with_intx(msix: Arc<Mutex<Msix>>, queue_vectors: &[u16], intx: Arc<Intx>) -> Self {
        VirtioInterrupt {
            msix,
            queue_vectors: queue_vectors.iter().map(|v| AtomicU16::new(*v)).collect(),
            intx,
        }
    }

    /// Tells the driver queue `index` has used buffers.
    pub fn notify_queue(&self, index: usize) {
        let vector = self
            .queue_vectors
            .get(index)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        if vector != NO_VECTOR {
            let mut msix = lock(&self.msix);
            if msix.enabled() {
                msix.trigger(vector);
                return;
            }
        }
        self.intx.raise(ISR_QUEUE);
    }

    /// Reads and clears the ISR, as a driver's ISR read does (device tests).
    #[cfg(test)]
    fn take_isr(&self) -> u8 {
        self.intx.take()
    }

    fn set_queue_vector(&self, index: usize, vector: u16) {
        if let Some(v) = self.queue_vectors.get(index) {
            v.store(vector, Ordering::Release);
        }
    }
}

/// Copies the bytes of a device's configuration space at `offset` into `data`; bytes past its
/// end read as zero (a driver reading too far gets zeros, not a fault).
pub(crate) fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| space.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}
