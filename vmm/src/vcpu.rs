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
use crate::migration::state::{self, VcpuState};

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
    Failed(String),
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
    PauseAndSave(Sender<Result<VcpuState, String>>),
    /// End the thread.
    Exit,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
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
                // SAFETY: gettid has no preconditions.
                tid_for_thread.store(unsafe { libc::gettid() }, Ordering::Release);
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
        use std::os::unix::thread::JoinHandleExt;
        if let Some(t) = &self.thread {
            // The signal's handler only sets a flag.
            // SAFETY: the pthread is alive until joined, which happens only in Drop.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
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

enum Flow {
    Continue,
    Stop(VcpuEventKind),
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
                    state::save_vcpu(&self.vcpu, self.index, &self.msr_indices, self.xsave_words)
                        .map_err(|e| e.to_string());
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
        let index = self.index;
        match self.vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.bus.pio_read(port, data);
                    Flow::Continue
                }
                VcpuExit::IoOut(port, data) => match self.bus.pio_write(port, data) {
                    Some(request) => Flow::Stop(VcpuEventKind::Request(request)),
                    None => Flow::Continue,
                },
                VcpuExit::MmioRead(addr, data) => {
                    self.bus.mmio_read(addr, data);
                    Flow::Continue
                }
                VcpuExit::MmioWrite(addr, data) => match self.bus.mmio_write(addr, data) {
                    Some(request) => Flow::Stop(VcpuEventKind::Request(request)),
                    None => Flow::Continue,
                },
                VcpuExit::Shutdown => Flow::Stop(VcpuEventKind::Shutdown),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Flow::Stop(VcpuEventKind::Reset),
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Flow::Stop(VcpuEventKind::Shutdown),
                    other => Flow::Stop(VcpuEventKind::Failed(format!(
                        "vCPU {index}: guest system event {other}"
                    ))),
                },
                VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Flow::Continue,
                VcpuExit::FailEntry(reason, cpu) => Flow::Stop(VcpuEventKind::Failed(format!(
                    "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
                ))),
                VcpuExit::InternalError => Flow::Stop(VcpuEventKind::Failed(format!(
                    "vCPU {index}: KVM internal error (suberror {})",
                    // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member.
                    unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror }
                ))),
                other => Flow::Stop(VcpuEventKind::Failed(format!(
                    "vCPU {index}: unexpected KVM exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.vcpu.set_kvm_immediate_exit(0);
                Flow::Continue
            }
            Err(e) => Flow::Stop(VcpuEventKind::Failed(format!("vCPU {index}: KVM_RUN: {e}"))),
        }
    }
}
