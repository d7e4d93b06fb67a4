//! Locating and (re)building the binaries under test.
//!
//! End-to-end tests must never run a stale `vmm`: `cargo test` only rebuilds
//! the test crate, not the workspace's release binaries, so the first test
//! that needs a binary runs `cargo build --release --bins` once per test
//! process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Root of the cargo workspace (the directory holding the top `Cargo.toml`).
///
/// Derived from this package's manifest directory at compile time, so it
/// works regardless of the directory the test binary is started from.
/// `CPR_WORKSPACE_ROOT` overrides it (useful when the test binary is copied
/// elsewhere).
pub fn workspace_root() -> PathBuf {
    if let Some(root) = std::env::var_os("CPR_WORKSPACE_ROOT") {
        return PathBuf::from(root);
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("the tests package lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` /
/// `CARGO_BUILD_TARGET_DIR` the same way the nested `cargo build` does
/// (it inherits our environment).
pub fn target_dir() -> PathBuf {
    let configured = std::env::var_os("CARGO_TARGET_DIR")
        .or_else(|| std::env::var_os("CARGO_BUILD_TARGET_DIR"))
        .map(PathBuf::from);
    match configured {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Path of the `vmm` binary (env `CPR_VMM_BIN` overrides).
pub fn vmm_bin() -> PathBuf {
    release_bin("CPR_VMM_BIN", "vmm")
}

/// Path of the `cpr-shim` binary (env `CPR_SHIM_BIN` overrides).
pub fn shim_bin() -> PathBuf {
    release_bin("CPR_SHIM_BIN", "cpr-shim")
}

fn release_bin(override_var: &str, name: &str) -> PathBuf {
    match std::env::var_os(override_var) {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("release").join(name),
    }
}

/// Builds the workspace's release binaries, once per test process.
///
/// Every caller after the first gets the cached outcome, so a failed build
/// fails every test with the same cargo output instead of rebuilding each
/// time. Set `CPR_SKIP_BUILD` to skip building (e.g. when testing
/// prebuilt binaries through `CPR_VMM_BIN`).
///
/// # Panics
/// If `cargo build` cannot be started or fails; the message holds cargo's
/// output.
pub fn build_binaries() {
    static OUTCOME: OnceLock<Result<(), String>> = OnceLock::new();
    if std::env::var_os("CPR_SKIP_BUILD").is_some() {
        return;
    }
    if let Err(message) = OUTCOME.get_or_init(run_cargo_build) {
        panic!("{message}");
    }
}

fn run_cargo_build() -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    eprintln!(
        "cpr-tests: cargo build --release --bins in {}",
        root.display()
    );
    let output = Command::new(&cargo)
        .args(["build", "--release", "--bins"])
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run {cargo:?} build in {}: {e}", root.display()))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "cargo build --release --bins failed ({}) in {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        root.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    ))
}

/// The deployment build of `vmm` and `cpr-shim` (statically linked, profile `dist`) made by
/// `scripts/build-dist.sh`, once per process; returns `(vmm, cpr-shim)`. `CPR_DIST_DIR` names a
/// directory of prebuilt ones instead.
///
/// # Panics
/// If the script fails; the message holds its output.
pub fn dist_binaries() -> (PathBuf, PathBuf) {
    static OUTCOME: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = match std::env::var_os("CPR_DIST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => match OUTCOME.get_or_init(run_build_dist) {
            Ok(dir) => dir.clone(),
            Err(message) => panic!("{message}"),
        },
    };
    (dir.join("vmm"), dir.join("cpr-shim"))
}

fn run_build_dist() -> Result<PathBuf, String> {
    let script = workspace_root().join("scripts").join("build-dist.sh");
    eprintln!("cpr-tests: {}", script.display());
    let output = Command::new(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({})\n--- stderr ---\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    // The script prints the directory holding the two binaries.
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// Whether the ELF executable at `path` runs without a dynamic loader (no `PT_INTERP`).
pub fn is_statically_linked(path: &Path) -> std::io::Result<bool> {
    const PT_INTERP: u32 = 3;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let image = std::fs::read(path)?;
    if image.len() < 64 || &image[..4] != b"\x7fELF" || image[4] != 2 {
        return Err(bad("not a 64-bit ELF file"));
    }
    let u16_at = |at: usize| u16::from_le_bytes([image[at], image[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(image[0x20..0x28].try_into().map_err(|_| bad("header"))?);
    let (entry_size, count) = (u16_at(0x36), u16_at(0x38));
    for i in 0..count {
        let at = usize::try_from(phoff).map_err(|_| bad("program header offset"))? + i * entry_size;
        let p_type = image
            .get(at..at + 4)
            .ok_or_else(|| bad("truncated program headers"))?;
        if u32::from_le_bytes([p_type[0], p_type[1], p_type[2], p_type[3]]) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_tests_package() {
        let root = workspace_root();
        assert!(root.join("tests").join("Cargo.toml").is_file(), "{root:?}");
    }

    #[test]
    fn tells_dynamic_from_static_executables() {
        // This test program is linked dynamically, as `cargo test` links it.
        let me = std::env::current_exe().unwrap();
        assert!(!is_statically_linked(&me).unwrap(), "{me:?}");
        let not_elf = workspace_root().join("Cargo.toml");
        assert!(is_statically_linked(&not_elf).is_err());
    }

    #[test]
    fn binaries_live_in_the_release_dir_unless_overridden() {
        if std::env::var_os("CPR_VMM_BIN").is_none() {
            assert!(vmm_bin().ends_with("release/vmm"));
        }
        if std::env::var_os("CPR_SHIM_BIN").is_none() {
            assert!(shim_bin().ends_with("release/cpr-shim"));
        }
    }
}
