//! The machine: a KVM VM over guest RAM, its vCPU threads and its devices.
//!
//! A machine is built one way ([`Machine::build`]) from one of two sources: a fresh boot of a
//! built-in guest, or a saved [`MachineState`] over RAM that already holds the guest (restored
//! from a file, or inherited memfds after an exec). Reset rebuilds the VM over the same RAM, as
//! Cloud Hypervisor does, so there is no separate reset path to keep in step.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::linux::{self, LinuxBootError};
use crate::boot::{self, GuestParams};
use crate::cli::GuestBoot;
use crate::cpuid;
use crate::devices::console::ConsoleOutput;
use crate::devices::debug_exit::{DEBUG_EXIT_PORT, DebugExit};
use crate::devices::i8042::{I8042, I8042_BASE_PORT, I8042_PORT_COUNT};
use crate::devices::interrupts::GsiRouter;
use crate::devices::pci::host_bridge::HostBridge;
use crate::devices::pci::{
    PCI_CONFIG_BASE_PORT, PCI_CONFIG_PORT_COUNT, PCI_MMIO_BASE, PCI_MMIO_SIZE, PciBus,
    PciConfigPorts, PciMmioWindow,
};
use crate::devices::rtc::{RTC_BASE_PORT, RTC_PORT_COUNT, Rtc};
use crate::devices::serial::{COM1_IRQ, COM1_PORT, COM1_PORT_COUNT, SerialDevice};
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::net::{Net, NetConfig, NetStats};
use crate::devices::virtio::pci::VirtioPciDevice;
use crate::devices::{
    DeviceContext, DeviceDescription, DeviceSet, DeviceSetError, DeviceSpec, HandedOverFds, HostFd,
};
use crate::memory::GuestRam;
use crate::migration::state::{self, GuestKind, MachineDescription, MachineState, VcpuState};
use crate::vcpu::{EventSink, VcpuCommand, VcpuEvent, VcpuHandle};
use cpr_common::timing::PhaseLog;

