//! The command line: QEMU operators' spellings (`-m 1G`, `-smp 2`, `-qmp unix:...`) alongside
//! conventional `--long` options.
//!
//! clap only knows single-letter short options, so QEMU's single-dash long options are rewritten
//! to their `--long` form first ([`normalize_qemu_spellings`]); the values keep QEMU's syntax and
//! are parsed into typed settings here, so every later stage works with checked values.

pub mod drives;
pub mod nics;
pub mod objects;

use std::path::PathBuf;

use clap::{ArgAction, Parser};

use crate::boot::linux::{LinuxBootConfig, MAX_LINUX_VCPUS};
use crate::boot::{BLKCHECK_MAX_DEPTH, BLKCHECK_REQUEST_KIB, BuiltinGuest};
use crate::qmp::protocol::ChardevInfo;

/// Single-dash long options QEMU users type, mapped to our `--long` names.
const QEMU_LONG_OPTIONS: &[(&str, &str)] = &[
    ("smp", "smp"),
    ("qmp", "qmp"),
    ("serial", "serial"),
    ("incoming", "incoming"),
    ("machine", "machine"),
    ("M", "machine"),
    ("mem-prealloc", "prealloc"),
    ("name", "name"),
    ("kernel", "kernel"),
    ("initrd", "initrd"),
    ("append", "append"),
    ("enable-kvm", "enable-kvm"),
    ("accel", "accel"),
    ("nographic", "nographic"),
    ("display", "display"),
    ("nodefaults", "nodefaults"),
    ("pidfile", "pidfile"),
    ("daemonize", "daemonize"),
    ("monitor", "monitor"),
    ("chardev", "chardev"),
    ("drive", "drive"),
    ("blockdev", "blockdev"),
    ("device", "device"),
    ("add-fd", "add-fd"),
    ("netdev", "netdev"),
    ("nic", "nic"),
    ("object", "object"),
];

/// Rewrites `-smp 2` to `--smp 2` etc. Arguments after `--` are left alone.
pub fn normalize_qemu_spellings<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    let mut out = Vec::new();
    let mut passthrough = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || passthrough {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        let rewritten = arg
            .strip_prefix('-')
            .filter(|rest| !rest.starts_with('-'))
            .and_then(|rest| {
                let (name, value) = match rest.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (rest, None),
                };
                QEMU_LONG_OPTIONS
                    .iter()
                    .find(|(qemu, _)| *qemu == name)
                    .map(|(_, long)| match value {
                        Some(v) => format!("--{long}={v}"),
                        None => format!("--{long}"),
                    })
            });
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

/// What `--help` says about QEMU options this VMM accepts without effect, and those it refuses.
const COMPAT_HELP: &str = "\
Accepted for QEMU compatibility (no effect here):
  -enable-kvm, -accel kvm    this VMM always runs on KVM
  -nographic, -display none  there is no display; the console is -serial
  -machine q35|pc|microvm    there is one machine, a minimal PC
  -nodefaults                there are no default devices to drop
Not supported (refused with a message saying what to use instead):
  -daemonize, -monitor, -chardev";

#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version = crate::VERSION,
    about = "A small KVM VMM that live-updates itself by exec (cpr-exec)",
    long_about = "A small KVM VMM that live-updates itself by exec (cpr-exec).\n\n\
        QEMU spellings work: -m 1G -smp 2 -qmp unix:/run/vm.qmp,server=on,wait=off \
        -serial stdio -incoming file:/run/vm.state -machine aux-ram-share=on",
    after_help = COMPAT_HELP
)]
pub struct Args {
    /// Guest RAM size: N with an optional K/M/G/T suffix (no suffix = MiB), or size=N; then
    /// optionally ,hugepages=on|off and ,prealloc=on|off (e.g. -m 64G,hugepages=on). Default
    /// 128M, or the size of the -machine memory-backend=ID object.
    #[arg(short = 'm', long = "memory", value_name = "SIZE")]
    pub memory: Option<String>,

    /// A memory backend: memory-backend-memfd,id=ID,size=S,share=on[,hugetlb=on][,prealloc=on]
    /// or memory-backend-file,id=ID,size=S,mem-path=PATH,share=on (or QEMU's JSON form),
    /// selected by -machine memory-backend=ID.
    #[arg(long, value_name = "TYPE,OPTS", action = ArgAction::Append)]
    pub object: Vec<String>,

    /// Pre-fault all guest RAM at start (QEMU's prealloc=on / -mem-prealloc).
    #[arg(long)]
    pub prealloc: bool,

    /// Back guest RAM with huge pages (hugetlb memfds); the host must have them reserved.
    #[arg(long)]
    pub hugepages: bool,

    /// Number of vCPUs: N or cpus=N[,sockets=1,cores=N,threads=1].
    #[arg(long = "smp", value_name = "N", default_value = "1")]
    pub smp: String,

    /// Built-in guest: heartbeat, memcheck, blkcheck or netcheck, with options
    /// NAME[,hz=N][,exit-after=N][,exit-code=N] (memcheck also [,sweep=dense|sampled]: sampled
    /// touches one page every 16 MiB of all RAM; blkcheck also [,depth=N][,irq=msix|intx]
    /// [,order=sequential|random][,bs=4K..64K] (irq=intx: the driver leaves MSI-X off and takes
    /// INTx; order=random visits the blocks in a permutation; bs is the request size), and its
    /// exit-after
    /// counts passes; netcheck sends one frame per tick, hz=100 by default, and its exit-after
    /// counts frames sent).
    #[arg(long, value_name = "NAME[,OPTS]")]
    pub guest: Option<String>,

    /// Serial console: stdio, file:PATH, unix:PATH,server[,wait=off] or null.
    #[arg(long, value_name = "SPEC", default_value = "stdio")]
    pub serial: String,

    /// QMP monitor: unix:PATH,server=on,wait=off.
    #[arg(long, value_name = "SPEC")]
    pub qmp: Option<String>,

    /// Machine options: aux-ram-share=on|off, memory-backend=ID.
    #[arg(long, value_name = "OPTS", action = ArgAction::Append)]
    pub machine: Vec<String>,

    /// Restore instead of booting: file:PATH, unix:PATH (a cpr-transfer main channel), or defer
    /// (wait for QMP migrate-incoming); a second -incoming gives the cpr-transfer CPR channel:
    /// cpr,addr.transport=socket,addr.type=unix,addr.path=PATH or the same as JSON.
    #[arg(long, value_name = "SPEC", action = ArgAction::Append)]
    pub incoming: Vec<String>,

    /// A name for this VM, shown in every log line and by query-name.
    #[arg(long)]
    pub name: Option<String>,

