//! Emulated devices: one shape for all of them, and the bus that routes vCPU port-I/O and MMIO
//! exits to them.
//!
//! Every device is handled alike by the machine and by every migration mode:
//! - it says what its saved state is and how to save and restore it ([`Persist`], the pattern of
//!   Firecracker's `snapshot/persist.rs`); the state walk stores it as an opaque, versioned blob
//!   under the device's id, so adding a device changes neither the state walk nor any mode;
//! - it declares the host fds it owns ([`Persist::host_fds`]: a disk image, a tap, a socket),
//!   which every mode carries like guest RAM (the CPR state, the shim's checks, cpr-transfer's
//!   HELLO) and hands back to it at restore ([`DeviceContext::take_host_fd`]), never re-opened by
//!   path;
//! - it sits at one place on the bus ([`Place`]), and the machine description lists every
//!   device with its place, so a restore onto a machine with other devices is refused by name.
//!
//! The machine's device list is a list of [`DeviceSpec`]s (`machine.rs`): one line per device.
//!
//! Everything else the guest might poke (unknown ports, unknown MMIO) is answered here too:
//! reads return all-ones and writes are dropped, logged with a rate limit, so a misbehaving
//! guest can neither crash the VMM nor flood its log.

pub mod console;
pub mod debug_exit;
pub mod i8042;
pub mod interrupts;
pub mod pci;
pub mod rtc;
pub mod serial;
pub mod virtio;

use std::any::Any;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use console::ConsoleOutput;

/// What a device write asks of the machine (the vCPU thread forwards it to the VMM thread).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// End the VMM with this exit status (debug exit port).
    Exit(u8),
    /// Reset the machine (i8042 reset pulse, PCI reset control register).
    Reset,
}

/// A device's saved state larger than this is refused as corrupt before it is decoded.
const MAX_DEVICE_STATE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("its saved state does not decode: {0}")]
    Decode(String),
    #[error("its state cannot be encoded: {0}")]
    Encode(String),
    #[error("its saved state is not valid: {0}")]
    InvalidState(String),
    #[error("its host fd '{0}' was not handed over by the previous VMM")]
    MissingHostFd(String),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Bus(#[from] BusOverlap),
}

/// How a device crosses every migration mode: what its saved state is, how to save it, and how
/// to build the device at power-on or back from that state.
pub trait Persist: Sized {
    /// The saved state. Its encoding is part of the state-file format: change it only with a
    /// new format version (or by adding `#[serde(default)]` fields at the end).
    type State: Serialize + DeserializeOwned;

    /// What it is built from besides the machine: its part of the command line (a disk's
    /// file, a network backend), `()` for the PC's fixed devices. Not saved: the new VMM's
    /// command line gives it again.
    type Config: Send + 'static;

    /// The device as at power-on.
    fn power_on(ctx: &mut DeviceContext<'_>, config: &Self::Config) -> Result<Self, DeviceError>;

    fn save(&self) -> Self::State;

    /// The device as it was saved. Called with the same context as [`Persist::power_on`];
    /// host fds are taken from it by name, never re-opened by path.
    fn restore(
        ctx: &mut DeviceContext<'_>,
        config: &Self::Config,
        state: &Self::State,
    ) -> Result<Self, DeviceError>;

    /// The host fds this device owns, each with a name unique in the machine. Every migration
    /// mode carries them to the next VMM, which hands them back through
    /// [`DeviceContext::take_host_fd`].
    fn host_fds(&self) -> Vec<HostFd> {
        Vec::new()
    }

    /// Stops the device's own activity (an I/O thread) once every vCPU is stopped, so that its
    /// state stays still while it is saved: requests in flight complete first. Devices driven
    /// only by vCPU exits need nothing here.
    fn pause(&mut self) {}

    /// Starts it again (also after a restore, where it must look at its queues once: the guest
    /// may have queued work while it was stopped).
    fn resume(&mut self) {}
}

/// A host fd a device owns (disk image, tap, socket), as declared for a migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFd {
    pub name: String,
    pub fd: RawFd,
}

