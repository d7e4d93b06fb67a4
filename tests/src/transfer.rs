//! Helpers for the cpr-transfer tests and benchmark.
//!
//! cpr-transfer moves a guest between two separately started VMMs on one host. The new VMM
//! is started first and listens on a CPR channel and a main channel (UNIX sockets); the old
//! one, told `migrate-set-parameters {"mode": "cpr-transfer"}` and `migrate` with both
//! channels, passes its guest-RAM memfds over the CPR channel (SCM_RIGHTS) and the machine
//! state over the main channel. The wire protocol is [`cpr_common::transfer`].
//!
//! This module has:
//! - the command-line and QMP spellings ([`cpr_channel_arg`], [`migrate_channels`]) and a
//!   new side started the way an operator would ([`Target`]);
//! - stand-ins speaking the protocol from the test, to feed a real VMM what a broken peer
//!   would send: a fake new side ([`FakeNewSide`]), and for a fake old side [`ram_memfd`],
//!   [`ram_record`], [`frame_bytes`], [`connect_within`];
//! - a relay on the main channel between the old VMM and a real new one ([`MainRelay`]), so a
//!   test can kill the new VMM at an exact step of the hand-over;
//! - processes of another UID for the SO_PEERCRED checks ([`connect_as`],
//!   [`ForeignListener`]).
//!
//! Every file descriptor made here is close-on-exec, and forked helpers close everything but
//! what they use, so nothing leaks into VMMs that concurrently running tests start.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use cpr_common::cpr::{FdKind, PreservedFd};
use cpr_common::transfer::{self, Frame, Hello, Kind, TransferError};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use serde_json::{Value, json};

use crate::process::{TimeoutError, VmmProcess};
use crate::qmp::{QmpClient, QmpError, qmp_socket_arg};

pub use cpr_common::transfer::{HEADER_LEN, MAX_PAYLOAD, VERSION};

/// The memfd name of guest RAM below the PCI hole (the only region of a small VM).
pub const LOW_RAM_REGION: &str = "guest-ram-low";

/// How often waits that cannot block on something re-check their condition.
const POLL: Duration = Duration::from_millis(2);

// ---------------------------------------------------------------------------
// spellings

/// `-incoming` value for the CPR channel in QEMU's key=value spelling.
pub fn cpr_channel_arg(path: &Path) -> String {
    format!(
        "cpr,addr.transport=socket,addr.type=unix,addr.path={}",
        path.display()
    )
}

/// `-incoming` value for the CPR channel in QEMU's JSON spelling.
pub fn cpr_channel_json(path: &Path) -> String {
    unix_channel("cpr", path).to_string()
}

/// A `MigrationChannel` of `channel_type` (`main` or `cpr`) on the UNIX socket `path`.
pub fn unix_channel(channel_type: &str, path: &Path) -> Value {
    json!({
        "channel-type": channel_type,
        "addr": {"transport": "socket", "type": "unix", "path": path.display().to_string()},
    })
}

/// The arguments of `migrate` for a cpr-transfer: main and cpr channels.
pub fn migrate_channels(main: &Path, cpr: &Path) -> Value {
    json!({"channels": [unix_channel("main", main), unix_channel("cpr", cpr)]})
}

/// `migrate-set-parameters {"mode": "cpr-transfer"}`.
pub fn set_cpr_transfer_mode(qmp: &mut QmpClient) -> Result<(), QmpError> {
    qmp.execute("migrate-set-parameters", json!({"mode": "cpr-transfer"}))
        .map(drop)
}

/// Sets mode cpr-transfer and starts `migrate` over `main` and `cpr`; returns its reply.
pub fn migrate_cpr_transfer(
    qmp: &mut QmpClient,
    main: &Path,
    cpr: &Path,
) -> Result<Value, QmpError> {
    set_cpr_transfer_mode(qmp)?;
    qmp.execute("migrate", migrate_channels(main, cpr))
}

/// Waits for `MIGRATION` events until one says the migration ended (`completed`, `failed`
/// or `cancelled`); returns every status seen, in order.
pub fn wait_migration_end(qmp: &mut QmpClient, timeout: Duration) -> Result<Vec<String>, QmpError> {
    let deadline = Instant::now() + timeout;
    let mut statuses = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = qmp.wait_event("MIGRATION", left)?;
        let status = event["data"]["status"]
            .as_str()
            .unwrap_or("<none>")
            .to_string();
        statuses.push(status.clone());
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return Ok(statuses);
        }
    }
}

