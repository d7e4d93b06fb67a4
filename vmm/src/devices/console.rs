//! The serial console's connection to the outside world (`-serial`): where guest output goes and
//! where typed input comes from.
//!
//! - `stdio`: output to fd 1, input from fd 0 (both simply inherited across an exec);
//! - `file:PATH`: output appended to a file;
//! - `unix:PATH,server`: a listening socket; one client at a time sees the output from the moment
//!   it connects and can type; further clients are turned away;
//! - `null`: output dropped.
//!
//! Output is written synchronously, byte order preserved, from the vCPU thread that emulates the
//! UART, so nothing is lost or reordered, including across a live update (the file, listener
//! and client fds are preserved; see [`Console::preserved_fds`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpr_common::cpr::FdKind;

use super::lock;
use crate::cli::SerialSpec;

/// A slow console client may hold up guest output for at most this long per write before it is
/// disconnected (the guest must not stall on a reader that went away).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("opening serial output file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("serial socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where output goes. Shared between the UART (vCPU threads) and the VMM thread, which
/// connects and disconnects socket clients.
enum Sink {
    Stdout,
    File(File),
    Socket(Option<UnixStream>),
    Null,
}

/// The UART's output writer.
#[derive(Clone)]
pub struct ConsoleOutput {
    sink: Arc<Mutex<Sink>>,
}

#[cfg(test)]
impl ConsoleOutput {
    /// Output written to `file` (a pipe, in tests that read the guest's output back).
    pub fn to_file(file: File) -> Self {
        ConsoleOutput {
            sink: Arc::new(Mutex::new(Sink::File(file))),
        }
    }
}

