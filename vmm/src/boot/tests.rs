//! Tests of the built-in guest boot code.
//!
//! The KVM tests run the real guest images in a minimal VM built directly with
//! kvm-ioctls (in-kernel irqchip, PIT, one RAM slot, one thread per vCPU) and
//! are skipped with a message when /dev/kvm cannot be opened. They are
//! serialized with a lock: the host may have only 2 cores and slow nested KVM.

use super::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, kvm_lapic_state, kvm_mp_state,
    kvm_pit_config, kvm_userspace_memory_region, kvm_vcpu_events,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

const MIB: u64 = 1 << 20;
const TEST_RAM_SIZE: u64 = 64 * MIB;
const SERIAL_PORT: u16 = 0x3f8;
const TEST_TICK_HZ: u32 = 50;
/// How long to wait for expected guest output. Generous: nested KVM is slow.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(60);
/// Real-time signal offset used to kick vCPU threads out of KVM_RUN; unusual
/// so that it does not collide with a kick signal of the VMM proper.
const KICK_SIGNAL_OFFSET: i32 = 7;

/// Serializes the KVM tests.
static KVM_TESTS: Mutex<()> = Mutex::new(());

fn params(vcpu_count: u32) -> GuestParams {
    GuestParams {
        vcpu_count,
        ram_end: TEST_RAM_SIZE,
        tick_hz: TEST_TICK_HZ,
        exit_after_ticks: 0,
        exit_code: 0,
    }
}

fn test_memory(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.read_obj::<u64>(GuestAddress(addr)).unwrap()
}

fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj::<u32>(GuestAddress(addr)).unwrap()
}

// ---------------------------------------------------------------------------
// Tests that need no KVM.
// ---------------------------------------------------------------------------

#[test]
fn builtin_guest_names_round_trip() {
    for guest in BuiltinGuest::ALL {
        assert_eq!(BuiltinGuest::from_name(guest.name()), Some(guest));
        assert!(!guest.image().is_empty());
        assert!(guest.image().len() <= MAX_GUEST_IMAGE_SIZE);
    }
    assert_eq!(
        BuiltinGuest::from_name("heartbeat"),
        Some(BuiltinGuest::Heartbeat)
    );
    assert_eq!(
        BuiltinGuest::from_name("memcheck"),
        Some(BuiltinGuest::Memcheck)
    );
    assert_eq!(BuiltinGuest::from_name("Heartbeat"), None);
    assert_eq!(BuiltinGuest::from_name(""), None);
}

