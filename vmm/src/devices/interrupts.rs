//! Message-signalled interrupts for emulated devices: KVM's GSI routing table and irqfds.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so one [`GsiRouter`] per VM owns it: the
//! default routes KVM set up with the in-kernel irqchip (GSI 0-15 to the PICs and the IOAPIC,
//! 16-23 to the IOAPIC) stay in every table it writes, and MSI routes are added above them.
//! A device's vector is an [`MsiVector`]: a GSI routed to an MSI message and an eventfd
//! registered as that GSI's irqfd, so raising it is one eventfd write from any thread, without
//! a VM exit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::lock;

/// GSIs below this are the IOAPIC's pins; MSI routes are allocated from here.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on this host (KVM_CAP_IRQ_ROUTING reports 4096).
const MAX_GSI: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("no free GSI for another MSI vector (limit {MAX_GSI})")]
    NoGsi,
    #[error("KVM_SET_GSI_ROUTING: {0}")]
    Routing(kvm_ioctls::Error),
    #[error("KVM_IRQFD for GSI {gsi}: {source}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// An MSI message as a device's MSI-X table holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// One VM's GSI routing table.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    inner: Mutex<RouterState>,
}

struct RouterState {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(GsiRouter {
            vm,
            inner: Mutex::new(RouterState {
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            }),
        })
    }

    /// A new vector: the next free GSI, with an irqfd registered for it. Devices allocate in
    /// the order the machine builds them, so a restored machine gets the same numbers.
    pub fn vector(self: &Arc<Self>) -> Result<MsiVector, InterruptError> {
        let gsi = {
            let mut s = lock(&self.inner);
            if s.next_gsi >= MAX_GSI {
                return Err(InterruptError::NoGsi);
            }
            s.next_gsi += 1;
            s.next_gsi - 1
        };
        let irqfd =
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(InterruptError::EventFd)?;
        self.vm
            .register_irqfd(&irqfd, gsi)
            .map_err(|source| InterruptError::Irqfd { gsi, source })?;
        Ok(MsiVector {
            gsi,
            irqfd,
            router: self.clone(),
        })
    }

    /// Routes `gsi` to `message`, or removes its route (None: a masked or unprogrammed vector).
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut s = lock(&self.inner);
        let changed = match message {
            Some(m) => s.msi.insert(gsi, m) != Some(m),
            None => s.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&s)?;
        }
        Ok(())
    }

    fn commit(&self, s: &RouterState) -> Result<(), InterruptError> {
        let entries = table(&s.msi);
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::NoGsi)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(InterruptError::Routing)
    }
}

/// The default routes KVM installs with its in-kernel irqchip, then the MSI routes.
fn table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut out = Vec::with_capacity(40 + msi.len());
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..16 {
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        out.push(irqchip(gsi, chip, gsi % 8));
    }
    for gsi in 0..FIRST_MSI_GSI {
        out.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.address as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
        e.u.msi.data = m.data;
        out.push(e);
    }
    out
}

/// One MSI vector of a device: raising it delivers the routed message (an eventfd write, which
/// KVM turns into the interrupt without a VM exit).
pub struct MsiVector {
    gsi: u32,
    irqfd: EventFd,
    router: Arc<GsiRouter>,
}

impl MsiVector {
    #[cfg(test)]
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Points the vector at `message` (None: not deliverable now).
    pub fn set_route(&self, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        self.router.route(self.gsi, message)
    }

    pub fn raise(&self) {
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("raising MSI on GSI {}: {e}", self.gsi);
        }
    }
}

impl Drop for MsiVector {
    fn drop(&mut self) {
        let _ = self.router.vm.unregister_irqfd(&self.irqfd, self.gsi);
        let _ = self.router.route(self.gsi, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_default_routes_and_adds_msi_above_them() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x50,
            },
        );
        let t = table(&msi);
        assert_eq!(t.len(), 16 + 24 + 1);
        // GSI 0: the PIT, on the master PIC's pin 0 and the IOAPIC's pin 0.
        let gsi0: Vec<_> = t.iter().filter(|e| e.gsi == 0).collect();
        assert_eq!(gsi0.len(), 2);
        // SAFETY: reading the member this test wrote.
        let last = unsafe { t[t.len() - 1].u.msi };
        assert_eq!((last.address_lo, last.data), (0xfee0_0000, 0x50));
        assert_eq!(t[t.len() - 1].type_, KVM_IRQ_ROUTING_MSI);
    }

    #[test]
    fn vectors_get_consecutive_gsis_and_kvm_takes_their_routes() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = GsiRouter::new(vm);
        let a = router.vector().unwrap();
        let b = router.vector().unwrap();
        assert_eq!((a.gsi(), b.gsi()), (24, 25));
        a.set_route(Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        }))
        .unwrap();
        b.set_route(Some(MsiMessage {
            address: 0xfee0_1000,
            data: 0x42,
        }))
        .unwrap();
        a.raise();
        b.set_route(None).unwrap();
        assert_eq!(lock(&router.inner).msi.len(), 1);
        drop(a);
        assert!(lock(&router.inner).msi.is_empty());
    }
}
