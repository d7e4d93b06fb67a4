//! The `netcheck` virtio-net driver guest (`vmm/guests/netcheck.S`): its frame format, its
//! counters block, and a host-side peer that talks to it through a tap.
//!
//! The peer ([`NetPeer`]) owns an `AF_PACKET` socket bound to the tap (see
//! [`crate::netns::NetNs::packet_socket`]). A sender thread sends numbered HOST frames at a
//! steady rate; a receiver thread takes the guest's ECHO frames (each HOST frame sent back with
//! the guest's echo counter) and its own GUEST frames (numbered 1, 2, 3, ... at the guest's
//! timer rate), and records them in a [`Tally`]: which host frames were echoed and how often,
//! whether the guest's frames and echo counters came in order without gap or duplicate, and
//! the largest time between two echoes (per window, so a test can report it per update).
//!
//! Frame layout (64 bytes, little-endian fields):
//!
//! ```text
//!  0      6      12    14          22      26   30      38       46       54    64
//!  | dst  | src  | 0x88b5 | "NETCHECK" | kind | 0 | seq | echo | stamp | 0... |
//! ```
//!
//! `kind` 1 HOST (seq = the host's), 2 ECHO (seq and stamp of the host frame, echo = the
//! guest's echo counter), 3 GUEST (seq = the guest's).

pub mod bench;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{MsgFlags, recv, send, setsockopt, sockopt};
use nix::sys::time::TimeVal;
use serde_json::Value;

use crate::binaries::{build_binaries, vmm_bin};
use crate::netns::{IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, NetNs};
use crate::process::VmmProcess;
use crate::qmp::{QmpClient, qmp_socket_arg};
use crate::tempdir::TempDir;

/// The experimental ethertype netcheck's frames carry (IEEE 802 local experimental 1).
pub const ETHERTYPE: u16 = 0x88b5;
/// "NETCHECK" little-endian, at offset 14.
pub const MAGIC: u64 = 0x4b43_4548_4354_454e;
/// Bytes in every netcheck frame.
pub const FRAME_LEN: usize = 64;
/// Guest-physical address of the counters block (see [`NetcheckCounters`]).
pub const COUNTERS_ADDR: u64 = 0x30000;
/// Bytes of the counters block that [`NetcheckCounters::parse`] reads.
pub const COUNTERS_SIZE: usize = 0x70;
/// Exit status when no virtio-net device is on PCI bus 0.
pub const EXIT_NO_DEVICE: u8 = 0x20;
/// Exit status when the device cannot be driven (`netcheck: FAILED ...`).
pub const EXIT_DEVICE_ERROR: u8 = 0x21;
/// Exit status after the requested frames when a host frame was missing or duplicated.
pub const EXIT_DATA_ERROR: u8 = 0x22;
/// The MAC the peer sends from (locally administered).
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0x4e, 0x43, 0x01];
/// The broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Sent by the host peer.
    Host = 1,
    /// A host frame sent back by the guest.
    Echo = 2,
    /// The guest's own numbered frame.
    Guest = 3,
}

/// One netcheck frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// What it is.
    pub kind: Kind,
    /// The host's sequence number (HOST, ECHO) or the guest's (GUEST).
    pub seq: u64,
    /// The guest's echo counter (ECHO), else 0.
    pub echo: u64,
    /// The host's timestamp (HOST, ECHO), opaque to the guest.
    pub stamp: u64,
}

impl Frame {
    /// The 64 bytes on the wire.
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let mut b = [0u8; FRAME_LEN];
        b[0..6].copy_from_slice(&self.dst);
        b[6..12].copy_from_slice(&self.src);
        b[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        b[14..22].copy_from_slice(&MAGIC.to_le_bytes());
        b[22..26].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[30..38].copy_from_slice(&self.seq.to_le_bytes());
        b[38..46].copy_from_slice(&self.echo.to_le_bytes());
        b[46..54].copy_from_slice(&self.stamp.to_le_bytes());
        b
    }

    /// The frame in `bytes`, or `None` if it is not a netcheck frame (another ethertype, no
    /// magic, an unknown kind, too short).
    pub fn decode(bytes: &[u8]) -> Option<Frame> {
        let b = bytes.get(..FRAME_LEN)?;
        let u64_at = |o: usize| b[o..o + 8].try_into().ok().map(u64::from_le_bytes);
        if b[12..14] != ETHERTYPE.to_be_bytes() || u64_at(14)? != MAGIC {
            return None;
        }
        let kind = match u32::from_le_bytes(b[22..26].try_into().ok()?) {
            1 => Kind::Host,
            2 => Kind::Echo,
            3 => Kind::Guest,
            _ => return None,
        };
        Some(Frame {
            dst: b[0..6].try_into().ok()?,
            src: b[6..12].try_into().ok()?,
            kind,
            seq: u64_at(30)?,
            echo: u64_at(38)?,
            stamp: u64_at(46)?,
        })
    }
}

