//! HMP (human monitor) command lines, as QMP's `human-monitor-command`
//! runs them.
//!
//! [`parse`] turns a command line into either a finished text reply
//! (unknown command, usage error, help) or a QMP [`Command`] plus an
//! [`HmpRender`] that formats the command's result the way QEMU's HMP
//! handler prints it.  The server therefore has a single dispatch: it runs
//! the command exactly as for QMP and calls [`HmpRender::render`].
//!
//! QEMU's output conventions are kept: every `\n` is sent as `\r\n` (the
//! monitor output path converts them), failures print `Error: <desc>`, and
//! the whole text is returned as a *successful* QMP string result.  Argument
//! parsing follows QEMU's `args_type` strings (`s`, `S`, `-x`, `?`), including
//! its error texts and the `Try "help <cmd>"` hint.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::commands::{MIGRATE_SET_PARAMETERS, QEMU_MIGRATION_PARAMETERS, find_command};
use super::schema::Ty;
use super::shell::{ShellError, parse_argv};
use super::types::*;
use super::{Command, QmpError};

/// Why an HMP command line does not parse: QEMU's texts, which it prints before its
/// `Try "help CMD"` hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("{0}: string expected")]
    StringExpected(&'static str),
    #[error("{cmd}: unsupported option -{option}")]
    UnsupportedOption { cmd: &'static str, option: String },
    #[error("{cmd}: unknown type '{ty}'")]
    UnknownType { cmd: &'static str, ty: String },
    #[error("{0}: extraneous characters at the end of line")]
    Extraneous(&'static str),
    #[error("unexpected end of expression")]
    EndOfExpression,
    #[error("invalid char in expression")]
    InvalidChar,
    #[error("number too large")]
    NumberTooLarge,
}

/// Why `migrate_set_parameter NAME VALUE` cannot be turned into QMP arguments (QEMU's texts,
/// printed after `Error: `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetParameterError {
    /// Not a parameter QEMU knows.
    #[error("invalid parameter value: {0}")]
    Unknown(String),
    #[error("The block-bitmap-mapping parameter can only be set through QMP")]
    QmpOnly,
    /// Known to QEMU, not accepted by this monitor (same as over QMP).
    #[error("Parameter '{0}' is unexpected")]
    NotAccepted(String),
    #[error("Invalid size {0}")]
    InvalidSize(String),
    /// The value does not parse as the parameter's type.
    #[error("Parameter '{0}' expects {1}")]
    Expects(String, &'static str),
    #[error(transparent)]
    Shell(#[from] ShellError),
    /// The QMP argument check refused the value.
    #[error(transparent)]
    Rejected(QmpError),
    #[error("internal error: migrate-set-parameters missing")]
    Internal,
}

/// What to do for one HMP command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HmpAction {
    /// Return this text (already in wire form, `\r\n` line ends).
    Reply(String),
    /// Run `command` as if it came over QMP, then return
    /// `render.render(&result)`.
    Run { command: Command, render: HmpRender },
}

/// How to turn a command's QMP result into HMP text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmpRender {
    /// Print nothing, even on failure (QEMU's `stop`, `quit`,
    /// `system_reset` and `migrate_cancel` ignore errors).
    Nothing,
    /// Print only a failure, as `Error: <desc>`.
    ErrorsOnly,
    /// `info status`
    InfoStatus,
    /// `info version`
    InfoVersion,
    /// `info cpus`; `selected_cpu` gets the `*` (the first CPU if `None`).
    InfoCpus { selected_cpu: Option<i64> },
    /// `info migrate [-a]`
    InfoMigrate { all: bool },
    /// `info migrate_parameters`
    InfoMigrateParameters,
    /// `info name`
    InfoName,
    /// `info kvm`
    InfoKvm,
    /// `info block`
    InfoBlock,
    /// `info registers`: the text of `x-query-registers`.
    InfoRegisters,
    /// `info network`: the text of `x-query-network`.
    InfoNetwork,
    /// `migrate [-d]`: without `-d` QEMU would wait, which a QMP-driven HMP
    /// monitor cannot, so it says so and continues detached.
    Migrate { detach: bool },
}

impl HmpRender {
    /// Format `result` (the QMP result of the command) as HMP output.
    pub fn render(&self, result: &Result<Value, QmpError>) -> String {
        let text = match result {
            Err(e) => match self {
                HmpRender::Nothing => String::new(),
                _ => format!("Error: {}\n", e.desc),
            },
            Ok(v) => match self {
                HmpRender::Nothing | HmpRender::ErrorsOnly => String::new(),
                HmpRender::InfoStatus => typed(v, |s: StatusInfo| info_status(&s)),
                HmpRender::InfoVersion => typed(v, |i: VersionInfo| {
                    format!(
                        "{}.{}.{}{}\n",
                        i.qemu.major, i.qemu.minor, i.qemu.micro, i.package
                    )
                }),
                HmpRender::InfoCpus { selected_cpu } => {
                    typed(v, |cpus: Vec<CpuInfoFast>| info_cpus(&cpus, *selected_cpu))
                }
                HmpRender::InfoMigrate { .. } => typed(v, |i: MigrationInfo| info_migrate(&i)),
                HmpRender::InfoMigrateParameters => {
                    typed(v, |p: MigrationParameters| info_migrate_parameters(&p))
                }
                HmpRender::InfoName => typed(v, |n: NameInfo| {
                    n.name.map(|n| format!("{n}\n")).unwrap_or_default()
                }),
                HmpRender::InfoKvm => typed(v, |k: KvmInfo| {
                    let state = match (k.present, k.enabled) {
                        (true, true) => "enabled",
                        (true, false) => "disabled",
                        (false, _) => "not compiled",
                    };
                    format!("kvm support: {state}\n")
                }),
                HmpRender::InfoBlock => typed(v, |disks: Vec<BlockInfo>| info_block(&disks)),
                HmpRender::InfoRegisters | HmpRender::InfoNetwork => {
                    typed(v, |t: HumanReadableText| t.human_readable_text)
                }
                HmpRender::Migrate { detach: true } => String::new(),
                HmpRender::Migrate { detach: false } => {
                    "terminal does not allow synchronous migration, continuing detached\n".into()
                }
            },
        };
        crlf(&text)
    }
}

/// Text for a failed command, for servers that fail before running it.
pub fn error_text(e: &QmpError) -> String {
    crlf(&format!("Error: {}\n", e.desc))
}

/// `info block`, laid out as QEMU's.
fn info_block(disks: &[BlockInfo]) -> String {
    let mut out = String::new();
    for d in disks {
        let i = &d.inserted;
        let ro = if i.ro { ", read-only" } else { "" };
        let c = &i.cache;
        let cache = format!(
            "{}{}{}",
            if c.writeback {
                "writeback"
            } else {
                "writethrough"
            },
            if c.direct { ", direct" } else { "" },
            if c.no_flush { ", ignore flushes" } else { "" }
        );
        out.push_str(&format!(
            "{} ({}): {} ({}{ro})\n    Attached to:      {}\n    Cache mode:       {cache}\n",
            d.device, i.node_name, i.file, i.drv, d.qdev
        ));
    }
    out
}

fn typed<T: DeserializeOwned>(v: &Value, f: impl FnOnce(T) -> String) -> String {
    match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => f(t),
        Err(e) => format!("Error: internal error: {e}\n"),
    }
}

/// QEMU's monitor output turns every `\n` into `\r\n`.
fn crlf(s: &str) -> String {
    s.replace('\n', "\r\n")
}

fn info_status(s: &StatusInfo) -> String {
    let mut out = format!(
        "VM status: {}",
        if s.running { "running" } else { "paused" }
    );
    if !s.running && s.status != RunState::Paused {
        out.push_str(&format!(" ({})", s.status.as_str()));
    }
    out.push('\n');
    out
}

fn info_cpus(cpus: &[CpuInfoFast], selected: Option<i64>) -> String {
    let selected = selected.or_else(|| cpus.first().map(|c| c.cpu_index));
    cpus.iter()
        .map(|c| {
            let active = if Some(c.cpu_index) == selected {
                '*'
            } else {
                ' '
            };
            format!("{active} CPU #{}: thread_id={}\n", c.cpu_index, c.thread_id)
        })
        .collect()
}

/// QEMU's `size_to_str`: "%0.3g <prefix>B" with binary prefixes.
fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // floor(log2(val * 1024 / 1000)) / 10, so 1000..1023 already count as
    // the next unit.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp = if scaled >= 1.0 {
        scaled.log2().floor() as i64 + 1
    } else {
        0
    };
    let i = (((exp - 1).max(0)) / 10).min(6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!(
        "{} {}B",
        super::json::format_g(val as f64 / div, 3),
        SUFFIXES[i]
    )
}

