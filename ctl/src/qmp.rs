//! A small blocking QMP client: one connection to one VMM's monitor.
//!
//! The connection survives a live update (the VMM keeps the socket across its execs), so the
//! client that sent `migrate` reads the update's `MIGRATION` event on the same connection.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long a VMM may take to greet a new client.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an ordinary command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest message accepted from a monitor (a VMM's largest reply is far smaller).
const MAX_LINE: usize = 4 << 20;
/// Set by a VMM during a live update in the environment of the program it executes.
const CPR_STATE_ENV: &str = "VMM_CPR_EXEC_STATE=";
/// The first argument of the rescue guard a VMM starts for the length of a live update
/// (`vmm/src/migration/rescue.rs`).
const GUARD_ARG: &str = "--cpr-rescue-guard";

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error(
        "{path}: nothing listens on this socket any more (stale socket: the VMM has exited); remove it or leave it out"
    )]
    Stale { path: PathBuf },
    #[error("{path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: the VMM (pid {pid}) is in the middle of a live update (its monitor does not answer yet); wait for it to end and try again"
    )]
    InUpdate { path: PathBuf, pid: u32 },
    #[error("{path}: not a cpr-vmm monitor: {why}")]
    NotVmm { path: PathBuf, why: String },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("{path}: the VMM closed the connection while {what}")]
    Closed { path: PathBuf, what: String },
    #[error("{path}: no answer within {secs} s while {what}")]
    Timeout {
        path: PathBuf,
        what: String,
        secs: u64,
    },
    #[error("{path}: {command}: {desc}")]
    Command {
        path: PathBuf,
        command: String,
        desc: String,
    },
}

/// One negotiated QMP connection.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: VecDeque<Value>,
    /// The PID of the process that listens on the socket (SO_PEERCRED, at connect time).
    pub pid: u32,
    /// The greeting's `version.package`, e.g. ` (cpr-vmm 0.1.0)`.
    pub package: String,
}

