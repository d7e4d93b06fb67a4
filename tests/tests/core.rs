//! End-to-end tests of the VMM core (issue 2): built-in guests on KVM, the
//! serial console back ends, the QMP monitor (commands, events and every kind
//! of malformed input) and process behaviour (signals, exit codes, start-up
//! errors).
//!
//! Every test starts real `vmm` processes on /dev/kvm. Waits are for output or
//! state with generous timeouts; where a test must show that something does
//! *not* happen (no ticks while paused), it waits for a period measured against
//! the guest's own observed tick rate, for a condition that must stay false.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cpr_tests::heartbeat::TickCounter;
use cpr_tests::memcheck::PAGE_SIZE;
use cpr_tests::*;
use serde_json::{Value, json};

/// Generous limit for anything the guest or the VMM has to do.
const LONG: Duration = Duration::from_secs(60);
/// Tick rate used by the tests (keep test guests near 100 Hz: a busy guest here takes interrupts
/// only every ~1-1.4 ms).
const HEARTBEAT: &str = "heartbeat,hz=100";

// ---------------------------------------------------------------------------
// helpers

/// Starts a heartbeat VM with `cpus` vCPUs and a QMP socket in `dir`.
fn start_heartbeat(dir: &TempDir, cpus: u32) -> (VmmProcess, PathBuf) {
    let socket = dir.join("qmp.sock");
    let smp = cpus.to_string();
    let vmm = VmmProcess::start_vmm([
        "-m",
        "16M",
        "-smp",
        &smp,
        "--guest",
        HEARTBEAT,
        "-qmp",
        &qmp_socket_arg(&socket),
    ]);
    (vmm, socket)
}

fn connect(socket: &Path) -> QmpClient {
    QmpClient::connect_and_negotiate(socket, LONG).expect("QMP connection")
}

fn query_status(qmp: &mut QmpClient) -> Value {
    qmp.execute("query-status", Value::Null)
        .expect("query-status")
}

fn assert_status(qmp: &mut QmpClient, status: &str, running: bool) {
    let reply = query_status(qmp);
    assert_eq!(reply["status"], status, "query-status: {reply}");
    assert_eq!(reply["running"], running, "query-status: {reply}");
}

/// Checks that an event has QEMU's shape: name, timestamp, and `data` when given.
fn assert_event(event: &Value, name: &str, data: Option<Value>) {
    assert_eq!(event["event"], name, "{event}");
    let timestamp = event_timestamp(event);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - timestamp).abs() < 600.0,
        "event timestamp {timestamp} is not close to now ({now}): {event}"
    );
    let micros = event["timestamp"]["microseconds"].as_i64().unwrap();
    assert!((0..1_000_000).contains(&micros), "{event}");
    match data {
        Some(data) => assert_eq!(event["data"], data, "{event}"),
        None => assert!(event.get("data").is_none(), "{event}"),
    }
}

/// The wall time a running guest needs for `ticks` more ticks on vCPU 0,
/// measured now. Used to size "nothing happens" windows so that they are long
/// enough even when the machine is busy.
fn time_for_ticks(vmm: &VmmProcess, ticks: u64) -> Duration {
    let first = vmm.wait_for_tick(0, 1, LONG).unwrap();
    let start = Instant::now();
    vmm.wait_for_tick(0, first + ticks, LONG).unwrap();
    start.elapsed()
}

/// A "nothing may happen" window: three times what 20 ticks took, at least 1 s.
fn quiet_window(vmm: &VmmProcess) -> Duration {
    (time_for_ticks(vmm, 20) * 3).clamp(Duration::from_secs(1), Duration::from_secs(15))
}

/// Asserts that a paused heartbeat VM prints nothing and counts no tick during
/// `window`. Returns the counters (unchanged during the window).
fn assert_no_ticks_while_paused(
    vmm: &VmmProcess,
    qmp: &mut QmpClient,
    cpus: u32,
    scratch: &Path,
    window: Duration,
) -> Vec<TickCounter> {
    let before = read_tick_counters(qmp, cpus, scratch).unwrap();
    // Everything printed before the pause reaches our pipe reader first. The
    // line after the last recorded one may be complete on the console but not
    // yet recorded in RAM (the guest records it right after its newline).
    for (cpu, counter) in (0..cpus).zip(&before) {
        if counter.last_printed > 0 {
            vmm.wait_for_tick(cpu, counter.last_printed, LONG).unwrap();
        }
    }
    let limit: Vec<u64> = before.iter().map(|c| c.last_printed + 1).collect();
    let start = Instant::now();
    let advanced = wait_until(window, || {
        (0..cpus).any(|cpu| vmm.last_tick(cpu).unwrap_or(0) > limit[cpu as usize])
    });
    assert!(
        !advanced,
        "the paused guest printed a new tick after {:?} (limits {limit:?}):\n{}",
        start.elapsed(),
        tail(&vmm.stdout_text())
    );
    let after = read_tick_counters(qmp, cpus, scratch).unwrap();
    assert_eq!(
        before, after,
        "the tick counters in guest RAM moved while the guest was paused for {window:?}"
    );
    after
}