/// Where KVM puts the TSS and identity map it needs for real-mode emulation on Intel: the top of
/// the 32-bit space, below the BIOS area, away from RAM and the LAPIC/IOAPIC.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Pausing waits this long for a vCPU before it reports which one is stuck.
const PAUSE_WARN_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(
        "cannot open /dev/kvm: {0} (is KVM enabled, and does this user have access to /dev/kvm?)"
    )]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM: {op}: {source}")]
    Kvm {
        op: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("loading the built-in guest: {0}")]
    Boot(#[from] boot::BootError),
    #[error("loading the kernel: {0}")]
    Linux(#[from] LinuxBootError),
    #[error("restoring machine state: {0}")]
    State(#[from] state::StateError),
    #[error("starting vCPU thread {index}: {source}")]
    Thread {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("vCPU {index} did not answer: its thread is gone")]
    VcpuGone { index: u32 },
    #[error("{0}")]
    Vcpu(state::StateError),
    #[error("devices: {0}")]
    Devices(#[from] DeviceSetError),
    #[error("the saved state has {saved} vCPU states for {described} vCPUs")]
    VcpuCount { saved: usize, described: u32 },
}

fn kvm_err(op: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    let op = op.into();
    move |source| MachineError::Kvm { op, source }
}

/// Where a machine's CPU and device state comes from.
pub enum Source<'a> {
    /// Power on: load the built-in guest into RAM and start every vCPU at its entry point.
    Boot,
    /// Continue a saved machine; RAM already holds the guest. `host_fds` are the devices' host
    /// fds handed over by the previous VMM (none for a restore from a file).
    Restore {
        state: &'a MachineState,
        host_fds: HandedOverFds,
    },
}

/// What the command line says the machine has besides RAM and vCPUs.
#[derive(Clone, Debug)]
pub struct Hardware {
    pub guest: GuestBoot,
    /// Disks, each behind a virtio-blk-pci function, from PCI slot 1 on.
    pub disks: Vec<BlockConfig>,
    /// NICs, each behind a virtio-net-pci function, in the PCI slots after the disks.
    pub nics: Vec<NetConfig>,
}

/// The machine's devices, one line each: its id in the saved state, its type and its place on
/// the bus. A new device is one more line here (and its own file under `devices/`).
fn device_specs(disks: &[BlockConfig], nics: &[NetConfig]) -> Vec<DeviceSpec> {
    let mut specs = vec![
        DeviceSpec::port::<SerialDevice>("serial", COM1_PORT, COM1_PORT_COUNT, ()),
        DeviceSpec::port::<I8042>("i8042", I8042_BASE_PORT, I8042_PORT_COUNT, ()),
        DeviceSpec::port::<Rtc>("rtc", RTC_BASE_PORT, RTC_PORT_COUNT, ()),
        DeviceSpec::port::<PciConfigPorts>(
            "pci-config",
            PCI_CONFIG_BASE_PORT,
            PCI_CONFIG_PORT_COUNT,
            (),
        ),
        DeviceSpec::port::<DebugExit>("debug-exit", DEBUG_EXIT_PORT, 1, ()),
        DeviceSpec::mmio::<PciMmioWindow>("pci-mmio", PCI_MMIO_BASE, PCI_MMIO_SIZE, ()),
        DeviceSpec::pci::<HostBridge>("pci-host", 0, ()),
    ];
    for (slot, disk) in (1u8..).zip(disks) {
        let id = format!("virtio-blk:{}", disk.id);
        specs.push(DeviceSpec::pci::<VirtioPciDevice<Block>>(
            &id,
            slot,
            disk.clone(),
        ));
    }
    let first_nic_slot = 1 + disks.len() as u8;
    for (slot, nic) in (first_nic_slot..).zip(nics) {
        specs.push(DeviceSpec::pci::<VirtioPciDevice<Net>>(
            &nic.state_id(),
            slot,
            nic.clone(),
        ));
    }
    specs
}

/// The devices a machine built from this command line has, as its description lists them.
pub fn device_descriptions(disks: &[BlockConfig], nics: &[NetConfig]) -> Vec<DeviceDescription> {
    device_specs(disks, nics)
        .iter()
        .map(DeviceSpec::description)
        .collect()
}

/// Handles shared with the VMM thread's poll loop.
pub struct MachineWakers {
    /// Written by vCPU threads when they have an event.
    pub vcpu_events: Arc<EventFd>,
    /// Written by the UART when the guest drained its receive FIFO.
    pub input_drained: Arc<EventFd>,
}

pub struct Machine {
    kvm: Kvm,
    vm: Arc<VmFd>,
    ram: GuestRam,
    vcpus: Vec<VcpuHandle>,
    devices: DeviceSet,
    console: ConsoleOutput,
    guest: GuestBoot,
    disks: Vec<BlockConfig>,
    nics: Vec<NetConfig>,
    vcpu_count: u32,
    events: EventSink,
    wakers: MachineWakers,
    msr_indices: Arc<Vec<u32>>,
    xsave_words: usize,
    paused: bool,
    /// A Linux guest's kernel and initrd, as loaded at power-on.
    linux_images: Option<Arc<linux::LinuxImages>>,
}

/// A VM built over RAM, with its devices and vCPUs created but no CPU or device state yet.
/// cpr-transfer builds this while the guest still runs on the old VMM, so that only
/// [`PreparedMachine::start`] falls inside the blackout.
pub struct PreparedMachine {
    kvm: Kvm,
    vm: Arc<VmFd>,
    serial_irq: EventFd,
    vcpu_fds: Vec<VcpuFd>,
    ram: GuestRam,
    vcpu_count: u32,
    guest: GuestBoot,
    disks: Vec<BlockConfig>,
    nics: Vec<NetConfig>,
    console: ConsoleOutput,
    events: EventSink,
    rx: Receiver<VcpuEvent>,
    wakers: MachineWakers,
}

impl Machine {
    /// Builds the machine; vCPU threads start paused (call [`Machine::resume`]).
    pub fn build(
        ram: GuestRam,
        vcpu_count: u32,
        hardware: Hardware,
        console: ConsoleOutput,
        source: Source<'_>,
        phases: Option<&mut PhaseLog>,
    ) -> Result<(Self, Receiver<VcpuEvent>), MachineError> {
        let mut phases = phases;
        let prepared = Machine::prepare_timed(ram, vcpu_count, hardware, console, &mut phases)?;
        prepared.start(source, phases)
    }

    /// Creates the VM over `ram` with its in-kernel devices and vCPUs, ready for a source.
    pub fn prepare(
        ram: GuestRam,
        vcpu_count: u32,
        hardware: Hardware,
        console: ConsoleOutput,
    ) -> Result<PreparedMachine, MachineError> {
        Self::prepare_timed(ram, vcpu_count, hardware, console, &mut None)
    }

    fn prepare_timed(
        ram: GuestRam,
        vcpu_count: u32,
        hardware: Hardware,
        console: ConsoleOutput,
        phases: &mut Option<&mut PhaseLog>,
    ) -> Result<PreparedMachine, MachineError> {
        let Hardware { guest, disks, nics } = hardware;
        let kvm = Kvm::new().map_err(MachineError::KvmOpen)?;
        let vcpu_events = Arc::new(
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MachineError::EventFd)?,
        );
        let input_drained = Arc::new(
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MachineError::EventFd)?,
        );
        let (events, rx) = EventSink::new(vcpu_events.clone());
        let (vm, serial_irq) = create_vm(&kvm, &ram, phases)?;
        let vcpu_fds = create_vcpu_fds(&vm, vcpu_count)?;
        mark(phases, "create devices and vCPUs");
        Ok(PreparedMachine {
            kvm,
            vm,
            serial_irq,
            vcpu_fds,
            ram,
            vcpu_count,
            guest,
            disks,
            nics,
            console,
            events,
            rx,
            wakers: MachineWakers {
                vcpu_events,
                input_drained,
            },
        })
    }

    /// Sets every vCPU and device from `source` and starts the vCPU threads, paused.
    fn start_vcpus(
        &mut self,
        fds: Vec<VcpuFd>,
        source: &Source<'_>,
        preloaded: Option<GuestEntry>,
        phases: &mut Option<&mut PhaseLog>,
    ) -> Result<(), MachineError> {
        match source {
            Source::Boot => {
                let supported = self
                    .kvm
                    .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
                for (index, vcpu) in fds.iter().enumerate() {
                    prepare_vcpu(vcpu, &supported, index as u32, self.vcpu_count)?;
                }
                let entry = match preloaded {
                    Some(entry) => entry,
                    None => self.load_guest()?,
                };
                match entry {
                    // Built-in guests start every vCPU at the entry point directly.
                    GuestEntry::EveryVcpu => {
                        for (index, vcpu) in fds.iter().enumerate() {
                            let regs = boot::builtin_boot_regs(index as u32);
                            enter_long_mode(vcpu, index as u32, &regs, true)?;
                        }
                    }
                    // Only the bootstrap processor starts; the others wait for INIT/SIPI from
                    // the guest, as on real hardware.
                    GuestEntry::BootProcessor(regs) => {
                        if let Some(bsp) = fds.first() {
                            enter_long_mode(bsp, 0, &regs, false)?;
                        }
                    }
                }
                // Which MSRs to save is decided once, at boot, outside any blackout.
                let listed = self
                    .kvm
                    .get_msr_index_list()
                    .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
                self.msr_indices = Arc::new(match fds.first() {
                    Some(v) => state::saveable_msrs(v, listed.as_slice()),
                    None => Vec::new(),
                });
            }
            Source::Restore { state: s, .. } => {
                if s.vcpus.len() != self.vcpu_count as usize {
                    return Err(MachineError::VcpuCount {
                        saved: s.vcpus.len(),
                        described: self.vcpu_count,
                    });
                }
                for (vcpu, saved) in fds.iter().zip(&s.vcpus) {
                    state::restore_vcpu(vcpu, saved)?;
                }
                state::restore_vm_clock(&self.vm, &s.vm)?;
                mark(phases, "restore vCPU state");
                // The same MSRs as before: the list was probed when the machine first booted.
                self.msr_indices = Arc::new(
                    s.vcpus
                        .first()
                        .map(|v| v.msrs.iter().map(|m| m.index).collect())
                        .unwrap_or_default(),
                );
            }
        }
        self.xsave_words = state::xsave_words(&self.vm);
        let bus = self.devices.bus();
        for (index, vcpu) in fds.into_iter().enumerate() {
            let handle = VcpuHandle::spawn(
                index as u32,
                vcpu,
                bus.clone(),
                self.events.clone(),
                self.msr_indices.clone(),
                self.xsave_words,
                false,
            )
            .map_err(|source| MachineError::Thread {
                index: index as u32,
                source,
            })?;
            self.vcpus.push(handle);
        }
        mark(phases, "start vCPU threads");
        self.paused = true;
        Ok(())
    }

    pub fn wakers(&self) -> &MachineWakers {
        &self.wakers
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn vcpu_tids(&self) -> Vec<(u32, i32)> {
        self.vcpus.iter().map(|v| (v.index, v.tid())).collect()
    }

    pub fn description(&self) -> MachineDescription {
        MachineDescription {
            devices: self.devices.descriptions().to_vec(),
            ..describe(
                &self.ram,
                self.vcpu_count,
                &self.guest,
                &self.disks,
                &self.nics,
            )
        }
    }

    /// Each disk as the machine has it now: its configuration and its size in bytes.
    pub fn disks(&self) -> Vec<(BlockConfig, u64)> {
        self.disks
            .iter()
            .filter_map(|d| {
                self.devices.with(
                    &format!("virtio-blk:{}", d.id),
                    |pci: &mut VirtioPciDevice<Block>| {
                        (pci.device().config().clone(), pci.device().capacity_bytes())
                    },
                )
            })
            .collect()
    }

    /// Each NIC as the machine has it now: its configuration, its tap's name, its counters.
    pub fn nics(&self) -> Vec<(NetConfig, String, NetStats)> {
        self.nics
            .iter()
            .filter_map(|n| {
                self.devices
                    .with(&n.state_id(), |pci: &mut VirtioPciDevice<Net>| {
                        let net = pci.device();
                        (net.config().clone(), net.ifname().to_string(), net.stats())
                    })
            })
            .collect()
    }

    /// The host fds the devices own, for a migration mode to carry to the next VMM.
    pub fn device_host_fds(&self) -> Result<Vec<HostFd>, MachineError> {
        Ok(self.devices.host_fds()?)
    }

    /// Stops every vCPU (all are asked at once, then all answers collected), then the devices'
    /// own activity.
    pub fn pause(&mut self) -> Result<(), MachineError> {
        if self.paused {
            return Ok(());
        }
        let (tx, rx) = channel();
        for v in &self.vcpus {
            v.send(VcpuCommand::Pause(tx.clone()));
        }
        drop(tx);
        for _ in &self.vcpus {
            match rx.recv_timeout(PAUSE_WARN_AFTER) {
                Ok(()) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    log::warn!("a vCPU is slow to pause (blocked on console output?); waiting");
                    rx.recv().map_err(|_| MachineError::VcpuGone { index: 0 })?;
                }
                Err(_) => return Err(MachineError::VcpuGone { index: 0 }),
            }
        }
        self.devices.pause();
        self.paused = true;
        Ok(())
    }

    /// Starts the devices, then every vCPU.
    pub fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.devices.resume();
        for v in &self.vcpus {
            v.send(VcpuCommand::Resume);
        }
        self.paused = false;
    }

    /// Stops every vCPU and saves the whole machine except RAM pages. All vCPUs are asked at
    /// once and each pauses and saves itself in one step.
    pub fn pause_and_save(&mut self) -> Result<MachineState, MachineError> {
        let mut replies = Vec::new();
        for v in &self.vcpus {
            let (tx, rx) = channel();
            v.send(VcpuCommand::PauseAndSave(tx));
            replies.push((v.index, rx));
        }
        self.paused = true;
        let mut vcpus: Vec<VcpuState> = Vec::new();
        for (index, rx) in replies {
            let s = rx
                .recv()
                .map_err(|_| MachineError::VcpuGone { index })?
                .map_err(MachineError::Vcpu)?;
            vcpus.push(s);
        }
        // Requests in flight complete before the devices' state is taken.
        self.devices.pause();
        let vm = state::save_vm(&self.vm)?;
        let devices = self.devices.save()?;
        Ok(MachineState {
            description: self.description(),
            vcpus,
            vm,
            devices,
        })
    }

    /// Power-cycles the machine over the same RAM: the VM is rebuilt and the guest reloaded.
    ///
    /// Everything that can fail (a new VM, reading the kernel again) happens while the old VM
    /// still exists: if it fails, the guest carries on as it was, unless its RAM was already
    /// partly overwritten, in which case it stays stopped ([`ResetError::guest_intact`]).
    pub fn reset(&mut self) -> Result<(), ResetError> {
        let was_running = !self.paused;
        let intact = |error| ResetError {
            error,
            guest_intact: true,
        };
        self.pause().map_err(intact)?;
        let rebuilt = (|| {
            let (vm, serial_irq) = create_vm(&self.kvm, &self.ram, &mut None)?;
            let fds = create_vcpu_fds(&vm, self.vcpu_count)?;
            // A reset powers the devices on again over the same backends: a disk renamed or
            // replaced since start stays the guest's disk.
            let backends = self.devices.duplicate_host_fds()?;
            let devices = attach_devices(
                &vm,
                &self.ram,
                &self.disks,
                &self.nics,
                serial_irq,
                &self.console,
                &self.wakers,
                None,
                backends,
            )?;
            let entry = self.load_guest()?;
            Ok((vm, fds, devices, entry))
        })();
        let (vm, fds, devices, entry) = match rebuilt {
            Ok(parts) => parts,
            Err(error) => {
                let guest_intact = !guest_memory_changed(&error);
                if guest_intact && was_running {
                    self.resume();
                }
                return Err(ResetError {
                    error,
                    guest_intact,
                });
            }
        };
        self.vcpus.clear();
        self.vm = vm;
        self.devices = devices;
        self.start_vcpus(fds, &Source::Boot, Some(entry), &mut None)
            .map_err(|error| ResetError {
                error,
                guest_intact: false,
            })?;
        if was_running {
            self.resume();
        }
        Ok(())
    }

    /// Writes the guest into RAM as at power-on (the built-in guest, or the kernel, initrd and
    /// boot tables read again from their files) and says where its vCPUs start.
    fn load_guest(&mut self) -> Result<GuestEntry, MachineError> {
        match &self.guest {
            GuestBoot::Builtin(g) => {
                let params = GuestParams {
                    vcpu_count: self.vcpu_count,
                    ram_end: self.ram.low_end(),
                    tick_hz: g.tick_hz,
                    exit_after_ticks: g.exit_after_ticks,
                    exit_code: g.exit_code,
                };
                boot::load_builtin_guest(self.ram.memory().as_ref(), g.guest, &params)?;
                Ok(GuestEntry::EveryVcpu)
            }
            GuestBoot::Linux(cfg) => {
                // Read once and kept: a reset boots the same images even if the files changed.
                // (A machine restored from a saved state reads them at its first reset.)
                let images = match &self.linux_images {
                    Some(images) => images.clone(),
                    None => Arc::new(linux::LinuxImages::read(cfg)?),
                };
                self.linux_images = Some(images.clone());
                let layout: Vec<(u64, u64)> = self
                    .ram
                    .regions()
                    .iter()
                    .map(|r| (r.layout.guest_addr, r.layout.size))
                    .collect();
                let memory = self.ram.memory().as_ref();
                let loaded = linux::load_linux_images(memory, &layout, &images, self.vcpu_count)?;
                Ok(GuestEntry::BootProcessor(linux::linux_boot_regs(&loaded)))
            }
        }
    }

    /// Feeds typed console input to the UART; returns how many bytes it took.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.devices
            .with("serial", |uart: &mut SerialDevice| {
                uart.enqueue_input(bytes)
            })
            .unwrap_or(0)
    }
}

