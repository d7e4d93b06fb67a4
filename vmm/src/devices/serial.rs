//! The 16550A UART at 0x3f8 (COM1), IRQ 4, emulated by vm-superio.
//!
//! Its interrupt line is an eventfd registered with KVM as an irqfd for GSI 4. Its state
//! (registers, the receive FIFO with any bytes the guest has not read yet, pending interrupt
//! conditions) is part of the machine state, so input typed just before a live update is not
//! lost.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleOutput;
use super::{DeviceContext, DeviceError, Persist, PioDevice, VmRequest};

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORT_COUNT: u16 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through KVM's irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the VMM thread when the guest has drained the receive FIFO, so that it can feed more
/// pending input.
pub struct InputDrained(pub Arc<EventFd>);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        log::warn!("serial: a byte of guest output could not be written");
    }
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

pub type Uart = Serial<IrqTrigger, InputDrained, ConsoleOutput>;

pub struct SerialDevice {
    uart: Uart,
}

/// The UART's saved state (a serde mirror of vm-superio's `SerialState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// The UART's wiring: its interrupt line, the drained-FIFO event and the console.
    fn wiring(
        ctx: &mut DeviceContext<'_>,
    ) -> Result<(IrqTrigger, InputDrained, ConsoleOutput), DeviceError> {
        let irq = ctx.serial_irq.take().ok_or_else(|| {
            DeviceError::Setup("the UART's interrupt line is missing (a second UART?)".into())
        })?;
        Ok((
            IrqTrigger(irq),
            InputDrained(ctx.input_drained.clone()),
            ctx.console.clone(),
        ))
    }

    /// Queues typed input; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl Persist for SerialDevice {
    type State = SerialSnapshot;
    type Config = ();

    fn power_on(ctx: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
        let (irq, drained, out) = Self::wiring(ctx)?;
        Ok(SerialDevice {
            uart: Serial::with_events(irq, drained, out),
        })
    }

    fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(
        ctx: &mut DeviceContext<'_>,
        _: &(),
        snap: &SerialSnapshot,
    ) -> Result<Self, DeviceError> {
        let (irq, drained, out) = Self::wiring(ctx)?;
        let state = SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        Serial::from_state(&state, irq, drained, out)
            .map(|uart| SerialDevice { uart })
            .map_err(|e| DeviceError::InvalidState(format!("serial state rejected: {e:?}")))
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = self.uart.read(offset as u8);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmRequest> {
        if let Some(value) = data.first()
            && let Err(e) = self.uart.write(offset as u8, *value)
        {
            log::warn!("serial: write to register {offset} failed: {e:?}");
        }
        None
    }
}
