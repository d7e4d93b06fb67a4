//! The cpr-transfer wire protocol: how an old VMM hands guest RAM and machine state to a new VMM
//! started separately, over two UNIX sockets.
//!
//! ```text
//! old VMM                                  new VMM (started first, listening)
//!   ── cpr channel: connect ──────────────▶ accept (peer must be the same UID, or root)
//!   HELLO {version, RAM fds} + SCM_RIGHTS ▶ check every fd (same code as the shim), map RAM,
//!                                           build the VM, listen on the main channel
//!   ◀───────────────────── close cpr channel (EOF: "ready for the main channel")
//!   ── main channel: connect ─────────────▶ accept
//!   ◀─────────────────────────────── READY  (VM built: the blackout can start)
//!   stop vCPUs, save state
//!   STATE {state-file bytes, no RAM} ─────▶ validate everything, restore
//!   ◀────────────────────────────── COMMIT  (sent before the new VMM resumes the guest)
//!   postmigrate                              resume
//! ```
//!
//! Anything else (EOF, ERROR, a malformed frame) before COMMIT means the transfer failed: the
//! old VMM keeps the guest (paused if it had stopped it) and `cont` resumes it there.
//!
//! Every message is a frame (integers little-endian):
//!
//! ```text
//! +--------+-------------+----------+----------------+----------------+---------------+
//! | "CPRX" | version u16 | kind u16 | payload len u32| payload crc32c | payload ...   |
//! +--------+-------------+----------+----------------+----------------+---------------+
//! ```
//!
//! Payloads are bounded ([`MAX_PAYLOAD`]); a frame that is truncated, oversized, of an unknown
//! kind or version, or fails its checksum is an error, never a crash.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use serde::{Deserialize, Serialize};

use crate::fds::PreservedFd;

pub const MAGIC: [u8; 4] = *b"CPRX";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
/// Machine state is tens of kilobytes; this is generous and still bounds a hostile peer.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// RAM regions are few.
pub const MAX_FDS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Ready = 2,
    State = 3,
    Commit = 4,
    Error = 5,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Ready,
            3 => Kind::State,
            4 => Kind::Commit,
            5 => Kind::Error,
            _ => return None,
        })
    }
}

/// The first message: who is sending, and the RAM memfds (passed with SCM_RIGHTS, in this
/// order; the fd numbers in the records are the sender's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub sender_version: String,
    pub fds: Vec<PreservedFd>,
    /// Monotonic time at which the sender started the transfer, for the report.
    pub started_ns: u64,
    /// With guest RAM in a `memory-backend-file`: its mem-path (absolute) on the sender's
    /// command line, which the receiver's must name too. The file itself is the fd recorded
    /// as `FdKind::GuestRamFile`. Encoded only when present, so that a HELLO with memfd RAM
    /// is byte for byte the first release's (see [`encode_hello`]).
    pub ram_file: Option<String>,
}

/// HELLO as the first release encoded it (no `ram_file`).
#[derive(Serialize, Deserialize)]
struct HelloV1 {
    sender_version: String,
    fds: Vec<PreservedFd>,
    started_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("the peer closed the connection{context}")]
    Closed { context: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message from the peer: {0}")]
    Malformed(String),
    #[error("the peer (uid {peer}) is not allowed: only uid {ours} or root may take part")]
    PeerNotAllowed { peer: u32, ours: u32 },
    #[error("cannot encode the HELLO message: {0}")]
    EncodeHello(#[source] bincode::error::EncodeError),
    #[error("the peer reported an error: {0}")]
    Remote(String),
    #[error("expected {expected:?}, got {got:?}")]
    Unexpected { expected: Kind, got: Kind },
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

fn header(kind: Kind, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    h
}

/// Checks a header; returns the kind, payload length and checksum.
fn parse_header(h: &[u8]) -> Result<(Kind, u32, u32), TransferError> {
    if h[0..4] != MAGIC {
        return Err(TransferError::Malformed(format!(
            "bad magic {:02x?}",
            &h[0..4]
        )));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(TransferError::Malformed(format!(
            "protocol version {version}, this VMM speaks {VERSION}"
        )));
    }
    let raw_kind = u16::from_le_bytes([h[6], h[7]]);
    let kind = Kind::from_u16(raw_kind)
        .ok_or_else(|| TransferError::Malformed(format!("unknown message kind {raw_kind}")))?;
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > MAX_PAYLOAD {
        return Err(TransferError::Malformed(format!(
            "payload of {len} bytes, over the {MAX_PAYLOAD} byte limit"
        )));
    }
    let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    Ok((kind, len, crc))
}

fn check_payload(payload: &[u8], crc: u32) -> Result<(), TransferError> {
    let computed = crc32c::crc32c(payload);
    if computed != crc {
        return Err(TransferError::Malformed(format!(
            "payload checksum mismatch (stored {crc:#010x}, computed {computed:#010x})"
        )));
    }
    Ok(())
}

/// Sends one frame, with `fds` attached to its first byte.
pub fn send(
    stream: &UnixStream,
    kind: Kind,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), TransferError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&header(kind, payload));
    bytes.extend_from_slice(payload);
    let mut sent = 0;
    if !fds.is_empty() {
        sent = sendfd::SendWithFd::send_with_fd(stream, &bytes, fds)?;
    }
    (&*stream).write_all(&bytes[sent..])?;
    Ok(())
}