/// What the machine does with every device alike, whatever its type.
pub trait Device: Send {
    /// The saved state, encoded.
    fn save_state(&self) -> Result<Vec<u8>, DeviceError>;
    fn host_fds(&self) -> Vec<HostFd>;
    fn pause(&mut self);
    fn resume(&mut self);
    /// For the few places that need the concrete device (feeding console input to the UART).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Persist + Send + 'static> Device for T {
    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        encode_state(&self.save())
    }

    fn host_fds(&self) -> Vec<HostFd> {
        Persist::host_fds(self)
    }

    fn pause(&mut self) {
        Persist::pause(self)
    }

    fn resume(&mut self) {
        Persist::resume(self)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

fn state_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DEVICE_STATE>()
}

pub fn encode_state<S: Serialize>(state: &S) -> Result<Vec<u8>, DeviceError> {
    bincode::serde::encode_to_vec(state, state_config())
        .map_err(|e| DeviceError::Encode(e.to_string()))
}

pub fn decode_state<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, DeviceError> {
    let (state, used) = bincode::serde::decode_from_slice(bytes, state_config())
        .map_err(|e| DeviceError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(DeviceError::Decode(format!(
            "{} bytes left over after the state",
            bytes.len() - used
        )));
    }
    Ok(state)
}

/// Where a device sits on the bus; part of the machine description.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Place {
    Port {
        base: u16,
        len: u16,
    },
    Mmio {
        base: u64,
        len: u64,
    },
    /// Function 0 of a slot on PCI bus 0.
    Pci {
        slot: u8,
    },
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Port { base, len } => write!(f, "ports {base:#x}+{len}"),
            Place::Mmio { base, len } => write!(f, "MMIO {base:#x}+{len:#x}"),
            Place::Pci { slot } => write!(f, "PCI 00:{slot:02x}.0"),
        }
    }
}

/// One device of the machine as the machine description lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    pub id: String,
    pub place: Place,
}

/// Host fds handed over by the previous VMM (cpr-exec, cpr-transfer), by name, for the devices
/// that own them to take back at restore.
#[derive(Debug, Default)]
pub struct HandedOverFds {
    fds: Vec<(String, OwnedFd)>,
    /// The restore keeps host fds (a live update): a device whose fd is missing must fail,
    /// never open its backend by path. False at power-on and for a restore from a file.
    preserved: bool,
}

impl HandedOverFds {
    /// The fds a live update carried (possibly none).
    pub fn new(fds: Vec<(String, OwnedFd)>) -> Self {
        HandedOverFds {
            fds,
            preserved: true,
        }
    }

    /// Whether backends come with the restore (see [`HandedOverFds::new`]).
    pub fn preserved(&self) -> bool {
        self.preserved
    }

    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(n, _)| n == name)?;
        Some(self.fds.remove(i).1)
    }

    /// Names nobody took (closed when this is dropped).
    pub fn names(&self) -> Vec<String> {
        self.fds.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// What building a device may need from the machine.
pub struct DeviceContext<'a> {
    /// The VM, to register the device's ioeventfds (queue notifications) and irqfds
    /// (interrupts) with KVM.
    pub vm: &'a Arc<VmFd>,
    /// Guest RAM, for devices that read and write it (virtqueues).
    pub memory: Arc<GuestMemoryMmap>,
    /// The VM's GSI routing table, for MSI vectors.
    pub interrupts: Arc<interrupts::GsiRouter>,
    /// PCI bus 0, which PCI functions join and the configuration ports and MMIO window use.
    pub pci: Arc<pci::PciBus>,
    pub console: &'a ConsoleOutput,
    /// Written by the UART when the guest drained its receive FIFO.
    pub input_drained: &'a Arc<EventFd>,
    /// The UART's interrupt line (an irqfd on its GSI); taken by the UART.
    pub serial_irq: Option<EventFd>,
    /// Host fds handed over by the previous VMM (empty at power-on and for a file restore).
    pub host_fds: HandedOverFds,
}

impl DeviceContext<'_> {
    pub fn take_host_fd(&mut self, name: &str) -> Option<OwnedFd> {
        self.host_fds.take(name)
    }
}

