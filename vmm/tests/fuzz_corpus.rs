//! Replays the fuzz corpus (fuzz/corpus/<target>/) through the entry functions the fuzz targets
//! call (vmm::fuzzing), on stable: every input found by fuzzing, crashing ones included once
//! fixed, stays a test. `scripts/fuzz.sh` runs the fuzzers themselves (nightly).
//!
//! `cargo test -p vmm --test fuzz_corpus -- --ignored write_seeds` writes the seed inputs made
//! from real encoders (seed-* files); the rest of the corpus comes from fuzzing and files.

// Test code: a failed unwrap is a failed test (helpers outside #[test] included).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use vmm::fuzzing::TARGETS;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn corpus_replays_without_panic() {
    for (name, entry) in TARGETS {
        let dir = corpus_dir(name);
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus of {name} ({}): {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "the corpus of {name} is empty");
        for file in &files {
            let data = fs::read(file).unwrap();
            // A panic names the target and the input that caused it.
            let result = std::panic::catch_unwind(|| entry(&data));
            assert!(
                result.is_ok(),
                "fuzz target {name} panicked on {}",
                file.display()
            );
        }
    }
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    for (name, _) in TARGETS {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/fuzz_targets")
            .join(format!("{name}.rs"));
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            text.contains(&format!("vmm::fuzzing::{name}(")),
            "{} does not call vmm::fuzzing::{name}",
            path.display()
        );
    }
}

