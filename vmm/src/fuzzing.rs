//! Entry points of the fuzz targets (fuzz/fuzz_targets/), one per decoder of bytes this VMM does
//! not control. Each takes arbitrary bytes and must return without panicking whatever they are;
//! the fuzz targets call them under libFuzzer (nightly) and `tests/fuzz_corpus.rs` replays the
//! corpus (fuzz/corpus/<target>/) through the same functions on stable.

use cpr_common::{compat, cpr, target::CheckedTarget, transfer};
use serde_json::{Map, Value};

use crate::cli;
use crate::migration::format::{SECTION_RAM, STATE_FILE_FORMAT, StateFile};
use crate::qmp::protocol::{JsonStreamer, Session, commands, hmp};
use cpr_common::container::{ContainerError, ContainerReader, ContainerWriter};

/// A fuzz target: its name (the directory of its corpus) and its entry function.
pub type Target = (&'static str, fn(&[u8]));

/// Every fuzz target, by name.
pub const TARGETS: &[Target] = &[
    ("state_file", state_file),
    ("state_sections", state_sections),
    ("cpr_state", cpr_state),
    ("cpr_env_copy", cpr_env_copy),
    ("compat_note", compat_note),
    ("checked_target", checked_target),
    ("transfer_frames", transfer_frames),
    ("qmp_stream", qmp_stream),
    ("qmp_arguments", qmp_arguments),
    ("hmp_line", hmp_line),
    ("cli_args", cli_args),
    ("cli_options", cli_options),
];

/// A state file (migration to file, cpr-transfer's STATE): the container, every section, the
/// conversion of older formats and the checks made before a restore.
pub fn state_file(data: &[u8]) {
    if let Ok(f) = StateFile::from_bytes(data.to_vec(), "fuzz") {
        let _ = f.has_ram();
        let _ = f.check_machine(&f.state.description);
    }
}

/// The sections of a state file inside valid framing (the writer makes the table and every
/// CRC), so that mutated section bytes reach the section decoders instead of failing a CRC
/// check in the container, as nearly every mutation does under `state_file`. The input is a
/// list of sections, each `id u8, length u16 LE, bytes`.
pub fn state_sections(data: &[u8]) {
    if let Some(file) = state_file_from_sections(data) {
        state_file(&file);
    }
}

/// A state file (current format) from `id u8, length u16 LE, bytes` records; a record cut
/// short takes what is left. None when the writer refuses.
pub fn state_file_from_sections(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut writer = ContainerWriter::new(Vec::new(), &STATE_FILE_FORMAT).ok()?;
    while let [id, lo, hi, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        writer.write_raw_section(u32::from(*id), payload).ok()?;
        data = tail;
    }
    writer.finish().ok()
}

/// The inverse of [`state_file_from_sections`] for a real state file's sections other than
/// RAM (seeds for `state_sections`).
pub fn sections_of_state_file(file: Vec<u8>) -> Result<Vec<u8>, ContainerError> {
    let reader = ContainerReader::open(file, &STATE_FILE_FORMAT)?;
    let mut out = Vec::new();
    for id in 1..=u8::MAX {
        if u32::from(id) == SECTION_RAM || !reader.has_section(u32::from(id)) {
            continue;
        }
        let bytes = reader.read_raw_section(u32::from(id))?;
        let len = u16::try_from(bytes.len()).map_err(|_| ContainerError::Malformed {
            what: "state file",
            detail: format!("section {id} is over 64 KiB"),
        })?;
        out.push(id);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// The CPR state a live update hands over in its channel memfd.
pub fn cpr_state(data: &[u8]) {
    if let Ok(state) = cpr::decode(data.to_vec()) {
        let _ = cpr::encode(&state);
    }
}

/// The hex fallback copy of the CPR state (an environment variable), then the state in it.
pub fn cpr_env_copy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(bytes) = cpr::decode_env_copy(&text) {
        let _ = cpr::decode(bytes);
    }
}

/// The ELF notes of a program named as the target of a live update.
pub fn compat_note(data: &[u8]) {
    let _ = compat::find_in_notes(data);
}

/// The checked-target record the VMM passes to the shim (an environment variable).
pub fn checked_target(data: &[u8]) {
    let _ = CheckedTarget::from_env(&String::from_utf8_lossy(data));
}

/// cpr-transfer frames arriving in pieces through the non-blocking reader, and the HELLO payload
/// of each frame. The first byte sets the piece size.
pub fn transfer_frames(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(first).max(1);
    let mut reader = transfer::FrameReader::default();
    for chunk in rest.chunks(piece) {
        match reader.feed(chunk) {
            Ok(Some(frame)) => {
                let _ = transfer::decode_hello(&frame.payload);
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
    // What is left may hold more complete frames.
    while let Ok(Some(frame)) = reader.feed(&[]) {
        let _ = transfer::decode_hello(&frame.payload);
    }
}

/// Bytes from a QMP client: the JSON streamer in pieces (the first byte sets the piece size),
/// then each message through a session (capabilities negotiation, request framing and every
/// command's argument checking). Commands are parsed, never run.
pub fn qmp_stream(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(first).max(1);
    let mut streamer = JsonStreamer::new();
    let mut session = Session::new();
    for chunk in rest.chunks(piece) {
        for message in streamer.feed(chunk) {
            let _ = session.handle(message);
        }
    }
    let _ = streamer.is_mid_message();
}

/// The arguments of one command: the input is `NAME\0JSON`; the JSON (an object, or anything
/// else) goes to that command's argument checking.
pub fn qmp_arguments(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (name, json) = text.split_once('\0').unwrap_or((&text, "{}"));
    let Some(spec) = commands::find_command(name) else {
        return;
    };
    let args = match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => map,
        Ok(other) => Map::from_iter([("value".to_string(), other)]),
        Err(_) => return,
    };
    let _ = spec.parse(&args);
}

/// A `human-monitor-command` line, and the rendering of a result for it.
pub fn hmp_line(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    if let hmp::HmpAction::Run { render, .. } = hmp::parse(&line, Some(0)) {
        let _ = render.render(&Ok(Value::Null));
        let _ = render.render(&Ok(Value::Object(Map::new())));
    }
}

/// A whole command line: NUL-separated arguments after the program name, through the QEMU
/// spelling normalisation, clap and the checks of every option (`-m`, `-smp`, `--guest`,
/// `-serial`, `-qmp`, `-incoming`, `-machine`, `-drive`, `-blockdev`, `-device`, `-add-fd`).
pub fn cli_args(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let argv: Vec<String> = std::iter::once("vmm".to_string())
        .chain(text.split('\0').map(str::to_string))
        .collect();
    if let Ok(args) = parse_args(cli::normalize_qemu_spellings(argv.clone()))
        && let Ok(config) = cli::Config::from_args(args, argv)
    {
        let _ = config.summary();
        let _ = config.chardevs();
    }
}

/// `cli::Args::try_parse_from`, with the clap command built once per thread and reused, as the
/// VMM builds it once per process: building it (and clap's checks of the definition in a
/// debug-assertions build) cost several times the parsing of one command line and does not
/// depend on the input.
fn parse_args(argv: Vec<String>) -> Result<cli::Args, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    use std::cell::RefCell;
    thread_local! {
        static COMMAND: RefCell<clap::Command> = RefCell::new({
            let mut command = cli::Args::command();
            command.build();
            command
        });
    }
    let mut matches = COMMAND.with_borrow_mut(|c| c.try_get_matches_from_mut(argv))?;
    cli::Args::from_arg_matches_mut(&mut matches)
}

/// One option's value, the first byte choosing the parser (`-m`, `-smp`, `--guest`, `-serial`,
/// `-qmp`, or the device options as one list).
pub fn cli_options(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 6 {
        0 => {
            let _ = cli::parse_memory_spec(&text);
        }
        1 => {
            let _ = cli::parse_smp(&text);
        }
        2 => {
            let _ = cli::parse_guest(&text);
        }
        3 => {
            let _ = cli::parse_serial(&text);
        }
        4 => {
            let _ = cli::parse_qmp(&text);
        }
        _ => {
            // `-drive`, `-blockdev`, `-device` and `-add-fd` values, one per line, each prefixed
            // by its option letter (d, b, v or a).
            let (mut drives, mut blockdevs, mut devices, mut add_fds) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for line in text.lines() {
                let mut chars = line.chars();
                let kind = chars.next();
                let value = chars.as_str();
                let list = match kind {
                    Some('d') => &mut drives,
                    Some('b') => &mut blockdevs,
                    Some('v') => &mut devices,
                    _ => &mut add_fds,
                };
                list.push(value.to_string());
            }
            let _ = cli::drives::parse_disks(&drives, &blockdevs, &devices, &add_fds);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn state_sections_rebuilds_a_real_state_file_that_decodes_and_mutations_reach_the_decoders() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let file = std::fs::read(golden.join("state-v3.bin")).unwrap();
        let sections = super::sections_of_state_file(file).unwrap();
        let rebuilt = super::state_file_from_sections(&sections).unwrap();
        let decoded = super::StateFile::from_bytes(rebuilt, "rebuilt").unwrap();
        assert!(decoded.state.description.vcpus > 0);
        // A byte changed inside the description: the container accepts it (its CRC is made
        // anew) and the error, if any, comes from decoding the section itself.
        let mut damaged = sections.clone();
        assert_eq!(damaged[0], 1, "the run section comes first");
        let description_at = 3 + usize::from(u16::from_le_bytes([damaged[1], damaged[2]])) + 3;
        damaged[description_at] ^= 0xff;
        let rebuilt = super::state_file_from_sections(&damaged).unwrap();
        if let Err(e) = super::StateFile::from_bytes(rebuilt, "damaged") {
            assert!(!e.to_string().contains("checksum"), "{e}");
        }
    }

    use clap::Parser;

    use super::*;

    /// The reused clap command parses as a fresh one does (`Args::try_parse_from`, which the VMM
    /// calls), one command line after another.
    #[test]
    fn reused_command_parses_as_a_fresh_one() {
        let lines: &[&[&str]] = &[
            &["vmm", "-m", "1G", "-smp", "2", "-serial", "stdio"],
            &["vmm", "--no-such-option"],
            &["vmm", "-m"],
            &["vmm", "--help"],
            &[
                "vmm",
                "-incoming",
                "defer",
                "-incoming",
                "file:/x",
                "-S",
                "-name",
                "a",
            ],
            &[
                "vmm",
                "-drive",
                "file=/d,if=virtio",
                "-add-fd",
                "fd=3,set=1",
                "-vv",
            ],
            &["vmm", "--version"],
            &["vmm", "-m", "1G", "-smp", "2", "-serial", "stdio"],
        ];
        for line in lines {
            let argv = cli::normalize_qemu_spellings(line.iter().map(|s| s.to_string()));
            let fresh = cli::Args::try_parse_from(argv.clone());
            let reused = parse_args(argv);
            match (fresh, reused) {
                (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{line:?}"),
                (Err(a), Err(b)) => {
                    assert_eq!(a.kind(), b.kind(), "{line:?}");
                    assert_eq!(a.to_string(), b.to_string(), "{line:?}");
                }
                (a, b) => panic!("{line:?}: fresh {a:?}, reused {b:?}"),
            }
        }
    }
}