type PlugFn = Box<
    dyn FnOnce(
        &mut DeviceContext<'_>,
        Option<&[u8]>,
        &mut Bus,
    ) -> Result<Arc<Mutex<dyn Device>>, DeviceError>,
>;

/// One line of the machine's device list: a device's id, its place on the bus, and how to build
/// it (at power-on or from its saved state) and put it there.
pub struct DeviceSpec {
    pub id: String,
    pub place: Place,
    plug: PlugFn,
}

fn build<T: Persist>(
    ctx: &mut DeviceContext<'_>,
    config: &T::Config,
    saved: Option<&[u8]>,
) -> Result<T, DeviceError> {
    match saved {
        Some(bytes) => T::restore(ctx, config, &decode_state(bytes)?),
        None => T::power_on(ctx, config),
    }
}

impl DeviceSpec {
    /// Builds `T` (at power-on or from its saved state), then `attach` puts it on its bus.
    fn new<T>(
        id: &str,
        place: Place,
        config: T::Config,
        attach: impl FnOnce(&mut DeviceContext<'_>, &mut Bus, Arc<Mutex<T>>) -> Result<(), DeviceError>
        + 'static,
    ) -> Self
    where
        T: Persist + Send + 'static,
    {
        DeviceSpec {
            id: id.to_string(),
            place,
            plug: Box::new(move |ctx, saved, bus| {
                let dev = Arc::new(Mutex::new(build::<T>(ctx, &config, saved)?));
                attach(ctx, bus, dev.clone())?;
                Ok(dev)
            }),
        }
    }

    /// A device on the port-I/O bus.
    pub fn port<T>(id: &str, base: u16, len: u16, config: T::Config) -> Self
    where
        T: Persist + PioDevice + Send + 'static,
    {
        Self::new::<T>(id, Place::Port { base, len }, config, move |_, bus, dev| {
            Ok(bus.insert_pio(base, len, dev)?)
        })
    }

    /// A device in guest-physical address space.
    pub fn mmio<T>(id: &str, base: u64, len: u64, config: T::Config) -> Self
    where
        T: Persist + MmioDevice + Send + 'static,
    {
        Self::new::<T>(id, Place::Mmio { base, len }, config, move |_, bus, dev| {
            Ok(bus.insert_mmio(base, len, dev)?)
        })
    }

    /// A function at `slot` of PCI bus 0.
    pub fn pci<T>(id: &str, slot: u8, config: T::Config) -> Self
    where
        T: Persist + pci::PciFunction + Send + 'static,
    {
        Self::new::<T>(id, Place::Pci { slot }, config, move |ctx, _, dev| {
            ctx.pci
                .attach(slot, dev)
                .map_err(|e| DeviceError::Setup(e.to_string()))
        })
    }

    pub fn description(&self) -> DeviceDescription {
        DeviceDescription {
            id: self.id.clone(),
            place: self.place,
        }
    }
}

/// A device's saved state under its id, as the state walk stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevice {
    pub id: String,
    pub state: Vec<u8>,
}

/// A device list that could not be built, naming the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetError {
    #[error("device '{id}': {source}")]
    Device {
        id: String,
        #[source]
        source: DeviceError,
    },
    #[error("the saved state has device '{0}', which this machine does not have")]
    Unknown(String),
    #[error("two devices are both named '{0}'")]
    DuplicateId(String),
    #[error("two devices both declare a host fd named '{0}'")]
    DuplicateHostFd(String),
}

/// Every emulated device of a machine and the bus they sit on.
pub struct DeviceSet {
    devices: Vec<(String, Arc<Mutex<dyn Device>>)>,
    descriptions: Vec<DeviceDescription>,
    bus: Arc<Bus>,
}

