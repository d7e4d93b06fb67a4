//! virtio-blk (virtio 1.x section 5.2): a raw disk image or block device as the guest's disk.
//!
//! Requests (one descriptor chain each; readable descriptors first, then writable ones):
//!
//! ```text
//! device-readable   type u32 | reserved u32 | sector u64     (16 bytes)
//!                   data (OUT: what to write; DISCARD/WRITE_ZEROES: 16-byte segments
//!                   sector u64 | num_sectors u32 | flags u32, flag bit 0 = unmap)
//! device-writable   data (IN: what was read; GET_ID: 20 bytes)
//!                   status u8                                 (last byte: OK 0, IOERR 1, UNSUPP 2)
//! ```
//!
//! Configuration space: `struct virtio_blk_config` (capacity in 512-byte sectors, seg_max,
//! blk_size, and the discard / write-zeroes limits when those are offered).
//!
//! One request queue, worked on an I/O thread woken by the queue's ioeventfd. Data moves straight
//! between the disk and guest RAM (iovecs over the chain's buffers), either
//! through io_uring (every request the driver made available is submitted at once, completions
//! come back in any order and each is put in the used ring as it arrives) or, where the host has
//! no io_uring or `aio=threads` asks for it, with preadv/pwritev one request at a time. A FLUSH
//! waits for every request submitted before it. Pausing the device waits until every submitted
//! request has completed and is in the used ring, so a saved device has nothing in flight and the
//! queue's ring positions are all the state it needs.
//!
//! Host caching is QEMU's `cache=` ([`CacheMode`]): through the page cache (`writeback`, the
//! default; `unsafe` also answers FLUSH without syncing), or around it with O_DIRECT (`none`,
//! `directsync`). O_DIRECT needs disk offsets, lengths and buffer addresses aligned as the host
//! says (statx's DIOALIGN, a block device's logical block size): a request
//! whose guest buffers are not goes through an aligned bounce buffer instead (QEMU does the
//! same), the others still go straight to guest RAM. Without a write cache (`writethrough`,
//! `directsync`) FLUSH is not offered and every write is RWF_DSYNC.
//!
//! A block device (raw disk, loop device) is sized with BLKGETSIZE64; DISCARD is BLKDISCARD
//! where its queue can discard, WRITE_ZEROES is BLKZEROOUT (zeroes guaranteed, never assumed
//! from a discard). An image file gets both through fallocate where its file system can.
//!
//! The disk is a host fd the device owns (a preserved fd in every migration mode): a live update
//! hands the very same open file to the next VMM, so a disk image renamed, replaced or unlinked
//! after start keeps being the guest's disk. Only a restore from a file in a new process opens
//! the path again.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use io_uring::{IoUring, opcode, squeue, types};
use nix::fcntl::{FallocateFlags, fallocate};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::virtio_blk_config;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use super::worker::{Control, IoHandler, Worker};
use super::{Activation, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::devices::{DeviceContext, DeviceError, HostFd, Persist, lock};

pub const VIRTIO_ID_BLOCK: u16 = 2;
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (the chain also has the header and status).
const SEG_MAX: u32 = 126;
/// Descriptors in one chain the device accepts (data segments, header and status).
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// The largest request accepted: a hostile driver cannot make the device allocate more.
const MAX_REQUEST_BYTES: usize = 4 << 20;
const ID_BYTES: usize = 20;
/// DISCARD / WRITE_ZEROES limits offered in the configuration space.
const MAX_ZEROING_SECTORS: u32 = 1 << 21;
const MAX_ZEROING_SEG: u32 = 32;
/// A hint for the driver (4 KiB, a host page): discards are accepted at any sector.
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
const ZEROING_SEGMENT_BYTES: usize = 16;

const F_SEG_MAX: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_SEG_MAX;
const F_RO: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
const F_BLK_SIZE: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_BLK_SIZE;
const F_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
const F_DISCARD: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_DISCARD;
const F_WRITE_ZEROES: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES;
const F_INDIRECT_DESC: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

const T_IN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
const T_OUT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;
const FLAG_UNMAP: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
const S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Where a disk image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    Path(PathBuf),
    /// An fd the management layer opened and passed (`-add-fd fd=N` + `file=/dev/fdset/S`).
    Fd(RawFd),
}

impl std::fmt::Display for DiskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSource::Path(p) => write!(f, "{}", p.display()),
            DiskSource::Fd(fd) => write!(f, "fd {fd}"),
        }
    }
}

/// How requests reach the host kernel: QEMU's `-drive aio=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioMode {
    /// No `aio=`: preadv/pwritev, measured the faster path here (see README: with the page
    /// cache in the way, io_uring hands buffered writes to kernel workers and loses; reads are
    /// equal). QEMU's default is `aio=threads` too.
    #[default]
    Auto,
    /// `aio=threads`: preadv/pwritev on the disk's I/O thread, one request at a time.
    Threads,
    /// `aio=io_uring` (and `aio=native`, Linux AIO's successor here): io_uring, or preadv/pwritev
    /// with a warning if the host refuses it.
    IoUring,
}

impl AioMode {
    /// The `aio=` value, if it is one QEMU knows.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "threads" => Some(AioMode::Threads),
            "io_uring" | "native" => Some(AioMode::IoUring),
            _ => None,
        }
    }
}

/// The host cache policy of a disk, QEMU's `cache=` and its parts (`cache.direct`,
/// `cache.no-flush`, and the write cache the guest sees).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheMode {
    /// `cache.direct=on`: the image is opened with O_DIRECT, around the host page cache.
    pub direct: bool,
    /// `cache.no-flush=on`: a FLUSH succeeds without reaching the disk (`cache=unsafe`).
    pub no_flush: bool,
    /// The guest sees a volatile write cache (FLUSH is offered). Off (`writethrough`,
    /// `directsync`): every write is durable when it completes (RWF_DSYNC) and FLUSH is not
    /// offered, as QEMU does.
    pub writeback: bool,
}

impl Default for CacheMode {
    /// `cache=writeback`, QEMU's default.
    fn default() -> Self {
        CacheMode {
            direct: false,
            no_flush: false,
            writeback: true,
        }
    }
}

impl CacheMode {
    /// A `cache=` value as QEMU defines them.
    pub fn parse(value: &str) -> Option<Self> {
        let (direct, no_flush, writeback) = match value {
            "writeback" => (false, false, true),
            "none" => (true, false, true),
            "writethrough" => (false, false, false),
            "directsync" => (true, false, false),
            "unsafe" => (false, true, true),
            _ => return None,
        };
        Some(CacheMode {
            direct,
            no_flush,
            writeback,
        })
    }
}

/// A disk as the command line describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive's id (`-drive id=`, `-blockdev node-name=`): names its host fd.
    pub id: String,
    /// Where the image is, for a power-on or a restore from a file in a new process.
    pub source: DiskSource,
    pub read_only: bool,
    /// What GET_ID answers (at most 20 bytes).
    pub serial: String,
    /// `format=raw` was given; without it the image is probed when checked at start.
    pub format_stated: bool,
    /// `aio=`: which I/O path the disk's requests take.
    pub aio: AioMode,
    /// `cache=`: how the host caches the image.
    pub cache: CacheMode,
}

impl BlockConfig {
    fn host_fd_name(&self) -> String {
        format!("drive:{}", self.id)
    }

    /// Opens the image (a path with the access the disk needs, with O_DIRECT for
    /// `cache.direct=on` as QEMU does; a passed fd as a duplicate, close-on-exec, so the fd set
    /// keeps its own, switched to O_DIRECT as asked) and checks that it is usable as the cache
    /// mode asks.
    pub fn open_for_check(&self) -> Result<File, OpenError> {
        let file = match &self.source {
            DiskSource::Path(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(!self.read_only)
                    .custom_flags(if self.cache.direct { libc::O_DIRECT } else { 0 })
                    .open(p)
                    .map_err(|e| self.open_error(e))?
            }
            DiskSource::Fd(fd) => {
                // The -add-fd check found it open, and nothing in this process closes it.
                // SAFETY: the fd is open for the duration of this borrow (see above).
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                borrowed
                    .try_clone_to_owned()
                    .map(File::from)
                    .map_err(OpenError::Io)?
            }
        };
        set_direct(&file, self.cache.direct).map_err(|e| self.open_error(e))?;
        Ok(file)
    }

    /// O_DIRECT refused (EINVAL) is named as the option that asked for it.
    fn open_error(&self, e: std::io::Error) -> OpenError {
        if self.cache.direct && e.raw_os_error() == Some(libc::EINVAL) {
            OpenError::NoDirect
        } else {
            OpenError::Io(e)
        }
    }

    fn open(&self) -> Result<File, DeviceError> {
        self.open_for_check()
            .map_err(|e| DeviceError::Setup(format!("drive '{}': {}: {e}", self.id, self.source)))
    }
}

/// Why a disk image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "its file system does not support O_DIRECT, which cache=none, cache=directsync and \
         cache.direct=on need (use cache=writeback, or put the image on a file system with \
         direct I/O such as ext4 or xfs)"
    )]
    NoDirect,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Turns O_DIRECT on or off on an open file (a passed fd, or a disk a live update handed over
/// under another command line).
fn set_direct(file: &File, direct: bool) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    if flags.contains(OFlag::O_DIRECT) != direct {
        fcntl(file, FcntlArg::F_SETFL(flags ^ OFlag::O_DIRECT))?;
    }
    Ok(())
}

/// What a saved disk was, so that a restore onto another disk is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8 bytes), any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// The I/O path a disk uses, once the host has been asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPath {
    /// preadv/pwritev, one request at a time.
    Sync,
    /// io_uring, every available request in flight at once.
    Uring,
}

impl std::fmt::Display for IoPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoPath::Sync => "threads (preadv/pwritev)",
            IoPath::Uring => "io_uring",
        })
    }
}

/// Picks the I/O path `aio` asks for that the host can give.
fn choose_io_path(id: &str, aio: AioMode) -> IoPath {
    match aio {
        AioMode::Threads | AioMode::Auto => IoPath::Sync,
        AioMode::IoUring => match IoUring::new(4) {
            Ok(_) => IoPath::Uring,
            Err(e) => {
                log::warn!(
                    "virtio-blk {id}: io_uring is not available ({e}); using preadv/pwritev"
                );
                IoPath::Sync
            }
        },
    }
}

/// What the image's file system, or the block device, can do to zero a range, found by
/// asking it at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Zeroing {
    /// `FALLOC_FL_PUNCH_HOLE`: DISCARD, and WRITE_ZEROES with unmap.
    punch_hole: bool,
    /// `FALLOC_FL_ZERO_RANGE`: WRITE_ZEROES that keeps the blocks allocated.
    zero_range: bool,
    /// A block device that discards (its queue's `discard_max_bytes` is not 0): DISCARD
    /// through BLKDISCARD.
    blk_discard: bool,
    /// A block device: WRITE_ZEROES (with or without unmap) through BLKZEROOUT, which
    /// guarantees zeroes whatever the device does with discarded blocks.
    blk_zeroout: bool,
}

vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
vmm_sys_util::ioctl_io_nr!(BLKDISCARD, 0x12, 119);
vmm_sys_util::ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

