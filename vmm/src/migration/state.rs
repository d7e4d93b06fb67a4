//! The one walk over machine state that every migration mode uses.
//!
//! A machine's state is the sum of its components' states: each vCPU ([`VcpuState`]), the VM's
//! in-kernel devices ([`VmState`]), the emulated devices ([`DeviceState`]) and the description
//! that says what machine this is ([`MachineDescription`]). Modes differ only in what they do
//! with RAM and where the bytes go; they all save and restore through the functions here.
//!
//! Ordering matters to KVM (see Firecracker's `vstate/vcpu` and Cloud Hypervisor's
//! `hypervisor/src/kvm` for the reasons):
//! - save: MP state first (KVM_GET_MP_STATE may accept pending INIT/SIPI events and change other
//!   state), vCPU events last (other GET ioctls may still move pending events around);
//! - restore: CPUID first; regs before events (SET_REGS clears pending exceptions that SET_VCPU_EVENTS
//!   restores); sregs before the LAPIC (sregs carry the APIC base); the LAPIC before MSRs (the TSC
//!   deadline only restores into a configured LAPIC); the TSC before the TSC deadline; events
//!   last; kvmclock after every vCPU (writing the TSC MSRs would otherwise skew it).

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, Xsave,
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceDescription, SavedDevice};
use crate::memory::RegionLayout;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const XSAVE_REGION_WORDS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("vCPU {index}: {op} failed: {source}")]
    Vcpu {
        index: u32,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {detail}")]
    VcpuDetail { index: u32, detail: String },
    #[error("VM: {op} failed: {source}")]
    Vm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area (legacy 4 KiB region followed by KVM_CAP_XSAVE2's extra words).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable, TSC first and TSC deadline last.
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// The VM's in-kernel devices and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// What the guest is, beyond its RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestKind {
    Builtin(String),
    /// A Linux kernel; which image does not matter once it runs (RAM holds it).
    Linux,
}

impl GuestKind {
    pub fn of(boot: &crate::cli::GuestBoot) -> Self {
        match boot {
            crate::cli::GuestBoot::Builtin(g) => GuestKind::Builtin(g.guest.name().to_string()),
            crate::cli::GuestBoot::Linux(_) => GuestKind::Linux,
        }
    }
}

/// What machine this is: a restore checks its own command line against it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDescription {
    pub vcpus: u32,
    pub ram_size: u64,
    pub regions: Vec<RegionLayout>,
    pub guest: GuestKind,
    /// Every emulated device with its place on the bus, in the order the machine builds them.
    pub devices: Vec<DeviceDescription>,
}

impl MachineDescription {
    /// Every way `ours` (from the command line) differs from `saved`, in words an operator can
    /// act on. Empty when they describe the same machine.
    pub fn differences(saved: &Self, ours: &Self) -> Vec<String> {
        let mut out = Vec::new();
        if saved.vcpus != ours.vcpus {
            out.push(format!(
                "vCPUs: the state has {}, the command line says {} (-smp)",
                saved.vcpus, ours.vcpus
            ));
        }
        if saved.ram_size != ours.ram_size {
            out.push(format!(
                "RAM: the state has {} MiB, the command line says {} MiB (-m)",
                saved.ram_size >> 20,
                ours.ram_size >> 20
            ));
        } else if saved.regions != ours.regions {
            out.push(format!(
                "memory regions: the state has {:?}, this VMM lays out {:?}",
                saved.regions, ours.regions
            ));
        }
        for d in &saved.devices {
            match ours.devices.iter().find(|o| o.id == d.id) {
                None => out.push(format!(
                    "devices: the state has '{}' ({}), this machine has no such device",
                    d.id, d.place
                )),
                Some(o) if o.place != d.place => out.push(format!(
                    "device '{}': the state has it at {}, this machine at {}",
                    d.id, d.place, o.place
                )),
                Some(_) => {}
            }
        }
        for o in &ours.devices {
            if !saved.devices.iter().any(|d| d.id == o.id) {
                out.push(format!(
                    "devices: this machine has '{}' ({}), the state has no such device",
                    o.id, o.place
                ));
            }
        }
        if saved.guest != ours.guest {
            out.push(format!(
                "guest: the state has {}, the command line says {} (--guest)",
                saved.guest.describe(),
                ours.guest.describe()
            ));
        }
        out
    }
}

impl GuestKind {
    pub fn describe(&self) -> String {
        match self {
            GuestKind::Builtin(name) => name.clone(),
            GuestKind::Linux => "a Linux kernel (-kernel)".to_string(),
        }
    }
}

/// The whole machine apart from RAM pages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub description: MachineDescription,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// Each emulated device's own state, under its id.
    pub devices: Vec<SavedDevice>,
}

