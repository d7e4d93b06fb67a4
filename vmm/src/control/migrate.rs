//! Migration on the VMM thread: what `migrate` and `migrate-incoming` do in each mode, and the
//! new side of a live update. The machine-state walk and formats are in `crate::migration`;
//! this is the orchestration (stop, save, hand over, resume or fail) and what QMP reports.

use super::run_state;
use super::*;
use crate::migration::cpr_transfer;
use crate::migration::format::{encode_state, write_state_bytes};
use crate::qmp::protocol::{MigrationTargets, SocketAddress};
use cpr_common::transfer::{self, FrameReader, Kind, TransferError};

/// A cpr-exec update ready to exec once the `migrate` reply is out.
pub(super) struct PendingExec {
    prepared: PreparedExec,
    /// Keeps the old address space and KVM VM alive past the exec, so tearing them down is not
    /// part of the blackout.
    _teardown: Option<TeardownHelper>,
    state_file: PathBuf,
    guest_was_running: bool,
}

/// A `migrate` to a file in flight.
pub(super) struct OutgoingSave {
    thread: JoinHandle<Result<u64, StateFileError>>,
    guest_was_running: bool,
}

/// cpr-transfer, new side: the main channel.
pub(super) enum TransferIn {
    /// Waiting for `migrate-incoming` to name the main channel (`-incoming defer`).
    AwaitingChannel,
    Listening {
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
    },
    Connected {
        stream: UnixStream,
        reader: FrameReader,
    },
}

/// cpr-transfer, old side: where the hand-over is.
pub(super) enum TransferOut {
    /// HELLO sent; the new VMM closes the cpr channel when it listens on the main channel.
    CprSent {
        cpr: UnixStream,
        reader: FrameReader,
        main_path: PathBuf,
    },
    /// Connected; the new VMM sends READY once its VM is built.
    MainConnected {
        main: UnixStream,
        reader: FrameReader,
    },
    /// Guest stopped and STATE sent; COMMIT means the new VMM owns the guest.
    StateSent {
        main: UnixStream,
        reader: FrameReader,
        guest_was_running: bool,
        stopped_at: Instant,
    },
}

/// Replies and events still queued for a QMP client when the update execs are written for at
/// most this long (the connection itself survives; only a client that stopped reading loses
/// them).
const EXEC_DRAIN_TIMEOUT: Duration = Duration::from_millis(20);

/// How long the old VMM keeps the guest stopped waiting for the new one to commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

impl Vmm {
    /// Restores a machine saved with `migrate` in normal mode. Everything is validated, and RAM
    /// loaded and checksummed, before KVM is touched; on error nothing ran.
    pub(super) fn incoming_from_file(&mut self, path: &Path) -> Result<(), IncomingError> {
        let started = Instant::now();
        let file = StateFile::open(path)?;
        file.check_machine(&self.described_machine())?;
        let ram = normal::load_ram(&file, self.config.hugepages, self.config.prealloc)?;
        let (machine, rx) = Machine::build(
            ram,
            self.config.vcpus,
            self.config.guest.clone(),
            self.console.output(),
            Source::Restore(&file.state),
            None,
        )?;
        self.install_machine(machine, rx)
            .map_err(|e| IncomingError::Machine(MachineError::EventFd(e)))?;
        self.migration = MigrationRecord {
            status: MigrationStatus::Completed,
            started: Some(started),
            total_time_ms: Some(started.elapsed().as_millis() as u64),
            ..MigrationRecord::default()
        };
        if file.run.guest_was_running && self.autostart {
            self.set_running();
        } else {
            let _ = self.set_run_state(RunState::Paused);
        }
        log::info!(
            "restored from {} (saved by vmm {}) in {} ms",
            path.display(),
            file.run.saved_by_version,
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// After a cpr-transfer the guest runs in the new VMM on the same memory: running, resetting
    /// or migrating it here as well would corrupt it.
    pub(super) fn refuse_if_handed_over(&self) -> Result<(), QmpError> {
        if self.handed_over {
            return Err(QmpError::generic(
                "The guest's RAM was handed to another VMM by cpr-transfer and runs there now; this VMM can only be queried or quit",
            ));
        }
        Ok(())
    }

    pub(super) fn migrate(&mut self, args: &MigrateArgs) -> Result<(), QmpError> {
        let targets = args.targets()?;
        self.refuse_if_handed_over()?;
        if self.outgoing.is_some() || self.transfer_out.is_some() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        if self.machine.is_none() || self.run_state() == RunState::Inmigrate {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ));
        }
        // Refused here, before anything stops, rather than half-way through.
        if !run_state::allowed(self.run_state(), RunState::FinishMigrate) {
            return Err(run_state::RunStateError {
                from: self.run_state(),
                to: RunState::FinishMigrate,
            }
            .into());
        }
        let mode = self.params.mode.unwrap_or_default();
        if mode == MigMode::CprTransfer {
            return self.migrate_cpr_transfer(&targets);
        }
        let path = match &targets.main {
            MigrationAddress::File(f) if f.filename.is_empty() => {
                return Err(QmpError::generic(
                    "file: needs a path, e.g. file:/run/vm.state",
                ));
            }
            MigrationAddress::File(f) if f.offset == 0 => PathBuf::from(&f.filename),
            _ => {
                return Err(QmpError::generic(format!(
                    "migration mode '{}' supports only file:PATH destinations",
                    mode.as_str()
                )));
            }
        };
        match mode {
            MigMode::CprExec => self.migrate_cpr_exec(path),
            _ => self.start_outgoing_save(path),
        }
    }