/// Collects events in the order they arrived until `done` holds for one of them (which is
/// included), or fails after `timeout` with the events seen so far.
pub fn collect_events_until(
    qmp: &mut QmpClient,
    timeout: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Result<Vec<Value>, String> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    loop {
        for event in qmp.events() {
            let finished = done(&event);
            events.push(event);
            if finished {
                return Ok(events);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the awaited event did not arrive within {timeout:?}; events: {events:?}"
            ));
        }
        thread::sleep(POLL);
    }
}

/// Whether `event` is a `MIGRATION` event ending a migration.
pub fn is_migration_end(event: &Value) -> bool {
    event["event"] == "MIGRATION"
        && matches!(
            event["data"]["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
}

// ---------------------------------------------------------------------------
// the new side, started as an operator would

/// How the new side gets its main channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MainChannel {
    /// `-incoming unix:PATH`.
    Unix,
    /// `-incoming defer`, then `migrate-incoming`.
    Defer,
}

/// Which spelling of the CPR channel the new side's command line uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CprSpelling {
    /// `cpr,addr.transport=socket,addr.type=unix,addr.path=PATH`.
    KeyValue,
    /// `{"channel-type":"cpr","addr":{...}}`.
    Json,
}

/// A new VMM waiting for a cpr-transfer, with its sockets `DIR/NAME.qmp`, `.main`, `.cpr`.
pub struct Target {
    pub vmm: VmmProcess,
    pub qmp_path: PathBuf,
    pub main_path: PathBuf,
    pub cpr_path: PathBuf,
}

impl Target {
    /// The socket paths of a target called `name` in `dir`.
    pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join(format!("{name}.qmp")),
            dir.join(format!("{name}.main")),
            dir.join(format!("{name}.cpr")),
        )
    }

    /// The whole command line of a target (after the program name).
    pub fn args(
        machine_args: &[String],
        qmp: &Path,
        main: Option<&Path>,
        cpr: &Path,
        spelling: CprSpelling,
    ) -> Vec<String> {
        let mut args = machine_args.to_vec();
        args.push("-qmp".into());
        args.push(qmp_socket_arg(qmp));
        args.push("-incoming".into());
        args.push(match main {
            Some(path) => format!("unix:{}", path.display()),
            None => "defer".into(),
        });
        args.push("-incoming".into());
        args.push(match spelling {
            CprSpelling::KeyValue => cpr_channel_arg(cpr),
            CprSpelling::Json => cpr_channel_json(cpr),
        });
        args
    }

    /// Starts `vmm MACHINE_ARGS -qmp ... -incoming MAIN -incoming CPR` and waits until it
    /// listens on the CPR channel. The socket file appears at bind(2), a moment before
    /// listen(2): an old VMM sent there in between would be refused, so this waits for the
    /// listening socket itself ([`is_listening`]), without connecting to it.
    pub fn start(
        dir: &Path,
        name: &str,
        machine_args: &[String],
        main: MainChannel,
        spelling: CprSpelling,
        timeout: Duration,
    ) -> Result<Self, TimeoutError> {
        let (qmp_path, main_path, cpr_path) = Self::paths(dir, name);
        let main_arg = (main == MainChannel::Unix).then_some(main_path.as_path());
        let args = Self::args(machine_args, &qmp_path, main_arg, &cpr_path, spelling);
        let vmm = VmmProcess::start_vmm(&args);
        let start = Instant::now();
        vmm.wait_for_path(&cpr_path, timeout)?;
        while !is_listening(&cpr_path) {
            let exited = vmm.try_wait();
            if exited.is_some() || start.elapsed() >= timeout {
                return Err(TimeoutError {
                    what: format!("the new VMM to listen on {}", cpr_path.display()),
                    waited: start.elapsed(),
                    stream_closed: false,
                    exit_status: exited,
                    stdout: vmm.stdout_text(),
                    stderr: vmm.stderr_text(),
                });
            }
            thread::sleep(POLL);
        }
        Ok(Target {
            vmm,
            qmp_path,
            main_path,
            cpr_path,
        })
    }

    /// Connects to the monitor, which exists once the old VMM's RAM has been taken.
    pub fn connect_qmp(&self, timeout: Duration) -> Result<QmpClient, String> {
        self.vmm
            .wait_for_path(&self.qmp_path, timeout)
            .map_err(|e| e.to_string())?;
        let mut qmp =
            QmpClient::connect_and_negotiate(&self.qmp_path, timeout).map_err(|e| e.to_string())?;
        qmp.set_timeout(timeout);
        Ok(qmp)
    }
}