impl PreparedMachine {
    /// Applies `source` (boot, or a saved state) and starts the vCPU threads, paused.
    pub fn start(
        self,
        mut source: Source<'_>,
        phases: Option<&mut PhaseLog>,
    ) -> Result<(Machine, Receiver<VcpuEvent>), MachineError> {
        let mut phases = phases;
        if let Source::Restore { state, .. } = &source {
            state::restore_vm_devices(&self.vm, &state.vm)?;
        }
        let (saved, host_fds) = match &mut source {
            Source::Boot => (None, HandedOverFds::default()),
            Source::Restore { state, host_fds } => {
                (Some(state.devices.as_slice()), std::mem::take(host_fds))
            }
        };
        let devices = attach_devices(
            &self.vm,
            &self.ram,
            &self.disks,
            &self.nics,
            self.serial_irq,
            &self.console,
            &self.wakers,
            saved,
            host_fds,
        )?;
        let mut machine = Machine {
            kvm: self.kvm,
            vm: self.vm,
            ram: self.ram,
            vcpus: Vec::new(),
            devices,
            console: self.console,
            guest: self.guest,
            disks: self.disks,
            nics: self.nics,
            vcpu_count: self.vcpu_count,
            events: self.events,
            wakers: self.wakers,
            msr_indices: Arc::new(Vec::new()),
            xsave_words: 0,
            paused: true,
            linux_images: None,
        };
        machine.start_vcpus(self.vcpu_fds, &source, None, &mut phases)?;
        Ok((machine, self.rx))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Join the vCPU threads before the VM and RAM go away.
        self.vcpus.clear();
    }
}

