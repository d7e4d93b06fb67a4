//! virtio-blk (virtio 1.x section 5.2): a raw disk image or block device as the guest's disk.
//!
//! Requests (one descriptor chain each):
//!
//! ```text
//! device-readable   type u32 | reserved u32 | sector u64     (16 bytes)
//!                   data (OUT: what to write; DISCARD/WRITE_ZEROES: segments)
//! device-writable   data (IN: what was read; GET_ID: 20 bytes)
//!                   status u8                                 (last byte: OK 0, IOERR 1, UNSUPP 2)
//! ```
//!
//! Configuration space: capacity u64 (512-byte sectors) at 0, seg_max u32 at 12, blk_size u32
//! at 20. One request queue, worked on an I/O thread woken by the queue's ioeventfd; every
//! request completes before the device pauses, so a saved device has nothing in flight and the
//! queue's ring positions are all the state it needs.
//!
//! The disk is a host fd the device owns (a preserved fd in every migration mode): a live update
//! hands the very same open file to the next VMM, so a disk image renamed, replaced or unlinked
//! after start keeps being the guest's disk. Only a restore from a file in a new process opens
//! the path again.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Activation, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::devices::{DeviceContext, DeviceError, HostFd, Persist, lock};

pub const VIRTIO_ID_BLOCK: u16 = 2;
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (the chain also has the header and status).
const SEG_MAX: u32 = 126;
/// The largest request accepted: a hostile driver cannot make the device allocate more.
const MAX_REQUEST_BYTES: usize = 4 << 20;
const ID_BYTES: usize = 20;

const F_SEG_MAX: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_SEG_MAX;
const F_RO: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
const F_BLK_SIZE: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_BLK_SIZE;
const F_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

const T_IN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
const T_OUT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
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
}

impl BlockConfig {
    fn host_fd_name(&self) -> String {
        format!("drive:{}", self.id)
    }

    /// Opens the image (a path with the access the disk needs; a passed fd as a duplicate,
    /// close-on-exec, so the fd set keeps its own).
    pub fn open_for_check(&self) -> std::io::Result<File> {
        match &self.source {
            DiskSource::Path(p) => std::fs::OpenOptions::new()
                .read(true)
                .write(!self.read_only)
                .open(p),
            DiskSource::Fd(fd) => {
                // The -add-fd check found it open, and nothing in this process closes it.
                // SAFETY: the fd is open for the duration of this borrow (see above).
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                borrowed.try_clone_to_owned().map(File::from)
            }
        }
    }

    fn open(&self) -> Result<File, DeviceError> {
        self.open_for_check()
            .map_err(|e| DeviceError::Setup(format!("drive '{}': {}: {e}", self.id, self.source)))
    }
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

pub struct Block {
    config: BlockConfig,
    disk: Arc<File>,
    capacity_sectors: u64,
    worker: Option<Worker>,
}

/// The I/O thread and how to talk to it.
struct Worker {
    commands: Sender<Command>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

enum Command {
    Pause(Sender<()>),
    Resume,
    Stop,
}

impl Block {
    fn with_disk(config: BlockConfig, disk: File) -> Result<Self, DeviceError> {
        let len = disk
            .metadata()
            .map(|m| m.len())
            .map_err(|e| DeviceError::Setup(format!("drive '{}': {e}", config.id)))?;
        let len = if len == 0 {
            // A block device reports its size through seeking to its end.
            block_device_size(&disk).unwrap_or(0)
        } else {
            len
        };
        Ok(Block {
            capacity_sectors: len / SECTOR_SIZE,
            config,
            disk: Arc::new(disk),
            worker: None,
        })
    }

