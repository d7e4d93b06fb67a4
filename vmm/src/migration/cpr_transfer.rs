//! cpr-transfer: hand guest RAM to a separately started VMM over a UNIX socket.
//!
//! The protocol (and its byte layout) is [`cpr_common::transfer`]. This module has the VMM's
//! socket-level steps: the new side takes the CPR channel before it creates any memory or starts
//! its monitor ([`accept_cpr`]), then maps the received memfds ([`take_ram`]); the old side
//! connects and sends its RAM memfds ([`connect`], [`send_hello`]). The step-by-step state
//! machines that drive the main channel live with the rest of the VMM thread's migration code
//! (`control/migrate.rs`), because they stop and restore the machine.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use cpr_common::cpr::{FdKind, PreservedFd};
use cpr_common::fds;
use cpr_common::transfer::{self, Hello, Kind, TransferError};

use crate::memory::{GuestRam, MemoryError, RegionLayout};

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
    #[error("cpr-transfer: mapping received RAM: {0}")]
    Memory(#[from] MemoryError),
}

/// What the new side got on the CPR channel: the sender, its RAM memfds (checked), and the
/// still-open CPR connection, whose closing tells the old side to connect the main channel.
pub struct IncomingTransfer {
    pub hello: Hello,
    ram: Vec<(PreservedFd, OwnedFd)>,
    pub cpr_stream: Option<UnixStream>,
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

/// Maps the received RAM for `regions` (this VMM's layout for its `-m`).
pub fn take_ram(
    incoming: &mut IncomingTransfer,
    regions: &[RegionLayout],
) -> Result<GuestRam, CprTransferError> {
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
    let mut fds = std::mem::take(&mut incoming.ram);
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

/// Sends HELLO with every RAM memfd.
pub fn send_hello(
    stream: &UnixStream,
    ram: &GuestRam,
    started_ns: u64,
) -> Result<(), CprTransferError> {
    let mut records = Vec::new();
    let mut raw = Vec::new();
    for region in ram.regions() {
        records.push(fds::describe(
            region.fd(),
            &region.layout.name,
            FdKind::GuestRam,
        )?);
        raw.push(region.fd().as_raw_fd());
    }
    let hello = Hello {
        sender_version: crate::version_string(),
        fds: records,
        started_ns,
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
        send_hello(&a, &ram, 1).unwrap();
        let (hello, fds) = receive_hello(&b).unwrap();
        assert_eq!(hello.fds.len(), 1);
        let mut incoming = IncomingTransfer {
            hello,
            ram: fds,
            cpr_stream: None,
        };
        let copy = take_ram(&mut incoming, &ram.layouts()).unwrap();
        let v: u8 = copy.memory().read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!(v, 0xab);
    }

    #[test]
    fn wrong_size_and_missing_regions_are_refused() {
        let ram = GuestRam::create(16 << 20, false, false).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_hello(&a, &ram, 1).unwrap();
        let (hello, fds) = receive_hello(&b).unwrap();
        let mut incoming = IncomingTransfer {
            hello,
            ram: fds,
            cpr_stream: None,
        };
        let bigger = crate::memory::layout(32 << 20);
        assert!(matches!(
            take_ram(&mut incoming, &bigger),
            Err(CprTransferError::RegionSize { .. })
        ));
        let two = crate::memory::layout(5 << 30);
        assert!(take_ram(&mut incoming, &two).is_err());
    }

    #[test]
    fn state_payload_round_trips() {
        let p = state_payload(42, b"state");
        assert_eq!(split_state_payload(p).unwrap(), (42, b"state".to_vec()));
        assert!(split_state_payload(vec![1, 2]).is_err());
    }
}