impl Qmp {
    /// Connects, checks the greeting is a cpr-vmm monitor's and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            ErrorKind::ConnectionRefused => QmpError::Stale {
                path: path.to_path_buf(),
            },
            _ => QmpError::Connect {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let io = |what: &str| {
            let path = path.to_path_buf();
            let what = what.to_string();
            move |source| QmpError::Io { path, what, source }
        };
        let creds =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| io("reading the peer's credentials")(e.into()))?;
        let pid = u32::try_from(creds.pid()).unwrap_or(0);
        let writer = stream.try_clone().map_err(io("cloning the socket"))?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            events: VecDeque::new(),
            pid,
            package: String::new(),
        };
        let greeting = match qmp.read_message(GREETING_TIMEOUT, "waiting for the QMP greeting") {
            Ok(g) => g,
            Err(QmpError::Timeout { .. }) if in_live_update(pid) => {
                return Err(QmpError::InUpdate {
                    path: path.to_path_buf(),
                    pid,
                });
            }
            Err(QmpError::Timeout { .. }) => {
                return Err(QmpError::NotVmm {
                    path: path.to_path_buf(),
                    why: format!(
                        "no QMP greeting within {} s (process {pid})",
                        GREETING_TIMEOUT.as_secs()
                    ),
                });
            }
            Err(QmpError::Io { source, .. }) if source.kind() == ErrorKind::InvalidData => {
                return Err(QmpError::NotVmm {
                    path: path.to_path_buf(),
                    why: format!("it sent something that is not QMP: {source}"),
                });
            }
            Err(e) => return Err(e),
        };
        let package = greeting["QMP"]["version"]["package"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !package.contains("cpr-vmm") {
            return Err(QmpError::NotVmm {
                path: path.to_path_buf(),
                why: format!("its greeting is not a cpr-vmm VMM's: {greeting}"),
            });
        }
        qmp.package = package;
        qmp.execute("qmp_capabilities", Value::Null)
            .map_err(|e| qmp.busy_or(e))?;
        Ok(qmp)
    }

    /// `e`, or [`QmpError::InUpdate`] when `e` is a timeout and the VMM is in a live update
    /// (it greeted, then executed the update's program, which does not answer).
    pub fn busy_or(&self, e: QmpError) -> QmpError {
        match e {
            QmpError::Timeout { .. } if in_live_update(self.pid) => QmpError::InUpdate {
                path: self.path.clone(),
                pid: self.pid,
            },
            e => e,
        }
    }

    /// The VMM's version, from the greeting's package ` (cpr-vmm VERSION)`.
    pub fn version(&self) -> String {
        self.package
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .trim_start_matches("cpr-vmm")
            .trim()
            .to_string()
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push_str("\r\n");
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                what: format!("sending {command}"),
                source,
            })?;
        let what = format!("waiting for the reply to {command}");
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self.read_message(left, &what)?;
            if message.get("event").is_some() {
                self.events.push_back(message);
                continue;
            }
            if message["id"] != json!(id) {
                continue;
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Command {
                    path: self.path.clone(),
                    command: command.to_string(),
                    desc: error["desc"]
                        .as_str()
                        .unwrap_or("(no description)")
                        .to_string(),
                });
            }
            return Ok(message.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Waits for the next event named `name`, for at most `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        if let Some(at) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(at).unwrap_or(Value::Null));
        }
        let deadline = Instant::now() + timeout;
        let what = format!("waiting for the {name} event");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self.read_message(left, &what)?;
            if message["event"] == name {
                return Ok(message);
            }
        }
    }

    fn read_message(&mut self, timeout: Duration, what: &str) -> Result<Value, QmpError> {
        let timeout_err = || QmpError::Timeout {
            path: self.path.clone(),
            what: what.to_string(),
            secs: timeout.as_secs(),
        };
        let deadline = Instant::now() + timeout;
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout_err());
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|source| QmpError::Io {
                    path: self.path.clone(),
                    what: what.to_string(),
                    source,
                })?;
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                        what: what.to_string(),
                    });
                }
                Ok(_) if line.ends_with(b"\n") => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(timeout_err());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        what: what.to_string(),
                        source,
                    });
                }
            }
            if line.len() > MAX_LINE {
                break;
            }
        }
        serde_json::from_slice(&line).map_err(|e| QmpError::Io {
            path: self.path.clone(),
            what: what.to_string(),
            source: std::io::Error::new(ErrorKind::InvalidData, e),
        })
    }
}

/// Whether process `pid`, which does not answer, is in a live update: it was executed by a
/// VMM during one (its start-up environment holds the update's channel variable) and it is
/// either not a VMM (the shim, or a wrong program) or has the update's rescue guard as a child
/// (a new VMM that has not resumed the guest yet).
fn in_live_update(pid: u32) -> bool {
    let executed_by_update = std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|b| *b == 0)
            .any(|var| var.starts_with(CPR_STATE_ENV.as_bytes()))
    });
    if !executed_by_update {
        return false;
    }
    let is_vmm = std::fs::File::open(format!("/proc/{pid}/exe"))
        .is_ok_and(|exe| cpr_common::compat::read_note(&exe).is_ok());
    !is_vmm || has_guard_child(pid)
}

fn has_guard_child(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>())
        .any(|child| {
            std::fs::read(format!("/proc/{child}/cmdline"))
                .is_ok_and(|cmd| cmd.split(|b| *b == 0).nth(1) == Some(GUARD_ARG.as_bytes()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that greets with `greeting` then answers every request with an empty return.
    fn serve(path: &Path, greeting: &'static str) -> std::thread::JoinHandle<()> {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (c, _) = listener.accept().unwrap();
            let mut w = c.try_clone().unwrap();
            w.write_all(greeting.as_bytes()).unwrap();
            for line in BufReader::new(c).lines() {
                let Ok(line) = line else { return };
                let req: Value = serde_json::from_str(&line).unwrap();
                let reply = json!({"return": {}, "id": req["id"]});
                if w.write_all(format!("{reply}\r\n").as_bytes()).is_err() {
                    return;
                }
            }
        })
    }

    fn socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("cpr-ctl-qmp-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_cpr_vmm_greeting_gives_the_version() {
        let path = socket("ok");
        let _ = std::fs::remove_file(&path);
        let server = serve(
            &path,
            "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 2, \"micro\": 0}, \"package\": \" (cpr-vmm 0.2.0+tag)\"}, \"capabilities\": []}}\r\n",
        );
        let qmp = Qmp::connect(&path).unwrap();
        assert_eq!(qmp.version(), "0.2.0+tag");
        assert_eq!(qmp.pid, std::process::id());
        drop(qmp);
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn another_qemu_is_not_a_cpr_vmm() {
        let path = socket("qemu");
        let _ = std::fs::remove_file(&path);
        let server = serve(
            &path,
            "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 9, \"minor\": 0, \"micro\": 0}, \"package\": \"Debian 1:9.0\"}, \"capabilities\": []}}\r\n",
        );
        let err = Qmp::connect(&path).err().unwrap();
        assert!(matches!(err, QmpError::NotVmm { .. }), "{err}");
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
