//! A small synchronous QMP client for driving the VMM from tests.
//!
//! It speaks QEMU's wire protocol: newline-separated JSON objects, a greeting
//! from the server, `qmp_capabilities` negotiation, replies matched by `id`,
//! and asynchronous events that may arrive between (or instead of) replies.
//! Every read has a deadline and a closed connection is an error, so a dead
//! or wedged VMM fails the test with a clear message instead of hanging it.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Default time a command may take before the client gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The `-qmp` argument that makes the VMM listen on `path`.
pub fn qmp_socket_arg(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

/// A `file:` migration URI for `path`.
pub fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Everything that can go wrong talking QMP.
///
/// `Debug` prints the same as `Display` so `.unwrap()` output stays readable.
#[derive(thiserror::Error)]
pub enum QmpError {
    /// Nothing accepted a connection on the socket in time.
    #[error("cannot connect to QMP socket {} within {waited:?}: {source}", path.display())]
    Connect {
        path: PathBuf,
        waited: Duration,
        #[source]
        source: io::Error,
    },
    /// A socket or file operation failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The server did not send the awaited message in time.
    #[error(
        "timed out after {waited:?} waiting for {what}; unterminated data received: {partial:?}"
    )]
    Timeout {
        what: String,
        waited: Duration,
        partial: String,
    },
    /// The server closed the connection (e.g. the VMM exited or crashed).
    #[error(
        "QMP server closed the connection while {what}; unterminated data received: {partial:?}"
    )]
    Closed { what: String, partial: String },
    /// The server sent something that is not valid QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// The server answered the command with `{"error": ...}`.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

impl fmt::Debug for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl QmpError {
    /// The error class of a command error (e.g. `"GenericError"`).
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Whether an I/O error means the peer went away.
fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

fn is_event(message: &Value) -> bool {
    message.get("event").is_some()
}

/// A connected QMP session.
pub struct QmpClient {
    stream: UnixStream,
    /// Bytes received but not yet split into a complete line.
    pending: Vec<u8>,
    greeting: Value,
    /// Events received while waiting for something else, oldest first.
    events: VecDeque<Value>,
    next_id: u64,
    timeout: Duration,
}

impl QmpClient {
    /// Connects to the socket at `path`, retrying until `timeout` (the VMM
    /// may not be listening yet), and reads the greeting.
    ///
    /// Does not negotiate, so tests can probe the pre-negotiation state; see
    /// [`QmpClient::connect_and_negotiate`].
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = connect_with_retry(path, timeout)?;
        let mut client = QmpClient {
            stream,
            pending: Vec::new(),
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 0,
            timeout: DEFAULT_TIMEOUT,
        };
        client.set_write_timeout(DEFAULT_TIMEOUT)?;
        let greeting = client.read_message(deadline, "the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        client.greeting = greeting;
        Ok(client)
    }

    /// [`QmpClient::connect`] followed by [`QmpClient::negotiate`].
    pub fn connect_and_negotiate(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let mut client = Self::connect(path, timeout)?;
        client.negotiate()?;
        Ok(client)
    }

    /// The greeting the server sent on connect (`{"QMP": {...}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets how long commands may take before they fail with a timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The underlying socket, for tests that need to do something unusual
    /// (e.g. pass file descriptors or shut down one direction).
    pub fn socket(&self) -> &UnixStream {
        &self.stream
    }

    /// The PID of the process serving this connection, from the socket's peer credentials
    /// (SO_PEERCRED: for the connecting side, the process that called `listen` on the server's
    /// socket, so a live update that kept the listener in the same process shows the same PID).
    pub fn server_pid(&self) -> Result<u32, QmpError> {
        let creds =
            nix::sys::socket::getsockopt(&self.stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| QmpError::Io {
                    context: "reading the QMP socket's peer credentials (SO_PEERCRED)".into(),
                    source: e.into(),
                })?;
        u32::try_from(creds.pid())
            .map_err(|_| QmpError::Protocol(format!("SO_PEERCRED gave PID {}", creds.pid())))
    }

