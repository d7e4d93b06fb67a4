//! The `vmm` library: every module of the VMM, declared here (and only here) so that the `vmm`
//! binary (src/main.rs) and the fuzz targets (fuzz/) use the same code.

pub mod boot;
pub mod cli;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod fuzzing;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod qmp;
pub mod unix_socket;
pub mod vcpu;

/// "0.1.0", or "0.1.0+TAG" for a build made with CPR_VMM_BUILD_TAG=TAG (see build.rs), which
/// tells apart two builds of one release; reported by `query-version`, logs and live updates.
pub const VERSION: &str = env!("CPR_VMM_VERSION");

pub fn version_string() -> String {
    VERSION.to_string()
}