    /// Start with the vCPUs stopped (state prelaunch); QMP or HMP `cont` starts the guest.
    #[arg(short = 'S')]
    pub start_paused: bool,

    /// Write the VMM's PID to PATH at start (removed again when the VMM exits; the PID stays
    /// the same across live updates).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,

    /// Log lines carry wall-clock (UTC) timestamps instead of seconds since boot.
    #[arg(
        long = "log-timestamps",
        value_name = "KIND",
        value_enum,
        default_value = "monotonic"
    )]
    pub log_timestamps: crate::logger::Timestamps,

    /// Linux kernel (bzImage or ELF vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk for -kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line for -kernel.
    #[arg(long, value_name = "CMDLINE")]
    pub append: Option<String>,

    /// More log output on stderr (-v info, -vv debug, -vvv trace). VMM_LOG=level also works.
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    pub verbose: u8,

    /// Test hook: make a live update's new VMM fail (exit-before-resume) or crash
    /// (crash-before-resume) just before it resumes the guest, to exercise rollback.
    #[arg(long = "cpr-test-fault", hide = true, value_name = "FAULT")]
    pub cpr_test_fault: Option<CprTestFault>,

    /// Accepted for QEMU compatibility: this VMM always uses KVM.
    #[arg(long = "enable-kvm", hide = true)]
    pub enable_kvm: bool,

    /// Accepted for QEMU compatibility: only "kvm" is supported.
    #[arg(long, hide = true)]
    pub accel: Option<String>,

    /// Accepted for QEMU compatibility: there is no display.
    #[arg(long, hide = true)]
    pub nographic: bool,

    /// Accepted for QEMU compatibility: only "none".
    #[arg(long, hide = true)]
    pub display: Option<String>,

    /// Accepted for QEMU compatibility: there are no default devices to drop.
    #[arg(long, hide = true)]
    pub nodefaults: bool,

    /// Refused: QEMU's -daemonize (see `from_args`).
    #[arg(long, hide = true)]
    pub daemonize: bool,

    /// Refused: QEMU's -monitor.
    #[arg(long, hide = true, value_name = "SPEC", action = ArgAction::Append)]
    pub monitor: Vec<String>,

    /// A disk: file=PATH,format=raw,if=virtio|none[,id=ID][,readonly=on][,serial=S]
    /// (file=/dev/fdset/N for a disk opened by the caller, see -add-fd).
    #[arg(long, value_name = "OPTS", action = ArgAction::Append)]
    pub drive: Vec<String>,

    /// A disk as a block node: driver=file,node-name=ID,filename=PATH (or QEMU's JSON form).
    #[arg(long, value_name = "OPTS", action = ArgAction::Append)]
    pub blockdev: Vec<String>,

    /// A device: virtio-blk-pci,drive=ID[,serial=S] or virtio-net-pci,netdev=ID[,mac=M].
    #[arg(long, value_name = "DEVICE,OPTS", action = ArgAction::Append)]
    pub device: Vec<String>,

    /// Put an fd inherited from the caller into an fd set: fd=N,set=S (used as
    /// file=/dev/fdset/S).
    #[arg(long = "add-fd", value_name = "fd=N,set=S", action = ArgAction::Append)]
    pub add_fd: Vec<String>,

    /// A network backend: tap,id=ID,ifname=NAME,script=no,downscript=no or tap,id=ID,fd=N.
    #[arg(long, value_name = "OPTS", action = ArgAction::Append)]
    pub netdev: Vec<String>,

    /// A NIC and its backend in one: tap,ifname=NAME|fd=N[,model=virtio-net-pci][,mac=M].
    #[arg(long, value_name = "OPTS", action = ArgAction::Append)]
    pub nic: Vec<String>,

    /// Refused: QEMU's -chardev.
    #[arg(long, hide = true, value_name = "SPEC", action = ArgAction::Append)]
    pub chardev: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "invalid memory size '{0}': use N with an optional K/M/G/T suffix (no suffix means MiB), e.g. -m 512M or -m 4G"
    )]
    MemorySize(String),
    #[error(
        "invalid -m option '{0}': after the size, -m takes hugepages=on|off and prealloc=on|off"
    )]
    MemoryOption(String),
    #[error("memory size {0} bytes is too small: the built-in guests need at least 16 MiB")]
    MemoryTooSmall(u64),
    #[error("invalid -smp '{0}': use a vCPU count such as -smp 2 or -smp cpus=2")]
    Smp(String),
    #[error("-smp {got}: this VMM supports 1 to {max} vCPUs")]
    SmpRange { got: u32, max: u32 },
    #[error("unknown guest '{0}': built-in guests are heartbeat, memcheck, blkcheck and netcheck")]
    UnknownGuest(String),
    #[error(
        "invalid guest option '{0}': the guests take hz=N, exit-after=N, exit-code=N; \
         memcheck also sweep=dense|sampled; blkcheck also depth=N (1..=64 requests in flight), \
         irq=msix|intx, order=sequential|random and bs=4K|8K|16K|32K|64K"
    )]
    GuestOption(String),
    #[error("invalid -serial '{0}': use stdio, file:PATH, unix:PATH,server[,wait=off] or null")]
    Serial(String),
    #[error("invalid -serial '{0}': only server mode is supported: add ,server")]
    SerialClientMode(String),
    #[error("invalid -qmp '{0}': use unix:PATH,server=on,wait=off")]
    Qmp(String),
    #[error(
        "invalid -qmp '{0}': without server=on QEMU would connect to PATH as a client, which this VMM does not do: use unix:PATH,server=on,wait=off"
    )]
    QmpClientMode(String),
    #[error(
        "invalid -qmp '{0}': server=on without wait=off makes QEMU wait for a client before the guest starts, which this VMM does not do: add ,wait=off"
    )]
    QmpWait(String),
    #[error("not supported: {option} ({instead})")]
    NotSupported {
        option: &'static str,
        instead: &'static str,
    },
    #[error(
        "invalid -machine option '{0}': supported are aux-ram-share=on|off and memory-backend=ID"
    )]
    Machine(String),
    #[error(transparent)]
    Object(#[from] objects::ObjectError),
    #[error(
        "invalid -incoming '{0}': use file:PATH, unix:PATH, defer, or a channel such as cpr,addr.transport=socket,addr.type=unix,addr.path=PATH"
    )]
    Incoming(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Drive(#[from] drives::DriveError),
    #[error("{0}")]
    Nic(#[from] nics::NicError),
}

/// Faults a test can inject into the new side of a live update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CprTestFault {
    ExitBeforeResume,
    CrashBeforeResume,
    /// SIGKILL right after the CPR state is read: no code of ours can roll back.
    KillAtStart,
    /// SIGKILL with the machine restored, just before the resume.
    KillBeforeResume,
    /// Never resume: only the update's deadline ends the wait.
    HangBeforeResume,
}

/// What runs in the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestBoot {
    Builtin(GuestSpec),
    /// A Linux kernel (bzImage or ELF vmlinux) with its initrd and command line.
    Linux(LinuxBootConfig),
}

