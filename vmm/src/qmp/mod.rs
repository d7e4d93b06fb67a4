//! The QMP monitor: QEMU's JSON protocol over a UNIX socket, so control planes written for QEMU
//! drive this VMM unchanged.
//!
//! [`protocol`] is the wire format (framing, validation, QEMU's exact replies and errors, HMP
//! text); [`server`] holds the listening socket and client sessions and is driven by the VMM's
//! control loop, which executes the commands.

pub mod protocol;
pub mod server;

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Binds a listening UNIX socket with mode 0600.
///
/// A path that another process is listening on is "in use" (an error, never stolen); a stale
/// socket file left by a dead process is replaced; anything else at the path is an error.
pub fn bind_unix_listener(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
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
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    result
}

/// Removes this VMM's socket file at `path` when it exits, as QEMU does. Not called across a
/// live update: the successor keeps listening on it.
pub fn remove_socket_file(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn binds_0600_refuses_in_use_and_replaces_stale() {
        let dir = std::env::temp_dir().join(format!("vmm-qmp-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sock");
        let l = bind_unix_listener(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = bind_unix_listener(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        bind_unix_listener(&path).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(bind_unix_listener(&file).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