fn vcpu_err(index: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vcpu { index, op, source }
}

/// The MSRs to save: the ones in KVM's index list that this vCPU can actually read, TSC first
/// and TSC deadline last (restoring the deadline needs the TSC already in place).
pub fn saveable_msrs(vcpu: &VcpuFd, listed: &[u32]) -> Vec<u32> {
    let mut candidates: Vec<u32> = listed.to_vec();
    candidates.sort_by_key(|&i| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    // KVM_GET_MSRS stops at the first MSR it cannot read; drop that one and try again.
    loop {
        let entries: Vec<kvm_msr_entry> = candidates
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            return Vec::new();
        };
        match vcpu.get_msrs(&mut msrs) {
            Ok(n) if n == candidates.len() => return candidates,
            Ok(n) => {
                log::debug!("MSR {:#x} cannot be read; not saving it", candidates[n]);
                candidates.remove(n);
            }
            Err(e) => {
                log::warn!("reading MSRs failed ({e}); saving none");
                return Vec::new();
            }
        }
    }
}

/// The size of the XSAVE area in 32-bit words (KVM_CAP_XSAVE2, at least the legacy 4 KiB).
pub fn xsave_words(vm: &VmFd) -> usize {
    let bytes = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    (usize::try_from(bytes).unwrap_or(0) / 4).max(XSAVE_REGION_WORDS)
}

