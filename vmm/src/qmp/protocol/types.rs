//! Typed wire structures: command arguments, command results and event data.
//!
//! Field names and enum strings are QEMU's (qapi/*.json).  Struct field order
//! is the order in which QEMU's hash-ordered dictionaries usually come out,
//! where that is known, so that captured traffic looks familiar; clients
//! must not (and the common ones do not) depend on key order.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::QmpError;

// ---------------------------------------------------------------------------
// Control

/// `QMPCapability`.  The monitor advertises none of them (no OOB support).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QmpCapability {
    /// Out-of-band command execution.
    Oob,
}

impl QmpCapability {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            QmpCapability::Oob => "oob",
        }
    }
}

/// Arguments of `qmp_capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpCapabilitiesArgs {
    /// Capabilities the client wants enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<Vec<QmpCapability>>,
}

/// `VersionTriple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    pub micro: i64,
    pub minor: i64,
    pub major: i64,
}

/// `VersionInfo`, the result of `query-version` and part of the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    /// QEMU's `--with-pkgversion` string; empty for upstream builds.
    pub package: String,
}

impl VersionInfo {
    /// Version info for the given QEMU-compatible version numbers.
    pub fn new(major: i64, minor: i64, micro: i64, package: impl Into<String>) -> Self {
        VersionInfo {
            qemu: VersionTriple {
                micro,
                minor,
                major,
            },
            package: package.into(),
        }
    }
}

/// One element of the `query-commands` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    pub name: String,
}

/// `NameInfo`, the result of `query-name`: the `-name` of the VM, if it has one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `BlockInfo`, one element of `query-block`: a disk and its medium.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    pub device: String,
    pub qdev: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub removable: bool,
    pub locked: bool,
    pub inserted: BlockDeviceInfo,
}

impl BlockInfo {
    /// A raw disk on a virtio-blk device as this VMM has them: no throttling, no encryption,
    /// through the page cache with flushes honoured.
    pub fn raw_disk(id: &str, file: &str, read_only: bool, size: u64) -> Self {
        BlockInfo {
            device: id.to_string(),
            qdev: format!("/machine/peripheral/{id}/virtio-backend"),
            kind: "unknown".into(),
            removable: false,
            locked: false,
            inserted: BlockDeviceInfo {
                file: file.to_string(),
                node_name: id.to_string(),
                ro: read_only,
                drv: "raw".into(),
                backing_file_depth: 0,
                encrypted: false,
                detect_zeroes: "off".into(),
                bps: 0,
                bps_rd: 0,
                bps_wr: 0,
                iops: 0,
                iops_rd: 0,
                iops_wr: 0,
                image: ImageInfo {
                    filename: file.to_string(),
                    format: "raw".into(),
                    virtual_size: i64::try_from(size).unwrap_or(i64::MAX),
                },
                cache: BlockdevCacheInfo {
                    writeback: true,
                    direct: false,
                    no_flush: false,
                },
                write_threshold: 0,
            },
        }
    }
}

/// `BlockDeviceInfo`: the image behind a disk (QEMU's required members; no throttling here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    pub file: String,
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub ro: bool,
    pub drv: String,
    pub backing_file_depth: i64,
    pub encrypted: bool,
    pub detect_zeroes: String,
    pub bps: i64,
    pub bps_rd: i64,
    pub bps_wr: i64,
    pub iops: i64,
    pub iops_rd: i64,
    pub iops_wr: i64,
    pub image: ImageInfo,
    pub cache: BlockdevCacheInfo,
    pub write_threshold: i64,
}

/// `ImageInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: i64,
}

/// `BlockdevCacheInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockdevCacheInfo {
    pub writeback: bool,
    pub direct: bool,
    #[serde(rename = "no-flush")]
    pub no_flush: bool,
}

/// `KvmInfo`, the result of `query-kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmInfo {
    pub enabled: bool,
    pub present: bool,
}

/// One element of the `query-events` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInfo {
    pub name: String,
}