impl Zeroing {
    /// Asks the file system past the end of the image (nothing the guest sees changes), or
    /// the block device's queue limits in sysfs. Read-only disks get nothing.
    fn probe(disk: &File, len: u64, read_only: bool) -> Self {
        let Ok(meta) = disk.metadata() else {
            return Zeroing::default();
        };
        if read_only {
            return Zeroing::default();
        }
        if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            use std::os::unix::fs::MetadataExt;
            return Zeroing {
                blk_discard: discard_max_bytes(meta.rdev()).is_some_and(|n| n > 0),
                blk_zeroout: true,
                ..Zeroing::default()
            };
        }
        if !meta.is_file() {
            return Zeroing::default();
        }
        let at = len.next_multiple_of(4096) as i64;
        let punch = |at| {
            fallocate(
                disk,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                at,
                4096,
            )
            .is_ok()
        };
        let punch_hole = punch(at);
        let zero_range = fallocate(
            disk,
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            at,
            4096,
        )
        .is_ok();
        if zero_range && punch_hole {
            // Give back the block the probe may have allocated past the end.
            punch(at);
        }
        Zeroing {
            punch_hole,
            zero_range,
            ..Zeroing::default()
        }
    }

    fn discard(&self) -> bool {
        self.punch_hole || self.blk_discard
    }

    fn write_zeroes(&self) -> bool {
        self.punch_hole || self.zero_range || self.blk_zeroout
    }

    /// Zeroes (or, for a DISCARD, `discard`) `len` bytes at `at`; with `unmap`, the blocks may
    /// be given back.
    fn zero(&self, disk: &File, at: u64, len: u64, discard: bool, unmap: bool) -> bool {
        if self.blk_zeroout {
            let (request, range) = if discard {
                (BLKDISCARD(), [at, len])
            } else {
                (BLKZEROOUT(), [at, len])
            };
            // SAFETY: both ioctls read two u64s (start, length) through the pointer: `range`.
            return unsafe { ioctl_with_ref(disk, request, &range) } == 0;
        }
        let punch = discard || unmap || !self.zero_range;
        let mode = if punch && self.punch_hole {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        match (i64::try_from(at), i64::try_from(len)) {
            (Ok(at), Ok(len)) => fallocate(disk, mode, at, len).is_ok(),
            _ => false,
        }
    }
}

/// The block device `rdev`'s `queue/discard_max_bytes` (a partition's is its disk's).
fn discard_max_bytes(rdev: u64) -> Option<u64> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    [
        dev.join("queue/discard_max_bytes"),
        dev.join("../queue/discard_max_bytes"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|s| s.trim().parse().ok())
}

pub struct Block {
    config: BlockConfig,
    disk: Arc<File>,
    capacity_sectors: u64,
    io_path: IoPath,
    zeroing: Zeroing,
    /// With `cache.direct=on`: what O_DIRECT needs of requests on this disk.
    direct: Option<DirectAlign>,
    worker: Option<Worker>,
}

impl Block {
    fn with_disk(config: BlockConfig, disk: File) -> Result<Self, DeviceError> {
        let len = disk
            .metadata()
            .map(|m| m.len())
            .map_err(|e| DeviceError::Setup(format!("drive '{}': {e}", config.id)))?;
        let len = if len == 0 {
            block_device_size(&disk).unwrap_or(0)
        } else {
            len
        };
        let io_path = choose_io_path(&config.id, config.aio);
        let zeroing = Zeroing::probe(&disk, len, config.read_only);
        // A disk handed over by a live update keeps the open file's flags: make them what
        // this command line asks.
        set_direct(&disk, config.cache.direct).map_err(|e| {
            DeviceError::Setup(format!(
                "drive '{}': {}: {}",
                config.id,
                config.source,
                config.open_error(e)
            ))
        })?;
        let direct = config.cache.direct.then(|| DirectAlign::query(&disk));
        log::info!(
            "virtio-blk {}: {} ({} sectors{}), I/O through {io_path}{}{}{}",
            config.id,
            config.source,
            len / SECTOR_SIZE,
            if config.read_only { ", read-only" } else { "" },
            match direct {
                Some(a) => format!(
                    ", O_DIRECT (offsets and lengths in {} bytes, buffers at {})",
                    a.offset, a.memory
                ),
                None => String::new(),
            },
            if zeroing.discard() { ", discard" } else { "" },
            if zeroing.write_zeroes() {
                ", write-zeroes"
            } else {
                ""
            },
        );
        Ok(Block {
            capacity_sectors: len / SECTOR_SIZE,
            config,
            disk: Arc::new(disk),
            io_path,
            zeroing,
            direct,
            worker: None,
        })
    }

    /// Stops and joins the I/O thread (every request it submitted completes first).
    fn stop_worker(&mut self) {
        self.worker = None;
    }
}
/// A block device's size in bytes (BLKGETSIZE64); `None` for anything else.
fn block_device_size(file: &File) -> Option<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for that.
    let rc = unsafe { ioctl_with_mut_ref(file, BLKGETSIZE64(), &mut size) };
    (rc == 0).then_some(size)
}

impl Persist for Block {
    type State = BlockState;
    type Config = BlockConfig;

    /// Opens the image, or takes over the one the device had before a reset.
    fn power_on(ctx: &mut DeviceContext<'_>, config: &BlockConfig) -> Result<Self, DeviceError> {
        let disk = match ctx.take_host_fd(&config.host_fd_name()) {
            Some(fd) => File::from(fd),
            None => config.open()?,
        };
        Block::with_disk(config.clone(), disk)
    }

    fn save(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity_sectors,
            read_only: self.config.read_only,
        }
    }

    fn restore(
        ctx: &mut DeviceContext<'_>,
        config: &BlockConfig,
        state: &BlockState,
    ) -> Result<Self, DeviceError> {
        let name = config.host_fd_name();
        let disk = match ctx.take_host_fd(&name) {
            Some(fd) => File::from(fd),
            None if ctx.host_fds.preserved() => return Err(DeviceError::MissingHostFd(name)),
            None => config.open()?,
        };
        let block = Block::with_disk(config.clone(), disk)?;
        if block.capacity_sectors != state.capacity_sectors || config.read_only != state.read_only {
            return Err(DeviceError::InvalidState(format!(
                "drive '{}' is {} sectors{}, the saved disk was {} sectors{}",
                config.id,
                block.capacity_sectors,
                if config.read_only { " read-only" } else { "" },
                state.capacity_sectors,
                if state.read_only { " read-only" } else { "" },
            )));
        }
        Ok(block)
    }

    fn host_fds(&self) -> Vec<HostFd> {
        vec![HostFd {
            name: self.config.host_fd_name(),
            fd: self.disk.as_raw_fd(),
        }]
    }
}