fn info_migrate(info: &MigrationInfo) -> String {
    let mut out = String::new();
    if let Some(reasons) = info.blocked_reasons.as_ref().filter(|r| !r.is_empty()) {
        out.push_str("Outgoing migration blocked:\n");
        for r in reasons {
            out.push_str(&format!("  {r}\n"));
        }
    }
    if let Some(status) = info.status {
        out.push_str(&format!("Status: \t\t{}", status.as_str()));
        match &info.error_desc {
            Some(e)
                if matches!(
                    status,
                    MigrationStatus::Failed | MigrationStatus::PostcopyPaused
                ) =>
            {
                out.push_str(&format!(" ({e})\n"));
            }
            _ => out.push('\n'),
        }
        if let Some(total) = info.total_time.filter(|&t| t != 0) {
            out.push_str(&format!("Time (ms): \t\ttotal={total}"));
            if let Some(t) = info.setup_time {
                out.push_str(&format!(", setup={t}"));
            }
            if let Some(t) = info.expected_downtime {
                out.push_str(&format!(", exp_down={t}"));
            }
            if let Some(t) = info.downtime {
                out.push_str(&format!(", down={t}"));
            }
            out.push('\n');
        }
    }
    if let Some(ram) = &info.ram {
        let sz = |v: i64| size_to_str(v.max(0) as u64);
        out.push_str("RAM info:\n");
        out.push_str(&format!("  Throughput (Mbps): \t{:.2}\n", ram.mbps));
        out.push_str(&format!(
            "  Sizes: \t\tpagesize={}, total={}\n",
            sz(ram.page_size),
            sz(ram.total)
        ));
        out.push_str(&format!(
            "  Transfers: \t\ttransferred={}, remain={}\n",
            sz(ram.transferred),
            sz(ram.remaining)
        ));
        out.push_str(&format!(
            "    Channels: \t\tprecopy={}, multifd={}, postcopy={}\n",
            size_to_str(ram.precopy_bytes),
            size_to_str(ram.multifd_bytes),
            size_to_str(ram.postcopy_bytes)
        ));
        out.push_str(&format!(
            "    Page Types: \tnormal={}, zero={}\n",
            ram.normal, ram.duplicate
        ));
        out.push_str(&format!(
            "  Page Rates (pps): \ttransfer={}",
            ram.pages_per_second
        ));
        if ram.dirty_pages_rate != 0 {
            out.push_str(&format!(", dirty={}", ram.dirty_pages_rate));
        }
        out.push('\n');
        out.push_str(&format!(
            "  Others: \t\tdirty_syncs={}",
            ram.dirty_sync_count
        ));
        if ram.postcopy_requests != 0 {
            out.push_str(&format!(", postcopy_req={}", ram.postcopy_requests));
        }
        if ram.downtime_bytes != 0 {
            out.push_str(&format!(", downtime_bytes={}", ram.downtime_bytes));
        }
        if ram.dirty_sync_missed_zero_copy != 0 {
            out.push_str(&format!(
                ", zerocopy_fallbacks={}",
                ram.dirty_sync_missed_zero_copy
            ));
        }
        out.push('\n');
    }
    out
}