// ---------------------------------------------------------------------------
// sockets and frames

/// Whether a socket listens at the UNIX socket path `path`, per /proc/net/unix (its
/// SO_ACCEPTCON flag), without connecting to it.
pub fn is_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let wanted = path.display().to_string();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == wanted
            && u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & SO_ACCEPTCON != 0)
    })
}

/// Accepts one connection on `listener` within `timeout`.
pub fn accept_within(listener: &UnixListener, timeout: Duration) -> io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nobody connected within {timeout:?}"),
                    ));
                }
                thread::sleep(POLL);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `path`, retrying while nothing listens there yet, for at most `timeout`.
pub fn connect_within(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
            {
                thread::sleep(POLL);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes `bytes` with `fds` attached to the first of them (SCM_RIGHTS), as a VMM sends HELLO.
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let mut sent = 0;
    if !fds.is_empty() {
        let iov = [io::IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
    }
    io::Write::write_all(&mut &*stream, &bytes[sent..])
}

/// Receives one frame, waiting at most `timeout` for each read.
pub fn recv_frame(stream: &UnixStream, timeout: Duration) -> Result<Frame, TransferError> {
    stream.set_read_timeout(Some(timeout))?;
    transfer::recv(stream)
}

/// Receives one frame that must be of `kind`; anything else is described in the error.
pub fn expect_frame(stream: &UnixStream, kind: Kind, timeout: Duration) -> Result<Frame, String> {
    match recv_frame(stream, timeout) {
        Ok(frame) if frame.kind == kind => Ok(frame),
        Ok(frame) => Err(format!(
            "expected {kind:?}, got {:?} ({} payload bytes)",
            frame.kind,
            frame.payload.len()
        )),
        Err(e) => Err(format!("expected {kind:?}: {e}")),
    }
}

/// Reads everything the peer sends until it closes the connection; fails if it is still
/// open after `timeout`.
pub fn read_until_closed(stream: &UnixStream, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the peer kept the connection open for {timeout:?} (received {} bytes)",
                    bytes.len()
                ),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match (&*stream).read(&mut buf) {
            Ok(0) => return Ok(bytes),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(bytes),
            Err(e) => return Err(e),
        }
    }
}

/// The bytes of a well-formed frame, exactly as [`transfer::send`] writes them (`payload`
/// must be small: it goes through a socket pair).
pub fn frame_bytes(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let (a, mut b) = UnixStream::pair().expect("socketpair");
    transfer::send(&a, kind, payload, &[]).expect("writing a frame to a socketpair");
    drop(a);
    let mut bytes = Vec::new();
    b.read_to_end(&mut bytes).expect("reading a socketpair");
    bytes
}

/// Decodes `bytes` as the protocol would: `Ok(None)` for nothing at all, the error message of
/// an ERROR frame as `Ok(Some(..))`, anything else as an `Err` describing it.
pub fn decode_error_frame(bytes: &[u8]) -> Result<Option<String>, String> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let (a, b) = UnixStream::pair().map_err(|e| e.to_string())?;
    io::Write::write_all(&mut &a, bytes).map_err(|e| e.to_string())?;
    drop(a);
    match transfer::recv(&b) {
        Err(TransferError::Remote(message)) => {
            let mut rest = Vec::new();
            (&b).read_to_end(&mut rest).map_err(|e| e.to_string())?;
            if rest.is_empty() {
                Ok(Some(message))
            } else {
                Err(format!(
                    "ERROR frame {message:?} followed by {} more bytes",
                    rest.len()
                ))
            }
        }
        Ok(frame) => Err(format!("got a {:?} frame, not ERROR", frame.kind)),
        Err(e) => Err(format!("not a frame: {e} ({bytes:02x?})")),
    }
}

// ---------------------------------------------------------------------------
// RAM memfds, for a fake old side