impl Block {
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors * SECTOR_SIZE
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn pci_class(&self) -> (u8, u8) {
        // Mass storage, "other" (what QEMU's virtio-blk-pci shows).
        (0x01, 0x80)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f =
            1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << F_INDIRECT_DESC;
        // A write cache the driver must flush (QEMU offers FLUSH exactly then too).
        if self.config.cache.writeback {
            f |= 1 << F_FLUSH;
        }
        if self.config.read_only {
            f |= 1 << F_RO;
        }
        if self.zeroing.discard() {
            f |= 1 << F_DISCARD;
        }
        if self.zeroing.write_zeroes() {
            f |= 1 << F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        super::read_config_space(&space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.stop_worker();
        log::debug!(
            "virtio-blk {}: the driver started it, features {:#x}",
            self.config.id,
            activation.features
        );
        let Some((queue, notify)) = activation.queues.into_iter().next() else {
            return Err(VirtioError::Device(
                "the driver enabled no request queue".into(),
            ));
        };
        let control = Arc::new(
            Control::new().map_err(|e| VirtioError::Device(format!("creating an eventfd: {e}")))?,
        );
        let engine = Engine::new(self.io_path).unwrap_or_else(|e| {
            log::warn!(
                "virtio-blk {}: io_uring: {e}; using preadv/pwritev",
                self.config.id
            );
            Engine::Sync
        });
        let io = RequestQueue {
            queue,
            notify,
            name: format!("virtio-blk {}", self.config.id),
            memory: activation.memory,
            interrupt: activation.interrupt,
            disk: self.disk.clone(),
            capacity_sectors: self.capacity_sectors,
            read_only: self.config.read_only,
            serial: self.config.serial.clone(),
            zeroing: self.zeroing,
            cache: self.config.cache,
            direct: self.direct,
            engine,
        };
        let worker = Worker::spawn(format!("blk-{}", self.config.id), control, io)
            .map_err(|e| VirtioError::Device(format!("starting the I/O thread: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    /// Returns once every request the thread had submitted has completed and is in the used
    /// ring.
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

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl Block {
    /// The configuration space (`struct virtio_blk_config`) up to the last field offered.
    fn config_space(&self) -> Vec<u8> {
        use std::mem::offset_of;
        let mut space = vec![0u8; offset_of!(virtio_blk_config, unused1) + 3];
        let mut put = |at: usize, bytes: &[u8]| space[at..at + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity_sectors.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        // With O_DIRECT, the block size the host needs, so that the driver sends requests
        // that can go straight to guest RAM.
        let blk_size = self.direct.map_or(SECTOR_SIZE as u32, |a| {
            (a.offset as u32).max(SECTOR_SIZE as u32)
        });
        put(
            offset_of!(virtio_blk_config, blk_size),
            &blk_size.to_le_bytes(),
        );
        if self.zeroing.discard() {
            put(
                offset_of!(virtio_blk_config, max_discard_sectors),
                &MAX_ZEROING_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_discard_seg),
                &MAX_ZEROING_SEG.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, discard_sector_alignment),
                &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
            );
        }
        if self.zeroing.write_zeroes() {
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                &MAX_ZEROING_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                &MAX_ZEROING_SEG.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, write_zeroes_may_unmap),
                &[u8::from(self.zeroing.punch_hole)],
            );
        }
        space
    }
}

/// The I/O thread's view: the queue, guest memory, the disk.
struct RequestQueue {
    queue: Arc<Mutex<Queue>>,
    notify: Arc<EventFd>,
    /// For log lines.
    name: String,
    memory: Arc<GuestMemoryMmap>,
    interrupt: Arc<VirtioInterrupt>,
    disk: Arc<File>,
    capacity_sectors: u64,
    read_only: bool,
    serial: String,
    zeroing: Zeroing,
    cache: CacheMode,
    direct: Option<DirectAlign>,
    engine: Engine,
}

const TOKEN_NOTIFY: u64 = 1;
const TOKEN_DONE: u64 = 3;

/// A guest buffer: guest-physical address and length.
type Segment = (GuestAddress, usize);

/// Where a request is answered: its chain's head, its status byte (none if the chain has no
/// writable byte in guest RAM to hold one), and the data bytes a success puts in the chain.
#[derive(Clone, Copy, Debug)]
struct Reply {
    head: u16,
    status: Option<GuestAddress>,
    data_len: u32,
}

/// What a parsed request asks of the disk.
enum Work {
    /// Answered while parsing (GET_ID, DISCARD, WRITE_ZEROES, every error): status, data bytes.
    Done(u8, u32),
    Read(Transfer),
    Write(Transfer),
    Flush,
}

impl Work {
    /// Host memory the work would hold in a bounce buffer while in flight.
    fn bounce_bytes(&self) -> usize {
        match self {
            Work::Read(t) | Work::Write(t) => t.bounce_bytes(),
            Work::Done(..) | Work::Flush => 0,
        }
    }
}

/// A read or a write: where on the disk, and the memory the kernel moves the data to or from.
struct Transfer {
    offset: u64,
    /// What the kernel reads into or writes from: the guest's buffers, or the bounce buffer.
    iovecs: IoVecs,
    /// The bounce buffer and the guest's buffers behind it, when the guest's buffers are not
    /// aligned as O_DIRECT needs (a write's data is already in the buffer; a read's is copied
    /// out by [`Transfer::finish_read`]).
    bounce: Option<(AlignedBuf, IoVecs)>,
    /// `pwritev2` flags: RWF_DSYNC when the guest sees no write cache.
    write_flags: libc::c_int,
}

impl Transfer {
    /// A transfer between the disk at `offset` and the guest buffers `guest`; through a
    /// bounce buffer when `direct` says the kernel cannot use them as they are. `None` when
    /// the request itself is not aligned as O_DIRECT needs (only possible on a disk whose
    /// block is larger than a sector).
    fn new(
        offset: u64,
        guest: IoVecs,
        write: bool,
        direct: Option<DirectAlign>,
        write_flags: libc::c_int,
    ) -> Option<Transfer> {
        let Some(align) = direct.filter(|a| !a.fits(offset, &guest)) else {
            return Some(Transfer {
                offset,
                iovecs: guest,
                bounce: None,
                write_flags,
            });
        };
        if !offset.is_multiple_of(align.offset as u64) || !guest.bytes.is_multiple_of(align.offset)
        {
            return None;
        }
        let mut buf = AlignedBuf::new(guest.bytes, align.memory.max(4096))?;
        if write {
            let mut at = 0;
            for iov in &guest.list {
                // Each iovec was checked against guest RAM when it was built, and the mapping
                // outlives the request.
                // SAFETY: every guest iovec points into mapped guest RAM with its length.
                let slice = unsafe { VolatileSlice::new(iov.iov_base.cast(), iov.iov_len) };
                at += slice.copy_to(&mut buf.as_mut_slice()[at..]);
            }
        }
        let iovecs = IoVecs {
            list: vec![libc::iovec {
                iov_base: buf.as_mut_slice().as_mut_ptr().cast(),
                iov_len: guest.bytes,
            }],
            bytes: guest.bytes,
        };
        Some(Transfer {
            offset,
            iovecs,
            bounce: Some((buf, guest)),
            write_flags,
        })
    }

    /// Host memory this transfer holds in a bounce buffer (0 when the guest's buffers are used).
    fn bounce_bytes(&self) -> usize {
        self.bounce.as_ref().map_or(0, |_| self.iovecs.bytes)
    }

    /// After a read completed: the data goes from the bounce buffer to the guest's buffers.
    fn finish_read(&mut self) {
        if let Some((buf, guest)) = &mut self.bounce {
            let mut at = 0;
            for iov in &guest.list {
                // SAFETY: as in `Transfer::new`.
                let slice = unsafe { VolatileSlice::new(iov.iov_base.cast(), iov.iov_len) };
                slice.copy_from(&buf.as_mut_slice()[at..at + iov.iov_len]);
                at += iov.iov_len;
            }
        }
    }
}

/// A zeroed heap buffer aligned as O_DIRECT needs.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is owned memory that only its owner reads or writes (and the kernel,
// while a request that the owner keeps alive is in flight).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `None` for an empty or impossible size, or when memory is short.
    fn new(len: usize, align: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len, align).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // The bytes are zeroed at allocation and borrowed mutably through `self`.
        // SAFETY: `ptr` points to `layout.size()` initialised bytes that this buffer owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// What O_DIRECT needs of a request on one disk, asked of the host at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirectAlign {
    /// Disk offsets, and the lengths of the request and of each buffer, are multiples of it.
    offset: usize,
    /// Buffer addresses are multiples of it.
    memory: usize,
}

impl DirectAlign {
    /// statx's `STATX_DIOALIGN` where the file system reports it; for a block device without
    /// it, its logical block size (BLKSSZGET) for both; otherwise 4096 for both (safe on every
    /// file system, at the cost of bouncing more requests).
    fn query(disk: &File) -> Self {
        let fallback = DirectAlign {
            offset: 4096,
            memory: 4096,
        };
        if let Some((offset, memory)) = statx_dio_align(disk) {
            return DirectAlign { offset, memory };
        }
        let is_block_device = disk
            .metadata()
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
        if is_block_device && let Some(size) = logical_block_size(disk) {
            return DirectAlign {
                offset: size,
                memory: size,
            };
        }
        fallback
    }

    /// Whether the kernel can use `iovecs` at `offset` as they are.
    fn fits(&self, offset: u64, iovecs: &IoVecs) -> bool {
        offset.is_multiple_of(self.offset as u64)
            && iovecs.list.iter().all(|iov| {
                (iov.iov_base as usize).is_multiple_of(self.memory)
                    && iov.iov_len.is_multiple_of(self.offset)
            })
    }
}

/// (offset, memory) alignment for O_DIRECT from statx, if the file system reports them.
fn statx_dio_align(disk: &File) -> Option<(usize, usize)> {
    // SAFETY: `statx` is plain integers; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // An empty path with AT_EMPTY_PATH names the fd itself.
    // SAFETY: the fd is open, the path is a valid C string, `stx` is a writable statx buffer.
    let rc = unsafe {
        libc::statx(
            disk.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0).then(
        || {
            (
                stx.stx_dio_offset_align as usize,
                (stx.stx_dio_mem_align as usize).max(1),
            )
        },
    )
}

/// A block device's logical block size.
fn logical_block_size(disk: &File) -> Option<usize> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for that.
    let rc = unsafe { ioctl_with_mut_ref(disk, libc::BLKSSZGET as _, &mut size) };
    (rc == 0).then_some(())?;
    usize::try_from(size).ok().filter(|&s| s > 0)
}

/// Host iovecs over guest RAM.
struct IoVecs {
    list: Vec<libc::iovec>,
    bytes: usize,
}

// SAFETY: the pointers are into the guest-memory mapping, which every thread of the VMM may
// use and which stays mapped while the queue's `Arc<GuestMemoryMmap>` lives; the I/O thread
// that holds them owns that `Arc` too.
unsafe impl Send for IoVecs {}

/// How requests reach the disk.
enum Engine {
    /// preadv/pwritev on the I/O thread, one request at a time.
    Sync,
    Uring(Box<Uring>),
}

/// io_uring and the requests in flight on it, by slot (the submission's user data).
struct Uring {
    ring: IoUring,
    /// Signalled by the kernel on every completion.
    done: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Bytes of bounce buffers the kernel holds now (see [`MAX_BOUNCE_IN_FLIGHT`]).
    bounced: usize,
}

/// At most this much host memory in bounce buffers in flight on io_uring: a guest whose
/// buffers are all unaligned could otherwise pin a queue's worth (256 requests of 4 MiB).
/// A request that would go over is carried out on the I/O thread instead, one at a time.
const MAX_BOUNCE_IN_FLIGHT: usize = 16 << 20;

struct InFlight {
    reply: Reply,
    /// The result that means success: the bytes moved (0 for a flush).
    expect: usize,
    /// Used by the kernel until the completion is reaped (none for a flush); a read's, to
    /// finish it then.
    transfer: Option<Transfer>,
    read: bool,
}

impl Engine {
    fn new(path: IoPath) -> std::io::Result<Engine> {
        match path {
            IoPath::Sync => Ok(Engine::Sync),
            IoPath::Uring => {
                let ring = IoUring::new(u32::from(QUEUE_SIZE))?;
                let done = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
                ring.submitter().register_eventfd(done.as_raw_fd())?;
                Ok(Engine::Uring(Box::new(Uring {
                    ring,
                    done,
                    slots: (0..QUEUE_SIZE).map(|_| None).collect(),
                    free: (0..usize::from(QUEUE_SIZE)).rev().collect(),
                    bounced: 0,
                })))
            }
        }
    }

    fn has_room(&self) -> bool {
        match self {
            Engine::Sync => true,
            Engine::Uring(u) => !u.free.is_empty(),
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            Engine::Sync => 0,
            Engine::Uring(u) => u.slots.len() - u.free.len(),
        }
    }

    /// Starts `work`; returns its status and data bytes if it is already complete.
    fn start(&mut self, disk: &File, reply: Reply, work: Work) -> Option<(u8, u32)> {
        match (self, work) {
            (_, Work::Done(status, len)) => Some((status, len)),
            (Engine::Sync, work) => Some(run_sync(disk, reply, work)),
            (Engine::Uring(u), work) if u.bounced + work.bounce_bytes() > MAX_BOUNCE_IN_FLIGHT => {
                Some(run_sync(disk, reply, work))
            }
            (Engine::Uring(u), work) => u.push(disk.as_raw_fd(), reply, work),
        }
    }

    /// Hands what was queued to the kernel.
    fn submit(&mut self) {
        if let Engine::Uring(u) = self
            && let Err(e) = u.ring.submit()
        {
            log::warn!("virtio-blk: io_uring submit: {e}");
        }
    }

    /// Blocks until at least one request in flight has completed; false if the ring cannot
    /// be waited on (nothing more will complete).
    fn wait(&mut self) -> bool {
        if let Engine::Uring(u) = self {
            loop {
                match u.ring.submit_and_wait(1) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("virtio-blk: io_uring wait: {e}");
                        return false;
                    }
                    Ok(_) => return true,
                }
            }
        }
        true
    }

    /// The requests that have completed: where to answer, status, data bytes.
    fn reap(&mut self) -> Vec<(Reply, u8, u32)> {
        let Engine::Uring(u) = self else {
            return Vec::new();
        };
        let _ = u.done.read();
        let mut out = Vec::new();
        for cqe in u.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(f) = u.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            u.free.push(slot);
            u.bounced -= f.transfer.as_ref().map_or(0, Transfer::bounce_bytes);
            let ok = usize::try_from(cqe.result()).is_ok_and(|n| n == f.expect);
            if let (true, true, Some(mut t)) = (ok, f.read, f.transfer) {
                t.finish_read();
            }
            out.push(if ok {
                (f.reply, S_OK, f.reply.data_len)
            } else {
                (f.reply, S_IOERR, 0)
            });
        }
        out
    }

    fn completion_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Sync => None,
            Engine::Uring(u) => Some(u.done.as_raw_fd()),
        }
    }
}

