//! virtio-net (virtio 1.x section 5.1) over a tap device.
//!
//! Two queues: 0 receive (RX), 1 transmit (TX). Every frame in either direction is one vnet
//! header (`virtio_net_hdr_v1`, 12 bytes, the same layout the tap uses) followed by the Ethernet
//! frame:
//!
//! ```text
//! flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16 |
//! num_buffers u16 | Ethernet frame (up to 64 KiB + 14 with TSO/UFO)
//! ```
//!
//! Configuration space: mac [u8; 6] at 0, status u16 at 6 (LINK_UP), max_virtqueue_pairs u16 at
//! 8 (1).
//!
//! One I/O thread per device ([`super::worker`]), woken by epoll on: the TX queue's ioeventfd,
//! the RX queue's ioeventfd (the driver added receive buffers), the tap's readiness, and the
//! worker's wake eventfd for pause/resume/stop. TX: a chain is gathered and written to the tap with one `writev` straight
//! from guest memory. RX: the device takes buffers from the RX queue first (with MRG_RXBUF as
//! many as a largest frame needs), then `readv`s one frame from the tap straight into them, so
//! a frame is copied once, by the kernel; buffers it did not use go back to the ring (the avail
//! index is rewound). With no buffers, the tap is taken out of the epoll set: frames wait in the
//! kernel's tap queue, which is also what carries them across a live update's blackout.
//!
//! Pausing finishes the frame being handled and takes no other: a TX chain is either written
//! and returned or untouched (the next VMM finds it still available), and a frame read from the
//! tap is always placed before the pause completes, because it is only read into buffers
//! already in hand.
//!
//! A resume looks at both queues and the tap at once (frames that waited in the tap through a
//! live update's blackout go to the guest before its vCPUs run again), and raises each queue's
//! interrupt once: the old VMM of a live update saves the vCPUs'
//! interrupt state before it pauses its devices, so an interrupt for buffers used in between
//! would be lost with the old VM, and the driver would see those frames only at its next wake.
//!
//! Hostile descriptors (outside RAM, loops, write-only TX or read-only RX buffers, a TX frame
//! over 64 KiB + header, a received frame larger than the buffers) drop that frame; the drop is
//! counted (`info network`, `query-rx-filter` does not show it) and logged with a rate limit,
//! and the device goes on.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{OFFLOADS_TSO, Tap, VNET_HDR_LEN};
use super::worker::{Control, IoHandler, Worker};
use super::{Activation, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::devices::{DeviceContext, DeviceError, HostFd, Persist, lock};

use virtio_bindings::virtio_net as vn;

pub const VIRTIO_ID_NET: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_NET as u16;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// The largest Ethernet frame with segmentation offloads: 64 KiB of payload + its header.
pub const MAX_FRAME: usize = 65535 + 14;
/// The largest frame without segmentation offloads: 1500 bytes of payload, the Ethernet
/// header and a VLAN tag.
const ETHERNET_FRAME: usize = 1500 + 14 + 4;
/// Frames received between two interrupts, at most.
const RX_BATCH: u32 = 32;
/// A TX chain longer than this is dropped.
pub const MAX_TX_CHAIN: usize = VNET_HDR_LEN + MAX_FRAME;
/// Buffers the kernel takes in one readv/writev.
const MAX_IOVECS: usize = 1024;

/// QEMU's default MAC prefix (52:54:00:12:34:56 for the first NIC).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

const F_CSUM: u32 = vn::VIRTIO_NET_F_CSUM;
const F_GUEST_CSUM: u32 = vn::VIRTIO_NET_F_GUEST_CSUM;
const F_MAC: u32 = vn::VIRTIO_NET_F_MAC;
const F_GUEST_TSO4: u32 = vn::VIRTIO_NET_F_GUEST_TSO4;
const F_GUEST_TSO6: u32 = vn::VIRTIO_NET_F_GUEST_TSO6;
const F_GUEST_ECN: u32 = vn::VIRTIO_NET_F_GUEST_ECN;
const F_GUEST_UFO: u32 = vn::VIRTIO_NET_F_GUEST_UFO;
const F_HOST_TSO4: u32 = vn::VIRTIO_NET_F_HOST_TSO4;
const F_HOST_TSO6: u32 = vn::VIRTIO_NET_F_HOST_TSO6;
const F_HOST_ECN: u32 = vn::VIRTIO_NET_F_HOST_ECN;
const F_HOST_UFO: u32 = vn::VIRTIO_NET_F_HOST_UFO;
const F_MRG_RXBUF: u32 = vn::VIRTIO_NET_F_MRG_RXBUF;
const F_STATUS: u32 = vn::VIRTIO_NET_F_STATUS;
const S_LINK_UP: u16 = vn::VIRTIO_NET_S_LINK_UP as u16;
/// Where `num_buffers` sits in the vnet header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Where a tap comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// `-netdev tap,ifname=NAME`: the VMM opens /dev/net/tun and attaches to NAME.
    Ifname(String),
    /// `-netdev tap,fd=N`: opened by the management layer.
    Fd(RawFd),
}

impl std::fmt::Display for TapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapSource::Ifname(n) => write!(f, "ifname={n}"),
            TapSource::Fd(fd) => write!(f, "fd={fd}"),
        }
    }
}

/// A NIC as the command line describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The netdev's id (`-netdev tap,id=`): names the device and its host fd.
    pub netdev: String,
    /// The device's own id (`-device virtio-net-pci,id=`), QEMU's NIC name.
    pub device_id: String,
    pub source: TapSource,
    pub mac: [u8; 6],
}

impl NetConfig {
    pub fn state_id(&self) -> String {
        format!("virtio-net:{}", self.netdev)
    }

    fn host_fd_name(&self) -> String {
        format!("netdev:{}", self.netdev)
    }

