//! `live-update-demo`: an operator's walkthrough of cpr-exec live update.
//!
//! ```text
//! cargo build --release && cargo run --release -p cpr-examples --bin live-update-demo
//! ```
//!
//! It boots the `memcheck` demo guest (256 MiB, 2 vCPUs) with a QMP socket, then
//! live-updates the running VMM several times through `cpr-shim`, exactly as an
//! operator would with any QMP client:
//!
//! ```text
//! {"execute": "migrate-set-parameters",
//!  "arguments": {"mode": "cpr-exec",
//!                "cpr-exec-command": ["cpr-shim", "--log", LOG, "--",
//!                                     VMM, ...same arguments..., "-incoming", "file:STATE"]}}
//! {"execute": "migrate", "arguments": {"uri": "file:STATE"}}
//! ```
//!
//! and waits for the `MIGRATION` event that says `completed` (it arrives on the same
//! connection: the QMP socket survives the update). For each update it prints the
//! blackout that `query-migrate` reports (`x-cpr`), with its phases, and checks that
//! the PID did not change. Then it checks guest memory the way QEMU's migration
//! tests do (`stop`, `pmemsave`, every page's counter equal but for one step of
//! the sweep in progress, `cont`), and quits the VM.
//!
//! It builds nothing: it runs the `vmm` and `cpr-shim` next to its own executable
//! (`target/release/`), or those given with `--vmm` and `--shim`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Generous limit for anything the VMM or the guest has to do.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The memcheck guest sweeps guest-physical [1 MiB, min(RAM, 100 MiB)).
const SWEEP_START: u64 = 1 << 20;
const SWEEP_LIMIT: u64 = 100 << 20;
const PAGE: usize = 4096;

const USAGE: &str = "usage: live-update-demo [--quick] [--updates N] [--memory SIZE] [--vmm PATH] [--shim PATH] [--keep] [--verbose]

Boots the memcheck demo guest, live-updates its VMM N times (default 5) through
cpr-shim, prints each update's blackout and the PID, checks guest memory, quits.

  --quick         the short form that scripts/test.sh runs: 2 updates of a 64M guest
                  (same as --updates 2 --memory 64M; later options override it)
  --updates N     how many live updates (default 5)
  --memory SIZE   guest RAM, e.g. 256M or 1G (default 256M)
  --vmm PATH      the vmm binary (default: next to this program, else target/release)
  --shim PATH     the cpr-shim binary (same default)
  --keep          keep the scratch directory (QMP socket, state file, logs)
  --verbose       show every QMP message";

type Result<T> = std::result::Result<T, String>;

struct Options {
    updates: usize,
    memory: String,
    vmm: Option<PathBuf>,
    shim: Option<PathBuf>,
    keep: bool,
    verbose: bool,
}

fn parse_options() -> Result<Options> {
    let mut o = Options {
        updates: 5,
        memory: "256M".into(),
        vmm: None,
        shim: None,
        keep: false,
        verbose: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--updates" => {
                o.updates = value()?
                    .parse()
                    .map_err(|_| "--updates: expected a number".to_string())?
            }
            "--memory" => o.memory = value()?,
            "--quick" => {
                o.updates = 2;
                o.memory = "64M".into();
            }
            "--vmm" => o.vmm = Some(value()?.into()),
            "--shim" => o.shim = Some(value()?.into()),
            "--keep" => o.keep = true,
            "--verbose" | "-v" => o.verbose = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other}\n\n{USAGE}")),
        }
    }
    Ok(o)
}

/// `256M` → bytes (no suffix: MiB, as the VMM reads it).
fn parse_size(text: &str) -> Result<u64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "M"),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size {text}"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("bad size {text}: use K, M or G")),
    };
    Ok(n << shift)
}

/// `name` next to this program (cargo puts all binaries in `target/release/`),
/// else in the workspace's `target/release/`.
fn find_binary(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release")
            .join(name),
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            format!(
                "{name} not found (looked at {candidates:?}); run `cargo build --release` first"
            )
        })
}