/// A memfd named `name` of `size` bytes, close-on-exec, sealed against shrinking and growing
/// like a VMM's guest RAM if `sealed`.
pub fn ram_memfd(name: &str, size: u64, sealed: bool) -> io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(io::Error::other)?;
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let file = std::fs::File::from(fd);
    file.set_len(size)?;
    let fd = OwnedFd::from(file);
    if sealed {
        // SAFETY: F_ADD_SEALS on an fd we own, with constant flags.
        let rc = unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// What the old VMM says about a guest-RAM fd in HELLO (common's own description of it).
pub fn ram_record(fd: &OwnedFd, name: &str) -> PreservedFd {
    use std::os::fd::AsFd;
    match cpr_common::fds::describe(fd.as_fd(), name, FdKind::GuestRam) {
        Ok(record) => record,
        Err(e) => panic!("describing fd {} as {name}: {e}", fd.as_raw_fd()),
    }
}

/// A HELLO frame's payload listing `records`.
pub fn hello_payload(records: Vec<PreservedFd>) -> Vec<u8> {
    transfer::encode_hello(&Hello {
        sender_version: "fake-old-side".into(),
        fds: records,
        started_ns: cpr_common::timing::monotonic_ns(),
        ram_file: None,
    })
    .expect("encoding HELLO")
}

/// Reads `len` bytes at `offset` of a file (a received RAM memfd).
pub fn read_at(fd: &OwnedFd, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd.try_clone()?);
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(bytes)
}

// ---------------------------------------------------------------------------
// a fake new side

/// A stand-in for the new VMM, speaking the protocol step by step so a test can misbehave
/// at any of them: take HELLO on the CPR channel, open the main channel, then send what the
/// test wants.
pub struct FakeNewSide {
    cpr_listener: UnixListener,
    main_path: PathBuf,
    /// The CPR connection, once accepted (dropped by [`FakeNewSide::open_main`]).
    pub cpr: Option<UnixStream>,
    /// The main connection, once accepted.
    pub main: Option<UnixStream>,
    /// The old VMM's HELLO.
    pub hello: Option<Hello>,
    /// The RAM memfds that came with HELLO.
    pub ram: Vec<OwnedFd>,
}

impl FakeNewSide {
    /// Listens on `cpr` now; `main` is listened on by [`FakeNewSide::open_main`].
    pub fn listen(cpr: &Path, main: &Path) -> io::Result<Self> {
        Ok(FakeNewSide {
            cpr_listener: UnixListener::bind(cpr)?,
            main_path: main.to_path_buf(),
            cpr: None,
            main: None,
            hello: None,
            ram: Vec::new(),
        })
    }

    /// Accepts the old VMM on the CPR channel, without reading anything.
    pub fn accept_cpr(&mut self, timeout: Duration) -> Result<&UnixStream, String> {
        let stream = accept_within(&self.cpr_listener, timeout)
            .map_err(|e| format!("accepting the CPR channel: {e}"))?;
        Ok(self.cpr.insert(stream))
    }

    /// Accepts the old VMM on the CPR channel and takes its HELLO and RAM memfds.
    pub fn take_hello(&mut self, timeout: Duration) -> Result<&Hello, String> {
        self.accept_cpr(timeout)?;
        let cpr = self.cpr.as_ref().expect("accepted");
        let frame = expect_frame(cpr, Kind::Hello, timeout)?;
        let hello = transfer::decode_hello(&frame.payload).map_err(|e| e.to_string())?;
        self.ram = frame.fds;
        Ok(self.hello.insert(hello))
    }

    /// What the new VMM does once its VM is built: listen on the main channel, close the
    /// CPR connection (telling the old VMM to connect), accept the old VMM on main.
    pub fn open_main(&mut self, timeout: Duration) -> Result<&UnixStream, String> {
        let listener = UnixListener::bind(&self.main_path)
            .map_err(|e| format!("binding {}: {e}", self.main_path.display()))?;
        self.cpr = None;
        let stream = accept_within(&listener, timeout)
            .map_err(|e| format!("accepting the main channel: {e}"))?;
        Ok(self.main.insert(stream))
    }

    /// The main connection.
    pub fn main(&self) -> &UnixStream {
        self.main.as_ref().expect("the main channel is open")
    }