pub fn send_error(stream: &UnixStream, message: &str) {
    // Best effort: the connection may be the very thing that failed.
    let _ = send(stream, Kind::Error, message.as_bytes(), &[]);
}

/// Receives one frame, blocking. fds attached to it are returned owned (close-on-exec).
pub fn recv(stream: &UnixStream) -> Result<Frame, TransferError> {
    let mut head = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let (mut got, nfds) = sendfd::RecvWithFd::recv_with_fd(stream, &mut head, &mut raw_fds)?;
    // recv_with_fd returned `nfds` new fds received with SCM_RIGHTS; wrapping them first means
    // they are closed on every error path below.
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: nothing else owns these fresh fds.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    for fd in &fds {
        // FD_CLOEXEC is the only fd flag, so setting the flags to it alone loses nothing. It
        // cannot fail on an fd we own; if it did, the fd would only leak into a later exec.
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    if got == 0 {
        return Err(TransferError::Closed {
            context: String::new(),
        });
    }
    while got < HEADER_LEN {
        let n = (&*stream).read(&mut head[got..])?;
        if n == 0 {
            return Err(TransferError::Malformed(format!(
                "connection closed after {got} bytes of a {HEADER_LEN}-byte header"
            )));
        }
        got += n;
    }
    let (kind, len, crc) = parse_header(&head)?;
    let mut payload = vec![0u8; len as usize];
    (&*stream).read_exact(&mut payload).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransferError::Malformed(format!("connection closed inside a {len}-byte payload"))
        } else {
            TransferError::Io(e)
        }
    })?;
    check_payload(&payload, crc)?;
    if kind == Kind::Error {
        return Err(TransferError::Remote(
            String::from_utf8_lossy(&payload).into_owned(),
        ));
    }
    Ok(Frame { kind, payload, fds })
}

/// Receives a frame that must be of `kind`.
pub fn expect(stream: &UnixStream, kind: Kind) -> Result<Frame, TransferError> {
    let f = recv(stream)?;
    if f.kind != kind {
        return Err(TransferError::Unexpected {
            expected: kind,
            got: f.kind,
        });
    }
    Ok(f)
}

/// Accumulates bytes from a non-blocking socket until a whole frame is there (fd-less frames
/// only: READY, STATE, COMMIT, ERROR).
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Reads what is available. Returns a complete frame, `Ok(None)` if more is needed, or an
    /// error (including the peer closing the connection).
    pub fn poll(&mut self, stream: &UnixStream) -> Result<Option<Frame>, TransferError> {
        let mut chunk = [0u8; 64 << 10];
        loop {
            if let Some(frame) = self.take()? {
                return Ok(Some(frame));
            }
            match (&*stream).read(&mut chunk) {
                Ok(0) => {
                    return Err(TransferError::Closed {
                        context: if self.buf.is_empty() {
                            String::new()
                        } else {
                            format!(" in the middle of a message ({} bytes)", self.buf.len())
                        },
                    });
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Adds bytes as if read from the socket and returns the next complete frame, if any (what
    /// [`FrameReader::poll`] does with each read; the fuzz target drives it this way).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Frame>, TransferError> {
        self.buf.extend_from_slice(bytes);
        self.take()
    }

    fn take(&mut self) -> Result<Option<Frame>, TransferError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let (kind, len, crc) = parse_header(&self.buf[..HEADER_LEN])?;
        let end = HEADER_LEN + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..end].to_vec();
        self.buf.drain(..end);
        check_payload(&payload, crc)?;
        if kind == Kind::Error {
            return Err(TransferError::Remote(
                String::from_utf8_lossy(&payload).into_owned(),
            ));
        }
        Ok(Some(Frame {
            kind,
            payload,
            fds: Vec::new(),
        }))
    }
}

/// Refuses a peer that is neither this process's UID nor root (SO_PEERCRED).
pub fn check_peer(stream: &UnixStream) -> Result<(), TransferError> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| TransferError::Io(e.into()))?;
    let ours = nix::unistd::geteuid().as_raw();
    let peer = creds.uid();
    if peer == ours || peer == 0 {
        Ok(())
    } else {
        Err(TransferError::PeerNotAllowed { peer, ours })
    }
}

/// HELLO's payload. Without a RAM file it is the first release's encoding (a VMM of that
/// release can still take memfd RAM from this one); with one, the RAM file's path follows.
pub fn encode_hello(hello: &Hello) -> Result<Vec<u8>, TransferError> {
    match &hello.ram_file {
        Some(_) => crate::container::encode_payload(hello),
        None => crate::container::encode_payload(&HelloV1 {
            sender_version: hello.sender_version.clone(),
            fds: hello.fds.clone(),
            started_ns: hello.started_ns,
        }),
    }
    .map_err(TransferError::EncodeHello)
}

