//! The debug exit port: a guest (a test payload) writes one byte to end the VMM with that exit
//! status. Like QEMU's isa-debug-exit, but the status is the byte itself.

use super::{DeviceContext, DeviceError, Persist, PioDevice, VmRequest};

pub const DEBUG_EXIT_PORT: u16 = crate::boot::DEBUG_EXIT_PORT;

pub struct DebugExit;

/// Stateless: nothing to save.
impl Persist for DebugExit {
    type State = ();
    type Config = ();

    fn power_on(_: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
        Ok(DebugExit)
    }

    fn save(&self) {}

    fn restore(_: &mut DeviceContext<'_>, _: &(), _: &()) -> Result<Self, DeviceError> {
        Ok(DebugExit)
    }
}

impl PioDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> Option<VmRequest> {
        data.first().map(|code| VmRequest::Exit(*code))
    }
}