    /// Sends a well-formed frame on the main channel.
    pub fn send(&self, kind: Kind, payload: &[u8]) -> Result<(), String> {
        transfer::send(self.main(), kind, payload, &[]).map_err(|e| e.to_string())
    }

    /// Writes raw bytes on the main channel.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), String> {
        io::Write::write_all(&mut self.main(), bytes).map_err(|e| e.to_string())
    }

    /// Sends READY and takes STATE (the old VMM has stopped the guest by then); returns the
    /// state payload (monotonic stop time, then the state-file bytes).
    pub fn ready_and_take_state(&self, timeout: Duration) -> Result<Vec<u8>, String> {
        self.send(Kind::Ready, &[])?;
        expect_frame(self.main(), Kind::State, timeout).map(|f| f.payload)
    }
}

// ---------------------------------------------------------------------------
// a relay on the main channel

/// Sits on the main channel between the old VMM (which is given the relay's path) and a real
/// new VMM (listening on `target`), passing frames on one at a time so that a test can act
/// between two steps of the hand-over, e.g. kill the new VMM.
pub struct MainRelay {
    listener: UnixListener,
    target: PathBuf,
}

/// The two legs of a relayed main channel.
pub struct RelayedMain {
    /// To the old VMM.
    pub old: UnixStream,
    /// To the new VMM.
    pub new: UnixStream,
}

impl MainRelay {
    pub fn listen(path: &Path, target: &Path) -> io::Result<Self> {
        Ok(MainRelay {
            listener: UnixListener::bind(path)?,
            target: target.to_path_buf(),
        })
    }

    /// Accepts the old VMM and connects to the new one.
    pub fn accept(&self, timeout: Duration) -> Result<RelayedMain, String> {
        let old = accept_within(&self.listener, timeout)
            .map_err(|e| format!("accepting the old VMM on the relay: {e}"))?;
        let new = connect_within(&self.target, timeout)
            .map_err(|e| format!("connecting to {}: {e}", self.target.display()))?;
        Ok(RelayedMain { old, new })
    }
}

impl RelayedMain {
    /// Takes a frame of `kind` from the new VMM without passing it on.
    pub fn take_from_new(&self, kind: Kind, timeout: Duration) -> Result<Frame, String> {
        expect_frame(&self.new, kind, timeout).map_err(|e| format!("from the new VMM: {e}"))
    }

    /// Takes a frame of `kind` from the old VMM without passing it on.
    pub fn take_from_old(&self, kind: Kind, timeout: Duration) -> Result<Frame, String> {
        expect_frame(&self.old, kind, timeout).map_err(|e| format!("from the old VMM: {e}"))
    }

    pub fn give_to_old(&self, frame: &Frame) -> Result<(), String> {
        transfer::send(&self.old, frame.kind, &frame.payload, &[]).map_err(|e| e.to_string())
    }