/// The last few lines of `text`, for assertion messages.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// Asserts that `vmm args` fails at start-up (see [`assert_vmm_startup_error`]: status 1, nothing
/// on stdout, one `vmm: ` line on stderr holding every needle). Returns the line.
#[track_caller]
fn assert_startup_error(args: &[&str], needles: &[&str]) -> String {
    assert_vmm_startup_error(args, needles, LONG)
}

/// Runs `command` and returns its error, failing if it succeeded.
fn expect_error(qmp: &mut QmpClient, command: &str, arguments: Value) -> (String, String) {
    match qmp.execute(command, arguments.clone()) {
        Err(QmpError::Command { class, desc, .. }) => (class, desc),
        other => panic!("{command} {arguments} should fail with a QMP error, got {other:?}"),
    }
}

/// Asserts that `reply` is an error reply with exactly this class and text.
fn assert_error_reply(reply: &Value, class: &str, desc: &str) {
    assert_eq!(reply["error"]["class"], class, "{reply}");
    assert_eq!(reply["error"]["desc"], desc, "{reply}");
    assert!(reply.get("return").is_none(), "{reply}");
}

/// Waits until every vCPU printed `more` ticks beyond what it had printed so
/// far, then checks that the whole output is well-formed and consecutive.
fn assert_keeps_ticking(vmm: &VmmProcess, cpus: u32, more: u64) {
    let last: Vec<u64> = (0..cpus)
        .map(|cpu| vmm.last_tick(cpu).unwrap_or(0))
        .collect();
    for cpu in 0..cpus {
        vmm.wait_for_tick(cpu, last[cpu as usize] + more, LONG)
            .unwrap();
    }
    let log = parse_heartbeats(&vmm.stdout_text());
    assert!(
        log.malformed.is_empty(),
        "garbled lines: {:?}",
        log.malformed
    );
    assert_ticks_consecutive(&log.ticks).unwrap();
}

// ---------------------------------------------------------------------------
// heartbeat

fn heartbeat_boots_and_ticks(cpus: u32) {
    let dir = TempDir::new("hb").unwrap();
    let (vmm, _socket) = start_heartbeat(&dir, cpus);
    let first = vmm.wait_for_all_ticks(cpus, 5, LONG).unwrap();
    // Ticks keep increasing on every vCPU, not just once.
    for cpu in 0..cpus {
        vmm.wait_for_tick(cpu, first[cpu as usize] + 20, LONG)
            .unwrap();
    }
    let log = parse_heartbeats(&vmm.stdout_text());
    assert!(
        log.malformed.is_empty(),
        "garbled lines: {:?}",
        log.malformed
    );
    let mut started = log.started.clone();
    started.sort_unstable();
    assert_eq!(
        started,
        (0..cpus).collect::<Vec<_>>(),
        "every vCPU prints one start line"
    );
    assert_eq!(
        log.ticks.keys().copied().collect::<Vec<_>>(),
        (0..cpus).collect::<Vec<_>>(),
        "only the configured vCPUs tick"
    );
    for (cpu, ticks) in &log.ticks {
        assert_eq!(ticks[0], 1, "cpu {cpu} starts counting at 1");
        assert!(ticks.len() >= 25, "cpu {cpu}: {ticks:?}");
    }
    assert_ticks_consecutive(&log.ticks).unwrap();
    assert!(vmm.is_running());
}

#[test]
fn heartbeat_one_vcpu_ticks() {
    heartbeat_boots_and_ticks(1);
}

#[test]
fn heartbeat_two_vcpus_tick() {
    heartbeat_boots_and_ticks(2);
}