impl GuestBoot {
    fn max_vcpus(&self) -> u32 {
        match self {
            GuestBoot::Builtin(_) => crate::boot::MAX_BUILTIN_VCPUS,
            GuestBoot::Linux(_) => MAX_LINUX_VCPUS,
        }
    }
}

/// How the serial console is connected to the outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialSpec {
    Stdio,
    File(PathBuf),
    /// A listening UNIX socket; one client at a time sees the output and can type.
    UnixServer(PathBuf),
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpSpec {
    pub path: PathBuf,
}

/// Where the machine comes from when it is not booted fresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncomingSpec {
    File(PathBuf),
    /// cpr-transfer's main channel: listen here for the old VMM.
    Unix(PathBuf),
    Defer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    pub guest: BuiltinGuest,
    pub tick_hz: u32,
    pub exit_after_ticks: u32,
    pub exit_code: u8,
}

/// The checked configuration of one VMM process.
#[derive(Clone, Debug)]
pub struct Config {
    pub ram_size: u64,
    pub prealloc: bool,
    pub hugepages: bool,
    /// `memory-backend-file`'s mem-path: all of RAM lives in this file.
    pub ram_file: Option<PathBuf>,
    /// `share=on` (always for `-m`): required by every CPR mode.
    pub ram_share: bool,
    /// The id of the memory backend object (QEMU's RAM block name in messages).
    pub ram_backend_id: String,
    pub vcpus: u32,
    pub guest: GuestBoot,
    pub serial: SerialSpec,
    pub qmp: Option<QmpSpec>,
    pub incoming: Option<IncomingSpec>,
    /// cpr-transfer: where the old VMM hands over guest RAM.
    pub cpr_channel: Option<PathBuf>,
    pub cpr_test_fault: Option<CprTestFault>,
    /// `-name`: reported by `query-name` and shown in every log line.
    pub name: Option<String>,
    /// `-S`: build the machine but leave it in `prelaunch` until `cont`.
    pub start_paused: bool,
    /// `-pidfile PATH`.
    pub pidfile: Option<PathBuf>,
    /// `--log-timestamps`.
    pub log_timestamps: crate::logger::Timestamps,
    /// Disks, each behind a virtio-blk-pci device, in PCI slot order.
    pub disks: Vec<crate::devices::virtio::block::BlockConfig>,
    /// NICs, each behind a virtio-net-pci device, in the PCI slots after the disks.
    pub nics: Vec<crate::devices::virtio::net::NetConfig>,
    /// The argv this process was started with (for the rollback fallback).
    pub argv: Vec<String>,
}

pub const MIN_RAM: u64 = 16 << 20;
pub const DEFAULT_RAM: u64 = 128 << 20;
/// The most any guest supports (Linux; built-in guests stop at 32).
pub const MAX_VCPUS: u32 = MAX_LINUX_VCPUS;
pub const DEFAULT_TICK_HZ: u32 = 10;

impl Config {
    pub fn from_args(args: Args, argv: Vec<String>) -> Result<Self, CliError> {
        let refused = [
            (
                args.daemonize,
                "-daemonize",
                "run the VMM in the foreground under a supervisor; -pidfile PATH writes its PID",
            ),
            (
                !args.monitor.is_empty(),
                "-monitor",
                "the monitor is QMP: -qmp unix:PATH,server=on,wait=off; HMP text goes through human-monitor-command",
            ),
            (
                !args.chardev.is_empty(),
                "-chardev",
                "give the back end directly: -serial unix:PATH,server=on,wait=off or -qmp unix:PATH,server=on,wait=off",
            ),
        ];
        if let Some((_, option, instead)) = refused.into_iter().find(|(given, ..)| *given) {
            return Err(CliError::NotSupported { option, instead });
        }
        if let Some(accel) = &args.accel
            && accel != "kvm"
        {
            return Err(CliError::Conflict(format!(
                "-accel {accel}: only kvm is supported"
            )));
        }
        if let Some(display) = &args.display
            && display != "none"
        {
            return Err(CliError::Conflict(format!(
                "-display {display}: there is no display; only -display none is accepted"
            )));
        }
        let mut machine_backend = None;
        for opts in &args.machine {
            if let Some(id) = parse_machine(opts)? {
                machine_backend = Some(id);
            }
        }
        let backend = objects::select_backend(&args.object, machine_backend.as_deref())?;
        let mut memory = match &args.memory {
            Some(m) => parse_memory_spec(m)?,
            None => MemorySpec {
                size: DEFAULT_RAM,
                hugepages: None,
                prealloc: None,
            },
        };
        if let Some(b) = &backend {
            if args.memory.is_some() && memory.size != b.size {
                return Err(objects::ObjectError::SizeMismatch {
                    m: memory.size >> 20,
                    id: b.id.clone(),
                    backend: b.size >> 20,
                }
                .into());
            }
            if memory.hugepages.is_some() || args.hugepages {
                return Err(objects::ObjectError::MemoryOptionWithBackend {
                    option: "hugepages",
                }
                .into());
            }
            if memory.prealloc.is_some() {
                return Err(
                    objects::ObjectError::MemoryOptionWithBackend { option: "prealloc" }.into(),
                );
            }
            memory = MemorySpec {
                size: b.size,
                hugepages: Some(b.kind == objects::BackendKind::Memfd { hugetlb: true }),
                prealloc: Some(b.prealloc),
            };
            if memory.size < MIN_RAM {
                return Err(CliError::MemoryTooSmall(memory.size));
            }
        }
        let ram_size = memory.size;
        for (name, flag, option) in [
            ("hugepages", args.hugepages, memory.hugepages),
            ("prealloc", args.prealloc, memory.prealloc),
        ] {
            if flag && option == Some(false) {
                return Err(CliError::Conflict(format!(
                    "--{name} contradicts -m ...,{name}=off: give one of them"
                )));
            }
        }
        let vcpus = parse_smp(&args.smp)?;
        let guest = match (&args.kernel, &args.guest) {
            (Some(_), Some(g)) => {
                return Err(CliError::Conflict(format!(
                    "-kernel and --guest {g}: boot either a kernel or a built-in guest"
                )));
            }
            (Some(kernel), None) => GuestBoot::Linux(LinuxBootConfig {
                kernel: kernel.clone(),
                initrd: args.initrd.clone(),
                cmdline: args.append.clone().unwrap_or_default(),
            }),
            (None, g) => {
                if args.initrd.is_some() || args.append.is_some() {
                    return Err(CliError::Conflict(
                        "-initrd and -append need -kernel".into(),
                    ));
                }
                GuestBoot::Builtin(parse_guest(g.as_deref().unwrap_or("heartbeat"))?)
            }
        };
        let max = guest.max_vcpus();
        if vcpus > max {
            return Err(CliError::SmpRange { got: vcpus, max });
        }
        let serial = parse_serial(&args.serial)?;
        let qmp = args.qmp.as_deref().map(parse_qmp).transpose()?;
        // All guest RAM is mapped shared, so aux-ram-share=on (which QEMU needs for cpr) is
        // what this VMM always does; the option is checked (above) and accepted.
        let (incoming, cpr_channel) = parse_incoming_channels(&args.incoming)?;
        let (nic_devices, disk_devices): (Vec<String>, Vec<String>) = args
            .device
            .iter()
            .cloned()
            .partition(|d| nics::is_nic_device(d));
        let disks = drives::parse_disks(&args.drive, &args.blockdev, &disk_devices, &args.add_fd)?;
        let nics = nics::parse_nics(&args.netdev, &nic_devices, &args.nic, disks.len())?;
        Ok(Config {
            ram_size,
            prealloc: args.prealloc || memory.prealloc == Some(true),
            hugepages: args.hugepages || memory.hugepages == Some(true),
            ram_file: backend.as_ref().and_then(|b| match &b.kind {
                objects::BackendKind::File { mem_path } => Some(mem_path.clone()),
                objects::BackendKind::Memfd { .. } => None,
            }),
            ram_share: backend.as_ref().is_none_or(|b| b.share),
            ram_backend_id: backend.map_or_else(|| "pc.ram".to_string(), |b| b.id),
            vcpus,
            guest,
            serial,
            qmp,
            incoming,
            cpr_channel,
            cpr_test_fault: args.cpr_test_fault,
            name: args.name.clone(),
            start_paused: args.start_paused,
            pidfile: args.pidfile.clone(),
            log_timestamps: args.log_timestamps,
            disks,
            nics,
            argv,
        })
    }
}