#[test]
fn load_writes_boot_structures() {
    let mem = test_memory(TEST_RAM_SIZE);
    let p = GuestParams {
        vcpu_count: 3,
        ram_end: TEST_RAM_SIZE,
        tick_hz: 100,
        exit_after_ticks: 42,
        exit_code: 7,
    };
    // Guest-owned parts of the parameter block must be reset by the load.
    mem.write_obj(0xdead_beef_u32, GuestAddress(PARAMS_ADDR + 0x40))
        .unwrap();
    mem.write_obj(5u64, GuestAddress(PERCPU_AREA_ADDR + 2 * PERCPU_AREA_SIZE))
        .unwrap();
    load_builtin_guest(&mem, BuiltinGuest::Heartbeat, &p).unwrap();

    // Parameter block.
    let mut magic = [0u8; 8];
    mem.read_slice(&mut magic, GuestAddress(PARAMS_ADDR))
        .unwrap();
    assert_eq!(&magic, b"CPRGUEST");
    assert_eq!(read_u32(&mem, PARAMS_ADDR + 0x08), 1);
    assert_eq!(read_u32(&mem, PARAMS_ADDR + 0x0c), 3);
    assert_eq!(read_u64(&mem, PARAMS_ADDR + 0x10), TEST_RAM_SIZE);
    assert_eq!(read_u32(&mem, PARAMS_ADDR + 0x18), 625_000);
    assert_eq!(read_u32(&mem, PARAMS_ADDR + 0x1c), 42);
    assert_eq!(read_u32(&mem, PARAMS_ADDR + 0x20), 7);
    assert_eq!(read_u32(&mem, PARAMS_ADDR + 0x40), 0);
    assert_eq!(read_u64(&mem, PERCPU_AREA_ADDR + 2 * PERCPU_AREA_SIZE), 0);

    // GDT: null, 64-bit code, flat data.
    assert_eq!(read_u64(&mem, 0x500), 0);
    assert_eq!(read_u64(&mem, 0x508), 0x00af_9b00_0000_ffff);
    assert_eq!(read_u64(&mem, 0x510), 0x00cf_9300_0000_ffff);

    // Page tables: identity map of 0..4 GiB with 2 MiB pages.
    assert_eq!(read_u64(&mem, 0x9000), 0xa000 | 0x3);
    assert_eq!(read_u64(&mem, 0x9008), 0);
    for gib in 0..4 {
        assert_eq!(
            read_u64(&mem, 0xa000 + gib * 8),
            (0xb000 + gib * 0x1000) | 0x3
        );
    }
    assert_eq!(read_u64(&mem, 0xa020), 0);
    assert_eq!(read_u64(&mem, 0xb000), 0x83);
    assert_eq!(read_u64(&mem, 0xb008), (2 * MIB) | 0x83);
    let last_ram_pde = 0xb000 + ((3 << 30) / (2 * MIB) - 1) * 8;
    assert_eq!(read_u64(&mem, last_ram_pde), ((3 << 30) - 2 * MIB) | 0x83);
    // 3..4 GiB is MMIO: PCD|PWT. The LAPIC page at 0xfee0_0000:
    let lapic_pde = 0xb000 + (0xfee0_0000 / (2 * MIB)) * 8;
    assert_eq!(read_u64(&mem, lapic_pde), 0xfee0_0000 | 0x9b);
    assert_eq!(read_u64(&mem, 0xeff8), ((4 << 30) - 2 * MIB) | 0x9b);

    // Image.
    let image = BuiltinGuest::Heartbeat.image();
    let mut loaded = vec![0u8; image.len()];
    mem.read_slice(&mut loaded, GuestAddress(GUEST_LOAD_ADDR))
        .unwrap();
    assert_eq!(loaded, image);
}

#[test]
fn load_rejects_bad_parameters() {
    let mem = test_memory(16 * MIB);
    let ok = GuestParams {
        vcpu_count: 1,
        ram_end: 16 * MIB,
        tick_hz: 100,
        exit_after_ticks: 0,
        exit_code: 0,
    };
    let load = |guest, p: GuestParams| load_builtin_guest(&mem, guest, &p);
    assert!(load(BuiltinGuest::Heartbeat, ok).is_ok());
    assert!(
        load(
            BuiltinGuest::Heartbeat,
            GuestParams {
                vcpu_count: 32,
                ..ok
            }
        )
        .is_ok()
    );

    let err = load(
        BuiltinGuest::Heartbeat,
        GuestParams {
            vcpu_count: 0,
            ..ok
        },
    )
    .unwrap_err();
    assert!(matches!(err, BootError::InvalidVcpuCount(0)), "{err}");
    let err = load(
        BuiltinGuest::Memcheck,
        GuestParams {
            vcpu_count: 33,
            ..ok
        },
    )
    .unwrap_err();
    assert!(matches!(err, BootError::InvalidVcpuCount(33)), "{err}");
    assert!(err.to_string().contains("33"), "{err}");

    let err = load(BuiltinGuest::Heartbeat, GuestParams { ram_end: MIB, ..ok }).unwrap_err();
    assert!(matches!(err, BootError::RamTooSmall(_)), "{err}");
    assert!(err.to_string().contains("RAM too small"), "{err}");
    let err = load(
        BuiltinGuest::Heartbeat,
        GuestParams {
            ram_end: 4 << 30,
            ..ok
        },
    )
    .unwrap_err();
    assert!(matches!(err, BootError::RamEndTooLarge(_)), "{err}");
    let err = load(
        BuiltinGuest::Heartbeat,
        GuestParams {
            ram_end: 32 * MIB,
            ..ok
        },
    )
    .unwrap_err();
    assert!(matches!(err, BootError::RamNotBacked(_)), "{err}");

    let err = load(BuiltinGuest::Heartbeat, GuestParams { tick_hz: 0, ..ok }).unwrap_err();
    assert!(matches!(err, BootError::InvalidTickRate(0)), "{err}");
    let err = load(
        BuiltinGuest::Heartbeat,
        GuestParams {
            tick_hz: MAX_TICK_HZ + 1,
            ..ok
        },
    )
    .unwrap_err();
    assert!(matches!(err, BootError::InvalidTickRate(_)), "{err}");
    // memcheck has no timer: the rate does not matter.
    assert!(load(BuiltinGuest::Memcheck, GuestParams { tick_hz: 0, ..ok }).is_ok());
    assert_eq!(read_u32(&mem, PARAMS_ADDR + 0x18), 0);

    // RAM that does not start at 0 cannot hold the boot structures.
    let high =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MIB), 16 * MIB as usize)]).unwrap();
    let err = load_builtin_guest(&high, BuiltinGuest::Heartbeat, &ok).unwrap_err();
    assert!(matches!(err, BootError::RamNotBacked(_)), "{err}");
}

