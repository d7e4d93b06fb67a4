//! The command table and request parsing.
//!
//! [`COMMANDS`] is the single source of truth: each entry names a command,
//! declares its arguments with the [`schema`](super::schema) types (copied
//! from QEMU's qapi/*.json) and says how to build the typed [`Command`].
//! Adding a command means adding one entry and one enum variant.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::schema::{
    Body, EnumDef, IntrospectCommand, IntrospectEvent, Member, Ty, check_args, introspect, opt, req,
};
use super::types::*;
use super::{QmpError, Response};

/// A validated command with typed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    QmpCapabilities(QmpCapabilitiesArgs),
    QueryStatus,
    Stop,
    Cont,
    Quit,
    SystemReset,
    QueryCpusFast,
    Pmemsave(PmemsaveArgs),
    HumanMonitor(HumanMonitorCommandArgs),
    QueryVersion,
    QueryCommands,
    /// Boxed: by far the largest argument set.
    MigrateSetParameters(Box<MigrateSetParameters>),
    QueryMigrateParameters,
    Migrate(MigrateArgs),
    QueryMigrate,
    MigrateIncoming(MigrateIncomingArgs),
    MigrateCancel,
    QueryName,
    QueryKvm,
    QueryBlock,
    QueryEvents,
    QueryChardev,
    QueryMigrateCapabilities,
    SystemPowerdown,
    QueryQmpSchema,
    QueryRegisters(QueryRegistersArgs),
    QueryRxFilter(QueryRxFilterArgs),
    QueryNetwork,
    QueryCprCommandLine,
}

impl Command {
    /// The QMP name of this command.
    pub fn name(&self) -> &'static str {
        match self {
            Command::QmpCapabilities(_) => "qmp_capabilities",
            Command::QueryStatus => "query-status",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::Quit => "quit",
            Command::SystemReset => "system_reset",
            Command::QueryCpusFast => "query-cpus-fast",
            Command::Pmemsave(_) => "pmemsave",
            Command::HumanMonitor(_) => "human-monitor-command",
            Command::QueryVersion => "query-version",
            Command::QueryCommands => "query-commands",
            Command::MigrateSetParameters(_) => "migrate-set-parameters",
            Command::QueryMigrateParameters => "query-migrate-parameters",
            Command::Migrate(_) => "migrate",
            Command::QueryMigrate => "query-migrate",
            Command::MigrateIncoming(_) => "migrate-incoming",
            Command::MigrateCancel => "migrate_cancel",
            Command::QueryName => "query-name",
            Command::QueryKvm => "query-kvm",
            Command::QueryBlock => "query-block",
            Command::QueryEvents => "query-events",
            Command::QueryChardev => "query-chardev",
            Command::QueryMigrateCapabilities => "query-migrate-capabilities",
            Command::SystemPowerdown => "system_powerdown",
            Command::QueryQmpSchema => "query-qmp-schema",
            Command::QueryRegisters(_) => "x-query-registers",
            Command::QueryRxFilter(_) => "query-rx-filter",
            Command::QueryNetwork => "x-query-network",
            Command::QueryCprCommandLine => "x-query-cpr-command-line",
        }
    }
}

/// One command: name, argument schema, constructor.
pub struct CommandSpec {
    /// QMP name.
    pub name: &'static str,
    /// Argument members, in QEMU's schema order.
    pub args: &'static [Member],
    /// What a successful reply's `return` holds (for `query-qmp-schema`; a test checks every
    /// result the monitor builds against it).
    pub ret: &'static Ty,
    /// Builds the command from arguments that passed `args`.
    build: fn(Value) -> Result<Command, QmpError>,
}

impl std::fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandSpec")
            .field("name", &self.name)
            .field("args", &self.args)
            .field("ret", &self.ret)
            .finish()
    }
}

impl CommandSpec {
    /// Validate `arguments` and build the command.
    pub fn parse(&self, args: &Map<String, Value>) -> Result<Command, QmpError> {
        let checked = check_args(self.args, args).map_err(|e| QmpError::generic(e.to_string()))?;
        (self.build)(checked)
    }
}

// --- enumerations -----------------------------------------------------------