/// One element of the `query-chardev` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChardevInfo {
    pub label: String,
    pub filename: String,
    #[serde(rename = "frontend-open")]
    pub frontend_open: bool,
}

/// One element of the `query-migrate-capabilities` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    pub capability: String,
    pub state: bool,
}

/// `HumanReadableText`, the result of the `x-query-*` commands (`x-query-registers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HumanReadableText {
    #[serde(rename = "human-readable-text")]
    pub human_readable_text: String,
}

/// `RxFilterInfo`, one element of `query-rx-filter`: a NIC's receive filter. This device has
/// no control queue, so the guest cannot narrow it: it takes every frame the tap gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RxFilterInfo {
    pub name: String,
    pub promiscuous: bool,
    pub multicast: String,
    pub unicast: String,
    pub vlan: String,
    pub broadcast_allowed: bool,
    pub multicast_overflow: bool,
    pub unicast_overflow: bool,
    pub main_mac: String,
    pub vlan_table: Vec<i64>,
    pub unicast_table: Vec<String>,
    pub multicast_table: Vec<String>,
}

impl RxFilterInfo {
    /// A NIC that receives everything, with its MAC.
    pub fn open_filter(name: &str, mac: &str) -> Self {
        RxFilterInfo {
            name: name.to_string(),
            promiscuous: true,
            multicast: "normal".into(),
            unicast: "normal".into(),
            vlan: "none".into(),
            broadcast_allowed: true,
            multicast_overflow: false,
            unicast_overflow: false,
            main_mac: mac.to_string(),
            vlan_table: Vec::new(),
            unicast_table: Vec::new(),
            multicast_table: Vec::new(),
        }
    }
}

/// Arguments of `query-rx-filter`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryRxFilterArgs {
    /// One NIC (its `-device ...,id=`), or (absent) all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The result of `x-query-cpr-command-line` (this VMM's): the argv the VMM was started with,
/// without `-incoming` and its value, and the QMP socket it listens on, so that a rollout tool
/// (`cpr-ctl`) builds the new VMM's command line without the operator retyping it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CprCommandLine {
    pub argv: Vec<String>,
    #[serde(
        rename = "qmp-socket",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub qmp_socket: Option<String>,
}

/// Arguments of `x-query-registers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryRegistersArgs {
    /// One vCPU, or (absent) all of them.
    #[serde(rename = "cpu-index", default, skip_serializing_if = "Option::is_none")]
    pub cpu_index: Option<i64>,
}

// ---------------------------------------------------------------------------
// Run state

/// `RunState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
}

impl RunState {
    /// QMP spelling (as HMP prints it too).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Debug => "debug",
            RunState::Inmigrate => "inmigrate",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Paused => "paused",
            RunState::Postmigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::FinishMigrate => "finish-migrate",
            RunState::RestoreVm => "restore-vm",
            RunState::Running => "running",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Colo => "colo",
        }
    }
}

/// `StatusInfo`, the result of `query-status`.  QEMU 9.0 removed the
/// deprecated `singlestep` member, so QEMU 10 sends just these two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub status: RunState,
    pub running: bool,
}

impl StatusInfo {
    /// QEMU reports `running` exactly when the state is `running`.
    pub fn from_state(status: RunState) -> Self {
        StatusInfo {
            status,
            running: status == RunState::Running,
        }
    }
}

/// `ShutdownCause`, the `reason` of SHUTDOWN and RESET events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownCause {
    None,
    HostError,
    HostQmpQuit,
    HostQmpSystemReset,
    HostSignal,
    HostUi,
    GuestShutdown,
    GuestReset,
    GuestPanic,
    SubsystemReset,
    SnapshotLoad,
}

impl ShutdownCause {
    /// QEMU's `shutdown_caused_by_guest()`: the `guest` flag of the events.
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown
                | ShutdownCause::GuestReset
                | ShutdownCause::GuestPanic
                | ShutdownCause::SnapshotLoad
        )
    }
}

// ---------------------------------------------------------------------------
// CPUs