    fn stop_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
            let _ = w.commands.send(Command::Stop);
            let _ = w.wake.write(1);
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn block_device_size(file: &File) -> Option<u64> {
    use std::io::Seek;
    let mut f = file.try_clone().ok()?;
    f.seek(std::io::SeekFrom::End(0)).ok()
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
        let mut f = 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH | 1 << VIRTIO_RING_F_EVENT_IDX;
        if self.config.read_only {
            f |= 1 << F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 24];
        space[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        space[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| space.get(o + i))
                .copied()
                .unwrap_or(0);
        }
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
        let wake = Arc::new(
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| VirtioError::Device(format!("creating an eventfd: {e}")))?,
        );
        let (tx, rx) = channel();
        let mut io = RequestQueue {
            queue,
            notify,
            wake: wake.clone(),
            memory: activation.memory,
            interrupt: activation.interrupt,
            disk: self.disk.clone(),
            capacity_sectors: self.capacity_sectors,
            read_only: self.config.read_only,
            serial: self.config.serial.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("blk-{}", self.config.id))
            .spawn(move || io.run(rx))
            .map_err(|e| VirtioError::Device(format!("starting the I/O thread: {e}")))?;
        self.worker = Some(Worker {
            commands: tx,
            wake,
            thread: Some(thread),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn pause(&mut self) {
        if let Some(w) = &self.worker {
            let (ack, done) = channel();
            if w.commands.send(Command::Pause(ack)).is_ok() {
                let _ = w.wake.write(1);
                // The thread answers once the request it is on (if any) has completed.
                let _ = done.recv();
            }
        }
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            let _ = w.commands.send(Command::Resume);
            let _ = w.wake.write(1);
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// The I/O thread's view: the queue, guest memory, the disk.
struct RequestQueue {
    queue: Arc<Mutex<Queue>>,
    notify: Arc<EventFd>,
    wake: Arc<EventFd>,
    memory: Arc<GuestMemoryMmap>,
    interrupt: Arc<VirtioInterrupt>,
    disk: Arc<File>,
    capacity_sectors: u64,
    read_only: bool,
    serial: String,
}

const TOKEN_NOTIFY: u64 = 1;
const TOKEN_WAKE: u64 = 2;

impl RequestQueue {
    /// Starts paused: the transport resumes it when the guest runs.
    fn run(&mut self, commands: Receiver<Command>) {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                log::error!("virtio-blk: epoll: {e}; the disk does not work");
                return;
            }
        };
        for (fd, token) in [
            (self.notify.as_raw_fd(), TOKEN_NOTIFY),
            (self.wake.as_raw_fd(), TOKEN_WAKE),
        ] {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                log::error!("virtio-blk: epoll: {e}; the disk does not work");
                return;
            }
        }
        let mut running = false;
        let mut events = [EpollEvent::default(); 4];
        loop {
            // Commands first: a pause must not start another request.
            loop {
                match commands.try_recv() {
                    Ok(Command::Pause(ack)) => {
                        running = false;
                        let _ = ack.send(());
                    }
                    Ok(Command::Resume) => {
                        running = true;
                        // Anything queued while paused (no kick is lost).
                        self.process();
                    }
                    Ok(Command::Stop) | Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                }
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-blk: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                    }
                    TOKEN_NOTIFY => {
                        let _ = self.notify.read();
                        if running {
                            self.process();
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Completes every request the driver has made available.
    fn process(&mut self) {
        let mut queue = lock(&self.queue);
        let mem = self.memory.as_ref();
        loop {
            // With EVENT_IDX, notifications are off while the ring is drained, then on again;
            // a request that raced in is seen by the re-check.
            if let Err(e) = queue.disable_notification(mem) {
                log::warn!("virtio-blk: {e:?}");
            }
            let mut completed = 0;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let written = self.execute(chain);
                if let Err(e) = queue.add_used(mem, head, written) {
                    log::warn!("virtio-blk: returning request {head}: {e:?}");
                }
                completed += 1;
            }
            if completed > 0 && queue.needs_notification(mem).unwrap_or(true) {
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

    /// Runs one request; returns the bytes written into the chain (data + status).
    fn execute(&self, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let mem = self.memory.as_ref();
        let (reader, writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            // Descriptors outside guest RAM, or lengths that overflow: nothing can be answered.
            _ => return 0,
        };
        let mut reader = reader;
        let mut writer = writer;
        if writer.available_bytes() == 0 {
            return 0;
        }
        let data_len = writer.available_bytes() - 1;
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            return 0;
        };
        let (status, written) = match reader.read_obj::<RequestHeader>() {
            Ok(h) => self.request(h, &mut reader, &mut writer, data_len),
            Err(_) => (S_IOERR, 0),
        };
        let _ = status_writer.write_obj(status);
        (written + 1) as u32
    }

    fn request(
        &self,
        header: RequestHeader,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
        data_len: usize,
    ) -> (u8, usize) {
        match header.kind {
            T_IN => {
                let Some(offset) = self.range(header.sector, data_len) else {
                    return (S_IOERR, 0);
                };
                let mut buf = vec![0u8; data_len];
                if self.disk.read_exact_at(&mut buf, offset).is_err()
                    || writer.write_all(&buf).is_err()
                {
                    return (S_IOERR, 0);
                }
                (S_OK, data_len)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                let len = reader.available_bytes();
                let Some(offset) = self.range(header.sector, len) else {
                    return (S_IOERR, 0);
                };
                let mut buf = vec![0u8; len];
                if reader.read_exact(&mut buf).is_err()
                    || self.disk.write_all_at(&buf, offset).is_err()
                {
                    return (S_IOERR, 0);
                }
                (S_OK, 0)
            }
            T_FLUSH => match self.disk.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let bytes = self.serial.as_bytes();
                let n = bytes.len().min(ID_BYTES);
                id[..n].copy_from_slice(&bytes[..n]);
                let n = data_len.min(ID_BYTES);
                if writer.write_all(&id[..n]).is_err() {
                    return (S_IOERR, 0);
                }
                (S_OK, n)
            }
            _ => (S_UNSUPP, 0),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupts::GsiRouter;
    use crate::devices::pci::msix::Msix;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x12_0000;

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
                let path = std::env::temp_dir().join(format!(
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
        fn new(sectors: u64) -> Self {
            let memory =
                Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
            let kvm = kvm_ioctls::Kvm::new().unwrap();
            let vm = Arc::new(kvm.create_vm().unwrap());
            vm.create_irq_chip().unwrap();
            let router = GsiRouter::new(vm);
            let msix = Arc::new(Mutex::new(Msix::new(2, &router).unwrap()));
            let interrupt = Arc::new(VirtioInterrupt::new(msix, &[super::super::NO_VECTOR]));
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
            }
        }

        fn block(&self, read_only: bool) -> Block {
            let cfg = self.config(read_only);
            let file = cfg.open().unwrap();
            Block::with_disk(cfg, file).unwrap()
        }

        /// Queues one request per chain and runs the device over them; returns (status, used
        /// length) of each.
        fn run(&self, block: &Block, chains: &[Vec<(u64, u32, u16)>]) -> Vec<(u8, u32)> {
            let mock = MockSplitQueue::new(self.memory.as_ref(), 16);
            let mut descs = Vec::new();
            for chain in chains {
                let start = descs.len() as u16;
                for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                    let last = i + 1 == chain.len();
                    let flags = if last { flags } else { flags | NEXT };
                    let next = if last { 0 } else { start + i as u16 + 1 };
                    descs.push(RawDescriptor::from(SplitDescriptor::new(
                        addr, len, flags, next,
                    )));
                }
            }
            mock.add_desc_chains(&descs, 0).unwrap();
            let queue: Queue = mock.create_queue().unwrap();
            let mut rq = RequestQueue {
                queue: Arc::new(Mutex::new(queue)),
                notify: Arc::new(EventFd::new(0).unwrap()),
                wake: Arc::new(EventFd::new(0).unwrap()),
                memory: self.memory.clone(),
                interrupt: self.interrupt.clone(),
                disk: block.disk.clone(),
                capacity_sectors: block.capacity_sectors,
                read_only: block.config.read_only,
                serial: block.config.serial.clone(),
            };
            rq.process();
            let used = mock.used();
            let n = used.idx().load();
            assert_eq!(n as usize, chains.len(), "every request is returned");
            (0..n)
                .map(|i| {
                    let elem = used.ring().ref_at(i as usize).unwrap().load();
                    let len = elem.len();
                    // Each chain's status byte is its last descriptor.
                    let chain = &chains[i as usize];
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
    }

    fn request(header: u64, data: Option<(u64, u32, u16)>, status: u64) -> Vec<(u64, u32, u16)> {
        let mut c = vec![(header, 16, 0)];
        if let Some(d) = data {
            c.push(d);
        }
        c.push((status, 1, WRITE));
        c
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
        block.disk.read_exact_at(&mut on_disk, 1024).unwrap();
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
    fn bad_requests_fail_as_the_spec_says_and_the_device_goes_on() {
        let rig = Rig::new(8);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 7);
        rig.header(HEADER + 0x100, 99, 0);
        rig.header(HEADER + 0x200, T_OUT, 0);
        rig.header(HEADER + 0x300, T_IN, 0);
        let out = rig.run(
            &block,
            &[
                // Past the end of the disk.
                request(HEADER, Some((DATA, 1024, WRITE)), STATUS),
                // Unknown request type.
                request(HEADER + 0x100, None, STATUS + 1),
                // Data outside guest RAM (4 MiB here): not answered, but returned.
                request(HEADER + 0x200, Some((0x4000_0000, 512, 0)), STATUS + 2),
                // Not a whole number of sectors.
                request(HEADER + 0x300, Some((DATA, 100, WRITE)), STATUS + 3),
                // A header that does not fit in its descriptor.
                vec![(HEADER + 0x400, 4, 0), (STATUS + 4, 1, WRITE)],
            ],
        );
        assert_eq!(out[0], (S_IOERR, 1));
        assert_eq!(out[1], (S_UNSUPP, 1));
        assert_eq!(out[2].1, 0);
        assert_eq!(out[3], (S_IOERR, 1));
        assert_eq!(out[4], (S_IOERR, 1));
        // And the next good request works.
        rig.header(HEADER, T_IN, 0);
        let out = rig.run(&block, &[request(HEADER, Some((DATA, 512, WRITE)), STATUS)]);
        assert_eq!(out, [(S_OK, 513)]);
    }

    #[test]
    fn descriptor_loops_and_oversized_requests_are_contained() {
        let rig = Rig::new(64);
        let block = rig.block(false);
        rig.header(HEADER, T_IN, 0);
        rig.header(HEADER + 0x100, T_IN, 0);
        // A chain whose second descriptor points back at the first: the queue's walk is
        // bounded by its size, the request has no status byte to answer in, and is returned.
        let mock = MockSplitQueue::new(rig.memory.as_ref(), 16);
        let looped = [
            RawDescriptor::from(SplitDescriptor::new(HEADER, 16, NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, NEXT, 0)),
        ];
        mock.add_desc_chains(&looped, 0).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let mut rq = RequestQueue {
            queue: Arc::new(Mutex::new(queue)),
            notify: Arc::new(EventFd::new(0).unwrap()),
            wake: Arc::new(EventFd::new(0).unwrap()),
            memory: rig.memory.clone(),
            interrupt: rig.interrupt.clone(),
            disk: block.disk.clone(),
            capacity_sectors: block.capacity_sectors,
            read_only: false,
            serial: String::new(),
        };
        rq.process();
        assert!(mock.used().idx().load() <= 1);
        // 6 MiB of data in one request (two 3 MiB buffers over the same RAM): over the limit.
        let out = rig.run(
            &block,
            &[vec![
                (HEADER + 0x100, 16, 0),
                (0x10_0000, 3 << 20, WRITE),
                (0x10_0000, 3 << 20, WRITE),
                (STATUS, 1, WRITE),
            ]],
        );
        assert_eq!(out, [(S_IOERR, 1)]);
        // The device goes on.
        rig.header(HEADER, T_IN, 0);
        let out = rig.run(&block, &[request(HEADER, Some((DATA, 512, WRITE)), STATUS)]);
        assert_eq!(out, [(S_OK, 513)]);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_says_so_in_its_features() {
        let rig = Rig::new(8);
        let block = rig.block(true);
        assert_ne!(block.device_features() & 1 << F_RO, 0);
        rig.header(HEADER, T_OUT, 0);
        let out = rig.run(&block, &[request(HEADER, Some((DATA, 512, 0)), STATUS)]);
        assert_eq!(out, [(S_IOERR, 1)]);
    }

    #[test]
    fn a_restore_takes_the_same_open_disk_or_refuses() {
        use crate::devices::HandedOverFds;
        let rig = Rig::new(16);
        let block = rig.block(false);
        let saved = block.save();
        let console =
            crate::devices::console::Console::open(&crate::cli::SerialSpec::Null, |_, _| None)
                .unwrap()
                .output();
        let drained = Arc::new(EventFd::new(0).unwrap());
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let make_ctx = |host_fds| DeviceContext {
            vm: &vm,
            memory: rig.memory.clone(),
            interrupts: GsiRouter::new(vm.clone()),
            pci: crate::devices::pci::PciBus::new(),
            console: &console,
            input_drained: &drained,
            serial_irq: None,
            host_fds,
        };
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