static QMP_CAPABILITY: EnumDef = EnumDef {
    name: "QMPCapability",
    values: &["oob"],
};
static MIG_MODE: EnumDef = EnumDef {
    name: "MigMode",
    values: &["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"],
};
static ZERO_PAGE_DETECTION: EnumDef = EnumDef {
    name: "ZeroPageDetection",
    values: &["none", "legacy", "multifd"],
};
static MULTIFD_COMPRESSION: EnumDef = EnumDef {
    name: "MultiFDCompression",
    values: &["none", "zlib", "zstd", "qpl", "uadk", "qatzip"],
};
static MIGRATION_CHANNEL_TYPE: EnumDef = EnumDef {
    name: "MigrationChannelType",
    values: &["main", "cpr"],
};
static MIGRATION_ADDRESS_TYPE: EnumDef = EnumDef {
    name: "MigrationAddressType",
    values: &["socket", "exec", "rdma", "file"],
};
static SOCKET_ADDRESS_TYPE: EnumDef = EnumDef {
    name: "SocketAddressType",
    values: &["inet", "unix", "vsock", "fd"],
};

// --- object types (qapi/sockets.json, qapi/migration.json) ------------------

static INET_SOCKET_ADDRESS: Body = Body::Struct(&[
    req("host", Ty::Str),
    req("port", Ty::Str),
    opt("numeric", Ty::Bool),
    opt("to", Ty::UintN(u16::MAX as u64, "uint16_t")),
    opt("ipv4", Ty::Bool),
    opt("ipv6", Ty::Bool),
    opt("keep-alive", Ty::Bool),
    opt("mptcp", Ty::Bool),
]);
static UNIX_SOCKET_ADDRESS: Body = Body::Struct(&[
    req("path", Ty::Str),
    opt("abstract", Ty::Bool),
    opt("tight", Ty::Bool),
]);
static VSOCK_SOCKET_ADDRESS: Body = Body::Struct(&[req("cid", Ty::Str), req("port", Ty::Str)]);
static FD_SOCKET_ADDRESS: Body = Body::Struct(&[req("str", Ty::Str)]);
static SOCKET_ADDRESS: Body = Body::Union {
    base: &[req("type", Ty::Enum(&SOCKET_ADDRESS_TYPE))],
    discriminator: "type",
    variants: &[
        ("inet", &INET_SOCKET_ADDRESS),
        ("unix", &UNIX_SOCKET_ADDRESS),
        ("vsock", &VSOCK_SOCKET_ADDRESS),
        ("fd", &FD_SOCKET_ADDRESS),
    ],
};
static MIGRATION_EXEC_COMMAND: Body = Body::Struct(&[req("args", Ty::List(&Ty::Str))]);
static FILE_MIGRATION_ARGS: Body =
    Body::Struct(&[req("filename", Ty::Str), req("offset", Ty::Uint64)]);
static MIGRATION_ADDRESS: Body = Body::Union {
    base: &[req("transport", Ty::Enum(&MIGRATION_ADDRESS_TYPE))],
    discriminator: "transport",
    variants: &[
        ("socket", &SOCKET_ADDRESS),
        ("exec", &MIGRATION_EXEC_COMMAND),
        ("rdma", &INET_SOCKET_ADDRESS),
        ("file", &FILE_MIGRATION_ARGS),
    ],
};
static MIGRATION_CHANNEL: Body = Body::Struct(&[
    req("channel-type", Ty::Enum(&MIGRATION_CHANNEL_TYPE)),
    req("addr", Ty::Object(&MIGRATION_ADDRESS)),
]);
static MIGRATION_CHANNEL_TY: Ty = Ty::Object(&MIGRATION_CHANNEL);

const UINT8: Ty = Ty::UintN(u8::MAX as u64, "uint8_t");

