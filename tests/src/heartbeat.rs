//! Understanding the output of the `heartbeat` guest.
//!
//! The heartbeat guest is the main liveness probe: each vCPU prints
//! `heartbeat: cpu N start` once and then `heartbeat: cpu N tick T` with
//! T = 1, 2, 3, ... So a gap or repeat in any vCPU's ticks means the guest
//! lost or replayed state (e.g. across a CPR live update), and ticks that stop
//! advancing mean the vCPU is not running.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::process::{Stream, TimeoutError, VmmProcess};
use crate::qmp::{QmpClient, QmpError};

/// Guest-physical address of vCPU 0's tick counter.
pub const TICK_COUNTERS_BASE: u64 = 0x7100;
/// Distance between two vCPUs' counter blocks.
pub const TICK_COUNTER_STRIDE: u64 = 64;

/// Everything the heartbeat guest printed, split by vCPU.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeartbeatLog {
    /// vCPUs that printed `start`, in the order they did.
    pub started: Vec<u32>,
    /// Ticks printed by each vCPU, in order.
    pub ticks: BTreeMap<u32, Vec<u64>>,
    /// Lines that mention `heartbeat:` but do not parse; corrupted console
    /// output is a bug worth reporting rather than silently skipping.
    pub malformed: Vec<String>,
}

/// One parsed heartbeat line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeartbeatLine {
    Start { cpu: u32 },
    Tick { cpu: u32, tick: u64 },
}

const MARKER: &str = "heartbeat: ";

/// Parses one line (without its terminator).
///
/// `None` means "not a heartbeat line"; `Some(Err(()))` means it has the
/// marker but is garbled. The marker may be preceded by other output (e.g.
/// the memcheck guest's `A`) since the console has no framing.
fn parse_line(line: &str) -> Option<Result<HeartbeatLine, ()>> {
    let start = line.find(MARKER)?;
    let words: Vec<&str> = line[start + MARKER.len()..].split(' ').collect();
    let parsed = match words.as_slice() {
        ["cpu", cpu, "start"] => cpu.parse().map(|cpu| HeartbeatLine::Start { cpu }).ok(),
        ["cpu", cpu, "tick", tick] => match (cpu.parse(), tick.parse()) {
            (Ok(cpu), Ok(tick)) => Some(HeartbeatLine::Tick { cpu, tick }),
            _ => None,
        },
        _ => None,
    };
    Some(parsed.ok_or(()))
}

/// The complete lines of `text`, i.e. without a trailing partial line (the
/// guest may be half-way through printing it), with `\r` stripped.
fn complete_lines(text: &str) -> impl DoubleEndedIterator<Item = &str> {
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end]
        .lines()
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
}

/// Parses every complete heartbeat line in `text`.
pub fn parse_heartbeats(text: &str) -> HeartbeatLog {
    let mut log = HeartbeatLog::default();
    for line in complete_lines(text) {
        match parse_line(line) {
            None => {}
            Some(Ok(HeartbeatLine::Start { cpu })) => log.started.push(cpu),
            Some(Ok(HeartbeatLine::Tick { cpu, tick })) => {
                log.ticks.entry(cpu).or_default().push(tick);
            }
            Some(Err(())) => log.malformed.push(line.to_owned()),
        }
    }
    log
}

/// Map from vCPU index to its printed ticks, in order.
pub fn parse_heartbeat_ticks(text: &str) -> BTreeMap<u32, Vec<u64>> {
    parse_heartbeats(text).ticks
}

/// Checks that every vCPU's ticks go up by exactly one per line.
///
/// Does not require the first tick to be 1, so it also works on output that
/// starts mid-run. An empty map is an error: a check that saw no ticks
/// proves nothing.
pub fn assert_ticks_consecutive(ticks: &BTreeMap<u32, Vec<u64>>) -> Result<(), String> {
    if ticks.is_empty() {
        return Err("no heartbeat ticks found".into());
    }
    for (cpu, list) in ticks {
        for (index, pair) in list.windows(2).enumerate() {
            if pair[1] != pair[0].wrapping_add(1) {
                return Err(format!(
                    "cpu {cpu}: tick {} follows tick {} (tick lines #{} and #{} of this cpu; \
                     expected {}); ticks around it: {:?}",
                    pair[1],
                    pair[0],
                    index,
                    index + 1,
                    pair[0].wrapping_add(1),
                    &list[index.saturating_sub(3)..(index + 5).min(list.len())],
                ));
            }
        }
    }
    Ok(())
}

