//! The network rows of `blackout-bench`: the echo gap of live updates under a steady frame
//! stream, located against the blackout ([`echo_gaps`]).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{EchoGap, NetVm, Tap};
use crate::binaries::{shim_bin, vmm_bin};
use crate::qmp::event_timestamp;
use crate::stats::{median, summary};

/// The peer's period in [`echo_gaps`]: the echo gap is measured to about this.
pub const ECHO_GAP_PERIOD: Duration = Duration::from_millis(1);

/// Seconds since the epoch (the QMP events' clock) of `at`, through `(now, now_wall)`, one
/// reading of both clocks.
fn wall_of(at: Instant, now: Instant, now_wall: f64) -> f64 {
    if at <= now {
        now_wall - now.duration_since(at).as_secs_f64()
    } else {
        now_wall + at.duration_since(now).as_secs_f64()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One update's echo gap laid against its blackout, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GapBreakdown {
    /// The largest echo gap of the update.
    pub gap: f64,
    /// The VMM's blackout (old VMM stops the vCPUs → new VMM resumes them).
    pub blackout: f64,
    /// From the last echo before the gap to the `STOP` event (the stop's phase in the peer's
    /// period: between 0 and about one period plus the echo's round trip).
    pub before_stop: f64,
    /// From the `RESUME` event to the first echo after the gap (the guest's first round trip
    /// after the resume).
    pub after_resume: f64,
    /// From the `RESUME` event to the sending of the frame that first echo answers (negative:
    /// it was sent before the resume and waited in the tap).
    pub first_frame_sent: f64,
}

impl GapBreakdown {
    /// Locates `gap` against the update's `STOP` and `RESUME` times (seconds since the epoch);
    /// `peer_start` is the origin of the peer's stamps.
    pub fn new(
        gap: &EchoGap,
        blackout_ms: f64,
        stop: f64,
        resume: f64,
        peer_start: Instant,
    ) -> Self {
        let (now, now_wall) = (Instant::now(), unix_now());
        let sent = peer_start + Duration::from_nanos(gap.after_stamp);
        GapBreakdown {
            gap: gap.len().as_secs_f64() * 1e3,
            blackout: blackout_ms,
            before_stop: (stop - wall_of(gap.before, now, now_wall)) * 1e3,
            after_resume: (wall_of(gap.after, now, now_wall) - resume) * 1e3,
            first_frame_sent: (wall_of(sent, now, now_wall) - resume) * 1e3,
        }
    }
}

/// cpr-exec with the guest's network busy: the `netcheck` guest on virtio-net over a tap in a
/// throw-away namespace, the host peer sending a numbered frame every `period` (blackout-bench: [`ECHO_GAP_PERIOD`]) and
/// checking the echoes. Per update: the blackout, the largest gap in the echo stream and where
/// it lies ([`GapBreakdown`]); at the end, frames lost or doubled in either direction.
pub fn echo_gaps(updates: usize, period: Duration, wait: Duration) -> Result<Value, String> {
    let Some(mut vm) = NetVm::start_with_period("blackout-bench --net", Tap::Fd, period) else {
        return Err("network namespaces or /dev/net/tun are unavailable".into());
    };
    let state = vm.dir.join("vm.state");
    vm.wait_echoes(20);
    let mut rows = Vec::new();
    // Round trips outside the updates: what the guest's echo costs in steady state.
    let mut steady: Vec<f64> = Vec::new();
    let mut ms = |v: Vec<Duration>| {
        steady.extend(v.iter().map(|d| d.as_secs_f64() * 1e3));
    };
    for i in 0..updates {
        let mut command = vec![shim_bin().display().to_string(), "--".into()];
        command.push(vmm_bin().display().to_string());
        command.extend(vm.args.iter().cloned());
        command.extend(["-incoming".into(), format!("file:{}", state.display())]);
        vm.wait_echoes(20);
        ms(vm.peer.take_round_trips());
        vm.peer.take_echo_gap();
        let update = crate::cpr::cpr_update(&mut vm.qmp, &command, &state, true, wait)
            .map_err(|e| e.to_string())?;
        if update.status() != "completed" {
            return Err(format!("update {i}: {}", update.error_desc()));
        }
        vm.wait_echoes(20);
        vm.peer.take_round_trips();
        let (Some(gap), Some(stop), Some(resume)) = (
            vm.peer.take_echo_gap(),
            update.stop.as_ref(),
            update.resume.as_ref(),
        ) else {
            return Err(format!("update {i}: no echo gap or no STOP/RESUME event"));
        };
        let blackout = update.blackout_ns().unwrap_or(0) as f64 / 1e6;
        rows.push(GapBreakdown::new(
            &gap,
            blackout,
            event_timestamp(stop),
            event_timestamp(resume),
            vm.peer.started(),
        ));
        eprint!("\r  net: update {}/{updates}", i + 1);
    }
    eprintln!();
    vm.peer.stop_sending();
    let (t, _) = vm.peer.wait_until(wait, |t| t.unechoed().is_empty());
    let problems = t.problems();
    let _ = vm.qmp.execute("quit", Value::Null);
    let _ = vm.vmm.wait_exit(wait);
    let col = |f: fn(&GapBreakdown) -> f64| summary(&rows.iter().map(f).collect::<Vec<_>>());
    let period = period.as_secs_f64() * 1e3;
    Ok(json!({
        "updates": updates,
        "peer_period_ms": period,
        "host_frames_sent": t.host_sent,
        "host_frames_lost": t.unechoed().len(),
        "host_frames_doubled": t.echoed_twice().len(),
        "guest_frames_received": t.guest.received,
        "problems": problems,
        "blackout_ms": col(|r| r.blackout),
        "largest_echo_gap_ms": col(|r| r.gap),
        "gap_minus_blackout_ms": col(|r| r.gap - r.blackout),
        "gap_minus_blackout_minus_period_ms": summary(
            &rows.iter().map(|r| r.gap - r.blackout - period).collect::<Vec<_>>()
        ),
        "steady_round_trip_ms": summary(&steady),
        "last_echo_to_stop_ms": col(|r| r.before_stop),
        "resume_to_first_echo_ms": col(|r| r.after_resume),
        "resume_to_first_echoed_frame_sent_ms": col(|r| r.first_frame_sent),
        "per_update": rows.iter().map(|r| json!({
            "gap": r.gap, "blackout": r.blackout, "before_stop": r.before_stop,
            "after_resume": r.after_resume, "first_frame_sent": r.first_frame_sent,
        })).collect::<Vec<_>>(),
    }))
}

/// `v`'s `median`, `p99` and `max` in milliseconds, for a report line.
fn med_p99_max(v: &Value) -> String {
    let f = |k: &str| v[k].as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    format!("{}/{}/{}", f("median"), f("p99"), f("max"))
}

/// The report lines of [`echo_gaps`]' result (or of its error).
pub fn echo_gaps_report(net: &Value) -> String {
    if let Some(e) = net["error"].as_str() {
        return format!("cpr-exec with network traffic: not measured: {e}");
    }
    format!(
        "cpr-exec with a steady two-way frame stream ({} updates, a host frame every {} ms): \
         host frames lost {} of {}, doubled {}\n  \
         ms, median/p99/max: blackout {}; largest echo gap {}; gap - blackout {}; \
         gap - blackout - peer period {}\n  \
         where the excess lies: last echo -> STOP {}; RESUME -> first echo {} \
         (steady-state round trip {})",
        net["updates"],
        net["peer_period_ms"],
        net["host_frames_lost"],
        net["host_frames_sent"],
        net["host_frames_doubled"],
        med_p99_max(&net["blackout_ms"]),
        med_p99_max(&net["largest_echo_gap_ms"]),
        med_p99_max(&net["gap_minus_blackout_ms"]),
        med_p99_max(&net["gap_minus_blackout_minus_period_ms"]),
        med_p99_max(&net["last_echo_to_stop_ms"]),
        med_p99_max(&net["resume_to_first_echo_ms"]),
        med_p99_max(&net["steady_round_trip_ms"]),
    )
}

/// Frame sizes of the frame-rate rows: the smallest Ethernet frame and a 1500-byte one.
pub const FRAME_SIZES: [usize; 2] = [64, 1500];
/// Frames in flight at most while flooding: under the guest's 64 receive buffers and 32
/// transmit slots, so the guest is never short of either and nothing is lost.
pub const FLOOD_WINDOW: u64 = 24;
/// Echoes before a measurement starts (the pipeline fills).
const WARM_UP_ECHOES: usize = 200;

/// Echoes per second while `peer` floods `size`-byte frames, over `measure` (after a
/// warm-up); `Err` when the echoes stop. The peer stops sending after it.
fn echo_rate(
    peer: &super::NetPeer,
    size: usize,
    measure: Duration,
    wait: Duration,
) -> Result<f64, String> {
    peer.flood(size, FLOOD_WINDOW);
    peer.start_sending();
    let start = peer.tally().echoes.len();
    let (_, ok) = peer.wait_until(wait, |t| t.echoes.len() >= start + WARM_UP_ECHOES);
    let rate = if ok {
        let (t0, e0) = (Instant::now(), peer.tally().echoes.len());
        std::thread::sleep(measure);
        let (t1, e1) = (Instant::now(), peer.tally().echoes.len());
        Ok((e1 - e0) as f64 / t1.duration_since(t0).as_secs_f64())
    } else {
        Err(format!("{size}-byte frames: the echoes stopped"))
    };
    peer.stop_sending();
    peer.flood(super::FRAME_LEN, 0);
    // The frames in flight come back before the next measurement.
    peer.wait_until(wait, |t| t.unechoed().is_empty());
    rate
}

/// Frames lost or echoed twice by `peer`'s guest so far.
fn lost_or_doubled(peer: &super::NetPeer) -> usize {
    let t = peer.tally();
    t.unechoed().len() + t.echoed_twice().len()
}

/// The guest's frame rate, ours against QEMU's `-device virtio-net-pci` (`qemu`: its binary,
/// or why there is none), the same netcheck driver on both (QEMU boots its bzImage), each on a
/// tap in a throw-away namespace: a peer floods frames of each of [`FRAME_SIZES`] bytes with at
/// most [`FLOOD_WINDOW`] in flight and counts the echoes per second over `measure`. Each echo
/// is a frame received by the guest (of that size) and one sent (64 bytes). Both VMs run for
/// the whole measurement and take turns, `rounds` times, so a busy host weighs on both alike;
/// the median of the rounds is reported.
pub fn frame_rates(
    qemu: Result<&str, String>,
    measure: Duration,
    rounds: usize,
    wait: Duration,
) -> Result<Value, String> {
    let Some(vm) = NetVm::start_with_period("blackout-bench frame rate", Tap::Fd, ECHO_GAP_PERIOD)
    else {
        return Err("network namespaces or /dev/net/tun are unavailable".into());
    };
    vm.wait_echoes(20);
    vm.peer.stop_sending();
    // QEMU's VM, with what must outlive it (declared first, dropped last).
    let qemu_dir = crate::tempdir::TempDir::new("net-rate-qemu").map_err(|e| e.to_string())?;
    let qemu_ns = crate::netns::NetNs::create().map_err(|e| format!("a namespace for QEMU: {e}"));
    let qemu_vm = qemu.and_then(|qemu| {
        let kernel = crate::blkcheck::build_guest_bzimage("netcheck", qemu_dir.path())?;
        super::start_on_qemu(
            qemu_ns.as_ref().map_err(Clone::clone)?,
            &super::QemuNet {
                qemu,
                kernel: &kernel,
                guest_frames: 0,
                host_frames: 0,
                host_period: ECHO_GAP_PERIOD,
                timeout: wait,
                device_options: "",
            },
        )
    });
    let mut ours = vec![Vec::new(); FRAME_SIZES.len()];
    let mut theirs = vec![Vec::new(); FRAME_SIZES.len()];
    for round in 0..rounds {
        for (i, &size) in FRAME_SIZES.iter().enumerate() {
            eprint!("\r  frame rate: round {}/{rounds}, {size} bytes", round + 1);
            ours[i].push(echo_rate(&vm.peer, size, measure, wait)?);
            if let Ok(q) = &qemu_vm {
                theirs[i].push(echo_rate(&q.peer, size, measure, wait)?);
            }
        }
    }
    eprintln!();
    let rows: Vec<Value> = FRAME_SIZES
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let (us, them) = (
                median(&ours[i]),
                (!theirs[i].is_empty()).then(|| median(&theirs[i])),
            );
            json!({
                "frame_bytes": size,
                "ours_fps": us,
                "qemu_fps": them,
                "ratio": them.map(|q| us / q),
                "ours_rounds": ours[i],
                "qemu_rounds": theirs[i],
            })
        })
        .collect();
    Ok(json!({
        "window": FLOOD_WINDOW,
        "measure_s": measure.as_secs_f64(),
        "rounds": rounds,
        "rows": rows,
        "ours_frames_lost_or_doubled": lost_or_doubled(&vm.peer),
        "qemu_accel": qemu_vm.as_ref().ok().map(|q| q.accel.clone()),
        "qemu_frames_lost_or_doubled": qemu_vm.as_ref().ok().map(|q| lost_or_doubled(&q.peer)),
        "qemu_error": qemu_vm.as_ref().err(),
    }))
}

