//! Assembles the built-in guest payloads (guests/*.S) into flat binary images.
//!
//! For each guest: `as --64` -> `ld` with guests/guest.ld (linked at 0x10000)
//! -> `objcopy -O binary`, written to `$OUT_DIR/<name>.bin`, which
//! src/boot.rs pulls in with `include_bytes!`. The tools come from GNU
//! binutils (Debian package `binutils`).
//!
//! The guests in [`BZIMAGE_GUESTS`] are also assembled with `--defsym BZIMAGE=1`
//! and linked by their own script into `$OUT_DIR/<name>.bzImage`, a bzImage
//! that QEMU boots with `-kernel` (the same driver, compared against QEMU's
//! devices); tests and scripts/blkcheck-qemu.sh build the same file.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Guest sources, assembled to `<name>.bin`.
const GUESTS: &[&str] = &["heartbeat", "memcheck", "blkcheck", "netcheck"];
/// Guests also built as a bzImage: (name, linker script; blkcheck-bz.ld serves every driver guest).
const BZIMAGE_GUESTS: &[(&str, &str)] = &[
    ("blkcheck", "blkcheck-bz.ld"),
    ("netcheck", "blkcheck-bz.ld"),
];
/// Files the guests include or are linked with.
const SHARED_INPUTS: &[&str] = &[
    "abi.inc",
    "lib.inc",
    "console.inc",
    "heartbeat.inc",
    "pci.inc",
    "virtio.inc",
    "bzimage.inc",
    "guest.ld",
];
/// Where the images are linked and loaded (see guests/abi.inc, src/boot.rs).
const LOAD_ADDR: u64 = 0x10000;
/// `ld` flags for every guest: a static x86-64 ELF without build id (no note in the image).
const LD_FLAGS: &[&str] = &[
    "-m",
    "elf_x86_64",
    "-nostdlib",
    "-static",
    "--build-id=none",
];
/// The image must fit in 0x10000..0x1ffff.
const MAX_IMAGE_SIZE: u64 = 0x10000;

fn main() -> ExitCode {
    stamp_version();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: building the built-in guests failed: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The version this binary reports: the package version, plus `+TAG` when built with
/// CPR_VMM_BUILD_TAG=TAG (to tell apart two builds of one release, e.g. in live-update tests).
fn stamp_version() {
    println!("cargo:rerun-if-env-changed=CPR_VMM_BUILD_TAG");
    let mut version = env::var("CARGO_PKG_VERSION").unwrap_or_default();
    if let Ok(tag) = env::var("CPR_VMM_BUILD_TAG")
        && !tag.is_empty()
    {
        version.push('+');
        version.push_str(&tag);
    }
    println!("cargo:rustc-env=CPR_VMM_VERSION={version}");
}

fn run() -> Result<(), String> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let guest_dir = Path::new(&manifest_dir).join("guests");

    println!("cargo:rerun-if-changed=build.rs");
    for input in SHARED_INPUTS {
        println!("cargo:rerun-if-changed={}", guest_dir.join(input).display());
    }
    for name in GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            guest_dir.join(format!("{name}.S")).display()
        );
    }
    for (_, script) in BZIMAGE_GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            guest_dir.join(script).display()
        );
    }

    for tool in ["as", "ld", "objcopy"] {
        check_tool(tool)?;
    }

    let linker_script = guest_dir.join("guest.ld");
    for name in GUESTS {
        let object = out_dir.join(format!("{name}.o"));
        let elf = out_dir.join(format!("{name}.elf"));
        let image = out_dir.join(format!("{name}.bin"));

        assemble_and_link(&guest_dir, name, &[], &linker_script, &object, &elf)?;
        check_entry_point(&elf)?;
        objcopy_binary(&elf, &image)?;

        let size = fs::metadata(&image)
            .map_err(|e| format!("cannot stat {}: {e}", image.display()))?
            .len();
        if size == 0 {
            return Err(format!("{} is empty", image.display()));
        }
        if size > MAX_IMAGE_SIZE {
            return Err(format!(
                "guest image {name} is {size} bytes, more than the {MAX_IMAGE_SIZE} bytes \
                 that fit at {LOAD_ADDR:#x}..{:#x}",
                LOAD_ADDR + MAX_IMAGE_SIZE
            ));
        }
    }
    for (name, script) in BZIMAGE_GUESTS {
        build_bzimage(&guest_dir, &out_dir, name, script)?;
    }
    Ok(())
}