    pub fn give_to_new(&self, frame: &Frame) -> Result<(), String> {
        transfer::send(&self.new, frame.kind, &frame.payload, &[]).map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------------------
// peers of another UID

/// `sockaddr_un` for `path`.
fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long: {}", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// In a forked child: closes every fd but `keep`. Async-signal-safe (system calls only).
fn close_all_but(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut first: libc::c_uint = 0;
    for &fd in keep.iter() {
        let fd = fd as libc::c_uint;
        if fd > first {
            // SAFETY: closing fds in this single-threaded child; nothing here uses them.
            unsafe { libc::close_range(first, fd - 1, 0) };
        }
        first = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::close_range(first, libc::c_uint::MAX, 0) };
}

/// In a forked child: becomes `uid`/`gid` with no supplementary groups. Returns 0 or the step
/// that failed. Raw system calls: glibc's wrappers would try to synchronise the credentials of
/// threads the parent had, which the child does not have.
fn become_user(uid: u32, gid: u32) -> i32 {
    // SAFETY: plain system calls with no pointers (setgroups with an empty list).
    unsafe {
        if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0 {
            return 2;
        }
        if libc::syscall(libc::SYS_setgid, gid) != 0 {
            return 3;
        }
        if libc::syscall(libc::SYS_setuid, uid) != 0 {
            return 4;
        }
    }
    0
}

fn wait_child(child: Pid) -> io::Result<i32> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn child_step(code: i32) -> &'static str {
    match code {
        2 => "setgroups",
        3 => "setgid",
        4 => "setuid",
        5 => "connect",
        6 => "read (the server kept the connection open without closing it)",
        7 => "listen",
        _ => "an unknown step",
    }
}

/// Connects to the UNIX socket at `path` from a forked child running as `uid`/`gid`, and
/// returns everything the server sent until it closed the connection. Fails if the child
/// could not connect, or the server kept the connection open for `timeout`.
///
/// The socket file must be writable by `uid` (connect(2) needs write permission).
pub fn connect_as(path: &Path, uid: u32, gid: u32, timeout: Duration) -> io::Result<Vec<u8>> {
    let sock = unix_socket()?;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt on our socket with a valid timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let (addr, addr_len) = unix_addr(path)?;
    let (rd, wr) = cloexec_pipe()?;
    let (sock_fd, wr_fd) = (sock.as_raw_fd(), wr.as_raw_fd());
    // The child uses memory prepared before the fork (no allocation, no locks), then _exits.
    // SAFETY: the child makes only async-signal-safe system calls.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Child => {
            close_all_but(&mut [sock_fd, wr_fd]);
            let mut code = become_user(uid, gid);
            if code == 0 {
                // SAFETY: connect with the sockaddr_un prepared above and its length.
                let rc = unsafe {
                    libc::connect(
                        sock_fd,
                        (&addr as *const libc::sockaddr_un).cast(),
                        addr_len,
                    )
                };
                if rc != 0 {
                    code = 5;
                }
            }
            if code == 0 {
                let mut buf = [0u8; 4096];
                loop {
                    // SAFETY: read into a stack buffer of the length given.
                    let n = unsafe { libc::read(sock_fd, buf.as_mut_ptr().cast(), buf.len()) };
                    if n == 0 {
                        break;
                    }
                    if n < 0 {
                        code = 6;
                        break;
                    }
                    // SAFETY: write the bytes just read to the pipe.
                    unsafe { libc::write(wr_fd, buf.as_ptr().cast(), n as usize) };
                }
            }
            // SAFETY: ends the child without running any of the parent's cleanup.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            drop(sock);
            let mut received = Vec::new();
            let read = std::fs::File::from(rd).read_to_end(&mut received);
            let code = wait_child(child)?;
            read?;
            if code != 0 {
                return Err(io::Error::other(format!(
                    "the child running as uid {uid} failed at {} (status {code}); received {received:02x?}",
                    child_step(code)
                )));
            }
            Ok(received)
        }
    }
}

/// A socket bound at a path by this (root) process and listened on by a child running as
/// another UID: what connects to it sees a peer (SO_PEERCRED) of that UID. Nothing accepts;
/// connections wait in the backlog. The child ends when this is dropped.
pub struct ForeignListener {
    child: Pid,
    release: Option<OwnedFd>,
}

impl ForeignListener {
    pub fn start(path: &Path, uid: u32, gid: u32) -> io::Result<Self> {
        let sock = unix_socket()?;
        let (addr, addr_len) = unix_addr(path)?;
        // SAFETY: bind with the sockaddr_un prepared above and its length.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                addr_len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let (ready_rd, ready_wr) = cloexec_pipe()?;
        let (release_rd, release_wr) = cloexec_pipe()?;
        let fds = [
            sock.as_raw_fd(),
            ready_wr.as_raw_fd(),
            release_rd.as_raw_fd(),
        ];
        // SAFETY: as in `connect_as`: only system calls on prepared memory, then _exit.
        match unsafe { fork() }.map_err(io::Error::from)? {
            ForkResult::Child => {
                let mut keep = fds;
                close_all_but(&mut keep);
                let [sock_fd, ready_fd, release_fd] = fds;
                let mut code = become_user(uid, gid);
                // SAFETY: listen on the bound socket.
                if code == 0 && unsafe { libc::listen(sock_fd, 16) } != 0 {
                    code = 7;
                }
                let byte = code as u8;
                // The blocking read returns at EOF (the parent dropped its end).
                // SAFETY: one byte from a stack variable to the pipe, then a read into one.
                unsafe {
                    libc::write(ready_fd, (&byte as *const u8).cast(), 1);
                    let mut buf = 0u8;
                    libc::read(release_fd, (&mut buf as *mut u8).cast(), 1);
                    libc::_exit(code)
                }
            }
            ForkResult::Parent { child } => {
                drop((sock, ready_wr, release_rd));
                let mut byte = [0xffu8];
                let this = ForeignListener {
                    child,
                    release: Some(release_wr),
                };
                std::fs::File::from(ready_rd).read_exact(&mut byte)?;
                if byte[0] != 0 {
                    return Err(io::Error::other(format!(
                        "the child running as uid {uid} failed at {}",
                        child_step(i32::from(byte[0]))
                    )));
                }
                Ok(this)
            }
        }
    }
}