#[test]
fn timer_count_uses_1ghz_bus_divided_by_16() {
    assert_eq!(timer_initial_count(100), Some(625_000));
    assert_eq!(timer_initial_count(50), Some(1_250_000));
    assert_eq!(timer_initial_count(1), Some(62_500_000));
    assert_eq!(timer_initial_count(MAX_TICK_HZ), Some(12_500));
    assert_eq!(timer_initial_count(0), None);
    assert_eq!(timer_initial_count(MAX_TICK_HZ + 1), None);
}

#[test]
fn boot_regs_and_fpu() {
    let r0 = builtin_boot_regs(0);
    assert_eq!(
        (r0.rip, r0.rsp, r0.rdi, r0.rsi, r0.rflags),
        (0x10000, 0xa0000, 0, 0x7000, 2)
    );
    let r5 = builtin_boot_regs(5);
    assert_eq!(
        (r5.rip, r5.rsp, r5.rdi, r5.rsi),
        (0x10000, 0xa0000 - 5 * 0x4000, 5, 0x7000)
    );
    // The last stack must not reach into the image (0x10000..0x1ffff).
    let last = builtin_boot_regs(MAX_BUILTIN_VCPUS - 1);
    assert!(last.rsp - STACK_SIZE >= GUEST_LOAD_ADDR + MAX_GUEST_IMAGE_SIZE as u64);

    let fpu = builtin_boot_fpu();
    assert_eq!(
        (fpu.fcw, fpu.mxcsr, fpu.fsw, fpu.ftwx),
        (0x37f, 0x1f80, 0, 0)
    );
}

#[test]
fn long_mode_sregs() {
    let mut sregs = kvm_sregs {
        cr0: 0x6000_0010, // CD|NW|ET, as KVM resets it
        ..Default::default()
    };
    setup_long_mode_sregs(&mut sregs);
    assert_eq!(sregs.cr0, 0x8001_0033);
    assert_eq!(sregs.cr3, 0x9000);
    assert_eq!(sregs.cr4, 0x620);
    assert_eq!(sregs.efer, 0x500);
    assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 23));
    assert_eq!((sregs.idt.base, sregs.idt.limit), (0, 0));

    let cs = sregs.cs;
    assert_eq!(
        (cs.selector, cs.base, cs.limit, cs.type_),
        (0x08, 0, 0xffff_ffff, 0xb)
    );
    assert_eq!(
        (cs.present, cs.s, cs.dpl, cs.l, cs.db, cs.g, cs.unusable),
        (1, 1, 0, 1, 0, 1, 0)
    );
    for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
        assert_eq!(
            (seg.selector, seg.base, seg.limit, seg.type_),
            (0x10, 0, 0xffff_ffff, 0x3)
        );
        assert_eq!(
            (
                seg.present,
                seg.s,
                seg.dpl,
                seg.l,
                seg.db,
                seg.g,
                seg.unusable
            ),
            (1, 1, 0, 0, 1, 1, 0)
        );
    }
}

#[test]
fn memcheck_rule() {
    assert!(check_memcheck_dump(&[3, 3, 3, 3]).is_ok());
    assert!(check_memcheck_dump(&[4, 4, 3, 3]).is_ok());
    assert!(check_memcheck_dump(&[0, 0, 255, 255]).is_ok());
    assert!(check_memcheck_dump(&[4, 3, 3, 4]).is_err());
    assert!(check_memcheck_dump(&[4, 3, 4, 3]).is_err());
    assert!(check_memcheck_dump(&[5, 3, 3, 3]).is_err());
    assert!(check_memcheck_dump(&[3, 3, 0, 3]).is_err());
}