/// `MigrateSetParameters` members this monitor accepts, in QEMU's order.
/// Anything else QEMU knows (x-checkpoint-delay, multifd-*-level,
/// block-bitmap-mapping, vcpu-dirty-limit, ...) is "unexpected" here.
pub static MIGRATE_SET_PARAMETERS: &[Member] = &[
    opt("announce-initial", Ty::Size),
    opt("announce-max", Ty::Size),
    opt("announce-rounds", Ty::Size),
    opt("announce-step", Ty::Size),
    opt("throttle-trigger-threshold", UINT8),
    opt("cpu-throttle-initial", UINT8),
    opt("cpu-throttle-increment", UINT8),
    opt("cpu-throttle-tailslow", Ty::Bool),
    opt("tls-creds", Ty::StrOrNull),
    opt("tls-hostname", Ty::StrOrNull),
    opt("tls-authz", Ty::StrOrNull),
    opt("max-bandwidth", Ty::Size),
    opt("avail-switchover-bandwidth", Ty::Size),
    opt("downtime-limit", Ty::Uint64),
    opt("multifd-channels", UINT8),
    opt("xbzrle-cache-size", Ty::Size),
    opt("max-postcopy-bandwidth", Ty::Size),
    opt("max-cpu-throttle", UINT8),
    opt("multifd-compression", Ty::Enum(&MULTIFD_COMPRESSION)),
    opt("mode", Ty::Enum(&MIG_MODE)),
    opt("zero-page-detection", Ty::Enum(&ZERO_PAGE_DETECTION)),
    opt("direct-io", Ty::Bool),
    opt("cpr-exec-command", Ty::List(&Ty::Str)),
    opt("x-cpr-deadline-ms", Ty::Uint64),
];

/// Every `MigrationParameter` name QEMU 10.2 knows (HMP tells "unknown"
/// from "not supported here" with it).
pub static QEMU_MIGRATION_PARAMETERS: &[&str] = &[
    "announce-initial",
    "announce-max",
    "announce-rounds",
    "announce-step",
    "throttle-trigger-threshold",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "cpu-throttle-tailslow",
    "tls-creds",
    "tls-hostname",
    "tls-authz",
    "max-bandwidth",
    "avail-switchover-bandwidth",
    "downtime-limit",
    "x-checkpoint-delay",
    "multifd-channels",
    "multifd-compression",
    "multifd-zlib-level",
    "multifd-qatzip-level",
    "multifd-zstd-level",
    "xbzrle-cache-size",
    "max-postcopy-bandwidth",
    "max-cpu-throttle",
    "block-bitmap-mapping",
    "x-vcpu-dirty-limit-period",
    "vcpu-dirty-limit",
    "mode",
    "zero-page-detection",
    "direct-io",
    "cpr-exec-command",
    // Ours, not QEMU's: the cpr-exec rescue guard's deadline.
    "x-cpr-deadline-ms",
];

fn de<T: DeserializeOwned>(v: Value) -> Result<T, QmpError> {
    // The schema check guarantees the shape; a failure here means the
    // schema and the Rust type disagree.
    serde_json::from_value(v).map_err(|e| QmpError::generic(format!("internal error: {e}")))
}

// --- result types (qapi/*.json), for query-qmp-schema ------------------------

static EMPTY_BODY: Body = Body::Struct(&[]);
/// `{}`: the result of every command that returns nothing.
static EMPTY: Ty = Ty::Object(&EMPTY_BODY);