impl Drop for ForeignListener {
    fn drop(&mut self) {
        self.release.take();
        let _ = kill(self.child, Signal::SIGKILL);
        let _ = wait_child(self.child);
    }
}

/// Starts a new side called `name` in `dir` (`-incoming unix:MAIN`, the CPR channel in
/// key=value form) with `machine_args`, then asks the old VMM behind `old` to hand its guest
/// over (its earlier events are dropped, so that what `migrate` brings can be checked).
pub fn start_transfer_to(
    dir: &Path,
    name: &str,
    machine_args: &[String],
    old: &mut QmpClient,
    timeout: Duration,
) -> Target {
    let target = Target::start(
        dir,
        name,
        machine_args,
        MainChannel::Unix,
        CprSpelling::KeyValue,
        timeout,
    )
    .unwrap_or_else(|e| panic!("starting the new VMM {name}: {e}"));
    let _ = old.events();
    migrate_cpr_transfer(old, &target.main_path, &target.cpr_path)
        .unwrap_or_else(|e| panic!("migrate to {name}: {e}"));
    target
}

/// Guest RAM in the file `ram` as operators write it: `-object memory-backend-file,id=pc.ram,
/// size=SIZE,mem-path=RAM,share=on -machine pc,memory-backend=pc.ram`.
pub fn memory_backend_file(ram: &Path, size: &str) -> Vec<String> {
    vec![
        "-object".into(),
        format!(
            "memory-backend-file,id=pc.ram,size={size},mem-path={},share=on",
            ram.display()
        ),
        "-machine".into(),
        "pc,memory-backend=pc.ram".into(),
    ]
}

