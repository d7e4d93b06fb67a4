//! vCPU threads: one per vCPU, each a small state machine (running / paused / gone) driven by
//! commands from the VMM thread. `stop`/`cont`, `system_reset` and every migration mode's pause
//! are the same mechanism.
//!
//! A command is delivered by sending it on the vCPU's channel and then kicking the thread with a
//! signal whose handler sets `immediate_exit` in the thread's `kvm_run`: if the thread is inside
//! KVM_RUN it returns with EINTR; if it is about to enter, KVM_RUN returns at once. Either way the
//! thread then drains its channel, so no command is missed.
//!
//! Pausing always ends with one more KVM_RUN with `immediate_exit` set: it completes a pending
//! port or MMIO read (RIP is only final after that), so the saved registers are exact.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{Bus, VmRequest};
use crate::migration::state::{self, StateError, VcpuState};

/// What a vCPU thread reports to the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEventKind {
    /// Triple fault or a shutdown request from the guest.
    Shutdown,
    /// The guest asked for a reset.
    Reset,
    /// A device asked something of the machine (e.g. the debug exit port).
    Request(VmRequest),
    /// KVM reported an error the vCPU cannot continue from.
    Failed(VcpuError),
}

/// Why a vCPU stopped on its own: KVM reported something it cannot continue from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: guest system event {event}")]
    SystemEvent { index: u32, event: u32 },
    #[error(
        "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
    )]
    FailEntry { index: u32, reason: u64, cpu: u32 },
    #[error("vCPU {index}: KVM internal error (suberror {suberror})")]
    InternalError { index: u32, suberror: u32 },
    #[error("vCPU {index}: unexpected KVM exit {exit}")]
    UnexpectedExit { index: u32, exit: String },
    #[error("vCPU {index}: KVM_RUN: {source}")]
    Run {
        index: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

#[derive(Clone, Debug)]
pub struct VcpuEvent {
    pub index: u32,
    pub kind: VcpuEventKind,
}

/// Delivers vCPU events to the VMM thread and wakes its poll loop.
#[derive(Clone)]
pub struct EventSink {
    tx: Sender<VcpuEvent>,
    wake: Arc<EventFd>,
}

impl EventSink {
    pub fn new(wake: Arc<EventFd>) -> (Self, Receiver<VcpuEvent>) {
        let (tx, rx) = channel();
        (EventSink { tx, wake }, rx)
    }

    fn send(&self, event: VcpuEvent) {
        let _ = self.tx.send(event);
        let _ = self.wake.write(1);
    }
}

pub enum VcpuCommand {
    /// Stop running guest code; completes pending I/O first. Acknowledged when done.
    Pause(Sender<()>),
    Resume,
    /// Pause (if running) and save this vCPU's state: one round trip, because on a live
    /// update's path every wake-up of a vCPU thread is blackout.
    PauseAndSave(Sender<Result<VcpuState, StateError>>),
    /// End the thread.
    Exit,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // The pointer is set before the first KVM_RUN and cleared before the VcpuFd is dropped;
        // a byte store is async-signal-safe.
        // SAFETY: so it is this thread's own live kvm_run mapping.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
                .map_err(|e| e.errno())
        })
        .map_err(vmm_sys_util::errno::Error::new)
}

/// The VMM thread's side of one vCPU.
pub struct VcpuHandle {
    pub index: u32,
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<()>>,
    /// Linux thread id (for query-cpus-fast), published by the thread once it runs.
    tid: Arc<AtomicI32>,
}