impl Config {
    /// `query-chardev`: the monitor and the serial console, labelled as QEMU labels them.
    pub fn chardevs(&self) -> Vec<ChardevInfo> {
        let socket = |p: &std::path::Path| format!("unix:{},server=on", p.display());
        let mut out = Vec::new();
        if let Some(q) = &self.qmp {
            out.push(ChardevInfo {
                label: "compat_monitor0".into(),
                filename: socket(&q.path),
                frontend_open: true,
            });
        }
        let filename = match &self.serial {
            SerialSpec::Stdio => "stdio".to_string(),
            SerialSpec::File(_) => "file".to_string(),
            SerialSpec::UnixServer(p) => socket(p),
            SerialSpec::Null => "null".to_string(),
        };
        out.push(ChardevInfo {
            label: "serial0".into(),
            filename,
            frontend_open: true,
        });
        out
    }

    /// The one line logged at start: what runs, on what, reachable where.
    pub fn summary(&self) -> String {
        let guest = match &self.guest {
            GuestBoot::Builtin(g) => format!("built-in guest {}", g.guest.name()),
            GuestBoot::Linux(l) => format!("Linux kernel {}", l.kernel.display()),
        };
        let backing = match (self.hugepages, self.prealloc) {
            (true, true) => "hugetlb memfd (2 MiB pages), preallocated",
            (true, false) => "hugetlb memfd (2 MiB pages)",
            (false, true) => "memfd, preallocated",
            (false, false) => "memfd",
        };
        let backing = match &self.ram_file {
            Some(f) if self.prealloc => format!("file {}, preallocated", f.display()),
            Some(f) => format!("file {}", f.display()),
            None => backing.to_string(),
        };
        let backing = if self.ram_share {
            backing
        } else {
            format!("{backing}, share=off")
        };
        let qmp = match &self.qmp {
            Some(q) => format!("unix:{}", q.path.display()),
            None => "none".to_string(),
        };
        let serial = match &self.serial {
            SerialSpec::Stdio => "stdio".to_string(),
            SerialSpec::File(p) => format!("file:{}", p.display()),
            SerialSpec::UnixServer(p) => format!("unix:{}", p.display()),
            SerialSpec::Null => "null".to_string(),
        };
        format!(
            "cpr-vmm {} started: pid {}{}, machine pc with {} vCPU(s) and {} MiB RAM ({backing}), {guest}, QMP {qmp}, serial {serial}{}",
            crate::VERSION,
            std::process::id(),
            self.name
                .as_deref()
                .map(|n| format!(", name {n}"))
                .unwrap_or_default(),
            self.vcpus,
            self.ram_size >> 20,
            if self.start_paused {
                ", paused until cont (-S)"
            } else {
                ""
            }
        )
    }
}

/// The `-pidfile` file: written at start, removed when the VMM exits (dropped). A live update
/// execs without dropping it, and the new VMM writes the same PID again.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

/// Why the `-pidfile` could not be written.
#[derive(Debug, thiserror::Error)]
#[error("-pidfile {}: {source}", path.display())]
pub struct PidFileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl PidFile {
    /// Writes this process's PID and a newline to `path`.
    pub fn create(path: &std::path::Path) -> Result<Self, PidFileError> {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|source| {
            PidFileError {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(PidFile {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Guest RAM as `-m` gives it: a size, and optionally how to back it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySpec {
    pub size: u64,
    /// `hugepages=on|off` (QEMU's memory-backend `hugetlb`), if given.
    pub hugepages: Option<bool>,
    /// `prealloc=on|off`, if given.
    pub prealloc: Option<bool>,
}

/// Parses `-m`: `1G`, `512M`, `1024` (MiB), `size=1G`, optionally followed by
/// `,hugepages=on|off` and `,prealloc=on|off` (the documented choice for very large guests is
/// `-m 64G,hugepages=on`).
pub fn parse_memory_spec(spec: &str) -> Result<MemorySpec, CliError> {
    let mut hugepages = None;
    let mut prealloc = None;
    let mut size_spec = Vec::new();
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("hugepages", v)) => hugepages = Some(parse_on_off(v, part)?),
            Some(("prealloc", v)) => prealloc = Some(parse_on_off(v, part)?),
            Some((key, _)) if key != "size" => {
                return Err(CliError::MemoryOption(part.to_string()));
            }
            _ => size_spec.push(part),
        }
    }
    Ok(MemorySpec {
        size: parse_memory(&size_spec.join(","))?,
        hugepages,
        prealloc,
    })
}

fn parse_on_off(value: &str, part: &str) -> Result<bool, CliError> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(CliError::MemoryOption(part.to_string())),
    }
}

/// Parses a RAM size: `1G`, `512M`, `1024` (MiB), `size=1G`.
pub fn parse_memory(spec: &str) -> Result<u64, CliError> {
    let err = || CliError::MemorySize(spec.to_string());
    let mut size_text = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("size", v)) => size_text = Some(v),
            Some(_) => return Err(err()),
            None if size_text.is_none() => size_text = Some(part),
            None => return Err(err()),
        }
    }
    let text = size_text.ok_or_else(err)?.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let unit = suffix
        .strip_suffix("iB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(suffix);
    let shift = match unit {
        "" if suffix.is_empty() => 20,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(err()),
    };
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or_else(err)?;
    if bytes % 4096 != 0 {
        return Err(err());
    }
    if bytes < MIN_RAM {
        return Err(CliError::MemoryTooSmall(bytes));
    }
    Ok(bytes)
}