static RUN_STATE: EnumDef = EnumDef {
    name: "RunState",
    values: &[
        "debug",
        "inmigrate",
        "internal-error",
        "io-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "finish-migrate",
        "restore-vm",
        "running",
        "save-vm",
        "shutdown",
        "suspended",
        "watchdog",
        "guest-panicked",
        "colo",
    ],
};
static STATUS_INFO: Ty = Ty::Object(&Body::Struct(&[
    req("running", Ty::Bool),
    req("status", Ty::Enum(&RUN_STATE)),
]));
static VERSION_TRIPLE: Body = Body::Struct(&[
    req("major", Ty::Int),
    req("minor", Ty::Int),
    req("micro", Ty::Int),
]);
static VERSION_INFO: Ty = Ty::Object(&Body::Struct(&[
    req("qemu", Ty::Object(&VERSION_TRIPLE)),
    req("package", Ty::Str),
]));
static COMMAND_INFO: Ty = Ty::Object(&Body::Struct(&[req("name", Ty::Str)]));
static COMMAND_INFO_LIST: Ty = Ty::List(&COMMAND_INFO);
static SYS_EMU_TARGET: EnumDef = EnumDef {
    name: "SysEmuTarget",
    values: &["x86_64"],
};
static CPU_INSTANCE_PROPERTIES: Body = Body::Struct(&[
    opt("node-id", Ty::Int),
    opt("drawer-id", Ty::Int),
    opt("book-id", Ty::Int),
    opt("socket-id", Ty::Int),
    opt("die-id", Ty::Int),
    opt("cluster-id", Ty::Int),
    opt("module-id", Ty::Int),
    opt("core-id", Ty::Int),
    opt("thread-id", Ty::Int),
]);
static CPU_INFO_FAST: Ty = Ty::Object(&Body::Struct(&[
    req("cpu-index", Ty::Int),
    req("qom-path", Ty::Str),
    req("thread-id", Ty::Int),
    opt("props", Ty::Object(&CPU_INSTANCE_PROPERTIES)),
    req("target", Ty::Enum(&SYS_EMU_TARGET)),
]));
static CPU_INFO_FAST_LIST: Ty = Ty::List(&CPU_INFO_FAST);
/// `query-migrate-parameters` returns the members `migrate-set-parameters` takes. (QEMU types
/// the TLS members of the result `str` rather than `StrOrNull`; the values sent are strings,
/// which both describe.)
static MIGRATION_PARAMETERS: Ty = Ty::Object(&Body::Struct(MIGRATE_SET_PARAMETERS));
static MIGRATION_STATUS: EnumDef = EnumDef {
    name: "MigrationStatus",
    values: &[
        "none",
        "setup",
        "cancelling",
        "cancelled",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
        "completed",
        "failed",
        "colo",
        "pre-switchover",
        "device",
        "wait-unplug",
    ],
};
static MIGRATION_STATS: Body = Body::Struct(&[
    req("transferred", Ty::Int),
    req("remaining", Ty::Int),
    req("total", Ty::Int),
    req("duplicate", Ty::Int),
    req("normal", Ty::Int),
    req("normal-bytes", Ty::Int),
    req("dirty-pages-rate", Ty::Int),
    req("mbps", Ty::Number),
    req("dirty-sync-count", Ty::Int),
    req("postcopy-requests", Ty::Int),
    req("page-size", Ty::Int),
    req("multifd-bytes", Ty::Uint64),
    req("pages-per-second", Ty::Uint64),
    req("precopy-bytes", Ty::Uint64),
    req("downtime-bytes", Ty::Uint64),
    req("postcopy-bytes", Ty::Uint64),
    req("dirty-sync-missed-zero-copy", Ty::Uint64),
]);
static CPR_PHASE: Ty = Ty::Object(&Body::Struct(&[
    req("name", Ty::Str),
    req("ns", Ty::Uint64),
]));
/// This VMM's `x-cpr` member of `query-migrate` (QEMU has none).
static CPR_UPDATE_INFO: Body = Body::Struct(&[
    req("blackout-ns", Ty::Uint64),
    req("phases", Ty::List(&CPR_PHASE)),
    req("from-version", Ty::Str),
    req("to-version", Ty::Str),
    req("rolled-back", Ty::Bool),
]);
static MIGRATION_INFO: Ty = Ty::Object(&Body::Struct(&[
    opt("status", Ty::Enum(&MIGRATION_STATUS)),
    opt("ram", Ty::Object(&MIGRATION_STATS)),
    opt("total-time", Ty::Int),
    opt("expected-downtime", Ty::Int),
    opt("downtime", Ty::Int),
    opt("setup-time", Ty::Int),
    opt("cpu-throttle-percentage", Ty::Int),
    opt("error-desc", Ty::Str),
    opt("blocked-reasons", Ty::List(&Ty::Str)),
    opt("x-cpr", Ty::Object(&CPR_UPDATE_INFO)),
]));
static NAME_INFO: Ty = Ty::Object(&Body::Struct(&[opt("name", Ty::Str)]));
static IMAGE_INFO: Body = Body::Struct(&[
    req("filename", Ty::Str),
    req("format", Ty::Str),
    req("virtual-size", Ty::Int),
]);
static BLOCKDEV_CACHE_INFO: Body = Body::Struct(&[
    req("writeback", Ty::Bool),
    req("direct", Ty::Bool),
    req("no-flush", Ty::Bool),
]);
static BLOCK_DEVICE_INFO: Body = Body::Struct(&[
    req("file", Ty::Str),
    opt("node-name", Ty::Str),
    req("ro", Ty::Bool),
    req("drv", Ty::Str),
    req("backing_file_depth", Ty::Int),
    req("encrypted", Ty::Bool),
    req("detect_zeroes", Ty::Str),
    req("bps", Ty::Int),
    req("bps_rd", Ty::Int),
    req("bps_wr", Ty::Int),
    req("iops", Ty::Int),
    req("iops_rd", Ty::Int),
    req("iops_wr", Ty::Int),
    req("image", Ty::Object(&IMAGE_INFO)),
    req("cache", Ty::Object(&BLOCKDEV_CACHE_INFO)),
    req("write_threshold", Ty::Int),
]);
static BLOCK_INFO: Ty = Ty::Object(&Body::Struct(&[
    req("device", Ty::Str),
    opt("qdev", Ty::Str),
    req("type", Ty::Str),
    req("removable", Ty::Bool),
    req("locked", Ty::Bool),
    opt("inserted", Ty::Object(&BLOCK_DEVICE_INFO)),
]));
static BLOCK_INFO_LIST: Ty = Ty::List(&BLOCK_INFO);
static KVM_INFO: Ty = Ty::Object(&Body::Struct(&[
    req("enabled", Ty::Bool),
    req("present", Ty::Bool),
]));
static EVENT_INFO_LIST: Ty = Ty::List(&COMMAND_INFO);
static CHARDEV_INFO: Ty = Ty::Object(&Body::Struct(&[
    req("label", Ty::Str),
    req("filename", Ty::Str),
    req("frontend-open", Ty::Bool),
]));
static CHARDEV_INFO_LIST: Ty = Ty::List(&CHARDEV_INFO);
static RX_STATE: EnumDef = EnumDef {
    name: "RxState",
    values: &["normal", "none", "all"],
};
static RX_FILTER_INFO: Ty = Ty::Object(&Body::Struct(&[
    req("name", Ty::Str),
    req("promiscuous", Ty::Bool),
    req("multicast", Ty::Enum(&RX_STATE)),
    req("unicast", Ty::Enum(&RX_STATE)),
    req("vlan", Ty::Enum(&RX_STATE)),
    req("broadcast-allowed", Ty::Bool),
    req("multicast-overflow", Ty::Bool),
    req("unicast-overflow", Ty::Bool),
    req("main-mac", Ty::Str),
    req("vlan-table", Ty::List(&Ty::Int)),
    req("unicast-table", Ty::List(&Ty::Str)),
    req("multicast-table", Ty::List(&Ty::Str)),
]));
static RX_FILTER_INFO_LIST: Ty = Ty::List(&RX_FILTER_INFO);
static MIGRATION_CAPABILITY: EnumDef = EnumDef {
    name: "MigrationCapability",
    values: MIGRATION_CAPABILITIES,
};
static MIGRATION_CAPABILITY_STATUS: Ty = Ty::Object(&Body::Struct(&[
    req("capability", Ty::Enum(&MIGRATION_CAPABILITY)),
    req("state", Ty::Bool),
]));
static MIGRATION_CAPABILITY_STATUS_LIST: Ty = Ty::List(&MIGRATION_CAPABILITY_STATUS);
/// `x-query-cpr-command-line`: what a rollout tool needs to build a VM's `cpr-exec-command`.
static CPR_COMMAND_LINE: Ty = Ty::Object(&Body::Struct(&[
    req("argv", Ty::List(&Ty::Str)),
    opt("qmp-socket", Ty::Str),
]));
static HUMAN_READABLE_TEXT: Ty = Ty::Object(&Body::Struct(&[req("human-readable-text", Ty::Str)]));
/// `SchemaInfo` is described loosely (as `any` elements): it is the schema of the schema.
static SCHEMA_INFO_LIST: Ty = Ty::List(&Ty::Any);