/// The target name QEMU reports for x86-64 guests.
pub const TARGET_X86_64: &str = "x86_64";

/// `CpuInstanceProperties`: only the topology levels the machine has are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInstanceProperties {
    #[serde(rename = "node-id", default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<i64>,
    #[serde(rename = "drawer-id", default, skip_serializing_if = "Option::is_none")]
    pub drawer_id: Option<i64>,
    #[serde(rename = "book-id", default, skip_serializing_if = "Option::is_none")]
    pub book_id: Option<i64>,
    #[serde(rename = "socket-id", default, skip_serializing_if = "Option::is_none")]
    pub socket_id: Option<i64>,
    #[serde(rename = "die-id", default, skip_serializing_if = "Option::is_none")]
    pub die_id: Option<i64>,
    #[serde(
        rename = "cluster-id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster_id: Option<i64>,
    #[serde(rename = "module-id", default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<i64>,
    #[serde(rename = "core-id", default, skip_serializing_if = "Option::is_none")]
    pub core_id: Option<i64>,
    #[serde(rename = "thread-id", default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<i64>,
}

/// One element of the `query-cpus-fast` result (`CpuInfoFast`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfoFast {
    /// Host thread id (TID) of the vCPU thread.
    #[serde(rename = "thread-id")]
    pub thread_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<CpuInstanceProperties>,
    #[serde(rename = "qom-path")]
    pub qom_path: String,
    #[serde(rename = "cpu-index")]
    pub cpu_index: i64,
    /// `SysEmuTarget`, e.g. [`TARGET_X86_64`].
    pub target: String,
}

// ---------------------------------------------------------------------------
// Misc commands

/// Arguments of `pmemsave`.  QEMU types both numbers as `int` and would
/// loop forever on a negative size; we refuse negatives at parse time, so
/// the server gets unsigned values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemsaveArgs {
    /// Guest-physical start address.
    pub val: u64,
    /// Number of bytes.
    pub size: u64,
    pub filename: String,
}

/// Arguments of `human-monitor-command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HumanMonitorCommandArgs {
    #[serde(rename = "command-line")]
    pub command_line: String,
    /// CPU the HMP command applies to; QEMU answers an unknown index with
    /// [`QmpError::invalid_cpu_index`].
    #[serde(rename = "cpu-index", default, skip_serializing_if = "Option::is_none")]
    pub cpu_index: Option<i64>,
}

// ---------------------------------------------------------------------------
// Migration

/// `MigMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigMode {
    #[default]
    Normal,
    CprReboot,
    CprTransfer,
    CprExec,
}

impl MigMode {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MigMode::Normal => "normal",
            MigMode::CprReboot => "cpr-reboot",
            MigMode::CprTransfer => "cpr-transfer",
            MigMode::CprExec => "cpr-exec",
        }
    }
}

/// `ZeroPageDetection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ZeroPageDetection {
    #[serde(rename = "none")]
    Off,
    #[serde(rename = "legacy")]
    Legacy,
    #[serde(rename = "multifd")]
    Multifd,
}

impl ZeroPageDetection {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ZeroPageDetection::Off => "none",
            ZeroPageDetection::Legacy => "legacy",
            ZeroPageDetection::Multifd => "multifd",
        }
    }
}

/// `MultiFDCompression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MultiFdCompression {
    #[serde(rename = "none")]
    Off,
    #[serde(rename = "zlib")]
    Zlib,
    #[serde(rename = "zstd")]
    Zstd,
    #[serde(rename = "qpl")]
    Qpl,
    #[serde(rename = "uadk")]
    Uadk,
    #[serde(rename = "qatzip")]
    Qatzip,
}

impl MultiFdCompression {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MultiFdCompression::Off => "none",
            MultiFdCompression::Zlib => "zlib",
            MultiFdCompression::Zstd => "zstd",
            MultiFdCompression::Qpl => "qpl",
            MultiFdCompression::Uadk => "uadk",
            MultiFdCompression::Qatzip => "qatzip",
        }
    }
}

