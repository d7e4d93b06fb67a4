//! The VMM thread: start-up, then one poll loop that serves the QMP monitor, the serial console,
//! signals and vCPU events, and carries out every run-state change (stop, cont, reset, migrate,
//! quit). Everything that changes the machine happens on this thread, so the machine needs no
//! locking beyond its devices.
//!
//! What `migrate` does in each mode is in [`crate::migration`], one module per mode; this loop
//! only dispatches to it.

pub(crate) mod run_state;

use crate::migration::cpr_exec::PendingExec;
use crate::migration::cpr_transfer::{TransferIn, TransferOut};
use crate::migration::file::OutgoingSave;

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use cpr_common::cpr::FdKind;

use serde_json::Value;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::cli::{Config, IncomingSpec, PidFile, PidFileError};
use crate::devices::VmRequest;
use crate::devices::console::{Console, ConsoleError, ConsoleFd};
use crate::machine::{Machine, MachineError, PreparedMachine, ResetError, Source};
use crate::memory::{self, GuestRam, MemoryError};
use crate::migration::cpr_exec::{CprExecError, Incoming};
use crate::migration::cpr_transfer::IncomingTransfer;
use crate::migration::file::IncomingRamError;
use crate::migration::format::StateFileError;
use crate::migration::state::{GuestKind, MachineDescription};
use crate::migration::{MigMode, MigrationRecord};
use crate::qmp::protocol::hmp::{self, HmpAction};
use crate::qmp::protocol::{
    Command, CprCommandLine, CpuInfoFast, CpuInstanceProperties, EventKind, HumanReadableText,
    KvmInfo, MigrationParameters, NameInfo, PmemsaveArgs, QmpError, Response, RunState,
    ShutdownCause, StatusInfo, TARGET_X86_64, VersionInfo, migrate_capabilities, query_commands,
    query_events, query_qmp_schema, registers,
};
use crate::qmp::server::{ClientId, Monitor};
use crate::vcpu::{VcpuEvent, VcpuEventKind};

/// The QEMU release whose QMP this monitor speaks (cpr-exec arrived in 10.2).
const QEMU_COMPAT_VERSION: (i64, i64, i64) = (10, 2, 0);
/// How long replies and events may take to reach slow clients before exit or exec.
pub(crate) const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Console input kept while the guest's receive FIFO is full.
const MAX_PENDING_INPUT: usize = 64 << 10;