impl DeviceSet {
    /// Builds every device of `specs`, from `saved` when restoring (a device absent from the
    /// saved state, as in a file written before it existed, starts as at power-on).
    pub fn build(
        specs: Vec<DeviceSpec>,
        ctx: &mut DeviceContext<'_>,
        saved: Option<&[SavedDevice]>,
    ) -> Result<Self, DeviceSetError> {
        if let Some(saved) = saved {
            for s in saved {
                if !specs.iter().any(|spec| spec.id == s.id) {
                    return Err(DeviceSetError::Unknown(s.id.clone()));
                }
            }
        }
        let mut bus = Bus::default();
        let mut devices: Vec<(String, Arc<Mutex<dyn Device>>)> = Vec::new();
        let mut descriptions = Vec::new();
        for spec in specs {
            if devices.iter().any(|(id, _)| *id == spec.id) {
                return Err(DeviceSetError::DuplicateId(spec.id));
            }
            descriptions.push(spec.description());
            let state = saved
                .and_then(|s| s.iter().find(|d| d.id == spec.id))
                .map(|d| d.state.as_slice());
            let device =
                (spec.plug)(ctx, state, &mut bus).map_err(|source| DeviceSetError::Device {
                    id: spec.id.clone(),
                    source,
                })?;
            devices.push((spec.id, device));
        }
        let set = DeviceSet {
            devices,
            descriptions,
            bus: Arc::new(bus),
        };
        set.host_fds()?;
        Ok(set)
    }

    pub fn bus(&self) -> Arc<Bus> {
        self.bus.clone()
    }

    pub fn descriptions(&self) -> &[DeviceDescription] {
        &self.descriptions
    }

    /// Every device's state, in list order.
    pub fn save(&self) -> Result<Vec<SavedDevice>, DeviceSetError> {
        self.devices
            .iter()
            .map(|(id, d)| {
                Ok(SavedDevice {
                    id: id.clone(),
                    state: lock(d)
                        .save_state()
                        .map_err(|source| DeviceSetError::Device {
                            id: id.clone(),
                            source,
                        })?,
                })
            })
            .collect()
    }

    /// Quiesces every device (after the vCPUs stopped), in list order.
    pub fn pause(&self) {
        for (_, d) in &self.devices {
            lock(d).pause();
        }
    }

    /// Starts every device again (before the vCPUs run).
    pub fn resume(&self) {
        for (_, d) in &self.devices {
            lock(d).resume();
        }
    }

    /// Duplicates of every host fd the devices own, for a rebuilt device list (a reset) to take
    /// over the same backends.
    pub fn duplicate_host_fds(&self) -> Result<HandedOverFds, DeviceSetError> {
        let mut out = Vec::new();
        for h in self.host_fds()? {
            // The device keeps its fd open while this runs (the machine is paused).
            // SAFETY: `h.fd` is open for the duration of this borrow.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(h.fd) }
                .try_clone_to_owned()
                .map_err(|e| DeviceSetError::Device {
                    id: h.name.clone(),
                    source: DeviceError::Setup(format!("duplicating its host fd: {e}")),
                })?;
            out.push((h.name, fd));
        }
        Ok(HandedOverFds::new(out))
    }

    /// Every host fd the devices own (names are unique across the machine).
    pub fn host_fds(&self) -> Result<Vec<HostFd>, DeviceSetError> {
        let mut out: Vec<HostFd> = Vec::new();
        for (_, d) in &self.devices {
            for fd in lock(d).host_fds() {
                if out.iter().any(|o| o.name == fd.name) {
                    return Err(DeviceSetError::DuplicateHostFd(fd.name));
                }
                out.push(fd);
            }
        }
        Ok(out)
    }

    /// Runs `f` on the device `id` if it is a `T`.
    pub fn with<T: 'static, R>(&self, id: &str, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let (_, d) = self.devices.iter().find(|(i, _)| i == id)?;
        let mut guard = lock(d);
        guard.as_any_mut().downcast_mut::<T>().map(f)
    }
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

/// What a device's unit test needs to build a [`DeviceContext`] outside a machine: a KVM VM, a
/// console that discards, and the input-drained eventfd.
#[cfg(test)]
pub(crate) struct TestContext {
    vm: Arc<VmFd>,
    console: ConsoleOutput,
    drained: Arc<EventFd>,
}

#[cfg(test)]
impl TestContext {
    pub(crate) fn new() -> Self {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        TestContext {
            vm: Arc::new(kvm.create_vm().unwrap()),
            console: console::Console::open(&crate::cli::SerialSpec::Null, |_, _| None)
                .unwrap()
                .output(),
            drained: Arc::new(EventFd::new(0).unwrap()),
        }
    }

