//! Tests of the built-in guest boot code.
//!
//! The KVM tests run the real guest images on the VMM's own [`Machine`] (its VM,
//! devices, CPUID, vCPU threads and save/restore), with the serial console
//! captured, and are skipped with a message when /dev/kvm cannot be opened.
//! They are serialized with a lock: the host may have only 2 cores and slow
//! nested KVM.

use super::*;

use std::io::{PipeReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::Receiver;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use vm_memory::GuestMemoryMmap;

use crate::cli::{GuestBoot, GuestSpec};
use crate::devices::VmRequest;
use crate::devices::console::ConsoleOutput;
use crate::machine::{Machine, Source};
use crate::memory::GuestRam;
use crate::vcpu::{VcpuEvent, VcpuEventKind};

const MIB: u64 = 1 << 20;
const TEST_RAM_SIZE: u64 = 64 * MIB;
const TEST_TICK_HZ: u32 = 50;
/// How long to wait for expected guest output. Generous: nested KVM is slow.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(60);

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
// Test harness: the VMM's own machine.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Output {
    /// Bytes the guest wrote to the serial port.
    serial: Vec<u8>,
    /// Byte written to the debug exit port, if any.
    exit_code: Option<u8>,
    /// A vCPU that stopped on an error or an unexpected event.
    error: Option<String>,
}

impl Output {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }
}

/// A running guest on the VMM's [`Machine`] (its VM, devices, CPUID and vCPU threads), with the
/// serial console captured through a pipe. Dropping it stops the vCPU threads.
struct TestVm {
    machine: Machine,
    events: Receiver<VcpuEvent>,
    guest: GuestBoot,
    vcpus: u32,
    serial_in: PipeReader,
    out: Output,
    /// Held while the VM exists: the KVM tests run one at a time.
    _serialized: MutexGuard<'static, ()>,
}

fn guest_boot(guest: BuiltinGuest, p: &GuestParams) -> GuestBoot {
    GuestBoot::Builtin(GuestSpec {
        guest,
        tick_hz: p.tick_hz,
        exit_after_ticks: p.exit_after_ticks,
        exit_code: p.exit_code,
    })
}

/// A console whose output can be read back from the returned pipe.
fn captured_console() -> (ConsoleOutput, PipeReader) {
    let (reader, writer) = std::io::pipe().unwrap();
    let console = ConsoleOutput::to_file(std::fs::File::from(OwnedFd::from(writer)));
    (console, reader)
}

impl TestVm {
    /// Boots `guest` on a fresh machine; `None` if KVM is not available.
    fn start(guest: BuiltinGuest, p: &GuestParams) -> Option<TestVm> {
        Self::start_with(guest, p, |_| {})
    }

    /// Like [`start`](Self::start), with `patch` applied to RAM after loading.
    fn start_with(
        guest: BuiltinGuest,
        p: &GuestParams,
        patch: impl FnOnce(&GuestMemoryMmap),
    ) -> Option<TestVm> {
        let serialized = KVM_TESTS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = Kvm::new() {
            eprintln!("skipping KVM test: cannot open /dev/kvm: {e}");
            return None;
        }
        crate::vcpu::install_kick_handler().unwrap();
        let ram = GuestRam::create(p.ram_end, false, false).unwrap();
        let guest = guest_boot(guest, p);
        let (console, serial_in) = captured_console();
        let (machine, events) = Machine::build(
            ram,
            p.vcpu_count,
            crate::machine::Hardware {
                guest: guest.clone(),
                disks: Vec::new(),
                nics: Vec::new(),
            },
            console,
            Source::Boot,
            None,
        )
        .unwrap();
        // The vCPUs start paused: the guest is loaded but has not run.
        patch(machine.ram().memory());
        let mut vm = TestVm {
            machine,
            events,
            guest,
            vcpus: p.vcpu_count,
            serial_in,
            out: Output::default(),
            _serialized: serialized,
        };
        vm.machine.resume();
        Some(vm)
    }

    fn memory(&self) -> &GuestMemoryMmap {
        self.machine.ram().memory()
    }