/// Checks that a process `new` that took a heartbeat guest over from one that printed `old_out`
/// (by a live update, a transfer or a restore) goes on with the guest's tick numbering: waits up
/// to `timeout` until `new` printed `more` ticks on each of vCPUs `0..cpus` beyond the old ones,
/// then checks that the old output followed by the new (where a line the old process was in the
/// middle of is finished by the new one) holds consecutive ticks, the old ones first, and that
/// each vCPU's first tick on `new` is its last one on the old side + 1. Returns what `new`
/// printed, for the caller's own checks (no reboot, nothing garbled).
///
/// `event` names the hand-over where a vCPU had not ticked 3 times before it ("cpu N did not
/// tick before {event}"); `follows` is the message where a vCPU's ticks do not go on ("cpu N:
/// {follows}").
///
/// # Panics
/// If any of that does not hold, or the wait times out.
#[track_caller]
pub fn assert_ticks_go_on(
    old_out: &str,
    new: &VmmProcess,
    cpus: u32,
    more: usize,
    timeout: Duration,
    event: &str,
    follows: &str,
) -> String {
    let old = parse_heartbeat_ticks(old_out);
    for cpu in 0..cpus {
        assert!(
            old.get(&cpu).is_some_and(|t| t.len() >= 3),
            "cpu {cpu} did not tick before {event}:\n{old_out}"
        );
    }
    let combined = |new: &str| parse_heartbeat_ticks(&format!("{old_out}{new}"));
    let enough = |text: &str| {
        let all = combined(text);
        (0..cpus).all(|cpu| {
            all.get(&cpu)
                .is_some_and(|t| t.len() >= old[&cpu].len() + more)
        })
    };
    let new_out = new.wait_for_output(enough, timeout).unwrap();
    let all = combined(&new_out);
    assert_ticks_consecutive(&all).unwrap();
    for cpu in 0..cpus {
        let before = &old[&cpu];
        let ticks = &all[&cpu];
        assert_eq!(&ticks[..before.len()], &before[..], "cpu {cpu}");
        assert_eq!(
            ticks[before.len()],
            before.last().unwrap() + 1,
            "cpu {cpu}: {follows}"
        );
    }
    new_out
}

/// The last tick `cpu` printed in `text` (scanning from the end, so it is
/// cheap enough to run on every wake-up of a wait).
fn last_tick_in(text: &str, cpu: u32) -> Option<u64> {
    complete_lines(text)
        .rev()
        .find_map(|line| match parse_line(line) {
            Some(Ok(HeartbeatLine::Tick { cpu: c, tick })) if c == cpu => Some(tick),
            _ => None,
        })
}

impl VmmProcess {
    /// The last tick vCPU `cpu` printed so far.
    pub fn last_tick(&self, cpu: u32) -> Option<u64> {
        last_tick_in(&self.stdout_text(), cpu)
    }

    /// Waits until vCPU `cpu` printed a tick `>= at_least`; returns that tick.
    pub fn wait_for_tick(
        &self,
        cpu: u32,
        at_least: u64,
        timeout: Duration,
    ) -> Result<u64, TimeoutError> {
        let what = format!("cpu {cpu} to print tick >= {at_least}");
        self.wait_for_stream(Stream::Stdout, &what, timeout, |text| {
            last_tick_in(text, cpu).filter(|&tick| tick >= at_least)
        })
    }

    /// Waits until each of vCPUs `0..cpus` printed a tick `>= at_least`;
    /// returns their last ticks.
    pub fn wait_for_all_ticks(
        &self,
        cpus: u32,
        at_least: u64,
        timeout: Duration,
    ) -> Result<Vec<u64>, TimeoutError> {
        let what = format!("cpus 0..{cpus} to print tick >= {at_least}");
        self.wait_for_stream(Stream::Stdout, &what, timeout, |text| {
            (0..cpus)
                .map(|cpu| last_tick_in(text, cpu).filter(|&tick| tick >= at_least))
                .collect()
        })
    }
}

/// A vCPU's counters as stored in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickCounter {
    /// The live tick counter (u64 at 0x7100 + 64*cpu).
    pub counter: u64,
    /// The last tick printed (u64 at +8).
    pub last_printed: u64,
}

