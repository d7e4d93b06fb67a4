//! blk-bench: the guest-visible request rate and throughput of virtio-blk, this VMM against
//! QEMU, same run.
//!
//! ```text
//! cargo run --release -p cpr-tests --bin blk-bench -- [--passes 6] [--depth 8]
//!     [--disk-mib 16] [--runs 3] [--no-qemu] [--cache MODE]
//! ```
//!
//! The `blkcheck` driver guest (`--depth` requests in flight: a write pass over its region, a
//! read-back pass, a flush, per generation) runs on a fresh raw image of `--disk-mib` MiB, once
//! on this VMM with each I/O path (`aio=io_uring`, `aio=threads`) and once on QEMU
//! (`qemu-system-x86_64 -kernel blkcheck.bzImage -device virtio-blk-pci`, with `aio=threads`,
//! QEMU's default, and `aio=io_uring`), for three workloads: 4 KiB requests in sector order,
//! 4 KiB requests in a random order (`order=random`: IOPS) and 64 KiB requests in sector order
//! (`bs=64K`: MB/s). The rates count the data requests (writes and reads, not the flushes) the
//! guest completed between its first and its last `pass G done` console line (boot and the
//! first pass are left out) over the wall time between those two lines as seen by this
//! process; the image is checked after every run. Each configuration runs `--runs` times,
//! interleaved (run by run, workload by workload, configuration by configuration), and the
//! median is printed with its ratio to the best QEMU configuration of the workload. `--cache MODE` gives both VMMs' drives `cache=MODE` (QEMU's modes:
//! `writeback`, the default, `none`, `writethrough`, `directsync`, `unsafe`); the images are
//! then made in the build's target directory, on a disk file system, for `none` (O_DIRECT)
//! to mean what it means in production. Timings are reported, never asserted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cpr_tests::blkcheck::{
    build_blkcheck_bzimage, check_image, mismatch_lines, parse_pass_lines, qemu_blkcheck_args,
};
use cpr_tests::{TempDir, VmmProcess, build_binaries, vmm_bin};

const QEMU: &str = "qemu-system-x86_64";
const WAIT: Duration = Duration::from_secs(600);

struct Options {
    passes: u64,
    depth: u64,
    disk_mib: u64,
    runs: usize,
    qemu: bool,
    cache: String,
}

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        passes: 6,
        depth: 8,
        disk_mib: 16,
        runs: 3,
        qemu: true,
        cache: "writeback".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--passes" => o.passes = num("--passes")?.max(2),
            "--depth" => o.depth = num("--depth")?,
            "--disk-mib" => o.disk_mib = num("--disk-mib")?,
            "--runs" => o.runs = num("--runs")? as usize,
            "--no-qemu" => o.qemu = false,
            "--cache" => {
                o.cache = args
                    .next()
                    .ok_or_else(|| "--cache needs a mode".to_string())?
            }
            other => {
                return Err(format!(
                    "unknown option '{other}'; usage: blk-bench [--passes N] [--depth N] \
                     [--disk-mib N] [--runs N] [--no-qemu] [--cache MODE]"
                ));
            }
        }
    }
    Ok(o)
}

/// One workload: blkcheck's options on both command-line forms, and how to report it.
struct Workload {
    name: &'static str,
    /// `--guest blkcheck,...` options of this VMM.
    guest: &'static str,
    /// The bzImage's kernel command line options for QEMU.
    append: &'static str,
    /// Bytes per request.
    request_bytes: u64,
    /// Report MB/s (else requests/s).
    throughput: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "seq 4K",
        guest: "",
        append: "",
        request_bytes: 4096,
        throughput: false,
    },
    Workload {
        name: "random 4K",
        guest: ",order=random",
        append: " blkcheck.order=random",
        request_bytes: 4096,
        throughput: false,
    },
    Workload {
        name: "seq 64K",
        guest: ",bs=64K",
        append: " blkcheck.bs=64K",
        request_bytes: 65536,
        throughput: true,
    },
];

impl Workload {
    /// The figure of a run in this workload's unit.
    fn figure(&self, r: &Run) -> f64 {
        if self.throughput {
            r.requests_per_s * self.request_bytes as f64 / 1e6
        } else {
            r.requests_per_s
        }
    }