    /// Leaves capabilities negotiation mode (`qmp_capabilities`).
    pub fn negotiate(&mut self) -> Result<(), QmpError> {
        self.execute("qmp_capabilities", Value::Null).map(drop)
    }

    /// Runs `command` and returns its `return` value.
    ///
    /// `arguments` is sent as `"arguments"` unless it is `Value::Null`.
    /// Events that arrive before the reply are queued for
    /// [`QmpClient::wait_event`] and [`QmpClient::events`].
    /// `query-status`'s run state (`running`, `postmigrate`, ...).
    pub fn run_state(&mut self) -> Result<String, QmpError> {
        let reply = self.execute("query-status", Value::Null)?;
        Ok(reply["status"].as_str().unwrap_or_default().to_string())
    }

    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let timeout = self.timeout;
        self.execute_with_timeout(command, arguments, timeout)
    }

    /// [`QmpClient::execute`] with an explicit timeout for this command.
    pub fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = format!("cpr-tests-{}", self.next_id);
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.send(&line, &format!("sending {command}"))?;
        self.await_reply(command, &id, Instant::now() + timeout)
    }

    /// Waits for the reply carrying `id`, queueing events on the way.
    fn await_reply(
        &mut self,
        command: &str,
        id: &str,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let what = format!("the reply to {command} (id {id})");
        loop {
            let message = self.read_message(deadline, &what)?;
            if is_event(&message) {
                self.events.push_back(message);
                continue;
            }
            match message.get("id") {
                Some(reply_id) if reply_id == id => return reply_value(command, message),
                // A late reply to a command we already gave up on.
                Some(_) => continue,
                None => {
                    return Err(QmpError::Protocol(format!(
                        "reply to {command} lacks the request's id {id:?}: {message}"
                    )));
                }
            }
        }
    }

    /// Sends `bytes` exactly as given and returns the next message that is
    /// not an event (queueing events), whatever it is.
    ///
    /// For malformed-input tests; include the trailing newline if the server
    /// should see a complete line.
    pub fn execute_raw(&mut self, bytes: &[u8]) -> Result<Value, QmpError> {
        self.send(bytes, "sending raw bytes")?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self.read_message(deadline, "a reply to raw input")?;
            if !is_event(&message) {
                return Ok(message);
            }
            self.events.push_back(message);
        }
    }

    /// Runs an HMP command through `human-monitor-command`; returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let reply = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        match reply {
            Value::String(text) => Ok(text),
            other => Err(QmpError::Protocol(format!(
                "HMP reply is not a string: {other}"
            ))),
        }
    }

    /// Saves guest-physical memory `[addr, addr+size)` to `path` with
    /// `pmemsave` and returns the file's contents.
    ///
    /// `path` must be absolute: the VMM, not the test, opens it.
    pub fn pmemsave(&mut self, addr: u64, size: u64, path: &Path) -> Result<Vec<u8>, QmpError> {
        let filename = path.to_str().ok_or_else(|| {
            QmpError::Protocol(format!("pmemsave path is not UTF-8: {}", path.display()))
        })?;
        self.execute(
            "pmemsave",
            json!({ "val": addr, "size": size, "filename": filename }),
        )?;
        let bytes = std::fs::read(path).map_err(|source| QmpError::Io {
            context: format!("reading the pmemsave dump {}", path.display()),
            source,
        })?;
        if bytes.len() as u64 != size {
            return Err(QmpError::Protocol(format!(
                "pmemsave of {size} bytes at {addr:#x} wrote {} bytes to {}",
                bytes.len(),
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Returns the first event called `name`, from the queue if one already
    /// arrived, else by reading until it does (queueing other events).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        if let Some(index) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(index).expect("index is in range"));
        }
        let deadline = Instant::now() + timeout;
        let what = format!("event {name}");
        loop {
            let message = self.read_message(deadline, &what)?;
            if message["event"] == name {
                return Ok(message);
            }
            if is_event(&message) {
                self.events.push_back(message);
            }
            // Anything else is a late reply to an abandoned command: drop it.
        }
    }

    /// Returns the oldest event not yet taken, reading until one arrives.
    pub fn wait_any_event(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let message = self.read_message(deadline, "any event")?;
            if is_event(&message) {
                return Ok(message);
            }
        }
    }

    /// Drains all events received so far, including ones still unread on
    /// the socket, oldest first. Never blocks.
    pub fn events(&mut self) -> Vec<Value> {
        // A closed or failing socket just means no more events; the next
        // command will report the problem.
        let _ = self.read_available();
        while let Some(line) = self.take_line() {
            match serde_json::from_slice::<Value>(&line) {
                Ok(message) if is_event(&message) => self.events.push_back(message),
                _ => {}
            }
        }
        self.events.drain(..).collect()
    }

    /// Reads whatever the server already sent, without blocking.
    fn read_available(&mut self) -> io::Result<()> {
        self.stream.set_nonblocking(true)?;
        let mut buf = [0u8; 4096];
        let result = loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        self.stream.set_nonblocking(false)?;
        result
    }

    fn send(&mut self, bytes: &[u8], context: &str) -> Result<(), QmpError> {
        self.stream.write_all(bytes).map_err(|source| {
            if is_disconnect(&source) {
                QmpError::Closed {
                    what: context.to_owned(),
                    partial: self.partial(),
                }
            } else {
                QmpError::Io {
                    context: context.to_owned(),
                    source,
                }
            }
        })
    }

    fn set_write_timeout(&self, timeout: Duration) -> Result<(), QmpError> {
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| QmpError::Io {
                context: "setting the write timeout".into(),
                source,
            })
    }

    /// Removes and returns the next complete line (without its terminator).
    fn take_line(&mut self) -> Option<Vec<u8>> {
        let newline = self.pending.iter().position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.pending.drain(..=newline).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }

    fn partial(&self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }

    /// Reads the next JSON object, waiting at most until `deadline`.
    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpError> {
        let start = Instant::now();
        loop {
            while let Some(line) = self.take_line() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse_message(&line);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.to_owned(),
                    waited: start.elapsed(),
                    partial: self.partial(),
                });
            }
            self.read_some(remaining, what)?;
        }
    }

    /// One `read` with a timeout; a timeout is not an error here (the caller
    /// re-checks its deadline).
    fn read_some(&mut self, timeout: Duration, what: &str) -> Result<(), QmpError> {
        let io_error = |source| QmpError::Io {
            context: format!("waiting for {what}"),
            source,
        };
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(io_error)?;
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(QmpError::Closed {
                what: format!("waiting for {what}"),
                partial: self.partial(),
            }),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) if is_disconnect(&e) => Err(QmpError::Closed {
                what: format!("waiting for {what}"),
                partial: self.partial(),
            }),
            Err(e) => Err(io_error(e)),
        }
    }
}