/// The memcheck rule: all bytes are equal except at most one place where the
/// value drops by exactly 1 (mod 256).
fn check_memcheck_dump(bytes: &[u8]) -> Result<(), String> {
    let mut drop_at = None;
    for (i, pair) in bytes.windows(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        if a == b {
            continue;
        }
        if b != a.wrapping_sub(1) {
            return Err(format!("page {i}: {a} is followed by {b}"));
        }
        if let Some(first) = drop_at.replace(i) {
            return Err(format!(
                "more than one drop by 1: after page {first} and after page {i}"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Minimal VM harness.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Output {
    /// Bytes written to the serial THR.
    serial: Vec<u8>,
    /// Byte written to the debug exit port, if any.
    exit_code: Option<u8>,
    /// Unexpected vCPU exit or KVM error.
    error: Option<String>,
}

impl Output {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }
}

#[derive(Default)]
struct Shared {
    output: Mutex<Output>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Output)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// A running test VM. Dropping it stops the vCPU threads.
struct TestVm {
    // Drop order matters: the VM goes before the memory it maps.
    threads: Vec<JoinHandle<VcpuFd>>,
    /// The vCPUs, once `stop` has joined their threads.
    vcpus: Vec<VcpuFd>,
    shared: Arc<Shared>,
    _vm: VmFd,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
    /// Held while the VM exists: the KVM tests run one at a time.
    serial: Option<MutexGuard<'static, ()>>,
}

/// What a save/restore must carry per vCPU for the built-in guests.
struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// The supported CPUID with the APIC id of vCPU `index`.
fn vcpu_cpuid(supported: &CpuId, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            // Initial APIC id in EBX[31:24].
            0x1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24),
            // x2APIC id of the topology leaves.
            0xb | 0x1f => entry.edx = index,
            _ => {}
        }
    }
    cpuid
}

/// A VM with in-kernel irqchip and PIT, and `ram_size` bytes of RAM at 0.
fn create_vm(kvm: &Kvm, ram_size: u64) -> (VmFd, GuestMemoryMmap) {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config::default()).unwrap();

    let mem = test_memory(ram_size);
    let host_addr = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram_size,
        userspace_addr: host_addr as u64,
    };
    // `host_addr` is the start of a mapping of `ram_size` bytes owned by `mem`.
    // SAFETY: the caller keeps `mem` (in a TestVm) until after the VM and vCPU fds are closed.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    (vm, mem)
}

impl TestVm {
    /// Boots `guest` on a fresh VM; `None` if KVM is not available.
    fn start(guest: BuiltinGuest, p: &GuestParams) -> Option<TestVm> {
        Self::start_with(guest, p, |_| {})
    }