    /// A context over `memory` with `host_fds` handed over.
    pub(crate) fn context(
        &self,
        memory: Arc<GuestMemoryMmap>,
        host_fds: HandedOverFds,
    ) -> DeviceContext<'_> {
        DeviceContext {
            vm: &self.vm,
            memory,
            interrupts: interrupts::GsiRouter::new(self.vm.clone()),
            pci: pci::PciBus::new(),
            console: &self.console,
            input_drained: &self.drained,
            serial_irq: None,
            host_fds,
        }
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

    /// A device that owns a host fd (as a disk would): it opens its backend at power-on and
    /// takes it back by name at restore, and its state says how far it got.
    struct Backed {
        file: std::fs::File,
        writes: u32,
    }

    #[derive(Serialize, Deserialize)]
    struct BackedState {
        writes: u32,
    }

    impl Persist for Backed {
        type State = BackedState;
        type Config = ();
        fn power_on(_: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
            let file = tempfile().map_err(|e| DeviceError::Setup(e.to_string()))?;
            Ok(Backed { file, writes: 0 })
        }
        fn save(&self) -> BackedState {
            BackedState {
                writes: self.writes,
            }
        }
        fn restore(
            ctx: &mut DeviceContext<'_>,
            _: &(),
            s: &BackedState,
        ) -> Result<Self, DeviceError> {
            let fd = ctx
                .take_host_fd("backed:disk")
                .ok_or_else(|| DeviceError::MissingHostFd("backed:disk".into()))?;
            Ok(Backed {
                file: std::fs::File::from(fd),
                writes: s.writes,
            })
        }
        fn host_fds(&self) -> Vec<HostFd> {
            use std::os::fd::AsRawFd;
            vec![HostFd {
                name: "backed:disk".into(),
                fd: self.file.as_raw_fd(),
            }]
        }
    }

    impl MmioDevice for Backed {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.writes as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> Option<VmRequest> {
            use std::io::Write;
            let _ = self.file.write_all(data);
            self.writes += 1;
            None
        }
    }

    impl Persist for Echo {
        type State = u8;
        type Config = ();
        fn power_on(_: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
            Ok(Echo(7))
        }
        fn save(&self) -> u8 {
            self.0
        }
        fn restore(_: &mut DeviceContext<'_>, _: &(), s: &u8) -> Result<Self, DeviceError> {
            Ok(Echo(*s))
        }
    }