fn connect_with_retry(path: &Path, timeout: Duration) -> Result<UnixStream, QmpError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(source) if start.elapsed() >= timeout => {
                return Err(QmpError::Connect {
                    path: path.to_owned(),
                    waited: start.elapsed(),
                    source,
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn parse_message(line: &[u8]) -> Result<Value, QmpError> {
    let message: Value = serde_json::from_slice(line).map_err(|e| {
        QmpError::Protocol(format!(
            "invalid JSON ({e}): {:?}",
            String::from_utf8_lossy(line)
        ))
    })?;
    if !message.is_object() {
        return Err(QmpError::Protocol(format!(
            "message is not a JSON object: {message}"
        )));
    }
    Ok(message)
}

/// Turns a reply into the command's result.
fn reply_value(command: &str, mut reply: Value) -> Result<Value, QmpError> {
    if let Some(value) = reply.get_mut("return") {
        return Ok(value.take());
    }
    if let Some(error) = reply.get("error") {
        let field = |name: &str| error[name].as_str().unwrap_or("<missing>").to_owned();
        return Err(QmpError::Command {
            command: command.to_owned(),
            class: field("class"),
            desc: field("desc"),
        });
    }
    Err(QmpError::Protocol(format!(
        "reply to {command} has neither return nor error: {reply}"
    )))
}

/// An event's timestamp in seconds (`seconds + microseconds / 1e6`).
///
/// # Panics
/// If the event has no well-formed `timestamp`; that is a VMM bug the test
/// should fail on.
pub fn event_timestamp(event: &Value) -> f64 {
    let timestamp = &event["timestamp"];
    let part = |name: &str| {
        timestamp[name]
            .as_f64()
            .unwrap_or_else(|| panic!("event has no timestamp.{name}: {event}"))
    };
    part("seconds") + part("microseconds") / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qmp::{FakeConn, serve};
    use crate::tempdir::TempDir;

    const SHORT: Duration = Duration::from_secs(5);

    fn socket(dir: &TempDir) -> PathBuf {
        dir.join("qmp.sock")
    }

    #[test]
    fn connect_stores_the_greeting_and_negotiates() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
        });
        let client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        assert_eq!(client.greeting()["QMP"]["version"]["package"], "cpr-vmm");
        server.join().unwrap();
    }

    #[test]
    fn connect_retries_until_the_server_listens() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::from_millis(300), |mut conn| {
            conn.greet_and_negotiate();
        });
        QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn connect_gives_up_when_nobody_listens() {
        let dir = TempDir::new("qmp").unwrap();
        let error = QmpClient::connect(&socket(&dir), Duration::from_millis(100))
            .err()
            .unwrap();
        assert!(matches!(error, QmpError::Connect { .. }), "{error}");
    }

    #[test]
    fn a_non_greeting_first_message_is_a_protocol_error() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.send(r#"{"return": {}}"#);
        });
        let error = QmpClient::connect(&socket(&dir), SHORT).err().unwrap();
        assert!(matches!(error, QmpError::Protocol(_)), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn replies_are_matched_by_id_and_events_are_queued() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn: FakeConn| {
            conn.greet_and_negotiate();
            let request = conn.recv();
            assert_eq!(request["execute"], "query-status");
            assert!(request.get("arguments").is_none(), "{request}");
            conn.event("STOP", 100, 250_000);
            conn.send(r#"{"return": {"stale": true}, "id": "someone-else"}"#);
            conn.send("");
            // The reply and a following event arrive in one write.
            let reply =
                json!({"return": {"status": "paused", "running": false}, "id": request["id"]});
            let event = r#"{"event": "RESUME", "timestamp": {"seconds": 101, "microseconds": 0}}"#;
            conn.send_raw(format!("{reply}\r\n{event}\r\n").as_bytes());
            let request = conn.recv();
            assert_eq!(request["arguments"], json!({"val": 1}));
            conn.reply(&request, json!(7));
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        let status = client.execute("query-status", Value::Null).unwrap();
        assert_eq!(status["status"], "paused");
        assert_eq!(
            client.execute("anything", json!({"val": 1})).unwrap(),
            json!(7)
        );
        let resume = client.wait_event("RESUME", SHORT).unwrap();
        assert_eq!(event_timestamp(&resume), 101.0);
        let events = client.events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["event"], "STOP");
        assert_eq!(event_timestamp(&events[0]), 100.25);
        server.join().unwrap();
    }

    #[test]
    fn wait_event_reads_until_the_event_arrives() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            thread::sleep(Duration::from_millis(100));
            conn.event("RESUME", 1, 0);
            conn.event("SHUTDOWN", 2, 0);
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        let shutdown = client.wait_event("SHUTDOWN", SHORT).unwrap();
        assert_eq!(shutdown["event"], "SHUTDOWN");
        let queued = client.events();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0]["event"], "RESUME");
        server.join().unwrap();
        let error = client.wait_event("RESET", SHORT).unwrap_err();
        assert!(matches!(error, QmpError::Closed { .. }), "{error}");
    }

    #[test]
    fn events_returns_events_not_yet_read_from_the_socket() {
        let dir = TempDir::new("qmp").unwrap();
        let (sent_tx, sent_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = serve(&socket(&dir), Duration::ZERO, move |mut conn| {
            conn.greet_and_negotiate();
            conn.event("STOP", 1, 0);
            conn.event("RESUME", 2, 0);
            sent_tx.send(()).unwrap();
            let _ = done_rx.recv();
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        sent_rx.recv().unwrap();
        thread::sleep(Duration::from_millis(50));
        let names: Vec<Value> = client.events().iter().map(|e| e["event"].clone()).collect();
        assert_eq!(names, [json!("STOP"), json!("RESUME")]);
        assert!(client.events().is_empty());
        done_tx.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn error_replies_become_command_errors() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            let request = conn.recv();
            let reply = json!({
                "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
                "id": request["id"],
            });
            conn.send(&reply.to_string());
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        let error = client.execute("nope", Value::Null).unwrap_err();
        assert_eq!(error.class(), Some("CommandNotFound"));
        assert!(error.to_string().contains("has not been found"), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn a_reply_without_the_id_is_a_protocol_error() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            conn.recv();
            conn.send(r#"{"return": {}}"#);
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        let error = client.execute("stop", Value::Null).unwrap_err();
        assert!(matches!(error, QmpError::Protocol(_)), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn a_server_closing_mid_command_fails_promptly() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            conn.recv();
            conn.send_raw(br#"{"return": "#);
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        client.set_timeout(Duration::from_secs(60));
        let start = Instant::now();
        let error = client.execute("quit", Value::Null).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10));
        match &error {
            QmpError::Closed { partial, .. } => assert_eq!(partial, r#"{"return": "#),
            other => panic!("expected Closed, got {other}"),
        }
        server.join().unwrap();
        // Writing to the dead connection is an error too, not a hang or SIGPIPE.
        let error = client.execute("quit", Value::Null).unwrap_err();
        assert!(matches!(error, QmpError::Closed { .. }), "{error}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let dir = TempDir::new("qmp").unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = serve(&socket(&dir), Duration::ZERO, move |mut conn| {
            conn.greet_and_negotiate();
            conn.recv();
            let _ = done_rx.recv();
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        let error = client
            .execute_with_timeout("query-status", Value::Null, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(error, QmpError::Timeout { .. }), "{error}");
        done_tx.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn garbage_from_the_server_is_a_protocol_error() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            conn.recv();
            conn.send("this is not json");
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        let error = client.execute("stop", Value::Null).unwrap_err();
        assert!(error.to_string().contains("this is not json"), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn execute_raw_returns_the_next_non_event_message() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            assert_eq!(conn.recv_line(), "{\"execute\": \n");
            conn.event("STOP", 1, 0);
            conn.send(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#);
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        let reply = client.execute_raw(b"{\"execute\": \n").unwrap();
        assert_eq!(reply["error"]["class"], "GenericError");
        assert_eq!(client.events().len(), 1);
        server.join().unwrap();
    }

    #[test]
    fn hmp_returns_the_command_output() {
        let dir = TempDir::new("qmp").unwrap();
        let server = serve(&socket(&dir), Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            let request = conn.recv();
            assert_eq!(request["execute"], "human-monitor-command");
            assert_eq!(request["arguments"]["command-line"], "info status");
            conn.reply(&request, json!("VM status: running\r\n"));
        });
        let mut client = QmpClient::connect_and_negotiate(&socket(&dir), SHORT).unwrap();
        assert_eq!(client.hmp("info status").unwrap(), "VM status: running\r\n");
        server.join().unwrap();
    }

    #[test]
    fn qmp_socket_arg_uses_qemu_syntax() {
        let arg = qmp_socket_arg(Path::new("/tmp/x/qmp.sock"));
        assert_eq!(arg, "unix:/tmp/x/qmp.sock,server=on,wait=off");
    }
}
