//! UNIX-socket helpers shared by every socket the VMM listens on or talks through: the QMP
//! monitor, the serial console (`-serial unix:PATH,server`) and both cpr-transfer channels.
//!
//! A socket path is claimed the same way everywhere: mode 0600 from the start, never stolen from
//! a process still listening on it, a stale file left by a dead process replaced, and removed
//! again when this VMM exits for good (not across a live update, where the successor keeps
//! listening on it).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{MsgFlags, recv};
use nix::sys::stat::{Mode, umask};

/// Binds a listening UNIX socket with mode 0600.
///
/// A path that another process is listening on is "in use" (an error, never stolen); a stale
/// socket file left by a dead process is replaced; anything else at the path is an error.
pub fn bind_listener(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "the socket is in use by another process",
                ));
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    // The socket file takes its mode from the umask at bind time; 0177 leaves 0600, with no
    // window in which it is more open. Sockets are bound while the VMM thread is the only one
    // changing the umask.
    let old = umask(Mode::from_bits_truncate(0o177));
    let result = UnixListener::bind(path);
    umask(old);
    result
}

/// Removes this VMM's socket file at `path` when it exits, as QEMU does. Not called across a
/// live update: the successor keeps listening on it. Anything at `path` that is not a socket
/// is left alone.
pub fn remove_socket_file(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Accepts one connection: `Ok(None)` when none is waiting on a non-blocking listener; an
/// interrupted accept is retried.
pub fn accept(listener: &UnixListener) -> io::Result<Option<UnixStream>> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(Some(stream)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Reads what `stream` has without waiting, whether or not the socket itself is blocking (so
/// a socket can keep blocking writes while the poll loop reads it). `Ok(0)`: the peer closed;
/// `WouldBlock`: nothing to read yet.
pub fn recv_nonblocking(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    recv(stream.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn binds_0600_refuses_in_use_and_replaces_stale() {
        let dir = temp_dir("unix-socket-bind");
        let path = dir.join("q.sock");
        let l = bind_listener(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = bind_listener(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        bind_listener(&path).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            bind_listener(&file).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn removes_only_sockets() {
        let dir = temp_dir("unix-socket-remove");
        let path = dir.join("s.sock");
        let _l = bind_listener(&path).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        remove_socket_file(&path);
        remove_socket_file(&file);
        assert!(!path.exists());
        assert!(file.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn accept_and_recv_do_not_wait() {
        let dir = temp_dir("unix-socket-accept");
        let path = dir.join("a.sock");
        let l = bind_listener(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        assert!(accept(&l).unwrap().is_none());
        let mut client = UnixStream::connect(&path).unwrap();
        let server = accept(&l).unwrap().expect("a waiting connection");
        let mut buf = [0u8; 8];
        // The server side is blocking, yet an empty socket does not block the read.
        assert_eq!(
            recv_nonblocking(&server, &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        client.write_all(b"hi").unwrap();
        assert_eq!(recv_nonblocking(&server, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"hi");
        drop(client);
        assert_eq!(recv_nonblocking(&server, &mut buf).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