fn info_migrate_parameters(p: &MigrationParameters) -> String {
    let mut out = String::new();
    let mut line = |name: &str, val: Option<String>| {
        if let Some(v) = val {
            out.push_str(&format!("{name}: {v}\n"));
        }
    };
    let onoff = |b: bool| if b { "on" } else { "off" }.to_owned();
    line(
        "announce-initial",
        p.announce_initial.map(|v| format!("{v} ms")),
    );
    line("announce-max", p.announce_max.map(|v| format!("{v} ms")));
    line("announce-rounds", p.announce_rounds.map(|v| v.to_string()));
    line("announce-step", p.announce_step.map(|v| format!("{v} ms")));
    line(
        "throttle-trigger-threshold",
        p.throttle_trigger_threshold.map(|v| v.to_string()),
    );
    line(
        "cpu-throttle-initial",
        p.cpu_throttle_initial.map(|v| v.to_string()),
    );
    line(
        "cpu-throttle-increment",
        p.cpu_throttle_increment.map(|v| v.to_string()),
    );
    line("cpu-throttle-tailslow", p.cpu_throttle_tailslow.map(onoff));
    line(
        "max-cpu-throttle",
        p.max_cpu_throttle.map(|v| v.to_string()),
    );
    line("tls-creds", p.tls_creds.as_ref().map(|v| format!("'{v}'")));
    line(
        "tls-hostname",
        p.tls_hostname.as_ref().map(|v| format!("'{v}'")),
    );
    line("tls-authz", p.tls_authz.as_ref().map(|v| format!("'{v}'")));
    line(
        "max-bandwidth",
        p.max_bandwidth.map(|v| format!("{v} bytes/second")),
    );
    line(
        "avail-switchover-bandwidth",
        p.avail_switchover_bandwidth
            .map(|v| format!("{v} bytes/second")),
    );
    line(
        "max-postcopy-bandwidth",
        p.max_postcopy_bandwidth
            .map(|v| format!("{v} bytes/second")),
    );
    line(
        "downtime-limit",
        p.downtime_limit.map(|v| format!("{v} ms")),
    );
    line(
        "multifd-channels",
        p.multifd_channels.map(|v| v.to_string()),
    );
    line(
        "multifd-compression",
        p.multifd_compression.map(|v| v.as_str().to_owned()),
    );
    line(
        "zero-page-detection",
        p.zero_page_detection.map(|v| v.as_str().to_owned()),
    );
    line(
        "xbzrle-cache-size",
        p.xbzrle_cache_size.map(|v| format!("{v} bytes")),
    );
    line("mode", p.mode.map(|v| v.as_str().to_owned()));
    line("direct-io", p.direct_io.map(onoff));
    line(
        "x-cpr-deadline-ms",
        p.x_cpr_deadline_ms.map(|v| format!("{v} ms")),
    );
    if let Some(cmd) = &p.cpr_exec_command {
        out.push_str("cpr-exec-command:");
        for a in cmd {
            out.push(' ');
            out.push_str(a);
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Command table

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Help,
    Info,
    Stop,
    Cont,
    Quit,
    SystemReset,
    Migrate,
    MigrateCancel,
    MigrateIncoming,
    MigrateSetParameter,
    InfoStatus,
    InfoVersion,
    InfoCpus,
    InfoMigrate,
    InfoMigrateParameters,
    InfoName,
    InfoKvm,
    InfoBlock,
    InfoRegisters,
    InfoNetwork,
    Pmemsave,
}

/// An HMP command: QEMU's name (with `|` aliases), `args_type`, and the
/// `params`/`help` shown by `help`.
struct HmpCmd {
    name: &'static str,
    args_type: &'static str,
    params: &'static str,
    help: &'static str,
    kind: Kind,
}

const fn cmd(
    name: &'static str,
    args_type: &'static str,
    params: &'static str,
    help: &'static str,
    kind: Kind,
) -> HmpCmd {
    HmpCmd {
        name,
        args_type,
        params,
        help,
        kind,
    }
}

static HMP_COMMANDS: &[HmpCmd] = &[
    cmd("help|?", "name:S?", "[cmd]", "show the help", Kind::Help),
    cmd(
        "info",
        "item:s?",
        "[subcommand]",
        "show various information about the system state",
        Kind::Info,
    ),
    cmd("quit|q", "", "", "quit the emulator", Kind::Quit),
    cmd("stop|s", "", "", "stop emulation", Kind::Stop),
    cmd("cont|c", "", "", "resume emulation", Kind::Cont),
    cmd(
        "system_reset",
        "",
        "",
        "reset the system",
        Kind::SystemReset,
    ),
    cmd(
        "migrate",
        "detach:-d,resume:-r,uri:s",
        "[-d] [-r] uri",
        "migrate to URI (using -d to not wait for completion)\n\t\t\t -r to resume a paused postcopy migration",
        Kind::Migrate,
    ),
    cmd(
        "migrate_cancel",
        "",
        "",
        "cancel the current VM migration",
        Kind::MigrateCancel,
    ),
    cmd(
        "migrate_incoming",
        "uri:s",
        "uri",
        "Continue an incoming migration from an -incoming defer",
        Kind::MigrateIncoming,
    ),
    cmd(
        "migrate_set_parameter",
        "parameter:s,value:S",
        "parameter value",
        "Set the parameter for migration",
        Kind::MigrateSetParameter,
    ),
    cmd(
        "pmemsave",
        "val:l,size:i,filename:s",
        "addr size file",
        "save to disk physical memory dump starting at 'addr' of size 'size'",
        Kind::Pmemsave,
    ),
];

static INFO_COMMANDS: &[HmpCmd] = &[
    cmd(
        "version",
        "",
        "",
        "show the version of QEMU",
        Kind::InfoVersion,
    ),
    cmd(
        "status",
        "",
        "",
        "show the current VM status (running|paused)",
        Kind::InfoStatus,
    ),
    cmd("cpus", "", "", "show infos for each CPU", Kind::InfoCpus),
    cmd(
        "migrate",
        "all:-a",
        "[-a]",
        "show migration status (-a: all, dump all status)",
        Kind::InfoMigrate,
    ),
    cmd(
        "migrate_parameters",
        "",
        "",
        "show current migration parameters",
        Kind::InfoMigrateParameters,
    ),
    cmd("name", "", "", "show the current VM name", Kind::InfoName),
    cmd("kvm", "", "", "show KVM information", Kind::InfoKvm),
    cmd("block", "", "", "show the block devices", Kind::InfoBlock),
    cmd(
        "network",
        "",
        "",
        "show the network state",
        Kind::InfoNetwork,
    ),
    cmd(
        "registers",
        "cpustate_all:-a,vcpu:i?",
        "[-a|vcpu]",
        "show the cpu registers (-a: show register info for all cpus; vcpu: specific vCPU to query; show the current CPU's registers if omitted)",
        Kind::InfoRegisters,
    ),
];

/// `hmp_compare_cmd`: `name` equals one of the `|`-separated alternatives.
fn compare_cmd(name: &str, list: &str) -> bool {
    list.split('|').any(|alt| alt == name)
}

fn find(table: &'static [HmpCmd], name: &str) -> Option<&'static HmpCmd> {
    table.iter().find(|c| compare_cmd(name, c.name))
}

/// C's `isspace` in the "C" locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn skip_spaces(s: &[u8], mut p: usize) -> usize {
    while p < s.len() && is_space(s[p]) {
        p += 1;
    }
    p
}

/// A parsed HMP argument.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arg {
    Str(String),
    Int(i64),
    Flag,
}

/// Parse an HMP command line, as `human-monitor-command` would run it.
/// `cpu_index` is the command's `cpu-index` argument (for `info cpus`).
pub fn parse(line: &str, cpu_index: Option<i64>) -> HmpAction {
    let bytes = line.as_bytes();
    let reply = |s: String| HmpAction::Reply(crlf(&s));

    // monitor_parse_command, recursing into the info sub-table.
    let mut table = HMP_COMMANDS;
    let mut p = 0;
    let cmd = loop {
        let start = skip_spaces(bytes, p);
        if start >= bytes.len() {
            // Blank line (or nothing after a sub-command prefix, handled below).
            return reply(String::new());
        }
        let mut end = start;
        while end < bytes.len() && bytes[end] != b'/' && !is_space(bytes[end]) {
            end += 1;
        }
        let name = &line[start..end];
        let Some(cmd) = find(table, name) else {
            return reply(format!("unknown command: '{}'\n", &line[..end]));
        };
        p = skip_spaces(bytes, end);
        if cmd.kind == Kind::Info && p < bytes.len() {
            table = INFO_COMMANDS;
            continue;
        }
        break cmd;
    };
    let cmd_span = line[..p].trim_end_matches(|c: char| c.is_ascii() && is_space(c as u8));

    let args = match parse_args(cmd, line, p) {
        Ok(a) => a,
        Err(msg) => {
            return reply(format!(
                "{msg}\nTry \"help {cmd_span}\" for more information\n"
            ));
        }
    };
    let flag = |k: &str| args.iter().any(|(n, a)| n == k && *a == Arg::Flag);
    let string = |k: &str| {
        args.iter().find_map(|(n, a)| match a {
            Arg::Str(s) if n == k => Some(s.clone()),
            _ => None,
        })
    };
    let int = |k: &str| {
        args.iter().find_map(|(n, a)| match a {
            Arg::Int(v) if n == k => Some(*v),
            _ => None,
        })
    };
    let run = |command: Command, render: HmpRender| HmpAction::Run { command, render };

    match cmd.kind {
        Kind::Help => reply(help(string("name").as_deref())),
        Kind::Info => reply(help(Some("info"))),
        Kind::Stop => run(Command::Stop, HmpRender::Nothing),
        Kind::Cont => run(Command::Cont, HmpRender::ErrorsOnly),
        Kind::Quit => run(Command::Quit, HmpRender::Nothing),
        Kind::SystemReset => run(Command::SystemReset, HmpRender::Nothing),
        Kind::MigrateCancel => run(Command::MigrateCancel, HmpRender::Nothing),
        Kind::InfoStatus => run(Command::QueryStatus, HmpRender::InfoStatus),
        Kind::InfoVersion => run(Command::QueryVersion, HmpRender::InfoVersion),
        Kind::InfoCpus => run(
            Command::QueryCpusFast,
            HmpRender::InfoCpus {
                selected_cpu: cpu_index,
            },
        ),
        Kind::InfoMigrate => run(
            Command::QueryMigrate,
            HmpRender::InfoMigrate { all: flag("all") },
        ),
        Kind::InfoMigrateParameters => run(
            Command::QueryMigrateParameters,
            HmpRender::InfoMigrateParameters,
        ),
        Kind::InfoName => run(Command::QueryName, HmpRender::InfoName),
        Kind::InfoKvm => run(Command::QueryKvm, HmpRender::InfoKvm),
        Kind::InfoBlock => run(Command::QueryBlock, HmpRender::InfoBlock),
        Kind::InfoNetwork => run(Command::QueryNetwork, HmpRender::InfoNetwork),
        Kind::InfoRegisters => {
            // -a: every vCPU; a number: that one; neither: the monitor's current vCPU.
            let cpu = if flag("cpustate_all") {
                None
            } else {
                Some(int("vcpu").or(cpu_index).unwrap_or(0))
            };
            run(
                Command::QueryRegisters(QueryRegistersArgs { cpu_index: cpu }),
                HmpRender::InfoRegisters,
            )
        }
        Kind::Pmemsave => {
            let nonneg = |k: &str| u64::try_from(int(k).unwrap_or(0));
            match (nonneg("val"), nonneg("size")) {
                (Ok(val), Ok(size)) => run(
                    Command::Pmemsave(PmemsaveArgs {
                        val,
                        size,
                        filename: string("filename").unwrap_or_default(),
                    }),
                    HmpRender::ErrorsOnly,
                ),
                (Err(_), _) => {
                    reply("Error: Parameter 'val' expects a non-negative value\n".into())
                }
                (_, Err(_)) => {
                    reply("Error: Parameter 'size' expects a non-negative value\n".into())
                }
            }
        }
        // Postcopy does not exist here, so there is never a paused one to resume: refuse
        // rather than start an ordinary migration (QEMU's text for the same refusal).
        Kind::Migrate if flag("resume") => {
            reply("Error: Cannot resume if there is no paused migration\n".into())
        }
        Kind::Migrate => {
            let uri = string("uri").unwrap_or_default();
            match parse_migration_uri(&uri) {
                Err(e) => reply(format!("Error: {}\n", e.desc)),
                Ok(addr) => run(
                    Command::Migrate(MigrateArgs {
                        uri: None,
                        channels: Some(vec![MigrationChannel {
                            channel_type: MigrationChannelType::Main,
                            addr,
                        }]),
                        detach: None,
                        resume: Some(flag("resume")),
                    }),
                    HmpRender::Migrate {
                        detach: flag("detach"),
                    },
                ),
            }
        }
        Kind::MigrateIncoming => {
            let uri = string("uri").unwrap_or_default();
            match parse_migration_uri(&uri) {
                Err(e) => reply(format!("Error: {}\n", e.desc)),
                Ok(addr) => run(
                    Command::MigrateIncoming(MigrateIncomingArgs {
                        uri: None,
                        channels: Some(vec![MigrationChannel {
                            channel_type: MigrationChannelType::Main,
                            addr,
                        }]),
                        exit_on_error: Some(false),
                    }),
                    HmpRender::ErrorsOnly,
                ),
            }
        }
        Kind::MigrateSetParameter => {
            let name = string("parameter").unwrap_or_default();
            let value = string("value").unwrap_or_default();
            match set_parameter(&name, &value) {
                Ok(p) => run(
                    Command::MigrateSetParameters(Box::new(p)),
                    HmpRender::ErrorsOnly,
                ),
                Err(msg) => reply(format!("Error: {msg}\n")),
            }
        }
    }
}

/// `monitor_parse_arguments` for the argument types our commands use.
/// Errors are returned as the text QEMU prints before its "Try help" hint.
fn parse_args(
    cmd: &'static HmpCmd,
    line: &str,
    mut p: usize,
) -> Result<Vec<(String, Arg)>, UsageError> {
    let bytes = line.as_bytes();
    let mut out = Vec::new();
    let specs: Vec<&str> = cmd.args_type.split(',').filter(|s| !s.is_empty()).collect();
    for (idx, spec) in specs.iter().enumerate() {
        let Some((key, ty)) = spec.split_once(':') else {
            continue;
        };
        let optional = ty.ends_with('?');
        match ty.as_bytes().first() {
            Some(b's') => {
                p = skip_spaces(bytes, p);
                if optional && p >= bytes.len() {
                    continue;
                }
                match get_str(line, &mut p) {
                    Some(s) => out.push((key.to_owned(), Arg::Str(s))),
                    None => return Err(UsageError::StringExpected(cmd.name)),
                }
            }
            Some(b'S') => {
                p = skip_spaces(bytes, p);
                if p >= bytes.len() {
                    if optional {
                        continue;
                    }
                    return Err(UsageError::StringExpected(cmd.name));
                }
                out.push((key.to_owned(), Arg::Str(line[p..].to_owned())));
                p = bytes.len();
            }
            Some(b'i' | b'l') => {
                p = skip_spaces(bytes, p);
                if optional && p >= bytes.len() {
                    continue;
                }
                out.push((key.to_owned(), Arg::Int(get_int(line, &mut p)?)));
            }
            Some(b'-') => {
                let Some(&opt) = ty.as_bytes().get(1) else {
                    continue;
                };
                let save = p;
                p = skip_spaces(bytes, p);
                if bytes.get(p) == Some(&b'-') {
                    let given = bytes.get(p + 1).copied();
                    if given == Some(opt) {
                        out.push((key.to_owned(), Arg::Flag));
                        p += 2;
                    } else {
                        // An option of a later argument?  Then rewind and
                        // let that argument take it.
                        let later = specs[idx + 1..].iter().any(|s| {
                            s.split_once(':').is_some_and(|(_, t)| {
                                given.is_some_and(|g| t.as_bytes() == [b'-', g])
                            })
                        });
                        if !later {
                            let shown = given.map(char::from).map(String::from).unwrap_or_default();
                            return Err(UsageError::UnsupportedOption {
                                cmd: cmd.name,
                                option: shown,
                            });
                        }
                        p = save;
                    }
                }
            }
            _ => {
                return Err(UsageError::UnknownType {
                    cmd: cmd.name,
                    ty: ty.to_owned(),
                });
            }
        }
    }
    p = skip_spaces(bytes, p);
    if p < bytes.len() {
        return Err(UsageError::Extraneous(cmd.name));
    }
    Ok(out)
}

/// A number where QEMU's HMP takes an expression (`i`, `l`): decimal, `0x` hex or `0` octal,
/// optionally negative. Errors are QEMU's expression-parser texts.
fn get_int(line: &str, p: &mut usize) -> Result<i64, UsageError> {
    let bytes = line.as_bytes();
    let start = skip_spaces(bytes, *p);
    if start >= bytes.len() {
        return Err(UsageError::EndOfExpression);
    }
    let mut end = start;
    while end < bytes.len() && !is_space(bytes[end]) {
        end += 1;
    }
    *p = end;
    let word = &line[start..end];
    let (neg, digits) = match word.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, word),
    };
    if !digits.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(UsageError::InvalidChar);
    }
    match parse_c_u64(digits).and_then(|v| i64::try_from(v).ok()) {
        Some(v) => Ok(if neg { -v } else { v }),
        None => Err(UsageError::NumberTooLarge),
    }
}