    /// Waits up to `timeout` for serial output or a vCPU event, and takes in what arrived.
    fn pump(&mut self, timeout: Duration) {
        let wake = self.machine.wakers().vcpu_events.clone();
        // SAFETY: `wake` keeps the eventfd open for as long as this borrow is used (this call).
        let wake_fd = unsafe { BorrowedFd::borrow_raw(wake.as_raw_fd()) };
        let mut fds = [
            PollFd::new(self.serial_in.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake_fd, PollFlags::POLLIN),
        ];
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
        let serial_ready = fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP));
        if serial_ready {
            let mut buf = [0u8; 4096];
            let n = self.serial_in.read(&mut buf).unwrap();
            self.out.serial.extend_from_slice(&buf[..n]);
        }
        let _ = wake.read();
        while let Ok(event) = self.events.try_recv() {
            match event.kind {
                VcpuEventKind::Request(VmRequest::Exit(code)) => self.out.exit_code = Some(code),
                other => {
                    let msg = format!("vCPU {}: {other:?}", event.index);
                    self.out.error.get_or_insert(msg);
                }
            }
        }
    }

    /// Waits until `done` holds for the output; panics with the output so
    /// far on timeout, vCPU error or an unexpected guest exit.
    fn wait_for(&mut self, what: &str, done: impl Fn(&Output) -> bool) -> String {
        let deadline = Instant::now() + OUTPUT_TIMEOUT;
        loop {
            if done(&self.out) {
                return self.out.text();
            }
            if let Some(err) = &self.out.error {
                panic!(
                    "vCPU failed while waiting for {what}: {err}\nserial output:\n{}",
                    self.out.text()
                );
            }
            if let Some(code) = self.out.exit_code {
                panic!(
                    "guest exited with {code:#x} while waiting for {what}\nserial output:\n{}",
                    self.out.text()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {OUTPUT_TIMEOUT:?} waiting for {what}\nserial output:\n{}",
                    self.out.text()
                );
            }
            self.pump(deadline - now);
        }
    }

    fn wait_for_text(&mut self, needle: &str) -> String {
        self.wait_for(&format!("{needle:?}"), |out| out.text().contains(needle))
    }

    /// Pauses every vCPU (the machine's own pause) and returns the output collected so far:
    /// all of it, since the UART writes synchronously before a vCPU acknowledges the pause.
    fn stop(&mut self) -> Output {
        self.machine.pause().unwrap();
        self.pump(Duration::ZERO);
        loop {
            let before = self.out.serial.len();
            self.pump(Duration::ZERO);
            if self.out.serial.len() == before {
                break;
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Per-vCPU area of vCPU `index`: (tick counter, last tick printed).
    fn percpu(&self, index: u64) -> (u64, u64) {
        let base = PERCPU_AREA_ADDR + index * PERCPU_AREA_SIZE;
        (
            read_u64(self.memory(), base),
            read_u64(self.memory(), base + 8),
        )
    }

    /// Saves this machine as a live update would (every vCPU paused and saved, with devices and
    /// the VM clock), copies RAM, and resumes it on a new machine. Returns the output of this
    /// machine and the new one.
    fn save_and_restore(mut self) -> (Output, TestVm) {
        let state = self.machine.pause_and_save().unwrap();
        let out = self.stop();
        let ram_size = self.machine.ram().total_size();
        let ram = GuestRam::create(ram_size, false, false).unwrap();
        let mut bytes = vec![0u8; ram_size as usize];
        self.memory()
            .read_slice(&mut bytes, GuestAddress(0))
            .unwrap();
        ram.memory().write_slice(&bytes, GuestAddress(0)).unwrap();
        let TestVm {
            machine,
            guest,
            vcpus,
            _serialized,
            ..
        } = self;
        drop(machine);
        let (console, serial_in) = captured_console();
        let (machine, events) = Machine::build(
            ram,
            vcpus,
            crate::machine::Hardware {
                guest: guest.clone(),
                disks: Vec::new(),
                nics: Vec::new(),
            },
            console,
            Source::Restore {
                state: &state,
                host_fds: Default::default(),
            },
            None,
        )
        .unwrap();
        let mut vm = TestVm {
            machine,
            events,
            guest,
            vcpus,
            serial_in,
            out: Output::default(),
            _serialized,
        };
        vm.machine.resume();
        (out, vm)
    }
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
        .map(|addr| vm.memory().read_obj::<u8>(GuestAddress(addr)).unwrap())
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
        vm.memory()
            .read_obj::<u8>(GuestAddress(MEMCHECK_START + 1))
            .unwrap(),
        0
    );
    assert_eq!(
        vm.memory().read_obj::<u8>(GuestAddress(end - 1)).unwrap(),
        0
    );
    // The sweep stops at MEMCHECK_LIMIT even if there is more RAM.
    assert_ne!(
        vm.memory()
            .read_obj::<u8>(GuestAddress(MEMCHECK_LIMIT - 0x1000))
            .unwrap(),
        0
    );
    assert_eq!(
        vm.memory()
            .read_obj::<u8>(GuestAddress(MEMCHECK_LIMIT))
            .unwrap(),
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
    let Some(mut vm) = TestVm::start(BuiltinGuest::Heartbeat, &params(2)) else {
        return;
    };
    vm.wait_for("tick 3 of both vCPUs", |out| {
        let text = out.text();
        text.contains(&tick_line(0, 3)) && text.contains(&tick_line(1, 3))
    });
    let (before, mut vm) = vm.save_and_restore();
    let saved = check_heartbeat_output(&before.text(), 2);
    let target: Vec<u64> = saved.iter().map(|t| t + 3).collect();
    vm.wait_for("3 more ticks of both vCPUs after the restore", |out| {
        let text = out.text();
        text.contains(&tick_line(0, target[0])) && text.contains(&tick_line(1, target[1]))
    });
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