fn write_seed(target: &str, name: &str, data: &[u8]) {
    let dir = corpus_dir(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

/// Seeds from the real encoders; run by hand (see the module comment).
#[test]
#[ignore]
fn write_seeds() {
    use cpr_common::cpr::{self, Attempt, CprState, Fallback};
    use cpr_common::fds::{FdKind, PreservedFd, RAM_SEALS};
    use cpr_common::target::{CheckedTarget, FileStamp};
    use cpr_common::timing::PhaseLog;
    use cpr_common::transfer::{self, Hello, Kind};

    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for v in 1..=3 {
        let data = fs::read(golden.join(format!("state-v{v}.bin"))).unwrap();
        write_seed("state_file", &format!("golden-v{v}"), &data);
    }
    let v3 = fs::read(golden.join("state-v3.bin")).unwrap();
    let sections = vmm::fuzzing::sections_of_state_file(v3).unwrap();
    write_seed("state_sections", "golden-v3", &sections);

    let ram = PreservedFd {
        name: "guest-ram-low".into(),
        kind: FdKind::GuestRam,
        fd: 5,
        size: 1 << 30,
        seals: RAM_SEALS,
        dev: 1,
        ino: 2,
    };
    let mut state = CprState {
        update_id: 7,
        attempt: Attempt::Update,
        fds: vec![ram.clone()],
        state_file: "/run/vm1.state".into(),
        guest_was_running: true,
        stopped_at_ns: 123,
        phases: PhaseLog::starting_at(123),
        fallback: Fallback {
            exe_fd: 6,
            exe_path: "/opt/vmm/1.0/vmm".into(),
            version: "1.0".into(),
            argv: vec!["vmm".into(), "-m".into(), "1G".into()],
        },
        exec_program: "cpr-shim".into(),
        resolved_target: None,
    };
    let update = cpr::encode(&state).unwrap();
    state.attempt = Attempt::Rollback {
        reason: "the new VMM exited".into(),
    };
    state.resolved_target = Some("/opt/vmm/2.0/vmm".into());
    let rollback = cpr::encode(&state).unwrap();
    write_seed("cpr_state", "update", &update);
    write_seed("cpr_state", "rollback", &rollback);
    write_seed(
        "cpr_env_copy",
        "update",
        cpr::encode_env_copy(&update).as_bytes(),
    );
    write_seed(
        "cpr_env_copy",
        "rollback",
        cpr::encode_env_copy(&rollback).as_bytes(),
    );

    let checked = CheckedTarget {
        fd: 9,
        requested: "vmm".into(),
        resolved: "/opt/vmm/2.0/vmm".into(),
        sha256: "ab".repeat(32),
        stamp: FileStamp {
            dev: 2049,
            ino: 131_074,
            size: 4_000_000,
            mtime_ns: 1_700_000_000_000_000_000,
            ctime_ns: 1_700_000_000_000_000_000,
        },
    };
    write_seed("checked_target", "record", checked.to_env().as_bytes());

    // The frames of a transfer as they cross the socket: HELLO, READY, STATE, COMMIT, ERROR.
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let hello = transfer::encode_hello(&Hello {
        sender_version: "0.1.0".into(),
        fds: vec![ram],
        started_ns: 42,
        ram_file: None,
    })
    .unwrap();
    let state_bytes = fs::read(golden.join("state-v3.bin")).unwrap();
    let mut all = Vec::new();
    for (kind, payload) in [
        (Kind::Hello, hello.as_slice()),
        (Kind::Ready, &b""[..]),
        (Kind::State, &state_bytes[..4000]),
        (Kind::Commit, &b""[..]),
        (Kind::Error, &b"no room"[..]),
    ] {
        transfer::send(&a, kind, payload, &[]).unwrap();
        let mut frame = vec![0u8; transfer::HEADER_LEN + payload.len()];
        std::io::Read::read_exact(&mut &b, &mut frame).unwrap();
        all.extend_from_slice(&frame);
        let mut one = vec![7u8];
        one.extend_from_slice(&frame);
        write_seed("transfer_frames", &format!("{kind:?}"), &one);
    }
    let mut whole = vec![255u8];
    whole.extend_from_slice(&all);
    write_seed("transfer_frames", "sequence", &whole);

    // The compatibility note of the vmm binary this test was built with.
    let exe = fs::read(env!("CARGO_BIN_EXE_vmm")).unwrap();
    write_seed("compat_note", "vmm", &pt_notes(&exe));

    let qmp: &[(&str, &str)] = &[
        (
            "negotiate",
            "{\"execute\": \"qmp_capabilities\"}\r\n{\"execute\": \"query-status\", \"id\": 1}\n",
        ),
        (
            "stop-cont",
            "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"stop\", \"id\": 1}\n{\"execute\": \"cont\", \"id\": 2}\n",
        ),
        (
            "cpr-exec",
            "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"migrate-set-parameters\", \"arguments\": {\"mode\": \"cpr-exec\", \"cpr-exec-command\": [\"cpr-shim\", \"--\", \"vmm\", \"-m\", \"1G\"]}}\n{\"execute\": \"migrate\", \"arguments\": {\"uri\": \"file:/run/vm1.state\"}, \"id\": \"u\"}\n{\"execute\": \"query-migrate\"}\n",
        ),
        (
            "transfer",
            "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"migrate-set-parameters\", \"arguments\": {\"mode\": \"cpr-transfer\"}}\n{\"execute\": \"migrate\", \"arguments\": {\"channels\": [{\"channel-type\": \"main\", \"addr\": {\"transport\": \"socket\", \"type\": \"unix\", \"path\": \"/run/m\"}}, {\"channel-type\": \"cpr\", \"addr\": {\"transport\": \"socket\", \"type\": \"unix\", \"path\": \"/run/c\"}}]}}\n",
        ),
        (
            "hmp",
            "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": \"info registers\", \"cpu-index\": 0}, \"id\": 3}\n",
        ),
        (
            "bad",
            "{\"execute\": }\n{\"execute\": 42, \"id\": \"x\"}\n{\"execute\": \"no-such-command\", \"id\": \"abc\"}\n{\"execute\": \"stop\", \"arguments\": [], \"id\": 1}\n",
        ),
        (
            "misc",
            "{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}\n{\"execute\": \"query-commands\"}\n{\"execute\": \"pmemsave\", \"arguments\": {\"val\": 0, \"size\": 4096, \"filename\": \"/tmp/x\"}}\n{\"execute\": \"query-version\"}\n{\"execute\": \"system_reset\"}\n{\"execute\": \"quit\"}\n",
        ),
    ];
    for (name, text) in qmp {
        let mut data = vec![13u8];
        data.extend_from_slice(text.as_bytes());
        write_seed("qmp_stream", name, &data);
    }
    let arguments: &[(&str, &str)] = &[
        ("migrate", "{\"uri\": \"file:/run/vm1.state\"}"),
        (
            "migrate-set-parameters",
            "{\"mode\": \"cpr-exec\", \"cpr-exec-command\": [\"vmm\"], \"x-cpr-deadline-ms\": 5000}",
        ),
        (
            "migrate-set-capabilities",
            "{\"capabilities\": [{\"capability\": \"x-ignore-shared\", \"state\": true}]}",
        ),
        (
            "human-monitor-command",
            "{\"command-line\": \"info status\"}",
        ),
        (
            "pmemsave",
            "{\"val\": 4096, \"size\": 4096, \"filename\": \"/tmp/dump\"}",
        ),
        (
            "memsave",
            "{\"val\": 0, \"size\": 16, \"filename\": \"/tmp/d\", \"cpu-index\": 0}",
        ),
        ("query-status", "{}"),
        ("migrate-incoming", "{\"uri\": \"file:/run/vm1.state\"}"),
        (
            "blockdev-add",
            "{\"driver\": \"file\", \"node-name\": \"d0\", \"filename\": \"/tmp/disk\"}",
        ),
    ];
    for (name, json) in arguments {
        write_seed("qmp_arguments", name, format!("{name}\0{json}").as_bytes());
    }
    for (i, line) in [
        "info status",
        "info registers",
        "info cpus",
        "info version",
        "info migrate",
        "stop",
        "cont",
        "x /4xw 0x1000",
        "xp /2g 0",
        "migrate -d file:/tmp/s",
        "migrate_set_parameter mode cpr-exec",
        "help",
        "system_reset",
        "pmemsave 0 4096 /tmp/d",
    ]
    .iter()
    .enumerate()
    {
        write_seed("hmp_line", &format!("{i:02}"), line.as_bytes());
    }
    // Arguments separated by | here, by NUL in the corpus.
    for (name, argv) in [
        (
            "boot",
            "-m|1G|-smp|2|--guest|heartbeat|-qmp|unix:/run/vm1.qmp,server=on,wait=off|-serial|stdio",
        ),
        (
            "incoming",
            "-m|512M,prealloc=on|-incoming|file:/run/vm1.state|-S|-name|vm1|-serial|file:/tmp/con",
        ),
        (
            "transfer",
            "-m|1G|-incoming|defer|-incoming|{\"channel-type\": \"cpr\", \"addr\": {\"transport\": \"socket\", \"type\": \"unix\", \"path\": \"/run/c\"}}|-machine|q35,aux-ram-share=on",
        ),
        (
            "disk",
            "-m|64M|--guest|blkcheck|-drive|file=/tmp/disk.img,if=virtio,format=raw|-serial|unix:/run/con,server=on,wait=off",
        ),
        (
            "blockdev",
            "-blockdev|driver=file,node-name=d0,filename=/tmp/d.img|-device|virtio-blk-pci,drive=d0|-add-fd|fd=3,set=1",
        ),
        (
            "compat",
            "-enable-kvm|-accel|kvm|-nographic|-display|none|-nodefaults|-pidfile|/run/vm.pid|-vv",
        ),
    ] {
        write_seed("cli_args", name, argv.replace('|', "\0").as_bytes());
    }
    for (i, (which, value)) in [
        (0u8, "1G"),
        (0, "64G,hugepages=on,prealloc=off"),
        (0, "size=512M"),
        (1, "2"),
        (1, "4,sockets=1,cores=4,threads=1"),
        (2, "memcheck"),
        (2, "heartbeat,interval=10"),
        (3, "stdio"),
        (3, "unix:/run/con,server=on,wait=off"),
        (4, "unix:/run/vm1.qmp,server=on,wait=off"),
        (5, "dfile=/tmp/disk.img,if=virtio,format=raw\nbdriver=file,node-name=d0,filename=/tmp/x\nvvirtio-blk-pci,drive=d0,id=v0\nafd=0,set=1"),
    ]
    .iter()
    .enumerate()
    {
        let mut data = vec![*which];
        data.extend_from_slice(value.as_bytes());
        write_seed("cli_options", &format!("{i:02}"), &data);
    }
}

/// The PT_NOTE segments of a little-endian ELF64 image, concatenated.
fn pt_notes(elf: &[u8]) -> Vec<u8> {
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    let mut notes = Vec::new();
    for i in 0..phnum {
        let h = phoff + i * phentsize;
        if u32::from_le_bytes(elf[h..h + 4].try_into().unwrap()) == 4 {
            let (offset, size) = (u64_at(h + 8), u64_at(h + 32));
            notes.extend_from_slice(&elf[offset..offset + size]);
        }
    }
    notes
}