    /// Opens the tap (power-on, restore from a file in a new process).
    pub fn open(&self) -> Result<Tap, super::tap::TapError> {
        match &self.source {
            TapSource::Ifname(name) => Tap::open_named(name),
            TapSource::Fd(fd) => Tap::from_passed_fd(*fd),
        }
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Frame counters, kept by the I/O thread and read by the monitor.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Received frames dropped: larger than the guest's buffers, or unusable RX descriptors.
    pub rx_dropped: AtomicU64,
    /// Guest frames dropped: hostile descriptors, oversized, or the tap refused them.
    pub tx_dropped: AtomicU64,
}

/// A snapshot of [`NetCounters`] (also carried across updates in the device state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

impl NetCounters {
    fn snapshot(&self) -> NetStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            rx_dropped: l(&self.rx_dropped),
            tx_dropped: l(&self.tx_dropped),
        }
    }

    fn from_stats(s: &NetStats) -> Self {
        NetCounters {
            rx_frames: s.rx_frames.into(),
            rx_bytes: s.rx_bytes.into(),
            tx_frames: s.tx_frames.into(),
            tx_bytes: s.tx_bytes.into(),
            rx_dropped: s.rx_dropped.into(),
            tx_dropped: s.tx_dropped.into(),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a saved NIC was: the tap it used (a restore onto another tap is refused), its MAC
/// and its counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub ifname: String,
    pub tap_flags: i16,
    pub mac: [u8; 6],
    pub stats: NetStats,
}

pub struct Net {
    config: NetConfig,
    tap: Arc<OwnedFd>,
    ifname: String,
    tap_flags: i16,
    /// `TUN_F_*` offloads the tap accepts.
    tap_offloads: u32,
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
}

impl Net {
    fn with_tap(config: NetConfig, tap: Tap) -> Self {
        let tap_offloads = tap.supported_offloads();
        let ifname = tap.name().to_string();
        let tap_flags = tap.flags();
        Net {
            config,
            tap: Arc::new(tap.into_fd()),
            ifname,
            tap_flags,
            tap_offloads,
            counters: Arc::default(),
            worker: None,
        }
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The tap interface's name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    /// Stops and joins the I/O thread, if there is one.
    fn stop_worker(&mut self) {
        self.worker = None;
    }

    /// The tap offloads that match what the guest said it can receive.
    fn offloads_for(features: u64) -> u32 {
        let has = |bit: u32| features & (1 << bit) != 0;
        let mut f = 0;
        if has(F_GUEST_CSUM) {
            f |= libc::TUN_F_CSUM;
            if has(F_GUEST_TSO4) {
                f |= libc::TUN_F_TSO4;
            }
            if has(F_GUEST_TSO6) {
                f |= libc::TUN_F_TSO6;
            }
            if has(F_GUEST_ECN) {
                f |= libc::TUN_F_TSO_ECN;
            }
            if has(F_GUEST_UFO) {
                f |= libc::TUN_F_UFO;
            }
        }
        f
    }
}

impl Persist for Net {
    type State = NetState;
    type Config = NetConfig;

    /// Opens the tap, or takes over the one the device had before a reset.
    fn power_on(ctx: &mut DeviceContext<'_>, config: &NetConfig) -> Result<Self, DeviceError> {
        let tap = match ctx.take_host_fd(&config.host_fd_name()) {
            Some(fd) => Tap::adopt(fd)
                .map_err(|e| DeviceError::Setup(format!("netdev '{}': {e}", config.netdev)))?,
            None => config
                .open()
                .map_err(|e| DeviceError::Setup(format!("netdev '{}': {e}", config.netdev)))?,
        };
        Ok(Net::with_tap(config.clone(), tap))
    }

    fn save(&self) -> NetState {
        NetState {
            ifname: self.ifname.clone(),
            tap_flags: self.tap_flags,
            mac: self.config.mac,
            stats: self.counters.snapshot(),
        }
    }

    fn restore(
        ctx: &mut DeviceContext<'_>,
        config: &NetConfig,
        state: &NetState,
    ) -> Result<Self, DeviceError> {
        let name = config.host_fd_name();
        let setup = |e: &dyn std::fmt::Display| {
            DeviceError::Setup(format!("netdev '{}': {e}", config.netdev))
        };
        let tap = match ctx.take_host_fd(&name) {
            // Every /dev/net/tun fd has the same device and inode: the interface name and
            // flags are what say it is still the same tap.
            Some(fd) => {
                let tap = Tap::adopt(fd).map_err(|e| setup(&e))?;
                if tap.name() != state.ifname || tap.flags() != state.tap_flags {
                    return Err(DeviceError::InvalidState(format!(
                        "netdev '{}': the handed-over fd is tap '{}' (flags {:#x}), the saved device used tap '{}' (flags {:#x})",
                        config.netdev,
                        tap.name(),
                        tap.flags(),
                        state.ifname,
                        state.tap_flags
                    )));
                }
                tap
            }
            None if ctx.host_fds.preserved() => return Err(DeviceError::MissingHostFd(name)),
            None => config.open().map_err(|e| setup(&e))?,
        };
        if state.mac != config.mac {
            return Err(DeviceError::InvalidState(format!(
                "netdev '{}': the command line gives MAC {}, the saved device had {}",
                config.netdev,
                format_mac(&config.mac),
                format_mac(&state.mac)
            )));
        }
        let mut net = Net::with_tap(config.clone(), tap);
        net.counters = Arc::new(NetCounters::from_stats(&state.stats));
        Ok(net)
    }

    fn host_fds(&self) -> Vec<HostFd> {
        vec![HostFd {
            name: self.config.host_fd_name(),
            fd: self.tap.as_raw_fd(),
        }]
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn pci_class(&self) -> (u8, u8) {
        // Network controller, Ethernet.
        (0x02, 0x00)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f: u64 =
            1 << F_MAC | 1 << F_STATUS | 1 << F_MRG_RXBUF | 1 << VIRTIO_RING_F_EVENT_IDX;
        // The tap takes checksum-less and segmented frames from the guest, and hands them to
        // the guest only once told to (TUNSETOFFLOAD at activation).
        f |= 1 << F_CSUM | 1 << F_HOST_TSO4 | 1 << F_HOST_TSO6 | 1 << F_HOST_ECN;
        if self.tap_offloads & libc::TUN_F_UFO != 0 {
            f |= 1 << F_HOST_UFO;
        }
        if self.tap_offloads & OFFLOADS_TSO == OFFLOADS_TSO {
            f |= 1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6 | 1 << F_GUEST_ECN;
            if self.tap_offloads & libc::TUN_F_UFO != 0 {
                f |= 1 << F_GUEST_UFO;
            }
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 10];
        space[0..6].copy_from_slice(&self.config.mac);
        space[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        space[8..10].copy_from_slice(&1u16.to_le_bytes());
        super::read_config_space(&space, offset, data);
    }

    /// The MAC is read-only for a virtio 1.x driver.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.stop_worker();
        let features = activation.features;
        log::debug!(
            "virtio-net {}: the driver started it, features {features:#x}",
            self.config.netdev
        );
        let mut queues = activation.queues.into_iter();
        let (Some((rx_queue, rx_notify)), Some((tx_queue, tx_notify))) =
            (queues.next(), queues.next())
        else {
            return Err(VirtioError::Device(
                "the driver must enable both the receive and the transmit queue".into(),
            ));
        };
        Tap::set_offloads_on(self.tap.as_raw_fd(), Self::offloads_for(features))
            .map_err(|e| VirtioError::Device(format!("TUNSETOFFLOAD on the tap: {e}")))?;
        let control = Arc::new(
            Control::new().map_err(|e| VirtioError::Device(format!("creating an eventfd: {e}")))?,
        );
        let io = NetIo {
            rx: QueueIo {
                queue: rx_queue,
                notify: rx_notify,
            },
            tx: QueueIo {
                queue: tx_queue,
                notify: tx_notify,
            },
            memory: activation.memory,
            interrupt: activation.interrupt,
            tap: self.tap.clone(),
            counters: self.counters.clone(),
            control: control.clone(),
            mrg_rxbuf: features & (1 << F_MRG_RXBUF) != 0,
            rx_frame_max: if Self::offloads_for(features) & !libc::TUN_F_CSUM != 0 {
                VNET_HDR_LEN + MAX_FRAME
            } else {
                VNET_HDR_LEN + ETHERNET_FRAME
            },
            warned: 0,
            tap_watched: false,
            resumed: false,
            name: format!("virtio-net {}", self.config.netdev),
        };
        let worker = Worker::spawn(format!("net-{}", self.config.netdev), control, io)
            .map_err(|e| VirtioError::Device(format!("starting the I/O thread: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    /// The tap's offloads are left as they are: the next activation sets them before any
    /// frame is read, and a VMM that handed the tap over (cpr-transfer) and then ends must
    /// not change them under the VMM that runs the guest now.
    fn reset(&mut self) {
        self.stop_worker();
    }

    fn pause(&mut self) {
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// A queue and the eventfd its notifications arrive on.
struct QueueIo {
    queue: Arc<Mutex<Queue>>,
    notify: Arc<EventFd>,
}

/// The I/O thread's view: both queues, guest memory, the tap.
struct NetIo {
    rx: QueueIo,
    tx: QueueIo,
    memory: Arc<GuestMemoryMmap>,
    interrupt: Arc<VirtioInterrupt>,
    tap: Arc<OwnedFd>,
    counters: Arc<NetCounters>,
    control: Arc<Control>,
    mrg_rxbuf: bool,
    /// The largest frame the tap can hand over, vnet header included: 64 KiB + header once
    /// the guest takes segmentation offloads, an Ethernet frame (with a VLAN tag) otherwise.
    rx_frame_max: usize,
    /// Hostile-descriptor warnings logged so far (a guest must not flood the log).
    warned: u32,
    /// Whether the tap is in the epoll set with EPOLLIN.
    tap_watched: bool,
    /// Set by a resume, cleared by the work after it.
    resumed: bool,
    /// For log lines.
    name: String,
}

const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_TAP: u64 = 3;
const MAX_WARNINGS: u32 = 10;

/// How one attempt at receiving a frame ended.
#[derive(Debug, PartialEq, Eq)]
enum RxOutcome {
    /// A frame was taken from the tap (placed, or dropped and counted).
    Frame,
    /// The tap has nothing to read.
    TapEmpty,
    /// The guest has no receive buffers.
    NoBuffers,
}

/// One receive buffer (descriptor chain): its head, where its bytes are, and how many.
struct RxBuffer {
    head: u16,
    /// Guest ranges of its writable descriptors, in order.
    ranges: Vec<(GuestAddress, usize)>,
    len: usize,
}

impl IoHandler for NetIo {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn register(&mut self, epoll: &Epoll) -> std::io::Result<()> {
        for (fd, token) in [
            (self.rx.notify.as_raw_fd(), TOKEN_RX),
            (self.tx.notify.as_raw_fd(), TOKEN_TX),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        // The tap is in the set from the start, with no events until there are buffers.
        epoll.ctl(
            ControlOperation::Add,
            self.tap.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), TOKEN_TAP),
        )
    }

    fn event(&mut self, _epoll: &Epoll, token: u64) {
        let _ = match token {
            TOKEN_RX => self.rx.notify.read(),
            TOKEN_TX => self.tx.notify.read(),
            _ => Ok(0),
        };
    }

    fn resume(&mut self, _epoll: &Epoll) {
        self.resumed = true;
    }

    /// Whatever the guest queued (also while paused), and whatever waits in the tap.
    fn work(&mut self, epoll: &Epoll) {
        self.transmit();
        let want_tap = self.receive();
        self.watch_tap(epoll, want_tap);
        if std::mem::take(&mut self.resumed) {
            self.notify_used_queues();
        }
    }

    fn pause(&mut self, epoll: &Epoll) {
        self.watch_tap(epoll, false);
    }
}

impl NetIo {
    /// Raises both queues' interrupts (after a resume, see the module documentation). A
    /// driver that finds nothing new in a used ring takes it as the spurious interrupt the
    /// virtio spec allows.
    fn notify_used_queues(&self) {
        for index in [RX, TX] {
            self.interrupt.notify_queue(index);
        }
    }

    /// Level-triggered readiness of the tap, only while the guest has buffers to fill.
    fn watch_tap(&mut self, epoll: &Epoll, want: bool) {
        if self.tap_watched == want {
            return;
        }
        let events = if want {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        match epoll.ctl(
            ControlOperation::Modify,
            self.tap.as_raw_fd(),
            EpollEvent::new(events, TOKEN_TAP),
        ) {
            Ok(()) => self.tap_watched = want,
            Err(e) => log::error!("virtio-net: epoll on the tap: {e}"),
        }
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if self.warned < MAX_WARNINGS {
            self.warned += 1;
            log::warn!("virtio-net: {what} (frame dropped)");
            if self.warned == MAX_WARNINGS {
                log::warn!("virtio-net: further dropped frames are only counted");
            }
        }
    }

    /// Sends every chain the driver made available, one frame at a time, until it pauses.
    fn transmit(&mut self) {
        let queue = self.tx.queue.clone();
        let mut queue = lock(&queue);
        let memory = self.memory.clone();
        let mem = memory.as_ref();
        let mut returned = 0;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                log::warn!("virtio-net: TX queue: {e:?}");
            }
            while self.control.running() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                self.send(chain);
                if let Err(e) = queue.add_used(mem, head, 0) {
                    log::warn!("virtio-net: returning TX chain {head}: {e:?}");
                }
                returned += 1;
            }
            if !self.control.running() {
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-net: TX queue: {e:?}");
                    break;
                }
            }
        }
        if returned > 0 && queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.notify_queue(TX);
        }
    }

    /// Writes one TX chain to the tap, or drops and counts it.
    fn send(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) {
        let mem = self.memory.clone();
        let mut iovecs: Vec<libc::iovec> = Vec::new();
        let mut len = 0usize;
        let mut cut = false;
        for desc in chain {
            if desc.is_write_only() {
                self.drop_tx(format_args!("a TX descriptor is device-writable"));
                return;
            }
            len += desc.len() as usize;
            if len > MAX_TX_CHAIN {
                self.drop_tx(format_args!("a TX chain is over {MAX_TX_CHAIN} bytes"));
                return;
            }
            if !guest_iovecs(
                mem.as_ref(),
                desc.addr(),
                desc.len() as usize,
                &mut iovecs,
                false,
            ) {
                self.drop_tx(format_args!(
                    "a TX descriptor ({:#x}+{:#x}) is outside guest RAM",
                    desc.addr().0,
                    desc.len()
                ));
                return;
            }
            cut = desc.has_next();
        }
        if cut {
            self.drop_tx(format_args!("a TX chain loops or points outside the queue"));
            return;
        }
        if len < VNET_HDR_LEN || iovecs.len() > MAX_IOVECS {
            self.drop_tx(format_args!(
                "a TX chain of {len} bytes in {} pieces is not a frame",
                iovecs.len()
            ));
            return;
        }
        // Every iovec points into guest RAM mapped by `mem`, which is alive for the call.
        // SAFETY: so writev only reads memory that is valid for the call.
        let n = unsafe {
            libc::writev(
                self.tap.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            self.drop_tx(format_args!("writing to the tap: {e}"));
            return;
        }
        NetCounters::add(&self.counters.tx_frames, 1);
        NetCounters::add(&self.counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
    }

    fn drop_tx(&mut self, why: std::fmt::Arguments<'_>) {
        NetCounters::add(&self.counters.tx_dropped, 1);
        self.warn(why);
    }

    /// Moves frames from the tap into the guest's buffers until the tap is empty, the guest
    /// has no buffers, or the device pauses. Returns whether the tap should be watched.
    fn receive(&mut self) -> bool {
        let queue = self.rx.queue.clone();
        let mut queue = lock(&queue);
        let memory = self.memory.clone();
        let mem = memory.as_ref();
        let mut used_before = queue.next_used();
        let mut watch = true;
        let mut batch = 0;
        while self.control.running() {
            match self.receive_frame(&mut queue) {
                RxOutcome::Frame => {
                    // One interrupt per batch (if the driver wants one, EVENT_IDX says), so
                    // a long burst does not keep the guest waiting for the first frames.
                    batch += 1;
                    if batch == RX_BATCH {
                        batch = 0;
                        if queue.next_used() != used_before {
                            used_before = queue.next_used();
                            if queue.needs_notification(mem).unwrap_or(true) {
                                self.interrupt.notify_queue(RX);
                            }
                        }
                    }
                }
                RxOutcome::TapEmpty => break,
                RxOutcome::NoBuffers => {
                    // Ask for a notification when buffers come; one may have raced in.
                    match queue.enable_notification(mem) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => log::warn!("virtio-net: RX queue: {e:?}"),
                    }
                    watch = false;
                    break;
                }
            }
        }
        if queue.next_used() != used_before && queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.notify_queue(RX);
        }
        watch && self.control.running()
    }

    /// Takes buffers for one frame, reads the frame into them, returns the used ones and puts
    /// the others back.
    fn receive_frame(&mut self, queue: &mut Queue) -> RxOutcome {
        let memory = self.memory.clone();
        let mem = memory.as_ref();
        let mut buffers: Vec<RxBuffer> = Vec::new();
        let mut base = queue.next_avail();
        let mut capacity = 0usize;
        while capacity < self.rx_frame_max {
            let before = queue.next_avail();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match rx_buffer(mem, chain) {
                Ok(b) => {
                    if buffers.is_empty() {
                        base = before;
                    }
                    capacity += b.len;
                    buffers.push(b);
                }
                Err(why) if buffers.is_empty() => {
                    // Unusable: returned empty at once.
                    NetCounters::add(&self.counters.rx_dropped, 1);
                    self.warn(format_args!("{why}"));
                    if let Err(e) = queue.add_used(mem, head, 0) {
                        log::warn!("virtio-net: returning RX chain {head}: {e:?}");
                    }
                    base = queue.next_avail();
                    continue;
                }
                Err(_) => {
                    // Handled first next time.
                    queue.set_next_avail(before);
                    break;
                }
            }
            if !self.mrg_rxbuf {
                break;
            }
        }
        if buffers.is_empty() {
            return RxOutcome::NoBuffers;
        }
        let mut iovecs: Vec<libc::iovec> = Vec::new();
        for b in &buffers {
            for &(addr, len) in &b.ranges {
                // Checked by rx_buffer.
                guest_iovecs(mem, addr, len, &mut iovecs, true);
            }
        }
        iovecs.truncate(MAX_IOVECS - 1);
        let placeable: usize = iovecs.iter().map(|v| v.iov_len).sum();
        // One byte past the buffers tells a frame that did not fit.
        let mut overflow = [0u8; 1];
        iovecs.push(libc::iovec {
            iov_base: overflow.as_mut_ptr().cast(),
            iov_len: overflow.len(),
        });
        // Every iovec points into guest RAM mapped by `mem` (alive for the call), at buffers
        // the driver gave the device to write, or at `overflow`.
        // SAFETY: so readv only writes memory that is valid for the call and ours to write.
        let n = unsafe {
            libc::readv(
                self.tap.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        if n < 0 {
            queue.set_next_avail(base);
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                log::warn!("virtio-net: reading the tap: {e}");
            }
            return RxOutcome::TapEmpty;
        }
        let n = n as usize;
        if n > placeable || n < VNET_HDR_LEN {
            queue.set_next_avail(base);
            NetCounters::add(&self.counters.rx_dropped, 1);
            self.warn(format_args!(
                "a received frame of {n} bytes does not fit the {placeable} bytes of buffers"
            ));
            return RxOutcome::Frame;
        }
        // How many buffers the frame spans.
        let mut left = n;
        let mut spans = Vec::new();
        for b in &buffers {
            if left == 0 {
                break;
            }
            let take = left.min(b.len);
            spans.push((b.head, take));
            left -= take;
        }
        let count = spans.len() as u16;
        write_at(
            mem,
            &buffers[0].ranges,
            NUM_BUFFERS_OFFSET,
            &count.to_le_bytes(),
        );
        for (head, len) in &spans {
            if let Err(e) = queue.add_used(mem, *head, *len as u32) {
                log::warn!("virtio-net: returning RX chain {head}: {e:?}");
            }
        }
        queue.set_next_avail(base.wrapping_add(count));
        NetCounters::add(&self.counters.rx_frames, 1);
        NetCounters::add(&self.counters.rx_bytes, (n - VNET_HDR_LEN) as u64);
        RxOutcome::Frame
    }
}

/// The writable ranges of an RX chain, or why it cannot be used.
fn rx_buffer(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<RxBuffer, String> {
    let head = chain.head_index();
    let mut ranges = Vec::new();
    let mut len = 0usize;
    let mut cut = false;
    for desc in chain {
        if !desc.is_write_only() {
            return Err(format!("RX chain {head} has a device-readable descriptor"));
        }
        let l = desc.len() as usize;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), l) {
            return Err(format!(
                "RX chain {head}: descriptor {:#x}+{l:#x} is outside guest RAM",
                desc.addr().0
            ));
        }
        len += l;
        ranges.push((desc.addr(), l));
        cut = desc.has_next();
    }
    if cut {
        return Err(format!("RX chain {head} loops or points outside the queue"));
    }
    if len < VNET_HDR_LEN {
        return Err(format!(
            "RX chain {head} has {len} bytes, less than a header"
        ));
    }
    Ok(RxBuffer { head, ranges, len })
}

/// Appends iovecs for `len` bytes of guest RAM at `addr` (more than one when the range spans
/// memory regions). False when any of it is outside RAM.
fn guest_iovecs(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    out: &mut Vec<libc::iovec>,
    writable: bool,
) -> bool {
    let mut pushed = 0usize;
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let Ok(slice) = slice else {
            return false;
        };
        let ptr = if writable {
            slice.ptr_guard_mut().as_ptr()
        } else {
            slice.ptr_guard().as_ptr() as *mut u8
        };
        out.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: slice.len(),
        });
        pushed += slice.len();
    }
    pushed == len
}

/// Writes `bytes` at `offset` into a buffer made of `ranges`.
fn write_at(mem: &GuestMemoryMmap, ranges: &[(GuestAddress, usize)], offset: usize, bytes: &[u8]) {
    let mut skip = offset;
    let mut data = bytes;
    for &(addr, len) in ranges {
        if data.is_empty() {
            return;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(data.len());
        let _ = mem.write_slice(&data[..n], GuestAddress(addr.0 + skip as u64));
        data = &data[n..];
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupts::GsiRouter;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const BUF: u64 = 0x10_0000;
    const OUTSIDE_RAM: u64 = 0x4000_0000;

    /// A device's I/O side over a SOCK_SEQPACKET pair standing in for the tap (one message
    /// per frame, like a tap); `peer` is the host's end.
    struct Rig {
        memory: Arc<GuestMemoryMmap>,
        _router: Arc<GsiRouter>,
        interrupt: Arc<VirtioInterrupt>,
        peer: OwnedFd,
        tap: Arc<OwnedFd>,
        counters: Arc<NetCounters>,
    }

    impl Rig {
        fn new() -> Self {
            let memory =
                Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
            let (router, interrupt) = VirtioInterrupt::for_tests(2);
            let (tap, peer) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            )
            .unwrap();
            Rig {
                memory,
                _router: router,
                interrupt,
                peer,
                tap: Arc::new(tap),
                counters: Arc::default(),
            }
        }

        /// The I/O side over `rx` and `tx`, running (no thread: the tests call it).
        fn io(&self, rx: Queue, tx: Queue, mrg_rxbuf: bool) -> NetIo {
            let control = Arc::new(Control::new_running());
            let q = |queue| QueueIo {
                queue: Arc::new(Mutex::new(queue)),
                notify: Arc::new(EventFd::new(0).unwrap()),
            };
            NetIo {
                rx: q(rx),
                tx: q(tx),
                memory: self.memory.clone(),
                interrupt: self.interrupt.clone(),
                tap: self.tap.clone(),
                counters: self.counters.clone(),
                control,
                mrg_rxbuf,
                rx_frame_max: VNET_HDR_LEN + MAX_FRAME,
                warned: 0,
                tap_watched: false,
                resumed: false,
                name: "virtio-net test".into(),
            }
        }

        /// What the host end received (frames, in order).
        fn host_frames(&self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 128 << 10];
            while let Ok(n) = nix::unistd::read(&self.peer, &mut buf) {
                out.push(buf[..n].to_vec());
            }
            out
        }

        fn host_send(&self, frame: &[u8]) {
            assert_eq!(nix::unistd::write(&self.peer, frame).unwrap(), frame.len());
        }

        fn stats(&self) -> NetStats {
            self.counters.snapshot()
        }
    }

    /// Descriptors for chains of (addr, len, flags); NEXT is set on all but each chain's last.
    fn chains(first: u16, list: &[Vec<(u64, u32, u16)>]) -> Vec<RawDescriptor> {
        let mut descs = Vec::new();
        for chain in list {
            let start = first + descs.len() as u16;
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let flags = if last { flags } else { flags | NEXT };
                let next = if last { 0 } else { start + i as u16 + 1 };
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    addr, len, flags, next,
                )));
            }
        }
        descs
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        f
    }

    fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let u = mock.used();
        (0..u.idx().load())
            .map(|i| {
                let e = u.ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    #[test]
    fn a_sent_frame_reaches_the_tap_once() {
        let rig = Rig::new();
        let f = frame(60, 1);
        rig.memory.write_slice(&f, GuestAddress(BUF)).unwrap();
        let rx = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let tx = MockSplitQueue::create(rig.memory.as_ref(), GuestAddress(0x8000), 16);
        // Header and frame in two descriptors.
        tx.add_desc_chains(&chains(0, &[vec![(BUF, 12, 0), (BUF + 12, 60, 0)]]), 0)
            .unwrap();
        let mut io = rig.io(rx.create_queue().unwrap(), tx.create_queue().unwrap(), true);
        io.transmit();
        io.transmit();
        assert_eq!(rig.host_frames(), [f]);
        assert_eq!(used(&tx), [(0, 0)]);
        assert_eq!(rig.stats().tx_frames, 1);
        assert_eq!(rig.stats().tx_bytes, 60);
    }

    #[test]
    fn a_received_frame_fills_merged_buffers_and_leaves_the_rest() {
        let rig = Rig::new();
        let rx = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let tx = MockSplitQueue::create(rig.memory.as_ref(), GuestAddress(0x8000), 16);
        rx.add_desc_chains(
            &chains(
                0,
                &[
                    vec![(BUF, 1000, WRITE)],
                    vec![(BUF + 0x1000, 1000, WRITE)],
                    vec![(BUF + 0x2000, 1000, WRITE)],
                ],
            ),
            0,
        )
        .unwrap();
        let mut io = rig.io(rx.create_queue().unwrap(), tx.create_queue().unwrap(), true);
        let big = frame(1988, 3);
        rig.host_send(&big);
        assert!(
            io.receive(),
            "the tap stays watched while there are buffers"
        );
        assert_eq!(used(&rx), [(0, 1000), (1, 1000)]);
        let mut got = vec![0u8; 2000];
        rig.memory
            .read_slice(&mut got[..1000], GuestAddress(BUF))
            .unwrap();
        rig.memory
            .read_slice(&mut got[1000..], GuestAddress(BUF + 0x1000))
            .unwrap();
        let num_buffers = u16::from_le_bytes([got[10], got[11]]);
        assert_eq!(num_buffers, 2);
        assert_eq!(got[12..], big[12..]);
        // The third buffer went back to the ring and takes the next frame.
        let small = frame(50, 9);
        rig.host_send(&small);
        io.receive();
        assert_eq!(used(&rx)[2], (2, 62));
        let mut got = vec![0u8; 62];
        rig.memory
            .read_slice(&mut got, GuestAddress(BUF + 0x2000))
            .unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(got[12..], small[12..]);
        assert_eq!(rig.stats().rx_frames, 2);
        // No buffers left: the frame waits in the tap, and the tap is not watched.
        rig.host_send(&small);
        assert!(!io.receive());
        assert_eq!(used(&rx).len(), 3);
        rx.add_desc_chains(&chains(3, &[vec![(BUF + 0x3000, 1000, WRITE)]]), 3)
            .unwrap();
        assert!(!io.receive(), "the last buffer is used again");
        assert_eq!(used(&rx)[3], (3, 62), "the waiting frame is delivered");
    }

    #[test]
    fn a_frame_larger_than_the_buffers_is_dropped_and_the_device_goes_on() {
        let rig = Rig::new();
        let rx = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let tx = MockSplitQueue::create(rig.memory.as_ref(), GuestAddress(0x8000), 16);
        rx.add_desc_chains(&chains(0, &[vec![(BUF, 100, WRITE)]]), 0)
            .unwrap();
        // Without MRG_RXBUF one buffer per frame.
        let mut io = rig.io(
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            false,
        );
        rig.host_send(&frame(500, 1));
        let small = frame(40, 2);
        rig.host_send(&small);
        io.receive();
        assert_eq!(rig.stats().rx_dropped, 1);
        assert_eq!(used(&rx), [(0, 52)], "the buffer took the next frame");
        let mut got = vec![0u8; 52];
        rig.memory.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got[12..], small[12..]);
    }

    #[test]
    fn unusable_receive_buffers_are_returned_empty() {
        let rig = Rig::new();
        let rx = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let tx = MockSplitQueue::create(rig.memory.as_ref(), GuestAddress(0x8000), 16);
        let mut descs = chains(0, &[vec![(OUTSIDE_RAM, 2000, WRITE)], vec![(BUF, 2000, 0)]]);
        // A loop: 2 -> 3 -> 2.
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            BUF,
            100,
            WRITE | NEXT,
            3,
        )));
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            BUF,
            100,
            WRITE | NEXT,
            2,
        )));
        rx.add_desc_chains(&descs, 0).unwrap();
        rx.add_desc_chains(&chains(4, &[vec![(BUF + 0x1000, 2000, WRITE)]]), 4)
            .unwrap();
        let mut io = rig.io(rx.create_queue().unwrap(), tx.create_queue().unwrap(), true);
        let f = frame(100, 5);
        rig.host_send(&f);
        io.receive();
        assert_eq!(used(&rx), [(0, 0), (1, 0), (2, 0), (4, 112)]);
        assert_eq!(rig.stats().rx_dropped, 3);
        assert_eq!(rig.stats().rx_frames, 1);
    }

    /// Queues the chain(s) `bad` (descriptor table from index 0), then a good frame: the bad
    /// one is returned, dropped and counted, the good one sent.
    fn assert_tx_drops_then_sends(bad: &[RawDescriptor]) {
        let rig = Rig::new();
        let rx = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let tx = MockSplitQueue::create(rig.memory.as_ref(), GuestAddress(0x8000), 16);
        let good = frame(60, 4);
        rig.memory.write_slice(&good, GuestAddress(BUF)).unwrap();
        tx.add_desc_chains(bad, 0).unwrap();
        let next = bad.len() as u16;
        let good_chain = chains(next, &[vec![(BUF, good.len() as u32, 0)]]);
        tx.add_desc_chains(&good_chain, next).unwrap();
        let mut io = rig.io(rx.create_queue().unwrap(), tx.create_queue().unwrap(), true);
        io.transmit();
        assert_eq!(rig.host_frames(), [good]);
        assert_eq!(rig.stats().tx_dropped, 1);
        assert_eq!(rig.stats().tx_frames, 1);
        assert_eq!(used(&tx).len(), 2, "both chains are returned");
    }

    #[test]
    fn a_frame_outside_guest_ram_is_dropped_and_the_device_goes_on() {
        assert_tx_drops_then_sends(&chains(0, &[vec![(BUF, 12, 0), (OUTSIDE_RAM, 60, 0)]]));
    }

    #[test]
    fn a_descriptor_loop_is_dropped_and_the_device_goes_on() {
        assert_tx_drops_then_sends(&[
            RawDescriptor::from(SplitDescriptor::new(BUF, 42, NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(BUF, 42, NEXT, 0)),
        ]);
    }

    #[test]
    fn an_oversized_frame_is_dropped_and_the_device_goes_on() {
        // 80 KiB: over 64 KiB + header.
        assert_tx_drops_then_sends(&chains(0, &[vec![(BUF, 40 << 10, 0), (BUF, 40 << 10, 0)]]));
    }

    #[test]
    fn a_device_writable_transmit_buffer_is_dropped_and_the_device_goes_on() {
        assert_tx_drops_then_sends(&chains(0, &[vec![(BUF, 72, WRITE)]]));
    }

    #[test]
    fn a_pause_waits_for_the_thread_and_stops_it_taking_frames() {
        let rig = Rig::new();
        let rx = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let tx = MockSplitQueue::create(rig.memory.as_ref(), GuestAddress(0x8000), 16);
        let mut io = rig.io(rx.create_queue().unwrap(), tx.create_queue().unwrap(), true);
        let control = Arc::new(Control::new().unwrap());
        io.control = control.clone();
        let tx_queue = io.tx.queue.clone();
        let tx_notify = io.tx.notify.clone();
        let worker = Worker::spawn("net-test".into(), control.clone(), io).unwrap();
        worker.pause();
        // Paused: a chain the guest queues now is left in the ring.
        let f = frame(20, 8);
        rig.memory.write_slice(&f, GuestAddress(BUF)).unwrap();
        tx.add_desc_chains(&chains(0, &[vec![(BUF, 32, 0)]]), 0)
            .unwrap();
        tx_notify.write(1).unwrap();
        worker.pause();
        assert_eq!(lock(&tx_queue).next_avail(), 0);
        assert!(rig.host_frames().is_empty());
        // Resumed: it is sent, without another notification.
        worker.resume();
        let mut frames = Vec::new();
        while frames.is_empty() {
            std::thread::yield_now();
            frames = rig.host_frames();
        }
        assert_eq!(frames, [f]);
        drop(worker);
        control.pause();
    }

    #[test]
    fn a_resume_raises_the_interrupts_a_live_update_may_have_lost() {
        let rig = Rig::new();
        let rx = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let tx = MockSplitQueue::create(rig.memory.as_ref(), GuestAddress(0x8000), 16);
        let f = frame(20, 8);
        rig.memory.write_slice(&f, GuestAddress(BUF)).unwrap();
        tx.add_desc_chains(&chains(0, &[vec![(BUF, 32, 0)]]), 0)
            .unwrap();
        let mut io = rig.io(rx.create_queue().unwrap(), tx.create_queue().unwrap(), true);
        // The old VMM used the chain; its interrupt went to a VM that is gone.
        io.transmit();
        assert_eq!(rig.host_frames(), [f]);
        assert_ne!(rig.interrupt.take_isr(), 0);
        // The new VMM's thread starts paused and is resumed with nothing new to do.
        let control = Arc::new(Control::new().unwrap());
        io.control = control.clone();
        let worker = Worker::spawn("net-test".into(), control, io).unwrap();
        worker.pause();
        assert_eq!(rig.interrupt.take_isr(), 0, "no interrupt while paused");
        worker.resume();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut isr = 0;
        while isr == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            isr = rig.interrupt.take_isr();
        }
        assert_ne!(isr, 0, "the resume raised the queue interrupt again");
        drop(worker);
        assert!(rig.host_frames().is_empty(), "nothing was sent twice");
    }

    /// A real tap, up, without IPv6 (so the kernel sends nothing of its own into it), and an
    /// AF_PACKET socket on it for the host's side. None where taps cannot be made.
    fn real_tap() -> Option<(Tap, OwnedFd)> {
        let name = format!("cprn{}", std::process::id() % 100_000);
        let tap = Tap::open_named(&name).ok()?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "dev", &name, "up"])
            .status()
            .ok()?;
        if !up.success() {
            return None;
        }
        let cname = std::ffi::CString::new(name.as_str()).ok()?;
        // SAFETY: if_nametoindex reads a NUL-terminated string alive for the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return None;
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by socket(2) and has no other owner.
        let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind reads a sockaddr_ll of the given size, alive for the call.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        (rc == 0).then_some((tap, sock))
    }

    const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

    /// A broadcast frame of `len` bytes with the test's ethertype.
    fn ethernet(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        f.extend(ETHERTYPE);
        f.extend((14..len).map(|i| (i as u8).wrapping_add(seed)));
        f
    }

    #[test]
    fn frames_cross_a_real_tap_with_the_vnet_header_and_oversized_ones_are_caught() {
        let Some((tap, sock)) = real_tap() else {
            eprintln!("skipped: cannot make a tap here");
            return;
        };
        let mut rig = Rig::new();
        rig.tap = Arc::new(tap.into_fd());
        // TX: header + frame from guest memory reach the interface as the frame alone.
        let out = ethernet(60, 1);
        let mut chain = vec![0u8; VNET_HDR_LEN];
        chain.extend(&out);
        rig.memory.write_slice(&chain, GuestAddress(BUF)).unwrap();
        let rx = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let tx = MockSplitQueue::create(rig.memory.as_ref(), GuestAddress(0x8000), 16);
        tx.add_desc_chains(&chains(0, &[vec![(BUF, chain.len() as u32, 0)]]), 0)
            .unwrap();
        // One 200-byte buffer, then one of 2000 (no merging).
        rx.add_desc_chains(
            &chains(
                0,
                &[
                    vec![(BUF + 0x1000, 200, WRITE)],
                    vec![(BUF + 0x2000, 2000, WRITE)],
                ],
            ),
            0,
        )
        .unwrap();
        let mut io = rig.io(
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            false,
        );
        io.transmit();
        let mut buf = vec![0u8; 4096];
        let seen = loop {
            let n = nix::unistd::read(&sock, &mut buf).unwrap();
            if buf[12..14] == ETHERTYPE {
                break buf[..n].to_vec();
            }
        };
        assert_eq!(seen, out);
        // RX: a 1000-byte frame does not fit the 200-byte buffer: dropped, the buffer kept;
        // the next frame lands in it with its vnet header.
        let big = ethernet(1000, 2);
        let small = ethernet(100, 3);
        for f in [&big, &small] {
            assert_eq!(nix::unistd::write(&sock, f).unwrap(), f.len());
        }
        while io.receive() && rig.stats().rx_frames == 0 {
            std::thread::yield_now();
        }
        assert_eq!(rig.stats().rx_dropped, 1);
        assert_eq!(used(&rx), [(0, (VNET_HDR_LEN + 100) as u32)]);
        let mut got = vec![0u8; VNET_HDR_LEN + 100];
        rig.memory
            .read_slice(&mut got, GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(got[VNET_HDR_LEN..], small[..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    }

    #[test]
    fn the_tap_takes_only_the_offloads_the_guest_negotiated() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(Net::offloads_for(0), 0);
        assert_eq!(
            Net::offloads_for(bit(F_GUEST_TSO4)),
            0,
            "TSO needs GUEST_CSUM"
        );
        assert_eq!(Net::offloads_for(bit(F_GUEST_CSUM)), libc::TUN_F_CSUM);
        assert_eq!(
            Net::offloads_for(bit(F_GUEST_CSUM) | bit(F_GUEST_TSO4) | bit(F_GUEST_UFO)),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_UFO
        );
    }

    #[test]
    fn a_restore_takes_the_same_tap_or_refuses() {
        use crate::devices::HandedOverFds;
        let pid = std::process::id() % 100_000;
        let config = |name: &str, mac: [u8; 6]| NetConfig {
            netdev: "n0".into(),
            device_id: "net0".into(),
            source: TapSource::Ifname(name.into()),
            mac,
        };
        let (a, b) = (format!("cpra{pid}"), format!("cprb{pid}"));
        let (Ok(tap_a), Ok(tap_b)) = (Tap::open_named(&a), Tap::open_named(&b)) else {
            eprintln!("skipped: cannot make taps here");
            return;
        };
        let net = Net::with_tap(config(&a, DEFAULT_MAC), tap_a);
        let mut config_space = [0u8; 8];
        net.read_config(0, &mut config_space);
        assert_eq!(config_space[..6], DEFAULT_MAC);
        assert_eq!(
            u16::from_le_bytes([config_space[6], config_space[7]]),
            S_LINK_UP
        );
        let features = net.device_features();
        for f in [
            F_MAC,
            F_STATUS,
            F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
            F_CSUM,
        ] {
            assert_ne!(features & (1 << f), 0, "feature {f}");
        }
        let saved = net.save();
        assert_eq!(saved.ifname, a);
        let rig = Rig::new();
        let test_context = crate::devices::TestContext::new();
        let make_ctx = |host_fds| test_context.context(rig.memory.clone(), host_fds);
        let handed =
            |fd: &OwnedFd| HandedOverFds::new(vec![("netdev:n0".into(), fd.try_clone().unwrap())]);
        // The same tap, handed over: taken as it is.
        let mut ctx = make_ctx(handed(&net.tap));
        let restored = Net::restore(&mut ctx, &config(&a, DEFAULT_MAC), &saved).unwrap();
        assert_eq!(restored.ifname(), a);
        // Another tap behind the fd: refused, naming both.
        let other = tap_b.into_fd();
        let mut ctx = make_ctx(handed(&other));
        let e = Net::restore(&mut ctx, &config(&a, DEFAULT_MAC), &saved)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains(&a) && e.to_string().contains(&b),
            "{e}"
        );
        // A live update that lost the fd fails instead of opening the tap by name.
        let mut ctx = make_ctx(HandedOverFds::new(Vec::new()));
        assert!(matches!(
            Net::restore(&mut ctx, &config(&a, DEFAULT_MAC), &saved),
            Err(DeviceError::MissingHostFd(_))
        ));
        // Another MAC on the command line than the saved device's: refused.
        let mut mac = DEFAULT_MAC;
        mac[5] = 0x99;
        let mut ctx = make_ctx(handed(&net.tap));
        let e = Net::restore(&mut ctx, &config(&a, mac), &saved)
            .err()
            .unwrap();
        assert!(e.to_string().contains("52:54:00:12:34:99"), "{e}");
    }
}