impl Uring {
    /// Queues `work` for the next submit; returns a status if it could not be queued.
    fn push(&mut self, fd: RawFd, reply: Reply, work: Work) -> Option<(u8, u32)> {
        let Some(slot) = self.free.pop() else {
            return Some((S_IOERR, 0));
        };
        let others_in_flight = self.slots.len() - self.free.len() > 1;
        let fd = types::Fd(fd);
        let (entry, expect, transfer, read) = match work {
            Work::Read(t) => (
                opcode::Readv::new(fd, t.iovecs.list.as_ptr(), t.iovecs.list.len() as u32)
                    .offset(t.offset)
                    .build(),
                t.iovecs.bytes,
                Some(t),
                true,
            ),
            Work::Write(t) => (
                opcode::Writev::new(fd, t.iovecs.list.as_ptr(), t.iovecs.list.len() as u32)
                    .offset(t.offset)
                    .rw_flags(t.write_flags)
                    .build(),
                t.iovecs.bytes,
                Some(t),
                false,
            ),
            Work::Flush => {
                let fsync = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                // Every write submitted before the flush completes before it starts.
                let fsync = if others_in_flight {
                    fsync.flags(squeue::Flags::IO_DRAIN)
                } else {
                    fsync
                };
                (fsync, 0, None, false)
            }
            Work::Done(status, len) => {
                self.free.push(slot);
                return Some((status, len));
            }
        };
        let entry = entry.user_data(slot as u64);
        let bounce_bytes = transfer.as_ref().map_or(0, Transfer::bounce_bytes);
        self.slots[slot] = Some(InFlight {
            reply,
            expect,
            transfer,
            read,
        });
        // The entry's iovec array lives in `slots[slot]` (a Vec's heap buffer does not move
        // with it) until its completion is reaped, as does a bounce buffer; the guest memory
        // the iovecs point into stays mapped for the life of the I/O thread, which drains the
        // ring before it ends.
        // SAFETY: so every pointer the entry carries stays valid until the kernel is done.
        let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed && self.ring.submit().is_ok() {
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
        if pushed {
            self.bounced += bounce_bytes;
            None
        } else {
            self.slots[slot] = None;
            self.free.push(slot);
            Some((S_IOERR, 0))
        }
    }
}

/// Runs a read, write or flush with preadv/pwritev/fdatasync.
fn run_sync(disk: &File, reply: Reply, work: Work) -> (u8, u32) {
    let result = match work {
        Work::Done(status, len) => return (status, len),
        Work::Read(mut t) => {
            transfer_all(disk, &mut t.iovecs.list, t.offset, None).map(|()| t.finish_read())
        }
        Work::Write(mut t) => transfer_all(disk, &mut t.iovecs.list, t.offset, Some(t.write_flags)),
        Work::Flush => disk.sync_data(),
    };
    match result {
        Ok(()) => (S_OK, reply.data_len),
        Err(_) => (S_IOERR, 0),
    }
}

/// preadv, or pwritev2 with `write` flags, until every iovec is done (a short transfer carries
/// on where it stopped).
fn transfer_all(
    disk: &File,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    write: Option<libc::c_int>,
) -> std::io::Result<()> {
    let fd = disk.as_raw_fd();
    let mut rest = iovecs;
    while let Some(first) = rest.first() {
        if first.iov_len == 0 {
            rest = &mut rest[1..];
            continue;
        }
        let count = rest.len().min(1024) as libc::c_int;
        let at = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // Every iovec points into mapped guest RAM (checked when it was built, and the mapping
        // outlives this call) with its length.
        // SAFETY: so the kernel only reads or writes memory that is valid for the call.
        let n = unsafe {
            match write {
                Some(flags) => libc::pwritev2(fd, rest.as_ptr(), count, at, flags),
                None => libc::preadv(fd, rest.as_ptr(), count, at),
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let Some(first) = rest.first_mut() else {
                break;
            };
            if n >= first.iov_len {
                n -= first.iov_len;
                rest = &mut rest[1..];
            } else {
                // SAFETY: `n` is less than this iovec's length: the pointer stays inside it.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
                first.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Host iovecs over `segments`, leaving out their first `skip` bytes; `None` if any byte is
/// outside guest RAM.
fn iovecs(mem: &GuestMemoryMmap, segments: &[Segment], skip: usize) -> Option<IoVecs> {
    let mut list = Vec::with_capacity(segments.len());
    let mut bytes = 0;
    let mut skip = skip;
    for &(addr, len) in segments {
        let cut = skip.min(len);
        skip -= cut;
        let (addr, len) = (addr.checked_add(cut as u64)?, len - cut);
        for slice in mem.get_slices(addr, len) {
            let slice = slice.ok()?;
            list.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            bytes += slice.len();
        }
    }
    Some(IoVecs { list, bytes })
}

/// Copies the first `out.len()` bytes of `segments` into `out`.
fn gather(mem: &GuestMemoryMmap, segments: &[Segment], out: &mut [u8]) -> bool {
    let mut done = 0;
    for &(addr, len) in segments {
        if done == out.len() {
            break;
        }
        let n = len.min(out.len() - done);
        if mem.read_slice(&mut out[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == out.len()
}

/// Copies `data` into the start of `segments` (as much as fits).
fn scatter(mem: &GuestMemoryMmap, segments: &[Segment], data: &[u8]) -> usize {
    let mut done = 0;
    for &(addr, len) in segments {
        let n = len.min(data.len() - done);
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// The I/O thread ([`super::worker`]): starts paused; the transport resumes it when the guest
/// runs. A pause returns once every request submitted has completed and is in the used ring.
/// When it stops (the driver reset the device, or it is going away) every request submitted
/// completes first (the kernel is done with guest RAM), but their answers are not written: the
/// rings may no longer be the driver's.
impl IoHandler for RequestQueue {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn register(&mut self, epoll: &Epoll) -> std::io::Result<()> {
        let mut fds = vec![(self.notify.as_raw_fd(), TOKEN_NOTIFY)];
        if let Some(fd) = self.engine.completion_fd() {
            fds.push((fd, TOKEN_DONE));
        }
        for (fd, token) in fds {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(())
    }

    fn event(&mut self, _epoll: &Epoll, token: u64) {
        match token {
            TOKEN_NOTIFY => {
                let _ = self.notify.read();
            }
            TOKEN_DONE => self.complete(),
            _ => {}
        }
    }

    /// Anything queued while paused too (no kick is lost).
    fn work(&mut self, _epoll: &Epoll) {
        self.process();
    }

    fn pause(&mut self, _epoll: &Epoll) {
        self.drain();
    }

    fn stop(&mut self) {
        self.engine.submit();
        while self.engine.in_flight() > 0 && self.engine.wait() {
            let _ = self.engine.reap();
        }
    }
}

impl RequestQueue {
    /// Starts every request the driver has made available (and completes those the engine
    /// does on the spot).
    fn process(&mut self) {
        let queue = self.queue.clone();
        let memory = self.memory.clone();
        let mem = memory.as_ref();
        let mut queue = lock(&queue);
        loop {
            // With EVENT_IDX, notifications are off while the ring is drained, then on again;
            // a request that raced in is seen by the re-check.
            if let Err(e) = queue.disable_notification(mem) {
                log::warn!("virtio-blk: {e:?}");
            }
            let mut used = 0;
            loop {
                if !self.engine.has_room() {
                    if !self.engine.wait() {
                        break;
                    }
                    used += self.reap(&mut queue);
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let (reply, work) = self.parse(chain);
                if let Some((status, len)) = self.engine.start(&self.disk, reply, work) {
                    answer(&mut queue, mem, reply, status, len);
                    used += 1;
                }
            }
            self.engine.submit();
            used += self.reap(&mut queue);
            if used > 0 && queue.needs_notification(mem).unwrap_or(true) {
                self.interrupt.notify_queue(0);
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    log::warn!("virtio-blk: {e:?}");
                    return;
                }
            }
        }
    }

    /// Puts the requests that have completed in the used ring and tells the driver.
    fn complete(&mut self) {
        let queue = self.queue.clone();
        let mut queue = lock(&queue);
        if self.reap(&mut queue) > 0
            && queue
                .needs_notification(self.memory.as_ref())
                .unwrap_or(true)
        {
            self.interrupt.notify_queue(0);
        }
    }

    /// Waits until every request submitted has completed and is in the used ring.
    fn drain(&mut self) {
        self.engine.submit();
        loop {
            self.complete();
            if self.engine.in_flight() == 0 || !self.engine.wait() {
                return;
            }
        }
    }

    fn reap(&mut self, queue: &mut Queue) -> usize {
        let done = self.engine.reap();
        for &(reply, status, len) in &done {
            answer(queue, self.memory.as_ref(), reply, status, len);
        }
        done.len()
    }

    /// Reads a request's header and checks its buffers; what is left to do goes to the engine.
    fn parse(&self, chain: DescriptorChain<&GuestMemoryMmap>) -> (Reply, Work) {
        let mem = self.memory.as_ref();
        let head = chain.head_index();
        // The chain's walk is bounded by the queue (or indirect table) size and stops at a
        // descriptor it cannot read (a table outside RAM, a nested indirect table).
        // (At most 65535 descriptors: an indirect table's limit.)
        let descriptors: Vec<_> = chain.collect();
        let count = descriptors.len();
        let last = descriptors.last().copied();
        // A chain whose last descriptor still says NEXT was cut short: a loop, or a next
        // descriptor that could not be read. It has no status byte.
        let status = last
            .filter(|d| d.is_write_only() && d.len() > 0 && !d.has_next())
            .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1))
            .filter(|&a| mem.address_in_range(a));
        let mut reply = Reply {
            head,
            status,
            data_len: 0,
        };
        let fail = |status| Work::Done(status, 0);
        if status.is_none() {
            // Nowhere to answer: the request is returned with nothing written.
            return (reply, fail(S_IOERR));
        }
        if count > MAX_DESCRIPTORS {
            return (reply, fail(S_IOERR));
        }
        let split = descriptors
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descriptors.len());
        if descriptors[split..].iter().any(|d| !d.is_write_only()) {
            // A readable descriptor after a writable one.
            return (reply, fail(S_IOERR));
        }
        let segment = |d: &virtio_queue::desc::split::Descriptor| (d.addr(), d.len() as usize);
        let readable: Vec<Segment> = descriptors[..split].iter().map(segment).collect();
        let mut writable: Vec<Segment> = descriptors[split..].iter().map(segment).collect();
        if let Some(s) = writable.last_mut() {
            s.1 -= 1; // the status byte
        }
        // Every buffer must be in guest RAM, whatever the request.
        let (Some(readable_io), Some(writable_io)) =
            (iovecs(mem, &readable, 0), iovecs(mem, &writable, 0))
        else {
            return (reply, fail(S_IOERR));
        };
        let mut header = [0u8; 16];
        if !gather(mem, &readable, &mut header) {
            return (reply, fail(S_IOERR));
        }
        let header = RequestHeader {
            kind: u32::from_le_bytes([header[0], header[1], header[2], header[3]]),
            reserved: 0,
            sector: u64::from_le_bytes([
                header[8], header[9], header[10], header[11], header[12], header[13], header[14],
                header[15],
            ]),
        };
        let write_flags = if self.cache.writeback {
            0
        } else {
            libc::RWF_DSYNC
        };
        let transfer =
            |offset, iovecs, write| Transfer::new(offset, iovecs, write, self.direct, write_flags);
        let work = match header.kind {
            T_IN => match self.range(header.sector, writable_io.bytes) {
                Some(offset) => {
                    let bytes = writable_io.bytes as u32;
                    match transfer(offset, writable_io, false) {
                        Some(t) => {
                            reply.data_len = bytes;
                            Work::Read(t)
                        }
                        None => fail(S_IOERR),
                    }
                }
                None => fail(S_IOERR),
            },
            T_OUT => {
                let data = readable_io.bytes - 16;
                match (self.read_only, self.range(header.sector, data)) {
                    (false, Some(offset)) => match iovecs(mem, &readable, 16)
                        .and_then(|iovecs| transfer(offset, iovecs, true))
                    {
                        Some(t) => Work::Write(t),
                        None => fail(S_IOERR),
                    },
                    _ => fail(S_IOERR),
                }
            }
            // `cache.no-flush=on` (`cache=unsafe`): the guest is told its data is safe.
            T_FLUSH if self.cache.no_flush => Work::Done(S_OK, 0),
            T_FLUSH => Work::Flush,
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let bytes = self.serial.as_bytes();
                let n = bytes.len().min(ID_BYTES);
                id[..n].copy_from_slice(&bytes[..n]);
                let n = writable_io.bytes.min(ID_BYTES);
                let written = scatter(mem, &writable, &id[..n]);
                Work::Done(S_OK, written as u32)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                // The header was read, so there are at least 16 readable bytes.
                let data = readable_io.bytes - 16;
                let status = if data > MAX_ZEROING_SEG as usize * ZEROING_SEGMENT_BYTES {
                    S_UNSUPP
                } else {
                    let mut all = vec![0u8; readable_io.bytes];
                    if gather(mem, &readable, &mut all) {
                        self.zero(header.kind, &all[16..])
                    } else {
                        S_IOERR
                    }
                };
                Work::Done(status, 0)
            }
            _ => fail(S_UNSUPP),
        };
        (reply, work)
    }

    /// DISCARD or WRITE_ZEROES over the segments in `data`: every segment is checked before
    /// any is carried out.
    fn zero(&self, kind: u32, data: &[u8]) -> u8 {
        let offered = if kind == T_DISCARD {
            self.zeroing.discard()
        } else {
            self.zeroing.write_zeroes()
        };
        if !offered || self.read_only {
            return S_UNSUPP;
        }
        if data.is_empty() || !data.len().is_multiple_of(ZEROING_SEGMENT_BYTES) {
            return S_IOERR;
        }
        let mut ranges = Vec::new();
        for seg in data.chunks_exact(ZEROING_SEGMENT_BYTES) {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(sector);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Unknown flags, or unmap on a discard: not supported (virtio 1.x 5.2.6.2).
            if flags & !FLAG_UNMAP != 0 || (kind == T_DISCARD && flags & FLAG_UNMAP != 0) {
                return S_UNSUPP;
            }
            if sectors > MAX_ZEROING_SECTORS
                || sector
                    .checked_add(u64::from(sectors))
                    .is_none_or(|end| end > self.capacity_sectors)
            {
                return S_IOERR;
            }
            ranges.push((sector, sectors, flags & FLAG_UNMAP != 0));
        }
        for (sector, sectors, unmap) in ranges {
            let (at, len) = (sector * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE);
            if len > 0
                && !self
                    .zeroing
                    .zero(self.disk.as_ref(), at, len, kind == T_DISCARD, unmap)
            {
                return S_IOERR;
            }
        }
        S_OK
    }

    /// The byte offset of a request of `len` bytes at `sector`, if it lies within the disk and
    /// within the request size limit.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len as u64 / SECTOR_SIZE)?;
        (end <= self.capacity_sectors).then(|| sector * SECTOR_SIZE)
    }
}

/// Writes a request's status and returns it to the driver.
fn answer(queue: &mut Queue, mem: &GuestMemoryMmap, reply: Reply, status: u8, data_len: u32) {
    let used_len = match reply.status {
        Some(at) if mem.write_obj(status, at).is_ok() => data_len + 1,
        _ => 0,
    };
    if let Err(e) = queue.add_used(mem, reply.head, used_len) {
        log::warn!("virtio-blk: returning request {}: {e:?}", reply.head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupts::GsiRouter;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x12_0000;
    const TABLE: u64 = 0x13_0000;
    /// Guest RAM in these tests: 4 MiB from 0.
    const RAM: u64 = 4 << 20;
    const QUEUE: u16 = 128;

    type Chain = Vec<(u64, u32, u16)>;

    struct Rig {
        memory: Arc<GuestMemoryMmap>,
        disk: tempfile::Disk,
        _router: Arc<GsiRouter>,
        interrupt: Arc<VirtioInterrupt>,
    }

    mod tempfile {
        pub struct Disk {
            pub path: std::path::PathBuf,
        }
        impl Disk {
            pub fn new(sectors: u64) -> Self {
                Self::new_in(&std::env::temp_dir(), sectors)
            }

            pub fn new_in(dir: &std::path::Path, sectors: u64) -> Self {
                let path = dir.join(format!(
                    "cpr-blk-test-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let f = std::fs::File::create(&path).unwrap();
                f.set_len(sectors * 512).unwrap();
                Disk { path }
            }
        }
        impl Drop for Disk {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    impl Rig {
        /// With the image in the build's target directory: on a disk file system (O_DIRECT
        /// works there; the temporary directory may be a tmpfs).
        fn on_disk(sectors: u64) -> Self {
            let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
            std::fs::create_dir_all(&target).unwrap();
            Rig {
                disk: tempfile::Disk::new_in(&target, sectors),
                ..Rig::new(0)
            }
        }

        fn new(sectors: u64) -> Self {
            let memory =
                Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
            let (router, interrupt) = VirtioInterrupt::for_tests(1);
            Rig {
                memory,
                disk: tempfile::Disk::new(sectors),
                _router: router,
                interrupt,
            }
        }

        fn config(&self, read_only: bool) -> BlockConfig {
            BlockConfig {
                id: "d0".into(),
                source: DiskSource::Path(self.disk.path.clone()),
                read_only,
                serial: "cpr-serial-0".into(),
                format_stated: true,
                aio: AioMode::Auto,
                cache: CacheMode::default(),
            }
        }

        fn block(&self, read_only: bool) -> Block {
            let cfg = self.config(read_only);
            let file = cfg.open().unwrap();
            Block::with_disk(cfg, file).unwrap()
        }

        fn block_with_cache(&self, cache: CacheMode) -> Block {
            let mut cfg = self.config(false);
            cfg.cache = cache;
            let file = cfg.open().unwrap();
            Block::with_disk(cfg, file).unwrap()
        }

        /// The device's I/O thread state over `queue`, with the given engine.
        fn request_queue(&self, block: &Block, queue: Queue, path: IoPath) -> RequestQueue {
            RequestQueue {
                queue: Arc::new(Mutex::new(queue)),
                notify: Arc::new(EventFd::new(0).unwrap()),
                name: "virtio-blk test".into(),
                memory: self.memory.clone(),
                interrupt: self.interrupt.clone(),
                disk: block.disk.clone(),
                capacity_sectors: block.capacity_sectors,
                read_only: block.config.read_only,
                serial: block.config.serial.clone(),
                zeroing: block.zeroing,
                cache: block.config.cache,
                direct: block.direct,
                engine: Engine::new(path).unwrap(),
            }
        }

        /// Queues `descs` (chains laid out by the caller) and runs the device over them until
        /// nothing is in flight; returns the used ring as (head, length) pairs.
        fn run_raw(&self, block: &Block, descs: &[RawDescriptor], path: IoPath) -> Vec<(u16, u32)> {
            let mock = MockSplitQueue::new(self.memory.as_ref(), QUEUE);
            mock.add_desc_chains(descs, 0).unwrap();
            let mut rq = self.request_queue(block, mock.create_queue().unwrap(), path);
            rq.process();
            rq.drain();
            let used = mock.used();
            (0..used.idx().load())
                .map(|i| {
                    let e = used.ring().ref_at(usize::from(i)).unwrap().load();
                    (e.id() as u16, e.len())
                })
                .collect()
        }

        /// Queues one request per chain and runs the device over them, with preadv/pwritev
        /// and with io_uring (which must agree); returns (status, used length) of each, in
        /// the order of `chains` whatever order they completed in.
        fn run(&self, block: &Block, chains: &[Chain]) -> Vec<(u8, u32)> {
            let sync = self.run_on(block, chains, IoPath::Sync);
            let uring = self.run_on(block, chains, IoPath::Uring);
            assert_eq!(sync, uring, "both I/O paths give the same answers");
            uring
        }

        fn run_on(&self, block: &Block, chains: &[Chain], path: IoPath) -> Vec<(u8, u32)> {
            let mut descs = Vec::new();
            let mut heads = Vec::new();
            for chain in chains {
                let start = descs.len() as u16;
                heads.push(start);
                for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                    let last = i + 1 == chain.len();
                    let flags = if last { flags } else { flags | NEXT };
                    let next = if last { 0 } else { start + i as u16 + 1 };
                    descs.push(RawDescriptor::from(SplitDescriptor::new(
                        addr, len, flags, next,
                    )));
                }
            }
            // A status byte the device does not write reads as 0xff.
            for chain in chains {
                let &(addr, len, _) = chain.last().unwrap();
                let _ = self
                    .memory
                    .write_obj(0xffu8, GuestAddress(addr + u64::from(len) - 1));
            }
            let used = self.run_raw(block, &descs, path);
            assert_eq!(used.len(), chains.len(), "every request is returned");
            chains
                .iter()
                .zip(&heads)
                .map(|(chain, head)| {
                    let len = used
                        .iter()
                        .find(|(h, _)| h == head)
                        .map(|&(_, l)| l)
                        .expect("returned once");
                    // Each chain's status byte is its last descriptor.
                    let (addr, dlen, _) = chain[chain.len() - 1];
                    let status = self
                        .memory
                        .read_obj::<u8>(GuestAddress(addr + u64::from(dlen) - 1))
                        .unwrap_or(0xff);
                    (status, len)
                })
                .collect()
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            let h = RequestHeader {
                kind,
                reserved: 0,
                sector,
            };
            self.memory.write_obj(h, GuestAddress(at)).unwrap();
        }

        /// Writes an indirect descriptor table at `at`.
        fn table(&self, at: u64, descs: &[(u64, u32, u16)]) {
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let last = i + 1 == descs.len();
                let flags = if last { flags } else { flags | NEXT };
                let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1));
                self.memory
                    .write_obj(d, GuestAddress(at + 16 * i as u64))
                    .unwrap();
            }
        }

        /// The device still answers a good request.
        fn still_works(&self, block: &Block) {
            self.header(HEADER + 0xf00, T_IN, 0);
            let out = self.run(
                block,
                &[request(
                    HEADER + 0xf00,
                    Some((DATA, 512, WRITE)),
                    STATUS + 0xf,
                )],
            );
            assert_eq!(out, [(S_OK, 513)]);
        }
    }

    fn request(header: u64, data: Option<(u64, u32, u16)>, status: u64) -> Chain {
        let mut c = vec![(header, 16, 0)];
        if let Some(d) = data {
            c.push(d);
        }
        c.push((status, 1, WRITE));
        c
    }

    fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    }

    #[test]
    fn writes_reads_flushes_and_says_who_it_is() {
        let rig = Rig::new(64);
        let block = rig.block(false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        rig.memory
            .write_slice(&pattern, GuestAddress(DATA))
            .unwrap();
        rig.header(HEADER, T_OUT, 2);
        let out = rig.run(&block, &[request(HEADER, Some((DATA, 1024, 0)), STATUS)]);
        assert_eq!(out, [(S_OK, 1)]);
        let mut on_disk = vec![0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(block.disk.as_ref(), &mut on_disk, 1024).unwrap();
        assert_eq!(on_disk, pattern);

        rig.memory
            .write_slice(&[0u8; 1024], GuestAddress(DATA))
            .unwrap();
        rig.header(HEADER, T_IN, 2);
        rig.header(HEADER + 0x100, T_FLUSH, 0);
        rig.header(HEADER + 0x200, T_GET_ID, 0);
        let out = rig.run(
            &block,
            &[
                request(HEADER, Some((DATA, 1024, WRITE)), STATUS),
                request(HEADER + 0x100, None, STATUS + 1),
                request(HEADER + 0x200, Some((DATA + 0x1000, 20, WRITE)), STATUS + 2),
            ],
        );
        assert_eq!(out, [(S_OK, 1025), (S_OK, 1), (S_OK, 21)]);
        let mut back = vec![0u8; 1024];
        rig.memory
            .read_slice(&mut back, GuestAddress(DATA))
            .unwrap();
        assert_eq!(back, pattern);
        let mut id = [0u8; 20];
        rig.memory
            .read_slice(&mut id, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(&id[..12], b"cpr-serial-0");
        let mut config = [0u8; 8];
        block.read_config(0, &mut config);
        assert_eq!(u64::from_le_bytes(config), 64, "capacity in sectors");
    }

    #[test]
    fn a_batch_of_requests_completes_whole_and_data_lands_where_each_one_said() {
        let rig = Rig::new(256);
        let block = rig.block(false);
        // 16 writes of 4 KiB spread over two segments each (guest pages not contiguous),
        // then a flush: all submitted together.
        let mut chains = Vec::new();
        for i in 0..16u64 {
            let data = DATA + i * 0x2000;
            rig.memory
                .write_slice(&[i as u8 + 1; 4096], GuestAddress(data))
                .unwrap();
            rig.header(HEADER + i * 0x20, T_OUT, (15 - i) * 8);
            chains.push(vec![
                (HEADER + i * 0x20, 16, 0),
                (data, 1024, 0),
                (data + 1024, 3072, 0),
                (STATUS + i, 1, WRITE),
            ]);
        }
        rig.header(HEADER + 0x400, T_FLUSH, 0);
        chains.push(request(HEADER + 0x400, None, STATUS + 16));
        let out = rig.run(&block, &chains);
        assert_eq!(out, vec![(S_OK, 1); 17]);
        for i in 0..16u64 {
            let mut on_disk = vec![0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(
                block.disk.as_ref(),
                &mut on_disk,
                (15 - i) * 4096,
            )
            .unwrap();
            assert!(on_disk.iter().all(|&b| b == i as u8 + 1), "request {i}");
        }
        // And read back in one batch, into a descriptor that spans two pages.
        let mut chains = Vec::new();
        for i in 0..16u64 {
            rig.header(HEADER + i * 0x20, T_IN, i * 8);
            chains.push(request(
                HEADER + i * 0x20,
                Some((0x20_0000 + i * 0x1000 + 0x800, 4096, WRITE)),
                STATUS + i,
            ));
        }
        let out = rig.run(&block, &chains);
        assert_eq!(out, vec![(S_OK, 4097); 16]);
        let mut back = vec![0u8; 4096];
        rig.memory
            .read_slice(&mut back, GuestAddress(0x20_0000 + 3 * 0x1000 + 0x800))
            .unwrap();
        assert!(
            back.iter().all(|&b| b == 13),
            "sector 24 holds request 12's data"
        );
    }

    #[test]
    fn a_read_past_the_end_of_the_disk_fails() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 7);
        let out = rig.run(
            &block,
            &[request(HEADER, Some((DATA, 1024, WRITE)), STATUS)],
        );
        assert_eq!(out, [(S_IOERR, 1)]);
        rig.still_works(&block);
    }

    #[test]
    fn an_unknown_request_type_is_unsupported() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, 99, 0);
        let out = rig.run(&block, &[request(HEADER, None, STATUS)]);
        assert_eq!(out, [(S_UNSUPP, 1)]);
        rig.still_works(&block);
    }

    #[test]
    fn a_request_of_part_of_a_sector_fails() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 0);
        let out = rig.run(&block, &[request(HEADER, Some((DATA, 100, WRITE)), STATUS)]);
        assert_eq!(out, [(S_IOERR, 1)]);
        rig.still_works(&block);
    }

    #[test]
    fn a_header_that_does_not_fit_in_its_descriptors_fails() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        let out = rig.run(&block, &[vec![(HEADER, 4, 0), (STATUS, 1, WRITE)]]);
        assert_eq!(out, [(S_IOERR, 1)]);
        rig.still_works(&block);
    }

    #[test]
    fn a_data_buffer_outside_guest_ram_fails_the_request_and_nothing_is_written() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, T_OUT, 0);
        rig.header(HEADER + 0x100, T_IN, 0);
        let out = rig.run(
            &block,
            &[
                request(HEADER, Some((RAM + 0x1000, 512, 0)), STATUS),
                // Starts in RAM and runs past its end.
                request(HEADER + 0x100, Some((RAM - 256, 512, WRITE)), STATUS + 1),
            ],
        );
        assert_eq!(out, [(S_IOERR, 1), (S_IOERR, 1)]);
        let mut on_disk = vec![0u8; 512];
        std::os::unix::fs::FileExt::read_exact_at(block.disk.as_ref(), &mut on_disk, 0).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0));
        rig.still_works(&block);
    }

    #[test]
    fn a_status_byte_outside_guest_ram_returns_the_request_with_nothing_written() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 0);
        let out = rig.run_raw(
            &block,
            &[
                RawDescriptor::from(SplitDescriptor::new(HEADER, 16, NEXT, 1)),
                RawDescriptor::from(SplitDescriptor::new(RAM + 0x1000, 1, WRITE, 0)),
            ],
            IoPath::Uring,
        );
        assert_eq!(out, [(0, 0)]);
        rig.still_works(&block);
    }

    #[test]
    fn a_descriptor_loop_is_returned_with_nothing_written() {
        let rig = Rig::new(64);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 0);
        // The second descriptor points back at the first: the walk is bounded by the queue
        // size, the chain has no status byte to answer in.
        let looped = [
            RawDescriptor::from(SplitDescriptor::new(HEADER, 16, NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, NEXT | WRITE, 0)),
        ];
        for path in [IoPath::Sync, IoPath::Uring] {
            rig.memory
                .write_slice(&[0xaa; 512], GuestAddress(DATA))
                .unwrap();
            let out = rig.run_raw(&block, &looped, path);
            assert_eq!(out, [(0, 0)]);
            let mut data = [0u8; 512];
            rig.memory
                .read_slice(&mut data, GuestAddress(DATA))
                .unwrap();
            assert_eq!(data, [0xaa; 512], "nothing read into the loop's buffers");
        }
        rig.still_works(&block);
    }

    #[test]
    fn a_chain_of_more_descriptors_than_seg_max_fails() {
        let rig = Rig::new(256);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 0);
        // In an indirect table (the queue itself has 128 descriptors): header, SEG_MAX + 1
        // one-sector buffers, status.
        let mut table = vec![(HEADER, 16, 0)];
        for i in 0..=u64::from(SEG_MAX) {
            table.push((0x20_0000 + i * 512, 512, WRITE));
        }
        table.push((STATUS, 1, WRITE));
        let indirect = |table: &[(u64, u32, u16)]| {
            rig.table(TABLE, table);
            rig.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let used = rig.run_raw(
                &block,
                &[RawDescriptor::from(SplitDescriptor::new(
                    TABLE,
                    16 * table.len() as u32,
                    INDIRECT,
                    0,
                ))],
                IoPath::Uring,
            );
            let status = rig.memory.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
            (status, used[0].1)
        };
        assert_eq!(indirect(&table), (S_IOERR, 1));
        // SEG_MAX buffers are a request like any other (here: 63 KiB at sector 0).
        table.remove(1);
        assert_eq!(indirect(&table), (S_OK, 126 * 512 + 1));
        rig.still_works(&block);
    }

    #[test]
    fn a_request_over_the_size_limit_fails() {
        let rig = Rig::new(1 << 15);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 0);
        // 6 MiB of data in one request (two 3 MiB buffers over the same RAM).
        let out = rig.run(
            &block,
            &[vec![
                (HEADER, 16, 0),
                (0x10_0000, 3 << 20, WRITE),
                (0x10_0000, 3 << 20, WRITE),
                (STATUS, 1, WRITE),
            ]],
        );
        assert_eq!(out, [(S_IOERR, 1)]);
        rig.still_works(&block);
    }

    #[test]
    fn an_indirect_table_outside_guest_ram_returns_the_request_empty() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        let out = rig.run_raw(
            &block,
            &[RawDescriptor::from(SplitDescriptor::new(
                RAM + 0x1000,
                48,
                INDIRECT,
                0,
            ))],
            IoPath::Uring,
        );
        assert_eq!(out, [(0, 0)]);
        // A table that starts in RAM and runs past its end: its last descriptor is not read.
        rig.header(HEADER, T_IN, 0);
        rig.table(RAM - 32, &[(HEADER, 16, 0), (DATA, 512, WRITE | NEXT)]);
        let out = rig.run_raw(
            &block,
            &[RawDescriptor::from(SplitDescriptor::new(
                RAM - 32,
                48,
                INDIRECT,
                0,
            ))],
            IoPath::Uring,
        );
        assert_eq!(out, [(0, 0)]);
        rig.still_works(&block);
    }

    #[test]
    fn a_nested_indirect_table_returns_the_request_empty() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 0);
        rig.table(
            TABLE + 0x100,
            &[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
        );
        rig.table(TABLE, &[(TABLE + 0x100, 48, INDIRECT)]);
        let out = rig.run_raw(
            &block,
            &[RawDescriptor::from(SplitDescriptor::new(
                TABLE, 16, INDIRECT, 0,
            ))],
            IoPath::Uring,
        );
        assert_eq!(out, [(0, 0)]);
        rig.still_works(&block);
    }

    #[test]
    fn an_indirect_table_of_a_wrong_length_returns_the_request_empty() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 0);
        rig.table(
            TABLE,
            &[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
        );
        let out = rig.run_raw(
            &block,
            &[RawDescriptor::from(SplitDescriptor::new(
                TABLE, 40, INDIRECT, 0,
            ))],
            IoPath::Uring,
        );
        assert_eq!(out, [(0, 0)]);
        // The same table with its right length works.
        let out = rig.run_raw(
            &block,
            &[RawDescriptor::from(SplitDescriptor::new(
                TABLE, 48, INDIRECT, 0,
            ))],
            IoPath::Uring,
        );
        assert_eq!(out, [(0, 513)]);
    }

    #[test]
    fn a_readable_buffer_after_a_writable_one_fails() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, T_OUT, 0);
        let out = rig.run(
            &block,
            &[vec![
                (HEADER, 16, 0),
                (DATA, 512, WRITE),
                (DATA + 512, 512, 0),
                (STATUS, 1, WRITE),
            ]],
        );
        assert_eq!(out, [(S_IOERR, 1)]);
        rig.still_works(&block);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_says_so_in_its_features() {
        let rig = Rig::new(8);
        let block = rig.block(true);
        assert_ne!(block.device_features() & 1 << F_RO, 0);
        assert_eq!(
            block.device_features() & (1 << F_DISCARD | 1 << F_WRITE_ZEROES),
            0
        );
        rig.memory
            .write_slice(&[0x55; 512], GuestAddress(DATA))
            .unwrap();
        rig.header(HEADER, T_OUT, 0);
        rig.header(HEADER + 0x100, T_WRITE_ZEROES, 0);
        rig.memory
            .write_slice(&segment(0, 1, 0), GuestAddress(DATA + 0x1000))
            .unwrap();
        let out = rig.run(
            &block,
            &[
                request(HEADER, Some((DATA, 512, 0)), STATUS),
                request(HEADER + 0x100, Some((DATA + 0x1000, 16, 0)), STATUS + 1),
            ],
        );
        assert_eq!(out, [(S_IOERR, 1), (S_UNSUPP, 1)]);
        let mut on_disk = vec![0u8; 512];
        std::os::unix::fs::FileExt::read_exact_at(block.disk.as_ref(), &mut on_disk, 0).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0));
        rig.still_works(&block);
    }

    #[test]
    fn discard_and_write_zeroes_are_offered_with_their_limits_and_zero_the_sectors() {
        let rig = Rig::new(64);
        let block = rig.block(false);
        // The test image is on a file system that can punch holes (ext4, tmpfs, xfs, btrfs).
        assert!(block.zeroing.punch_hole, "{:?}", block.zeroing);
        let features = block.device_features();
        assert_ne!(features & 1 << F_DISCARD, 0);
        assert_ne!(features & 1 << F_WRITE_ZEROES, 0);
        let field = |offset: usize, len: usize| {
            let mut b = [0u8; 4];
            block.read_config(offset as u64, &mut b[..len]);
            u32::from_le_bytes(b)
        };
        use std::mem::offset_of;
        for (offset, len, want) in [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                4,
                MAX_ZEROING_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                4,
                MAX_ZEROING_SEG,
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                4,
                8,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                4,
                MAX_ZEROING_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                4,
                MAX_ZEROING_SEG,
            ),
            (offset_of!(virtio_blk_config, write_zeroes_may_unmap), 1, 1),
            // virtio 1.x: max_discard_sectors is at byte 36, write_zeroes_may_unmap at 56.
            (36, 4, MAX_ZEROING_SECTORS),
            (56, 1, 1),
        ] {
            assert_eq!(field(offset, len), want, "configuration byte {offset}");
        }

        let fill = || {
            std::os::unix::fs::FileExt::write_all_at(block.disk.as_ref(), &[0x77; 64 * 512], 0)
                .unwrap();
        };
        let sectors = || {
            let mut all = vec![0u8; 64 * 512];
            std::os::unix::fs::FileExt::read_exact_at(block.disk.as_ref(), &mut all, 0).unwrap();
            all.chunks(512)
                .map(|s| s.iter().all(|&b| b == 0))
                .collect::<Vec<bool>>()
        };
        for (kind, flags) in [
            (T_DISCARD, 0),
            (T_WRITE_ZEROES, 0),
            (T_WRITE_ZEROES, FLAG_UNMAP),
        ] {
            fill();
            let mut segs = Vec::new();
            segs.extend_from_slice(&segment(8, 8, flags));
            segs.extend_from_slice(&segment(40, 3, flags));
            rig.memory.write_slice(&segs, GuestAddress(DATA)).unwrap();
            rig.header(HEADER, kind, 0);
            let out = rig.run(&block, &[request(HEADER, Some((DATA, 32, 0)), STATUS)]);
            assert_eq!(out, [(S_OK, 1)], "type {kind} flags {flags}");
            let zero = sectors();
            for (s, z) in zero.iter().enumerate() {
                assert_eq!(
                    *z,
                    (8..16).contains(&s) || (40..43).contains(&s),
                    "type {kind} sector {s}"
                );
            }
        }
    }

    #[test]
    fn bad_discard_and_write_zeroes_segments_fail_as_the_spec_says_and_change_nothing() {
        let rig = Rig::new(64);
        let block = rig.block(false);
        std::os::unix::fs::FileExt::write_all_at(block.disk.as_ref(), &[0x77; 64 * 512], 0)
            .unwrap();
        let cases: Vec<(u32, Vec<u8>, u8)> = vec![
            // Unmap on a discard, and unknown flags: unsupported.
            (T_DISCARD, segment(0, 1, FLAG_UNMAP).to_vec(), S_UNSUPP),
            (T_WRITE_ZEROES, segment(0, 1, 2).to_vec(), S_UNSUPP),
            // Past the end of the disk, or a first good segment and a second bad one.
            (T_DISCARD, segment(60, 8, 0).to_vec(), S_IOERR),
            (
                T_WRITE_ZEROES,
                [segment(0, 8, 0), segment(u64::MAX, 2, 0)].concat(),
                S_IOERR,
            ),
            // More sectors than max_*_sectors.
            (
                T_DISCARD,
                segment(0, MAX_ZEROING_SECTORS + 1, 0).to_vec(),
                S_IOERR,
            ),
            // Not a whole number of segments, or none.
            (T_DISCARD, segment(0, 1, 0)[..12].to_vec(), S_IOERR),
            // More segments than max_*_seg.
            (
                T_WRITE_ZEROES,
                segment(0, 1, 0).repeat(MAX_ZEROING_SEG as usize + 1),
                S_UNSUPP,
            ),
        ];
        for (kind, segs, want) in cases {
            rig.memory.write_slice(&segs, GuestAddress(DATA)).unwrap();
            rig.header(HEADER, kind, 0);
            let chain = if segs.len() < 16 {
                vec![(HEADER, 16 + segs.len() as u32, 0), (STATUS, 1, WRITE)]
            } else {
                request(HEADER, Some((DATA, segs.len() as u32, 0)), STATUS)
            };
            let out = rig.run(&block, &[chain]);
            assert_eq!(
                out,
                [(want, 1)],
                "type {kind}, {} bytes of segments",
                segs.len()
            );
        }
        let mut all = vec![0u8; 64 * 512];
        std::os::unix::fs::FileExt::read_exact_at(block.disk.as_ref(), &mut all, 0).unwrap();
        assert!(
            all.iter().all(|&b| b == 0x77),
            "no bad request zeroed anything"
        );
    }

    #[test]
    fn a_pause_returns_only_when_every_request_is_in_the_used_ring() {
        let rig = Rig::new(256);
        for aio in [AioMode::Threads, AioMode::IoUring] {
            let mut cfg = rig.config(false);
            cfg.aio = aio;
            let file = cfg.open().unwrap();
            let mut block = Block::with_disk(cfg, file).unwrap();
            let mock = MockSplitQueue::new(rig.memory.as_ref(), QUEUE);
            let mut descs = Vec::new();
            for i in 0..16u16 {
                let at = u64::from(i);
                rig.header(
                    HEADER + at * 0x20,
                    if i % 2 == 0 { T_OUT } else { T_IN },
                    at * 8,
                );
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    HEADER + at * 0x20,
                    16,
                    NEXT,
                    3 * i + 1,
                )));
                let data_flags = if i % 2 == 0 { NEXT } else { NEXT | WRITE };
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    0x20_0000 + at * 0x1_0000,
                    0x1_0000,
                    data_flags,
                    3 * i + 2,
                )));
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    STATUS + at,
                    1,
                    WRITE,
                    0,
                )));
            }
            mock.add_desc_chains(&descs, 0).unwrap();
            let queue = Arc::new(Mutex::new(mock.create_queue::<Queue>().unwrap()));
            block
                .activate(Activation {
                    features: 0,
                    queues: vec![(queue.clone(), Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))],
                    memory: rig.memory.clone(),
                    interrupt: rig.interrupt.clone(),
                })
                .unwrap();
            // The worker starts paused; resuming looks at the queue once (as after a restore),
            // then the pause must wait for all 16.
            VirtioDevice::resume(&mut block);
            VirtioDevice::pause(&mut block);
            assert_eq!(
                mock.used().idx().load(),
                16,
                "aio {aio:?}: all returned by the pause"
            );
            assert_eq!(lock(&queue).next_used(), 16);
            for i in 0..16 {
                assert_eq!(
                    rig.memory.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
                    S_OK
                );
            }
            VirtioDevice::reset(&mut block);
        }
    }

    /// Host-side throughput of the device alone (no guest): batches of `DEPTH` requests made
    /// available at once, each batch run until the used ring has all of them, on a 256 MiB
    /// image in the page cache. Prints requests/s and MiB/s for preadv/pwritev and io_uring.
    #[test]
    #[ignore = "benchmark: cargo test --release -p vmm device_throughput -- --ignored --nocapture"]
    fn device_throughput_sync_vs_io_uring() {
        const DEPTH: u16 = 8;
        const SECTORS: u64 = 256 << 11;
        let rig = Rig::new(SECTORS);
        let block = rig.block(false);
        std::os::unix::fs::FileExt::write_all_at(block.disk.as_ref(), &vec![1u8; 256 << 20], 0)
            .unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (what, kind, bytes, sequential) in [
            ("4 KiB random writes", T_OUT, 4096u32, false),
            ("4 KiB random reads", T_IN, 4096, false),
            ("64 KiB sequential writes", T_OUT, 65536, true),
            ("64 KiB sequential reads", T_IN, 65536, true),
        ] {
            for path in [IoPath::Sync, IoPath::Uring] {
                let mock = MockSplitQueue::new(rig.memory.as_ref(), 256);
                let data_flags = if kind == T_IN { WRITE } else { 0 };
                for c in 0..DEPTH {
                    let at = u64::from(c);
                    let descs = [
                        (HEADER + at * 0x20, 16, NEXT, 3 * c + 1),
                        (
                            0x20_0000 + at * 0x1_0000,
                            bytes,
                            NEXT | data_flags,
                            3 * c + 2,
                        ),
                        (STATUS + at, 1, WRITE, 0),
                    ];
                    for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
                        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
                        mock.desc_table().store(3 * c + i as u16, d).unwrap();
                    }
                }
                // The mock's own used ring overlaps its avail ring past 64 entries: the used
                // ring goes at USED instead.
                const USED: u64 = 0x4000;
                let mut queue = Queue::new(256).unwrap();
                queue.set_desc_table_address(Some(mock.desc_table_addr().0 as u32), Some(0));
                queue.set_avail_ring_address(Some(mock.avail_addr().0 as u32), Some(0));
                queue.set_used_ring_address(Some(USED as u32), Some(0));
                queue.set_ready(true);
                let mut rq = rig.request_queue(&block, queue, path);
                let avail = mock.avail_addr().0;
                let per_request = u64::from(bytes) / 512;
                let (mut idx, mut next_sector, mut done) = (0u16, 0u64, 0u64);
                let start = std::time::Instant::now();
                while start.elapsed() < std::time::Duration::from_secs(2) {
                    for c in 0..DEPTH {
                        let sector = if sequential {
                            next_sector = (next_sector + per_request) % SECTORS;
                            next_sector
                        } else {
                            random() % (SECTORS / per_request) * per_request
                        };
                        rig.header(HEADER + u64::from(c) * 0x20, kind, sector);
                        let slot = GuestAddress(avail + 4 + 2 * u64::from(idx % 256));
                        rig.memory.write_obj(3 * c, slot).unwrap();
                        idx = idx.wrapping_add(1);
                    }
                    rig.memory.write_obj(idx, GuestAddress(avail + 2)).unwrap();
                    rq.process();
                    rq.drain();
                    done += u64::from(DEPTH);
                }
                let secs = start.elapsed().as_secs_f64();
                let used: u16 = rig.memory.read_obj(GuestAddress(USED + 2)).unwrap();
                assert_eq!(used, idx, "every request returned");
                println!(
                    "device-throughput {what:<26} depth {DEPTH} {:<26} {:>9.0} requests/s {:>8.1} MiB/s",
                    path.to_string(),
                    done as f64 / secs,
                    done as f64 * f64::from(bytes) / secs / (1 << 20) as f64
                );
            }
        }
    }

    #[test]
    fn o_direct_takes_aligned_guest_buffers_as_they_are_and_bounces_the_others() {
        let rig = Rig::new(64);
        let mem = rig.memory.as_ref();
        let io = |segs: &[(u64, usize)]| {
            let segs: Vec<Segment> = segs.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
            iovecs(mem, &segs, 0).unwrap()
        };
        let sector = DirectAlign {
            offset: 512,
            memory: 512,
        };
        let bounced = |t: Option<Transfer>| t.map(|t| t.bounce.is_some());
        let direct = |segs: &[(u64, usize)], offset| {
            bounced(Transfer::new(offset, io(segs), false, Some(sector), 0))
        };
        assert_eq!(direct(&[(DATA, 1024)], 512), Some(false));
        assert_eq!(direct(&[(DATA, 512), (DATA + 0x2000, 512)], 0), Some(false));
        // A buffer at an odd address, or buffers whose lengths are not whole blocks.
        assert_eq!(direct(&[(DATA + 1, 1024)], 0), Some(true));
        assert_eq!(direct(&[(DATA, 256), (DATA + 0x2000, 768)], 0), Some(true));
        // Buffered I/O takes anything.
        assert_eq!(
            bounced(Transfer::new(0, io(&[(DATA + 1, 100)]), false, None, 0)),
            Some(false)
        );
        // On a disk of 4 KiB blocks, a request at a sector inside a block cannot be done.
        let page = DirectAlign {
            offset: 4096,
            memory: 4096,
        };
        assert!(Transfer::new(512, io(&[(DATA, 4096)]), false, Some(page), 0).is_none());
        // A write's data is in the bounce buffer when the transfer is made.
        rig.memory
            .write_slice(&[0x5a; 1024], GuestAddress(DATA + 3))
            .unwrap();
        let mut t = Transfer::new(0, io(&[(DATA + 3, 1024)]), true, Some(sector), 0).unwrap();
        let (buf, _) = t.bounce.as_mut().unwrap();
        assert_eq!(buf.as_mut_slice(), &[0x5a; 1024][..]);
        assert!((buf.as_mut_slice().as_ptr() as usize).is_multiple_of(4096));
    }

    #[test]
    fn bounce_buffers_in_flight_on_io_uring_are_capped() {
        let Ok(mut engine) = Engine::new(IoPath::Uring) else {
            eprintln!("io_uring is not available here: nothing to cap");
            return;
        };
        let rig = Rig::new(64);
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(&rig.disk.path)
            .unwrap();
        let sector = DirectAlign {
            offset: 512,
            memory: 512,
        };
        // 1 MiB from an odd guest address: always bounced.
        const BYTES: usize = 1 << 20;
        let write = || {
            let guest = iovecs(&rig.memory, &[(GuestAddress(DATA + 1), BYTES)], 0).unwrap();
            Work::Write(Transfer::new(0, guest, true, Some(sector), 0).unwrap())
        };
        let reply = Reply {
            head: 0,
            status: None,
            data_len: 0,
        };
        let fits = MAX_BOUNCE_IN_FLIGHT / BYTES;
        for i in 0..fits {
            assert!(
                engine.start(&disk, reply, write()).is_none(),
                "bounced write {i} should go to io_uring"
            );
        }
        assert_eq!(engine.in_flight(), fits);
        // One more would go over the cap: carried out at once on this thread.
        assert_eq!(engine.start(&disk, reply, write()), Some((S_OK, 0)));
        assert_eq!(engine.in_flight(), fits);
        engine.submit();
        let mut done = 0;
        while done < fits {
            assert!(engine.wait());
            done += engine.reap().len();
        }
        let Engine::Uring(u) = &engine else {
            unreachable!()
        };
        assert_eq!(
            u.bounced, 0,
            "every bounce buffer is accounted for once reaped"
        );
        // Room again: the next one goes to io_uring.
        assert!(engine.start(&disk, reply, write()).is_none());
    }

    #[test]
    fn cache_none_opens_the_image_o_direct_and_unaligned_guest_buffers_still_work() {
        let rig = Rig::on_disk(64);
        let block = rig.block_with_cache(CacheMode::parse("none").unwrap());
        let align = block.direct.expect("cache=none asks for O_DIRECT");
        eprintln!("O_DIRECT alignment of the test image: {align:?}");
        let flags = nix::fcntl::fcntl(block.disk.as_ref(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(flags & libc::O_DIRECT, 0, "the image is open with O_DIRECT");
        assert_ne!(
            block.device_features() & 1 << F_FLUSH,
            0,
            "a write cache to flush"
        );
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 253) as u8).collect();
        // Written from three buffers at odd addresses with odd lengths, read back into one
        // at an odd address, on both I/O paths (`run` checks that they agree).
        rig.memory
            .write_slice(&pattern[..100], GuestAddress(DATA + 1))
            .unwrap();
        rig.memory
            .write_slice(&pattern[100..612], GuestAddress(DATA + 0x2003))
            .unwrap();
        rig.memory
            .write_slice(&pattern[612..], GuestAddress(DATA + 0x4005))
            .unwrap();
        rig.header(HEADER, T_OUT, 8);
        let out = rig.run(
            &block,
            &[vec![
                (HEADER, 16, 0),
                (DATA + 1, 100, 0),
                (DATA + 0x2003, 512, 0),
                (DATA + 0x4005, 412, 0),
                (STATUS, 1, WRITE),
            ]],
        );
        assert_eq!(out, [(S_OK, 1)]);
        let mut on_disk = vec![0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&rig.disk.path).unwrap(),
            &mut on_disk,
            8 * 512,
        )
        .unwrap();
        assert_eq!(on_disk, pattern);
        rig.header(HEADER, T_IN, 8);
        let out = rig.run(
            &block,
            &[request(HEADER, Some((0x20_0007, 1024, WRITE)), STATUS)],
        );
        assert_eq!(out, [(S_OK, 1025)]);
        let mut back = vec![0u8; 1024];
        rig.memory
            .read_slice(&mut back, GuestAddress(0x20_0007))
            .unwrap();
        assert_eq!(back, pattern);
        rig.still_works(&block);
    }

    #[test]
    fn cache_modes_offer_flush_as_qemu_does_and_unsafe_ignores_it() {
        let rig = Rig::new(64);
        let features = |mode| {
            rig.block_with_cache(CacheMode::parse(mode).unwrap())
                .device_features()
                & 1 << F_FLUSH
        };
        assert_ne!(features("writeback"), 0);
        assert_ne!(features("unsafe"), 0);
        assert_eq!(features("writethrough"), 0, "every write is durable");
        // writethrough: writes go with RWF_DSYNC and land; unsafe: a flush is answered OK.
        for mode in ["writethrough", "unsafe"] {
            let block = rig.block_with_cache(CacheMode::parse(mode).unwrap());
            rig.memory
                .write_slice(&[0x33; 512], GuestAddress(DATA))
                .unwrap();
            rig.header(HEADER, T_OUT, 1);
            rig.header(HEADER + 0x100, T_FLUSH, 0);
            let out = rig.run(
                &block,
                &[
                    request(HEADER, Some((DATA, 512, 0)), STATUS),
                    request(HEADER + 0x100, None, STATUS + 1),
                ],
            );
            assert_eq!(out, [(S_OK, 1), (S_OK, 1)], "cache={mode}");
            let mut on_disk = vec![0u8; 512];
            std::os::unix::fs::FileExt::read_exact_at(block.disk.as_ref(), &mut on_disk, 512)
                .unwrap();
            assert_eq!(on_disk, [0x33; 512], "cache={mode}");
        }
        assert_eq!(CacheMode::parse("bogus"), None);
    }

    /// A loop device over a file, detached on drop.
    struct LoopDevice(std::path::PathBuf);

    impl LoopDevice {
        /// `None`, saying why, where loop devices cannot be made (no `losetup`, not root).
        fn attach(file: &std::path::Path) -> Option<Self> {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output();
            let why = match out {
                Ok(o) if o.status.success() => {
                    let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
                    return Some(LoopDevice(name.into()));
                }
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => format!("no losetup: {e}"),
            };
            eprintln!("skipped: cannot make a loop device ({why})");
            None
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn a_block_device_has_its_size_and_discards_and_zeroes_through_its_ioctls() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let rig = Rig::on_disk(2048);
        let Some(device) = LoopDevice::attach(&rig.disk.path) else {
            return;
        };
        let mut cfg = rig.config(false);
        cfg.source = DiskSource::Path(device.0.clone());
        let block = Block::with_disk(cfg.clone(), cfg.open().unwrap()).unwrap();
        assert_eq!(block.capacity_sectors, 2048, "BLKGETSIZE64");
        let can_discard = discard_max_bytes(std::fs::metadata(&device.0).unwrap().rdev())
            .expect("a loop device has queue limits in sysfs")
            > 0;
        let features = block.device_features();
        assert_eq!(features & 1 << F_DISCARD != 0, can_discard);
        assert_ne!(features & 1 << F_WRITE_ZEROES, 0, "BLKZEROOUT always works");
        let mut may_unmap = [0xffu8];
        block.read_config(
            std::mem::offset_of!(virtio_blk_config, write_zeroes_may_unmap) as u64,
            &mut may_unmap,
        );
        assert_eq!(
            may_unmap,
            [0],
            "zeroes are written, never assumed from a discard"
        );
        let disk = block.disk.as_ref();
        let zeroed = |what: &str, ranges: &[std::ops::Range<usize>]| {
            let mut all = vec![0u8; 64 * 512];
            disk.read_exact_at(&mut all, 0).unwrap();
            for (s, sector) in all.chunks(512).enumerate() {
                let want_zero = ranges.iter().any(|r| r.contains(&s));
                let value = if want_zero { 0 } else { 0x77 };
                assert!(sector.iter().all(|&b| b == value), "{what}: sector {s}");
            }
        };
        let mut kinds = vec![(T_WRITE_ZEROES, 0), (T_WRITE_ZEROES, FLAG_UNMAP)];
        if can_discard {
            kinds.push((T_DISCARD, 0));
        }
        for (kind, flags) in kinds {
            disk.write_all_at(&[0x77; 64 * 512], 0).unwrap();
            disk.sync_data().unwrap();
            let segs = [segment(8, 8, flags), segment(40, 3, flags)].concat();
            rig.memory.write_slice(&segs, GuestAddress(DATA)).unwrap();
            rig.header(HEADER, kind, 0);
            let out = rig.run(&block, &[request(HEADER, Some((DATA, 32, 0)), STATUS)]);
            assert_eq!(out, [(S_OK, 1)], "type {kind} flags {flags}");
            // A loop device over a file punches holes for a discard: zeroes there too.
            zeroed(&format!("type {kind} flags {flags}"), &[8..16, 40..43]);
        }
        rig.still_works(&block);
    }

    #[test]
    fn aio_chooses_the_io_path() {
        let rig = Rig::new(8);
        assert_eq!(AioMode::parse("threads"), Some(AioMode::Threads));
        assert_eq!(AioMode::parse("io_uring"), Some(AioMode::IoUring));
        assert_eq!(AioMode::parse("native"), Some(AioMode::IoUring));
        assert_eq!(AioMode::parse("posix"), None);
        let mut cfg = rig.config(false);
        cfg.aio = AioMode::Threads;
        let file = cfg.open().unwrap();
        assert_eq!(Block::with_disk(cfg, file).unwrap().io_path, IoPath::Sync);
        // The default is the path measured faster here (preadv/pwritev); io_uring on request
        // (this host has it).
        assert_eq!(rig.block(false).io_path, IoPath::Sync);
        let mut cfg = rig.config(false);
        cfg.aio = AioMode::IoUring;
        let file = cfg.open().unwrap();
        assert_eq!(Block::with_disk(cfg, file).unwrap().io_path, IoPath::Uring);
    }

    #[test]
    fn a_restore_takes_the_same_open_disk_or_refuses() {
        use crate::devices::HandedOverFds;
        let rig = Rig::new(16);
        let block = rig.block(false);
        let saved = block.save();
        let test_context = crate::devices::TestContext::new();
        let make_ctx = |host_fds| test_context.context(rig.memory.clone(), host_fds);
        // A live update carried the fd: the image's path no longer matters.
        let dup = block.disk.try_clone().unwrap();
        let moved = rig.disk.path.with_extension("moved");
        std::fs::rename(&rig.disk.path, &moved).unwrap();
        let mut ctx = make_ctx(HandedOverFds::new(vec![(
            "drive:d0".into(),
            std::os::fd::OwnedFd::from(dup),
        )]));
        let restored = Block::restore(&mut ctx, &rig.config(false), &saved).unwrap();
        assert_eq!(restored.capacity_sectors, 16);
        // A live update that lost the fd fails instead of opening a path.
        let mut ctx = make_ctx(HandedOverFds::new(Vec::new()));
        assert!(matches!(
            Block::restore(&mut ctx, &rig.config(false), &saved),
            Err(DeviceError::MissingHostFd(_))
        ));
        // A restore from a file opens the path; a disk of another size is refused.
        std::fs::rename(&moved, &rig.disk.path).unwrap();
        let mut ctx = make_ctx(HandedOverFds::default());
        assert!(Block::restore(&mut ctx, &rig.config(false), &saved).is_ok());
        std::fs::File::options()
            .write(true)
            .open(&rig.disk.path)
            .unwrap()
            .set_len(32 * 512)
            .unwrap();
        let mut ctx = make_ctx(HandedOverFds::default());
        let e = Block::restore(&mut ctx, &rig.config(false), &saved)
            .err()
            .unwrap();
        assert!(e.to_string().contains("32 sectors"), "{e}");
    }
}
