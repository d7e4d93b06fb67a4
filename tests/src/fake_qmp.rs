//! An in-process stand-in for the VMM's QMP server, for unit tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Value, json};

pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}, "package": "cpr-vmm"}, "capabilities": []}}"#;

/// The server side of one QMP connection.
pub struct FakeConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl FakeConn {
    /// Sends `text` followed by CRLF, as QEMU does.
    pub fn send(&mut self, text: &str) {
        self.writer
            .write_all(format!("{text}\r\n").as_bytes())
            .unwrap();
    }

    /// Sends bytes exactly as given.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads one request line and parses it.
    pub fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_line()).unwrap()
    }

    pub fn recv_line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    /// Answers `request` with `{"return": value}`, echoing its id.
    pub fn reply(&mut self, request: &Value, value: Value) {
        let reply = json!({ "return": value, "id": request["id"] });
        self.send(&reply.to_string());
    }

    /// Sends a timestamped event.
    pub fn event(&mut self, name: &str, seconds: u64, micros: u64) {
        let event = json!({
            "event": name,
            "timestamp": { "seconds": seconds, "microseconds": micros },
            "data": {},
        });
        self.send(&event.to_string());
    }

    /// Sends the greeting and handles `qmp_capabilities`.
    pub fn greet_and_negotiate(&mut self) {
        self.send(GREETING);
        let request = self.recv();
        assert_eq!(request["execute"], "qmp_capabilities", "{request}");
        self.reply(&request, json!({}));
    }
}

/// Listens on `path` (after `delay`) and runs `script` on the first
/// connection in a thread; join the handle to surface server-side panics.
pub fn serve(
    path: &Path,
    delay: Duration,
    script: impl FnOnce(FakeConn) + Send + 'static,
) -> JoinHandle<()> {
    let path: PathBuf = path.to_owned();
    let listener = (delay.is_zero()).then(|| UnixListener::bind(&path).unwrap());
    thread::spawn(move || {
        let listener = listener.unwrap_or_else(|| {
            thread::sleep(delay);
            UnixListener::bind(&path).unwrap()
        });
        let (stream, _) = listener.accept().unwrap();
        let writer = stream.try_clone().unwrap();
        script(FakeConn {
            reader: BufReader::new(stream),
            writer,
        });
    })
}