    /// Like [`start`](Self::start), with `patch` applied to RAM after loading.
    fn start_with(
        guest: BuiltinGuest,
        p: &GuestParams,
        patch: impl FnOnce(&GuestMemoryMmap),
    ) -> Option<TestVm> {
        let serial = KVM_TESTS.lock().unwrap_or_else(PoisonError::into_inner);
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("skipping KVM test: cannot open /dev/kvm: {e}");
                return None;
            }
        };
        let (vm, mem) = create_vm(&kvm, p.ram_end);
        load_builtin_guest(&mem, guest, p).unwrap();
        patch(&mem);

        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vcpus = (0..p.vcpu_count)
            .map(|index| {
                let vcpu = vm.create_vcpu(u64::from(index)).unwrap();
                vcpu.set_cpuid2(&vcpu_cpuid(&supported, index)).unwrap();
                let mut sregs = vcpu.get_sregs().unwrap();
                setup_long_mode_sregs(&mut sregs);
                vcpu.set_sregs(&sregs).unwrap();
                vcpu.set_regs(&builtin_boot_regs(index)).unwrap();
                vcpu.set_fpu(&builtin_boot_fpu()).unwrap();
                if index > 0 {
                    // APs start UNINITIALIZED (waiting for INIT/SIPI).
                    let runnable = kvm_mp_state {
                        mp_state: KVM_MP_STATE_RUNNABLE,
                    };
                    vcpu.set_mp_state(runnable).unwrap();
                }
                vcpu
            })
            .collect();
        Some(Self::run(kvm, vm, mem, vcpus, serial))
    }

    /// Starts one thread per vCPU.
    fn run(
        kvm: Kvm,
        vm: VmFd,
        mem: GuestMemoryMmap,
        vcpus: Vec<VcpuFd>,
        serial: MutexGuard<'static, ()>,
    ) -> TestVm {
        static KICK_HANDLER: Once = Once::new();
        KICK_HANDLER.call_once(|| register_signal_handler(kick_signal(), kick_handler).unwrap());
        let shared = Arc::new(Shared::default());
        let threads = vcpus
            .into_iter()
            .enumerate()
            .map(|(index, vcpu)| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("test-vcpu{index}"))
                    .spawn(move || run_vcpu(vcpu, index, &shared))
                    .unwrap()
            })
            .collect();
        TestVm {
            threads,
            vcpus: Vec::new(),
            shared,
            _vm: vm,
            _kvm: kvm,
            mem,
            serial: Some(serial),
        }
    }

    /// Waits until `done` holds for the output; panics with the output so
    /// far on timeout, vCPU error or an unexpected guest exit.
    fn wait_for(&self, what: &str, done: impl Fn(&Output) -> bool) -> String {
        let deadline = Instant::now() + OUTPUT_TIMEOUT;
        let mut out = self.shared.lock();
        loop {
            if done(&out) {
                return out.text();
            }
            if let Some(err) = &out.error {
                panic!(
                    "vCPU failed while waiting for {what}: {err}\nserial output:\n{}",
                    out.text()
                );
            }
            if let Some(code) = out.exit_code {
                panic!(
                    "guest exited with {code:#x} while waiting for {what}\nserial output:\n{}",
                    out.text()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {OUTPUT_TIMEOUT:?} waiting for {what}\nserial output:\n{}",
                    out.text()
                );
            }
            out = self
                .shared
                .changed
                .wait_timeout(out, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn wait_for_text(&self, needle: &str) -> String {
        self.wait_for(&format!("{needle:?}"), |out| out.text().contains(needle))
    }

    /// Stops all vCPU threads: sets the stop flag and kicks each thread out of
    /// KVM_RUN with a signal until it has exited (a kick that lands just
    /// before KVM_RUN is entered would be lost, hence the repetition).
    /// Returns the output collected so far.
    fn stop(&mut self) -> Output {
        self.shared.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.threads.iter().any(|t| !t.is_finished()) {
            if Instant::now() > deadline {
                eprintln!("warning: vCPU threads did not stop; leaving them behind");
                self.threads.clear();
                break;
            }
            for thread in self.threads.iter().filter(|t| !t.is_finished()) {
                let _ = thread.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for thread in self.threads.drain(..) {
            self.vcpus.push(thread.join().unwrap());
        }
        std::mem::take(&mut *self.shared.lock())
    }

    /// Per-vCPU area of vCPU `index`: (tick counter, last tick printed).
    fn percpu(&self, index: u64) -> (u64, u64) {
        let base = PERCPU_AREA_ADDR + index * PERCPU_AREA_SIZE;
        (read_u64(&self.mem, base), read_u64(&self.mem, base + 8))
    }

    /// Stops this VM, saves RAM and vCPU state, and resumes it in a new VM.
    /// Returns the output of this VM and the new VM.
    fn save_and_restore(mut self) -> (Output, TestVm) {
        let out = self.stop();
        let states: Vec<VcpuState> = self
            .vcpus
            .iter_mut()
            .map(|vcpu| {
                // A KVM_RUN with immediate_exit completes an I/O exit that is
                // still pending (e.g. advances RIP past an OUT) without
                // entering the guest, so the state below is consistent.
                vcpu.set_kvm_immediate_exit(1);
                let err = vcpu.run().map(|_| ()).unwrap_err();
                assert_eq!(err.errno(), libc::EINTR);
                vcpu.set_kvm_immediate_exit(0);
                VcpuState {
                    regs: vcpu.get_regs().unwrap(),
                    sregs: vcpu.get_sregs().unwrap(),
                    fpu: vcpu.get_fpu().unwrap(),
                    lapic: vcpu.get_lapic().unwrap(),
                    mp_state: vcpu.get_mp_state().unwrap(),
                    events: vcpu.get_vcpu_events().unwrap(),
                }
            })
            .collect();
        let ram_size = self.mem.last_addr().0 + 1;
        let mut ram = vec![0u8; ram_size as usize];
        self.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();

        let kvm = Kvm::new().unwrap();
        let (vm, mem) = create_vm(&kvm, ram_size);
        mem.write_slice(&ram, GuestAddress(0)).unwrap();
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vcpus = states
            .iter()
            .enumerate()
            .map(|(index, state)| {
                let vcpu = vm.create_vcpu(index as u64).unwrap();
                vcpu.set_cpuid2(&vcpu_cpuid(&supported, index as u32))
                    .unwrap();
                vcpu.set_mp_state(state.mp_state).unwrap();
                vcpu.set_regs(&state.regs).unwrap();
                vcpu.set_sregs(&state.sregs).unwrap();
                vcpu.set_fpu(&state.fpu).unwrap();
                vcpu.set_lapic(&state.lapic).unwrap();
                vcpu.set_vcpu_events(&state.events).unwrap();
                vcpu
            })
            .collect();
        let serial = self.serial.take().unwrap();
        drop(self);
        (out, Self::run(kvm, vm, mem, vcpus, serial))
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.stop();
        // Close the vCPU fds, then (by field order) the VM, then the memory.
        self.vcpus.clear();
    }
}

/// One vCPU thread: runs until the stop flag, a debug-port exit or an error,
/// then hands the vCPU back.
fn run_vcpu(mut vcpu: VcpuFd, index: usize, shared: &Shared) -> VcpuFd {
    while !shared.stop.load(Ordering::SeqCst) {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(SERIAL_PORT, data)) => {
                let data = data.to_vec();
                shared.update(|out| out.serial.extend_from_slice(&data));
            }
            Ok(VcpuExit::IoOut(DEBUG_EXIT_PORT, data)) => {
                let code = data.first().copied().unwrap_or(0);
                shared.stop.store(true, Ordering::SeqCst);
                shared.update(|out| out.exit_code = Some(code));
            }
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
            Ok(exit) => {
                let msg = format!("vCPU {index}: unexpected exit {exit:?}");
                shared.update(|out| {
                    out.error.get_or_insert(msg);
                });
                break;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                let msg = format!("vCPU {index}: KVM_RUN failed: {e}");
                shared.update(|out| {
                    out.error.get_or_insert(msg);
                });
                break;
            }
        }
    }
    vcpu
}

// ---------------------------------------------------------------------------
// Output checks.
// ---------------------------------------------------------------------------

/// Checks every complete line of heartbeat output: well-formed, no
/// interleaving, each vCPU prints "start" first and then ticks 1, 2, 3, ...
/// without gaps. Returns the last tick printed per vCPU.
fn check_heartbeat_output(text: &str, vcpu_count: usize) -> Vec<u64> {
    let mut last: Vec<Option<u64>> = vec![None; vcpu_count];
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    for line in complete.lines() {
        let rest = line
            .strip_prefix("heartbeat: cpu ")
            .unwrap_or_else(|| panic!("malformed line {line:?} in:\n{text}"));
        let (cpu, event) = rest
            .split_once(' ')
            .unwrap_or_else(|| panic!("malformed line {line:?} in:\n{text}"));
        let cpu: usize = cpu
            .parse()
            .unwrap_or_else(|_| panic!("bad cpu in line {line:?} in:\n{text}"));
        assert!(cpu < vcpu_count, "unknown cpu in line {line:?} in:\n{text}");
        let expected = match last[cpu] {
            None => "start".to_string(),
            Some(t) => format!("tick {}", t + 1),
        };
        assert_eq!(
            event, expected,
            "cpu {cpu}: line {line:?} out of sequence in:\n{text}"
        );
        last[cpu] = Some(last[cpu].map_or(0, |t| t + 1));
    }
    last.into_iter().map(|t| t.unwrap_or(0)).collect()
}

fn tick_line(cpu: u32, tick: u64) -> String {
    format!("heartbeat: cpu {cpu} tick {tick}\n")
}

// ---------------------------------------------------------------------------
// KVM tests.
// ---------------------------------------------------------------------------

#[test]
fn heartbeat_one_vcpu_prints_consecutive_ticks() {
    let Some(mut vm) = TestVm::start(BuiltinGuest::Heartbeat, &params(1)) else {
        return;
    };
    vm.wait_for_text(&tick_line(0, 3));
    let t0 = Instant::now();
    const MEASURED: u64 = 25;
    vm.wait_for_text(&tick_line(0, 3 + MEASURED));
    let hz = MEASURED as f64 / t0.elapsed().as_secs_f64();
    eprintln!("heartbeat: requested {TEST_TICK_HZ} Hz, observed {hz:.1} Hz");

    let out = vm.stop();
    let text = out.text();
    assert!(
        text.starts_with(
            "heartbeat: cpu 0 start\nheartbeat: cpu 0 tick 1\n\
             heartbeat: cpu 0 tick 2\nheartbeat: cpu 0 tick 3\n"
        ),
        "{text}"
    );
    let last = check_heartbeat_output(&text, 1)[0];
    assert!(last >= 3 + MEASURED);
    assert_eq!(out.error, None);

    // The per-vCPU area agrees (the "printed" store follows the '\n', so the
    // vCPU may have been stopped between the two).
    let (ticks, printed) = vm.percpu(0);
    assert!(
        printed == last || printed + 1 == last,
        "printed {printed}, last line {last}"
    );
    assert!(ticks >= printed, "ticks {ticks} < printed {printed}");

    let want = f64::from(TEST_TICK_HZ);
    assert!(
        hz > want * 0.2 && hz < want * 3.0,
        "tick rate {hz:.1} Hz is far from the requested {want} Hz"
    );
}

#[test]
fn heartbeat_two_vcpus_tick_without_interleaving() {
    let Some(mut vm) = TestVm::start(BuiltinGuest::Heartbeat, &params(2)) else {
        return;
    };
    vm.wait_for("tick 5 of both vCPUs", |out| {
        let text = out.text();
        text.contains(&tick_line(0, 5)) && text.contains(&tick_line(1, 5))
    });
    let out = vm.stop();
    let last = check_heartbeat_output(&out.text(), 2);
    assert!(last.iter().all(|&t| t >= 5), "{last:?}");
    assert_eq!(out.error, None);
    for (cpu, &last) in last.iter().enumerate() {
        // The "printed" store follows the '\n': the vCPU may stop in between.
        let (ticks, printed) = vm.percpu(cpu as u64);
        assert!(
            (printed == last || printed + 1 == last) && ticks >= printed,
            "cpu {cpu}: ticks {ticks}, printed {printed}, last line {last}"
        );
    }
}

#[test]
fn heartbeat_exits_with_code_after_ticks() {
    let p = GuestParams {
        exit_after_ticks: 3,
        exit_code: 7,
        ..params(2)
    };
    let Some(mut vm) = TestVm::start(BuiltinGuest::Heartbeat, &p) else {
        return;
    };
    vm.wait_for("the debug exit", |out| out.exit_code.is_some());
    let out = vm.stop();
    let text = out.text();
    assert_eq!(out.exit_code, Some(7), "{text}");
    assert!(text.contains(&tick_line(0, 3)), "{text}");
    assert!(!text.contains(&tick_line(0, 4)), "{text}");
    check_heartbeat_output(&text, 2);
}

#[test]
fn memcheck_sweeps_and_memory_stays_consistent() {
    // More RAM than the 100 MiB limit, to check that the sweep stops there.
    let p = GuestParams {
        ram_end: MEMCHECK_LIMIT + 8 * MIB,
        ..params(2)
    };
    let Some(mut vm) = TestVm::start(BuiltinGuest::Memcheck, &p) else {
        return;
    };
    const SWEEPS: usize = 3;
    let t0 = Instant::now();
    vm.wait_for("A and some Bs", |out| {
        out.serial.iter().filter(|&&b| b == b'B').count() >= SWEEPS
    });
    eprintln!(
        "memcheck: {SWEEPS} sweeps of 99 MiB took {:?}",
        t0.elapsed()
    );
    let out = vm.stop();
    let text = out.text();
    assert_eq!(out.error, None);
    assert!(text.starts_with('A'), "{text}");
    assert!(text[1..].bytes().all(|b| b == b'B'), "{text}");
    let sweeps = text.len() - 1;
    assert!(sweeps >= SWEEPS);

    let end = p.ram_end.min(MEMCHECK_LIMIT);
    let dump: Vec<u8> = (MEMCHECK_START..end)
        .step_by(0x1000)
        .map(|addr| vm.mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
        .collect();
    check_memcheck_dump(&dump).unwrap();
    // Page 0 was incremented once per printed sweep, plus possibly once for a
    // sweep whose "B" is not out yet and once for the sweep in progress.
    let behind = dump[0].wrapping_sub(sweeps as u8);
    assert!(
        behind <= 2,
        "first page holds {}, but {sweeps} sweeps were reported",
        dump[0]
    );
    // Only the first byte of each page is touched.
    assert_eq!(
        vm.mem
            .read_obj::<u8>(GuestAddress(MEMCHECK_START + 1))
            .unwrap(),
        0
    );
    assert_eq!(vm.mem.read_obj::<u8>(GuestAddress(end - 1)).unwrap(), 0);
    // The sweep stops at MEMCHECK_LIMIT even if there is more RAM.
    assert_ne!(
        vm.mem
            .read_obj::<u8>(GuestAddress(MEMCHECK_LIMIT - 0x1000))
            .unwrap(),
        0
    );
    assert_eq!(
        vm.mem.read_obj::<u8>(GuestAddress(MEMCHECK_LIMIT)).unwrap(),
        0
    );
}

#[test]
fn guest_reports_bad_parameter_block() {
    let Some(mut vm) = TestVm::start_with(BuiltinGuest::Heartbeat, &params(1), |mem| {
        mem.write_obj(0u64, GuestAddress(PARAMS_ADDR)).unwrap();
    }) else {
        return;
    };
    vm.wait_for("the debug exit", |out| out.exit_code.is_some());
    let out = vm.stop();
    assert_eq!(out.exit_code, Some(GUEST_FAULT_EXIT_CODE));
    assert!(
        out.text().contains("guest: bad parameter block"),
        "{}",
        out.text()
    );
}

#[test]
fn heartbeat_numbering_continues_after_save_and_restore() {
    let Some(vm) = TestVm::start(BuiltinGuest::Heartbeat, &params(2)) else {
        return;
    };
    vm.wait_for("tick 3 of both vCPUs", |out| {
        let text = out.text();
        text.contains(&tick_line(0, 3)) && text.contains(&tick_line(1, 3))
    });
    let (before, vm) = vm.save_and_restore();
    let saved = check_heartbeat_output(&before.text(), 2);
    let target: Vec<u64> = saved.iter().map(|t| t + 3).collect();
    vm.wait_for("3 more ticks of both vCPUs after the restore", |out| {
        let text = out.text();
        text.contains(&tick_line(0, target[0])) && text.contains(&tick_line(1, target[1]))
    });
    let mut vm = vm;
    let after = vm.stop();
    assert_eq!(after.error, None);
    // The restored VM continues exactly where the old one stopped, even
    // in the middle of a line.
    let mut all = before.serial;
    all.extend_from_slice(&after.serial);
    let all = String::from_utf8_lossy(&all);
    let last = check_heartbeat_output(&all, 2);
    assert!(
        last[0] >= target[0] && last[1] >= target[1],
        "{last:?}\n{all}"
    );
}

#[test]
fn guest_reports_unexpected_exception() {
    // Replace the first instruction of heartbeat's timer handler
    // (`incq (%r14); movl $0, 0xb0(%r15)`) with ud2, so the first tick raises #UD.
    let image = BuiltinGuest::Heartbeat.image();
    let handler: &[u8] = &[
        0x49, 0xff, 0x06, 0x41, 0xc7, 0x87, 0xb0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let offset = image
        .windows(handler.len())
        .position(|w| w == handler)
        .expect("timer handler not found in the heartbeat image");
    let rip = GUEST_LOAD_ADDR + offset as u64;
    let Some(mut vm) = TestVm::start_with(BuiltinGuest::Heartbeat, &params(1), |mem| {
        mem.write_slice(&[0x0f, 0x0b], GuestAddress(rip)).unwrap();
    }) else {
        return;
    };
    vm.wait_for("the debug exit", |out| out.exit_code.is_some());
    let out = vm.stop();
    let text = out.text();
    assert_eq!(out.exit_code, Some(GUEST_FAULT_EXIT_CODE), "{text}");
    let report = format!(
        "guest: cpu 0: unexpected exception/interrupt, vector 6 error 0x{:016x} rip 0x{rip:016x}\n",
        0 // #UD pushes no error code; the stub pushes 0
    );
    assert!(text.contains(&report), "expected {report:?} in:\n{text}");
}