pub fn parse_smp(spec: &str) -> Result<u32, CliError> {
    let err = || CliError::Smp(spec.to_string());
    let mut cpus = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("cpus", v)) => cpus = Some(v.parse::<u32>().map_err(|_| err())?),
            Some(("sockets" | "threads" | "dies" | "clusters", "1")) => {}
            Some(("cores" | "maxcpus", v)) => {
                let n = v.parse::<u32>().map_err(|_| err())?;
                cpus.get_or_insert(n);
            }
            Some(_) => return Err(err()),
            None => cpus = Some(part.parse::<u32>().map_err(|_| err())?),
        }
    }
    let n = cpus.ok_or_else(err)?;
    if n == 0 || n > MAX_VCPUS {
        return Err(CliError::SmpRange {
            got: n,
            max: MAX_VCPUS,
        });
    }
    Ok(n)
}

pub fn parse_guest(spec: &str) -> Result<GuestSpec, CliError> {
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or_default();
    let guest =
        BuiltinGuest::from_name(name).ok_or_else(|| CliError::UnknownGuest(name.to_string()))?;
    let mut g = GuestSpec {
        guest,
        tick_hz: guest.default_tick_hz(DEFAULT_TICK_HZ),
        exit_after_ticks: 0,
        exit_code: 0,
    };
    for opt in parts {
        let bad = || CliError::GuestOption(opt.to_string());
        let (k, v) = opt.split_once('=').ok_or_else(bad)?;
        match k {
            "hz" => {
                g.tick_hz = v
                    .parse()
                    .ok()
                    .filter(|hz| (1..=1000).contains(hz))
                    .ok_or_else(bad)?
            }
            "exit-after" => g.exit_after_ticks = v.parse().map_err(|_| bad())?,
            "exit-code" => g.exit_code = v.parse().map_err(|_| bad())?,
            "depth" | "irq" | "order" | "bs" => {
                let BuiltinGuest::Blkcheck {
                    depth,
                    intx,
                    random,
                    bs_kib,
                } = &mut g.guest
                else {
                    return Err(bad());
                };
                match (k, v) {
                    ("depth", _) => {
                        *depth = v
                            .parse()
                            .ok()
                            .filter(|d| (1..=BLKCHECK_MAX_DEPTH).contains(d))
                            .ok_or_else(bad)?
                    }
                    ("bs", _) => {
                        *bs_kib = v
                            .strip_suffix(['K', 'k'])
                            .and_then(|n| n.parse().ok())
                            .filter(|n| BLKCHECK_REQUEST_KIB.contains(n))
                            .ok_or_else(bad)?
                    }
                    ("order", "sequential") => *random = false,
                    ("order", "random") => *random = true,
                    ("irq", "msix") => *intx = false,
                    ("irq", "intx") => *intx = true,
                    _ => return Err(bad()),
                }
            }
            "sweep" => {
                g.guest = match (g.guest, v) {
                    (BuiltinGuest::Memcheck | BuiltinGuest::MemcheckSampled, "dense") => {
                        BuiltinGuest::Memcheck
                    }
                    (BuiltinGuest::Memcheck | BuiltinGuest::MemcheckSampled, "sampled") => {
                        BuiltinGuest::MemcheckSampled
                    }
                    _ => return Err(bad()),
                }
            }
            _ => return Err(bad()),
        }
    }
    Ok(g)
}

pub fn parse_serial(spec: &str) -> Result<SerialSpec, CliError> {
    let err = || CliError::Serial(spec.to_string());
    match spec {
        "stdio" | "mon:stdio" => return Ok(SerialSpec::Stdio),
        "null" | "none" => return Ok(SerialSpec::Null),
        _ => {}
    }
    if let Some(path) = spec.strip_prefix("file:") {
        if path.is_empty() {
            return Err(err());
        }
        return Ok(SerialSpec::File(PathBuf::from(path)));
    }
    if let Some(rest) = spec.strip_prefix("unix:") {
        let mut parts = rest.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(err)?;
        let mut server = false;
        for opt in parts {
            match opt {
                "server" | "server=on" => server = true,
                "wait=off" | "nowait" => {}
                _ => return Err(err()),
            }
        }
        if !server {
            return Err(CliError::SerialClientMode(spec.to_string()));
        }
        return Ok(SerialSpec::UnixServer(PathBuf::from(path)));
    }
    Err(err())
}

pub fn parse_qmp(spec: &str) -> Result<QmpSpec, CliError> {
    let err = || CliError::Qmp(spec.to_string());
    let rest = spec.strip_prefix("unix:").ok_or_else(err)?;
    let mut parts = rest.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(err)?;
    // QEMU's defaults: a client (server=off), and a server waits for its first client.
    let (mut server, mut wait) = (false, true);
    for opt in parts {
        match opt {
            "server" | "server=on" => server = true,
            "server=off" => server = false,
            "wait=off" | "nowait" => wait = false,
            "wait=on" => wait = true,
            _ => return Err(err()),
        }
    }
    if !server {
        return Err(CliError::QmpClientMode(spec.to_string()));
    }
    if wait {
        return Err(CliError::QmpWait(spec.to_string()));
    }
    Ok(QmpSpec {
        path: PathBuf::from(path),
    })
}

/// Checks one `-machine` value; returns its `memory-backend=ID`, if any.
fn parse_machine(spec: &str) -> Result<Option<String>, CliError> {
    let mut backend = None;
    for opt in spec.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("memory-backend", id)) if !id.is_empty() => backend = Some(id.to_string()),
            Some(("aux-ram-share", "on" | "off")) => {}
            // What libvirt writes on every -machine; nothing to do here.
            Some(("usb", "off")) | Some(("dump-guest-core", "on" | "off")) => {}
            // Versioned machine types (libvirt pins one): the same minimal PC here.
            None if opt.starts_with("pc-i440fx-") || opt.starts_with("pc-q35-") => {}
            Some(("accel", "kvm")) => {}
            // QEMU's machine type names; this VMM has one machine, a minimal PC.
            Some(("type", "pc" | "q35" | "microvm")) => {}
            None if matches!(opt, "pc" | "q35" | "microvm") => {}
            _ => return Err(CliError::Machine(opt.to_string())),
        }
    }
    Ok(backend)
}

