//! Interrupts for emulated devices: KVM's GSI routing table, MSI irqfds, and level-triggered
//! INTx lines.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so one [`GsiRouter`] per VM owns it: the
//! default routes KVM set up with the in-kernel irqchip (GSI 0-15 to the PICs and the IOAPIC,
//! 16-23 to the IOAPIC) stay in every table it writes, and MSI routes are added above them.
//! A device's vector is an [`MsiVector`]: a GSI routed to an MSI message and an eventfd
//! registered as that GSI's irqfd, so raising it is one eventfd write from any thread, without
//! a VM exit.
//!
//! A PCI function's INTx pin is an [`IntxLine`]: a level-triggered IOAPIC pin driven by an irqfd
//! with a resample fd (`KVM_IRQFD_FLAG_RESAMPLE`). Writing the irqfd asserts the pin; KVM
//! de-asserts it when the guest's EOI reaches the IOAPIC and then signals the resample fd, and
//! the line's thread asks the function whether it still wants the interrupt ([`IntxSource`])
//! and asserts it again if so. Pins may be shared: KVM keeps one resampler per GSI and signals
//! every resample fd on it, and each function re-asserts only for itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry, kvm_irqchip,
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
    #[error("GSI {0} is not an IOAPIC pin (INTx lines use pins 0-{max})", max = FIRST_MSI_GSI - 1)]
    NotAPin(u32),
    #[error("starting the resample thread of INTx line GSI {gsi}: {source}")]
    Thread {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
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

/// The IOAPIC pins PCI INTx lines use (see `devices::pci::intx_gsi`).
const INTX_PINS: std::ops::Range<usize> = 16..24;
/// IOAPIC redirection entry bits: trigger mode (1 = level) and remote IRR.
const REDIRECTION_LEVEL: u64 = 1 << 15;
const REDIRECTION_REMOTE_IRR: u64 = 1 << 14;

/// The saved IOAPIC state `chip` as it is restored: its level-triggered PCI INTx pins start
/// neither requested (IRR) nor waiting for an EOI (remote IRR).
///
/// Why: a level-triggered pin whose interrupt the guest had taken but not yet EOI'd when the
/// machine was saved has its remote IRR set; the guest's EOI after the restore must clear it,
/// but it only reaches the IOAPIC if the restored local APIC knows the vector is in service,
/// and the local APIC state KVM hands out does not always say so (on this host it never marks
/// a delivered interrupt in service). The pin would then stay blocked for good: every later
/// assertion coalesces. The level of these pins is the functions' own state, and they assert
/// it again when the machine resumes ([`IntxLine::assert`] via the functions' resume), so
/// starting the pins clean loses nothing; at worst the guest sees one interrupt twice (a
/// second ISR read returns 0, which drivers take as spurious).
pub fn release_intx_pins(chip: &kvm_irqchip) -> kvm_irqchip {
    let mut chip = *chip;
    if chip.chip_id != KVM_IRQCHIP_IOAPIC {
        return chip;
    }
    // The other members of the union are plain integers too, so any bytes are a valid value.
    // SAFETY: for chip_id IOAPIC the union holds the IOAPIC state.
    let ioapic = unsafe { &mut chip.chip.ioapic };
    for pin in INTX_PINS {
        // SAFETY: a redirection entry is a u64 or bit fields over the same u64.
        let entry = unsafe { &mut ioapic.redirtbl[pin].bits };
        if *entry & REDIRECTION_LEVEL != 0 {
            *entry &= !REDIRECTION_REMOTE_IRR;
            ioapic.irr &= !(1 << pin);
        }
    }
    chip
}

/// What an INTx line asks its function after each EOI: does it still want the interrupt?
pub trait IntxSource: Send + Sync {
    fn level(&self) -> bool;
}

/// A level-triggered IOAPIC pin driven by an irqfd with a resample fd; see the module comment.
/// Asserting is an eventfd write (from any thread, no VM exit); the line's own thread waits for
/// resample events and asserts again while [`IntxSource::level`] says so.
pub struct IntxLine {
    gsi: u32,
    trigger: Arc<EventFd>,
    resample: Arc<EventFd>,
    vm: Arc<VmFd>,
    stop: Arc<AtomicBool>,
    asserts: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl IntxLine {
    /// Wires `source` to IOAPIC pin `gsi`.
    pub fn new(
        vm: Arc<VmFd>,
        gsi: u32,
        source: Arc<dyn IntxSource>,
    ) -> Result<Self, InterruptError> {
        if gsi >= FIRST_MSI_GSI {
            return Err(InterruptError::NotAPin(gsi));
        }
        let trigger = Arc::new(
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(InterruptError::EventFd)?,
        );
        // Blocking: the resample thread sleeps in read().
        let resample = Arc::new(EventFd::new(libc::EFD_CLOEXEC).map_err(InterruptError::EventFd)?);
        vm.register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|source| InterruptError::Irqfd { gsi, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let asserts = Arc::new(AtomicU64::new(0));
        let thread = {
            let (trigger, resample, stop, asserts) = (
                trigger.clone(),
                resample.clone(),
                stop.clone(),
                asserts.clone(),
            );
            std::thread::Builder::new()
                .name(format!("intx-gsi{gsi}"))
                .spawn(move || {
                    resample_loop(gsi, &trigger, &resample, &stop, &asserts, source.as_ref())
                })
        };
        let thread = match thread {
            Ok(t) => t,
            Err(source) => {
                let _ = vm.unregister_irqfd(&trigger, gsi);
                return Err(InterruptError::Thread { gsi, source });
            }
        };
        Ok(IntxLine {
            gsi,
            trigger,
            resample,
            vm,
            stop,
            asserts,
            thread: Some(thread),
        })
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Asserts the pin (it stays asserted until the guest's EOI; asserting an asserted pin
    /// changes nothing).
    pub fn assert(&self) {
        assert_line(self.gsi, &self.trigger, &self.asserts);
    }

    /// How many times the line was asserted (by [`IntxLine::assert`] or after a resample).
    pub fn asserts(&self) -> u64 {
        self.asserts.load(Ordering::Relaxed)
    }

    /// Signals the resample fd as KVM does after an EOI (for tests).
    #[cfg(test)]
    pub fn resample_for_test(&self) {
        let _ = self.resample.write(1);
    }
}

fn assert_line(gsi: u32, trigger: &EventFd, asserts: &AtomicU64) {
    asserts.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = trigger.write(1) {
        log::warn!("asserting INTx line GSI {gsi}: {e}");
    }
}

/// The line's thread: after each EOI (KVM has de-asserted the pin), assert it again while the
/// function still wants the interrupt. Ends when `stop` is set (and the resample fd written).
fn resample_loop(
    gsi: u32,
    trigger: &EventFd,
    resample: &EventFd,
    stop: &AtomicBool,
    asserts: &AtomicU64,
    source: &dyn IntxSource,
) {
    loop {
        match resample.read() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("INTx line GSI {gsi}: reading its resample fd: {e}; the line stops");
                return;
            }
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        if source.level() {
            assert_line(gsi, trigger, asserts);
        }
    }
}

impl Drop for IntxLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.resample.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.vm.unregister_irqfd(&self.trigger, self.gsi);
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

    /// A function that wants its interrupt while `want` is set, counting how often it is asked.
    struct Wants {
        want: AtomicBool,
        asked: AtomicU64,
    }
    impl IntxSource for Wants {
        fn level(&self) -> bool {
            self.asked.fetch_add(1, Ordering::AcqRel);
            self.want.load(Ordering::Acquire)
        }
    }

    fn ioapic_irr(vm: &VmFd) -> u32 {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: the IOAPIC member is the one KVM filled for chip_id IOAPIC.
        unsafe { chip.chip.ioapic.irr }
    }

    #[test]
    fn an_intx_line_asserts_its_ioapic_pin_and_again_after_a_resample_while_wanted() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let wants = Arc::new(Wants {
            want: AtomicBool::new(true),
            asked: AtomicU64::new(0),
        });
        assert!(matches!(
            IntxLine::new(vm.clone(), 24, wants.clone()),
            Err(InterruptError::NotAPin(24))
        ));
        let line = IntxLine::new(vm.clone(), 18, wants.clone()).unwrap();
        line.assert();
        // KVM injects from a work queue: wait for the pin's request bit (generous timeout).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while ioapic_irr(&vm) & 1 << 18 == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "pin 18 never asserted"
            );
            std::thread::yield_now();
        }
        // A resample while the function still wants it asserts again; once it does not, not.
        line.resample_for_test();
        while line.asserts() < 2 {
            std::thread::yield_now();
        }
        wants.want.store(false, Ordering::Release);
        line.resample_for_test();
        while wants.asked.load(Ordering::Acquire) < 2 {
            std::thread::yield_now();
        }
        let asserts = line.asserts.clone();
        drop(line); // joins the thread: whatever it did after the second resample is done
        assert_eq!(
            asserts.load(Ordering::Relaxed),
            2,
            "not wanted: not asserted again"
        );
        // A second line on the same pin (a shared pin) registers too.
        let a = IntxLine::new(vm.clone(), 19, wants.clone()).unwrap();
        let b = IntxLine::new(vm, 19, wants).unwrap();
        assert_eq!((a.gsi(), b.gsi()), (19, 19));
    }

    #[test]
    fn restored_intx_pins_start_clean_and_nothing_else_changes() {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        // SAFETY: writing the member the chip id names.
        let io = unsafe { &mut chip.chip.ioapic };
        io.irr = 1 << 17 | 1 << 18 | 1 << 4;
        io.redirtbl[17].bits = REDIRECTION_LEVEL | REDIRECTION_REMOTE_IRR | 0x41; // INTx
        io.redirtbl[18].bits = REDIRECTION_REMOTE_IRR | 0x42; // edge: left alone
        io.redirtbl[4].bits = REDIRECTION_LEVEL | REDIRECTION_REMOTE_IRR | 0x24; // ISA
        let out = release_intx_pins(&chip);
        // SAFETY: reading the member the chip id names.
        let io = unsafe { out.chip.ioapic };
        // SAFETY: as above.
        let bits = |pin: usize| unsafe { io.redirtbl[pin].bits };
        assert_eq!(bits(17), REDIRECTION_LEVEL | 0x41);
        assert_eq!(bits(18), REDIRECTION_REMOTE_IRR | 0x42);
        assert_eq!(bits(4), REDIRECTION_LEVEL | REDIRECTION_REMOTE_IRR | 0x24);
        assert_eq!(io.irr, 1 << 18 | 1 << 4);
        // Another chip passes unchanged.
        let pic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        assert_eq!(release_intx_pins(&pic).chip_id, KVM_IRQCHIP_PIC_MASTER);
    }
}