/// The frame-rate table of [`frame_rates`]' result (or its error).
pub fn frame_rates_report(v: &Value) -> String {
    if let Some(e) = v["error"].as_str() {
        return format!("guest frame rate: not measured: {e}");
    }
    let qemu = match (v["qemu_accel"].as_str(), v["qemu_error"].as_str()) {
        (Some(accel), _) => format!("QEMU -accel {accel}"),
        (None, Some(e)) => format!("QEMU: {e}"),
        (None, None) => "QEMU".to_string(),
    };
    let mut out = format!(
        "guest frame rate (netcheck echoing a flood, {} frames in flight, median of {} rounds \
         of {} s), frames/s; frames lost or doubled: ours {}, QEMU {}\n  {:>6} {:>10} {:>10} {:>10}",
        v["window"],
        v["rounds"],
        v["measure_s"],
        v["ours_frames_lost_or_doubled"],
        v["qemu_frames_lost_or_doubled"],
        "bytes",
        "ours",
        "QEMU",
        "ours/QEMU"
    );
    let num = |x: &Value, digits: usize| {
        x.as_f64()
            .map_or("-".to_string(), |x| format!("{x:.digits$}"))
    };
    for row in v["rows"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  {:>6} {:>10} {:>10} {:>10}",
            row["frame_bytes"].as_u64().unwrap_or(0),
            num(&row["ours_fps"], 0),
            num(&row["qemu_fps"], 0),
            num(&row["ratio"], 2)
        ));
    }
    out.push_str(&format!("\n  ({qemu})"));
    out
}