pub fn save_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    msr_indices: &[u32],
    xsave_words: usize,
) -> Result<VcpuState, StateError> {
    let mp_state = vcpu
        .get_mp_state()
        .map_err(vcpu_err(index, "KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(vcpu_err(index, "KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(vcpu_err(index, "KVM_GET_SREGS"))?;
    let xsave = get_xsave(vcpu, index, xsave_words)?;
    let xcrs = vcpu.get_xcrs().map_err(vcpu_err(index, "KVM_GET_XCRS"))?;
    let debug_regs = vcpu
        .get_debug_regs()
        .map_err(vcpu_err(index, "KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(vcpu_err(index, "KVM_GET_LAPIC"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(vcpu_err(index, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = get_msrs(vcpu, index, msr_indices)?;
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(vcpu_err(index, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        index,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

fn get_msrs(
    vcpu: &VcpuFd,
    index: u32,
    msr_indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, StateError> {
    if msr_indices.is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::VcpuDetail {
        index,
        detail: format!("too many MSRs: {e:?}"),
    })?;
    let n = vcpu
        .get_msrs(&mut msrs)
        .map_err(vcpu_err(index, "KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(StateError::VcpuDetail {
            index,
            detail: format!("KVM_GET_MSRS read {n} of {} MSRs", entries.len()),
        });
    }
    Ok(msrs.as_slice().to_vec())
}

fn get_xsave(vcpu: &VcpuFd, index: u32, words: usize) -> Result<Vec<u32>, StateError> {
    if words <= XSAVE_REGION_WORDS {
        let x = vcpu.get_xsave().map_err(vcpu_err(index, "KVM_GET_XSAVE"))?;
        return Ok(x.region.to_vec());
    }
    let mut x = Xsave::new(words - XSAVE_REGION_WORDS).map_err(|e| StateError::VcpuDetail {
        index,
        detail: format!("XSAVE area of {words} words: {e:?}"),
    })?;
    // SAFETY: `x` was allocated with exactly the FAM length KVM_CAP_XSAVE2 reported for this VM.
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(vcpu_err(index, "KVM_GET_XSAVE2"))?;
    let mut out = x.as_fam_struct_ref().xsave.region.to_vec();
    out.extend_from_slice(x.as_slice());
    Ok(out)
}

fn set_xsave(vcpu: &VcpuFd, index: u32, words: &[u32]) -> Result<(), StateError> {
    if words.len() < XSAVE_REGION_WORDS {
        return Err(StateError::VcpuDetail {
            index,
            detail: format!(
                "XSAVE area has {} words, expected at least 1024",
                words.len()
            ),
        });
    }
    let (region, extra) = words.split_at(XSAVE_REGION_WORDS);
    if extra.is_empty() {
        let mut x = kvm_xsave::default();
        x.region.copy_from_slice(region);
        // The saved area had no XSAVE2 extension.
        // SAFETY: `x` is a complete legacy kvm_xsave, which is all KVM_SET_XSAVE reads then.
        return unsafe { vcpu.set_xsave(&x) }.map_err(vcpu_err(index, "KVM_SET_XSAVE"));
    }
    let mut x = Xsave::from_entries(extra).map_err(|e| StateError::VcpuDetail {
        index,
        detail: format!("XSAVE area: {e:?}"),
    })?;
    // SAFETY: we write only the fixed-size legacy region of a struct we own.
    unsafe {
        (*x.as_mut_fam_struct_ptr())
            .xsave
            .region
            .copy_from_slice(region)
    };
    // `x` holds the full area saved from a vCPU of the same kind of VM (description checked).
    // SAFETY: so KVM reads no further than its allocation.
    unsafe { vcpu.set_xsave2(&x) }.map_err(vcpu_err(index, "KVM_SET_XSAVE2"))
}

pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let index = s.index;
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| StateError::VcpuDetail {
        index,
        detail: format!("CPUID with {} entries: {e:?}", s.cpuid.len()),
    })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(vcpu_err(index, "KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(vcpu_err(index, "KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs)
        .map_err(vcpu_err(index, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(vcpu_err(index, "KVM_SET_SREGS"))?;
    set_xsave(vcpu, index, &s.xsave)?;
    vcpu.set_xcrs(&s.xcrs)
        .map_err(vcpu_err(index, "KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(vcpu_err(index, "KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(vcpu_err(index, "KVM_SET_LAPIC"))?;
    if !s.msrs.is_empty() {
        let msrs = Msrs::from_entries(&s.msrs).map_err(|e| StateError::VcpuDetail {
            index,
            detail: format!("{} MSRs: {e:?}", s.msrs.len()),
        })?;
        let n = vcpu
            .set_msrs(&msrs)
            .map_err(vcpu_err(index, "KVM_SET_MSRS"))?;
        if n != s.msrs.len() {
            return Err(StateError::VcpuDetail {
                index,
                detail: format!(
                    "KVM_SET_MSRS restored {n} of {} MSRs; MSR {:#x} was refused",
                    s.msrs.len(),
                    s.msrs[n].index
                ),
            });
        }
    }
    vcpu.set_vcpu_events(&s.vcpu_events)
        .map_err(vcpu_err(index, "KVM_SET_VCPU_EVENTS"))?;
    if let (Some(saved), Ok(ours)) = (s.tsc_khz, vcpu.get_tsc_khz())
        && saved != ours
        && vcpu.set_tsc_khz(saved).is_err()
    {
        log::warn!(
            "vCPU {index}: the guest's TSC ran at {saved} kHz, this host's runs at {ours} kHz and cannot be scaled"
        );
    }
    Ok(())
}

fn vm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vm { op, source }
}

fn get_irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(vm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores the interrupt controllers and the PIT (before the vCPUs).
pub fn restore_vm_devices(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    for (chip, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(StateError::VcpuDetail {
                index: 0,
                detail: format!("irqchip {id} saved with id {}", chip.chip_id),
            });
        }
        // PCI INTx pins start clean; their functions assert them again at resume.
        let chip = crate::devices::interrupts::release_intx_pins(chip);
        vm.set_irqchip(&chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(vm_err("KVM_SET_PIT2"))
}

/// Restores kvmclock (after the vCPUs), so guest time continues from where it stopped.
pub fn restore_vm_clock(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(vcpus: u32, ram: u64, guest: &str) -> MachineDescription {
        MachineDescription {
            vcpus,
            ram_size: ram,
            regions: crate::memory::layout(ram),
            guest: GuestKind::Builtin(guest.into()),
            devices: crate::machine::device_descriptions(&[], &[]),
        }
    }

    #[test]
    fn differences_name_each_mismatch() {
        let a = desc(2, 1 << 30, "memcheck");
        assert!(MachineDescription::differences(&a, &a).is_empty());
        let d = MachineDescription::differences(&a, &desc(1, 512 << 20, "heartbeat"));
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("-smp"));
        assert!(d[1].contains("1024 MiB") && d[1].contains("512 MiB"));
        assert!(d[2].contains("memcheck") && d[2].contains("heartbeat"));
    }

    #[test]
    fn differences_name_each_device_that_is_missing_extra_or_moved() {
        use crate::devices::{DeviceDescription, Place};
        let saved = desc(1, 64 << 20, "heartbeat");
        let mut ours = saved.clone();
        ours.devices.retain(|d| d.id != "rtc");
        ours.devices.push(DeviceDescription {
            id: "virtio-blk:disk0".into(),
            place: Place::Mmio {
                base: 0xe000_0000,
                len: 0x4000,
            },
        });
        if let Some(serial) = ours.devices.iter_mut().find(|d| d.id == "serial") {
            serial.place = Place::Port {
                base: 0x2f8,
                len: 8,
            };
        }
        let d = MachineDescription::differences(&saved, &ours);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d.iter()
                .any(|l| l.contains("'serial'") && l.contains("0x2f8"))
        );
        assert!(
            d.iter()
                .any(|l| l.contains("'rtc'") && l.contains("no such device"))
        );
        assert!(d.iter().any(|l| l.contains("'virtio-blk:disk0'")));
    }
}