/// One `-incoming` value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum IncomingChannel {
    Main(IncomingSpec),
    Cpr(PathBuf),
}

/// All `-incoming` values: at most one main channel and one CPR channel (QEMU's rules).
fn parse_incoming_channels(
    specs: &[String],
) -> Result<(Option<IncomingSpec>, Option<PathBuf>), CliError> {
    let mut main = None;
    let mut cpr = None;
    for spec in specs {
        match parse_incoming_channel(spec)? {
            IncomingChannel::Main(m) if main.is_none() => main = Some(m),
            IncomingChannel::Cpr(p) if cpr.is_none() => cpr = Some(p),
            _ => {
                return Err(CliError::Conflict(format!(
                    "-incoming {spec}: that channel was already given; give one main and at most one cpr channel"
                )));
            }
        }
    }
    match (&main, &cpr) {
        (None, Some(_)) => Err(CliError::Conflict(
            "a cpr channel needs a main channel too: add -incoming unix:PATH or -incoming defer"
                .into(),
        )),
        (Some(IncomingSpec::File(_)), Some(_)) => Err(CliError::Conflict(
            "cpr-transfer sends machine state over a socket: use -incoming unix:PATH or defer as the main channel, not file:"
                .into(),
        )),
        _ => Ok((main, cpr)),
    }
}

/// A URI (`file:PATH`, `unix:PATH`, `defer`), a keyval channel
/// (`cpr,addr.transport=socket,addr.type=unix,addr.path=PATH`) or a JSON channel
/// (`{"channel-type":"cpr","addr":{...}}`).
fn parse_incoming_channel(spec: &str) -> Result<IncomingChannel, CliError> {
    let err = || CliError::Incoming(spec.to_string());
    if spec.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(spec).map_err(|_| err())?;
        let kind = v["channel-type"].as_str().ok_or_else(err)?;
        let addr = &v["addr"];
        let fields: Vec<(String, String)> = addr
            .as_object()
            .ok_or_else(err)?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        return channel_from_fields(kind, &fields).ok_or_else(err);
    }
    if spec == "defer" {
        return Ok(IncomingChannel::Main(IncomingSpec::Defer));
    }
    if let Some(path) = spec.strip_prefix("file:").filter(|p| !p.is_empty()) {
        return Ok(IncomingChannel::Main(IncomingSpec::File(PathBuf::from(
            path,
        ))));
    }
    if let Some(path) = spec.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        return Ok(IncomingChannel::Main(IncomingSpec::Unix(PathBuf::from(
            path,
        ))));
    }
    // keyval: the first bare word is the channel type.
    let mut kind = None;
    let mut fields = Vec::new();
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("channel-type", v)) => kind = Some(v.to_string()),
            Some((k, v)) => {
                let k = k.strip_prefix("addr.").ok_or_else(err)?;
                fields.push((k.to_string(), v.to_string()));
            }
            None if kind.is_none() => kind = Some(part.to_string()),
            None => return Err(err()),
        }
    }
    channel_from_fields(&kind.ok_or_else(err)?, &fields).ok_or_else(err)
}