/// Decodes HELLO in either encoding ([`encode_hello`]).
pub fn decode_hello(payload: &[u8]) -> Result<Hello, TransferError> {
    fn whole<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, TransferError> {
        let config = bincode::config::standard()
            .with_limit::<{ crate::container::MAX_DECODED_SECTION as usize }>();
        let (value, used): (T, usize) = bincode::serde::decode_from_slice(payload, config)
            .map_err(|e| TransferError::Malformed(format!("HELLO: {e}")))?;
        if used != payload.len() {
            return Err(TransferError::Malformed("HELLO has trailing bytes".into()));
        }
        Ok(value)
    }
    match whole::<HelloV1>(payload) {
        Ok(v1) => Ok(Hello {
            sender_version: v1.sender_version,
            fds: v1.fds,
            started_ns: v1.started_ns,
            ram_file: None,
        }),
        // Trailing bytes after the first release's fields: the RAM file's path.
        Err(_) => whole::<Hello>(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn frames_round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        send(&a, Kind::Hello, b"hello", &[file.as_raw_fd()]).unwrap();
        send(&a, Kind::Ready, b"", &[]).unwrap();
        let f = recv(&b).unwrap();
        assert_eq!(
            (f.kind, f.payload.as_slice(), f.fds.len()),
            (Kind::Hello, &b"hello"[..], 1)
        );
        assert!(crate::fds::is_cloexec(f.fds[0].as_raw_fd()).unwrap());
        expect(&b, Kind::Ready).unwrap();
        drop(a);
        assert!(matches!(recv(&b), Err(TransferError::Closed { .. })));
    }

    #[test]
    fn malformed_frames_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            b"XXXX\x01\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00".to_vec(), // magic
            b"CPRX\x09\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00".to_vec(), // version
            b"CPRX\x01\x00\x63\x00\x00\x00\x00\x00\x00\x00\x00\x00".to_vec(), // kind
            b"CPRX\x01\x00\x03\x00\xff\xff\xff\xff\x00\x00\x00\x00".to_vec(), // oversized
            b"CPRX\x01\x00\x03\x00\x02\x00\x00\x00\x00\x00\x00\x00ab".to_vec(), // checksum
            b"CPRX\x01\x00\x03\x00\x09\x00\x00\x00".to_vec(),                 // truncated header
        ];
        for bytes in cases {
            let (a, b) = UnixStream::pair().unwrap();
            (&a).write_all(&bytes).unwrap();
            drop(a);
            assert!(recv(&b).is_err(), "accepted {bytes:?}");
            let (a, b) = UnixStream::pair().unwrap();
            (&a).write_all(&bytes).unwrap();
            drop(a);
            b.set_nonblocking(true).unwrap();
            let mut r = FrameReader::default();
            assert!(r.poll(&b).is_err(), "reader accepted {bytes:?}");
        }
    }

    #[test]
    fn reader_assembles_split_frames_and_reports_remote_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut bytes = header(Kind::State, b"payload").to_vec();
        bytes.extend_from_slice(b"payload");
        let mut r = FrameReader::default();
        (&a).write_all(&bytes[..5]).unwrap();
        assert!(r.poll(&b).unwrap().is_none());
        (&a).write_all(&bytes[5..]).unwrap();
        let f = r.poll(&b).unwrap().unwrap();
        assert_eq!(f.payload, b"payload");
        send_error(&a, "disk on fire");
        assert!(matches!(r.poll(&b), Err(TransferError::Remote(m)) if m == "disk on fire"));
    }

    #[test]
    fn hello_round_trips_and_garbage_is_refused() {
        let mut h = Hello {
            sender_version: "1.0".into(),
            fds: vec![],
            started_ns: 5,
            ram_file: None,
        };
        assert_eq!(decode_hello(&encode_hello(&h).unwrap()).unwrap(), h);
        // Without a RAM file, the first release's bytes: its VMMs still read them.
        let v1 = crate::container::encode_payload(&HelloV1 {
            sender_version: "1.0".into(),
            fds: vec![],
            started_ns: 5,
        })
        .unwrap();
        assert_eq!(encode_hello(&h).unwrap(), v1);
        h.ram_file = Some("/var/lib/vm1/guest.ram".into());
        let with_file = encode_hello(&h).unwrap();
        assert_ne!(with_file, v1);
        assert_eq!(decode_hello(&with_file).unwrap(), h);
        let mut trailing = with_file;
        trailing.push(0);
        assert!(decode_hello(&trailing).is_err());
        assert!(decode_hello(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn a_local_peer_of_the_same_uid_is_allowed() {
        let (a, _b) = UnixStream::pair().unwrap();
        check_peer(&a).unwrap();
    }
}
