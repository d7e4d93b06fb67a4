//! The QMP wire protocol, QEMU-compatible, with no I/O.
//!
//! The monitor server feeds received bytes to a [`JsonStreamer`], hands each
//! framed message to its connection's [`Session`], executes the resulting
//! [`Command`]s against the machine and writes [`Response`]s, [`Event`]s and
//! the [`Greeting`] with their `to_line()` methods.  Everything a QMP client
//! can observe — framing, error classes and texts, member names, key order,
//! number formatting, the `"\r\n"` line ends — follows QEMU 10 so that
//! control planes written for QEMU (libvirt, the `qemu.qmp` Python package,
//! socat scripts) work unchanged.
//!
//! ```text
//! let mut framer = JsonStreamer::new();
//! let mut session = Session::new();
//! write(Greeting::new(VersionInfo::new(10, 2, 0, "")).to_line());
//! for msg in framer.feed(&buf[..n]) {
//!     match session.handle(msg) {
//!         Action::Reply(r) => write(r.to_line()),
//!         Action::Execute(req) => write(Response::from_result(req.id, vm.run(req.command)).to_line()),
//!     }
//! }
//! ```
//!
//! `human-monitor-command` is parsed by [`hmp::parse`] into the same
//! [`Command`]s plus a rendering recipe for the text QEMU would print.

// This module is the whole QMP surface; a binary uses only part of it (most
// RunState values, say, are never produced by this VMM), so unused items are
// expected here rather than a sign of dead code.
#![allow(dead_code)]

pub mod commands;
pub mod hmp;
pub mod json;
pub mod registers;
pub mod schema;
pub mod shell;
pub mod types;

#[cfg(test)]
mod tests;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

// Convenience re-exports; a binary uses only some of them.
#[allow(unused_imports)]
pub use commands::{
    Action, COMMANDS, Command, CommandSpec, EVENTS, Request, Session, find_command,
    migrate_capabilities, parse_request, query_commands, query_events, query_qmp_schema,
};
#[allow(unused_imports)]
pub use json::{JsonStreamer, MAX_MESSAGE_SIZE, MAX_NESTING_DEPTH, to_json, to_line};
#[allow(unused_imports)]
pub use types::*;

/// QMP error classes (`QapiErrorClass`).  Almost everything is
/// `GenericError`; QEMU uses the others only in a few historical places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

/// A QMP error: the `error` member of a reply (`{"class": ..., "desc": ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError` (QEMU's `error_setg`).
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// `human-monitor-command` with a `cpu-index` that names no vCPU.
    pub fn invalid_cpu_index() -> Self {
        Self::generic("Parameter 'cpu-index' expects a CPU number")
    }
}

/// A command reply.  A successful result is kept already serialised so
/// that typed results keep their field order on the wire (a
/// `serde_json::Value` would sort the keys).
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `{"return": ..., "id": ...}`
    Return {
        /// The result, serialised in QEMU's JSON style.
        ret_json: String,
        id: Option<Value>,
    },
    /// `{"id": ..., "error": {"class": ..., "desc": ...}}`
    Error { id: Option<Value>, error: QmpError },
}

impl Response {
    /// A successful reply carrying `ret` (any serialisable result type).
    pub fn ok<T: Serialize + ?Sized>(id: Option<Value>, ret: &T) -> Self {
        match json::to_json(ret) {
            Ok(ret_json) => Response::Return { ret_json, id },
            Err(e) => Response::error(id, QmpError::generic(format!("internal error: {e}"))),
        }
    }

    /// `{"return": {}}`, QEMU's reply for commands without a result.
    pub fn empty(id: Option<Value>) -> Self {
        Response::Return {
            ret_json: "{}".to_owned(),
            id,
        }
    }

    /// An error reply.
    pub fn error(id: Option<Value>, error: QmpError) -> Self {
        Response::Error { id, error }
    }

    /// Reply for a command's outcome.
    pub fn from_result<T: Serialize>(id: Option<Value>, result: Result<T, QmpError>) -> Self {
        match result {
            Ok(ret) => Response::ok(id, &ret),
            Err(error) => Response::Error { id, error },
        }
    }

    /// The echoed `id`, if any.
    pub fn id(&self) -> Option<&Value> {
        match self {
            Response::Return { id, .. } | Response::Error { id, .. } => id.as_ref(),
        }
    }

    /// The wire form, one line ending in `"\r\n"`.  Key order is QEMU's:
    /// `return` before `id`, but `id` before `error`.
    pub fn to_line(&self) -> String {
        let id = |id: &Option<Value>| id.as_ref().map(|v| json::to_json(v).unwrap_or_default());
        match self {
            Response::Return { ret_json, id: rid } => match id(rid) {
                Some(id) => format!("{{\"return\": {ret_json}, \"id\": {id}}}\r\n"),
                None => format!("{{\"return\": {ret_json}}}\r\n"),
            },
            Response::Error { id: eid, error } => {
                let error = json::to_json(error).unwrap_or_default();
                match id(eid) {
                    Some(id) => format!("{{\"id\": {id}, \"error\": {error}}}\r\n"),
                    None => format!("{{\"error\": {error}}}\r\n"),
                }
            }
        }
    }
}

/// Body of the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreetingBody {
    pub version: VersionInfo,
    pub capabilities: Vec<QmpCapability>,
}

/// The greeting sent when a client connects:
/// `{"QMP": {"version": {...}, "capabilities": []}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody,
}

impl Greeting {
    /// Greeting advertising no capabilities (this monitor has no OOB).
    pub fn new(version: VersionInfo) -> Self {
        Greeting {
            qmp: GreetingBody {
                version,
                capabilities: Vec::new(),
            },
        }
    }

    /// The wire form, one line ending in `"\r\n"`.
    pub fn to_line(&self) -> String {
        json::to_line(self)
    }
}

/// Event timestamp: CLOCK_REALTIME split like QEMU's `g_get_real_time()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    /// Timestamp of `t` (pass `SystemTime::now()` in production).
    pub fn from_system_time(t: SystemTime) -> Self {
        let micros: i64 = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        };
        // C division truncates toward zero, so pre-epoch times give two
        // negative parts, as in QEMU.
        Timestamp {
            seconds: micros / 1_000_000,
            microseconds: micros % 1_000_000,
        }
    }
}

/// An asynchronous event, `{"timestamp": ..., "event": ..., "data": ...}`
/// (`data` absent for events that have none, e.g. STOP and RESUME).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub timestamp: Timestamp,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl Event {
    /// Build the event `kind` as emitted at time `at`.
    pub fn new(kind: &EventKind, at: SystemTime) -> Self {
        Event {
            timestamp: Timestamp::from_system_time(at),
            event: kind.name().to_owned(),
            data: kind.data(),
        }
    }

    /// The wire form, one line ending in `"\r\n"`.
    pub fn to_line(&self) -> String {
        json::to_line(self)
    }
}