/// Deserialise a present member as `Some`, even when it is `null`
/// (plain `Option` would read `null` as absent).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// QAPI's `StrOrNull` alternate: `null` resets a TLS parameter to `""`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StrOrNull {
    Str(String),
    Null,
}

impl StrOrNull {
    /// The string QEMU stores for this value.
    pub fn into_string(self) -> String {
        match self {
            StrOrNull::Str(s) => s,
            StrOrNull::Null => String::new(),
        }
    }
}

/// Arguments of `migrate-set-parameters` (QEMU's `MigrateSetParameters`,
/// restricted to the members this monitor accepts; the others are rejected
/// as unexpected rather than silently dropped).  Only `mode` and
/// `cpr-exec-command` change behaviour; the rest are stored and reported
/// back so that management software that always sets them keeps working.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_tailslow: Option<bool>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_creds: Option<StrOrNull>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_hostname: Option<StrOrNull>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_authz: Option<StrOrNull>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultiFdCompression>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_page_detection: Option<ZeroPageDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_io: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpr_exec_command: Option<Vec<String>>,
    /// How long a cpr-exec update may take to resume the guest before its rescue guard rolls
    /// it back (0: only a process that dies is rescued). Our own member, hence `x-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_cpr_deadline_ms: Option<u64>,
}

/// Result of `query-migrate-parameters` (`MigrationParameters`), for the
/// members this monitor models.  `None` members are omitted on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_tailslow: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultiFdCompression>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_page_detection: Option<ZeroPageDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_io: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpr_exec_command: Option<Vec<String>>,
    /// How long a cpr-exec update may take to resume the guest before its rescue guard rolls
    /// it back (0: only a process that dies is rescued). Our own member, hence `x-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_cpr_deadline_ms: Option<u64>,
}

impl MigrationParameters {
    /// Every modelled member set to QEMU 10's default, so that
    /// `query-migrate-parameters` looks like a fresh QEMU's.
    pub fn qemu_defaults() -> Self {
        MigrationParameters {
            announce_initial: Some(50),
            announce_max: Some(550),
            announce_rounds: Some(5),
            announce_step: Some(100),
            throttle_trigger_threshold: Some(50),
            cpu_throttle_initial: Some(20),
            cpu_throttle_increment: Some(10),
            cpu_throttle_tailslow: Some(false),
            max_cpu_throttle: Some(99),
            tls_creds: Some(String::new()),
            tls_hostname: Some(String::new()),
            tls_authz: Some(String::new()),
            max_bandwidth: Some(128 << 20),
            avail_switchover_bandwidth: Some(0),
            max_postcopy_bandwidth: Some(0),
            downtime_limit: Some(300),
            multifd_channels: Some(2),
            multifd_compression: Some(MultiFdCompression::Off),
            zero_page_detection: Some(ZeroPageDetection::Multifd),
            xbzrle_cache_size: Some(64 << 20),
            mode: Some(MigMode::Normal),
            direct_io: Some(false),
            cpr_exec_command: Some(Vec::new()),
            x_cpr_deadline_ms: Some(crate::migration::rescue::DEFAULT_DEADLINE_MS),
        }
    }