/// QEMU 10.2's `MigrationCapability` values, in its order. This VMM has none of them to
/// offer except `events` (it always sends MIGRATION events), so `query-migrate-capabilities`
/// reports every other one as off.
pub static MIGRATION_CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
];

/// The `query-migrate-capabilities` result: only `events` is on.
pub fn migrate_capabilities() -> Vec<MigrationCapabilityStatus> {
    MIGRATION_CAPABILITIES
        .iter()
        .map(|c| MigrationCapabilityStatus {
            capability: (*c).to_owned(),
            state: *c == "events",
        })
        .collect()
}

static SHUTDOWN_CAUSE: EnumDef = EnumDef {
    name: "ShutdownCause",
    values: &[
        "none",
        "host-error",
        "host-qmp-quit",
        "host-qmp-system-reset",
        "host-signal",
        "host-ui",
        "guest-shutdown",
        "guest-reset",
        "guest-panic",
        "subsystem-reset",
        "snapshot-load",
    ],
};

/// The events this monitor sends, with the members of their `data` (QEMU's qapi/run-state.json
/// and qapi/migration.json).
pub static EVENTS: &[IntrospectEvent] = &[
    IntrospectEvent {
        name: "SHUTDOWN",
        data: &[
            req("guest", Ty::Bool),
            req("reason", Ty::Enum(&SHUTDOWN_CAUSE)),
        ],
    },
    IntrospectEvent {
        name: "RESET",
        data: &[
            req("guest", Ty::Bool),
            req("reason", Ty::Enum(&SHUTDOWN_CAUSE)),
        ],
    },
    IntrospectEvent {
        name: "STOP",
        data: &[],
    },
    IntrospectEvent {
        name: "RESUME",
        data: &[],
    },
    IntrospectEvent {
        name: "MIGRATION",
        data: &[req("status", Ty::Enum(&MIGRATION_STATUS))],
    },
];