/// QEMU's `get_str`: a bare word, or a double-quoted string with the
/// escapes `\n`, `\r`, `\\`, `\'`, `\"`.
fn get_str(line: &str, p: &mut usize) -> Option<String> {
    let bytes = line.as_bytes();
    let mut i = skip_spaces(bytes, *p);
    if i >= bytes.len() {
        *p = i;
        return None;
    }
    let mut out = Vec::new();
    if bytes[i] == b'"' {
        i += 1;
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] == b'\\' {
                let c = bytes.get(i + 1).copied();
                i += 2;
                match c {
                    Some(b'n') => out.push(b'\n'),
                    Some(b'r') => out.push(b'\r'),
                    Some(c @ (b'\\' | b'\'' | b'"')) => out.push(c),
                    _ => {
                        *p = i.min(bytes.len());
                        return None;
                    }
                }
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        if i >= bytes.len() {
            *p = i;
            return None;
        }
        i += 1;
    } else {
        while i < bytes.len() && !is_space(bytes[i]) {
            out.push(bytes[i]);
            i += 1;
        }
    }
    *p = i;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// `help [cmd]` output: "name params -- help" lines.
fn help(name: Option<&str>) -> String {
    let words: Vec<&str> = name
        .map(|n| n.split_whitespace().collect())
        .unwrap_or_default();
    let line =
        |prefix: &str, c: &HmpCmd| format!("{prefix}{} {} -- {}\n", c.name, c.params, c.help);
    match words.as_slice() {
        [] => HMP_COMMANDS.iter().map(|c| line("", c)).collect(),
        [first, rest @ ..] => match find(HMP_COMMANDS, first) {
            Some(c) if c.kind == Kind::Info => match rest.first() {
                None => INFO_COMMANDS.iter().map(|c| line("info ", c)).collect(),
                Some(sub) => match find(INFO_COMMANDS, sub) {
                    Some(ic) => line("info ", ic),
                    None => format!("unknown command: 'info {sub}'\n"),
                },
            },
            Some(c) => line("", c),
            None => format!("unknown command: '{first}'\n"),
        },
    }
}

/// `migrate_set_parameter NAME VALUE` → the QMP arguments it stands for.
fn set_parameter(name: &str, value: &str) -> Result<MigrateSetParameters, SetParameterError> {
    if !QEMU_MIGRATION_PARAMETERS.contains(&name) {
        return Err(SetParameterError::Unknown(name.to_owned()));
    }
    if name == "block-bitmap-mapping" {
        return Err(SetParameterError::QmpOnly);
    }
    let Some(member) = MIGRATE_SET_PARAMETERS.iter().find(|m| m.name == name) else {
        // Known to QEMU, not accepted by this monitor (same as over QMP).
        return Err(SetParameterError::NotAccepted(name.to_owned()));
    };
    let json = match (&member.ty, name) {
        (_, "cpr-exec-command") => {
            Value::Array(parse_argv(value)?.into_iter().map(Value::String).collect())
        }
        (_, "max-bandwidth" | "avail-switchover-bandwidth") => {
            // HMP takes these in MiB unless a unit is given.
            match parse_size_with_default_unit(value, 1 << 20).filter(|&v| v <= i64::MAX as u64) {
                Some(v) => Value::from(v),
                None => return Err(SetParameterError::InvalidSize(value.to_owned())),
            }
        }
        (Ty::Bool, _) => match value {
            "on" | "yes" | "true" | "y" => Value::Bool(true),
            "off" | "no" | "false" | "n" => Value::Bool(false),
            _ => return Err(SetParameterError::Expects(name.to_owned(), "'on' or 'off'")),
        },
        (Ty::Size, _) => match parse_size(value) {
            Some(v) => Value::from(v),
            None => return Err(SetParameterError::Expects(name.to_owned(), "size")),
        },
        (Ty::Uint64 | Ty::UintN(..), _) => match parse_c_u64(value) {
            Some(v) => Value::from(v),
            None => return Err(SetParameterError::Expects(name.to_owned(), "uint64")),
        },
        _ => Value::String(value.to_owned()),
    };
    let mut args = Map::new();
    args.insert(name.to_owned(), json);
    match find_command("migrate-set-parameters").map(|spec| spec.parse(&args)) {
        Some(Ok(Command::MigrateSetParameters(p))) => Ok(*p),
        Some(Err(e)) => Err(SetParameterError::Rejected(e)),
        _ => Err(SetParameterError::Internal),
    }
}

/// `qemu_strtou64(s, NULL, 0, ...)`: decimal, `0x` hex or `0` octal, whole
/// string, negative values wrapped like `strtoull`.
fn parse_c_u64(s: &str) -> Option<u64> {
    let t = s.trim_start_matches(|c: char| c.is_ascii() && is_space(c as u8));
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<u64>().ok()?
    };
    Some(if neg { v.wrapping_neg() } else { v })
}