    /// Members that change what a migration does here; every other member is stored and
    /// reported only.
    pub const EFFECTIVE: &'static [&'static str] =
        &["mode", "cpr-exec-command", "x-cpr-deadline-ms"];

    /// Refuse a request that would change a member this VMM does not act on (bandwidth
    /// limits, multifd, TLS, throttling...): accepting it would promise behaviour that does not
    /// happen. Setting such a member to the value it already has is accepted, so management
    /// software that always sends the defaults keeps working.
    pub fn check_effective(&self, p: &MigrateSetParameters) -> Result<(), QmpError> {
        let mut next = self.clone();
        next.apply(p);
        let (Ok(Value::Object(now)), Ok(Value::Object(next))) =
            (serde_json::to_value(self), serde_json::to_value(&next))
        else {
            return Ok(());
        };
        match next
            .iter()
            .find(|(k, v)| !Self::EFFECTIVE.contains(&k.as_str()) && now.get(k.as_str()) != Some(v))
        {
            Some((name, _)) => Err(QmpError::generic(format!(
                "Parameter '{name}' is not supported by this VMM: it can only keep its current value (see query-migrate-parameters); only {} take effect",
                Self::EFFECTIVE
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ))),
            None => Ok(()),
        }
    }

    /// Apply a `migrate-set-parameters` request (members it sets replace
    /// ours; a `null` TLS member becomes `""` as in QEMU).
    pub fn apply(&mut self, p: &MigrateSetParameters) {
        fn set<T: Clone>(dst: &mut Option<T>, src: &Option<T>) {
            if let Some(v) = src {
                *dst = Some(v.clone());
            }
        }
        set(&mut self.announce_initial, &p.announce_initial);
        set(&mut self.announce_max, &p.announce_max);
        set(&mut self.announce_rounds, &p.announce_rounds);
        set(&mut self.announce_step, &p.announce_step);
        set(
            &mut self.throttle_trigger_threshold,
            &p.throttle_trigger_threshold,
        );
        set(&mut self.cpu_throttle_initial, &p.cpu_throttle_initial);
        set(&mut self.cpu_throttle_increment, &p.cpu_throttle_increment);
        set(&mut self.cpu_throttle_tailslow, &p.cpu_throttle_tailslow);
        set(&mut self.max_cpu_throttle, &p.max_cpu_throttle);
        for (dst, src) in [
            (&mut self.tls_creds, &p.tls_creds),
            (&mut self.tls_hostname, &p.tls_hostname),
            (&mut self.tls_authz, &p.tls_authz),
        ] {
            if let Some(v) = src {
                *dst = Some(v.clone().into_string());
            }
        }
        set(&mut self.max_bandwidth, &p.max_bandwidth);
        set(
            &mut self.avail_switchover_bandwidth,
            &p.avail_switchover_bandwidth,
        );
        set(&mut self.max_postcopy_bandwidth, &p.max_postcopy_bandwidth);
        set(&mut self.downtime_limit, &p.downtime_limit);
        set(&mut self.multifd_channels, &p.multifd_channels);
        set(&mut self.multifd_compression, &p.multifd_compression);
        set(&mut self.zero_page_detection, &p.zero_page_detection);
        set(&mut self.xbzrle_cache_size, &p.xbzrle_cache_size);
        set(&mut self.mode, &p.mode);
        set(&mut self.direct_io, &p.direct_io);
        set(&mut self.cpr_exec_command, &p.cpr_exec_command);
        set(&mut self.x_cpr_deadline_ms, &p.x_cpr_deadline_ms);
    }
}

/// `MigrationStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
}

impl MigrationStatus {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
        }
    }
}

/// `MigrationStats` (the `ram` member of `query-migrate`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    pub transferred: i64,
    pub remaining: i64,
    pub total: i64,
    pub duplicate: i64,
    pub normal: i64,
    pub normal_bytes: i64,
    pub dirty_pages_rate: i64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    pub dirty_sync_count: i64,
    pub postcopy_requests: i64,
    pub page_size: i64,
    pub multifd_bytes: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
    pub dirty_sync_missed_zero_copy: u64,
}

/// `MigrationInfo`, the result of `query-migrate`.  All members are
/// optional: a VM that never migrated answers `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MigrationStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationStats>,
    /// Milliseconds since the migration started (total, once it ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<i64>,
    /// Set when `status` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_reasons: Option<Vec<String>>,
    /// This VMM's extension (QEMU has no such member): the blackout of a live update and where
    /// its time went.
    #[serde(rename = "x-cpr", default, skip_serializing_if = "Option::is_none")]
    pub x_cpr: Option<CprUpdateInfo>,
}

/// `x-cpr` in `query-migrate`: one live update as seen by the process that finished it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CprUpdateInfo {
    /// Guest stopped (old process) to guest running (this process), in nanoseconds.
    pub blackout_ns: u64,
    /// Consecutive phases of the blackout, in order.
    pub phases: Vec<CprPhase>,
    /// The VMM version the update came from.
    pub from_version: String,
    /// The VMM version that now runs the guest.
    pub to_version: String,
    /// True when the update failed and the previous version took the guest back.
    pub rolled_back: bool,
}