/// A numbered stream that must arrive in order, each number once: what came, what is missing,
/// what came twice or out of order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqStream {
    /// The first number seen (0 = none yet).
    pub first: u64,
    /// The highest number seen.
    pub last: u64,
    /// Numbers received.
    pub received: u64,
    /// Numbers skipped (each missing number once), in order.
    pub gaps: Vec<u64>,
    /// Numbers received again, or below the highest seen, in arrival order.
    pub duplicates: Vec<u64>,
}

impl SeqStream {
    /// Accounts `seq`.
    pub fn record(&mut self, seq: u64) {
        self.received += 1;
        if self.first == 0 {
            self.first = seq;
            self.last = seq;
            return;
        }
        if seq <= self.last {
            self.duplicates.push(seq);
            return;
        }
        self.gaps.extend(self.last + 1..seq);
        self.last = seq;
    }

    /// Whether everything since the first number came once and in order.
    pub fn is_clean(&self) -> bool {
        self.gaps.is_empty() && self.duplicates.is_empty()
    }
}

/// Everything the peer saw. Pure accounting: the peer's threads feed it.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Host frames sent (numbered 1..=host_sent).
    pub host_sent: u64,
    /// How many echoes came back for each host sequence number.
    pub echoes: BTreeMap<u64, u32>,
    /// The guest's echo counters, which must count 1, 2, 3, ...
    pub echo_counters: SeqStream,
    /// The guest's own frames.
    pub guest: SeqStream,
    /// Frames that were not netcheck's (or were our own HOST frames looping back).
    pub other: u64,
    /// When the last echo arrived.
    pub last_echo_at: Option<Instant>,
    /// The largest time between two echoes since [`Tally::take_max_echo_gap`].
    pub max_echo_gap: Duration,
    /// Where that gap was: see [`EchoGap`].
    pub max_echo_gap_at: Option<EchoGap>,
    /// Round trips (host frame sent → its echo received) since [`Tally::take_round_trips`],
    /// at most [`MAX_ROUND_TRIPS`].
    pub round_trips: Vec<Duration>,
}

/// Round trips a [`Tally`] keeps between two [`Tally::take_round_trips`].
pub const MAX_ROUND_TRIPS: usize = 100_000;

/// The largest gap in the echo stream of a window, located: the echoes on either side of it,
/// and the host's timestamp in the first echo after it (when that frame was sent), so a caller
/// can put the gap next to a blackout's stop and resume times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoGap {
    /// When the last echo before the gap arrived.
    pub before: Instant,
    /// When the first echo after it arrived.
    pub after: Instant,
    /// The `stamp` of that first echo: nanoseconds from the peer's start to its sending.
    pub after_stamp: u64,
}

impl EchoGap {
    /// The gap's length.
    pub fn len(&self) -> Duration {
        self.after.saturating_duration_since(self.before)
    }
}

impl Tally {
    /// Accounts a received frame at `now`.
    pub fn record(&mut self, frame: &Frame, now: Instant) {
        match frame.kind {
            Kind::Echo => {
                *self.echoes.entry(frame.seq).or_insert(0) += 1;
                self.echo_counters.record(frame.echo);
                if let Some(prev) = self.last_echo_at {
                    let gap = now.saturating_duration_since(prev);
                    if gap > self.max_echo_gap || self.max_echo_gap_at.is_none() {
                        self.max_echo_gap = gap;
                        self.max_echo_gap_at = Some(EchoGap {
                            before: prev,
                            after: now,
                            after_stamp: frame.stamp,
                        });
                    }
                }
                self.last_echo_at = Some(now);
            }
            Kind::Guest => self.guest.record(frame.seq),
            Kind::Host => self.other += 1,
        }
    }

    /// The largest gap between two echoes since the last call; starts a new window.
    pub fn take_max_echo_gap(&mut self) -> Duration {
        self.max_echo_gap_at = None;
        std::mem::take(&mut self.max_echo_gap)
    }

    /// [`Tally::take_max_echo_gap`] with where the gap was (`None`: fewer than two echoes in
    /// the window).
    pub fn take_echo_gap(&mut self) -> Option<EchoGap> {
        let at = self.max_echo_gap_at.take();
        self.max_echo_gap = Duration::ZERO;
        at
    }

    /// Accounts the round trip of one echo (its host frame's sending to its arrival).
    pub fn record_round_trip(&mut self, rtt: Duration) {
        if self.round_trips.len() < MAX_ROUND_TRIPS {
            self.round_trips.push(rtt);
        }
    }

