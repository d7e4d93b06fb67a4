//! A minimal i8042 PS/2 controller at ports 0x60 (data) and 0x64 (status/command), with no
//! keyboard or mouse attached.
//!
//! Linux needs it for one thing: its default `reboot` path pulses the CPU reset line through the
//! controller (command 0xFE on port 0x64), which becomes [`VmRequest::Reset`]. Writing the output
//! port (command 0xD1) with the reset bit (bit 0) clear does the same, as on a real board.
//!
//! The controller answers the commands a driver polls for (read/write the command byte, self-test,
//! port tests, read the output port) through its one-byte-at-a-time output buffer, so Linux's
//! i8042 driver probes it without timeouts; bytes written for the keyboard itself are dropped, as
//! if no keyboard were plugged in. There is no interrupt line: nothing here ever needs one.
//!
//! Register it with `len` [`I8042_PORT_COUNT`] at [`I8042_BASE_PORT`] (offsets 0 and 4 are used;
//! port 0x61 inside that range is handled by KVM's in-kernel PIT speaker port and never gets
//! here). Its state is small and plain ([`I8042Snapshot`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{DeviceContext, DeviceError, Persist, PioDevice, VmRequest};

/// First port of the controller (data register).
pub const I8042_BASE_PORT: u16 = 0x60;
/// Ports 0x60..=0x64: the data port at offset 0, status/command at offset 4.
pub const I8042_PORT_COUNT: u16 = 5;

const DATA_OFFSET: u16 = 0;
const COMMAND_OFFSET: u16 = 4;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// Set by the firmware once its self-test passed.
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
/// The last write went to the command port (a controller command), not the data port.
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
/// Keyboard not inhibited.
const STATUS_UNLOCKED: u8 = 1 << 4;

/// Controller commands (written to port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_TO_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
const PORT_TEST_PASSED: u8 = 0x00;

/// Command byte bits: keyboard and aux clocks disabled (bits 4, 5), system flag (bit 2).
const CTR_KBD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;
const CTR_SYSTEM_FLAG: u8 = 1 << 2;
/// Command byte after power-on: translation on, system flag, both interrupts off.
const CTR_DEFAULT: u8 = 0x40 | CTR_SYSTEM_FLAG;

/// Output port bits: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPUT_PORT_RESET_LINE: u8 = 1 << 0;
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

/// The output buffer of a real controller holds one byte; a few are kept so a command answered
/// while an earlier answer is unread does not lose either. Bounded against a looping guest.
const MAX_OUTPUT_BYTES: usize = 16;

/// The i8042's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Snapshot {
    /// The controller command byte (CTR).
    pub command_byte: u8,
    /// The output port (reset line, A20).
    pub output_port: u8,
    /// A command waiting for its parameter byte on the data port, if any.
    pub pending_command: Option<u8>,
    /// Whether the last write went to the command port (status bit 3).
    pub last_was_command: bool,
    /// Bytes the guest has not read from the data port yet, oldest first.
    pub output: Vec<u8>,
}

/// The controller.
#[derive(Debug)]
pub struct I8042 {
    command_byte: u8,
    output_port: u8,
    pending_command: Option<u8>,
    last_was_command: bool,
    output: VecDeque<u8>,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// A controller in its power-on state: nothing to read, ready for commands.
    pub fn new() -> Self {
        I8042 {
            command_byte: CTR_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            pending_command: None,
            last_was_command: false,
            output: VecDeque::new(),
        }
    }

    fn snapshot(&self) -> I8042Snapshot {
        I8042Snapshot {
            command_byte: self.command_byte,
            output_port: self.output_port,
            pending_command: self.pending_command,
            last_was_command: self.last_was_command,
            output: self.output.iter().copied().collect(),
        }
    }