// ---------------------------------------------------------------------------
// A minimal QMP client: one JSON object per line, replies matched by id,
// events queued until asked for.

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    next_id: u64,
    verbose: bool,
}

impl Qmp {
    fn connect(path: &Path, verbose: bool) -> Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > TIMEOUT => {
                    return Err(format!("connecting to {}: {e}", path.display()));
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            next_id: 0,
            verbose,
        };
        let greeting = qmp.read(Instant::now() + TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            return Err(format!("expected the QMP greeting, got {greeting}"));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read(&mut self, deadline: Instant) -> Result<Value> {
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out waiting for the VMM on QMP".into());
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err("the VMM closed the QMP connection".into()),
                Ok(_) if line.ends_with('\n') => break,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(e) => return Err(format!("reading QMP: {e}")),
            }
        }
        if self.verbose {
            println!("        qmp< {}", line.trim_end());
        }
        serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}"))
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({"execute": command, "id": id});
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        if self.verbose {
            println!("        qmp> {request}");
        }
        // One write: the VMM may act on the JSON object before a separate newline
        // arrives (after `quit`, a second write would find the socket closed).
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| format!("sending {command}: {e}"))?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let message = self.read(deadline)?;
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else if message["id"] == json!(id) {
                if let Some(error) = message.get("error") {
                    return Err(format!("{command}: {}", error["desc"]));
                }
                return Ok(message["return"].clone());
            }
        }
    }

    fn wait_event(&mut self, name: &str) -> Result<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name)
            && let Some(event) = self.events.remove(i)
        {
            return Ok(event);
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let message = self.read(deadline)?;
            if message["event"] == name {
                return Ok(message);
            }
            if message.get("event").is_some() {
                self.events.push_back(message);
            }
        }
    }
}

// ---------------------------------------------------------------------------

/// The VMM process; killed if the demo fails half-way.
struct VmmChild(Child);

impl Drop for VmmChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

struct Demo {
    options: Options,
    vmm: PathBuf,
    shim: PathBuf,
    dir: PathBuf,
    ram: u64,
}