/// Output that has nowhere to go (stdout closed, disk full) is dropped like a UART with nothing
/// attached, and said once: the guest must not stall or flood the log over it.
fn drop_output(result: io::Result<usize>, len: usize, what: &str) -> io::Result<usize> {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match result {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
        Err(e) => {
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                log::warn!("serial: guest output to {what} is being dropped: {e}");
            }
            Ok(len)
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut sink = lock(&self.sink);
        match &mut *sink {
            Sink::Stdout => drop_output(write_fd(1, buf), buf.len(), "stdout"),
            Sink::File(f) => drop_output(f.write(buf), buf.len(), "the output file"),
            Sink::Socket(client) => {
                if let Some(stream) = client
                    && let Err(e) = stream.write_all(buf)
                {
                    log::info!("serial console client disconnected: {e}");
                    *client = None;
                }
                // Without a client, output is dropped, like a UART with nothing attached.
                Ok(buf.len())
            }
            Sink::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes to a raw fd without std's buffering (stdout may be shared with an exec'd successor,
/// so nothing may linger in a userspace buffer).
fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable slice for its length; write(2) does not retain it.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// What the VMM thread must watch for this console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleFd {
    Listener(RawFd),
    Input(RawFd),
}

pub struct Console {
    spec: SerialSpec,
    sink: Arc<Mutex<Sink>>,
    listener: Option<UnixListener>,
    /// stdin for `stdio` (None once it reached end of file).
    stdin_open: bool,
}

impl Console {
    /// Opens the console described by `spec`. Preserved fds (from the previous process) are used
    /// instead of opening anew when they match the spec.
    pub fn open(
        spec: &SerialSpec,
        mut inherited: impl FnMut(FdKind, &str) -> Option<OwnedFd>,
    ) -> Result<Self, ConsoleError> {
        let name = spec_name(spec);
        let mut listener = None;
        let sink = match spec {
            SerialSpec::Stdio => Sink::Stdout,
            SerialSpec::Null => Sink::Null,
            SerialSpec::File(path) => match inherited(FdKind::ConsoleFile, &name) {
                Some(fd) => Sink::File(File::from(fd)),
                None => Sink::File(open_output_file(path)?),
            },
            SerialSpec::UnixServer(path) => {
                let l = match inherited(FdKind::ConsoleListener, &name) {
                    Some(fd) => UnixListener::from(fd),
                    None => crate::unix_socket::bind_listener(path).map_err(|source| {
                        ConsoleError::Bind {
                            path: path.clone(),
                            source,
                        }
                    })?,
                };
                // Non-blocking: the VMM thread accepts when poll says a client waits.
                let _ = l.set_nonblocking(true);
                listener = Some(l);
                let client =
                    inherited(FdKind::ConsoleClient, &client_name(&name)).map(UnixStream::from);
                if let Some(c) = &client {
                    prepare_client(c);
                }
                Sink::Socket(client)
            }
        };
        Ok(Console {
            spec: spec.clone(),
            sink: Arc::new(Mutex::new(sink)),
            listener,
            stdin_open: matches!(spec, SerialSpec::Stdio),
        })
    }

    pub fn output(&self) -> ConsoleOutput {
        ConsoleOutput {
            sink: self.sink.clone(),
        }
    }

    /// The fds the VMM thread polls: the listener, and the input source if there is one.
    pub fn poll_fds(&self) -> Vec<ConsoleFd> {
        let mut fds = Vec::new();
        if let Some(l) = &self.listener {
            fds.push(ConsoleFd::Listener(l.as_raw_fd()));
        }
        if let Some(fd) = self.input_fd() {
            fds.push(ConsoleFd::Input(fd));
        }
        fds
    }

    fn input_fd(&self) -> Option<RawFd> {
        match &*lock(&self.sink) {
            Sink::Stdout if self.stdin_open => Some(0),
            Sink::Socket(Some(c)) => Some(c.as_raw_fd()),
            _ => None,
        }
    }

    /// Accepts a waiting client. Returns the new client's fd if it became the console client.
    pub fn accept(&mut self) -> Option<RawFd> {
        let listener = self.listener.as_ref()?;
        let stream = match crate::unix_socket::accept(listener) {
            Ok(stream) => stream?,
            Err(e) => {
                log::warn!("serial console: accept failed: {e}");
                return None;
            }
        };
        let mut sink = lock(&self.sink);
        if let Sink::Socket(client) = &mut *sink {
            if client.is_some() {
                log::info!("serial console already has a client; refusing another");
                return None;
            }
            prepare_client(&stream);
            let fd = stream.as_raw_fd();
            *client = Some(stream);
            return Some(fd);
        }
        None
    }

    /// Reads typed input. `Ok(0)` means the source is gone (EOF or disconnect).
    pub fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut sink = lock(&self.sink);
        let result = match &mut *sink {
            // Unbuffered, straight from fd 0: only what poll said is there.
            Sink::Stdout if self.stdin_open => {
                nix::unistd::read(io::stdin().as_fd(), buf).map_err(io::Error::from)
            }
            // The socket stays blocking for writes; this read must not block the VMM thread.
            Sink::Socket(Some(c)) => crate::unix_socket::recv_nonblocking(c, buf),
            _ => Ok(0),
        };
        match result {
            Ok(0) => {
                match &mut *sink {
                    Sink::Socket(client) => *client = None,
                    _ => self.stdin_open = false,
                }
                Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => {
                if let Sink::Socket(client) = &mut *sink {
                    *client = None;
                } else {
                    self.stdin_open = false;
                }
                Err(e)
            }
            ok => ok,
        }
    }

    /// The fds that must survive a live update, with their kinds and names.
    pub fn preserved_fds(&self) -> Vec<(FdKind, String, RawFd)> {
        let name = spec_name(&self.spec);
        let mut out = Vec::new();
        if let Some(l) = &self.listener {
            out.push((FdKind::ConsoleListener, name.clone(), l.as_raw_fd()));
        }
        match &*lock(&self.sink) {
            Sink::File(f) => out.push((FdKind::ConsoleFile, name, f.as_raw_fd())),
            Sink::Socket(Some(c)) => out.push((
                FdKind::ConsoleClient,
                client_name(&name),
                c.as_fd().as_raw_fd(),
            )),
            _ => {}
        }
        out
    }
}

/// The connected client is preserved under its own name, beside the listener.
fn client_name(spec_name: &str) -> String {
    format!("{spec_name}#client")
}

/// The name under which this console's fds are preserved: the spec itself, so that a
/// successor with a different `-serial` does not pick up the wrong fds.
fn spec_name(spec: &SerialSpec) -> String {
    match spec {
        SerialSpec::Stdio => "serial:stdio".into(),
        SerialSpec::Null => "serial:null".into(),
        SerialSpec::File(p) => format!("serial:file:{}", p.display()),
        SerialSpec::UnixServer(p) => format!("serial:unix:{}", p.display()),
    }
}

fn open_output_file(path: &Path) -> Result<File, ConsoleError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| ConsoleError::File {
            path: path.to_path_buf(),
            source,
        })
}

fn prepare_client(stream: &UnixStream) {
    // Blocking writes with a timeout keep output ordered without letting a stuck client stall
    // the guest forever; reads are non-blocking, driven by the VMM thread's poll loop.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
}