/// The `query-events` result.
pub fn query_events() -> Vec<EventInfo> {
    EVENTS
        .iter()
        .map(|e| EventInfo {
            name: e.name.to_owned(),
        })
        .collect()
}

/// The `query-qmp-schema` result, generated from [`COMMANDS`] and [`EVENTS`].
pub fn query_qmp_schema() -> Vec<Value> {
    let commands: Vec<IntrospectCommand> = COMMANDS
        .iter()
        .map(|c| IntrospectCommand {
            name: c.name,
            args: c.args,
            ret: c.ret,
        })
        .collect();
    introspect(&commands, EVENTS)
}

/// pmemsave as QEMU types it (`int`), before the sign check.
#[derive(Deserialize, Serialize)]
struct PmemsaveWire {
    val: i64,
    size: i64,
    filename: String,
}

fn build_pmemsave(v: Value) -> Result<Command, QmpError> {
    let w: PmemsaveWire = de(v)?;
    let nonneg = |name: &str, n: i64| {
        u64::try_from(n).map_err(|_| {
            QmpError::generic(format!("Parameter '{name}' expects a non-negative value"))
        })
    };
    Ok(Command::Pmemsave(PmemsaveArgs {
        val: nonneg("val", w.val)?,
        size: nonneg("size", w.size)?,
        filename: w.filename,
    }))
}

/// `migrate`: `resume` continues a paused postcopy migration, and there is no postcopy here,
/// so it is refused (after the address checks, in QEMU's order) rather than ignored.
fn build_migrate(v: Value) -> Result<Command, QmpError> {
    let args: MigrateArgs = de(v)?;
    if args.resume == Some(true) {
        args.targets()?;
        return Err(QmpError::generic(
            "Cannot resume if there is no paused migration",
        ));
    }
    Ok(Command::Migrate(args))
}

