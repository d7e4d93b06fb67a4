//! The command table and request parsing.
//!
//! [`COMMANDS`] is the single source of truth: each entry names a command,
//! declares its arguments with the [`schema`](super::schema) types (copied
//! from QEMU's qapi/*.json) and says how to build the typed [`Command`].
//! Adding a command means adding one entry and one enum variant.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::schema::{Body, EnumDef, Member, Ty, check_args, opt, req};
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
        }
    }
}

/// One command: name, argument schema, constructor.
pub struct CommandSpec {
    /// QMP name.
    pub name: &'static str,
    /// Argument members, in QEMU's schema order.
    pub args: &'static [Member],
    /// Builds the command from arguments that passed `args`.
    build: fn(Value) -> Result<Command, QmpError>,
}

impl std::fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandSpec")
            .field("name", &self.name)
            .field("args", &self.args)
            .finish()
    }
}

impl CommandSpec {
    /// Validate `arguments` and build the command.
    pub fn parse(&self, args: &Map<String, Value>) -> Result<Command, QmpError> {
        let checked = check_args(self.args, args).map_err(QmpError::generic)?;
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
];

fn de<T: DeserializeOwned>(v: Value) -> Result<T, QmpError> {
    // The schema check guarantees the shape; a failure here means the
    // schema and the Rust type disagree.
    serde_json::from_value(v).map_err(|e| QmpError::generic(format!("internal error: {e}")))
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

/// The commands this monitor implements.
pub static COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "qmp_capabilities",
        args: &[opt("enable", Ty::List(&Ty::Enum(&QMP_CAPABILITY)))],
        build: |v| Ok(Command::QmpCapabilities(de(v)?)),
    },
    CommandSpec {
        name: "query-status",
        args: &[],
        build: |_| Ok(Command::QueryStatus),
    },
    CommandSpec {
        name: "stop",
        args: &[],
        build: |_| Ok(Command::Stop),
    },
    CommandSpec {
        name: "cont",
        args: &[],
        build: |_| Ok(Command::Cont),
    },
    CommandSpec {
        name: "quit",
        args: &[],
        build: |_| Ok(Command::Quit),
    },
    CommandSpec {
        name: "system_reset",
        args: &[],
        build: |_| Ok(Command::SystemReset),
    },
    CommandSpec {
        name: "query-cpus-fast",
        args: &[],
        build: |_| Ok(Command::QueryCpusFast),
    },
    CommandSpec {
        name: "pmemsave",
        args: &[
            req("val", Ty::Int),
            req("size", Ty::Int),
            req("filename", Ty::Str),
        ],
        build: build_pmemsave,
    },
    CommandSpec {
        name: "human-monitor-command",
        args: &[req("command-line", Ty::Str), opt("cpu-index", Ty::Int)],
        build: |v| Ok(Command::HumanMonitor(de(v)?)),
    },
    CommandSpec {
        name: "query-version",
        args: &[],
        build: |_| Ok(Command::QueryVersion),
    },
    CommandSpec {
        name: "query-commands",
        args: &[],
        build: |_| Ok(Command::QueryCommands),
    },
    CommandSpec {
        name: "migrate-set-parameters",
        args: MIGRATE_SET_PARAMETERS,
        build: |v| Ok(Command::MigrateSetParameters(de(v)?)),
    },
    CommandSpec {
        name: "query-migrate-parameters",
        args: &[],
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
        build: |v| Ok(Command::Migrate(de(v)?)),
    },
    CommandSpec {
        name: "query-migrate",
        args: &[],
        build: |_| Ok(Command::QueryMigrate),
    },
    CommandSpec {
        name: "migrate-incoming",
        args: &[
            opt("uri", Ty::Str),
            opt("channels", Ty::List(&MIGRATION_CHANNEL_TY)),
            opt("exit-on-error", Ty::Bool),
        ],
        build: |v| Ok(Command::MigrateIncoming(de(v)?)),
    },
    CommandSpec {
        name: "migrate_cancel",
        args: &[],
        build: |_| Ok(Command::MigrateCancel),
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