impl Demo {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The VM's arguments; the new VMM of every update gets the same ones.
    fn vm_args(&self) -> Vec<String> {
        [
            "-m",
            &self.options.memory,
            "-smp",
            "2",
            "--guest",
            "memcheck",
            "-machine",
            "aux-ram-share=on",
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                self.path("qmp.sock").display()
            ),
            "-serial",
            &format!("file:{}", self.path("console.log").display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Memory sweeps the guest completed so far (it prints `B` after each).
    fn sweeps(&self) -> usize {
        std::fs::read(self.path("console.log"))
            .map(|text| text.iter().filter(|&&b| b == b'B').count())
            .unwrap_or(0)
    }

    fn wait_for_sweeps(&self, at_least: usize) -> Result<Duration> {
        let start = Instant::now();
        while self.sweeps() < at_least {
            if start.elapsed() > TIMEOUT {
                return Err(format!(
                    "the guest did not complete memory sweep {at_least} within {TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }
}

fn pid_runs(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("live-update-demo: {e}");
            return ExitCode::from(2);
        }
    };
    let keep = options.keep;
    let dir = std::env::temp_dir().join(format!("live-update-demo-{}", std::process::id()));
    let result = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))
        .and_then(|()| run(options, dir.clone()));
    match result {
        Ok(()) => {
            if keep {
                println!("Scratch files kept in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nlive-update-demo FAILED: {e}");
            eprintln!("Logs and state are kept in {}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn run(options: Options, dir: PathBuf) -> Result<()> {
    let vmm = match &options.vmm {
        Some(p) => p.clone(),
        None => find_binary("vmm")?,
    };
    let shim = match &options.shim {
        Some(p) => p.clone(),
        None => find_binary("cpr-shim")?,
    };
    let ram = parse_size(&options.memory)?;
    let demo = Demo {
        options,
        vmm,
        shim,
        dir,
        ram,
    };

    println!("cpr-vmm live-update demo");
    println!("  vmm       {}", demo.vmm.display());
    println!("  cpr-shim  {}", demo.shim.display());
    println!("  scratch   {}", demo.dir.display());
    println!();

    // 1. Boot.
    let args = demo.vm_args();
    println!(
        "[1/4] Booting the memcheck guest ({}, 2 vCPUs)",
        demo.options.memory
    );
    println!("      $ vmm {}", args.join(" "));
    let log = File::create(demo.path("vmm.log")).map_err(|e| e.to_string())?;
    let mut command = Command::new(&demo.vmm);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal is for the demo.
        .process_group(0);
    let mut child = VmmChild(
        command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", demo.vmm.display()))?,
    );
    drive(&demo, &mut child, &args).map_err(|e| match child.0.try_wait() {
        Ok(Some(status)) => format!(
            "{e}\n(the VMM process has exited: {status}; its log is {})",
            demo.path("vmm.log").display()
        ),
        _ => e,
    })
}

fn drive(demo: &Demo, child: &mut VmmChild, args: &[String]) -> Result<()> {
    let updates = demo.options.updates;
    let pid = child.0.id();
    let mut qmp = Qmp::connect(&demo.path("qmp.sock"), demo.options.verbose)?;
    let version = qmp.execute("query-version", Value::Null)?;
    let first_sweep = demo.wait_for_sweeps(1)?;
    println!(
        "      PID {pid}, {}; the guest finished its first memory sweep after {:.1} s",
        version["package"]
            .as_str()
            .unwrap_or("?")
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')'),
        first_sweep.as_secs_f64()
    );
    println!();

    // 2. Live updates.
    println!(
        "[2/4] Live-updating the VMM {updates} times through cpr-shim (same binary, same PID)"
    );
    let state = demo.path("vm.state");
    let shim_log = demo.path("shim.log");
    let mut blackouts = Vec::new();
    for n in 1..=updates {
        let sweeps = demo.sweeps();
        let mut exec_command = vec![
            demo.shim.display().to_string(),
            "--log".into(),
            shim_log.display().to_string(),
            "--".into(),
            demo.vmm.display().to_string(),
        ];
        exec_command.extend(args.iter().cloned());
        exec_command.push("-incoming".into());
        exec_command.push(format!("file:{}", state.display()));
        if n == 1 {
            println!(
                "      cpr-exec-command: {}",
                exec_command
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        // Parameters do not carry over an update (as in QEMU): set them every time.
        qmp.execute(
            "migrate-set-parameters",
            json!({"mode": "cpr-exec", "cpr-exec-command": exec_command}),
        )?;
        qmp.execute(
            "migrate",
            json!({"uri": format!("file:{}", state.display())}),
        )?;
        let status = loop {
            let event = qmp.wait_event("MIGRATION")?;
            let status = event["data"]["status"].as_str().unwrap_or("").to_string();
            if status == "completed" || status == "failed" {
                break status;
            }
        };
        let info = qmp.execute("query-migrate", Value::Null)?;
        if status != "completed" {
            return Err(format!(
                "update {n} failed: {}",
                info["error-desc"].as_str().unwrap_or("(no reason given)")
            ));
        }
        let cpr = &info["x-cpr"];
        let blackout_ms = cpr["blackout-ns"].as_u64().unwrap_or(0) as f64 / 1e6;
        blackouts.push(blackout_ms);
        let same = if pid_runs(pid).is_some() && child.0.try_wait().ok().flatten().is_none() {
            "unchanged"
        } else {
            "GONE"
        };
        println!(
            "      update {n}/{updates}: {} -> {}  blackout {blackout_ms:7.2} ms  PID {pid} ({same})",
            cpr["from-version"].as_str().unwrap_or("?"),
            cpr["to-version"].as_str().unwrap_or("?"),
        );
        let phases: Vec<String> = cpr["phases"]
            .as_array()
            .map(|p| {
                p.iter()
                    .map(|phase| {
                        format!(
                            "{} {:.2}",
                            phase["name"].as_str().unwrap_or("?"),
                            phase["ns"].as_u64().unwrap_or(0) as f64 / 1e6
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!("        phases (ms): {}", phases.join(" | "));
        // The guest runs on the new VMM before the next update.
        demo.wait_for_sweeps(sweeps + 1)?;
    }
    if !blackouts.is_empty() {
        let mut sorted = blackouts.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "      blackout over {} updates: min {:.2} ms, median {:.2} ms, max {:.2} ms",
            sorted.len(),
            sorted[0],
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
    }
    let kept = if demo.options.keep {
        ""
    } else {
        " (removed at the end; --keep keeps it)"
    };
    println!(
        "      shim log, one JSON line per update: {}{kept}",
        shim_log.display()
    );
    println!();

    // 3. Memory check.
    let end = demo.ram.min(SWEEP_LIMIT);
    println!(
        "[3/4] Checking guest memory: stop, pmemsave {:#x}..{end:#x}, check, cont",
        SWEEP_START
    );
    qmp.execute("stop", Value::Null)?;
    qmp.wait_event("STOP")?;
    let dump_path = demo.path("memory.dump");
    qmp.execute(
        "pmemsave",
        json!({"val": SWEEP_START, "size": end - SWEEP_START,
               "filename": dump_path.display().to_string()}),
    )?;
    let dump = std::fs::read(&dump_path).map_err(|e| format!("reading the dump: {e}"))?;
    let _ = std::fs::remove_file(&dump_path);
    let verdict = check_memory(&dump);
    qmp.execute("cont", Value::Null)?;
    qmp.wait_event("RESUME")?;
    match &verdict {
        Ok(summary) => println!("      memory check PASSED: {summary}"),
        Err(problem) => println!("      memory check FAILED: {problem}"),
    }
    let sweeps = demo.sweeps();
    demo.wait_for_sweeps(sweeps + 1)?;
    println!(
        "      guest resumed and keeps sweeping ({} sweeps so far)",
        demo.sweeps()
    );
    println!();

    // 4. Quit.
    println!("[4/4] Quitting the VM");
    let exe = pid_runs(pid);
    qmp.execute("quit", Value::Null)?;
    let start = Instant::now();
    let exit = loop {
        match child.0.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > TIMEOUT => {
                return Err("the VMM did not exit after quit".into());
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    };
    println!("      PID before the updates: {pid}");
    println!(
        "      PID after {updates} updates:  {pid} (the same process, running {})",
        exe.map(|p| p.display().to_string())
            .unwrap_or_else(|| "?".into())
    );
    println!("      vmm exited: {exit}");
    if !exit.success() {
        return Err(format!("the VMM exited with {exit}"));
    }
    verdict.map(drop)
}

/// The memcheck rule: the first byte of every page is the same value, except
/// that it may drop by exactly one at a single page (the sweep in progress).
fn check_memory(dump: &[u8]) -> Result<String> {
    let samples: Vec<u8> = dump.iter().step_by(PAGE).copied().collect();
    let first = *samples.first().ok_or("the dump is empty")?;
    let mut boundary = None;
    for (i, pair) in samples.windows(2).enumerate() {
        if pair[1] == pair[0] {
            continue;
        }
        let page = i + 1;
        if pair[1] != pair[0].wrapping_sub(1) || boundary.is_some() {
            return Err(format!(
                "page {page} (guest-physical {:#x}) holds {:#04x} after {:#04x}: memory was lost or corrupted",
                SWEEP_START + (page * PAGE) as u64,
                pair[1],
                pair[0]
            ));
        }
        boundary = Some(page);
    }
    if first == 0 && boundary.is_none() {
        return Err("every page is still zero: the guest never ran".into());
    }
    Ok(match boundary {
        Some(page) => format!(
            "{} pages consistent (counter {first:#04x}, the sweep in progress at page {page})",
            samples.len()
        ),
        None => format!("{} pages consistent (counter {first:#04x})", samples.len()),
    })
}