/// Where the vCPUs of a freshly loaded guest start.
enum GuestEntry {
    /// Every vCPU at the built-in guest's entry, each with its own stack.
    EveryVcpu,
    /// The bootstrap processor at these registers; the others wait for INIT/SIPI.
    BootProcessor(kvm_bindings::kvm_regs),
}

/// A failed reset, and whether the guest survived it.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ResetError {
    pub error: MachineError,
    /// The guest is as before (running again if it was): only the reset did not happen.
    pub guest_intact: bool,
}

/// Whether a failed guest load had already written into guest RAM.
fn guest_memory_changed(error: &MachineError) -> bool {
    match error {
        MachineError::Linux(e) => e.wrote_guest_memory(),
        MachineError::Boot(boot::BootError::GuestMemoryWrite { .. }) => true,
        _ => false,
    }
}

/// Closes a phase of a timed build (live updates time every step of their blackout).
fn mark(phases: &mut Option<&mut PhaseLog>, name: &str) {
    if let Some(p) = phases {
        p.mark(name);
    }
}

pub fn describe(
    ram: &GuestRam,
    vcpus: u32,
    guest: &GuestBoot,
    disks: &[BlockConfig],
    nics: &[NetConfig],
) -> MachineDescription {
    MachineDescription {
        vcpus,
        ram_size: ram.total_size(),
        regions: ram.layouts(),
        guest: GuestKind::of(guest),
        devices: device_descriptions(disks, nics),
    }
}