    fn tempfile() -> std::io::Result<std::fs::File> {
        let path = std::env::temp_dir().join(format!(
            "cpr-devices-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(f)
    }

    fn specs() -> Vec<DeviceSpec> {
        vec![
            DeviceSpec::port::<Echo>("echo", 0x100, 4, ()),
            DeviceSpec::mmio::<Backed>("backed", 0xd000_0000, 0x1000, ()),
        ]
    }

    fn with_ctx<R>(host_fds: HandedOverFds, f: impl FnOnce(&mut DeviceContext<'_>) -> R) -> R {
        let console = console::Console::open(&crate::cli::SerialSpec::Null, |_, _| None)
            .unwrap()
            .output();
        let drained = Arc::new(EventFd::new(0).unwrap());
        let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
        let mut ctx = DeviceContext {
            vm: &vm,
            memory: Arc::new(
                GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap(),
            ),
            interrupts: interrupts::GsiRouter::new(vm.clone()),
            pci: pci::PciBus::new(),
            console: &console,
            input_drained: &drained,
            serial_irq: None,
            host_fds,
        };
        f(&mut ctx)
    }

    #[test]
    fn a_device_list_saves_and_restores_every_device_and_hands_its_host_fds_back() {
        let set = with_ctx(HandedOverFds::default(), |ctx| {
            DeviceSet::build(specs(), ctx, None).unwrap()
        });
        let bus = set.bus();
        let mut b = [0u8; 1];
        bus.pio_read(0x100, &mut b);
        assert_eq!(b, [7]);
        bus.pio_write(0x100, &[40]);
        bus.mmio_write(0xd000_0010, b"abc");
        bus.mmio_write(0xd000_0010, b"def");
        let saved = set.save().unwrap();
        assert_eq!(
            saved.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["echo", "backed"]
        );
        let fds = set.host_fds().unwrap();
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].name, "backed:disk");
        assert_eq!(
            set.descriptions()[1].place,
            Place::Mmio {
                base: 0xd000_0000,
                len: 0x1000
            }
        );

        // The next VMM gets the same open file by name, as cpr-exec and cpr-transfer hand it.
        // SAFETY: test only; the fd stays open in `set` until the duplicate is made.
        let dup = unsafe { std::os::fd::BorrowedFd::borrow_raw(fds[0].fd) }
            .try_clone_to_owned()
            .unwrap();
        let handed = HandedOverFds::new(vec![("backed:disk".into(), dup)]);
        drop(set);
        let restored = with_ctx(handed, |ctx| {
            let set = DeviceSet::build(specs(), ctx, Some(&saved)).unwrap();
            assert!(ctx.host_fds.names().is_empty(), "the device took its fd");
            set
        });
        let bus = restored.bus();
        bus.pio_read(0x100, &mut b);
        assert_eq!(b, [40], "port device state restored");
        bus.mmio_read(0xd000_0000, &mut b);
        assert_eq!(b, [2], "MMIO device state restored");
        let contents = restored
            .with("backed", |d: &mut Backed| {
                use std::io::{Read, Seek};
                let mut s = String::new();
                d.file.rewind().unwrap();
                d.file.read_to_string(&mut s).unwrap();
                s
            })
            .unwrap();
        assert_eq!(contents, "abcdef", "the backend is the same open file");
        assert!(restored.with("backed", |_: &mut Echo| ()).is_none());
    }

    #[test]
    fn restores_that_do_not_fit_are_refused_by_device_name() {
        let set = with_ctx(HandedOverFds::default(), |ctx| {
            DeviceSet::build(specs(), ctx, None).unwrap()
        });
        let saved = set.save().unwrap();
        // The backend fd was not handed over.
        let e = with_ctx(HandedOverFds::default(), |ctx| {
            DeviceSet::build(specs(), ctx, Some(&saved)).err().unwrap()
        });
        assert_eq!(
            e.to_string(),
            "device 'backed': its host fd 'backed:disk' was not handed over by the previous VMM"
        );
        // A device this machine does not have.
        let mut extra = saved.clone();
        extra.push(SavedDevice {
            id: "virtio-net:net0".into(),
            state: vec![],
        });
        let e = with_ctx(HandedOverFds::default(), |ctx| {
            DeviceSet::build(specs(), ctx, Some(&extra)).err().unwrap()
        });
        assert!(e.to_string().contains("'virtio-net:net0'"), "{e}");
        // A corrupted state blob.
        let mut bad = saved.clone();
        bad[0].state = vec![0xff; 12];
        let e = with_ctx(HandedOverFds::default(), |ctx| {
            DeviceSet::build(specs(), ctx, Some(&bad)).err().unwrap()
        });
        assert!(
            e.to_string().starts_with("device 'echo': its saved state"),
            "{e}"
        );
        // Two devices on overlapping ports, or with one id.
        let clash = vec![
            DeviceSpec::port::<Echo>("a", 0x100, 4, ()),
            DeviceSpec::port::<Echo>("b", 0x102, 4, ()),
        ];
        let e = with_ctx(HandedOverFds::default(), |ctx| {
            DeviceSet::build(clash, ctx, None).err().unwrap()
        });
        assert!(e.to_string().contains("overlaps"), "{e}");
        let twice = vec![
            DeviceSpec::port::<Echo>("a", 0x100, 4, ()),
            DeviceSpec::port::<Echo>("a", 0x200, 4, ()),
        ];
        let e = with_ctx(HandedOverFds::default(), |ctx| {
            DeviceSet::build(twice, ctx, None).err().unwrap()
        });
        assert!(matches!(e, DeviceSetError::DuplicateId(_)), "{e}");
    }
}