impl VcpuHandle {
    /// Starts the thread for `vcpu`, paused or running.
    pub fn spawn(
        index: u32,
        vcpu: VcpuFd,
        bus: Arc<Bus>,
        events: EventSink,
        msr_indices: Arc<Vec<u32>>,
        xsave_words: usize,
        start_running: bool,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        let tid = Arc::new(AtomicI32::new(0));
        let tid_for_thread = tid.clone();
        // Not waiting for the thread to start: on a live update's path every thread start
        // would otherwise add a scheduling round trip to the blackout.
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                tid_for_thread.store(nix::unistd::gettid().as_raw(), Ordering::Release);
                let mut worker = VcpuWorker {
                    index,
                    vcpu,
                    bus,
                    events,
                    commands: rx,
                    msr_indices,
                    xsave_words,
                };
                worker.run(start_running);
            })?;
        Ok(VcpuHandle {
            index,
            commands: tx,
            thread: Some(thread),
            tid,
        })
    }

    /// The vCPU thread's Linux thread id (waits briefly if the thread has not started yet).
    pub fn tid(&self) -> i32 {
        for _ in 0..1000 {
            let tid = self.tid.load(Ordering::Acquire);
            if tid != 0 {
                return tid;
            }
            std::thread::yield_now();
        }
        0
    }

    pub fn send(&self, command: VcpuCommand) {
        // A send fails only if the thread is gone, which the caller sees as a missing reply.
        let _ = self.commands.send(command);
        self.kick();
    }

    fn kick(&self) {
        use vmm_sys_util::signal::Killable;
        // The thread is alive until joined (only in Drop); the handler only sets a flag. A
        // failure means the thread has ended, which the caller sees as a missing reply.
        if let Some(t) = &self.thread {
            let _ = t.kill(kick_signal());
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.send(VcpuCommand::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct VcpuWorker {
    index: u32,
    vcpu: VcpuFd,
    bus: Arc<Bus>,
    events: EventSink,
    commands: Receiver<VcpuCommand>,
    msr_indices: Arc<Vec<u32>>,
    xsave_words: usize,
}

/// What the vCPU thread does after an exit from KVM_RUN.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    /// Enter the guest again.
    Continue,
    /// KVM_RUN was interrupted by a kick (or `immediate_exit`): clear `immediate_exit`, look at
    /// the commands, then carry on.
    Kicked,
    /// Stop running and report this to the VMM thread.
    Stop(VcpuEventKind),
}

/// Decides what one return from KVM_RUN means for vCPU `index`, routing port I/O and MMIO to
/// `bus`. `internal_suberror` is asked for only on a KVM internal error (it lives in `kvm_run`).
/// Pure apart from the devices on the bus, so every exit kind is unit-tested without KVM.
fn handle_exit(
    index: u32,
    exit: Result<VcpuExit<'_>, kvm_ioctls::Error>,
    bus: &Bus,
    internal_suberror: impl FnOnce() -> u32,
) -> Flow {
    let failed = |error| Flow::Stop(VcpuEventKind::Failed(error));
    let request = |request: Option<VmRequest>| match request {
        Some(request) => Flow::Stop(VcpuEventKind::Request(request)),
        None => Flow::Continue,
    };
    let exit = match exit {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Flow::Kicked,
        Err(source) => return failed(VcpuError::Run { index, source }),
    };
    match exit {
        VcpuExit::IoIn(port, data) => {
            bus.pio_read(port, data);
            Flow::Continue
        }
        VcpuExit::IoOut(port, data) => request(bus.pio_write(port, data)),
        VcpuExit::MmioRead(addr, data) => {
            bus.mmio_read(addr, data);
            Flow::Continue
        }
        VcpuExit::MmioWrite(addr, data) => request(bus.mmio_write(addr, data)),
        VcpuExit::Shutdown => Flow::Stop(VcpuEventKind::Shutdown),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Flow::Stop(VcpuEventKind::Reset),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Flow::Stop(VcpuEventKind::Shutdown),
            event => failed(VcpuError::SystemEvent { index, event }),
        },
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Flow::Continue,
        VcpuExit::FailEntry(reason, cpu) => failed(VcpuError::FailEntry { index, reason, cpu }),
        VcpuExit::InternalError => failed(VcpuError::InternalError {
            index,
            suberror: internal_suberror(),
        }),
        other => failed(VcpuError::UnexpectedExit {
            index,
            exit: format!("{other:?}"),
        }),
    }
}

impl VcpuWorker {
    fn run(&mut self, start_running: bool) {
        // From here on a kick interrupts KVM_RUN. Commands sent before this point (and their
        // kicks, which found no kvm_run to flag) are still in the channel, and the channel is
        // always drained before entering KVM_RUN, so none is missed.
        let run_ptr: *mut kvm_run = self.vcpu.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        let mut running = start_running;
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd, &mut running) {
                            return self.finish();
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return self.finish(),
                }
            }
            if running {
                if let Flow::Stop(kind) = self.run_once() {
                    self.events.send(VcpuEvent {
                        index: self.index,
                        kind,
                    });
                    running = false;
                }
            } else {
                match self.commands.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd, &mut running) {
                            return self.finish();
                        }
                    }
                    Err(_) => return self.finish(),
                }
            }
        }
    }

    fn finish(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    /// Handles one command; false means the thread should end.
    fn handle(&mut self, cmd: VcpuCommand, running: &mut bool) -> bool {
        match cmd {
            VcpuCommand::Pause(ack) => {
                self.complete_pending_io();
                *running = false;
                let _ = ack.send(());
            }
            VcpuCommand::Resume => {
                self.vcpu.set_kvm_immediate_exit(0);
                *running = true;
            }
            VcpuCommand::PauseAndSave(reply) => {
                self.complete_pending_io();
                *running = false;
                let r =
                    state::save_vcpu(&self.vcpu, self.index, &self.msr_indices, self.xsave_words);
                let _ = reply.send(r);
            }
            VcpuCommand::Exit => return false,
        }
        true
    }

    /// One KVM_RUN with immediate_exit set: finishes an I/O exit the guest is still inside.
    fn complete_pending_io(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => log::warn!("vCPU {}: completing pending I/O: {e}", self.index),
            Ok(exit) => log::debug!(
                "vCPU {}: unexpected exit while completing I/O: {exit:?}",
                self.index
            ),
        }
        self.vcpu.set_kvm_immediate_exit(0);
    }

    fn run_once(&mut self) -> Flow {
        let run: *const kvm_run = self.vcpu.get_kvm_run();
        let exit = self.vcpu.run();
        let flow = handle_exit(self.index, exit, &self.bus, || {
            // Called only for KVM_EXIT_INTERNAL_ERROR, for which the kernel fills `internal`;
            // the exit holds no reference into the mapping.
            // SAFETY: `run` is this vCPU's kvm_run mapping, alive as long as `self.vcpu`.
            unsafe { (*run).__bindgen_anon_1.internal.suberror }
        });
        if flow == Flow::Kicked {
            self.vcpu.set_kvm_immediate_exit(0);
            return Flow::Continue;
        }
        flow
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::{MmioDevice, PioDevice};

    const PORT: u16 = 0x3f8;
    const MMIO: u64 = 0xd000_0000;
    /// Writing this byte makes the test device ask for a reset.
    const RESET_BYTE: u8 = 0xfe;

    /// Records what reaches it and answers reads with `offset + 0x40`.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
        reads: Vec<u64>,
    }

    impl Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push(offset);
            data.fill(offset as u8 + 0x40);
        }

        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
            self.writes.push((offset, data.to_vec()));
            (data == [RESET_BYTE]).then_some(VmRequest::Reset)
        }
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            Recorder::read(self, u64::from(offset), data)
        }
        fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmRequest> {
            Recorder::write(self, u64::from(offset), data)
        }
    }

    impl MmioDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            Recorder::read(self, offset, data)
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
            Recorder::write(self, offset, data)
        }
    }

    struct Fixture {
        bus: Bus,
        pio: Arc<Mutex<Recorder>>,
        mmio: Arc<Mutex<Recorder>>,
    }

    fn fixture() -> Fixture {
        let pio = Arc::new(Mutex::new(Recorder::default()));
        let mmio = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert_pio(PORT, 8, pio.clone()).unwrap();
        bus.insert_mmio(MMIO, 0x1000, mmio.clone()).unwrap();
        Fixture { bus, pio, mmio }
    }

    /// Handles `exit` for vCPU 3; the internal-error suberror, if asked for, is 7.
    fn handle(f: &Fixture, exit: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Flow {
        handle_exit(3, exit, &f.bus, || 7)
    }

    fn failed(error: VcpuError) -> Flow {
        Flow::Stop(VcpuEventKind::Failed(error))
    }

    #[test]
    fn port_reads_go_to_the_device_on_the_bus() {
        let f = fixture();
        let mut data = [0u8; 2];
        assert_eq!(
            handle(&f, Ok(VcpuExit::IoIn(PORT + 5, &mut data))),
            Flow::Continue
        );
        assert_eq!(data, [0x45, 0x45]);
        assert_eq!(f.pio.lock().unwrap().reads, [5]);
        assert!(f.mmio.lock().unwrap().reads.is_empty());
    }

    #[test]
    fn port_writes_go_to_the_device_and_a_request_stops_the_vcpu() {
        let f = fixture();
        assert_eq!(
            handle(&f, Ok(VcpuExit::IoOut(PORT + 1, &[0x41]))),
            Flow::Continue
        );
        assert_eq!(
            handle(&f, Ok(VcpuExit::IoOut(PORT + 2, &[RESET_BYTE]))),
            Flow::Stop(VcpuEventKind::Request(VmRequest::Reset))
        );
        assert_eq!(
            f.pio.lock().unwrap().writes,
            [(1, vec![0x41]), (2, vec![RESET_BYTE])]
        );
    }

    #[test]
    fn mmio_reads_go_to_the_device_on_the_bus() {
        let f = fixture();
        let mut data = [0u8; 4];
        assert_eq!(
            handle(&f, Ok(VcpuExit::MmioRead(MMIO + 0x10, &mut data))),
            Flow::Continue
        );
        assert_eq!(data, [0x50; 4]);
        assert_eq!(f.mmio.lock().unwrap().reads, [0x10]);
        assert!(f.pio.lock().unwrap().reads.is_empty());
    }

    #[test]
    fn mmio_writes_go_to_the_device_and_a_request_stops_the_vcpu() {
        let f = fixture();
        assert_eq!(
            handle(&f, Ok(VcpuExit::MmioWrite(MMIO + 4, &[1, 2, 3, 4]))),
            Flow::Continue
        );
        assert_eq!(
            handle(&f, Ok(VcpuExit::MmioWrite(MMIO + 8, &[RESET_BYTE]))),
            Flow::Stop(VcpuEventKind::Request(VmRequest::Reset))
        );
        assert_eq!(
            f.mmio.lock().unwrap().writes,
            [(4, vec![1, 2, 3, 4]), (8, vec![RESET_BYTE])]
        );
    }

    #[test]
    fn accesses_nothing_claims_read_all_ones_and_carry_on() {
        let f = fixture();
        let mut data = [0u8; 2];
        assert_eq!(
            handle(&f, Ok(VcpuExit::IoIn(0x80, &mut data))),
            Flow::Continue
        );
        assert_eq!(data, [0xff; 2]);
        assert_eq!(
            handle(&f, Ok(VcpuExit::MmioWrite(0x1000, &[RESET_BYTE]))),
            Flow::Continue
        );
        assert!(f.pio.lock().unwrap().writes.is_empty());
        assert!(f.mmio.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn shutdown_stops_the_vcpu() {
        let f = fixture();
        assert_eq!(
            handle(&f, Ok(VcpuExit::Shutdown)),
            Flow::Stop(VcpuEventKind::Shutdown)
        );
    }

    #[test]
    fn system_events_reset_shut_down_or_fail() {
        let f = fixture();
        let data = [0u64; 1];
        let event = |kind| VcpuExit::SystemEvent(kind, &data);
        assert_eq!(
            handle(&f, Ok(event(kvm_bindings::KVM_SYSTEM_EVENT_RESET))),
            Flow::Stop(VcpuEventKind::Reset)
        );
        assert_eq!(
            handle(&f, Ok(event(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN))),
            Flow::Stop(VcpuEventKind::Shutdown)
        );
        let crash = kvm_bindings::KVM_SYSTEM_EVENT_CRASH;
        assert_eq!(
            handle(&f, Ok(event(crash))),
            failed(VcpuError::SystemEvent {
                index: 3,
                event: crash
            })
        );
    }

    #[test]
    fn hlt_intr_and_irq_window_carry_on() {
        let f = fixture();
        for exit in [VcpuExit::Hlt, VcpuExit::Intr, VcpuExit::IrqWindowOpen] {
            assert_eq!(handle(&f, Ok(exit)), Flow::Continue);
        }
    }

    #[test]
    fn a_kick_is_not_an_error() {
        let f = fixture();
        for errno in [libc::EINTR, libc::EAGAIN] {
            let e = kvm_ioctls::Error::new(errno);
            assert_eq!(handle(&f, Err(e)), Flow::Kicked);
        }
    }

    #[test]
    fn kvm_run_failing_stops_the_vcpu() {
        let f = fixture();
        let source = kvm_ioctls::Error::new(libc::EFAULT);
        let flow = handle(&f, Err(source));
        assert_eq!(flow, failed(VcpuError::Run { index: 3, source }));
        let Flow::Stop(VcpuEventKind::Failed(e)) = flow else {
            unreachable!()
        };
        assert!(e.to_string().starts_with("vCPU 3: KVM_RUN: "), "{e}");
    }

    #[test]
    fn failed_entry_says_why_and_where() {
        let f = fixture();
        let flow = handle(&f, Ok(VcpuExit::FailEntry(0x21, 1)));
        let error = VcpuError::FailEntry {
            index: 3,
            reason: 0x21,
            cpu: 1,
        };
        assert_eq!(
            error.to_string(),
            "vCPU 3: KVM could not enter the guest (hardware reason 0x21, host CPU 1)"
        );
        assert_eq!(flow, failed(error));
    }

    #[test]
    fn internal_error_carries_the_suberror() {
        let f = fixture();
        let flow = handle(&f, Ok(VcpuExit::InternalError));
        let error = VcpuError::InternalError {
            index: 3,
            suberror: 7,
        };
        assert_eq!(error.to_string(), "vCPU 3: KVM internal error (suberror 7)");
        assert_eq!(flow, failed(error));
    }

    #[test]
    fn unknown_exits_stop_the_vcpu_and_name_the_exit() {
        let f = fixture();
        for (exit, name) in [
            (VcpuExit::Unknown, "Unknown"),
            (VcpuExit::Exception, "Exception"),
            (VcpuExit::IoapicEoi(0x30), "IoapicEoi(48)"),
        ] {
            let error = VcpuError::UnexpectedExit {
                index: 3,
                exit: name.to_string(),
            };
            assert_eq!(
                error.to_string(),
                format!("vCPU 3: unexpected KVM exit {name}")
            );
            assert_eq!(handle(&f, Ok(exit)), failed(error));
        }
    }

    #[test]
    fn the_suberror_is_read_only_for_internal_errors() {
        let f = fixture();
        let flow = handle_exit(0, Ok(VcpuExit::Shutdown), &f.bus, || {
            panic!("suberror read for a shutdown")
        });
        assert_eq!(flow, Flow::Stop(VcpuEventKind::Shutdown));
    }
}