/// Creates the VM with its memory slots, in-kernel devices and the UART's interrupt line.
fn create_vm(
    kvm: &Kvm,
    ram: &GuestRam,
    phases: &mut Option<&mut PhaseLog>,
) -> Result<(Arc<VmFd>, EventFd), MachineError> {
    let vm = Arc::new(create_vm_retrying(kvm)?);
    mark(phases, "create VM");
    // RAM first: a memory slot added after the irqchip and PIT exist waits for an SRCU grace
    // period (milliseconds on this kind of host, measured), one added before does not. This
    // order takes ~7 ms off every live update's blackout.
    for (slot, region) in ram.regions().iter().enumerate() {
        let Some((host, len)) = ram.host_range(slot) else {
            continue;
        };
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.layout.guest_addr,
            memory_size: len as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        // The Machine drops its vCPUs and VM before its RAM, and slots do not overlap.
        // SAFETY: the host range is a live mapping owned by `ram`, which outlives the VM.
        unsafe { vm.set_user_memory_region(mem_region) }.map_err(kvm_err(format!(
            "registering RAM region {}",
            region.layout.name
        )))?;
    }
    // Under a shadow MMU (this host's kvm_pvm) KVM zeroes per-page metadata for every slot
    // here, ~0.25 ms per GiB: the one part of a live update that grows with RAM.
    mark(phases, "register RAM with KVM");
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let irq = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MachineError::EventFd)?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD for the serial port"))?;
    Ok((vm, irq))
}