/// One phase of a live update's blackout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CprPhase {
    pub name: String,
    pub ns: u64,
}

/// `MigrationChannelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationChannelType {
    Main,
    Cpr,
}

impl MigrationChannelType {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationChannelType::Main => "main",
            MigrationChannelType::Cpr => "cpr",
        }
    }
}

/// `InetSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InetSocketAddress {
    pub host: String,
    pub port: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mptcp: Option<bool>,
}

/// `UnixSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSocketAddress {
    pub path: String,
    #[serde(rename = "abstract", default, skip_serializing_if = "Option::is_none")]
    pub is_abstract: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tight: Option<bool>,
}

/// `VsockSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSocketAddress {
    pub cid: String,
    pub port: String,
}

/// `FdSocketAddress`: a file descriptor number or a `getfd` name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdSocketAddress {
    pub str: String,
}

/// `SocketAddress` (flat union on `type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
    Vsock(VsockSocketAddress),
    Fd(FdSocketAddress),
}

/// `MigrationExecCommand`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationExecCommand {
    pub args: Vec<String>,
}

/// `FileMigrationArgs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMigrationArgs {
    pub filename: String,
    pub offset: u64,
}

/// `MigrationAddress` (flat union on `transport`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "lowercase")]
pub enum MigrationAddress {
    Socket(SocketAddress),
    Exec(MigrationExecCommand),
    Rdma(InetSocketAddress),
    File(FileMigrationArgs),
}

/// `MigrationChannel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationChannel {
    #[serde(rename = "channel-type")]
    pub channel_type: MigrationChannelType,
    pub addr: MigrationAddress,
}

/// Where an outgoing migration goes, once `uri`/`channels` are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationTargets {
    /// The main migration stream.
    pub main: MigrationAddress,
    /// The CPR state channel (required by `cpr-transfer` mode).
    pub cpr: Option<MigrationAddress>,
}

/// Arguments of `migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<MigrationChannel>>,
    /// Ignored by QEMU too (QMP `migrate` never blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach: Option<bool>,
    /// Resume a paused postcopy migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
}

impl MigrateArgs {
    /// QEMU's first step in `qmp_migrate`: exactly one of `uri`/`channels`
    /// (an empty list counts as absent, as QAPI represents it as NULL), at
    /// most one channel per type, a `main` channel, and a parseable URI.
    /// Call this before any state checks to keep QEMU's error precedence.
    pub fn targets(&self) -> Result<MigrationTargets, QmpError> {
        let channels = self.channels.as_deref().filter(|c| !c.is_empty());
        match (self.uri.as_deref(), channels) {
            (Some(uri), None) => Ok(MigrationTargets {
                main: parse_migration_uri(uri)?,
                cpr: None,
            }),
            (None, Some(channels)) => {
                let mut main = None;
                let mut cpr = None;
                for ch in channels {
                    let slot = match ch.channel_type {
                        MigrationChannelType::Main => &mut main,
                        MigrationChannelType::Cpr => &mut cpr,
                    };
                    if slot.is_some() {
                        return Err(QmpError::generic(format!(
                            "Channel list has more than one {} entry",
                            ch.channel_type.as_str()
                        )));
                    }
                    *slot = Some(ch.addr.clone());
                }
                match main {
                    Some(main) => Ok(MigrationTargets { main, cpr }),
                    None => Err(QmpError::generic("Channel list has no main entry")),
                }
            }
            _ => Err(QmpError::generic(
                "need either 'uri' or 'channels' argument",
            )),
        }
    }
}

/// Arguments of `migrate-incoming`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateIncomingArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<MigrationChannel>>,
    /// Exit QEMU when the incoming migration fails (default: true).
    #[serde(
        rename = "exit-on-error",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exit_on_error: Option<bool>,
}