fn channel_from_fields(kind: &str, fields: &[(String, String)]) -> Option<IncomingChannel> {
    let get = |k: &str| {
        fields
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.as_str())
    };
    let known = ["transport", "type", "path", "filename", "offset"];
    if fields.iter().any(|(k, _)| !known.contains(&k.as_str())) {
        return None;
    }
    let unix_path = match (get("transport")?, get("type")) {
        ("socket", Some("unix")) => Some(PathBuf::from(get("path").filter(|p| !p.is_empty())?)),
        ("file", None) => None,
        _ => return None,
    };
    match (kind, unix_path) {
        ("cpr", Some(p)) => Some(IncomingChannel::Cpr(p)),
        ("main", Some(p)) => Some(IncomingChannel::Main(IncomingSpec::Unix(p))),
        ("main", None) if get("offset").unwrap_or("0") == "0" => Some(IncomingChannel::Main(
            IncomingSpec::File(PathBuf::from(get("filename").filter(|f| !f.is_empty())?)),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let argv: Vec<String> = std::iter::once("vmm")
            .chain(args.iter().copied())
            .map(String::from)
            .collect();
        let norm = normalize_qemu_spellings(argv.clone());
        let a = Args::try_parse_from(norm).map_err(|e| e.to_string())?;
        Config::from_args(a, argv).map_err(|e| e.to_string())
    }

    #[test]
    fn qemu_spellings() {
        let c = parse(&[
            "-m",
            "1G",
            "-smp",
            "2",
            "-qmp",
            "unix:/tmp/q.sock,server=on,wait=off",
            "-serial",
            "null",
            "-machine",
            "aux-ram-share=on",
            "-incoming",
            "file:/tmp/s",
            "--guest",
            "memcheck",
        ])
        .unwrap();
        assert_eq!(c.ram_size, 1 << 30);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.qmp.unwrap().path, PathBuf::from("/tmp/q.sock"));
        assert_eq!(c.serial, SerialSpec::Null);
        assert_eq!(c.incoming, Some(IncomingSpec::File("/tmp/s".into())));
        assert!(matches!(
            c.guest,
            GuestBoot::Builtin(GuestSpec {
                guest: BuiltinGuest::Memcheck,
                ..
            })
        ));
    }

    #[test]
    fn long_spellings_and_defaults() {
        let c = parse(&["--memory", "size=256M", "--smp", "cpus=3"]).unwrap();
        assert_eq!(c.ram_size, 256 << 20);
        assert_eq!(c.vcpus, 3);
        assert_eq!(c.serial, SerialSpec::Stdio);
        let GuestBoot::Builtin(g) = c.guest else {
            panic!("expected a built-in guest");
        };
        assert_eq!(g.guest, BuiltinGuest::Heartbeat);
        assert_eq!(g.tick_hz, DEFAULT_TICK_HZ);
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("1024").unwrap(), 1 << 30);
        assert_eq!(parse_memory("16G").unwrap(), 16 << 30);
        assert_eq!(parse_memory("65536k").unwrap(), 64 << 20);
        assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
        for bad in [
            "",
            "G",
            "1X",
            "-1G",
            "1.5G",
            "8M",
            "99999999999999T",
            "size=",
            "1G,x=1",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn memory_backing_options() {
        let c = parse(&["-m", "1G,hugepages=on,prealloc=on"]).unwrap();
        assert_eq!(c.ram_size, 1 << 30);
        assert!(c.hugepages && c.prealloc);
        let c = parse(&["-m", "size=2G,hugepages=off"]).unwrap();
        assert_eq!(c.ram_size, 2 << 30);
        assert!(!c.hugepages && !c.prealloc);
        let c = parse(&["-m", "512M", "--hugepages"]).unwrap();
        assert!(c.hugepages);
        for (args, says) in [
            (&["-m", "1G,hugepages=maybe"][..], "hugepages=on|off"),
            (&["-m", "1G,hugetlb=on"][..], "hugepages=on|off"),
            (
                &["-m", "1G,hugepages=off", "--hugepages"][..],
                "contradicts",
            ),
            (&["-m", "1G,prealloc=off", "--prealloc"][..], "contradicts"),
            (&["-m", "hugepages=on"][..], "invalid memory size"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn memory_backend_objects_and_m_agree() {
        let memfd = "memory-backend-memfd,id=pc.ram,size=1G,share=on,hugetlb=on,prealloc=on";
        let c = parse(&["-object", memfd, "-machine", "pc,memory-backend=pc.ram"]).unwrap();
        assert_eq!(c.ram_size, 1 << 30);
        assert!(c.hugepages && c.prealloc && c.ram_share && c.ram_file.is_none());
        assert_eq!(c.ram_backend_id, "pc.ram");
        // -m may repeat the size, in any spelling.
        let c = parse(&[
            "-m",
            "1024",
            "-object",
            memfd,
            "-M",
            "memory-backend=pc.ram",
        ])
        .unwrap();
        assert_eq!(c.ram_size, 1 << 30);
        let file = "memory-backend-file,id=m,size=64M,mem-path=/tmp/x.ram";
        let c = parse(&["-object", file, "-machine", "memory-backend=m"]).unwrap();
        assert_eq!(
            c.ram_file.as_deref(),
            Some(std::path::Path::new("/tmp/x.ram"))
        );
        assert!(!c.ram_share, "QEMU's default is share=off");
        // Without a backend, -m alone: shared memfd, 128 MiB by default.
        let c = parse(&[]).unwrap();
        assert_eq!(c.ram_size, 128 << 20);
        assert!(c.ram_share && c.ram_file.is_none());
        for (args, needle) in [
            (
                &[
                    "-m",
                    "2G",
                    "-object",
                    memfd,
                    "-machine",
                    "memory-backend=pc.ram",
                ][..],
                "-m says 2048 MiB",
            ),
            (
                &[
                    "-m",
                    "1G,hugepages=on",
                    "-object",
                    memfd,
                    "-machine",
                    "memory-backend=pc.ram",
                ][..],
                "give hugepages on the -object",
            ),
            (&["-object", memfd][..], "-machine memory-backend=pc.ram"),
            (
                &["-machine", "memory-backend=nope"][..],
                "no -object with id 'nope'",
            ),
            (
                &[
                    "-object",
                    "memory-backend-file,id=m,size=8M,mem-path=/x",
                    "-machine",
                    "memory-backend=m",
                ][..],
                "too small",
            ),
            (&["-machine", "memory-backend="][..], "memory-backend=ID"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn bad_values_say_what_to_do() {
        let e = parse(&["-smp", "0"]).unwrap_err();
        assert!(e.contains("1 to"), "{e}");
        let e = parse(&["--guest", "doom"]).unwrap_err();
        assert!(
            e.contains("heartbeat, memcheck, blkcheck and netcheck"),
            "{e}"
        );
        let e = parse(&["-serial", "tcp:1.2.3.4:5"]).unwrap_err();
        assert!(e.contains("stdio, file:PATH"), "{e}");
        let e = parse(&["-qmp", "tcp:localhost:4444"]).unwrap_err();
        assert!(e.contains("unix:PATH"), "{e}");
        let e = parse(&["-machine", "foo=bar"]).unwrap_err();
        assert!(e.contains("aux-ram-share"), "{e}");
    }

    #[test]
    fn qemu_options_that_do_not_apply_are_refused_by_name() {
        for (args, option) in [
            (&["-daemonize"][..], "-daemonize"),
            (&["-monitor", "stdio"][..], "-monitor"),
            (
                &["-chardev", "socket,id=c,path=/tmp/c,server=on"][..],
                "-chardev",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.starts_with(&format!("not supported: {option} (")), "{e}");
        }
        let e = parse(&["-qmp", "unix:/tmp/q"]).unwrap_err();
        assert!(
            e.contains("client") && e.contains("server=on,wait=off"),
            "{e}"
        );
        let e = parse(&["-qmp", "unix:/tmp/q,server=on"]).unwrap_err();
        assert!(e.contains("add ,wait=off"), "{e}");
        let e = parse(&["-qmp", "unix:/tmp/q,server=on,wait=on"]).unwrap_err();
        assert!(e.contains("add ,wait=off"), "{e}");
        for ok in [
            "unix:/tmp/q,server=on,wait=off",
            "unix:/tmp/q,server,nowait",
        ] {
            assert!(parse(&["-qmp", ok]).is_ok(), "{ok}");
        }
    }

    #[test]
    fn start_paused_pidfile_and_accepted_compat_options() {
        let c = parse(&["-S", "-pidfile", "/run/vm.pid", "-name", "vm1"]).unwrap();
        assert!(c.start_paused);
        assert_eq!(c.pidfile, Some(PathBuf::from("/run/vm.pid")));
        assert_eq!(c.name.as_deref(), Some("vm1"));
        assert!(!parse(&[]).unwrap().start_paused);
        assert!(
            parse(&[
                "-enable-kvm",
                "-accel",
                "kvm",
                "-nographic",
                "-display",
                "none",
                "-machine",
                "q35",
                "-nodefaults"
            ])
            .is_ok()
        );
        let help = Args::try_parse_from(["vmm", "--help"])
            .unwrap_err()
            .to_string();
        for listed in [
            "-enable-kvm",
            "-accel kvm",
            "-nographic",
            "-display none",
            "-machine q35",
            "-daemonize",
            "-pidfile",
            "-S",
        ] {
            assert!(
                help.contains(listed),
                "--help does not list {listed}:\n{help}"
            );
        }
    }

    #[test]
    fn guest_options() {
        let g = parse_guest("heartbeat,hz=50,exit-after=3,exit-code=7").unwrap();
        assert_eq!((g.tick_hz, g.exit_after_ticks, g.exit_code), (50, 3, 7));
        assert!(parse_guest("heartbeat,hz=0").is_err());
        assert_eq!(
            parse_guest("memcheck,sweep=sampled").unwrap().guest,
            BuiltinGuest::MemcheckSampled
        );
        assert_eq!(
            parse_guest("memcheck,sweep=dense").unwrap().guest,
            BuiltinGuest::Memcheck
        );
        assert!(parse_guest("heartbeat,sweep=sampled").is_err());
        assert!(parse_guest("memcheck,sweep=all").is_err());
        assert!(parse_guest("heartbeat,volume=11").is_err());
    }

    #[test]
    fn blkcheck_guest_takes_a_depth_and_an_interrupt_mode() {
        let blkcheck = |depth, intx| BuiltinGuest::Blkcheck {
            depth,
            intx,
            random: false,
            bs_kib: 0,
        };
        let g = parse_guest("blkcheck").unwrap();
        assert_eq!(g.guest, blkcheck(0, false));
        let g = parse_guest("blkcheck,depth=16,exit-after=2").unwrap();
        assert_eq!(g.guest, blkcheck(16, false));
        assert_eq!(g.exit_after_ticks, 2);
        let g = parse_guest("blkcheck,irq=intx,depth=4").unwrap();
        assert_eq!(g.guest, blkcheck(4, true));
        let g = parse_guest("blkcheck,irq=intx,irq=msix").unwrap();
        assert_eq!(g.guest, blkcheck(0, false));
        let e = parse_guest("blkcheck,irq=msi").unwrap_err().to_string();
        assert!(e.contains("irq=msix|intx"), "{e}");
        assert!(parse_guest("memcheck,irq=intx").is_err());
        for bad in ["blkcheck,depth=0", "blkcheck,depth=65", "blkcheck,depth=x"] {
            let e = parse_guest(bad).unwrap_err().to_string();
            assert!(e.contains("depth=N"), "{bad}: {e}");
        }
        // Only blkcheck has a depth.
        assert!(parse_guest("heartbeat,depth=8").is_err());
    }

    #[test]
    fn blkcheck_guest_takes_an_order_and_a_request_size() {
        let g = parse_guest("blkcheck,order=random,bs=64K,depth=8").unwrap();
        let want = BuiltinGuest::Blkcheck {
            depth: 8,
            intx: false,
            random: true,
            bs_kib: 64,
        };
        assert_eq!(g.guest, want);
        let g = parse_guest("blkcheck,order=random,order=sequential,bs=8k").unwrap();
        let want = BuiltinGuest::Blkcheck {
            depth: 0,
            intx: false,
            random: false,
            bs_kib: 8,
        };
        assert_eq!(g.guest, want);
        for bad in [
            "blkcheck,bs=128K",
            "blkcheck,bs=12K",
            "blkcheck,bs=4096",
            "blkcheck,bs=0K",
            "blkcheck,order=reverse",
            "memcheck,bs=4K",
            "heartbeat,order=random",
        ] {
            let e = parse_guest(bad).unwrap_err().to_string();
            assert!(e.contains("bs=4K|8K|16K|32K|64K"), "{bad}: {e}");
        }
    }

    #[test]
    fn netcheck_guest_sends_at_100_hz_unless_told() {
        let g = parse_guest("netcheck").unwrap();
        assert_eq!(g.guest, BuiltinGuest::Netcheck);
        assert_eq!(g.tick_hz, 100);
        let g = parse_guest("netcheck,hz=50,exit-after=20").unwrap();
        assert_eq!((g.tick_hz, g.exit_after_ticks), (50, 20));
        assert!(parse_guest("netcheck,depth=8").is_err());
        // The other guests keep the command line's default.
        assert_eq!(parse_guest("heartbeat").unwrap().tick_hz, DEFAULT_TICK_HZ);
    }

    #[test]
    fn cpr_transfer_channels_in_every_spelling() {
        let c = parse(&[
            "-incoming",
            "unix:/run/main.sock",
            "-incoming",
            "cpr,addr.transport=socket,addr.type=unix,addr.path=/run/cpr.sock",
        ])
        .unwrap();
        assert_eq!(
            c.incoming,
            Some(IncomingSpec::Unix("/run/main.sock".into()))
        );
        assert_eq!(c.cpr_channel, Some(PathBuf::from("/run/cpr.sock")));
        let c = parse(&[
            "-incoming",
            "defer",
            "-incoming",
            r#"{"channel-type":"cpr","addr":{"transport":"socket","type":"unix","path":"/run/c"}}"#,
        ])
        .unwrap();
        assert_eq!(c.incoming, Some(IncomingSpec::Defer));
        assert_eq!(c.cpr_channel, Some(PathBuf::from("/run/c")));
        let c = parse(&[
            "-incoming",
            "main,addr.transport=socket,addr.type=unix,addr.path=/run/m",
        ])
        .unwrap();
        assert_eq!(c.incoming, Some(IncomingSpec::Unix("/run/m".into())));
        for bad in [
            vec![
                "-incoming",
                "cpr,addr.transport=socket,addr.type=unix,addr.path=/c",
            ],
            vec!["-incoming", "defer", "-incoming", "defer"],
            vec![
                "-incoming",
                "file:/s",
                "-incoming",
                "cpr,addr.transport=socket,addr.type=unix,addr.path=/c",
            ],
            vec![
                "-incoming",
                "cpr,addr.transport=socket,addr.type=tcp,addr.path=/c",
            ],
            vec![
                "-incoming",
                "cpr,addr.transport=socket,addr.type=unix,addr.bogus=1",
            ],
            vec!["-incoming", r#"{"channel-type":"cpr"}"#],
            vec!["-incoming", "tcp:0:4444"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn linux_options() {
        let c = parse(&[
            "-kernel",
            "/boot/vmlinux",
            "-initrd",
            "/boot/initrd",
            "-append",
            "console=ttyS0",
        ])
        .unwrap();
        assert_eq!(
            c.guest,
            GuestBoot::Linux(LinuxBootConfig {
                kernel: "/boot/vmlinux".into(),
                initrd: Some("/boot/initrd".into()),
                cmdline: "console=ttyS0".into(),
            })
        );
        assert!(parse(&["-kernel", "/k", "-smp", "64"]).is_ok());
        assert!(parse(&["-smp", "64"]).unwrap_err().contains("1 to 32"));
        assert!(parse(&["-kernel", "/k", "--guest", "heartbeat"]).is_err());
        assert!(
            parse(&["-append", "quiet"])
                .unwrap_err()
                .contains("need -kernel")
        );
    }

    #[test]
    fn passthrough_after_double_dash() {
        let v = normalize_qemu_spellings(
            ["vmm", "-smp", "2", "--", "-smp"]
                .iter()
                .map(|s| s.to_string()),
        );
        assert_eq!(v, vec!["vmm", "--smp", "2", "--", "-smp"]);
    }
}