/// KVM_CREATE_VM, again when a signal interrupted it (seen once in 200 updates on this host;
/// QEMU retries the same way). A rollback's VM creation must not fail over a stray signal.
fn create_vm_retrying(kvm: &Kvm) -> Result<VmFd, MachineError> {
    const ATTEMPTS: usize = 10;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match kvm.create_vm() {
            Ok(vm) => return Ok(vm),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => last = Some(e),
            Err(e) => return Err(kvm_err("KVM_CREATE_VM")(e)),
        }
    }
    Err(kvm_err("KVM_CREATE_VM")(
        last.unwrap_or_else(|| kvm_ioctls::Error::new(libc::EINTR)),
    ))
}

fn create_vcpu_fds(vm: &VmFd, count: u32) -> Result<Vec<VcpuFd>, MachineError> {
    (0..count)
        .map(|index| {
            vm.create_vcpu(u64::from(index))
                .map_err(kvm_err(format!("creating vCPU {index}")))
        })
        .collect()
}

/// Builds the emulated devices, at power-on or from `source`'s saved state.
#[allow(clippy::too_many_arguments)]
fn attach_devices(
    vm: &Arc<VmFd>,
    ram: &GuestRam,
    disks: &[BlockConfig],
    nics: &[NetConfig],
    serial_irq: EventFd,
    console: &ConsoleOutput,
    wakers: &MachineWakers,
    saved: Option<&[crate::devices::SavedDevice]>,
    host_fds: HandedOverFds,
) -> Result<DeviceSet, MachineError> {
    let mut ctx = DeviceContext {
        vm,
        memory: ram.memory().clone(),
        interrupts: GsiRouter::new(vm.clone()),
        pci: PciBus::new(),
        console,
        input_drained: &wakers.input_drained,
        serial_irq: Some(serial_irq),
        host_fds,
    };
    let set = DeviceSet::build(device_specs(disks, nics), &mut ctx, saved)?;
    let unclaimed = ctx.host_fds.names();
    if !unclaimed.is_empty() {
        log::warn!(
            "host fds handed over for devices this machine does not have: {}",
            unclaimed.join(", ")
        );
    }
    Ok(set)
}