/// The lines of /proc/PID/maps that map the file with inode `ino` (whatever its name is now):
/// how a test sees which process maps a RAM file, and that it is the very same file.
pub fn mappings_of_inode(pid: u32, ino: u64) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .and_then(|i| i.parse::<u64>().ok())
                == Some(ino)
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tempdir::TempDir;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn spellings_are_qemus() {
        let p = Path::new("/run/x.cpr");
        assert_eq!(
            cpr_channel_arg(p),
            "cpr,addr.transport=socket,addr.type=unix,addr.path=/run/x.cpr"
        );
        let v: Value = serde_json::from_str(&cpr_channel_json(p)).unwrap();
        assert_eq!(v["channel-type"], "cpr");
        assert_eq!(v["addr"]["path"], "/run/x.cpr");
        let m = migrate_channels(Path::new("/m"), p);
        assert_eq!(m["channels"][0]["channel-type"], "main");
        assert_eq!(m["channels"][1]["addr"]["type"], "unix");
    }

    #[test]
    fn listening_sockets_are_recognised_without_connecting() {
        let dir = TempDir::new("xfli").unwrap();
        let path = dir.join("s");
        assert!(!is_listening(&path));
        let listener = UnixListener::bind(&path).unwrap();
        assert!(is_listening(&path));
        drop(listener);
        assert!(!is_listening(&path));
        // Bound but not listening: the window in which a connect is refused.
        let sock = unix_socket().unwrap();
        let (addr, len) = unix_addr(&dir.join("b")).unwrap();
        // SAFETY: bind with a prepared sockaddr_un and its length.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        assert_eq!(rc, 0);
        assert!(dir.join("b").exists() && !is_listening(&dir.join("b")));
    }

    #[test]
    fn frames_decode_and_errors_are_recognised() {
        let bytes = frame_bytes(Kind::Error, b"no room");
        assert_eq!(&bytes[..4], b"CPRX");
        assert_eq!(bytes.len(), HEADER_LEN + 7);
        assert_eq!(decode_error_frame(&bytes), Ok(Some("no room".into())));
        assert_eq!(decode_error_frame(&[]), Ok(None));
        assert!(decode_error_frame(&frame_bytes(Kind::Ready, b"")).is_err());
        assert!(decode_error_frame(b"garbage garbage!").is_err());
    }

    #[test]
    fn ram_memfds_pass_commons_checks() {
        let fd = ram_memfd(LOW_RAM_REGION, 1 << 20, true).unwrap();
        let record = ram_record(&fd, LOW_RAM_REGION);
        assert_eq!(record.size, 1 << 20);
        cpr_common::fds::check_preserved(&record).unwrap();
        assert_eq!(read_at(&fd, 4096, 4).unwrap(), [0; 4]);
        let unsealed = ram_memfd(LOW_RAM_REGION, 1 << 20, false).unwrap();
        assert!(cpr_common::fds::check_preserved(&ram_record(&unsealed, LOW_RAM_REGION)).is_err());
    }

    #[test]
    fn a_fake_new_side_takes_hello_and_opens_main() {
        let dir = TempDir::new("xfl").unwrap();
        let (cpr, main) = (dir.join("c"), dir.join("m"));
        let mut fake = FakeNewSide::listen(&cpr, &main).unwrap();
        let old = thread::spawn({
            let (cpr, main) = (cpr.clone(), main.clone());
            move || {
                let ram = ram_memfd(LOW_RAM_REGION, 1 << 20, true).unwrap();
                let stream = connect_within(&cpr, T).unwrap();
                let payload = hello_payload(vec![ram_record(&ram, LOW_RAM_REGION)]);
                transfer::send(&stream, Kind::Hello, &payload, &[ram.as_raw_fd()]).unwrap();
                assert!(read_until_closed(&stream, T).unwrap().is_empty());
                let main = connect_within(&main, T).unwrap();
                expect_frame(&main, Kind::Ready, T).unwrap();
                transfer::send(&main, Kind::State, b"12345678state", &[]).unwrap();
            }
        });
        let hello = fake.take_hello(T).unwrap();
        assert_eq!(hello.fds[0].name, LOW_RAM_REGION);
        assert_eq!(fake.ram.len(), 1);
        fake.open_main(T).unwrap();
        assert_eq!(fake.ready_and_take_state(T).unwrap(), b"12345678state");
        old.join().unwrap();
    }

    #[test]
    fn a_relay_passes_frames_on() {
        let dir = TempDir::new("xfr").unwrap();
        let (front, back) = (dir.join("f"), dir.join("b"));
        let new_side = UnixListener::bind(&back).unwrap();
        let relay = MainRelay::listen(&front, &back).unwrap();
        let old = thread::spawn(move || {
            let s = connect_within(&front, T).unwrap();
            expect_frame(&s, Kind::Ready, T).unwrap();
            transfer::send(&s, Kind::State, b"st", &[]).unwrap();
        });
        let relayed = relay.accept(T).unwrap();
        let new = accept_within(&new_side, T).unwrap();
        transfer::send(&new, Kind::Ready, &[], &[]).unwrap();
        let ready = relayed.take_from_new(Kind::Ready, T).unwrap();
        relayed.give_to_old(&ready).unwrap();
        let state = relayed.take_from_old(Kind::State, T).unwrap();
        relayed.give_to_new(&state).unwrap();
        assert_eq!(expect_frame(&new, Kind::State, T).unwrap().payload, b"st");
        old.join().unwrap();
    }

    #[test]
    fn peers_of_another_uid_are_seen_as_such() {
        if !crate::prereq::require_root(
            "transfer::peers_of_another_uid_are_seen_as_such",
            "switching to another UID",
        ) {
            return;
        }
        let dir = TempDir::new("xfu").unwrap();
        // A server that reports the peer's UID and closes.
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let server = thread::spawn(move || {
            let s = accept_within(&listener, T).unwrap();
            let creds =
                nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
                    .unwrap();
            io::Write::write_all(&mut &s, creds.uid().to_string().as_bytes()).unwrap();
        });
        let got = connect_as(&path, 65534, 65534, T).unwrap();
        assert_eq!(got, b"65534");
        server.join().unwrap();

        let foreign = dir.join("f");
        let listener = ForeignListener::start(&foreign, 65534, 65534).unwrap();
        let s = UnixStream::connect(&foreign).unwrap();
        let creds =
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).unwrap();
        assert_eq!(creds.uid(), 65534);
        drop(listener);
    }
}