/// The tick counters the guest keeps in RAM agree with what it printed.
#[test]
fn tick_counters_in_guest_ram_match_the_console() {
    let dir = TempDir::new("hbram").unwrap();
    let (vmm, socket) = start_heartbeat(&dir, 2);
    vmm.wait_for_all_ticks(2, 5, LONG).unwrap();
    let mut qmp = connect(&socket);
    qmp.execute("stop", Value::Null).unwrap();
    let counters = read_tick_counters(&mut qmp, 2, &dir.join("counters")).unwrap();
    for (cpu, counter) in (0..2).zip(&counters) {
        // Tick 5 was on the console before the stop; the guest records a
        // line as printed right after its newline.
        assert!(counter.last_printed >= 4, "cpu {cpu}: {counter:?}");
        // Ticks are counted by the timer interrupt and printed afterwards.
        assert!(counter.counter >= counter.last_printed, "{counter:?}");
        vmm.wait_for_tick(cpu, counter.last_printed, LONG).unwrap();
        let printed = vmm.last_tick(cpu).unwrap();
        assert!(
            printed == counter.last_printed || printed == counter.last_printed + 1,
            "cpu {cpu}: console shows tick {printed}, RAM says {counter:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// stop / cont / query-status / events

#[test]
fn stop_pauses_the_ticks_and_cont_resumes_them() {
    let dir = TempDir::new("stop").unwrap();
    let cpus = 2;
    let (vmm, socket) = start_heartbeat(&dir, cpus);
    vmm.wait_for_all_ticks(cpus, 3, LONG).unwrap();
    let window = quiet_window(&vmm);
    let mut qmp = connect(&socket);
    assert_status(&mut qmp, "running", true);
    assert_eq!(qmp.hmp("info status").unwrap(), "VM status: running\r\n");

    assert_eq!(qmp.execute("stop", Value::Null).unwrap(), json!({}));
    let stop = qmp.wait_event("STOP", LONG).unwrap();
    assert_event(&stop, "STOP", None);
    assert_status(&mut qmp, "paused", false);
    assert_eq!(qmp.hmp("info status").unwrap(), "VM status: paused\r\n");
    let scratch = dir.join("counters");
    let paused = assert_no_ticks_while_paused(&vmm, &mut qmp, cpus, &scratch, window);
    // A second stop is harmless and sends no second STOP.
    qmp.execute("stop", Value::Null).unwrap();

    assert_eq!(qmp.execute("cont", Value::Null).unwrap(), json!({}));
    let resume = qmp.wait_event("RESUME", LONG).unwrap();
    assert_event(&resume, "RESUME", None);
    assert!(event_timestamp(&resume) >= event_timestamp(&stop));
    assert_status(&mut qmp, "running", true);
    for cpu in 0..cpus {
        vmm.wait_for_tick(cpu, paused[cpu as usize].last_printed + 10, LONG)
            .unwrap();
    }
    let events = qmp.events();
    assert!(
        events.iter().all(|e| e["event"] != "STOP"),
        "a second stop of a paused VM sent another STOP: {events:?}"
    );
    // No tick was lost or repeated across the pause.
    assert_keeps_ticking(&vmm, cpus, 5);
}

/// `stop` right after `cont` (a control plane pipelining commands) must
/// neither hang nor lose a vCPU: each pause has to reach every vCPU, even one
/// that has just been resumed and is spinning in the guest on the console
/// lock held by a vCPU that paused mid-line.
#[test]
fn stop_right_after_cont_never_hangs() {
    let dir = TempDir::new("stopcont").unwrap();
    let cpus = 2;
    let (vmm, socket) = start_heartbeat(&dir, cpus);
    vmm.wait_for_all_ticks(cpus, 2, LONG).unwrap();
    let mut qmp = connect(&socket);
    // A healthy VMM answers each pair within milliseconds.
    qmp.set_timeout(Duration::from_secs(10));
    let rounds = 400;
    for round in 0..rounds {
        let first = qmp.execute_raw(
            b"{\"execute\": \"stop\", \"id\": 1}\n{\"execute\": \"cont\", \"id\": 2}\n",
        );
        let second = qmp.execute_raw(b"");
        match (first, second) {
            (Ok(a), Ok(b)) if a["id"] == 1 && b["id"] == 2 => {
                assert_eq!(a["return"], json!({}), "{a}");
                assert_eq!(b["return"], json!({}), "{b}");
            }
            other => panic!(
                "round {round}: stop + cont got {other:?}; the VMM hangs pausing its vCPUs \
                 (a kick lost after a resume?)"
            ),
        }
    }
    assert_status(&mut qmp, "running", true);
    let events = qmp.events();
    let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
    assert_eq!(count("STOP"), rounds, "one STOP per stop");
    assert_eq!(count("RESUME"), rounds, "one RESUME per cont");
    assert_keeps_ticking(&vmm, cpus, 10);
}

/// The "no ticks while paused" check is not vacuous: on a running guest it
/// fails.
#[test]
#[should_panic(expected = "the paused guest printed a new tick")]
fn the_paused_check_fails_on_a_running_guest() {
    let dir = TempDir::new("notpaused").unwrap();
    let (vmm, socket) = start_heartbeat(&dir, 1);
    vmm.wait_for_tick(0, 3, LONG).unwrap();
    let window = quiet_window(&vmm);
    let mut qmp = connect(&socket);
    assert_no_ticks_while_paused(&vmm, &mut qmp, 1, &dir.join("c"), window);
}

#[test]
fn stop_and_cont_over_hmp() {
    let dir = TempDir::new("hmpstop").unwrap();
    let (vmm, socket) = start_heartbeat(&dir, 1);
    vmm.wait_for_tick(0, 3, LONG).unwrap();
    let window = quiet_window(&vmm);
    let mut qmp = connect(&socket);
    assert_eq!(qmp.hmp("stop").unwrap(), "");
    qmp.wait_event("STOP", LONG).unwrap();
    assert_eq!(qmp.hmp("info status").unwrap(), "VM status: paused\r\n");
    assert_no_ticks_while_paused(&vmm, &mut qmp, 1, &dir.join("c"), window);
    assert_eq!(qmp.hmp("cont").unwrap(), "");
    qmp.wait_event("RESUME", LONG).unwrap();
    assert_eq!(qmp.hmp("info status").unwrap(), "VM status: running\r\n");
    assert_keeps_ticking(&vmm, 1, 10);
}

// ---------------------------------------------------------------------------
// memcheck

/// Number of completed sweeps the memcheck guest reported (`B`s after its `A`).
fn memcheck_sweeps(text: &str) -> Option<usize> {
    let start = text.find('A')?;
    Some(text[start..].bytes().filter(|&b| b == b'B').count())
}

#[test]
fn memcheck_dump_of_a_stopped_guest_is_consistent() {
    let dir = TempDir::new("memchk").unwrap();
    let socket = dir.join("qmp.sock");
    let ram: u64 = 64 << 20;
    let vmm = VmmProcess::start_vmm([
        "-m",
        "64M",
        "--guest",
        "memcheck",
        "-qmp",
        &qmp_socket_arg(&socket),
    ]);
    vmm.wait_for_output(|text| memcheck_sweeps(text).is_some_and(|n| n >= 3), LONG)
        .unwrap();
    let mut qmp = connect(&socket);
    qmp.execute("stop", Value::Null).unwrap();
    qmp.wait_event("STOP", LONG).unwrap();
    let dump = dump_memcheck_range(&mut qmp, ram, &dir.join("dump")).unwrap();
    assert_eq!(dump.len() as u64, (64 << 20) - (1 << 20));
    check_memcheck_dump(&dump).unwrap();

    // The dump is the guest's real memory: its last page holds the number of
    // completed sweeps the console reported (mod 256), the first page that or
    // one more (a sweep in progress).
    let samples: Vec<u8> = dump.iter().step_by(PAGE_SIZE).copied().collect();
    let (first, last) = (samples[0], *samples.last().unwrap());
    assert!(
        first == last || first == last.wrapping_add(1),
        "{first} {last}"
    );
    // The console may still be catching up with the last `B`s; the sweep
    // whose `B` was not printed yet counts as complete in RAM.
    vmm.wait_for_output(
        |text| {
            memcheck_sweeps(text).is_some_and(|n| {
                let n = (n % 256) as u8;
                last == n || last == n.wrapping_add(1)
            })
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("RAM says {last} sweeps (mod 256), the console disagrees: {e}"));
    assert!(!vmm.stdout_text()[1..].contains('A'), "memcheck restarted");

    // The check is not vacuous: corrupted copies of the same dump fail it.
    let page = |n: usize| n * PAGE_SIZE;
    let pages = samples.len();
    let mut increased = dump.clone();
    increased[page(pages / 2)] = increased[page(pages / 2)].wrapping_add(1);
    increased[page(pages / 2 + 1)] = increased[page(pages / 2 + 1)].wrapping_add(2);
    assert!(check_memcheck_dump(&increased).is_err());
    let mut lost = dump.clone();
    lost[page(pages / 3)] = lost[page(pages / 3)].wrapping_sub(7);
    let error = check_memcheck_dump(&lost).unwrap_err();
    assert!(error.contains(&format!("page {}", pages / 3)), "{error}");
    let mut two_drops = dump.clone();
    for n in [pages / 4, pages / 2] {
        for p in n..pages {
            two_drops[page(p)] = two_drops[page(p)].wrapping_sub(1);
        }
    }
    assert!(check_memcheck_dump(&two_drops).is_err());
    // Only page offsets 0 matter: other bytes of the dump are zero.
    assert!(
        dump.iter()
            .enumerate()
            .all(|(i, &b)| i % PAGE_SIZE == 0 || b == 0)
    );
}

// ---------------------------------------------------------------------------
// QMP: malformed input and several clients

/// Sends raw bytes and returns the next reply (not an event).
fn raw(qmp: &mut QmpClient, bytes: &[u8]) -> Value {
    qmp.execute_raw(bytes).expect("a reply to raw input")
}

#[test]
fn malformed_qmp_input_gets_qemu_errors_and_the_guest_keeps_running() {
    let dir = TempDir::new("qmpbad").unwrap();
    let cpus = 2;
    let (vmm, socket) = start_heartbeat(&dir, cpus);
    vmm.wait_for_all_ticks(cpus, 2, LONG).unwrap();

    // The greeting, then commands before qmp_capabilities.
    let mut early = QmpClient::connect(&socket, LONG).unwrap();
    let greeting = early.greeting().clone();
    assert!(
        greeting["QMP"]["version"]["qemu"]["major"].is_i64(),
        "{greeting}"
    );
    assert!(
        greeting["QMP"]["version"]["package"].is_string(),
        "{greeting}"
    );
    assert_eq!(greeting["QMP"]["capabilities"], json!([]), "{greeting}");
    for command in ["query-status", "stop", "no-such-command"] {
        let (class, desc) = expect_error(&mut early, command, Value::Null);
        assert_eq!(class, "CommandNotFound", "{command}");
        assert_eq!(
            desc, "Expecting capabilities negotiation with 'qmp_capabilities'",
            "{command}"
        );
    }

    let mut qmp = connect(&socket);
    // Malformed input, each answered with QEMU's error (and the id echoed where the test gives
    // one); the connection stays usable: malformed JSON, a message that is not an object, no
    // or a bad `execute`, an unknown command, `arguments` that are not an object.
    let malformed: [(&[u8], &str, &str, Option<Value>); 6] = [
        (
            b"{\"execute\": }\n",
            "GenericError",
            "JSON parse error, expecting value",
            None,
        ),
        (
            b"\"just a string\"\n",
            "GenericError",
            "QMP input must be a JSON object",
            None,
        ),
        (
            b"{\"id\": 5}\n",
            "GenericError",
            "QMP input lacks member 'execute'",
            Some(json!(5)),
        ),
        (
            b"{\"execute\": 42, \"id\": \"x\"}\n",
            "GenericError",
            "QMP input member 'execute' must be a string",
            None,
        ),
        (
            b"{\"execute\": \"no-such-command\", \"id\": \"abc\"}\n",
            "CommandNotFound",
            "The command no-such-command has not been found",
            Some(json!("abc")),
        ),
        (
            b"{\"execute\": \"stop\", \"arguments\": [], \"id\": 1}\n",
            "GenericError",
            "QMP input member 'arguments' must be an object",
            None,
        ),
    ];
    for (input, class, desc, id) in malformed {
        let reply = raw(&mut qmp, input);
        assert_error_reply(&reply, class, desc);
        if let Some(id) = id {
            assert_eq!(reply["id"], id, "the id is echoed: {reply}");
        }
        assert_status(&mut qmp, "running", true);
    }

    // Wrong argument type, missing argument, unexpected argument.
    let dump = dir.join("dump").to_str().unwrap().to_string();
    let bad_arguments = [
        (
            "pmemsave",
            json!({"val": "zero", "size": 4096, "filename": dump}),
            "Invalid parameter type for 'val', expected: integer",
        ),
        (
            "human-monitor-command",
            json!({"command-line": ["info", "status"]}),
            "Invalid parameter type for 'command-line', expected: string",
        ),
        (
            "pmemsave",
            json!({"val": 0, "size": 4096}),
            "Parameter 'filename' is missing",
        ),
        (
            "query-status",
            json!({"verbose": true}),
            "Parameter 'verbose' is unexpected",
        ),
    ];
    for (command, arguments, expected) in bad_arguments {
        let (class, desc) = expect_error(&mut qmp, command, arguments.clone());
        assert_eq!(
            (class.as_str(), desc.as_str()),
            ("GenericError", expected),
            "{command} {arguments}"
        );
    }
    // None of these did anything to the guest.
    assert!(
        !Path::new(&dump).exists(),
        "a rejected pmemsave wrote a file"
    );
    assert_status(&mut qmp, "running", true);

    // An oversized message (> 1 MiB) is refused with QEMU's error, and the
    // connection keeps working afterwards.
    let mut big = br#"{"execute": "query-status", "id": "big", "arguments": {"pad": ""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', (1 << 20) + 4096));
    big.extend_from_slice(b"\"}}\n");
    let reply = raw(&mut qmp, &big);
    assert_error_reply(&reply, "GenericError", "JSON token size limit exceeded");
    assert_status(&mut qmp, "running", true);
    // And nothing else was left queued from the oversized message.
    assert_eq!(
        qmp.execute("query-version", Value::Null).unwrap()["qemu"]["major"],
        greeting["QMP"]["version"]["qemu"]["major"]
    );

    // Clients that send half a command and vanish, before and after
    // negotiation, and one that vanishes without reading its reply.
    for script in [
        &b"{\"execute\": \"qmp_capabil"[..],
        &b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-st"[..],
        &b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-cpus-fast\"}\n"[..],
    ] {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.set_read_timeout(Some(LONG)).unwrap();
        let mut greeting = String::new();
        BufReader::new(&stream).read_line(&mut greeting).unwrap();
        assert!(greeting.contains("\"QMP\""), "{greeting}");
        stream.write_all(script).unwrap();
        drop(stream);
    }
    // A client that vanishes in the middle of a big message.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(&big[..big.len() / 2]).unwrap();
    drop(stream);

    // The VMM is still alive, serves the existing client and new ones, and
    // the guest keeps ticking.
    assert_status(&mut qmp, "running", true);
    let mut fresh = connect(&socket);
    assert_status(&mut fresh, "running", true);
    assert_keeps_ticking(&vmm, cpus, 10);
    assert!(vmm.is_running());
    // The un-negotiated client saw no events and still gets the same answer.
    assert!(early.events().is_empty());
    let (class, _) = expect_error(&mut early, "query-status", Value::Null);
    assert_eq!(class, "CommandNotFound");
    early.negotiate().unwrap();
    assert_status(&mut early, "running", true);
    let (class, desc) = expect_error(&mut early, "qmp_capabilities", Value::Null);
    assert_eq!(class, "CommandNotFound");
    assert_eq!(
        desc,
        "Capabilities negotiation is already complete, command ignored"
    );
}

#[test]
fn several_qmp_clients_are_served_and_all_get_events() {
    let dir = TempDir::new("qmpmany").unwrap();
    let (vmm, socket) = start_heartbeat(&dir, 1);
    vmm.wait_for_tick(0, 2, LONG).unwrap();
    let mut clients: Vec<QmpClient> = (0..4).map(|_| connect(&socket)).collect();
    let mut unnegotiated = QmpClient::connect(&socket, LONG).unwrap();
    // Interleaved commands, each answered on its own connection.
    for round in 0..3 {
        for (i, qmp) in clients.iter_mut().enumerate() {
            assert_status(qmp, "running", true);
            let cpus = qmp.execute("query-cpus-fast", Value::Null).unwrap();
            assert_eq!(
                cpus.as_array().unwrap().len(),
                1,
                "client {i} round {round}"
            );
        }
    }
    // Commands written by several clients before any reply is read.
    for qmp in clients.iter_mut() {
        qmp.socket()
            .write_all(b"{\"execute\": \"query-status\", \"id\": \"pipelined\"}\n")
            .unwrap();
    }
    for qmp in clients.iter_mut() {
        let reply = raw(qmp, b"");
        assert_eq!(reply["id"], "pipelined", "{reply}");
        assert_eq!(reply["return"]["status"], "running", "{reply}");
    }

    // An event caused by one client reaches every negotiated client.
    clients[1].execute("stop", Value::Null).unwrap();
    for qmp in clients.iter_mut() {
        let event = qmp.wait_event("STOP", LONG).unwrap();
        assert_event(&event, "STOP", None);
        assert_status(qmp, "paused", false);
    }
    clients[3].execute("cont", Value::Null).unwrap();
    for qmp in clients.iter_mut() {
        qmp.wait_event("RESUME", LONG).unwrap();
    }
    // ...but not a client still in capabilities negotiation.
    assert!(unnegotiated.events().is_empty());
    // Closing some clients does not disturb the others.
    clients.truncate(2);
    for qmp in clients.iter_mut() {
        assert_status(qmp, "running", true);
    }
    assert_keeps_ticking(&vmm, 1, 10);
}

// ---------------------------------------------------------------------------
// process behaviour

fn shuts_down_on(signal: Signal) {
    let dir = TempDir::new("sig").unwrap();
    let (vmm, socket) = start_heartbeat(&dir, 2);
    vmm.wait_for_all_ticks(2, 2, LONG).unwrap();
    let mut qmp = connect(&socket);
    vmm.send_signal(signal).unwrap();
    let event = qmp.wait_event("SHUTDOWN", LONG).unwrap();
    assert_event(
        &event,
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-signal"})),
    );
    let status = vmm.wait_exit(LONG).unwrap();
    assert_eq!(status.code(), Some(0), "{signal}: {status}");
    assert!(
        !vmm.stderr_text().contains("panicked"),
        "{}",
        vmm.stderr_text()
    );
}

#[test]
fn sigterm_shuts_down_cleanly_with_a_shutdown_event() {
    shuts_down_on(Signal::SIGTERM);
}

#[test]
fn sigint_shuts_down_cleanly_with_a_shutdown_event() {
    shuts_down_on(Signal::SIGINT);
}

/// QEMU treats SIGHUP like SIGTERM; it used to kill the VMM without a clean shutdown.
#[test]
fn sighup_shuts_down_cleanly_with_a_shutdown_event() {
    shuts_down_on(Signal::SIGHUP);
}

/// An argument that is not valid UTF-8 is one clear error (it used to panic with exit 101).
#[test]
fn an_argument_that_is_not_text_is_one_clear_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let bad = OsStr::from_bytes(b"x\xffy");
    for args in [
        vec![OsStr::new("-m"), bad],
        vec![OsStr::new("-smp"), bad],
        vec![OsStr::new("--guest"), bad],
    ] {
        assert_vmm_startup_error(&args, &["is not valid UTF-8"], LONG);
    }
}

#[test]
fn quit_ends_the_process_with_status_0() {
    let dir = TempDir::new("quit").unwrap();
    let (vmm, socket) = start_heartbeat(&dir, 1);
    vmm.wait_for_tick(0, 1, LONG).unwrap();
    let mut qmp = connect(&socket);
    assert_eq!(qmp.execute("quit", Value::Null).unwrap(), json!({}));
    let event = qmp.wait_event("SHUTDOWN", LONG).unwrap();
    assert_event(
        &event,
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    assert_eq!(vmm.wait_exit(LONG).unwrap().code(), Some(0));
}

#[test]
fn the_debug_exit_port_sets_the_exit_status() {
    let vmm = VmmProcess::start_vmm([
        "-m",
        "16M",
        "--guest",
        "heartbeat,hz=50,exit-after=3,exit-code=7",
    ]);
    let status = vmm.wait_exit(LONG).unwrap();
    assert_eq!(status.code(), Some(7), "stderr:\n{}", vmm.stderr_text());
    let log = parse_heartbeats(&vmm.stdout_text());
    assert_eq!(log.started, vec![0]);
    assert_eq!(log.ticks[&0], vec![1, 2, 3], "{}", vmm.stdout_text());

    let vmm = VmmProcess::start_vmm([
        "-m",
        "16M",
        "-smp",
        "2",
        "--guest",
        "heartbeat,hz=100,exit-after=5,exit-code=42",
    ]);
    assert_eq!(vmm.wait_exit(LONG).unwrap().code(), Some(42));
    assert_eq!(vmm.last_tick(0), Some(5), "{}", vmm.stdout_text());
}

#[test]
fn startup_errors_print_one_clear_line_and_exit_nonzero() {
    assert_startup_error(&["-m", "1X", "--guest", "heartbeat"], &["1X"]);
    assert_startup_error(&["-m", "lots", "--guest", "heartbeat"], &["lots"]);
    assert_startup_error(&["-m", "1M", "--guest", "heartbeat"], &["too small"]);
    assert_startup_error(&["-m", "16M", "--guest", "nosuchguest"], &["nosuchguest"]);
    assert_startup_error(&["-m", "16M", "--guest", "heartbeat,hz=fast"], &["hz=fast"]);
    assert_startup_error(
        &["-m", "16M", "-smp", "0", "--guest", "heartbeat"],
        &["smp"],
    );
    assert_startup_error(
        &[
            "-m",
            "16M",
            "--guest",
            "heartbeat",
            "-serial",
            "tcp:1.2.3.4:5",
        ],
        &["-serial"],
    );

    // A QMP socket path that another running VMM listens on.
    let dir = TempDir::new("inuse").unwrap();
    let (first, socket) = start_heartbeat(&dir, 1);
    first.wait_for_tick(0, 1, LONG).unwrap();
    let mut qmp = connect(&socket);
    assert_startup_error(
        &[
            "-m",
            "16M",
            "--guest",
            "heartbeat",
            "-qmp",
            &qmp_socket_arg(&socket),
        ],
        &[socket.to_str().unwrap(), "in use"],
    );
    // The first VMM keeps its socket and its guest.
    assert_status(&mut qmp, "running", true);
    let mut again = connect(&socket);
    assert_status(&mut again, "running", true);
    assert_keeps_ticking(&first, 1, 5);

    // A QMP path that is not a socket, in a directory that does not exist.
    let missing = dir.join("no-such-dir").join("qmp.sock");
    assert_startup_error(
        &[
            "-m",
            "16M",
            "--guest",
            "heartbeat",
            "-qmp",
            &qmp_socket_arg(&missing),
        ],
        &["QMP"],
    );
}

#[test]
fn the_qmp_socket_has_mode_0600() {
    let dir = TempDir::new("mode").unwrap();
    // Even with a permissive umask inherited from the caller.
    // The spawned VMM inherits the mask; it is restored right after the spawn.
    // SAFETY: umask only changes this test process's file-creation mask.
    let old = unsafe { libc::umask(0) };
    let (vmm, socket) = start_heartbeat(&dir, 1);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    vmm.wait_for_path(&socket, LONG).unwrap();
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "{meta:?}");
    connect(&socket);
}

// ---------------------------------------------------------------------------
// serial console back ends

#[test]
fn serial_file_receives_the_guest_output() {
    let dir = TempDir::new("serfile").unwrap();
    let console = dir.join("console.log");
    let vmm = VmmProcess::start_vmm([
        "-m",
        "16M",
        "-smp",
        "2",
        "--guest",
        HEARTBEAT,
        "-serial",
        &format!("file:{}", console.display()),
    ]);
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    let ticking = wait_until(LONG, || {
        let ticks = parse_heartbeat_ticks(&read());
        (0..2).all(|cpu| ticks.get(&cpu).is_some_and(|t| t.len() >= 10))
    });
    assert!(ticking, "the console file shows no ticks:\n{}", read());
    let log = parse_heartbeats(&read());
    assert!(log.malformed.is_empty(), "{:?}", log.malformed);
    assert_ticks_consecutive(&log.ticks).unwrap();
    assert_eq!(log.ticks[&0][0], 1);
    assert!(vmm.is_running());
    assert!(
        !vmm.stdout_text().contains("heartbeat"),
        "guest output went to stdout too"
    );
}

#[test]
fn serial_unix_socket_client_sees_output_from_when_it_connects() {
    let dir = TempDir::new("serunix").unwrap();
    let serial = dir.join("serial.sock");
    let socket = dir.join("qmp.sock");
    let vmm = VmmProcess::start_vmm([
        "-m",
        "16M",
        "--guest",
        HEARTBEAT,
        "-serial",
        &format!("unix:{},server", serial.display()),
        "-qmp",
        &qmp_socket_arg(&socket),
    ]);
    // The guest runs and prints (to nobody) before any client connects.
    let mut qmp = connect(&socket);
    let scratch = dir.join("counters");
    let mut before = 0;
    let ticked = wait_until(LONG, || {
        before = read_tick_counters(&mut qmp, 1, &scratch).unwrap()[0].last_printed;
        before >= 5
    });
    assert!(ticked, "the guest did not tick without a console client");
    assert_status(&mut qmp, "running", true);

    let mut client = UnixStream::connect(&serial).unwrap();
    client.set_read_timeout(Some(LONG)).unwrap();
    let mut text = String::new();
    let deadline = Instant::now() + LONG;
    let mut buf = [0u8; 4096];
    while parse_heartbeat_ticks(&text)
        .get(&0)
        .is_none_or(|t| t.len() < 10)
    {
        assert!(Instant::now() < deadline, "console client saw:\n{text}");
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "the console socket closed; saw:\n{text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let log = parse_heartbeats(&text);
    assert!(log.malformed.is_empty(), "{:?}", log.malformed);
    assert_ticks_consecutive(&log.ticks).unwrap();
    let first = log.ticks[&0][0];
    assert!(
        first >= before,
        "the client saw tick {first}, printed before it connected (tick {before} was already out)"
    );
    assert!(log.started.is_empty(), "old output was replayed:\n{text}");
    assert!(!vmm.stdout_text().contains("heartbeat"));
    assert!(vmm.is_running());
}

// ---------------------------------------------------------------------------
// query-cpus-fast, system_reset

#[test]
fn query_cpus_fast_lists_every_vcpu_with_its_thread() {
    let dir = TempDir::new("cpus").unwrap();
    let (vmm, socket) = start_heartbeat(&dir, 2);
    vmm.wait_for_all_ticks(2, 1, LONG).unwrap();
    let mut qmp = connect(&socket);
    let reply = qmp.execute("query-cpus-fast", Value::Null).unwrap();
    let cpus = reply.as_array().unwrap();
    assert_eq!(cpus.len(), 2, "{reply}");
    let mut threads = Vec::new();
    for (index, cpu) in cpus.iter().enumerate() {
        assert_eq!(cpu["cpu-index"], index, "{reply}");
        assert_eq!(cpu["target"], "x86_64", "{reply}");
        assert!(cpu["qom-path"].as_str().is_some_and(|p| !p.is_empty()));
        assert!(cpu["props"].is_object(), "{reply}");
        let tid = cpu["thread-id"].as_u64().unwrap();
        assert_ne!(tid, u64::from(vmm.pid()), "a vCPU runs on its own thread");
        let task = format!("/proc/{}/task/{tid}", vmm.pid());
        assert!(
            Path::new(&task).exists(),
            "{task} is not a thread of the VMM"
        );
        threads.push(tid);
    }
    assert_ne!(threads[0], threads[1], "{reply}");
    // The same answer while paused.
    qmp.execute("stop", Value::Null).unwrap();
    assert_eq!(qmp.execute("query-cpus-fast", Value::Null).unwrap(), reply);
}

#[test]
fn system_reset_restarts_the_guest() {
    let dir = TempDir::new("reset").unwrap();
    let cpus = 2;
    let (vmm, socket) = start_heartbeat(&dir, cpus);
    vmm.wait_for_all_ticks(cpus, 10, LONG).unwrap();
    let mut qmp = connect(&socket);
    assert_eq!(qmp.execute("system_reset", Value::Null).unwrap(), json!({}));
    let event = qmp.wait_event("RESET", LONG).unwrap();
    assert_event(
        &event,
        "RESET",
        Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
    );
    // Every vCPU starts again and counts from 1. (A line being printed when
    // the reset hit stays unfinished, so look for the start lines as text.)
    let restarted = |text: &str, cpu: u32| -> Option<usize> {
        let line = format!("heartbeat: cpu {cpu} start\n");
        (text.matches(&line).count() == 2).then(|| text.rfind(&line).unwrap() + line.len())
    };
    let text = vmm
        .wait_for_output(
            |text| {
                (0..cpus).all(|cpu| {
                    restarted(text, cpu).is_some_and(|at| {
                        parse_heartbeat_ticks(&text[at..])
                            .get(&cpu)
                            .is_some_and(|t| t.len() >= 5)
                    })
                })
            },
            LONG,
        )
        .unwrap();
    for cpu in 0..cpus {
        let at = restarted(&text, cpu).unwrap();
        let before = parse_heartbeat_ticks(&text[..at]);
        assert!(
            before[&cpu].len() >= 10,
            "cpu {cpu} ticked before the reset"
        );
        let after = parse_heartbeat_ticks(&text[at..]);
        assert_eq!(
            after[&cpu][0],
            1,
            "cpu {cpu} restarts counting:\n{}",
            tail(&text)
        );
        assert_ticks_consecutive(&after).unwrap();
    }
    assert_status(&mut qmp, "running", true);
    assert!(vmm.is_running());
}

/// `system_reset` of a paused VM resets it but leaves it paused, as in QEMU.
#[test]
fn system_reset_of_a_paused_vm_keeps_it_paused() {
    let dir = TempDir::new("resetp").unwrap();
    let (vmm, socket) = start_heartbeat(&dir, 1);
    vmm.wait_for_tick(0, 5, LONG).unwrap();
    let window = quiet_window(&vmm);
    let mut qmp = connect(&socket);
    qmp.execute("stop", Value::Null).unwrap();
    qmp.execute("system_reset", Value::Null).unwrap();
    qmp.wait_event("RESET", LONG).unwrap();
    assert_status(&mut qmp, "paused", false);
    let restarted = wait_until(window, || {
        vmm.stdout_text().matches("heartbeat: cpu 0 start").count() > 1
    });
    assert!(!restarted, "the reset guest ran while paused");
    qmp.execute("cont", Value::Null).unwrap();
    let text = vmm
        .wait_for_output(
            |text| {
                text.matches("heartbeat: cpu 0 start\n").count() == 2
                    && text.ends_with('\n')
                    && text
                        .rsplit("heartbeat: cpu 0 start\n")
                        .next()
                        .unwrap()
                        .lines()
                        .count()
                        >= 3
            },
            LONG,
        )
        .unwrap();
    let at = text.rfind("heartbeat: cpu 0 start\n").unwrap();
    assert_eq!(parse_heartbeat_ticks(&text[at..])[&0][..3], [1, 2, 3]);
}
