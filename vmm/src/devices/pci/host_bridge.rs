//! The host bridge at 00:00.0: what a PCI bus scan finds first on a PC. It has no BARs; its
//! configuration space (the command register a guest may set) is its state.

use super::PciFunction;
use super::config_space::{ConfigSpace, ConfigSpaceState, FunctionId};
use crate::devices::{DeviceContext, DeviceError, Persist, VmRequest};

/// Intel's id for a generic host bridge (what Firecracker and Cloud Hypervisor show, too).
const HOST_BRIDGE_ID: FunctionId = FunctionId {
    vendor: 0x8086,
    device: 0x0d57,
    class: 0x06,
    subclass: 0x00,
    prog_if: 0,
    revision: 0,
    subsystem_vendor: 0,
    subsystem: 0,
};

pub struct HostBridge {
    config: ConfigSpace,
}

impl Persist for HostBridge {
    type State = ConfigSpaceState;
    type Config = ();

    fn power_on(_: &mut DeviceContext<'_>, _: &()) -> Result<Self, DeviceError> {
        Ok(HostBridge {
            config: ConfigSpace::new(HOST_BRIDGE_ID),
        })
    }

    fn save(&self) -> ConfigSpaceState {
        self.config.save()
    }

    fn restore(
        ctx: &mut DeviceContext<'_>,
        _: &(),
        state: &ConfigSpaceState,
    ) -> Result<Self, DeviceError> {
        let mut bridge = Self::power_on(ctx, &())?;
        bridge
            .config
            .restore_values(state)
            .map_err(|e| DeviceError::InvalidState(e.to_string()))?;
        Ok(bridge)
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bar_ranges(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }

    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) -> Option<VmRequest> {
        None
    }
}