pub(crate) const T_SIGNAL: u64 = 1;
pub(crate) const T_VCPU_EVENTS: u64 = 2;
pub(crate) const T_INPUT_DRAINED: u64 = 3;
pub(crate) const T_QMP_LISTENER: u64 = 4;
pub(crate) const T_CONSOLE_LISTENER: u64 = 5;
pub(crate) const T_CONSOLE_INPUT: u64 = 6;
pub(crate) const T_MIGRATION_DONE: u64 = 7;
pub(crate) const T_CHILD: u64 = 8;
pub(crate) const T_TRANSFER_LISTEN: u64 = 9;
pub(crate) const T_TRANSFER: u64 = 10;
/// Client tokens are this plus the client id.
pub(crate) const T_QMP_CLIENT: u64 = 1 << 32;
/// Clients are edge-triggered: read until EAGAIN, write until EAGAIN.
pub(crate) const QMP_CLIENT_EVENTS: EventSet = EventSet::IN
    .union(EventSet::OUT)
    .union(EventSet::EDGE_TRIGGERED)
    .union(EventSet::READ_HANG_UP);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("QMP socket {path}: {source}")]
    Qmp {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("guest RAM: {0}")]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("incoming migration failed: {0}")]
    Incoming(#[from] IncomingError),
    #[error("setting up the VMM's event loop: {0}")]
    Setup(std::io::Error),
    #[error(transparent)]
    Cpr(#[from] CprExecError),
    #[error(transparent)]
    Transfer(#[from] crate::migration::cpr_transfer::CprTransferError),
    #[error("live update failed and the guest could not be recovered: {0}")]
    RollbackFailed(String),
    #[error("the new VMM failed before resuming the guest (--cpr-test-fault exit-before-resume)")]
    TestFault,
    #[error(transparent)]
    PidFile(#[from] PidFileError),
}

/// Why restoring a saved machine failed; nothing of it ever ran.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error(transparent)]
    File(#[from] StateFileError),
    #[error(transparent)]
    Ram(#[from] IncomingRamError),
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// Starts the VMM described by `config` and runs it until it ends; returns the exit status.
/// `incoming` is a live update in progress (this process was exec'd by the previous VMM).
pub fn run(
    config: Config,
    incoming: Option<Incoming>,
    transfer: Option<IncomingTransfer>,
) -> Result<u8, StartError> {
    crate::vcpu::install_kick_handler()
        .map_err(|e| StartError::Setup(std::io::Error::from_raw_os_error(e.errno())))?;
    // A client that disconnects mid-reply must not kill the VMM.
    // SAFETY: setting SIGPIPE to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    crate::logger::set_timestamps(config.log_timestamps);
    let Some(mut incoming) = incoming else {
        let mut vmm = Vmm::new(config, None)?;
        if let Err(e) = vmm.start(transfer) {
            vmm.remove_socket_files();
            return Err(e);
        }
        let _pidfile = match vmm.config.pidfile.as_deref().map(PidFile::create) {
            Some(Err(e)) => {
                vmm.remove_socket_files();
                return Err(e.into());
            }
            other => other.and_then(Result::ok),
        };
        log::info!("{}", vmm.config.summary());
        return Ok(vmm.event_loop());
    };
    // A live update: any failure before the guest runs again rolls back to the previous VMM.
    // The new VMM works on duplicates of the inherited fds, so whatever it built and dropped,
    // the originals are intact for the rollback.
    let started = crate::migration::cpr_exec::check_command_line(&incoming.state, &config)
        .map_err(StartError::from)
        .and_then(|()| Vmm::new(config, Some(&mut incoming)))
        .and_then(|mut vmm| {
            vmm.start_cpr_incoming(&mut incoming)?;
            Ok(vmm)
        });
    match started {
        Ok(mut vmm) => {
            drop(incoming);
            // Same PID as before the update: rewrite it in case the new command line names
            // another file.
            let pidfile = vmm.config.pidfile.as_deref().map(PidFile::create);
            let _pidfile = match pidfile {
                Some(Err(e)) => {
                    log::warn!("{e}");
                    None
                }
                other => other.and_then(Result::ok),
            };
            // What the handed-over clients sent while the update ran is read now, once, so
            // that only those commands are treated as sent during the update.
            let inherited: Vec<ClientId> = vmm
                .monitor
                .as_ref()
                .map(|m| m.client_fds().into_iter().map(|(c, _)| c).collect())
                .unwrap_or_default();
            for id in inherited {
                vmm.answer_client(id);
            }
            Ok(vmm.event_loop())
        }
        Err(e) => Err(StartError::RollbackFailed(
            incoming.roll_back(&e.to_string()),
        )),
    }
}

pub(crate) struct Vmm {
    pub(crate) config: Config,
    pub(crate) epoll: Epoll,
    /// SIGTERM, SIGINT, SIGHUP (kept blocked; see `exec::block_termination_signals`).
    pub(crate) signals: SignalFd,
    /// SIGCHLD: children this process did not start itself (a previous version's teardown
    /// helper) are reaped as they exit.
    pub(crate) children: UnixStream,
    pub(crate) monitor: Option<Monitor>,
    pub(crate) console: Console,
    pub(crate) registered_console_input: Option<RawFd>,
    pub(crate) machine: Option<Machine>,
    pub(crate) vcpu_events: Option<Receiver<VcpuEvent>>,
    pub(crate) run_state: RunState,
    /// Whether the guest should run once an incoming migration completes (`stop` while in
    /// `inmigrate` clears it, as in QEMU).
    pub(crate) autostart: bool,
    pub(crate) params: MigrationParameters,
    pub(crate) migration: MigrationRecord,
    pub(crate) outgoing: Option<OutgoingSave>,
    pub(crate) pending_exec: Option<PendingExec>,
    /// cpr-transfer, new side: the VM built over the received RAM, waiting for its state.
    pub(crate) prepared: Option<PreparedMachine>,
    pub(crate) transfer_in: Option<TransferIn>,
    /// cpr-transfer, old side: where the hand-over is.
    pub(crate) transfer_out: Option<TransferOut>,
    /// cpr-transfer, old side: the new VMM runs the guest on this RAM now; nothing here may
    /// run it or change it again.
    pub(crate) handed_over: bool,
    /// cpr-transfer, new side: what came over the cpr channel (its connection is closed to say
    /// the main channel is listening).
    pub(crate) incoming_transfer: Option<IncomingTransfer>,
    pub(crate) migration_done: Arc<EventFd>,
    pub(crate) pending_input: VecDeque<u8>,
    pub(crate) exit_code: Option<u8>,
}

impl Vmm {
    pub(crate) fn new(
        config: Config,
        mut incoming: Option<&mut Incoming>,
    ) -> Result<Self, StartError> {
        let epoll = Epoll::new().map_err(StartError::Setup)?;
        // SIGTERM, SIGINT and SIGHUP (as QEMU treats it): a clean shutdown. main() blocked them
        // before any thread existed; one that arrived during a live update is still pending
        // here and is read now, once this VMM runs the guest.
        let _ = cpr_common::exec::block_termination_signals();
        let signals = SignalFd::with_flags(
            &cpr_common::exec::termination_sigset(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(|e| StartError::Setup(e.into()))?;
        let (children, child_writer) = UnixStream::pair().map_err(StartError::Setup)?;
        children.set_nonblocking(true).map_err(StartError::Setup)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGCHLD, child_writer)
            .map_err(StartError::Setup)?;
        reap_children();
        let inherited_listener = incoming
            .as_deref_mut()
            .and_then(|i| i.take_fd(FdKind::QmpListener, crate::qmp::server::QMP_LISTENER_NAME));
        let monitor = match (&config.qmp, inherited_listener) {
            (Some(_), Some(listener)) => {
                let clients = incoming
                    .as_deref_mut()
                    .map(|i| {
                        i.take_all(|k| matches!(k, FdKind::QmpClient { .. }))
                            .into_iter()
                            .map(|(rec, fd)| {
                                (
                                    fd,
                                    matches!(rec.kind, FdKind::QmpClient { negotiated: true }),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(Monitor::from_inherited(listener, clients, qmp_version()))
            }
            (Some(spec), None) => {
                Some(Monitor::bind(&spec.path, qmp_version()).map_err(|source| {
                    StartError::Qmp {
                        path: spec.path.clone(),
                        source,
                    }
                })?)
            }
            (None, _) => None,
        };
        let console = Console::open(&config.serial, |kind, name| {
            incoming.as_deref_mut().and_then(|i| i.take_fd(kind, name))
        })?;
        let migration_done =
            Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(StartError::Setup)?);
        // -S: an incoming migration, too, leaves the guest paused.
        let autostart = !config.start_paused;
        let vmm = Vmm {
            config,
            epoll,
            signals,
            children,
            monitor,
            console,
            registered_console_input: None,
            machine: None,
            vcpu_events: None,
            run_state: RunState::Prelaunch,
            autostart,
            params: MigrationParameters::qemu_defaults(),
            migration: MigrationRecord::default(),
            outgoing: None,
            pending_exec: None,
            prepared: None,
            transfer_in: None,
            transfer_out: None,
            handed_over: false,
            incoming_transfer: None,
            migration_done,
            pending_input: VecDeque::new(),
            exit_code: None,
        };
        vmm.watch(vmm.signals.as_raw_fd(), T_SIGNAL, EventSet::IN)
            .map_err(StartError::Setup)?;
        vmm.watch(vmm.children.as_raw_fd(), T_CHILD, EventSet::IN)
            .map_err(StartError::Setup)?;
        vmm.watch(
            vmm.migration_done.as_raw_fd(),
            T_MIGRATION_DONE,
            EventSet::IN,
        )
        .map_err(StartError::Setup)?;
        if let Some(m) = &vmm.monitor {
            vmm.watch(m.listener_fd(), T_QMP_LISTENER, EventSet::IN)
                .map_err(StartError::Setup)?;
            for (id, fd) in m.client_fds() {
                vmm.watch(fd, T_QMP_CLIENT + id, QMP_CLIENT_EVENTS)
                    .map_err(StartError::Setup)?;
            }
        }
        Ok(vmm)
    }

    pub(crate) fn watch(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub(crate) fn unwatch(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    pub(crate) fn start(&mut self, transfer: Option<IncomingTransfer>) -> Result<(), StartError> {
        self.sync_console_fds();
        if let Some(t) = transfer {
            return self.start_transfer_incoming(t);
        }
        match self.config.incoming.clone() {
            None => {
                let ram = self.fresh_ram()?;
                let (machine, rx) = self.build_machine(ram, Source::Boot, None)?;
                self.install_machine(machine, rx)
                    .map_err(StartError::Setup)?;
                // -S: stay in prelaunch until cont.
                if self.autostart {
                    self.set_running();
                }
            }
            Some(IncomingSpec::File(path)) => {
                let _ = self.set_run_state(RunState::Inmigrate);
                self.incoming_from_file(&path)?;
            }
            Some(IncomingSpec::Defer) => {
                let _ = self.set_run_state(RunState::Inmigrate);
                log::info!("waiting for migrate-incoming");
            }
            Some(IncomingSpec::Unix(path)) => {
                return Err(StartError::Setup(std::io::Error::other(format!(
                    "-incoming unix:{} is a cpr-transfer main channel: also give the cpr channel (-incoming cpr,addr.transport=socket,addr.type=unix,addr.path=PATH)",
                    path.display()
                ))));
            }
        }
        Ok(())
    }

    /// Builds this command line's machine over `ram`, from `source`; vCPUs start paused.
    pub(crate) fn build_machine(
        &self,
        ram: GuestRam,
        source: Source<'_>,
        phases: Option<&mut cpr_common::timing::PhaseLog>,
    ) -> Result<(Machine, Receiver<VcpuEvent>), MachineError> {
        Machine::build(
            ram,
            self.config.vcpus,
            self.hardware(),
            self.console.output(),
            source,
            phases,
        )
    }

    /// The guest and devices this command line asks for.
    pub(crate) fn hardware(&self) -> crate::machine::Hardware {
        crate::machine::Hardware {
            guest: self.config.guest.clone(),
            disks: self.config.disks.clone(),
            nics: self.config.nics.clone(),
        }
    }

    /// The machine this command line describes (checked against a saved one).
    pub(crate) fn described_machine(&self) -> MachineDescription {
        MachineDescription {
            vcpus: self.config.vcpus,
            ram_size: self.config.ram_size,
            regions: memory::layout(self.config.ram_size),
            guest: GuestKind::of(&self.config.guest),
            devices: crate::machine::device_descriptions(&self.config.disks, &self.config.nics),
        }
    }

    pub(crate) fn install_machine(
        &mut self,
        machine: Machine,
        rx: Receiver<VcpuEvent>,
    ) -> std::io::Result<()> {
        self.watch(
            machine.wakers().vcpu_events.as_raw_fd(),
            T_VCPU_EVENTS,
            EventSet::IN,
        )?;
        self.watch(
            machine.wakers().input_drained.as_raw_fd(),
            T_INPUT_DRAINED,
            EventSet::IN,
        )?;
        self.machine = Some(machine);
        self.vcpu_events = Some(rx);
        self.push_console_input();
        Ok(())
    }

    pub(crate) fn set_running(&mut self) {
        if let Some(m) = &mut self.machine {
            m.resume();
        }
        let _ = self.set_run_state(RunState::Running);
        self.emit(&EventKind::Resume);
    }

    pub(crate) fn emit(&mut self, kind: &EventKind) {
        if let Some(m) = &mut self.monitor {
            m.broadcast(kind);
        }
    }

    pub(crate) fn event_loop(&mut self) -> u8 {
        let mut events = vec![EpollEvent::default(); 64];
        while self.exit_code.is_none() {
            let timeout_ms = self.transfer_timeout_ms();
            let n = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("event loop: epoll_wait failed: {e}");
                    return 1;
                }
            };
            if n == 0 {
                self.check_transfer_deadline();
            }
            for ev in &events[..n] {
                self.dispatch(ev.data(), ev.event_set());
                if self.exit_code.is_some() {
                    break;
                }
            }
        }
        if let Some(m) = &mut self.monitor {
            m.drain_output(OUTPUT_DRAIN_TIMEOUT);
        }
        self.remove_socket_files();
        self.exit_code.unwrap_or(0)
    }

    /// The sockets this VMM listens on go away with it.
    pub(crate) fn remove_socket_files(&self) {
        if let Some(spec) = &self.config.qmp {
            crate::unix_socket::remove_socket_file(&spec.path);
        }
        if let crate::cli::SerialSpec::UnixServer(path) = &self.config.serial {
            crate::unix_socket::remove_socket_file(path);
        }
    }

    pub(crate) fn dispatch(&mut self, token: u64, events: EventSet) {
        match token {
            T_SIGNAL => {
                let mut names = Vec::new();
                while let Ok(Some(info)) = self.signals.read_signal() {
                    names.push(
                        nix::sys::signal::Signal::try_from(info.ssi_signo as i32)
                            .map_or("a signal", |s| s.as_str()),
                    );
                }
                log::info!("terminated by {}", names.join(", "));
                self.shutdown(ShutdownCause::HostSignal, 0);
            }
            T_CHILD => {
                let mut buf = [0u8; 64];
                while matches!(self.children.read(&mut buf), Ok(n) if n > 0) {}
                reap_children();
            }
            T_VCPU_EVENTS => self.handle_vcpu_events(),
            T_TRANSFER_LISTEN => self.accept_transfer_main(),
            T_TRANSFER => self.poll_transfer(),
            T_INPUT_DRAINED => {
                if let Some(m) = &self.machine {
                    let _ = m.wakers().input_drained.read();
                }
                self.push_console_input();
            }
            T_QMP_LISTENER => self.accept_qmp_clients(),
            T_CONSOLE_LISTENER => {
                self.console.accept();
                self.sync_console_fds();
            }
            T_CONSOLE_INPUT => self.read_console_input(),
            T_MIGRATION_DONE => {
                let _ = self.migration_done.read();
                self.finish_outgoing_save();
            }
            t if t >= T_QMP_CLIENT => self.serve_qmp_client(t - T_QMP_CLIENT, events),
            _ => {}
        }
    }

    pub(crate) fn shutdown(&mut self, cause: ShutdownCause, code: u8) {
        self.emit(&EventKind::shutdown(cause));
        let _ = self.set_run_state(RunState::Shutdown);
        self.exit_code = Some(code);
    }

    pub(crate) fn handle_vcpu_events(&mut self) {
        if let Some(m) = &self.machine {
            let _ = m.wakers().vcpu_events.read();
        }
        let events: Vec<VcpuEvent> = match &self.vcpu_events {
            Some(rx) => rx.try_iter().collect(),
            None => return,
        };
        for ev in events {
            match ev.kind {
                VcpuEventKind::Shutdown => {
                    log::info!("guest shut down (vCPU {})", ev.index);
                    self.shutdown(ShutdownCause::GuestShutdown, 0);
                }
                VcpuEventKind::Request(VmRequest::Exit(code)) => {
                    log::info!("guest requested exit with status {code}");
                    self.shutdown(ShutdownCause::GuestShutdown, code);
                }
                VcpuEventKind::Reset | VcpuEventKind::Request(VmRequest::Reset) => {
                    if let Err(e) = self.reset_machine(ShutdownCause::GuestReset) {
                        log::error!("guest reset failed: {e}");
                    }
                }
                VcpuEventKind::Failed(msg) => {
                    log::error!("{msg}; the VM is stopped (internal-error)");
                    if let Some(m) = &mut self.machine {
                        let _ = m.pause();
                    }
                    if self.run_state() == RunState::Running {
                        self.emit(&EventKind::Stop);
                    }
                    let _ = self.set_run_state(RunState::InternalError);
                }
            }
            if self.exit_code.is_some() {
                return;
            }
        }
    }

    /// Resets the machine. If that fails and the guest could not be kept either, the VM stops
    /// in `internal-error` (a defined state, with a STOP event) rather than looking alive.
    pub(crate) fn reset_machine(&mut self, cause: ShutdownCause) -> Result<(), ResetError> {
        if let Some(m) = &mut self.machine
            && let Err(e) = m.reset()
        {
            if !e.guest_intact {
                log::error!("reset failed and left the guest unusable: {}", e.error);
                if self.run_state() == RunState::Running {
                    self.emit(&EventKind::Stop);
                }
                let _ = self.set_run_state(RunState::InternalError);
            }
            return Err(e);
        }
        self.emit(&EventKind::reset(cause));
        Ok(())
    }

    // ---- serial console ----

    pub(crate) fn sync_console_fds(&mut self) {
        let mut input = None;
        for fd in self.console.poll_fds() {
            match fd {
                ConsoleFd::Listener(l) => {
                    // Adding twice fails harmlessly with EEXIST.
                    let _ = self.watch(l, T_CONSOLE_LISTENER, EventSet::IN);
                }
                ConsoleFd::Input(i) => input = Some(i),
            }
        }
        if input != self.registered_console_input {
            if let Some(old) = self.registered_console_input.take() {
                self.unwatch(old);
            }
            if let Some(new) = input {
                // stdin may be something epoll cannot watch (a file, /dev/null): no input then.
                match self.watch(new, T_CONSOLE_INPUT, EventSet::IN) {
                    Ok(()) => self.registered_console_input = Some(new),
                    Err(e) => log::debug!("serial input fd {new} cannot be polled: {e}"),
                }
            }
        }
    }

    pub(crate) fn read_console_input(&mut self) {
        let mut buf = [0u8; 4096];
        match self.console.read_input(&mut buf) {
            Ok(0) => self.sync_console_fds(),
            Ok(n) => {
                let room = MAX_PENDING_INPUT.saturating_sub(self.pending_input.len());
                if n > room {
                    log::warn!(
                        "serial: the guest is not reading input; dropped {} bytes",
                        n - room
                    );
                }
                self.pending_input.extend(&buf[..n.min(room)]);
                self.push_console_input();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::info!("serial input closed: {e}");
                self.sync_console_fds();
            }
        }
    }

    pub(crate) fn push_console_input(&mut self) {
        let Some(m) = &self.machine else { return };
        while !self.pending_input.is_empty() {
            let (front, _) = self.pending_input.as_slices();
            let taken = m.console_input(front);
            if taken == 0 {
                break;
            }
            self.pending_input.drain(..taken);
        }
    }

    // ---- QMP ----

    pub(crate) fn accept_qmp_clients(&mut self) {
        let Some(m) = &mut self.monitor else { return };
        for (id, fd) in m.accept() {
            let events =
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
            if let Err(e) = self.watch(fd, T_QMP_CLIENT + id, events) {
                log::warn!("QMP: cannot watch client: {e}");
            }
        }
    }

    pub(crate) fn serve_qmp_client(&mut self, id: ClientId, events: EventSet) {
        let Some(m) = &mut self.monitor else { return };
        if events.contains(EventSet::OUT) {
            m.writable(id);
        }
        if !events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            return;
        }
        self.answer_client(id);
        if self.pending_exec.is_some() {
            // A live update execs once the reply to `migrate` is out. Every command already
            // sent, by this client or another, is answered first (a second `migrate` is
            // refused), so none is lost or carried into the new VMM to run there.
            let others: Vec<ClientId> = self
                .monitor
                .as_ref()
                .map(|m| m.client_fds().into_iter().map(|(c, _)| c).collect())
                .unwrap_or_default();
            for other in others {
                self.answer_client(other);
            }
            if self.exit_code.is_none()
                && let Some(pending) = self.pending_exec.take()
            {
                self.exec_update(pending);
            }
        }
    }

    /// Reads what client `id` has sent and answers each command, in order.
    fn answer_client(&mut self, id: ClientId) {
        let Some(m) = &mut self.monitor else { return };
        let during_update = m.first_read_after_update(id);
        let outcome = m.read(id);
        for request in outcome.requests {
            let quit = matches!(request.command, Command::Quit);
            // A `migrate` sent while a live update ran was meant for the previous VMM and its
            // parameters (which do not cross the update, as in QEMU): refuse it rather than
            // run it as something else here.
            let result = if during_update && matches!(request.command, Command::Migrate(_)) {
                Err(QmpError::generic(
                    "There's a migration process in progress (a live update was running when this migrate was sent; send it again)",
                ))
            } else {
                self.execute(request.command)
            };
            let response = Response::from_result(request.id, result);
            if let Some(m) = &mut self.monitor {
                m.reply(id, &response);
            }
            if quit {
                self.shutdown(ShutdownCause::HostQmpQuit, 0);
            }
            if self.exit_code.is_some() {
                return;
            }
        }
        // While a live update is pending its fd is already listed among those the exec hands
        // over: it stays open, and the new VMM sees the end of the connection.
        if outcome.closed
            && self.pending_exec.is_none()
            && let Some(m) = &mut self.monitor
        {
            m.remove(id);
        }
    }

    /// Executes one command. Results are JSON values (QMP clients do not depend on key order).
    pub(crate) fn execute(&mut self, command: Command) -> Result<Value, QmpError> {
        match command {
            Command::QmpCapabilities(_) => Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            )),
            Command::QueryStatus => to_value(&StatusInfo::from_state(self.run_state())),
            Command::Stop => {
                self.stop()?;
                Ok(empty())
            }
            Command::Cont => {
                self.cont()?;
                Ok(empty())
            }
            // The reply goes out first; the caller then shuts down.
            Command::Quit => Ok(empty()),
            Command::SystemReset => {
                self.refuse_if_handed_over()?;
                // A pending live update hands over the devices' fds as they are now.
                if self.pending_exec.is_some() || self.outgoing.is_some() {
                    return Err(QmpError::generic("There's a migration process in progress"));
                }
                if self.machine.is_none() {
                    return Err(QmpError::generic("There is no machine to reset yet"));
                }
                self.reset_machine(ShutdownCause::HostQmpSystemReset)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(empty())
            }
            Command::QueryCpusFast => to_value(&self.query_cpus()),
            Command::Pmemsave(args) => {
                self.pmemsave(&args)?;
                Ok(empty())
            }
            Command::HumanMonitor(args) => {
                if let Some(i) = args.cpu_index
                    && (i < 0 || i >= i64::from(self.config.vcpus))
                {
                    return Err(QmpError::invalid_cpu_index());
                }
                let text = match hmp::parse(&args.command_line, args.cpu_index) {
                    HmpAction::Reply(text) => text,
                    HmpAction::Run { command, render } => {
                        let quit = matches!(command, Command::Quit);
                        let result = self.execute(command);
                        if quit {
                            self.shutdown(ShutdownCause::HostQmpQuit, 0);
                        }
                        render.render(&result)
                    }
                };
                Ok(Value::String(text))
            }
            Command::QueryVersion => to_value(&qmp_version()),
            Command::QueryCommands => to_value(&query_commands()),
            Command::MigrateSetParameters(p) => {
                if let Some(mode) = p.mode
                    && !matches!(
                        mode,
                        MigMode::Normal
                            | MigMode::CprExec
                            | MigMode::CprTransfer
                            | MigMode::CprReboot
                    )
                {
                    return Err(QmpError::generic(format!(
                        "migration mode '{}' is not supported by this VMM; supported: normal, cpr-exec, cpr-transfer, cpr-reboot",
                        mode.as_str()
                    )));
                }
                self.params.check_effective(&p)?;
                if let Some(command) = &p.cpr_exec_command {
                    crate::migration::cpr_exec::check_command_syntax(command)
                        .map_err(|e| QmpError::generic(format!("cpr-exec-command: {e}")))?;
                }
                self.params.apply(&p);
                Ok(empty())
            }
            Command::QueryMigrateParameters => to_value(&self.params),
            Command::Migrate(args) => {
                self.migrate(&args)?;
                Ok(empty())
            }
            Command::QueryMigrate => to_value(&self.query_migrate()),
            Command::MigrateIncoming(args) => {
                self.migrate_incoming(&args)?;
                Ok(empty())
            }
            Command::MigrateCancel => {
                self.cancel_migration();
                Ok(empty())
            }
            Command::QueryBlock => to_value(&self.query_block()),
            Command::QueryName => to_value(&NameInfo {
                name: self.config.name.clone(),
            }),
            Command::QueryKvm => to_value(&KvmInfo {
                enabled: true,
                present: true,
            }),
            Command::QueryEvents => to_value(&query_events()),
            Command::QueryChardev => to_value(&self.config.chardevs()),
            Command::QueryMigrateCapabilities => to_value(&migrate_capabilities()),
            Command::SystemPowerdown => Err(QmpError::generic(
                "system_powerdown: this machine has no ACPI power button to press; stop the guest from inside it, or use 'quit' or 'system_reset'",
            )),
            Command::QueryQmpSchema => to_value(&query_qmp_schema()),
            Command::QueryRegisters(args) => self.registers(args.cpu_index),
            Command::QueryRxFilter(args) => to_value(&self.query_rx_filter(args.name.as_deref())?),
            Command::QueryNetwork => to_value(&HumanReadableText {
                human_readable_text: self.network_text(),
            }),
            Command::QueryCprCommandLine => to_value(&self.cpr_command_line()),
        }
    }

    /// `x-query-cpr-command-line`: the argv this VMM was started with, minus `-incoming ...`
    /// (the rollback's argv without its own `-incoming`), and the QMP socket path.
    fn cpr_command_line(&self) -> CprCommandLine {
        let mut argv =
            crate::migration::cpr_exec::fallback_argv(&self.config.argv, std::path::Path::new(""));
        argv.truncate(argv.len().saturating_sub(2));
        CprCommandLine {
            argv,
            qmp_socket: self
                .config
                .qmp
                .as_ref()
                .map(|q| q.path.display().to_string()),
        }
    }

    /// `query-rx-filter`: every NIC, or the one named (QEMU's errors for other names).
    fn query_rx_filter(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<crate::qmp::protocol::RxFilterInfo>, QmpError> {
        let nics = self.machine.as_ref().map(|m| m.nics()).unwrap_or_default();
        let out: Vec<_> = nics
            .iter()
            .filter(|(c, _, _)| name.is_none_or(|n| n == c.device_id))
            .map(|(c, _, _)| {
                crate::qmp::protocol::RxFilterInfo::open_filter(
                    &c.device_id,
                    &crate::devices::virtio::net::format_mac(&c.mac),
                )
            })
            .collect();
        if let Some(n) = name
            && out.is_empty()
        {
            return Err(QmpError::generic(format!("invalid net client name: {n}")));
        }
        Ok(out)
    }

    /// HMP `info network`, laid out as QEMU's, with each NIC's frame counters.
    fn network_text(&self) -> String {
        let nics = self.machine.as_ref().map(|m| m.nics()).unwrap_or_default();
        let mut text = String::new();
        for (index, (c, ifname, s)) in nics.iter().enumerate() {
            let source = match &c.source {
                crate::devices::virtio::net::TapSource::Ifname(_) => {
                    format!("ifname={ifname},script=no,downscript=no")
                }
                crate::devices::virtio::net::TapSource::Fd(fd) => {
                    format!("fd={fd},ifname={ifname}")
                }
            };
            text.push_str(&format!(
                "{}: index={index},type=nic,model=virtio-net-pci,macaddr={}\n \\ {}: index={index},type=tap,{source}\n    rx {} frames {} bytes {} dropped, tx {} frames {} bytes {} dropped\n",
                c.device_id,
                crate::devices::virtio::net::format_mac(&c.mac),
                c.netdev,
                s.rx_frames,
                s.rx_bytes,
                s.rx_dropped,
                s.tx_frames,
                s.tx_bytes,
                s.tx_dropped,
            ));
        }
        text
    }

    /// `x-query-registers` (HMP `info registers`): each vCPU's registers, read while the vCPUs
    /// are briefly paused.
    fn registers(&mut self, cpu: Option<i64>) -> Result<Value, QmpError> {
        if let Some(i) = cpu
            && (i < 0 || i >= i64::from(self.config.vcpus))
        {
            return Err(QmpError::invalid_cpu_index());
        }
        self.refuse_if_handed_over()?;
        let running = self.run_state() == RunState::Running;
        let Some(m) = &mut self.machine else {
            return Err(QmpError::generic("There are no vCPUs yet"));
        };
        let saved = m.pause_and_save();
        if running {
            m.resume();
        }
        let state = saved.map_err(|e| QmpError::generic(e.to_string()))?;
        let mut text = String::new();
        for v in &state.vcpus {
            if cpu.is_some_and(|c| c != i64::from(v.index)) {
                continue;
            }
            if cpu.is_none() {
                text.push_str(&format!("\nCPU#{}\n", v.index));
            }
            let halted = v.mp_state.mp_state == kvm_bindings::KVM_MP_STATE_HALTED;
            text.push_str(&registers::dump(&v.regs, &v.sregs, halted));
        }
        to_value(&HumanReadableText {
            human_readable_text: text,
        })
    }

    pub(crate) fn stop(&mut self) -> Result<(), QmpError> {
        match self.run_state() {
            RunState::Inmigrate => {
                self.autostart = false;
                Ok(())
            }
            RunState::Running => {
                if let Some(m) = &mut self.machine {
                    m.pause().map_err(|e| QmpError::generic(e.to_string()))?;
                }
                let _ = self.set_run_state(RunState::Paused);
                self.emit(&EventKind::Stop);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// `query-block`: every disk, as QEMU describes one.
    pub(crate) fn query_block(&self) -> Vec<crate::qmp::protocol::BlockInfo> {
        let Some(m) = &self.machine else {
            return Vec::new();
        };
        m.disks()
            .into_iter()
            .map(|(config, size)| {
                let mut info = crate::qmp::protocol::BlockInfo::raw_disk(
                    &config.id,
                    &config.source.to_string(),
                    config.read_only,
                    size,
                );
                info.inserted.cache = crate::qmp::protocol::BlockdevCacheInfo {
                    writeback: config.cache.writeback,
                    direct: config.cache.direct,
                    no_flush: config.cache.no_flush,
                };
                info
            })
            .collect()
    }

    pub(crate) fn cont(&mut self) -> Result<(), QmpError> {
        self.refuse_if_handed_over()?;
        if matches!(self.transfer_out, Some(TransferOut::StateSent { .. })) {
            return Err(QmpError::generic(
                "The new VMM may be resuming the guest: wait for the cpr-transfer to end",
            ));
        }
        if self.outgoing.is_some() || self.pending_exec.is_some() {
            return Err(QmpError::generic(
                "A migration is in progress; the guest resumes when it ends if it was running",
            ));
        }
        match self.run_state() {
            RunState::Running => Ok(()),
            RunState::Inmigrate => {
                self.autostart = true;
                Ok(())
            }
            RunState::InternalError | RunState::Shutdown => Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            )),
            _ => {
                self.set_running();
                Ok(())
            }
        }
    }

    pub(crate) fn query_cpus(&self) -> Vec<CpuInfoFast> {
        let Some(m) = &self.machine else {
            return Vec::new();
        };
        m.vcpu_tids()
            .into_iter()
            .map(|(index, tid)| CpuInfoFast {
                thread_id: i64::from(tid),
                props: Some(CpuInstanceProperties {
                    node_id: None,
                    drawer_id: None,
                    book_id: None,
                    socket_id: Some(0),
                    die_id: Some(0),
                    cluster_id: None,
                    module_id: None,
                    core_id: Some(i64::from(index)),
                    thread_id: Some(0),
                }),
                qom_path: format!("/machine/unattached/device[{index}]"),
                cpu_index: i64::from(index),
                target: TARGET_X86_64.to_string(),
            })
            .collect()
    }

    pub(crate) fn pmemsave(&self, args: &PmemsaveArgs) -> Result<(), QmpError> {
        let Some(m) = &self.machine else {
            return Err(QmpError::generic("There is no guest memory yet"));
        };
        let mem = m.ram().memory();
        let end = args.val.checked_add(args.size);
        let in_ram = |addr: u64, len: u64| {
            m.ram().regions().iter().any(|r| {
                addr >= r.layout.guest_addr && addr + len <= r.layout.guest_addr + r.layout.size
            })
        };
        // A guest memory dump is as sensitive as a state file: 0600, and a symlink at the path is
        // refused rather than followed (it could point at any file this process may write).
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&args.filename)
        }
        .map_err(|e| {
            QmpError::generic(format!(
                "Could not open '{}': {}",
                args.filename,
                os_error_text(&e)
            ))
        })?;
        // An existing file keeps its mode on open: make it private too.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut addr = args.val;
        let end = end.ok_or_else(|| QmpError::generic("Invalid addr/size: the range overflows"))?;
        while addr < end {
            let len = (end - addr).min(buf.len() as u64);
            // Stop at region boundaries, so each read lies in one region.
            let len = m
                .ram()
                .regions()
                .iter()
                .map(|r| r.layout.guest_addr + r.layout.size)
                .filter(|&e| e > addr)
                .map(|e| (e - addr).min(len))
                .min()
                .unwrap_or(len);
            if !in_ram(addr, len) {
                return Err(QmpError::generic(format!(
                    "Invalid addr {addr:#x}/size {} specified: not guest RAM",
                    end - args.val
                )));
            }
            let chunk = &mut buf[..len as usize];
            mem.read_slice(chunk, GuestAddress(addr))
                .map_err(|e| QmpError::generic(format!("reading guest memory: {e}")))?;
            std::io::Write::write_all(&mut file, chunk)
                .map_err(|e| QmpError::generic(format!("writing {}: {e}", args.filename)))?;
            addr += len;
        }
        Ok(())
    }

    // ---- migration ----
}

/// Reaps every exited child: this process starts none itself, but after a live update it is the
/// parent of the previous version's teardown helper.
pub(crate) fn reap_children() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => log::debug!("reaped child: {status:?}"),
        }
    }
}

pub(crate) fn qmp_version() -> VersionInfo {
    let (major, minor, micro) = QEMU_COMPAT_VERSION;
    VersionInfo::new(
        major,
        minor,
        micro,
        format!(" (cpr-vmm {})", crate::version_string()),
    )
}

pub(crate) fn empty() -> Value {
    Value::Object(serde_json::Map::new())
}

pub(crate) fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, QmpError> {
    serde_json::to_value(v).map_err(|e| QmpError::generic(format!("internal error: {e}")))
}

/// strerror-style text without Rust's " (os error N)" suffix, as QEMU prints it.
pub(crate) fn os_error_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
