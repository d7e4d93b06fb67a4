//! cpr-transfer: hand guest RAM to a separately started VMM over a UNIX socket.
//!
//! The protocol (and its byte layout) is [`cpr_common::transfer`]. This module has the VMM's
//! socket-level steps: the new side takes the CPR channel before it creates any memory or starts
//! its monitor ([`accept_cpr`]), then maps the received memfds ([`take_ram`]); the old side
//! connects and sends its RAM memfds ([`connect`], [`send_hello`]). Below those, the VMM thread's
//! side of the mode: the step-by-step state machines that drive the main channel on each side
//! ([`TransferOut`], [`TransferIn`]), which stop, hand over and restore the machine.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use cpr_common::cpr::FdKind;
use cpr_common::cpr::PreservedFd;
use cpr_common::fds;
use cpr_common::timing::{PhaseLog, monotonic_ns};
use cpr_common::transfer::Hello;
use cpr_common::transfer::{self, FrameReader, Kind, TransferError};
use vmm_sys_util::epoll::EventSet;

use crate::cli::IncomingSpec;
use crate::control::{StartError, T_TRANSFER, T_TRANSFER_LISTEN, Vmm};
use crate::devices::{HandedOverFds, HostFd};
use crate::machine::{Machine, Source};
use crate::memory::RegionLayout;
use crate::memory::{self, GuestRam, MemoryError};
use crate::migration::MigrationError;
use crate::migration::cpr_exec::{self};
use crate::migration::format::encode_state;
use crate::migration::format::{RamContents, SavedRun, StateFile};
use crate::migration::{MigrationRecord, MigrationStatus};
use crate::qmp::protocol::{EventKind, MigrationAddress, QmpError, RunState};
use crate::qmp::protocol::{MigrationTargets, SocketAddress};

#[derive(Debug, thiserror::Error)]
pub enum CprTransferError {
    #[error("{channel} channel {path}: {source}")]
    Socket {
        channel: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cpr-transfer: {0}")]
    Protocol(#[from] TransferError),
    #[error("cpr-transfer: the old VMM sent {got} fds for {listed} listed")]
    FdCount { got: usize, listed: usize },
    #[error("cpr-transfer: received fd check failed: {0}")]
    FdCheck(#[from] fds::FdError),
    #[error(
        "cpr-transfer: guest RAM region '{name}' is {got} bytes, this VMM's -m gives {expected}; start it with the old VMM's -m"
    )]
    RegionSize {
        name: String,
        got: u64,
        expected: u64,
    },
    #[error("cpr-transfer: the old VMM sent no memfd for RAM region '{0}'")]
    MissingRegion(String),
    #[error(
        "cpr-transfer: the old VMM's guest RAM is in a memory-backend-file (mem-path={theirs}) but this VMM's command line has none: start it with the old VMM's -object memory-backend-file,...,mem-path={theirs},share=on and -machine memory-backend=ID"
    )]
    RamFileNotOnCommandLine { theirs: String },
    #[error(
        "cpr-transfer: this VMM's command line has a memory-backend-file (mem-path={ours}) but the old VMM's guest RAM is in memfds: give this VMM the old VMM's memory backend (-m, or memory-backend-memfd)"
    )]
    RamFileNotSent { ours: String },
    #[error(
        "cpr-transfer: the old VMM's guest RAM is the memory-backend-file mem-path={theirs}, this VMM's command line names mem-path={ours}: give the same mem-path (the file is handed over open, never opened again by path)"
    )]
    RamFileOtherPath { theirs: String, ours: String },
    #[error(
        "cpr-transfer: the old VMM's guest RAM file {path} is {got} bytes, this VMM's memory backend has size={expected}: give the old VMM's size"
    )]
    RamFileSize {
        path: String,
        got: u64,
        expected: u64,
    },
    #[error("cpr-transfer: mapping received RAM: {0}")]
    Memory(#[from] MemoryError),
    #[error("cpr-transfer: the devices' host fds: {0}")]
    DeviceFds(String),
}

/// What the new side got on the CPR channel: the sender, its RAM memfds (checked), and the
/// still-open CPR connection, whose closing tells the old side to connect the main channel.
pub struct IncomingTransfer {
    pub hello: Hello,
    /// Every fd received (RAM memfds and devices' host fds), each checked.
    ram: Vec<(PreservedFd, OwnedFd)>,
    pub cpr_stream: Option<UnixStream>,
}