/// `as --64 [as_args] guests/<name>.S -o object`, then `ld -T script object -o elf`.
fn assemble_and_link(
    guest_dir: &Path,
    name: &str,
    as_args: &[&str],
    script: &Path,
    object: &Path,
    elf: &Path,
) -> Result<(), String> {
    run_tool(
        Command::new("as")
            .arg("--64")
            .args(as_args)
            .arg("-I")
            .arg(guest_dir)
            .arg("-o")
            .arg(object)
            .arg(guest_dir.join(format!("{name}.S"))),
    )?;
    run_tool(
        Command::new("ld")
            .args(LD_FLAGS)
            .arg("-T")
            .arg(script)
            .arg("-o")
            .arg(elf)
            .arg(object),
    )
}

/// `objcopy -O binary elf image`.
fn objcopy_binary(elf: &Path, image: &Path) -> Result<(), String> {
    run_tool(
        Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(elf)
            .arg(image),
    )
}

/// Assembles `guests/<name>.S` with `--defsym BZIMAGE=1`, links it with
/// `guests/<script>` and writes `out_dir/<name>.bzImage`.
fn build_bzimage(guest_dir: &Path, out_dir: &Path, name: &str, script: &str) -> Result<(), String> {
    let object = out_dir.join(format!("{name}-bz.o"));
    let elf = out_dir.join(format!("{name}-bz.elf"));
    let image = out_dir.join(format!("{name}.bzImage"));
    let script = guest_dir.join(script);
    let as_args = ["--defsym", "BZIMAGE=1"];
    assemble_and_link(guest_dir, name, &as_args, &script, &object, &elf)?;
    objcopy_binary(&elf, &image)?;
    let header = fs::read(&image).map_err(|e| format!("cannot read {}: {e}", image.display()))?;
    if header.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err(format!("{} has no bzImage setup header", image.display()));
    }
    Ok(())
}

/// Fails with an actionable message if `tool` cannot be started.
fn check_tool(tool: &str) -> Result<(), String> {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{tool} --version` failed ({}); the built-in guests need GNU binutils \
             (Debian/Ubuntu: `apt-get install binutils`)",
            out.status
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(format!(
            "`{tool}` was not found in PATH; the built-in guests are assembled with GNU \
             binutils' `as`, `ld` and `objcopy` (Debian/Ubuntu: `apt-get install binutils`)"
        )),
        Err(e) => Err(format!("cannot run `{tool}`: {e}")),
    }
}

/// Runs a command, turning a failure into a message that includes its output.
fn run_tool(cmd: &mut Command) -> Result<(), String> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{shown}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The flat image is entered at its first byte, so the ELF entry point
/// (`_start`) must be exactly the load address.
fn check_entry_point(elf: &Path) -> Result<(), String> {
    let bytes = fs::read(elf).map_err(|e| format!("cannot read {}: {e}", elf.display()))?;
    // ELF64 header: e_ident[16], e_type u16, e_machine u16, e_version u32, e_entry u64.
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(format!("{} is not an ELF file", elf.display()));
    }
    let entry = bytes
        .get(24..32)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| format!("{} is not an ELF64 file", elf.display()))?;
    if entry != LOAD_ADDR {
        return Err(format!(
            "{}: entry point _start is at {entry:#x}, but it must be the first byte of the \
             image ({LOAD_ADDR:#x})",
            elf.display()
        ));
    }
    Ok(())
}