    /// Rebuilds the controller from a snapshot (an oversized output queue is cut to the limit).
    fn from_snapshot(snap: &I8042Snapshot) -> Self {
        I8042 {
            command_byte: snap.command_byte,
            output_port: snap.output_port,
            pending_command: snap.pending_command,
            last_was_command: snap.last_was_command,
            output: snap.output.iter().copied().take(MAX_OUTPUT_BYTES).collect(),
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if self.command_byte & CTR_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        status
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < MAX_OUTPUT_BYTES {
            self.output.push_back(byte);
        }
    }

    fn command(&mut self, cmd: u8) -> Option<VmRequest> {
        self.last_was_command = true;
        self.pending_command = None;
        match cmd {
            CMD_READ_CTR => self.push_output(self.command_byte),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_TO_AUX => self.pending_command = Some(cmd),
            CMD_DISABLE_AUX => self.command_byte |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.command_byte &= !CTR_AUX_DISABLED,
            CMD_DISABLE_KBD => self.command_byte |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.command_byte &= !CTR_KBD_DISABLED,
            CMD_SELF_TEST => {
                self.command_byte |= CTR_SYSTEM_FLAG;
                self.push_output(SELF_TEST_PASSED);
            }
            CMD_TEST_KBD | CMD_TEST_AUX => self.push_output(PORT_TEST_PASSED),
            CMD_READ_OUTPUT_PORT => self.push_output(self.output_port),
            CMD_PULSE_RESET => return Some(VmRequest::Reset),
            // 0xF0..=0xFF pulse output-port lines; only bit 0 (0xFE) is the reset line.
            0xf0..=0xff if cmd & 1 == 0 => return Some(VmRequest::Reset),
            _ => {}
        }
        None
    }

    fn data(&mut self, byte: u8) -> Option<VmRequest> {
        self.last_was_command = false;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.command_byte = byte,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_RESET_LINE == 0 {
                    return Some(VmRequest::Reset);
                }
            }
            // "Write keyboard/aux output buffer": the byte comes back as if the device sent it.
            Some(CMD_WRITE_KBD_OUTPUT) | Some(CMD_WRITE_AUX_OUTPUT) => self.push_output(byte),
            // Bytes for the mouse or the keyboard: no device is attached, nothing answers.
            _ => {}
        }
        None
    }
}

impl Persist for I8042 {
    type State = I8042Snapshot;
    type Config = ();

    fn power_on(_: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
        Ok(I8042::new())
    }

    fn save(&self) -> I8042Snapshot {
        self.snapshot()
    }

    fn restore(
        _: &mut DeviceContext<'_>,
        _: &(),
        state: &I8042Snapshot,
    ) -> Result<Self, DeviceError> {
        Ok(I8042::from_snapshot(state))
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmRequest> {
        let &byte = data.first()?;
        match offset {
            DATA_OFFSET => self.data(byte),
            COMMAND_OFFSET => self.command(byte),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn idle_status_is_no_data_and_ready() {
        let mut dev = I8042::new();
        let status = read(&mut dev, COMMAND_OFFSET);
        assert_eq!(status & STATUS_OUTPUT_FULL, 0, "no data");
        assert_eq!(status & 0x02, 0, "input buffer empty: ready for a command");
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
    }

    #[test]
    fn pulse_reset_requests_a_reset() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(COMMAND_OFFSET, &[0xfe]), Some(VmRequest::Reset));
        // Other pulse commands that leave the reset line alone do nothing.
        assert_eq!(dev.write(COMMAND_OFFSET, &[0xff]), None);
        // Writing the output port with the reset line low resets too.
        assert_eq!(dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]), None);
        assert_eq!(dev.write(DATA_OFFSET, &[0x02]), Some(VmRequest::Reset));
        assert_eq!(dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]), None);
        assert_eq!(dev.write(DATA_OFFSET, &[0x03]), None);
    }

    #[test]
    fn answers_polled_controller_commands() {
        let mut dev = I8042::new();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_PASSED);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);

        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x65]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x65);

        dev.write(COMMAND_OFFSET, &[CMD_TEST_KBD]);
        assert_eq!(read(&mut dev, DATA_OFFSET), PORT_TEST_PASSED);

        // A keyboard command gets no answer: no keyboard is attached.
        dev.write(DATA_OFFSET, &[0xff]);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn output_queue_is_bounded() {
        let mut dev = I8042::new();
        for _ in 0..100 {
            dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        }
        assert_eq!(dev.snapshot().output.len(), MAX_OUTPUT_BYTES);
    }

    #[test]
    fn snapshot_round_trips_through_serde() {
        let mut dev = I8042::new();
        dev.write(COMMAND_OFFSET, &[CMD_READ_OUTPUT_PORT]);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        let snap = dev.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: I8042Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let mut restored = I8042::from_snapshot(&back);
        // The pending CTR write and the unread byte both survive.
        restored.write(DATA_OFFSET, &[0x47]);
        assert_eq!(read(&mut restored, DATA_OFFSET), OUTPUT_PORT_DEFAULT);
        restored.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut restored, DATA_OFFSET), 0x47);
    }

    #[test]
    fn empty_and_wide_accesses_are_harmless() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(COMMAND_OFFSET, &[]), None);
        let mut wide = [0xaau8; 4];
        dev.read(COMMAND_OFFSET, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
        let mut other = [0u8; 1];
        dev.read(2, &mut other);
        assert_eq!(other, [0xff]);
    }
}