    /// The round trips since the last call.
    pub fn take_round_trips(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.round_trips)
    }

    /// Host frames `1..=host_sent` not echoed (yet).
    pub fn unechoed(&self) -> Vec<u64> {
        (1..=self.host_sent)
            .filter(|s| !self.echoes.contains_key(s))
            .collect()
    }

    /// Host frames echoed more than once, with the count.
    pub fn echoed_twice(&self) -> Vec<(u64, u32)> {
        self.echoes
            .iter()
            .filter(|&(_, &n)| n > 1)
            .map(|(&s, &n)| (s, n))
            .collect()
    }

    /// Every problem, one line each (empty when the run was clean): host frames not echoed or
    /// echoed twice, echoes of frames never sent, and gaps or duplicates in the guest's frames
    /// and echo counters.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let unechoed = self.unechoed();
        if !unechoed.is_empty() {
            out.push(format!(
                "{} host frames not echoed: {:?}",
                unechoed.len(),
                short(&unechoed)
            ));
        }
        let twice = self.echoed_twice();
        if !twice.is_empty() {
            out.push(format!("host frames echoed more than once: {twice:?}"));
        }
        let unknown: Vec<u64> = self
            .echoes
            .keys()
            .copied()
            .filter(|&s| s == 0 || s > self.host_sent)
            .collect();
        if !unknown.is_empty() {
            out.push(format!("echoes of frames never sent: {unknown:?}"));
        }
        for (what, s) in [
            ("guest frames", &self.guest),
            ("echo counters", &self.echo_counters),
        ] {
            if !s.gaps.is_empty() {
                out.push(format!("{what} missing: {:?}", short(&s.gaps)));
            }
            if !s.duplicates.is_empty() {
                out.push(format!(
                    "{what} duplicated or out of order: {:?}",
                    short(&s.duplicates)
                ));
            }
        }
        out
    }
}

/// At most 20 numbers of `v`, for messages.
fn short(v: &[u64]) -> &[u64] {
    &v[..v.len().min(20)]
}

/// One u64 of netcheck's counters block, in block order (`COUNTERS_ADDR + 8 * index`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// "NETCHECK" once the guest started.
    Magic,
    /// Host frames received.
    Host,
    /// Echoes sent.
    Echoed,
    /// Own frames sent.
    Sent,
    /// The highest host sequence number seen.
    LastSeq,
    /// Host sequence numbers missing.
    Gaps,
    /// Host frames seen again.
    Dups,
    /// Other frames received.
    Other,
    /// Timer ticks.
    Ticks,
    /// 0 starting, 1 running, 2 no device, 3 failed.
    State,
    /// Queue interrupts taken.
    Irqs,
    /// Frames received in more than one buffer (MRG_RXBUF).
    Merged,
    /// Transmissions completed.
    TxDone,
    /// The first host sequence number seen.
    FirstSeq,
}

/// netcheck's counters block (`COUNTERS_ADDR`), read with [`NetcheckCounters::get`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetcheckCounters([u64; COUNTERS_SIZE / 8]);

impl NetcheckCounters {
    /// Parses the counters block from the first [`COUNTERS_SIZE`] bytes of a dump of
    /// `COUNTERS_ADDR`; `None` if it is shorter.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let words: Vec<u64> = bytes
            .get(..COUNTERS_SIZE)?
            .chunks_exact(8)
            .map(|w| w.try_into().map(u64::from_le_bytes).unwrap_or_default())
            .collect();
        words.try_into().ok().map(Self)
    }

    /// One counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }
}

/// What can go wrong with the peer's socket.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Setting the receive timeout failed.
    #[error("cannot set the peer socket's receive timeout: {0}")]
    Timeout(nix::Error),
    /// The socket could not be duplicated for the second thread.
    #[error("cannot duplicate the peer socket: {0}")]
    Dup(std::io::Error),
}

/// How the peer's sender sends. Paced (the default): one frame per period. Flooding: as fast
/// as the echoes come back, with at most `window` frames not yet echoed (the guest's buffers
/// and the tap's queue are never overrun, so nothing is lost), each `frame_len` bytes long
/// (the netcheck frame, padded with zeros).
struct Flood {
    /// Frames in flight at most; 0: paced.
    window: AtomicU64,
    frame_len: AtomicUsize,
    /// Signalled (with the tally's mutex) at every echo.
    echoed: Condvar,
}

/// The host side of a netcheck run: sends numbered frames at a steady rate and records what
/// comes back (see the module documentation). Stops its threads on drop.
pub struct NetPeer {
    tally: Arc<Mutex<Tally>>,
    /// The sender sends while `host_sent` is below this.
    limit: Arc<AtomicU64>,
    /// How the sender sends: see [`Flood`].
    flood: Arc<Flood>,
    running: Arc<AtomicBool>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
    start: Instant,
}