impl IncomingTransfer {
    /// The devices' host fds, for their devices to take back at restore.
    pub fn take_device_fds(&mut self) -> HandedOverFds {
        let (devices, rest) = std::mem::take(&mut self.ram)
            .into_iter()
            .partition(|(rec, _)| rec.kind.is_device_backend());
        self.ram = rest;
        HandedOverFds::new(
            devices
                .into_iter()
                .map(|(rec, fd)| (rec.name, fd))
                .collect(),
        )
    }
}

/// Listens on the CPR channel and takes the old VMM's HELLO: peers of another UID are turned
/// away (and waited past), the fds are checked like the shim checks them.
pub fn accept_cpr(path: &Path) -> Result<IncomingTransfer, CprTransferError> {
    let sock_err = |source| CprTransferError::Socket {
        channel: "cpr",
        path: path.display().to_string(),
        source,
    };
    let listener = crate::unix_socket::bind_listener(path).map_err(sock_err)?;
    log::info!(
        "cpr-transfer: waiting for the old VMM on {}",
        path.display()
    );
    let stream = loop {
        let (stream, _) = listener.accept().map_err(sock_err)?;
        match transfer::check_peer(&stream) {
            Ok(()) => break stream,
            Err(e) => {
                log::warn!("cpr-transfer: refusing a connection on the cpr channel: {e}");
                transfer::send_error(&stream, &e.to_string());
            }
        }
    };
    drop(listener);
    crate::unix_socket::remove_socket_file(path);
    let result = receive_hello(&stream);
    if let Err(e) = &result {
        transfer::send_error(&stream, &e.to_string());
    }
    let (hello, ram) = result?;
    Ok(IncomingTransfer {
        hello,
        ram,
        cpr_stream: Some(stream),
    })
}

fn receive_hello(
    stream: &UnixStream,
) -> Result<(Hello, Vec<(PreservedFd, OwnedFd)>), CprTransferError> {
    let frame = transfer::expect(stream, Kind::Hello)?;
    let hello = transfer::decode_hello(&frame.payload)?;
    if frame.fds.len() != hello.fds.len() {
        return Err(CprTransferError::FdCount {
            got: frame.fds.len(),
            listed: hello.fds.len(),
        });
    }
    let mut ram = Vec::new();
    for (record, fd) in hello.fds.iter().zip(frame.fds) {
        // The record carries the sender's fd number; check the fd as received.
        let mut rec = record.clone();
        rec.fd = fd.as_raw_fd();
        fds::check_preserved(&rec)?;
        ram.push((rec, fd));
    }
    Ok((hello, ram))
}

