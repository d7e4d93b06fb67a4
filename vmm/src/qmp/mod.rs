//! The QMP monitor: QEMU's JSON protocol over a UNIX socket, so control planes written for QEMU
//! drive this VMM unchanged.
//!
//! [`protocol`] is the wire format (framing, validation, QEMU's exact replies and errors, HMP
//! text); [`server`] holds the listening socket and client sessions and is driven by the VMM's
//! control loop, which executes the commands.

pub mod protocol;
pub mod server;