impl NetPeer {
    /// Starts receiving on `socket` (an `AF_PACKET` socket bound to the tap) at once, and
    /// sending HOST frames to `dst` every `period` once [`NetPeer::start_sending`] is called.
    pub fn start(socket: OwnedFd, dst: [u8; 6], period: Duration) -> Result<Self, PeerError> {
        setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &TimeVal::new(0, 50_000), // 50 ms: how soon the receiver sees `running` cleared
        )
        .map_err(PeerError::Timeout)?;
        let send_socket = socket.try_clone().map_err(PeerError::Dup)?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let limit = Arc::new(AtomicU64::new(0));
        let flood = Arc::new(Flood {
            window: AtomicU64::new(0),
            frame_len: AtomicUsize::new(FRAME_LEN),
            echoed: Condvar::new(),
        });
        let running = Arc::new(AtomicBool::new(true));
        let start = Instant::now();

        let receiver = {
            let (tally, running, flood) = (tally.clone(), running.clone(), flood.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while running.load(Ordering::Relaxed) {
                    match recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        Ok(n) => {
                            let now = Instant::now();
                            let mut t = lock(&tally);
                            match Frame::decode(&buf[..n]) {
                                Some(f) => {
                                    t.record(&f, now);
                                    if f.kind == Kind::Echo {
                                        let sent = start + Duration::from_nanos(f.stamp);
                                        t.record_round_trip(now.saturating_duration_since(sent));
                                        flood.echoed.notify_one();
                                    }
                                }
                                None => t.other += 1,
                            }
                        }
                        Err(nix::Error::EAGAIN | nix::Error::EINTR) => {}
                        Err(e) => {
                            eprintln!("netcheck peer: receive failed: {e}");
                            return;
                        }
                    }
                }
            })
        };
        let sender = {
            let (tally, running, limit) = (tally.clone(), running.clone(), limit.clone());
            let flood = flood.clone();
            std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut bytes = Vec::new();
                while running.load(Ordering::Relaxed) {
                    let window = flood.window.load(Ordering::Relaxed);
                    let limit = limit.load(Ordering::Relaxed);
                    if window == 0 || lock(&tally).host_sent >= limit {
                        // Pacing, not waiting for a result: one frame per period.
                        next += period;
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        } else {
                            next = Instant::now();
                        }
                    }
                    let mut t = lock(&tally);
                    while window > 0
                        && t.host_sent.saturating_sub(t.echoes.len() as u64) >= window
                        && running.load(Ordering::Relaxed)
                    {
                        // 50 ms: how soon a stop or a change of mode is seen.
                        t = match flood.echoed.wait_timeout(t, Duration::from_millis(50)) {
                            Ok((t, _)) => t,
                            Err(poisoned) => poisoned.into_inner().0,
                        };
                        if flood.window.load(Ordering::Relaxed) != window {
                            break;
                        }
                    }
                    if t.host_sent >= limit {
                        continue;
                    }
                    let frame = Frame {
                        dst,
                        src: PEER_MAC,
                        kind: Kind::Host,
                        seq: t.host_sent + 1,
                        echo: 0,
                        stamp: start.elapsed().as_nanos() as u64,
                    };
                    bytes.clear();
                    bytes.extend_from_slice(&frame.encode());
                    bytes.resize(flood.frame_len.load(Ordering::Relaxed).max(FRAME_LEN), 0);
                    match send(send_socket.as_raw_fd(), &bytes, MsgFlags::empty()) {
                        Ok(_) => t.host_sent += 1,
                        Err(nix::Error::ENOBUFS | nix::Error::EAGAIN) => {} // retried next period
                        Err(e) => {
                            eprintln!("netcheck peer: send failed: {e}");
                            return;
                        }
                    }
                }
            })
        };
        Ok(NetPeer {
            tally,
            limit,
            flood,
            running,
            sender: Some(sender),
            receiver: Some(receiver),
            start,
        })
    }

    /// Starts (or resumes) sending HOST frames, without end.
    pub fn start_sending(&self) {
        self.limit.store(u64::MAX, Ordering::Relaxed);
    }

    /// Floods: HOST frames of `frame_len` bytes (at least [`FRAME_LEN`]) as fast as they are
    /// echoed, with at most `window` of them not echoed yet; a `window` of 0 goes back to one
    /// frame per period. Sends only while sending is on ([`NetPeer::start_sending`]).
    pub fn flood(&self, frame_len: usize, window: u64) {
        self.flood.frame_len.store(frame_len, Ordering::Relaxed);
        self.flood.window.store(window, Ordering::Relaxed);
        self.flood.echoed.notify_all();
    }

    /// Sends `n` more HOST frames, then stops.
    pub fn send_more(&self, n: u64) {
        let t = lock(&self.tally);
        self.limit.store(t.host_sent + n, Ordering::Relaxed);
    }

    /// Stops sending HOST frames (receiving goes on).
    pub fn stop_sending(&self) {
        self.limit.store(0, Ordering::Relaxed);
    }

    /// A copy of the tally so far.
    pub fn tally(&self) -> Tally {
        lock(&self.tally).clone()
    }

    /// The largest gap between two echoes since the last call (a new window starts).
    pub fn take_max_echo_gap(&self) -> Duration {
        lock(&self.tally).take_max_echo_gap()
    }

    /// The largest echo gap since the last call, located (a new window starts).
    pub fn take_echo_gap(&self) -> Option<EchoGap> {
        lock(&self.tally).take_echo_gap()
    }

    /// Round trips of the echoes since the last call.
    pub fn take_round_trips(&self) -> Vec<Duration> {
        lock(&self.tally).take_round_trips()
    }

    /// When the peer started: the origin of the `stamp` in its frames.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// How long the peer has been running.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits until `done(tally)` holds, polling every 10 ms, for at most `timeout`; returns
    /// the tally either way and whether it held.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&Tally) -> bool) -> (Tally, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.tally();
            if done(&t) {
                return (t, true);
            }
            if Instant::now() >= deadline {
                return (t, false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NetPeer {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        for t in [self.sender.take(), self.receiver.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

/// What [`run_on_qemu`] saw.
#[derive(Debug)]
pub struct QemuRun {
    /// The accelerator QEMU ran with.
    pub accel: String,
    /// The guest's console lines (`netcheck: ...`), CRs removed.
    pub console: String,
    /// QEMU's exit status: `(code << 1) | 1` for a guest exit code through isa-debug-exit.
    pub status: Option<i32>,
    /// The peer's tally at the end.
    pub tally: Tally,
    /// From `netcheck: ready` to QEMU's exit.
    pub run_time: Duration,
}

impl QemuRun {
    /// Everything wrong with a run that was to send `host_frames` and have the guest send
    /// `guest_frames` (one line each; empty when it was clean): the tally's problems, guest
    /// frames missing at the start or end, host frames not all sent, an unclean guest exit.
    pub fn problems(&self, guest_frames: u64, host_frames: u64) -> Vec<String> {
        let t = &self.tally;
        let mut problems = t.problems();
        if t.guest.received != guest_frames || t.guest.first != 1 {
            problems.push(format!(
                "guest frames: {} received from {} on, expected 1..={guest_frames}",
                t.guest.received, t.guest.first
            ));
        }
        if t.host_sent != host_frames {
            problems.push(format!(
                "only {} of {host_frames} host frames were sent",
                t.host_sent
            ));
        }
        if self.status != Some(1) {
            problems.push(format!(
                "QEMU exited with {:?}, expected 1 (guest exit code 0)",
                self.status
            ));
        }
        problems
    }
}

/// What [`run_on_qemu`] runs.
#[derive(Clone, Copy, Debug)]
pub struct QemuNet<'a> {
    /// The QEMU binary.
    pub qemu: &'a str,
    /// netcheck's bzImage.
    pub kernel: &'a std::path::Path,
    /// The guest exits after sending this many frames (0: never).
    pub guest_frames: u64,
    /// The peer sends this many frames once the guest is ready...
    pub host_frames: u64,
    /// ... one every this long.
    pub host_period: Duration,
    /// For the guest to come up, and for it to finish.
    pub timeout: Duration,
    /// Appended to `-device virtio-net-pci,...` (e.g. `,event_idx=off,mrg_rxbuf=off`).
    pub device_options: &'a str,
}

/// QEMU running the netcheck bzImage, its guest ready, and the peer on its tap.
pub struct QemuNetVm {
    /// The QEMU process (inside the namespace).
    pub proc: VmmProcess,
    /// The peer, listening, not sending yet.
    pub peer: NetPeer,
    /// The accelerator QEMU runs with.
    pub accel: String,
}

/// Boots the netcheck bzImage on QEMU with its own virtio-net-pci (modern only) on the tap of
/// `ns`, QEMU running inside the namespace (`ifname=`), and returns once the guest says `ready`
/// (the peer listening from the start, sending every `host_period` once told to). The guest
/// exits after sending `guest_frames` of its own (0: never). Tries `-accel kvm`, then `tcg`.
pub fn start_on_qemu(ns: &crate::netns::NetNs, opts: &QemuNet<'_>) -> Result<QemuNetVm, String> {
    let QemuNet {
        qemu,
        kernel,
        guest_frames,
        host_period,
        timeout,
        device_options,
        ..
    } = *opts;
    let mut last_err = String::new();
    for accel in ["kvm", "tcg"] {
        let socket = ns.packet_socket().map_err(|e| e.to_string())?;
        let peer = NetPeer::start(socket, BROADCAST, host_period).map_err(|e| e.to_string())?;
        let netdev = format!("tap,id=n0,ifname={},script=no,downscript=no", ns.tap());
        let append = format!("netcheck.frames={guest_frames} netcheck.exit_code=0");
        let kernel = kernel.display().to_string();
        // Whitespace-free words, then the ones that may hold anything.
        let words = format!(
            "{qemu} -accel {accel} -m 64M -nographic -no-reboot -monitor none -device \
             virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56{device_options} -device \
             isa-debug-exit,iobase=0x501,iosize=1"
        );
        let mut args: Vec<String> = ns.exec_prefix();
        args.extend(words.split_whitespace().map(String::from));
        for (flag, value) in [
            ("-kernel", &kernel),
            ("-append", &append),
            ("-netdev", &netdev),
        ] {
            args.extend([flag.to_string(), value.clone()]);
        }
        let proc = VmmProcess::start(&args[0], &args[1..])
            .map_err(|e| format!("cannot start {qemu} in {}: {e}", ns.name()))?;
        if proc
            .wait_for_stdout_contains("netcheck: ready", timeout)
            .is_err()
        {
            last_err = format!(
                "QEMU -accel {accel} did not bring the guest up: console {:?} stderr {:?}",
                clean_console(&proc.stdout_text()),
                proc.stderr_text()
            );
            continue;
        }
        return Ok(QemuNetVm {
            proc,
            peer,
            accel: accel.to_string(),
        });
    }
    Err(last_err)
}

/// Boots the netcheck bzImage on QEMU ([`start_on_qemu`]); once the guest says `ready` the
/// peer sends `host_frames` frames every `host_period`; the guest exits (status 0 when it saw
/// no gap and no duplicate) after sending `guest_frames` of its own.
pub fn run_on_qemu(ns: &crate::netns::NetNs, opts: &QemuNet<'_>) -> Result<QemuRun, String> {
    let QemuNetVm { proc, peer, accel } = start_on_qemu(ns, opts)?;
    let ready = Instant::now();
    peer.send_more(opts.host_frames);
    let status = proc
        .wait_exit(opts.timeout)
        .map_err(|e| format!("QEMU did not exit: {e}: {}", proc.stdout_text()))?;
    let run_time = ready.elapsed();
    // The guest is gone: what has not come back by now will not.
    let (tally, _) = peer.wait_until(Duration::from_millis(200), |_| false);
    Ok(QemuRun {
        accel,
        console: clean_console(&proc.stdout_text()),
        status: status.code(),
        tally,
        run_time,
    })
}

/// The `netcheck: ` lines of a console (firmware output and CRs left out).
pub fn clean_console(text: &str) -> String {
    text.lines()
        .filter_map(|l| l.find("netcheck: ").map(|i| l[i..].trim_end_matches('\r')))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn lock(t: &Mutex<Tally>) -> MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

// --- a netcheck VM with its peer, for tests and benchmarks -------------------------------

/// How long anything the VM or the peer must do may take.
const NET_WAIT: Duration = Duration::from_secs(120);
/// The peer sends one frame every 5 ms (200 frames/s); the guest sends 100 frames/s.
pub const HOST_PERIOD: Duration = Duration::from_millis(5);
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

/// How the VMM gets its tap.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tap {
    /// `-netdev tap,fd=N`: opened by the test inside the namespace and inherited.
    Fd,
    /// `-netdev tap,ifname=NAME`: the VMM runs inside the namespace and opens it.
    Ifname,
}

/// A netcheck VM on a tap in its own namespace, with the peer already listening (shared by the
/// virtio-net tests and blackout-bench). Its methods panic with what went wrong.
pub struct NetVm {
    // Field order is drop order: the VMM and the peer go before the namespace.
    pub vmm: VmmProcess,
    pub qmp: QmpClient,
    pub peer: NetPeer,
    /// The VMM's own arguments (without `ip netns exec`), for update commands.
    pub args: Vec<String>,
    pub dir: TempDir,
    pub ns: NetNs,
}

impl NetVm {
    /// Boots netcheck with the tap given the `tap` way, waits until the guest is ready and
    /// starts the peer's steady stream. `None` when namespaces are unavailable (skipped).
    pub fn start(test: &str, tap: Tap) -> Option<Self> {
        Self::start_with_period(test, tap, HOST_PERIOD)
    }

    /// [`NetVm::start`] with the peer sending one frame every `period`.
    pub fn start_with_period(test: &str, tap: Tap, period: Duration) -> Option<Self> {
        let ns = NetNs::available(test)?;
        build_binaries();
        let dir = TempDir::new("net").unwrap();
        let socket = dir.join("qmp.sock");
        // Listening before the guest starts: its frames are all seen, from the first.
        let peer = NetPeer::start(ns.packet_socket().unwrap(), BROADCAST, period).unwrap();
        let tap_fd: Option<OwnedFd> = (tap == Tap::Fd).then(|| {
            let fd = ns.open_tap(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap();
            // dup(2) leaves FD_CLOEXEC clear: the VMM inherits this copy.
            nix::unistd::dup(&fd).unwrap()
        });
        let netdev = match &tap_fd {
            Some(fd) => format!("tap,id=n0,fd={}", fd.as_raw_fd()),
            None => format!("tap,id=n0,ifname={},script=no,downscript=no", ns.tap()),
        };
        let args: Vec<String> = [
            "-m",
            "32M",
            "--guest",
            "netcheck",
            "-netdev",
            &netdev,
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}"),
            "-qmp",
            &qmp_socket_arg(&socket),
        ]
        .map(String::from)
        .to_vec();
        let mut command = match tap {
            Tap::Fd => vec![],
            Tap::Ifname => ns.exec_prefix(),
        };
        command.push(vmm_bin().display().to_string());
        command.extend(args.iter().cloned());
        let vmm = VmmProcess::start(&command[0], &command[1..]).unwrap();
        drop(tap_fd); // the VMM holds its own copy now
        vmm.wait_for_path(&socket, NET_WAIT).unwrap();
        let qmp = QmpClient::connect_and_negotiate(&socket, NET_WAIT).unwrap();
        vmm.wait_for_stdout_contains("netcheck: ready", NET_WAIT)
            .unwrap_or_else(|e| panic!("{e}: {}{}", vmm.stdout_text(), vmm.stderr_text()));
        peer.start_sending();
        Some(NetVm {
            vmm,
            qmp,
            peer,
            args,
            dir,
            ns,
        })
    }

    /// Waits until `n` more echoes than now came back (traffic flows).
    pub fn wait_echoes(&self, n: usize) {
        let target = self.peer.tally().echoes.len() + n;
        let (t, ok) = self.peer.wait_until(NET_WAIT, |t| t.echoes.len() >= target);
        assert!(
            ok,
            "echoes stopped at {} (host sent {}): {}",
            t.echoes.len(),
            t.host_sent,
            self.vmm.stdout_text()
        );
    }

    /// Stops the peer's stream, waits for the last echoes, checks everything the peer and the
    /// guest saw, and quits the VMM. Returns the tally.
    pub fn finish(mut self) -> Tally {
        self.peer.stop_sending();
        let (t, _) = self.peer.wait_until(NET_WAIT, |t| t.unechoed().is_empty());
        let guest_last = t.guest.last;
        // A few more guest frames: the last ones before the stop came in order too.
        let (t, _) = self
            .peer
            .wait_until(NET_WAIT, |t| t.guest.last >= guest_last + 5);
        let dump = self
            .qmp
            .pmemsave(
                COUNTERS_ADDR,
                COUNTERS_SIZE as u64,
                &self.dir.join("counters"),
            )
            .unwrap();
        let c = NetcheckCounters::parse(&dump).unwrap();
        self.qmp.execute("quit", Value::Null).unwrap();
        self.vmm.wait_exit(NET_WAIT).unwrap();
        let console = self.vmm.stdout_text();
        let problems = t.problems();
        assert!(problems.is_empty(), "{problems:#?}\nconsole: {console}");
        assert_eq!(t.guest.first, 1, "the guest's first frame was lost");
        assert!(t.host_sent > 0 && t.echoes.len() as u64 == t.host_sent);
        assert!(
            !console.contains("netcheck: GAP") && !console.contains("netcheck: DUPLICATE"),
            "{console}"
        );
        assert_eq!(
            (c.get(Counter::Gaps), c.get(Counter::Dups)),
            (0, 0),
            "{c:?}"
        );
        assert_eq!(c.get(Counter::Echoed), t.host_sent, "{c:?}");
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: Kind, seq: u64, echo: u64) -> Frame {
        Frame {
            dst: BROADCAST,
            src: PEER_MAC,
            kind,
            seq,
            echo,
            stamp: 77,
        }
    }

    #[test]
    fn frames_round_trip_and_others_are_rejected() {
        let f = frame(Kind::Echo, 12345, 9);
        let bytes = f.encode();
        assert_eq!(&bytes[12..14], &[0x88, 0xb5]);
        assert_eq!(&bytes[14..22], b"NETCHECK");
        assert_eq!(Frame::decode(&bytes), Some(f));
        // Longer frames (padding) decode too.
        let mut long = bytes.to_vec();
        long.extend([0u8; 100]);
        assert_eq!(Frame::decode(&long), Some(f));
        assert_eq!(Frame::decode(&bytes[..63]), None);
        let mut other = bytes;
        other[13] = 0xdd; // IPv6
        assert_eq!(Frame::decode(&other), None);
        let mut bad_kind = bytes;
        bad_kind[22] = 9;
        assert_eq!(Frame::decode(&bad_kind), None);
        let mut bad_magic = bytes;
        bad_magic[14] = b'X';
        assert_eq!(Frame::decode(&bad_magic), None);
    }

    #[test]
    fn seq_stream_counts_gaps_and_duplicates() {
        let mut s = SeqStream::default();
        for seq in [5, 6, 7, 7, 10, 8, 11] {
            s.record(seq);
        }
        assert_eq!(s.first, 5);
        assert_eq!(s.last, 11);
        assert_eq!(s.received, 7);
        assert_eq!(s.gaps, vec![8, 9]);
        assert_eq!(s.duplicates, vec![7, 8]);
        assert!(!s.is_clean());
        let mut clean = SeqStream::default();
        (1..=100).for_each(|n| clean.record(n));
        assert!(clean.is_clean());
    }

    #[test]
    fn tally_finds_unechoed_and_twice_echoed_frames() {
        let t0 = Instant::now();
        let mut t = Tally {
            host_sent: 5,
            ..Tally::default()
        };
        for (i, seq) in [1u64, 2, 2, 4, 5].into_iter().enumerate() {
            let n = i as u64 + 1;
            t.record(
                &frame(Kind::Echo, seq, n),
                t0 + Duration::from_millis(10 * n),
            );
        }
        t.record(&frame(Kind::Guest, 1, 0), t0);
        t.record(&frame(Kind::Guest, 2, 0), t0);
        assert_eq!(t.unechoed(), vec![3]);
        assert_eq!(t.echoed_twice(), vec![(2, 2)]);
        let problems = t.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("not echoed: [3]"));
        assert!(t.guest.is_clean());
        // Our own HOST frames looping back are not echoes.
        t.record(&frame(Kind::Host, 3, 0), t0);
        assert_eq!(t.unechoed(), vec![3]);
    }

    #[test]
    fn echo_gap_is_per_window() {
        let t0 = Instant::now();
        let mut t = Tally::default();
        let at = |ms| t0 + Duration::from_millis(ms);
        t.record(&frame(Kind::Echo, 1, 1), at(0));
        t.record(&frame(Kind::Echo, 2, 2), at(5));
        t.record(&frame(Kind::Echo, 3, 3), at(45));
        assert_eq!(t.take_max_echo_gap(), Duration::from_millis(40));
        t.record(&frame(Kind::Echo, 4, 4), at(50));
        assert_eq!(t.take_max_echo_gap(), Duration::from_millis(5));
        assert_eq!(t.take_max_echo_gap(), Duration::ZERO);
    }

    #[test]
    fn the_largest_echo_gap_is_located() {
        let t0 = Instant::now();
        let mut t = Tally::default();
        let at = |ms| t0 + Duration::from_millis(ms);
        let echo = |seq, stamp| Frame {
            stamp,
            ..frame(Kind::Echo, seq, seq)
        };
        t.record(&echo(1, 100), at(0));
        t.record(&echo(2, 200), at(30));
        t.record(&echo(3, 300), at(31));
        t.record(&echo(4, 400), at(41));
        let gap = t.take_echo_gap().unwrap();
        assert_eq!(
            (gap.before, gap.after, gap.after_stamp),
            (at(0), at(30), 200)
        );
        assert_eq!(gap.len(), Duration::from_millis(30));
        assert_eq!(t.take_max_echo_gap(), Duration::ZERO, "a new window");
        t.record(&echo(5, 500), at(42));
        assert_eq!(t.take_echo_gap().unwrap().before, at(41));
        assert_eq!(t.take_echo_gap(), None);
    }

    #[test]
    fn counters_parse() {
        let mut bytes = vec![0u8; COUNTERS_SIZE];
        bytes[..8].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[0x18..0x20].copy_from_slice(&42u64.to_le_bytes());
        let c = NetcheckCounters::parse(&bytes).unwrap();
        assert_eq!(c.get(Counter::Magic), MAGIC);
        assert_eq!(c.get(Counter::Sent), 42);
        assert_eq!(c.get(Counter::FirstSeq), 0);
        assert_eq!(NetcheckCounters::parse(&bytes[..COUNTERS_SIZE - 1]), None);
    }

    #[test]
    fn constants_match_the_guest_source() {
        let path = crate::binaries::workspace_root().join("vmm/guests/netcheck.S");
        let source = std::fs::read_to_string(path).unwrap();
        let expected = [
            ("NC_MAGIC", MAGIC),
            ("NC_COUNTERS", COUNTERS_ADDR),
            ("FRAME_LEN", FRAME_LEN as u64),
            ("EXIT_NO_DEVICE", EXIT_NO_DEVICE.into()),
            ("EXIT_DEVICE_ERROR", EXIT_DEVICE_ERROR.into()),
            ("EXIT_DATA_ERROR", EXIT_DATA_ERROR.into()),
            ("F_SEQ", 30),
            ("F_ECHO", 38),
            ("F_STAMP", 46),
        ];
        for (name, value) in expected {
            assert_eq!(asm_constant(&source, name), Some(value), "{name}");
        }
    }

    /// The value of `.set NAME, VALUE` (decimal or 0x hex) in assembly `source`.
    fn asm_constant(source: &str, name: &str) -> Option<u64> {
        let key = format!("{name},");
        let text = source.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(".set") && w.next() == Some(key.as_str())).then(|| w.next())?
        })?;
        match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => text.parse().ok(),
        }
    }
}