/// The commands this monitor implements.
pub static COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "qmp_capabilities",
        args: &[opt("enable", Ty::List(&Ty::Enum(&QMP_CAPABILITY)))],
        ret: &EMPTY,
        build: |v| Ok(Command::QmpCapabilities(de(v)?)),
    },
    CommandSpec {
        name: "query-status",
        args: &[],
        ret: &STATUS_INFO,
        build: |_| Ok(Command::QueryStatus),
    },
    CommandSpec {
        name: "stop",
        args: &[],
        ret: &EMPTY,
        build: |_| Ok(Command::Stop),
    },
    CommandSpec {
        name: "cont",
        args: &[],
        ret: &EMPTY,
        build: |_| Ok(Command::Cont),
    },
    CommandSpec {
        name: "quit",
        args: &[],
        ret: &EMPTY,
        build: |_| Ok(Command::Quit),
    },
    CommandSpec {
        name: "system_reset",
        args: &[],
        ret: &EMPTY,
        build: |_| Ok(Command::SystemReset),
    },
    CommandSpec {
        name: "query-cpus-fast",
        args: &[],
        ret: &CPU_INFO_FAST_LIST,
        build: |_| Ok(Command::QueryCpusFast),
    },
    CommandSpec {
        name: "pmemsave",
        args: &[
            req("val", Ty::Int),
            req("size", Ty::Int),
            req("filename", Ty::Str),
        ],
        ret: &EMPTY,
        build: build_pmemsave,
    },
    CommandSpec {
        name: "human-monitor-command",
        args: &[req("command-line", Ty::Str), opt("cpu-index", Ty::Int)],
        ret: &Ty::Str,
        build: |v| Ok(Command::HumanMonitor(de(v)?)),
    },
    CommandSpec {
        name: "query-version",
        args: &[],
        ret: &VERSION_INFO,
        build: |_| Ok(Command::QueryVersion),
    },
    CommandSpec {
        name: "query-commands",
        args: &[],
        ret: &COMMAND_INFO_LIST,
        build: |_| Ok(Command::QueryCommands),
    },
    CommandSpec {
        name: "migrate-set-parameters",
        args: MIGRATE_SET_PARAMETERS,
        ret: &EMPTY,
        build: |v| Ok(Command::MigrateSetParameters(de(v)?)),
    },
    CommandSpec {
        name: "query-migrate-parameters",
        args: &[],
        ret: &MIGRATION_PARAMETERS,
        build: |_| Ok(Command::QueryMigrateParameters),
    },
    CommandSpec {
        name: "migrate",
        args: &[
            opt("uri", Ty::Str),
            opt("channels", Ty::List(&MIGRATION_CHANNEL_TY)),
            opt("detach", Ty::Bool),
            opt("resume", Ty::Bool),
        ],
        ret: &EMPTY,
        build: build_migrate,
    },
    CommandSpec {
        name: "query-migrate",
        args: &[],
        ret: &MIGRATION_INFO,
        build: |_| Ok(Command::QueryMigrate),
    },
    CommandSpec {
        name: "migrate-incoming",
        args: &[
            opt("uri", Ty::Str),
            opt("channels", Ty::List(&MIGRATION_CHANNEL_TY)),
            opt("exit-on-error", Ty::Bool),
        ],
        ret: &EMPTY,
        build: |v| Ok(Command::MigrateIncoming(de(v)?)),
    },
    CommandSpec {
        name: "migrate_cancel",
        args: &[],
        ret: &EMPTY,
        build: |_| Ok(Command::MigrateCancel),
    },
    CommandSpec {
        name: "query-name",
        args: &[],
        ret: &NAME_INFO,
        build: |_| Ok(Command::QueryName),
    },
    CommandSpec {
        name: "query-block",
        args: &[],
        ret: &BLOCK_INFO_LIST,
        build: |_| Ok(Command::QueryBlock),
    },
    CommandSpec {
        name: "query-kvm",
        args: &[],
        ret: &KVM_INFO,
        build: |_| Ok(Command::QueryKvm),
    },
    CommandSpec {
        name: "query-events",
        args: &[],
        ret: &EVENT_INFO_LIST,
        build: |_| Ok(Command::QueryEvents),
    },
    CommandSpec {
        name: "query-chardev",
        args: &[],
        ret: &CHARDEV_INFO_LIST,
        build: |_| Ok(Command::QueryChardev),
    },
    CommandSpec {
        name: "query-migrate-capabilities",
        args: &[],
        ret: &MIGRATION_CAPABILITY_STATUS_LIST,
        build: |_| Ok(Command::QueryMigrateCapabilities),
    },
    CommandSpec {
        name: "system_powerdown",
        args: &[],
        ret: &EMPTY,
        build: |_| Ok(Command::SystemPowerdown),
    },
    CommandSpec {
        name: "query-qmp-schema",
        args: &[],
        ret: &SCHEMA_INFO_LIST,
        build: |_| Ok(Command::QueryQmpSchema),
    },
    CommandSpec {
        name: "x-query-registers",
        args: &[opt("cpu-index", Ty::Int)],
        ret: &HUMAN_READABLE_TEXT,
        build: |v| Ok(Command::QueryRegisters(de(v)?)),
    },
    CommandSpec {
        name: "query-rx-filter",
        args: &[opt("name", Ty::Str)],
        ret: &RX_FILTER_INFO_LIST,
        build: |v| Ok(Command::QueryRxFilter(de(v)?)),
    },
    CommandSpec {
        name: "x-query-network",
        args: &[],
        ret: &HUMAN_READABLE_TEXT,
        build: |_| Ok(Command::QueryNetwork),
    },
    CommandSpec {
        name: "x-query-cpr-command-line",
        args: &[],
        ret: &CPR_COMMAND_LINE,
        build: |_| Ok(Command::QueryCprCommandLine),
    },
];

