//! The QMP monitor: QEMU's JSON protocol over a UNIX socket, so control planes written for QEMU
//! drive this VMM unchanged.
//!
//! [`protocol`] is the wire format (framing, validation, QEMU's exact replies and errors, HMP
//! text); [`server`] holds the listening socket and client sessions and is driven by the VMM's
//! control loop, which executes the commands.

pub mod protocol;
pub mod server;

// The socket helpers moved to `crate::unix_socket`; these names stay for the control loop.
pub use crate::unix_socket::{bind_listener as bind_unix_listener, remove_socket_file};