    fn unit(&self) -> &'static str {
        if self.throughput { "MB/s" } else { "IOPS" }
    }
}

/// Starts a VMM with a workload on a disk.
type Starter = dyn Fn(&Workload, &Path) -> VmmProcess;

/// One configuration: a name, whether it is QEMU, and how to start it with a workload on a
/// disk.
struct Config {
    name: String,
    qemu: bool,
    start: Box<Starter>,
}

/// One run's figures.
struct Run {
    /// Data requests (not flushes) per second.
    requests_per_s: f64,
    requests: u64,
    seconds: f64,
    /// Queue interrupts the guest took per request over the timed passes.
    irqs_per_request: f64,
}

/// Runs one configuration on a fresh disk until the guest exits; measures and checks.
fn run_once(config: &Config, w: &Workload, dir: &Path, o: &Options) -> Result<Run, String> {
    let disk = dir.join(format!("{}.img", config.name.replace([' ', '='], "-")));
    std::fs::write(&disk, vec![0u8; (o.disk_mib << 20) as usize]).map_err(|e| e.to_string())?;
    let vm = (config.start)(w, &disk);
    let pass_done = |g: u64| format!("blkcheck: pass {g} done");
    vm.wait_for_stdout_contains(&pass_done(1), WAIT)
        .map_err(|e| format!("{}: {e}", config.name))?;
    let first_at = Instant::now();
    vm.wait_for_stdout_contains(&pass_done(o.passes), WAIT)
        .map_err(|e| format!("{}: {e}", config.name))?;
    let last_at = Instant::now();
    let _ = vm.wait_exit(WAIT);
    let console = vm.stdout_text().replace('\r', "");
    if !mismatch_lines(&console).is_empty() {
        return Err(format!(
            "{}: the guest saw mismatches:\n{console}",
            config.name
        ));
    }
    let passes = parse_pass_lines(&console);
    let (Some(first), Some(last)) = (passes.first(), passes.last()) else {
        return Err(format!("{}: no pass lines:\n{console}", config.name));
    };
    if last.errors > 0 {
        return Err(format!("{}: {} I/O errors", config.name, last.errors));
    }
    check_image(&disk, last.generation).map_err(|e| format!("{}: image: {e}", config.name))?;
    let _ = std::fs::remove_file(&disk);
    let seconds = (last_at - first_at).as_secs_f64();
    // One FLUSH per timed pass (the device offers BLK_F_FLUSH on both VMMs).
    let requests = (last.total - first.total).saturating_sub(last.generation - first.generation);
    Ok(Run {
        requests_per_s: requests as f64 / seconds,
        requests,
        seconds,
        irqs_per_request: (last.irqs - first.irqs) as f64 / requests.max(1) as f64,
    })
}

/// This VMM running blkcheck, given as `--guest GUEST` + the workload's options.
fn ours(aio: &'static str, guest: String, cache: &str) -> Config {
    let cache = cache.to_string();
    Config {
        name: format!("vmm aio={aio}"),
        qemu: false,
        start: Box::new(move |w, disk| {
            let guest = format!("{guest}{}", w.guest);
            let drive = format!(
                "file={},format=raw,if=virtio,aio={aio},cache={cache}",
                disk.display()
            );
            VmmProcess::start(
                vmm_bin(),
                ["-m", "64M", "--guest", &guest, "-drive", &drive],
            )
            .unwrap_or_else(|e| panic!("cannot start the VMM: {e}"))
        }),
    }
}

/// QEMU booting blkcheck's bzImage `kernel` with the kernel command line `append` + the
/// workload's options.
fn qemu(aio: &'static str, kernel: &Path, append: String, cache: &str) -> Config {
    let kernel = kernel.to_path_buf();
    let drive_opts = format!(",aio={aio},cache={cache}");
    Config {
        name: format!("QEMU aio={aio}"),
        qemu: true,
        start: Box::new(move |w, disk| {
            let append = format!("{append}{}", w.append);
            let args = qemu_blkcheck_args(&["kvm"], &kernel, &append, disk, [&drive_opts, ""]);
            VmmProcess::start(QEMU, args).unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"))
        }),
    }
}