/// What every fresh vCPU gets at power-on: its CPUID (KVM's supported set, with its APIC id
/// and the topology; KVM's signature leaves stay, so guests find kvmclock) and LINT wiring.
fn prepare_vcpu(
    vcpu: &VcpuFd,
    supported: &kvm_bindings::CpuId,
    index: u32,
    count: u32,
) -> Result<(), MachineError> {
    let err = |op: &str| kvm_err(format!("vCPU {index}: {op}"));
    vcpu.set_cpuid2(&cpuid::for_vcpu(supported, index, count))
        .map_err(err("KVM_SET_CPUID2"))?;
    set_lint(vcpu).map_err(err("LAPIC LINT setup"))
}

/// Puts a vCPU at a 64-bit entry point (`regs`), paging on with the boot page tables. KVM
/// leaves non-boot vCPUs waiting for INIT/SIPI; `runnable` starts one directly instead.
fn enter_long_mode(
    vcpu: &VcpuFd,
    index: u32,
    regs: &kvm_bindings::kvm_regs,
    runnable: bool,
) -> Result<(), MachineError> {
    let err = |op: &str| kvm_err(format!("vCPU {index}: {op}"));
    let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    boot::setup_long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    vcpu.set_regs(regs).map_err(err("KVM_SET_REGS"))?;
    vcpu.set_fpu(&boot::builtin_boot_fpu())
        .map_err(err("KVM_SET_FPU"))?;
    if runnable {
        vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .map_err(err("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

/// Wires LINT0 to ExtINT (the 8259 PIC) and LINT1 to NMI, as a PC BIOS would.
fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = u32::from_le_bytes(bytes);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as libc::c_char;
        }
    }
    vcpu.set_lapic(&lapic)
}