/// The form in which a mem-path is compared across the hand-over: absolute, not resolved (the
/// file may have been renamed since the old VMM opened it; it is never opened again here).
fn absolute_mem_path(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// Maps the received RAM for `regions` (this VMM's layout for its `-m`), or, when the old VMM
/// sent its `memory-backend-file`'s file, that very file in place: `ram_file` (this command
/// line's mem-path) must name the same path and `regions` add up to its size.
pub fn take_ram(
    incoming: &mut IncomingTransfer,
    regions: &[RegionLayout],
    ram_file: Option<&Path>,
) -> Result<GuestRam, CprTransferError> {
    let sent_file = incoming
        .ram
        .iter()
        .position(|(rec, _)| rec.kind == FdKind::GuestRamFile);
    match (sent_file, ram_file) {
        (Some(i), Some(ours)) => {
            let theirs = incoming.hello.ram_file.clone().unwrap_or_default();
            let ours_text = absolute_mem_path(ours);
            if ours_text != theirs {
                return Err(CprTransferError::RamFileOtherPath {
                    theirs,
                    ours: ours_text,
                });
            }
            let total: u64 = regions.iter().map(|r| r.size).sum();
            let size = incoming.ram[i].0.size;
            if size != total {
                return Err(CprTransferError::RamFileSize {
                    path: theirs,
                    got: size,
                    expected: total,
                });
            }
            let (_, fd) = incoming.ram.remove(i);
            let options = memory::FileRamOptions {
                share: true,
                prealloc: false,
            };
            return Ok(GuestRam::map_file(
                ours,
                std::fs::File::from(fd),
                total,
                options,
            )?);
        }
        (Some(_), None) => {
            return Err(CprTransferError::RamFileNotOnCommandLine {
                theirs: incoming.hello.ram_file.clone().unwrap_or_default(),
            });
        }
        (None, Some(ours)) => {
            return Err(CprTransferError::RamFileNotSent {
                ours: ours.display().to_string(),
            });
        }
        (None, None) => {}
    }
    for region in regions {
        let (rec, _) = incoming
            .ram
            .iter()
            .find(|(rec, _)| rec.name == region.name && rec.kind == FdKind::GuestRam)
            .ok_or_else(|| CprTransferError::MissingRegion(region.name.clone()))?;
        if rec.size != region.size {
            return Err(CprTransferError::RegionSize {
                name: region.name.clone(),
                got: rec.size,
                expected: region.size,
            });
        }
    }
    // Only the RAM memfds: the devices' host fds stay for the restore.
    let (mut fds, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut incoming.ram)
        .into_iter()
        .partition(|(rec, _)| rec.kind == FdKind::GuestRam);
    incoming.ram = rest;
    let ram = GuestRam::from_fds(regions, |r| {
        let i = fds.iter().position(|(rec, _)| rec.name == r.name)?;
        Some(fds.remove(i).1)
    })?;
    Ok(ram)
}

/// Connects to a channel the new VMM listens on; it must run as our UID or root.
pub fn connect(channel: &'static str, path: &Path) -> Result<UnixStream, CprTransferError> {
    // A listener's socket file appears a moment before it listens: a refusal right then is
    // retried briefly rather than failing the migration.
    let mut attempts = 0;
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && attempts < 20 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(source) => {
                return Err(CprTransferError::Socket {
                    channel,
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    };
    transfer::check_peer(&stream)?;
    Ok(stream)
}

/// Sends HELLO with every RAM memfd, or the RAM file (one fd for all regions) with its path.
pub fn send_hello(
    stream: &UnixStream,
    ram: &GuestRam,
    device_fds: &[HostFd],
    started_ns: u64,
) -> Result<(), CprTransferError> {
    let mut records = Vec::new();
    let mut raw = Vec::new();
    if let Some(file) = ram.backing_file() {
        records.push(fds::describe(
            file,
            memory::RAM_FILE_NAME,
            FdKind::GuestRamFile,
        )?);
        raw.push(file.as_raw_fd());
    }
    let memfds = if ram.backing_file().is_some() {
        &[][..]
    } else {
        ram.regions()
    };
    for region in memfds {
        records.push(fds::describe(
            region.fd(),
            &region.layout.name,
            FdKind::GuestRam,
        )?);
        raw.push(region.fd().as_raw_fd());
    }
    for host in device_fds {
        records.push(super::describe_device_fd(host)?);
        raw.push(host.fd);
    }
    let hello = Hello {
        sender_version: crate::version_string(),
        fds: records,
        started_ns,
        ram_file: ram.backing_path().map(absolute_mem_path),
    };
    transfer::send(stream, Kind::Hello, &transfer::encode_hello(&hello)?, &raw)?;
    Ok(())
}

/// STATE's payload: the monotonic time the old VMM stopped the guest (for the blackout
/// figure), then the state-file bytes.
pub fn state_payload(stopped_at_ns: u64, state_file: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + state_file.len());
    p.extend_from_slice(&stopped_at_ns.to_le_bytes());
    p.extend_from_slice(state_file);
    p
}

pub fn split_state_payload(mut payload: Vec<u8>) -> Result<(u64, Vec<u8>), TransferError> {
    if payload.len() < 8 {
        return Err(TransferError::Malformed("STATE is too short".into()));
    }
    let rest = payload.split_off(8);
    let mut t = [0u8; 8];
    t.copy_from_slice(&payload);
    Ok((u64::from_le_bytes(t), rest))
}

/// cpr-transfer, new side: the main channel.
pub(crate) enum TransferIn {
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
pub(crate) enum TransferOut {
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

/// How long the old VMM keeps the guest stopped waiting for the new one to commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

impl Vmm {
    /// cpr-transfer, old side: hand the RAM memfds over the cpr channel; the rest happens as
    /// the new VMM answers ([`Vmm::poll_transfer`]).
    pub(crate) fn migrate_cpr_transfer(
        &mut self,
        targets: &MigrationTargets,
    ) -> Result<(), QmpError> {
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
        let sent = connect("cpr", &cpr_path).and_then(|cpr| {
            let device_fds = machine
                .device_host_fds()
                .map_err(|e| CprTransferError::DeviceFds(e.to_string()))?;
            send_hello(&cpr, machine.ram(), &device_fds, monotonic_ns())?;
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
    pub(crate) fn poll_transfer(&mut self) {
        if self.transfer_in.is_some() {
            self.poll_transfer_in();
        } else if self.transfer_out.is_some()
            && let Err(reason) = self.advance_transfer_out()
        {
            self.fail_transfer_out(&reason.to_string());
        }
    }

    /// Old side: one step of the hand-over, as far as the new VMM's messages allow.
    pub(crate) fn advance_transfer_out(&mut self) -> Result<(), MigrationError> {
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
                Ok(Some(frame)) => Err(MigrationError::Unexpected {
                    channel: "cpr",
                    expected: "the channel to close",
                    got: frame.kind,
                }),
                Err(TransferError::Closed { .. }) => {
                    self.unwatch(cpr.as_raw_fd());
                    let main = connect("main", &main_path)?;
                    let _ = main.set_nonblocking(true);
                    self.watch(
                        main.as_raw_fd(),
                        T_TRANSFER,
                        EventSet::IN | EventSet::READ_HANG_UP,
                    )
                    .map_err(MigrationError::io("watching the main channel"))?;
                    self.transfer_out = Some(TransferOut::MainConnected {
                        main,
                        reader: FrameReader::default(),
                    });
                    // READY may already be there.
                    self.advance_transfer_out()
                }
                Err(e) => Err(e.into()),
            },
            TransferOut::MainConnected { main, mut reader } => match reader.poll(&main) {
                Ok(None) => {
                    self.transfer_out = Some(TransferOut::MainConnected { main, reader });
                    Ok(())
                }
                Ok(Some(f)) if f.kind == Kind::Ready => self.send_transfer_state(main, reader),
                Ok(Some(f)) => Err(MigrationError::Unexpected {
                    channel: "main",
                    expected: "READY",
                    got: f.kind,
                }),
                Err(e) => Err(e.into()),
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
                    Err(MigrationError::Unexpected {
                        channel: "main",
                        expected: "COMMIT",
                        got: f.kind,
                    })
                }
                Err(e) => {
                    self.transfer_out = Some(TransferOut::StateSent {
                        main,
                        reader,
                        guest_was_running,
                        stopped_at,
                    });
                    Err(e.into())
                }
            },
        }
    }

    /// Old side, READY received: stop the guest and send its state. The blackout starts here.
    pub(crate) fn send_transfer_state(
        &mut self,
        main: UnixStream,
        reader: FrameReader,
    ) -> Result<(), MigrationError> {
        let guest_was_running = self.run_state() == RunState::Running;
        let stop_wall = SystemTime::now();
        let stopped_at_ns = monotonic_ns();
        let stopped_at = Instant::now();
        let Some(machine) = &mut self.machine else {
            return Err(MigrationError::NoMachine);
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
        let state = saved?;
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
        )?;
        let payload = state_payload(stopped_at_ns, &bytes);
        if let Some(TransferOut::StateSent { main, .. }) = &self.transfer_out {
            let _ = main.set_nonblocking(false);
            let sent = transfer::send(main, Kind::State, &payload, &[]);
            let _ = main.set_nonblocking(true);
            sent?;
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
    pub(crate) fn fail_transfer_out(&mut self, reason: &str) {
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
    pub(crate) fn transfer_timeout_ms(&self) -> i32 {
        match &self.transfer_out {
            Some(TransferOut::StateSent { stopped_at, .. }) => COMMIT_TIMEOUT
                .saturating_sub(stopped_at.elapsed())
                .as_millis()
                .clamp(1, i32::MAX as u128)
                as i32,
            _ => -1,
        }
    }

    pub(crate) fn check_transfer_deadline(&mut self) {
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
    pub(crate) fn start_transfer_incoming(
        &mut self,
        mut t: IncomingTransfer,
    ) -> Result<(), StartError> {
        let _ = self.set_run_state(RunState::Inmigrate);
        log::info!(
            "cpr-transfer: RAM received from vmm {}",
            t.hello.sender_version
        );
        let prepared = take_ram(
            &mut t,
            &memory::layout(self.config.ram_size),
            self.config.ram_file.as_deref(),
        )
        .map_err(StartError::from)
        .and_then(|ram| {
            Machine::prepare(
                ram,
                self.config.vcpus,
                self.hardware(),
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
    pub(crate) fn listen_transfer_main(&mut self, path: &Path) -> Result<(), MigrationError> {
        let listener = crate::unix_socket::bind_listener(path).map_err(MigrationError::io(
            format!("main channel {}", path.display()),
        ))?;
        let _ = listener.set_nonblocking(true);
        self.watch(listener.as_raw_fd(), T_TRANSFER_LISTEN, EventSet::IN)
            .map_err(MigrationError::io("watching the main channel"))?;
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
    pub(crate) fn accept_transfer_main(&mut self) {
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
        crate::unix_socket::remove_socket_file(&path);
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

    pub(crate) fn poll_transfer_in(&mut self) {
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
                    self.fail_transfer_in(&e.to_string(), Some(&stream));
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
    pub(crate) fn finish_transfer_incoming(
        &mut self,
        stream: &UnixStream,
        payload: Vec<u8>,
    ) -> Result<(), MigrationError> {
        let (stopped_at_ns, bytes) = split_state_payload(payload)?;
        let file = StateFile::from_bytes(bytes, "cpr-transfer state")?;
        file.check_machine(&self.described_machine())?;
        let prepared = self
            .prepared
            .take()
            .ok_or(MigrationError::NoPreparedMachine)?;
        let mut phases = PhaseLog::starting_at(stopped_at_ns);
        phases.mark("stop, save and send state");
        let host_fds = self
            .incoming_transfer
            .as_mut()
            .map(IncomingTransfer::take_device_fds)
            .unwrap_or_default();
        let source = Source::Restore {
            state: &file.state,
            host_fds,
        };
        let (machine, rx) = prepared.start(source, Some(&mut phases))?;
        self.install_machine(machine, rx)
            .map_err(MigrationError::io("watching the machine"))?;
        let _ = stream.set_nonblocking(false);
        transfer::send(stream, Kind::Commit, &[], &[])?;
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
    pub(crate) fn fail_transfer_in(&mut self, reason: &str, stream: Option<&UnixStream>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_carries_ram_that_maps_on_the_other_side() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = GuestRam::create(16 << 20, false, false).unwrap();
        ram.memory()
            .write_obj(0xabu8, GuestAddress(0x3000))
            .unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_hello(&a, &ram, &[], 1).unwrap();
        let (hello, fds) = receive_hello(&b).unwrap();
        assert_eq!(hello.fds.len(), 1);
        let mut incoming = IncomingTransfer {
            hello,
            ram: fds,
            cpr_stream: None,
        };
        let copy = take_ram(&mut incoming, &ram.layouts(), None).unwrap();
        let v: u8 = copy.memory().read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!(v, 0xab);
    }

    #[test]
    fn device_host_fds_travel_with_ram_and_come_back_by_name() {
        use std::io::{Read, Seek, Write};
        let ram = GuestRam::create(16 << 20, false, false).unwrap();
        let mut disk = tempfile_with(b"disk contents");
        let host = HostFd {
            name: "drive0".into(),
            fd: disk.as_raw_fd(),
        };
        let (a, b) = UnixStream::pair().unwrap();
        send_hello(&a, &ram, std::slice::from_ref(&host), 1).unwrap();
        let (hello, fds) = receive_hello(&b).unwrap();
        assert_eq!(hello.fds.len(), 2);
        let mut incoming = IncomingTransfer {
            hello,
            ram: fds,
            cpr_stream: None,
        };
        // RAM is taken first on the new side; the disk must still be there after it.
        assert!(take_ram(&mut incoming, &ram.layouts(), None).is_ok());
        let mut devices = incoming.take_device_fds();
        assert_eq!(devices.names(), vec!["drive0".to_string()]);
        // The very same open file, not a re-opened path: writes through one show in the other.
        let mut received = std::fs::File::from(devices.take("drive0").unwrap());
        disk.write_all(b"!").unwrap();
        let mut s = String::new();
        received.rewind().unwrap();
        received.read_to_string(&mut s).unwrap();
        assert_eq!(s, "disk contents!");
    }

    fn tempfile_with(bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("cpr-xfer-test-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn wrong_size_and_missing_regions_are_refused() {
        let ram = GuestRam::create(16 << 20, false, false).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_hello(&a, &ram, &[], 1).unwrap();
        let (hello, fds) = receive_hello(&b).unwrap();
        let mut incoming = IncomingTransfer {
            hello,
            ram: fds,
            cpr_stream: None,
        };
        let bigger = crate::memory::layout(32 << 20);
        assert!(matches!(
            take_ram(&mut incoming, &bigger, None),
            Err(CprTransferError::RegionSize { .. })
        ));
        let two = crate::memory::layout(5 << 30);
        assert!(take_ram(&mut incoming, &two, None).is_err());
    }

    #[test]
    fn a_ram_file_travels_as_one_fd_with_its_path_and_is_mapped_in_place() {
        use vm_memory::{Bytes, GuestAddress};
        let dir = std::env::temp_dir().join(format!("cpr-xfer-ramfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("guest.ram");
        let _ = std::fs::remove_file(&path);
        let shared = memory::FileRamOptions {
            share: true,
            prealloc: false,
        };
        let ram = GuestRam::open_file(&path, 16 << 20, shared).unwrap();
        ram.memory()
            .write_obj(0xcdu8, GuestAddress(0x5000))
            .unwrap();
        let receive = || {
            let (a, b) = UnixStream::pair().unwrap();
            send_hello(&a, &ram, &[], 1).unwrap();
            let (hello, fds) = receive_hello(&b).unwrap();
            IncomingTransfer {
                hello,
                ram: fds,
                cpr_stream: None,
            }
        };
        let mut incoming = receive();
        assert_eq!(incoming.ram.len(), 1);
        assert_eq!(incoming.ram[0].0.kind, FdKind::GuestRamFile);
        let theirs = incoming.hello.ram_file.clone().unwrap();
        assert!(theirs.starts_with('/') && theirs.ends_with("guest.ram"));
        // The path is gone: only the fd can give the file now.
        let moved = dir.join("moved.ram");
        std::fs::rename(&path, &moved).unwrap();
        let layouts = ram.layouts();
        let copy = take_ram(&mut incoming, &layouts, Some(&path)).unwrap();
        let v: u8 = copy.memory().read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!(v, 0xcd);
        copy.memory()
            .write_obj(0xefu8, GuestAddress(0x5001))
            .unwrap();
        let v: u8 = ram.memory().read_obj(GuestAddress(0x5001)).unwrap();
        assert_eq!(v, 0xef, "the same pages, not a copy");
        assert!(!path.exists(), "the path was opened again");
        // Another mem-path, another size, no file or memfds on this side: refused.
        let other = dir.join("other.ram");
        let e = take_ram(&mut receive(), &layouts, Some(&other)).unwrap_err();
        assert!(
            matches!(e, CprTransferError::RamFileOtherPath { .. }),
            "{e}"
        );
        let bigger = memory::layout(32 << 20);
        let e = take_ram(&mut receive(), &bigger, Some(&path)).unwrap_err();
        assert!(matches!(e, CprTransferError::RamFileSize { .. }), "{e}");
        let e = take_ram(&mut receive(), &layouts, None).unwrap_err();
        assert!(e.to_string().contains(&theirs), "{e}");
        let memfd = GuestRam::create(16 << 20, false, false).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_hello(&a, &memfd, &[], 1).unwrap();
        let (hello, fds) = receive_hello(&b).unwrap();
        assert_eq!(hello.ram_file, None);
        let mut incoming = IncomingTransfer {
            hello,
            ram: fds,
            cpr_stream: None,
        };
        let e = take_ram(&mut incoming, &layouts, Some(&path)).unwrap_err();
        assert!(matches!(e, CprTransferError::RamFileNotSent { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_payload_round_trips() {
        let p = state_payload(42, b"state");
        assert_eq!(split_state_payload(p).unwrap(), (42, b"state".to_vec()));
        assert!(split_state_payload(vec![1, 2]).is_err());
    }
}