fn qemu_version() -> Option<String> {
    let out = std::process::Command::new(QEMU)
        .arg("--version")
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let o = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("blk-bench: {e}");
            std::process::exit(2);
        }
    };
    build_binaries();
    let dir = TempDir::new("blk-bench").unwrap_or_else(|e| panic!("temporary directory: {e}"));
    // O_DIRECT needs a disk file system; the temporary directory may be a tmpfs.
    let disks = if o.cache == "writeback" {
        dir.path().to_path_buf()
    } else {
        let d = cpr_tests::target_dir().join(format!("blk-bench-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        d
    };
    let guest = |passes, depth| format!("blkcheck,depth={depth},exit-after={passes},exit-code=0");
    let append = |passes, depth| {
        format!("blkcheck.passes={passes} blkcheck.depth={depth} blkcheck.exit_code=0")
    };
    let mut configs = vec![
        ours("io_uring", guest(o.passes, o.depth), &o.cache),
        ours("threads", guest(o.passes, o.depth), &o.cache),
    ];
    if o.qemu {
        match qemu_version() {
            Some(v) => {
                eprintln!("blk-bench: {v}");
                let kernel: PathBuf = build_blkcheck_bzimage(dir.path())
                    .unwrap_or_else(|e| panic!("building blkcheck.bzImage: {e}"));
                configs.push(qemu(
                    "threads",
                    &kernel,
                    append(o.passes, o.depth),
                    &o.cache,
                ));
                configs.push(qemu(
                    "io_uring",
                    &kernel,
                    append(o.passes, o.depth),
                    &o.cache,
                ));
            }
            None => eprintln!("blk-bench: {QEMU} is not installed; this VMM only"),
        }
    }
    eprintln!(
        "blk-bench: blkcheck depth {} on a {} MiB raw image in {} (cache={}), passes 2..={} \
         timed, {} runs each",
        o.depth,
        o.disk_mib,
        disks.display(),
        o.cache,
        o.passes,
        o.runs
    );
    // figures[workload][config]: one figure per successful run.
    let mut figures: Vec<Vec<Vec<f64>>> = WORKLOADS
        .iter()
        .map(|_| configs.iter().map(|_| Vec::new()).collect())
        .collect();
    let mut failed = false;
    for run in 0..o.runs {
        for (w, figures) in WORKLOADS.iter().zip(&mut figures) {
            for (config, figures) in configs.iter().zip(figures.iter_mut()) {
                match run_once(config, w, &disks, &o) {
                    Ok(r) => {
                        eprintln!(
                            "  run {run} {:<10} {:<16} {:>8.1} {} ({} requests in {:.2} s, \
                             {:.2} interrupts per request)",
                            w.name,
                            config.name,
                            w.figure(&r),
                            w.unit(),
                            r.requests,
                            r.seconds,
                            r.irqs_per_request
                        );
                        figures.push(w.figure(&r));
                    }
                    Err(e) => {
                        eprintln!("  run {run} {} {}: FAILED: {e}", w.name, config.name);
                        failed = true;
                    }
                }
            }
        }
    }
    println!(
        "{:<10} {:<16} {:>10} {:<5} {:>13}",
        "workload",
        "configuration",
        format!("median/{}", o.runs),
        "unit",
        "vs best QEMU"
    );
    for (w, figures) in WORKLOADS.iter().zip(figures) {
        let medians: Vec<Option<f64>> = figures
            .into_iter()
            .map(|f| (!f.is_empty()).then(|| median(f)))
            .collect();
        let best_qemu = configs
            .iter()
            .zip(&medians)
            .filter_map(|(c, m)| c.qemu.then_some(*m).flatten())
            .reduce(f64::max);
        for (config, m) in configs.iter().zip(medians) {
            let Some(m) = m else {
                println!("{:<10} {:<16} failed", w.name, config.name);
                continue;
            };
            let ratio = best_qemu.map_or("-".to_string(), |q| format!("{:.2}x", m / q));
            println!(
                "{:<10} {:<16} {:>10.1} {:<5} {:>13}",
                w.name,
                config.name,
                m,
                w.unit(),
                ratio
            );
        }
    }
    if disks != dir.path() {
        let _ = std::fs::remove_dir_all(&disks);
    }
    if failed {
        std::process::exit(1);
    }
}