    /// cpr-transfer, old side: hand the RAM memfds over the cpr channel; the rest happens as
    /// the new VMM answers ([`Vmm::poll_transfer`]).
    fn migrate_cpr_transfer(&mut self, targets: &MigrationTargets) -> Result<(), QmpError> {
        let unix_path = |addr: &MigrationAddress| match addr {
            MigrationAddress::Socket(SocketAddress::Unix(u)) if !u.path.is_empty() => {
                Some(PathBuf::from(&u.path))
            }
            _ => None,
        };
        let main_path = unix_path(&targets.main)
            .ok_or_else(|| QmpError::generic("cpr-transfer needs a unix socket main channel"))?;
        let cpr = targets
            .cpr
            .as_ref()
            .ok_or_else(|| QmpError::generic("missing 'cpr' migration channel"))?;
        let cpr_path = unix_path(cpr).ok_or_else(|| {
            QmpError::generic("the 'cpr' migration channel must be a unix socket")
        })?;
        match &self.machine {
            Some(machine) => cpr_exec::check_ram_shareable(machine.ram())
                .map_err(|e| QmpError::generic(e.to_string()))?,
            None => {
                return Err(QmpError::generic(
                    "Guest is waiting for an incoming migration",
                ));
            }
        }
        self.migration = MigrationRecord {
            status: MigrationStatus::Setup,
            started: Some(Instant::now()),
            ..MigrationRecord::default()
        };
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Setup,
        });
        let Some(machine) = &self.machine else {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ));
        };
        let sent = cpr_transfer::connect("cpr", &cpr_path).and_then(|cpr| {
            cpr_transfer::send_hello(&cpr, machine.ram(), monotonic_ns())?;
            Ok(cpr)
        });
        let cpr = match sent {
            Ok(c) => c,
            Err(e) => {
                let reason = e.to_string();
                self.fail_transfer_out(&reason);
                return Err(QmpError::generic(reason));
            }
        };
        let _ = cpr.set_nonblocking(true);
        if let Err(e) = self.watch(
            cpr.as_raw_fd(),
            T_TRANSFER,
            EventSet::IN | EventSet::READ_HANG_UP,
        ) {
            let reason = format!("cpr-transfer: {e}");
            self.fail_transfer_out(&reason);
            return Err(QmpError::generic(reason));
        }
        self.transfer_out = Some(TransferOut::CprSent {
            cpr,
            reader: FrameReader::default(),
            main_path,
        });
        log::info!("cpr-transfer: RAM handed over on {}", cpr_path.display());
        Ok(())
    }

    /// A cpr-transfer socket has something to say (either side).
    pub(super) fn poll_transfer(&mut self) {
        if self.transfer_in.is_some() {
            self.poll_transfer_in();
        } else if self.transfer_out.is_some()
            && let Err(reason) = self.advance_transfer_out()
        {
            self.fail_transfer_out(&reason);
        }
    }

    /// Old side: one step of the hand-over, as far as the new VMM's messages allow.
    fn advance_transfer_out(&mut self) -> Result<(), String> {
        let Some(state) = self.transfer_out.take() else {
            return Ok(());
        };
        match state {
            TransferOut::CprSent {
                cpr,
                mut reader,
                main_path,
            } => match reader.poll(&cpr) {
                Ok(None) => {
                    self.transfer_out = Some(TransferOut::CprSent {
                        cpr,
                        reader,
                        main_path,
                    });
                    Ok(())
                }
                Ok(Some(frame)) => Err(format!(
                    "cpr-transfer: unexpected {:?} on the cpr channel",
                    frame.kind
                )),
                Err(TransferError::Closed { .. }) => {
                    self.unwatch(cpr.as_raw_fd());
                    let main =
                        cpr_transfer::connect("main", &main_path).map_err(|e| e.to_string())?;
                    let _ = main.set_nonblocking(true);
                    self.watch(
                        main.as_raw_fd(),
                        T_TRANSFER,
                        EventSet::IN | EventSet::READ_HANG_UP,
                    )
                    .map_err(|e| format!("cpr-transfer: {e}"))?;
                    self.transfer_out = Some(TransferOut::MainConnected {
                        main,
                        reader: FrameReader::default(),
                    });
                    // READY may already be there.
                    self.advance_transfer_out()
                }
                Err(e) => Err(format!("cpr-transfer: {e}")),
            },
            TransferOut::MainConnected { main, mut reader } => match reader.poll(&main) {
                Ok(None) => {
                    self.transfer_out = Some(TransferOut::MainConnected { main, reader });
                    Ok(())
                }
                Ok(Some(f)) if f.kind == Kind::Ready => self.send_transfer_state(main, reader),
                Ok(Some(f)) => Err(format!("cpr-transfer: expected READY, got {:?}", f.kind)),
                Err(e) => Err(format!("cpr-transfer: {e}")),
            },
            TransferOut::StateSent {
                main,
                mut reader,
                guest_was_running,
                stopped_at,
            } => match reader.poll(&main) {
                Ok(None) => {
                    self.transfer_out = Some(TransferOut::StateSent {
                        main,
                        reader,
                        guest_was_running,
                        stopped_at,
                    });
                    Ok(())
                }
                Ok(Some(f)) if f.kind == Kind::Commit => {
                    self.unwatch(main.as_raw_fd());
                    let ms = stopped_at.elapsed().as_millis() as u64;
                    self.migration.downtime_ms = Some(ms);
                    self.migration.total_time_ms = Some(self.migration.elapsed_ms());
                    self.migration.status = MigrationStatus::Completed;
                    let _ = self.set_run_state(RunState::Postmigrate);
                    self.handed_over = true;
                    self.emit(&EventKind::Migration {
                        status: MigrationStatus::Completed,
                    });
                    log::info!("cpr-transfer: the new VMM took the guest");
                    Ok(())
                }
                Ok(Some(f)) => {
                    self.transfer_out = Some(TransferOut::StateSent {
                        main,
                        reader,
                        guest_was_running,
                        stopped_at,
                    });
                    Err(format!("cpr-transfer: expected COMMIT, got {:?}", f.kind))
                }
                Err(e) => {
                    self.transfer_out = Some(TransferOut::StateSent {
                        main,
                        reader,
                        guest_was_running,
                        stopped_at,
                    });
                    Err(format!("cpr-transfer: {e}"))
                }
            },
        }
    }

    /// Old side, READY received: stop the guest and send its state. The blackout starts here.
    fn send_transfer_state(&mut self, main: UnixStream, reader: FrameReader) -> Result<(), String> {
        let guest_was_running = self.run_state() == RunState::Running;
        let stop_wall = SystemTime::now();
        let stopped_at_ns = monotonic_ns();
        let stopped_at = Instant::now();
        let Some(machine) = &mut self.machine else {
            return Err("there is no machine".into());
        };
        let saved = machine.pause_and_save();
        if guest_was_running {
            let _ = self.set_run_state(RunState::FinishMigrate);
            if let Some(m) = &mut self.monitor {
                m.broadcast_at(&EventKind::Stop, stop_wall);
            }
        }
        // From here a failure leaves the guest stopped: the new VMM may hold it.
        self.transfer_out = Some(TransferOut::StateSent {
            main,
            reader,
            guest_was_running,
            stopped_at,
        });
        let state = saved.map_err(|e| e.to_string())?;
        let run = SavedRun {
            guest_was_running,
            saved_by_version: crate::version_string(),
            saved_at_unix_ns: cpr_common::timing::realtime_ns(),
        };
        let bytes = encode_state(
            Vec::new(),
            &state,
            &run,
            RamContents::Preserved,
            "cpr-transfer",
        )
        .map_err(|e| e.to_string())?;
        let payload = cpr_transfer::state_payload(stopped_at_ns, &bytes);
        if let Some(TransferOut::StateSent { main, .. }) = &self.transfer_out {
            let _ = main.set_nonblocking(false);
            let sent = transfer::send(main, Kind::State, &payload, &[]);
            let _ = main.set_nonblocking(true);
            sent.map_err(|e| format!("cpr-transfer: sending the state: {e}"))?;
        }
        self.migration.status = MigrationStatus::Active;
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Active,
        });
        // COMMIT may already be there.
        self.advance_transfer_out()
    }

    /// Old side: the hand-over failed. The guest stays here; if it was stopped for the
    /// hand-over it stays paused, since only the operator can know the new VMM is really gone,
    /// and `cont` resumes it.
    fn fail_transfer_out(&mut self, reason: &str) {
        log::error!("{reason}");
        let stopped = match self.transfer_out.take() {
            Some(TransferOut::CprSent { cpr, .. }) => {
                self.unwatch(cpr.as_raw_fd());
                None
            }
            Some(TransferOut::MainConnected { main, .. }) => {
                self.unwatch(main.as_raw_fd());
                None
            }
            Some(TransferOut::StateSent {
                main,
                guest_was_running,
                ..
            }) => {
                self.unwatch(main.as_raw_fd());
                Some(guest_was_running)
            }
            None => None,
        };
        self.migration.status = MigrationStatus::Failed;
        self.migration.error = Some(reason.to_string());
        self.migration.total_time_ms = Some(self.migration.elapsed_ms());
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Failed,
        });
        if stopped.is_some() {
            let _ = self.set_run_state(RunState::Paused);
        }
    }

    /// epoll timeout: how long until a stopped hand-over gives up.
    pub(super) fn transfer_timeout_ms(&self) -> i32 {
        match &self.transfer_out {
            Some(TransferOut::StateSent { stopped_at, .. }) => COMMIT_TIMEOUT
                .saturating_sub(stopped_at.elapsed())
                .as_millis()
                .clamp(1, i32::MAX as u128)
                as i32,
            _ => -1,
        }
    }

    pub(super) fn check_transfer_deadline(&mut self) {
        if let Some(TransferOut::StateSent { stopped_at, .. }) = &self.transfer_out
            && stopped_at.elapsed() >= COMMIT_TIMEOUT
        {
            self.fail_transfer_out(&format!(
                "cpr-transfer: the new VMM did not take the guest within {COMMIT_TIMEOUT:?}"
            ));
        }
    }

    /// cpr-transfer, new side: build the VM over the received RAM, then listen on the main
    /// channel (now, or when `migrate-incoming` names it).
    pub(super) fn start_transfer_incoming(
        &mut self,
        mut t: IncomingTransfer,
    ) -> Result<(), StartError> {
        let _ = self.set_run_state(RunState::Inmigrate);
        log::info!(
            "cpr-transfer: RAM received from vmm {}",
            t.hello.sender_version
        );
        let prepared = cpr_transfer::take_ram(&mut t, &memory::layout(self.config.ram_size))
            .map_err(StartError::from)
            .and_then(|ram| {
                Machine::prepare(
                    ram,
                    self.config.vcpus,
                    self.config.guest.clone(),
                    self.console.output(),
                )
                .map_err(StartError::from)
            });
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                if let Some(s) = &t.cpr_stream {
                    transfer::send_error(s, &e.to_string());
                }
                return Err(e);
            }
        };
        self.prepared = Some(prepared);
        self.incoming_transfer = Some(t);
        match self.config.incoming.clone() {
            Some(IncomingSpec::Unix(path)) => self
                .listen_transfer_main(&path)
                .map_err(|e| StartError::Setup(std::io::Error::other(e))),
            _ => {
                self.transfer_in = Some(TransferIn::AwaitingChannel);
                log::info!("cpr-transfer: waiting for migrate-incoming to name the main channel");
                Ok(())
            }
        }
    }

    /// New side: listen on the main channel, then tell the old VMM by closing the cpr channel.
    fn listen_transfer_main(&mut self, path: &Path) -> Result<(), String> {
        let listener = crate::qmp::bind_unix_listener(path)
            .map_err(|e| format!("main channel {}: {e}", path.display()))?;
        let _ = listener.set_nonblocking(true);
        self.watch(listener.as_raw_fd(), T_TRANSFER_LISTEN, EventSet::IN)
            .map_err(|e| e.to_string())?;
        self.transfer_in = Some(TransferIn::Listening {
            listener,
            path: path.to_path_buf(),
        });
        if let Some(t) = &mut self.incoming_transfer {
            t.cpr_stream = None;
        }
        Ok(())
    }

    /// New side: the old VMM connected the main channel; say the VM is ready.
    pub(super) fn accept_transfer_main(&mut self) {
        let Some(TransferIn::Listening { listener, path }) = &self.transfer_in else {
            return;
        };
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        if let Err(e) = transfer::check_peer(&stream) {
            log::warn!("cpr-transfer: refusing a connection on the main channel: {e}");
            transfer::send_error(&stream, &e.to_string());
            return;
        }
        let listen_fd = listener.as_raw_fd();
        let path = path.clone();
        self.unwatch(listen_fd);
        crate::qmp::remove_socket_file(&path);
        if let Err(e) = transfer::send(&stream, Kind::Ready, &[], &[]) {
            self.fail_transfer_in(&format!("cpr-transfer: sending READY: {e}"), None);
            return;
        }
        let _ = stream.set_nonblocking(true);
        if let Err(e) = self.watch(
            stream.as_raw_fd(),
            T_TRANSFER,
            EventSet::IN | EventSet::READ_HANG_UP,
        ) {
            self.fail_transfer_in(&format!("cpr-transfer: {e}"), None);
            return;
        }
        self.transfer_in = Some(TransferIn::Connected {
            stream,
            reader: FrameReader::default(),
        });
    }

    fn poll_transfer_in(&mut self) {
        let Some(TransferIn::Connected { stream, reader }) = &mut self.transfer_in else {
            return;
        };
        match reader.poll(stream) {
            Ok(None) => {}
            Ok(Some(f)) if f.kind == Kind::State => {
                let Some(TransferIn::Connected { stream, .. }) = self.transfer_in.take() else {
                    return;
                };
                self.unwatch(stream.as_raw_fd());
                if let Err(e) = self.finish_transfer_incoming(&stream, f.payload) {
                    self.fail_transfer_in(&e, Some(&stream));
                }
            }
            Ok(Some(f)) => {
                let msg = format!("cpr-transfer: expected STATE, got {:?}", f.kind);
                self.fail_transfer_in(&msg, None);
            }
            Err(e) => self.fail_transfer_in(&format!("cpr-transfer: {e}"), None),
        }
    }

    /// New side, STATE received: validate, restore, COMMIT, resume. The blackout ends here.
    fn finish_transfer_incoming(
        &mut self,
        stream: &UnixStream,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        let (stopped_at_ns, bytes) =
            cpr_transfer::split_state_payload(payload).map_err(|e| e.to_string())?;
        let file = StateFile::from_bytes(bytes, "cpr-transfer state").map_err(|e| e.to_string())?;
        file.check_machine(&self.described_machine())
            .map_err(|e| e.to_string())?;
        let prepared = self
            .prepared
            .take()
            .ok_or("cpr-transfer: no prepared machine")?;
        let mut phases = PhaseLog::starting_at(stopped_at_ns);
        phases.mark("stop, save and send state");
        let (machine, rx) = prepared
            .start(Source::Restore(&file.state), Some(&mut phases))
            .map_err(|e| e.to_string())?;
        self.install_machine(machine, rx)
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nonblocking(false);
        transfer::send(stream, Kind::Commit, &[], &[])
            .map_err(|e| format!("cpr-transfer: sending COMMIT: {e}"))?;
        let run = file.run.guest_was_running && self.autostart;
        if run && let Some(m) = &mut self.machine {
            m.resume();
        }
        let resumed = monotonic_ns();
        let resumed_wall = SystemTime::now();
        phases.mark_at("resume vCPUs", resumed);
        let blackout_ns = resumed.saturating_sub(stopped_at_ns);
        let from_version = self
            .incoming_transfer
            .take()
            .map(|t| t.hello.sender_version)
            .unwrap_or_default();
        self.finish_incoming_update(blackout_ns, resumed_wall, &phases, from_version, None, run);
        log::info!(
            "cpr-transfer complete: blackout {:.3} ms",
            blackout_ns as f64 / 1e6
        );
        Ok(())
    }

    /// New side: the hand-over failed. The old VMM still has the guest; this process has
    /// nothing to run, so it says why and ends (as QEMU's exit-on-error does).
    fn fail_transfer_in(&mut self, reason: &str, stream: Option<&UnixStream>) {
        log::error!("incoming cpr-transfer failed: {reason}");
        eprintln!("vmm: incoming cpr-transfer failed: {reason}");
        if let Some(s) = stream {
            transfer::send_error(s, reason);
        }
        if let Some(TransferIn::Connected { stream, .. }) = self.transfer_in.take() {
            transfer::send_error(&stream, reason);
        }
        self.migration.status = MigrationStatus::Failed;
        self.migration.error = Some(reason.to_string());
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Failed,
        });
        self.exit_code = Some(1);
    }

    /// cpr-exec, old side: stop, save state without RAM, prepare the exec. The exec itself
    /// happens once the reply to `migrate` is out ([`Vmm::exec_update`]).
    pub(super) fn migrate_cpr_exec(&mut self, state_file: PathBuf) -> Result<(), QmpError> {
        let command = self.params.cpr_exec_command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err(QmpError::generic(
                "cpr-exec mode requires the migration parameter cpr-exec-command (the program to execute, then its arguments)",
            ));
        }
        let Some(machine) = &mut self.machine else {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ));
        };
        cpr_exec::check_ram_shareable(machine.ram())
            .map_err(|e| QmpError::generic(e.to_string()))?;
        // Before the guest stops: the helper costs nothing to the blackout when made here.
        let teardown = TeardownHelper::spawn()
            .map_err(|e| {
                log::warn!("no teardown helper ({e}); the exec will tear down RAM mappings itself")
            })
            .ok();
        let guest_was_running = self.run_state == RunState::Running;
        let stop_wall = SystemTime::now();
        let stopped_at = monotonic_ns();
        let mut phases = PhaseLog::starting_at(stopped_at);
        self.migration = MigrationRecord {
            status: MigrationStatus::Setup,
            started: Some(Instant::now()),
            ..MigrationRecord::default()
        };
        let saved = machine.pause_and_save();
        phases.mark("stop vCPUs and save vCPU state");
        let prepared = saved.map_err(|e| e.to_string()).and_then(|state| {
            let run = SavedRun {
                guest_was_running,
                saved_by_version: crate::version_string(),
                saved_at_unix_ns: cpr_common::timing::realtime_ns(),
            };
            let label = state_file.display().to_string();
            let bytes = encode_state(Vec::new(), &state, &run, RamContents::Preserved, &label)
                .map_err(|e| e.to_string())?;
            write_state_bytes(&state_file, &bytes).map_err(|e| e.to_string())?;
            phases.mark("write state file");
            let mut other_fds = self
                .monitor
                .as_ref()
                .map(|m| m.preserved_fds())
                .unwrap_or_default();
            other_fds.extend(self.console.preserved_fds());
            if let Some(t) = &teardown {
                other_fds.push((
                    FdKind::TeardownRelease,
                    "teardown-release".to_string(),
                    t.release_fd(),
                ));
            }
            cpr_exec::prepare_exec(ExecInputs {
                command: &command,
                state_file: &state_file,
                state_bytes: &bytes,
                guest_was_running,
                stopped_at_ns: stopped_at,
                phases,
                own_argv: &self.config.argv,
                ram: machine.ram(),
                other_fds,
            })
            .map_err(|e| e.to_string())
        });
        if guest_was_running {
            let _ = self.set_run_state(RunState::FinishMigrate);
            if let Some(m) = &mut self.monitor {
                m.broadcast_at(&EventKind::Stop, stop_wall);
            }
        }
        match prepared {
            Ok(prepared) => {
                self.emit(&EventKind::Migration {
                    status: MigrationStatus::Active,
                });
                self.pending_exec = Some(PendingExec {
                    prepared,
                    _teardown: teardown,
                    state_file,
                    guest_was_running,
                });
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&state_file);
                let reason = format!("cpr-exec: {e}");
                self.fail_migration(&reason, guest_was_running);
                Err(QmpError::generic(reason))
            }
        }
    }

    /// Executes the cpr-exec-command. Returns only if the exec failed; then everything is put
    /// back and the guest resumes.
    pub(super) fn exec_update(&mut self, pending: PendingExec) {
        if let Some(m) = &mut self.monitor {
            // The guest is stopped: a client that does not read gets a short grace only.
            m.drain_output(EXEC_DRAIN_TIMEOUT);
        }
        log::info!("live update: executing {}", pending.prepared.program());
        let (err, prepared) = pending.prepared.exec();
        let reason = format!("exec of {} failed: {err}", prepared.program());
        log::error!("live update failed: {reason}; resuming the guest");
        prepared.undo();
        let _ = std::fs::remove_file(&pending.state_file);
        self.fail_migration(&reason, pending.guest_was_running);
    }

    /// cpr-exec, new side: restore over the inherited RAM and resume the guest.
    pub(super) fn start_cpr_incoming(&mut self, incoming: &mut Incoming) -> Result<(), StartError> {
        self.sync_console_fds();
        let _ = self.set_run_state(RunState::Inmigrate);
        let path = PathBuf::from(&incoming.state.state_file);
        let label = path.display().to_string();
        let loaded = std::fs::read(&path)
            .map_err(|source| StateFileError::Open {
                path: label.clone(),
                source,
            })
            .and_then(|bytes| StateFile::from_bytes(bytes, &label));
        let file = match loaded {
            Ok(f) => f,
            // A rollback is the last chance for the guest: if the file went bad, use the copy
            // the old VMM kept in a sealed memfd.
            Err(e) if matches!(incoming.state.attempt, Attempt::Rollback { .. }) => {
                log::warn!("{e}; restoring from the copy kept across the exec");
                let bytes = incoming.state_copy().ok_or(IncomingError::File(e))?;
                StateFile::from_bytes(bytes, "the kept copy of the state file")
                    .map_err(IncomingError::from)?
            }
            Err(e) => return Err(IncomingError::from(e).into()),
        };
        file.check_machine(&self.described_machine())
            .map_err(IncomingError::from)?;
        incoming.phases.mark("read state file");
        let ram = incoming.take_ram(&file.state.description.regions)?;
        incoming.phases.mark("map memory");
        let (machine, rx) = Machine::build(
            ram,
            self.config.vcpus,
            self.config.guest.clone(),
            self.console.output(),
            Source::Restore(&file.state),
            Some(&mut incoming.phases),
        )?;
        self.install_machine(machine, rx)
            .map_err(StartError::Setup)?;
        match self.config.cpr_test_fault {
            Some(CprTestFault::ExitBeforeResume) => return Err(StartError::TestFault),
            Some(CprTestFault::CrashBeforeResume) => {
                log::error!("test fault injected: crashing before resume");
                std::process::abort();
            }
            None => {}
        }
        let state = &incoming.state;
        let guest_was_running = state.guest_was_running;
        if guest_was_running && let Some(m) = &mut self.machine {
            m.resume();
        }
        let resumed_at = monotonic_ns();
        let resumed_wall = SystemTime::now();
        incoming.disarm();
        incoming.phases.mark_at("resume vCPUs", resumed_at);
        let blackout_ns = resumed_at.saturating_sub(state.stopped_at_ns);
        let rolled_back = match &incoming.state.attempt {
            Attempt::Rollback { reason } => Some(reason.clone()),
            Attempt::Update => None,
        };
        self.finish_incoming_update(
            blackout_ns,
            resumed_wall,
            &incoming.phases,
            incoming.state.fallback.version.clone(),
            rolled_back.clone(),
            guest_was_running,
        );
        // Last, after the events: this also lets the previous process's teardown start on the
        // other CPU.
        incoming.finish();
        match &rolled_back {
            None => log::info!(
                "live update from {} to {} complete: blackout {:.3} ms",
                incoming.state.fallback.version,
                crate::version_string(),
                blackout_ns as f64 / 1e6
            ),
            Some(reason) => log::warn!(
                "live update failed ({reason}); this VMM ({}) took the guest back after {:.3} ms",
                crate::version_string(),
                blackout_ns as f64 / 1e6
            ),
        }
        Ok(())
    }

    /// The new side of a live update (either cpr mode) has resumed the guest (or left it paused
    /// as it was): record what query-migrate reports and tell the QMP clients. `rolled_back` is
    /// the failed update's reason when this process is the previous version taking the guest back.
    fn finish_incoming_update(
        &mut self,
        blackout_ns: u64,
        resumed_wall: SystemTime,
        phases: &PhaseLog,
        from_version: String,
        rolled_back: Option<String>,
        running: bool,
    ) {
        let status = if rolled_back.is_some() {
            MigrationStatus::Failed
        } else {
            MigrationStatus::Completed
        };
        self.migration = MigrationRecord {
            status,
            total_time_ms: Some(blackout_ns / 1_000_000),
            downtime_ms: Some(blackout_ns / 1_000_000),
            cpr: Some(CprUpdateInfo {
                blackout_ns,
                phases: phases
                    .phases
                    .iter()
                    .map(|p| CprPhase {
                        name: p.name.clone(),
                        ns: p.ns,
                    })
                    .collect(),
                from_version,
                to_version: crate::version_string(),
                rolled_back: rolled_back.is_some(),
            }),
            error: rolled_back,
            ..MigrationRecord::default()
        };
        if running {
            let _ = self.set_run_state(RunState::Running);
            // Stamped with the moment the vCPUs were resumed, so that STOP to RESUME is the
            // blackout the VMM reports.
            if let Some(m) = &mut self.monitor {
                m.broadcast_at(&EventKind::Resume, resumed_wall);
            }
        } else {
            let _ = self.set_run_state(RunState::Paused);
        }
        self.emit(&EventKind::Migration { status });
    }

    /// Normal mode: stop, capture the machine, and write state and RAM on a thread.
    pub(super) fn start_outgoing_save(&mut self, path: PathBuf) -> Result<(), QmpError> {
        let guest_was_running = self.run_state() == RunState::Running;
        let progress = Arc::new(RamProgress::default());
        if let Some(m) = &self.machine {
            // Known from the start, so query-migrate never shows an empty save as done.
            progress.set_total(m.ram().total_size());
        }
        self.migration = MigrationRecord {
            status: MigrationStatus::Setup,
            started: Some(Instant::now()),
            ram: Some(progress.clone()),
            ..MigrationRecord::default()
        };
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Setup,
        });
        let captured = self.capture_for_save(guest_was_running);
        let (state, ram) = match captured {
            Ok(c) => c,
            Err(e) => {
                self.fail_migration(&e, guest_was_running);
                return Err(QmpError::generic(e));
            }
        };
        self.migration.setup_time_ms = self.migration.elapsed_ms();
        let run = SavedRun {
            guest_was_running,
            saved_by_version: crate::version_string(),
            saved_at_unix_ns: cpr_common::timing::realtime_ns(),
        };
        match normal::start_outgoing(path, state, run, ram, progress, self.migration_done.clone()) {
            Ok(thread) => {
                self.outgoing = Some(OutgoingSave {
                    thread,
                    guest_was_running,
                });
                self.migration.status = MigrationStatus::Active;
                self.emit(&EventKind::Migration {
                    status: MigrationStatus::Active,
                });
                Ok(())
            }
            Err(e) => {
                let msg = format!("starting the migration thread: {e}");
                self.fail_migration(&msg, guest_was_running);
                Err(QmpError::generic(msg))
            }
        }
    }

    /// Stops the guest (if running) and saves the machine's state (not RAM).
    pub(super) fn capture_for_save(
        &mut self,
        guest_was_running: bool,
    ) -> Result<(crate::migration::state::MachineState, memory::RamView), String> {
        let Some(m) = &mut self.machine else {
            return Err("there is no machine".into());
        };
        let state = m.pause_and_save().map_err(|e| e.to_string())?;
        let ram = m.ram().view();
        if guest_was_running {
            self.emit(&EventKind::Stop);
        }
        let _ = self.set_run_state(RunState::FinishMigrate);
        Ok((state, ram))
    }

    pub(super) fn finish_outgoing_save(&mut self) {
        let Some(out) = self.outgoing.take() else {
            return;
        };
        let result = out.thread.join().unwrap_or_else(|_| {
            Err(StateFileError::Ram {
                path: String::new(),
                detail: "the migration thread panicked".into(),
            })
        });
        match result {
            Ok(size) => {
                let ms = self.migration.elapsed_ms();
                self.migration.total_time_ms = Some(ms);
                // The guest was stopped for the whole save.
                self.migration.downtime_ms = Some(ms);
                self.migration.status = MigrationStatus::Completed;
                let _ = self.set_run_state(RunState::Postmigrate);
                log::info!("migration to file completed: {size} bytes in {ms} ms");
                self.emit(&EventKind::Migration {
                    status: MigrationStatus::Completed,
                });
            }
            Err(e) => {
                log::error!("migration failed: {e}");
                self.fail_migration(&e.to_string(), out.guest_was_running);
            }
        }
    }

    /// Records a failed migration and resumes the guest if it was running before.
    pub(super) fn fail_migration(&mut self, reason: &str, guest_was_running: bool) {
        self.migration.status = MigrationStatus::Failed;
        self.migration.error = Some(reason.to_string());
        self.migration.total_time_ms = Some(self.migration.elapsed_ms());
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Failed,
        });
        if guest_was_running {
            self.set_running();
        } else if self.machine.is_some() {
            let _ = self.set_run_state(RunState::Paused);
        }
    }

    pub(super) fn query_migrate(&self) -> MigrationInfo {
        let r = &self.migration;
        if r.status == MigrationStatus::None {
            return MigrationInfo::default();
        }
        let ram = r.ram.as_ref().map(|p| p.stats(r.elapsed_ms()));
        MigrationInfo {
            status: Some(r.status),
            ram,
            total_time: Some(r.elapsed_ms() as i64),
            expected_downtime: None,
            downtime: r.downtime_ms.map(|d| d as i64),
            setup_time: Some(r.setup_time_ms as i64),
            cpu_throttle_percentage: None,
            error_desc: r.error.clone(),
            blocked_reasons: None,
            x_cpr: r.cpr.clone(),
        }
    }

    pub(super) fn migrate_incoming(&mut self, args: &MigrateIncomingArgs) -> Result<(), QmpError> {
        if let Some(TransferIn::AwaitingChannel) = &self.transfer_in {
            let path = match args.address()? {
                MigrationAddress::Socket(SocketAddress::Unix(u)) if !u.path.is_empty() => {
                    PathBuf::from(u.path)
                }
                _ => {
                    return Err(QmpError::generic(
                        "cpr-transfer's main channel must be a unix socket",
                    ));
                }
            };
            return self.listen_transfer_main(&path).map_err(QmpError::generic);
        }
        if self.config.incoming != Some(IncomingSpec::Defer) {
            return Err(QmpError::generic(
                "'-incoming' was not specified on the command line",
            ));
        }
        if self.run_state() != RunState::Inmigrate || self.machine.is_some() {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        let path = match args.address()? {
            MigrationAddress::File(f) if f.offset == 0 => PathBuf::from(f.filename),
            _ => {
                return Err(QmpError::generic(
                    "migrate-incoming supports only file:PATH sources",
                ));
            }
        };
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Active,
        });
        let result = self.incoming_from_file(&path);
        let status = if result.is_ok() {
            MigrationStatus::Completed
        } else {
            MigrationStatus::Failed
        };
        self.emit(&EventKind::Migration { status });
        result.map_err(|e| {
            log::error!("incoming migration failed: {e}");
            QmpError::generic(e.to_string())
        })
    }
}

impl RamProgress {
    /// `query-migrate`'s `ram` member.
    fn stats(&self, elapsed_ms: u64) -> MigrationStats {
        use std::sync::atomic::Ordering::Relaxed;
        let transferred = self.transferred.load(Relaxed);
        let mbps = if elapsed_ms > 0 {
            transferred as f64 * 8.0 / 1e6 / (elapsed_ms as f64 / 1000.0)
        } else {
            0.0
        };
        MigrationStats {
            transferred: transferred as i64,
            remaining: self.remaining.load(Relaxed) as i64,
            total: self.total.load(Relaxed) as i64,
            duplicate: self.duplicate_pages.load(Relaxed) as i64,
            normal: self.normal_pages.load(Relaxed) as i64,
            normal_bytes: (self.normal_pages.load(Relaxed) * 4096) as i64,
            dirty_pages_rate: 0,
            mbps,
            dirty_sync_count: 1,
            postcopy_requests: 0,
            page_size: 4096,
            multifd_bytes: 0,
            pages_per_second: 0,
            precopy_bytes: transferred,
            downtime_bytes: 0,
            postcopy_bytes: 0,
            dirty_sync_missed_zero_copy: 0,
        }
    }
}