/// Reads the tick counters of vCPUs `0..cpus` from guest RAM via `pmemsave`
/// into `scratch` (an absolute path the VMM can write).
///
/// Lets a test compare what the guest *remembers* with what it printed, e.g.
/// to prove guest RAM survived a live update.
pub fn read_tick_counters(
    qmp: &mut QmpClient,
    cpus: u32,
    scratch: &Path,
) -> Result<Vec<TickCounter>, QmpError> {
    let size = TICK_COUNTER_STRIDE * u64::from(cpus);
    let bytes = qmp.pmemsave(TICK_COUNTERS_BASE, size, scratch)?;
    let read_u64 =
        |offset: usize| u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"));
    let stride = TICK_COUNTER_STRIDE as usize;
    Ok((0..cpus as usize)
        .map(|cpu| TickCounter {
            counter: read_u64(cpu * stride),
            last_printed: read_u64(cpu * stride + 8),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qmp::serve;
    use crate::tempdir::TempDir;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    #[test]
    fn parses_ticks_per_cpu_in_order() {
        let text = "boot\nheartbeat: cpu 0 start\nheartbeat: cpu 1 start\n\
                    heartbeat: cpu 0 tick 1\nheartbeat: cpu 1 tick 1\r\n\
                    heartbeat: cpu 0 tick 2\nunrelated\nheartbeat: cpu 1 tick 2\n";
        let log = parse_heartbeats(text);
        assert_eq!(log.started, [0, 1]);
        assert_eq!(log.ticks[&0], [1, 2]);
        assert_eq!(log.ticks[&1], [1, 2]);
        assert!(log.malformed.is_empty());
        assert_eq!(parse_heartbeat_ticks(text), log.ticks);
    }

    #[test]
    fn a_partial_trailing_line_is_ignored() {
        let ticks = parse_heartbeat_ticks("heartbeat: cpu 0 tick 1\nheartbeat: cpu 0 tick 2");
        assert_eq!(ticks[&0], [1]);
        let ticks = parse_heartbeat_ticks("heartbeat: cpu 0 tick 1\nheartbeat: cpu 0 ti");
        assert_eq!(ticks[&0], [1]);
        assert!(parse_heartbeat_ticks("heartbeat: cpu 0 tick 1").is_empty());
    }

    #[test]
    fn garbled_lines_are_reported_not_skipped() {
        let log = parse_heartbeats(
            "heartbeat: cpu 0 tic 1\nheartbeat: cpu x tick 1\nAheartbeat: cpu 0 tick 3\n",
        );
        assert_eq!(
            log.malformed,
            ["heartbeat: cpu 0 tic 1", "heartbeat: cpu x tick 1"]
        );
        // Output glued in front of the marker (no newline in between) is fine.
        assert_eq!(log.ticks[&0], [3]);
    }

    #[test]
    fn consecutive_ticks_pass() {
        let ticks = parse_heartbeat_ticks(
            "heartbeat: cpu 0 tick 5\nheartbeat: cpu 1 tick 1\nheartbeat: cpu 0 tick 6\n",
        );
        assert_eq!(assert_ticks_consecutive(&ticks), Ok(()));
    }

    #[test]
    fn gaps_and_repeats_are_described() {
        let ticks = parse_heartbeat_ticks("heartbeat: cpu 1 tick 1\nheartbeat: cpu 1 tick 3\n");
        let error = assert_ticks_consecutive(&ticks).unwrap_err();
        assert!(error.contains("cpu 1: tick 3 follows tick 1"), "{error}");
        let ticks = parse_heartbeat_ticks("heartbeat: cpu 0 tick 4\nheartbeat: cpu 0 tick 4\n");
        assert!(
            assert_ticks_consecutive(&ticks)
                .unwrap_err()
                .contains("tick 4 follows tick 4")
        );
        assert!(assert_ticks_consecutive(&BTreeMap::new()).is_err());
    }

    #[test]
    fn last_tick_scans_from_the_end() {
        let text = "heartbeat: cpu 0 tick 1\nheartbeat: cpu 1 tick 7\nheartbeat: cpu 0 tick 2\nheartbeat: cpu 1 tick 8";
        assert_eq!(last_tick_in(text, 0), Some(2));
        assert_eq!(last_tick_in(text, 1), Some(7));
        assert_eq!(last_tick_in(text, 2), None);
    }

    /// A shell script that behaves like the heartbeat guest on the console.
    fn fake_heartbeat_vmm(dir: &TempDir, ticks: u32) -> std::path::PathBuf {
        let script = dir.join("vmm");
        let body = format!(
            "#!/bin/sh\necho 'vmm: starting' >&2\n\
             echo 'heartbeat: cpu 0 start'\necho 'heartbeat: cpu 1 start'\n\
             t=1\nwhile [ $t -le {ticks} ]; do\n\
             echo \"heartbeat: cpu 0 tick $t\"\necho \"heartbeat: cpu 1 tick $t\"\n\
             t=$((t + 1))\nsleep 0.01\ndone\n"
        );
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[test]
    fn waits_for_ticks_of_a_fake_vmm() {
        let dir = TempDir::new("hb").unwrap();
        let script = fake_heartbeat_vmm(&dir, 1000);
        let vmm = VmmProcess::start(&script, ["-smp", "2"]).unwrap();
        vmm.wait_for_stderr_contains("vmm: starting", Duration::from_secs(10))
            .unwrap();
        assert!(vmm.wait_for_tick(1, 10, Duration::from_secs(10)).unwrap() >= 10);
        let all = vmm
            .wait_for_all_ticks(2, 12, Duration::from_secs(10))
            .unwrap();
        assert!(all.iter().all(|&tick| tick >= 12), "{all:?}");
        assert!(vmm.last_tick(0).unwrap() >= 12);
        let log = parse_heartbeats(&vmm.stdout_text());
        assert_eq!(log.started, [0, 1]);
        assert_eq!(assert_ticks_consecutive(&log.ticks), Ok(()));
        assert_eq!(log.ticks[&0][0], 1);
    }

    #[test]
    fn waiting_for_a_tick_fails_early_when_the_vmm_exits() {
        let dir = TempDir::new("hb").unwrap();
        let script = fake_heartbeat_vmm(&dir, 3);
        let vmm = VmmProcess::start(&script, [] as [&str; 0]).unwrap();
        let start = Instant::now();
        let error = vmm
            .wait_for_tick(0, 100, Duration::from_secs(60))
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(30));
        assert!(error.stream_closed, "{error}");
        assert!(error.exit_status.is_some_and(|s| s.success()), "{error}");
        assert!(
            error.to_string().contains("heartbeat: cpu 1 tick 3"),
            "{error}"
        );
    }

    /// What an old process printed before a hand-over: ticks 1 to 3 and half of tick 4's line.
    const OLD_OUT: &str = "heartbeat: cpu 0 start\nheartbeat: cpu 0 tick 1\n\
                           heartbeat: cpu 0 tick 2\nheartbeat: cpu 0 tick 3\nheartbeat: cpu 0 ti";

    /// A stand-in for the process that took the guest over, printing `script` (printf format).
    fn new_side(script: &str) -> VmmProcess {
        VmmProcess::start("sh", ["-c", &format!("printf '{script}'; sleep 30")]).unwrap()
    }

    #[test]
    fn ticks_that_go_on_pass_and_the_new_output_is_returned() {
        let new = new_side("ck 4\\nheartbeat: cpu 0 tick 5\\nheartbeat: cpu 0 tick 6\\n");
        let out = assert_ticks_go_on(OLD_OUT, &new, 1, 3, Duration::from_secs(10), "x", "y");
        assert!(out.ends_with("heartbeat: cpu 0 tick 6\n"), "{out}");
    }

    #[test]
    #[should_panic(expected = "tick 6 follows tick 3")]
    fn a_gap_after_the_hand_over_fails() {
        let new = new_side("ck 6\\nheartbeat: cpu 0 tick 7\\nheartbeat: cpu 0 tick 8\\n");
        assert_ticks_go_on(OLD_OUT, &new, 1, 3, Duration::from_secs(10), "x", "y");
    }

    #[test]
    #[should_panic(expected = "cpu 1 did not tick before the hand-over")]
    fn a_vcpu_without_ticks_before_the_hand_over_fails() {
        let new = new_side("ck 4\\n");
        assert_ticks_go_on(
            OLD_OUT,
            &new,
            2,
            1,
            Duration::from_secs(10),
            "the hand-over",
            "y",
        );
    }

    #[test]
    fn reads_tick_counters_from_guest_memory() {
        let dir = TempDir::new("hb").unwrap();
        let socket = dir.join("qmp.sock");
        let server = serve(&socket, Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            let request = conn.recv();
            let args = &request["arguments"];
            assert_eq!(args["val"], 0x7100);
            assert_eq!(args["size"], 128);
            let mut memory = vec![0u8; 128];
            memory[0..8].copy_from_slice(&42u64.to_le_bytes());
            memory[8..16].copy_from_slice(&41u64.to_le_bytes());
            memory[64..72].copy_from_slice(&7u64.to_le_bytes());
            memory[72..80].copy_from_slice(&7u64.to_le_bytes());
            std::fs::write(args["filename"].as_str().unwrap(), memory).unwrap();
            conn.reply(&request, serde_json::json!({}));
        });
        let mut qmp = QmpClient::connect_and_negotiate(&socket, Duration::from_secs(5)).unwrap();
        let counters = read_tick_counters(&mut qmp, 2, &dir.join("ticks")).unwrap();
        assert_eq!(
            counters,
            [
                TickCounter {
                    counter: 42,
                    last_printed: 41
                },
                TickCounter {
                    counter: 7,
                    last_printed: 7
                }
            ]
        );
        server.join().unwrap();
    }
}