impl MigrateIncomingArgs {
    /// QEMU's `qemu_start_incoming_migration` checks.  QEMU runs them only
    /// after refusing a second `migrate-incoming` ("The incoming migration
    /// has already been started") and a VM not started with `-incoming`
    /// ("'-incoming' was not specified on the command line"), so the server
    /// should make those checks first.  Like QEMU, the single channel's
    /// type is not checked.
    pub fn address(&self) -> Result<MigrationAddress, QmpError> {
        let channels = self.channels.as_deref().filter(|c| !c.is_empty());
        match (self.uri.as_deref(), channels) {
            (Some(uri), None) => parse_migration_uri(uri),
            (None, Some([ch])) => Ok(ch.addr.clone()),
            (None, Some(_)) => Err(QmpError::generic(
                "Channel list must have only one entry, for type 'main'",
            )),
            _ => Err(QmpError::generic(
                "need either 'uri' or 'channels' argument",
            )),
        }
    }
}

/// QEMU's `migrate_uri_parse`: `tcp:`, `unix:`, `vsock:`, `fd:`, `exec:`,
/// `rdma:` and `file:PATH[,offset=N]` URIs.
pub fn parse_migration_uri(uri: &str) -> Result<MigrationAddress, QmpError> {
    if let Some(cmd) = uri.strip_prefix("exec:") {
        return Ok(MigrationAddress::Exec(MigrationExecCommand {
            args: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        }));
    }
    if let Some(rest) = uri.strip_prefix("rdma:") {
        return Ok(MigrationAddress::Rdma(parse_inet(rest)?));
    }
    if let Some(path) = uri.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(QmpError::generic("invalid Unix socket address"));
        }
        return Ok(MigrationAddress::Socket(SocketAddress::Unix(
            UnixSocketAddress {
                path: path.into(),
                is_abstract: None,
                tight: None,
            },
        )));
    }
    if let Some(fd) = uri.strip_prefix("fd:") {
        if fd.is_empty() {
            return Err(QmpError::generic("invalid file descriptor address"));
        }
        return Ok(MigrationAddress::Socket(SocketAddress::Fd(
            FdSocketAddress { str: fd.into() },
        )));
    }
    if let Some(rest) = uri.strip_prefix("vsock:") {
        let bad = || QmpError::generic(format!("error parsing address '{rest}'"));
        let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !numeric(cid) || !numeric(port) {
            return Err(bad());
        }
        return Ok(MigrationAddress::Socket(SocketAddress::Vsock(
            VsockSocketAddress {
                cid: cid.into(),
                port: port.into(),
            },
        )));
    }
    if let Some(rest) = uri.strip_prefix("tcp:") {
        return Ok(MigrationAddress::Socket(SocketAddress::Inet(parse_inet(
            rest,
        )?)));
    }
    if let Some(spec) = uri.strip_prefix("file:") {
        let (filename, offset) = match spec.find(",offset=") {
            Some(pos) => {
                let opt = &spec[pos + ",offset=".len()..];
                let off = parse_size(opt).ok_or_else(|| {
                    QmpError::generic(format!("file URI has bad offset {opt}: Invalid argument"))
                })?;
                (&spec[..pos], off)
            }
            None => (spec, 0),
        };
        return Ok(MigrationAddress::File(FileMigrationArgs {
            filename: filename.into(),
            offset,
        }));
    }
    Err(QmpError::generic(format!(
        "unknown migration protocol: {uri}"
    )))
}

/// `host:port` or `[v6addr]:port`, with QEMU's `,option` suffixes ignored.
fn parse_inet(spec: &str) -> Result<InetSocketAddress, QmpError> {
    let bad = || QmpError::generic(format!("error parsing address '{spec}'"));
    let addr = spec.split(',').next().unwrap_or("");
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').ok_or_else(bad)?;
        (host, tail.strip_prefix(':').ok_or_else(bad)?)
    } else {
        addr.rsplit_once(':').ok_or_else(bad)?
    };
    if port.is_empty() {
        return Err(bad());
    }
    Ok(InetSocketAddress {
        host: host.into(),
        port: port.into(),
        numeric: None,
        to: None,
        ipv4: None,
        ipv6: None,
        keep_alive: None,
        mptcp: None,
    })
}