/// Look a command up by its QMP name.
pub fn find_command(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// The `query-commands` result.
pub fn query_commands() -> Vec<CommandInfo> {
    COMMANDS
        .iter()
        .map(|c| CommandInfo {
            name: c.name.to_owned(),
        })
        .collect()
}

/// A request that passed all protocol-level checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The client's `id`, to be echoed in the reply.
    pub id: Option<Value>,
    pub command: Command,
}

/// Validate one framed message (QEMU's `qmp_dispatch` up to the handler
/// call).  `negotiated` is false until `qmp_capabilities` succeeded; in
/// that mode every other command is refused like QEMU refuses it.  On
/// failure the ready-to-send reply is returned (with the `id` echoed
/// whenever the input was an object, as QEMU does).
pub fn parse_request(value: Value, negotiated: bool) -> Result<Request, Response> {
    let Value::Object(mut obj) = value else {
        return Err(Response::error(
            None,
            QmpError::generic("QMP input must be a JSON object"),
        ));
    };
    let id = obj.get("id").cloned();
    let fail = |e: QmpError| Response::error(id.clone(), e);

    // qmp_dispatch_check_obj; OOB is not offered, so exec-oob is unexpected.
    let mut name = None;
    for (key, v) in &obj {
        match key.as_str() {
            "execute" => match v {
                Value::String(s) => name = Some(s.clone()),
                _ => {
                    return Err(fail(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    )));
                }
            },
            "arguments" => {
                if !v.is_object() {
                    return Err(fail(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    )));
                }
            }
            "id" => {}
            other => {
                return Err(fail(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                ))));
            }
        }
    }
    let Some(name) = name else {
        return Err(fail(QmpError::generic("QMP input lacks member 'execute'")));
    };

    // Before negotiation only qmp_capabilities exists, and QEMU rewrites
    // the CommandNotFound text to point at it.
    let spec = match find_command(&name) {
        Some(spec) if negotiated || spec.name == "qmp_capabilities" => spec,
        _ if !negotiated => {
            return Err(fail(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )));
        }
        _ => {
            return Err(fail(QmpError::command_not_found(format!(
                "The command {name} has not been found"
            ))));
        }
    };

    let args = match obj.remove("arguments") {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let command = spec.parse(&args).map_err(&fail)?;

    if let Command::QmpCapabilities(caps) = &command {
        if negotiated {
            return Err(fail(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            )));
        }
        // We offer no capability, so every requested one is unavailable.
        let unavailable: Vec<&str> = caps.enable.iter().flatten().map(|c| c.as_str()).collect();
        if !unavailable.is_empty() {
            return Err(fail(QmpError::generic(format!(
                "Capability {} not available",
                unavailable.join(", ")
            ))));
        }
    }
    Ok(Request { id, command })
}

/// What the server should do with one framed message.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this reply; nothing to execute.
    Reply(Response),
    /// Execute the command, then send `Response::from_result(id, result)`.
    Execute(Request),
}

/// Per-connection protocol state: capabilities negotiation.
///
/// A fresh session is in negotiation mode; `qmp_capabilities` (answered
/// here, it needs no VM) switches it to command mode.  QEMU sends events
/// only to sessions in command mode; check [`Session::is_negotiated`].
#[derive(Debug, Clone, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// A session awaiting `qmp_capabilities`.
    pub fn new() -> Self {
        Session::default()
    }

    /// A session that already negotiated capabilities, e.g. a client carried across a live
    /// update.
    pub fn negotiated() -> Self {
        Session { negotiated: true }
    }

    /// True once `qmp_capabilities` succeeded.
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Turn one message from [`JsonStreamer::feed`](super::JsonStreamer::feed)
    /// into an action.  Parse errors become replies without `id`, as in QEMU.
    pub fn handle(&mut self, message: Result<Value, QmpError>) -> Action {
        let value = match message {
            Ok(v) => v,
            Err(e) => return Action::Reply(Response::error(None, e)),
        };
        match parse_request(value, self.negotiated) {
            Err(reply) => Action::Reply(reply),
            Ok(Request {
                id,
                command: Command::QmpCapabilities(_),
            }) => {
                self.negotiated = true;
                Action::Reply(Response::empty(id))
            }
            Ok(req) => Action::Execute(req),
        }
    }
}