/// A byte count in QEMU's `qemu_strtosz` style: decimal or `0x` hex, with
/// an optional binary suffix (`B`, `K`, `M`, `G`, `T`, `P`, `E`).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    parse_size_with_default_unit(s, 1)
}

/// Like [`parse_size`], with the multiplier used when there is no suffix
/// (HMP's bandwidth parameters default to MiB).
pub(crate) fn parse_size_with_default_unit(s: &str, default_unit: u64) -> Option<u64> {
    let s = s.trim_start();
    let (digits, rest) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        (u64::from_str_radix(&hex[..end], 16).ok()?, &hex[end..])
    } else {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        (s[..end].parse::<u64>().ok()?, &s[end..])
    };
    let mult: u64 = match rest {
        "" => default_unit,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return None,
    };
    digits.checked_mul(mult)
}

// ---------------------------------------------------------------------------
// Events

/// Data-less events and the typed payloads of those this VMM emits.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// `SHUTDOWN` {guest, reason}: QEMU is about to exit (or stop, with -no-shutdown).
    Shutdown { guest: bool, reason: ShutdownCause },
    /// `RESET` {guest, reason}.
    Reset { guest: bool, reason: ShutdownCause },
    /// `STOP`, no data.
    Stop,
    /// `RESUME`, no data.
    Resume,
    /// `POWERDOWN`, no data (guest asked for ACPI power-off).
    Powerdown,
    /// `MIGRATION` {status} (QEMU sends it only with the `events` capability).
    Migration { status: MigrationStatus },
    /// `MIGRATION_PASS` {pass}.
    MigrationPass { pass: i64 },
    /// Any other event, data already in wire form (`None`: no `data` member).
    Other { name: String, data: Option<Value> },
}

impl EventKind {
    /// SHUTDOWN with `guest` derived from the cause, as QEMU does.
    pub fn shutdown(reason: ShutdownCause) -> Self {
        EventKind::Shutdown {
            guest: reason.is_guest(),
            reason,
        }
    }

    /// RESET with `guest` derived from the cause, as QEMU does.
    pub fn reset(reason: ShutdownCause) -> Self {
        EventKind::Reset {
            guest: reason.is_guest(),
            reason,
        }
    }

    /// Wire name.
    pub fn name(&self) -> &str {
        match self {
            EventKind::Shutdown { .. } => "SHUTDOWN",
            EventKind::Reset { .. } => "RESET",
            EventKind::Stop => "STOP",
            EventKind::Resume => "RESUME",
            EventKind::Powerdown => "POWERDOWN",
            EventKind::Migration { .. } => "MIGRATION",
            EventKind::MigrationPass { .. } => "MIGRATION_PASS",
            EventKind::Other { name, .. } => name,
        }
    }

    /// Wire `data` member, `None` for events QEMU sends without one.
    pub fn data(&self) -> Option<Value> {
        #[derive(Serialize)]
        struct GuestReason {
            guest: bool,
            reason: ShutdownCause,
        }
        #[derive(Serialize)]
        struct Status {
            status: MigrationStatus,
        }
        #[derive(Serialize)]
        struct Pass {
            pass: i64,
        }
        match self {
            EventKind::Shutdown { guest, reason } | EventKind::Reset { guest, reason } => {
                serde_json::to_value(GuestReason {
                    guest: *guest,
                    reason: *reason,
                })
                .ok()
            }
            EventKind::Stop | EventKind::Resume | EventKind::Powerdown => None,
            EventKind::Migration { status } => {
                serde_json::to_value(Status { status: *status }).ok()
            }
            EventKind::MigrationPass { pass } => serde_json::to_value(Pass { pass: *pass }).ok(),
            EventKind::Other { data, .. } => data.clone(),
        }
    }
}
