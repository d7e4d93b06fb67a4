//! Guest RAM: named, sealed memfds mapped `MAP_SHARED`, so the very same pages can be handed to
//! the next process across an exec (or over a socket) without copying.
//!
//! Layout (a PC): RAM starts at guest-physical 0; whatever does not fit below the 32-bit PCI hole
//! (3 GiB) goes to a second region at 4 GiB. Each region is one memfd with a stable name
//! (`guest-ram-low`, `guest-ram-high`), sealed against shrinking and growing so a receiver can
//! trust its size. The memfds are close-on-exec except during the update's own exec.

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::mman::{MmapAdvise, madvise};
use serde::{Deserialize, Serialize};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

pub const LOW_RAM_LIMIT: u64 = 3 << 30;
pub const HIGH_RAM_START: u64 = 4 << 30;
pub const LOW_REGION_NAME: &str = "guest-ram-low";
pub const HIGH_REGION_NAME: &str = "guest-ram-high";
/// The preserved-fd name of a `memory-backend-file`'s file (all regions in one fd).
pub const RAM_FILE_NAME: &str = "guest-ram-file";
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Where one RAM region sits; part of the machine description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub name: String,
    pub guest_addr: u64,
    pub size: u64,
}

/// The regions for `ram_size` bytes of RAM.
pub fn layout(ram_size: u64) -> Vec<RegionLayout> {
    let low = ram_size.min(LOW_RAM_LIMIT);
    let mut regions = vec![RegionLayout {
        name: LOW_REGION_NAME.to_string(),
        guest_addr: 0,
        size: low,
    }];
    if ram_size > low {
        regions.push(RegionLayout {
            name: HIGH_REGION_NAME.to_string(),
            guest_addr: HIGH_RAM_START,
            size: ram_size - low,
        });
    }
    regions
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("creating memfd '{name}': {source}")]
    Create {
        name: String,
        #[source]
        source: memfd::Error,
    },
    #[error(
        "sizing memfd '{name}' to {size} bytes: {source}{hint}",
        hint = if *hugepages { " (are enough 2 MiB huge pages reserved? see /proc/sys/vm/nr_hugepages)" } else { "" }
    )]
    Resize {
        name: String,
        size: u64,
        hugepages: bool,
        #[source]
        source: std::io::Error,
    },
    #[error("sealing memfd '{name}': {source}")]
    Seal {
        name: String,
        #[source]
        source: memfd::Error,
    },
    #[error("mapping guest RAM region '{name}' ({size} bytes): {source}")]
    Map {
        name: String,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM region '{0}' overlaps another region")]
    Overlap(String),
    #[error(
        "pre-faulting guest RAM region '{name}': {source} (not enough memory or huge pages for prealloc?)"
    )]
    Prealloc {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "with huge pages, the RAM size must be a multiple of 2 MiB (region '{name}' is {size} bytes)"
    )]
    HugePageAlignment { name: String, size: u64 },
    #[error("guest RAM file {path}: {what}: {source}")]
    File {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "guest RAM file {0} is not a regular file: mem-path must name a file (on tmpfs, hugetlbfs, a DAX or an ordinary filesystem)"
    )]
    NotRegular(String),
    #[error(
        "guest RAM file {path} is {len} bytes but the memory backend's size is {ram_size}: it is not resized (it may hold a saved guest's memory); give size={len} or remove the file"
    )]
    FileSize {
        path: String,
        len: u64,
        ram_size: u64,
    },
    #[error(
        "guest RAM file {path} is on hugetlbfs with {page_mib} MiB pages, and the memory backend's size ({size} bytes) is not a multiple of that: give a size in whole huge pages",
        page_mib = page >> 20
    )]
    HugeFileAlignment { path: String, size: u64, page: u64 },
    #[error("no inherited memfd for RAM region '{0}'")]
    MissingRegion(String),
    #[error(transparent)]
    HugePages(#[from] HugePagesError),
}

/// A cheap, shareable view of guest RAM for threads that copy it (no fds, no ownership).
#[derive(Clone, Debug)]
pub struct RamView {
    pub memory: Arc<GuestMemoryMmap>,
    pub regions: Vec<RegionLayout>,
}

impl RamView {
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// One region: where it sits in the guest, and its memfd (or the RAM file and the offset in it).
#[derive(Debug)]
pub struct RamRegion {
    pub layout: RegionLayout,
    /// Kept so the fd can be handed over; the mapping holds its own reference to the file.
    memfd: Arc<File>,
}

impl RamRegion {
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.memfd.as_fd()
    }
}

/// All guest RAM of one VM.
#[derive(Debug)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
    memory: Arc<GuestMemoryMmap>,
    /// For `memory-backend-file`: the file holding all of RAM, and where it was opened.
    file: Option<(std::path::PathBuf, Arc<File>)>,
}

/// How `memory-backend-file` RAM is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRamOptions {
    /// `share=on`: `MAP_SHARED`, the guest writes the file; off: `MAP_PRIVATE`, the file is
    /// only read (copy on write).
    pub share: bool,
    pub prealloc: bool,
}

/// Which file held guest RAM when it was saved: the cpr-reboot state file names it, and the
/// restoring VMM maps it only if it is still that very file, unchanged in size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamFileIdentity {
    pub path: String,
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    /// The inode's change time (ns since the epoch): a file deleted and recreated may get the
    /// same inode number back, and any write, truncation or replacement moves this on.
    pub changed_ns: i64,
}

impl RamFileIdentity {
    pub fn of(path: &std::path::Path, file: &File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(RamFileIdentity {
            path: path.display().to_string(),
            device: m.dev(),
            inode: m.ino(),
            size: m.len(),
            changed_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        })
    }
}

impl GuestRam {
    /// Creates fresh, zeroed RAM (new memfds), optionally pre-faulted.
    pub fn create(ram_size: u64, hugepages: bool, prealloc: bool) -> Result<Self, MemoryError> {
        if hugepages {
            check_huge_pages(&huge_page_pool(HUGE_PAGE_SIZE), ram_size, HUGE_PAGE_SIZE)?;
        }
        let mut files = Vec::new();
        for region in layout(ram_size) {
            let file = create_memfd(&region, hugepages)?;
            files.push((region, Arc::new(file), 0));
        }
        let ram = Self::map(files, libc::MAP_SHARED)?;
        if prealloc {
            ram.prefault()?;
        }
        Ok(ram)
    }

    /// Maps memfds inherited from the previous process (already checked against the CPR state).
    pub fn from_fds(
        regions: &[RegionLayout],
        mut take: impl FnMut(&RegionLayout) -> Option<OwnedFd>,
    ) -> Result<Self, MemoryError> {
        let mut files = Vec::new();
        for region in regions {
            let fd = take(region).ok_or_else(|| MemoryError::MissingRegion(region.name.clone()))?;
            files.push((region.clone(), Arc::new(File::from(fd)), 0));
        }
        Self::map(files, libc::MAP_SHARED)
    }

    /// `memory-backend-file`: opens (or creates) `path` and maps all of RAM from it, the low
    /// region at offset 0 and the high one right after it. A missing or empty file is created
    /// and sized to `ram_size`; an existing file of another size is refused, never resized or
    /// truncated (it may hold a saved guest's memory).
    pub fn open_file(
        path: &std::path::Path,
        ram_size: u64,
        opts: FileRamOptions,
    ) -> Result<Self, MemoryError> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |create: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(create)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
        };
        // Created here (O_EXCL) or there already: a file this call created and then could not
        // use is removed again, so a refused start leaves nothing behind.
        let (file, created) = match open(true) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
                open(false)
                    .map_err(file_error(path, "opening (read-write, created if missing)"))?,
                false,
            ),
            Err(e) => return Err(file_error(path, "opening (read-write, created if missing)")(e)),
        };
        let mapped = Self::size_and_map_file(path, file, ram_size, opts);
        if mapped.is_err() && created {
            let _ = std::fs::remove_file(path);
        }
        mapped
    }

    /// [`GuestRam::open_file`] once the file is open: checks it, sizes it if it is empty, maps it.
    fn size_and_map_file(
        path: &std::path::Path,
        file: File,
        ram_size: u64,
        opts: FileRamOptions,
    ) -> Result<Self, MemoryError> {
        let meta = file
            .metadata()
            .map_err(file_error(path, "reading its size"))?;
        if !meta.file_type().is_file() {
            return Err(MemoryError::NotRegular(path.display().to_string()));
        }
        // Before sizing it: hugetlbfs refuses a size that is not a whole number of pages.
        check_hugetlbfs_file(path, &file, ram_size)?;
        match meta.len() {
            0 => file
                .set_len(ram_size)
                .map_err(file_error(path, "sizing it to the RAM size"))?,
            len if len == ram_size => {}
            len => {
                return Err(MemoryError::FileSize {
                    path: path.display().to_string(),
                    len,
                    ram_size,
                });
            }
        }
        Self::map_file(path, file, ram_size, opts)
    }

    /// Maps an already opened RAM file of exactly `ram_size` bytes (checked by the caller).
    pub fn map_file(
        path: &std::path::Path,
        file: File,
        ram_size: u64,
        opts: FileRamOptions,
    ) -> Result<Self, MemoryError> {
        check_hugetlbfs_file(path, &file, ram_size)?;
        let file = Arc::new(file);
        let mut offset = 0;
        let mut files = Vec::new();
        for region in layout(ram_size) {
            let size = region.size;
            files.push((region, file.clone(), offset));
            offset += size;
        }
        let flags = if opts.share {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let mut ram = Self::map(files, flags)?;
        ram.file = Some((path.to_path_buf(), file));
        if opts.prealloc {
            ram.prefault()?;
        }
        Ok(ram)
    }

    /// Whether every byte of `file` has storage behind it (no holes): such a file needs no
    /// preallocation, its pages are there to be mapped.
    pub fn file_is_allocated(file: &File) -> std::io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(m.blocks() * 512 >= m.len())
    }

    /// The RAM file, for `memory-backend-file` RAM (one fd for every region).
    pub fn backing_file(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.file.as_ref().map(|(_, f)| f.as_fd())
    }

    /// Where the RAM file was opened (the command line's mem-path), for `memory-backend-file`
    /// RAM.
    pub fn backing_path(&self) -> Option<&std::path::Path> {
        self.file.as_ref().map(|(path, _)| path.as_path())
    }

    /// The RAM file's path and identity (device, inode, size), for `memory-backend-file` RAM.
    pub fn file_identity(&self) -> Option<std::io::Result<RamFileIdentity>> {
        self.file
            .as_ref()
            .map(|(path, file)| RamFileIdentity::of(path, file))
    }

    /// Writes RAM-file pages the guest dirtied, and the file's metadata, to its storage (for a RAM file that must
    /// survive a host reboot). A no-op for memfd RAM.
    pub fn sync_file(&self) -> std::io::Result<()> {
        match &self.file {
            // fsync, not fdatasync: the change time recorded afterwards must be on disk too.
            Some((_, file)) => file.sync_all(),
            None => Ok(()),
        }
    }

    fn map(files: Vec<(RegionLayout, Arc<File>, u64)>, flags: i32) -> Result<Self, MemoryError> {
        let mut mapped = Vec::new();
        let mut regions = Vec::new();
        for (layout, file, file_offset) in files {
            let mapping = MmapRegion::build(
                Some(FileOffset::from_arc(file.clone(), file_offset)),
                layout.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_NORESERVE,
            )
            .map_err(|source| MemoryError::Map {
                name: layout.name.clone(),
                size: layout.size,
                source,
            })?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(layout.guest_addr))
                .ok_or_else(|| MemoryError::Overlap(layout.name.clone()))?;
            mapped.push(region);
            regions.push(RamRegion {
                layout,
                memfd: file,
            });
        }
        let memory = GuestMemoryMmap::from_regions(mapped)
            .map_err(|_| MemoryError::Overlap("guest RAM".to_string()))?;
        Ok(GuestRam {
            regions,
            memory: Arc::new(memory),
            file: None,
        })
    }

    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    pub fn layouts(&self) -> Vec<RegionLayout> {
        self.regions.iter().map(|r| r.layout.clone()).collect()
    }

    pub fn view(&self) -> RamView {
        RamView {
            memory: self.memory.clone(),
            regions: self.layouts(),
        }
    }

    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.layout.size).sum()
    }

    /// The end of the region that starts at guest-physical 0.
    pub fn low_end(&self) -> u64 {
        self.regions
            .iter()
            .find(|r| r.layout.guest_addr == 0)
            .map(|r| r.layout.size)
            .unwrap_or(0)
    }

    /// Host virtual address and length of region `index`'s mapping.
    pub fn host_range(&self, index: usize) -> Option<(*mut u8, usize)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let layout = &self.regions.get(index)?.layout;
        let region = self.memory.find_region(GuestAddress(layout.guest_addr))?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .ok()?;
        Some((host, region.len() as usize))
    }

    /// Faults every page of every region into this process's page tables (QEMU's prealloc=on).
    pub fn prefault(&self) -> Result<(), MemoryError> {
        for (i, region) in self.regions.iter().enumerate() {
            let Some((host, len)) = self.host_range(i) else {
                continue;
            };
            populate(host, len).map_err(|source| MemoryError::Prealloc {
                name: region.layout.name.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The error for a failed operation `what` on the RAM file at `path`.
fn file_error(
    path: &std::path::Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> MemoryError {
    let path = path.display().to_string();
    move |source| MemoryError::File { path, what, source }
}

/// For a RAM file on hugetlbfs: checks that `ram_size` is a whole number of its pages, and
/// that the pool can give the pages the file does not hold yet (a hugetlb mapping without
/// pages behind it kills the process with SIGBUS at the guest's first touch). Nothing to
/// check on other filesystems.
fn check_hugetlbfs_file(
    path: &std::path::Path,
    file: &File,
    ram_size: u64,
) -> Result<(), MemoryError> {
    use nix::sys::statfs::{HUGETLBFS_MAGIC, fstatfs};
    use std::os::unix::fs::MetadataExt;
    let fs = fstatfs(file)
        .map_err(std::io::Error::from)
        .map_err(file_error(path, "reading its filesystem (fstatfs)"))?;
    if fs.filesystem_type() != HUGETLBFS_MAGIC {
        return Ok(());
    }
    let page = fs.block_size() as u64;
    if page == 0 || !ram_size.is_multiple_of(page) {
        return Err(MemoryError::HugeFileAlignment {
            path: path.display().to_string(),
            size: ram_size,
            page,
        });
    }
    // hugetlbfs counts a file's pages in 512-byte blocks, as every filesystem does.
    let held = file
        .metadata()
        .map_err(file_error(path, "reading its size"))?
        .blocks()
        * 512;
    let missing = ram_size.saturating_sub(held);
    if missing > 0 {
        check_huge_pages(&huge_page_pool(page), missing, page)?;
    }
    Ok(())
}

fn create_memfd(region: &RegionLayout, hugepages: bool) -> Result<File, MemoryError> {
    if hugepages && !region.size.is_multiple_of(HUGE_PAGE_SIZE) {
        return Err(MemoryError::HugePageAlignment {
            name: region.name.clone(),
            size: region.size,
        });
    }
    let mut opts = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true);
    if hugepages {
        opts = opts.hugetlb(Some(memfd::HugetlbSize::Huge2MB));
    }
    let memfd = opts
        .create(&region.name)
        .map_err(|source| MemoryError::Create {
            name: region.name.clone(),
            source,
        })?;
    memfd
        .as_file()
        .set_len(region.size)
        .map_err(|source| MemoryError::Resize {
            name: region.name.clone(),
            size: region.size,
            hugepages,
            source,
        })?;
    memfd
        .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
        .and_then(|_| memfd.add_seal(memfd::FileSeal::SealSeal))
        .map_err(|source| MemoryError::Seal {
            name: region.name.clone(),
            source,
        })?;
    Ok(memfd.into_file())
}

/// Populates page tables for `[host, host+len)` with MADV_POPULATE_WRITE (Linux 5.14+), falling
/// back to touching one byte per page.
fn populate(host: *mut u8, len: usize) -> std::io::Result<()> {
    let addr = NonNull::new(host.cast()).ok_or(std::io::ErrorKind::InvalidInput)?;
    // MADV_POPULATE_WRITE only faults pages in; it does not change their content.
    // SAFETY: [host, host+len) is one of our own live guest-RAM mappings.
    match unsafe { madvise(addr, len, MmapAdvise::MADV_POPULATE_WRITE) } {
        Ok(()) => return Ok(()),
        // A kernel older than 5.14 does not know the advice: touch the pages instead.
        Err(Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let page = 4096;
    for offset in (0..len).step_by(page) {
        // A volatile read followed by writing the same value back faults the page in for
        // writing without changing it.
        // SAFETY: offset < len, so the address lies inside our mapping.
        unsafe {
            let p = host.add(offset);
            std::ptr::write_volatile(p, std::ptr::read_volatile(p));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpr_common::fds;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn layout_splits_at_the_pci_hole() {
        assert_eq!(layout(1 << 30).len(), 1);
        let l = layout(5 << 30);
        assert_eq!(l[0].size, 3 << 30);
        assert_eq!(l[1].guest_addr, 4 << 30);
        assert_eq!(l[1].size, 2 << 30);
        assert_eq!(l[1].name, HIGH_REGION_NAME);
    }

    #[test]
    fn ram_is_sealed_cloexec_memfd_and_shared() {
        let ram = GuestRam::create(64 << 20, false, false).unwrap();
        let region = &ram.regions()[0];
        let rec = fds::describe(
            region.fd(),
            LOW_REGION_NAME,
            cpr_common::cpr::FdKind::GuestRam,
        )
        .unwrap();
        fds::check_preserved(&rec).unwrap();
        assert!(fds::is_cloexec(std::os::fd::AsRawFd::as_raw_fd(&region.fd())).unwrap());
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        // A second mapping of the same memfd sees the write: nothing is copied.
        let dup = region.fd().try_clone_to_owned().unwrap();
        let again = GuestRam::from_fds(&ram.layouts(), |_| dup.try_clone().ok()).unwrap();
        let v: u32 = again.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert_eq!(again.memory().num_regions(), 1);
    }

    #[test]
    fn file_ram_is_created_sized_shared_and_never_resized() {
        let dir = std::env::temp_dir().join(format!("vmm-ramfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("guest.ram");
        let _ = std::fs::remove_file(&path);
        let shared = FileRamOptions {
            share: true,
            prealloc: false,
        };
        let ram = GuestRam::open_file(&path, 16 << 20, shared).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 << 20);
        let file = std::fs::File::open(&path).unwrap();
        assert!(
            !GuestRam::file_is_allocated(&file).unwrap(),
            "a fresh file has holes"
        );
        ram.memory()
            .write_obj(0x5a5a_1234u32, GuestAddress(0x2000))
            .unwrap();
        ram.sync_file().unwrap();
        ram.prefault().unwrap();
        assert!(GuestRam::file_is_allocated(&file).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0x2000..0x2004], &0x5a5a_1234u32.to_ne_bytes());
        let id = ram.file_identity().unwrap().unwrap();
        assert_eq!(id.size, 16 << 20);
        drop(ram);
        // Reopened: the same content, nothing truncated.
        let again = GuestRam::open_file(&path, 16 << 20, shared).unwrap();
        let v: u32 = again.memory().read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(v, 0x5a5a_1234);
        // share=off: the guest's writes do not reach the file.
        let private = GuestRam::open_file(
            &path,
            16 << 20,
            FileRamOptions {
                share: false,
                prealloc: false,
            },
        )
        .unwrap();
        private
            .memory()
            .write_obj(7u32, GuestAddress(0x2000))
            .unwrap();
        let v: u32 = again.memory().read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(v, 0x5a5a_1234);
        // Another size: refused, the file untouched.
        let e = GuestRam::open_file(&path, 32 << 20, shared).unwrap_err();
        assert!(e.to_string().contains("not resized"), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 << 20);
        // A file this call creates and cannot use (no file can be 2^63 bytes) is removed again;
        // one that was there already is left as it was.
        let fresh = dir.join("fresh.ram");
        assert!(GuestRam::open_file(&fresh, 1 << 63, shared).is_err());
        assert!(
            !fresh.exists(),
            "a refused start left the RAM file it created"
        );
        assert!(GuestRam::open_file(&path, 1 << 63, shared).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 << 20);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Pages of `[host, host + len)` that are resident (mincore), for a shared memfd mapping:
    /// the pages the memfd holds.
    fn resident_pages(host: *mut u8, len: usize) -> usize {
        let mut pages = vec![0u8; len.div_ceil(4096)];
        // `pages` has one byte for each page of the range, as mincore writes.
        // SAFETY: [host, host + len) is a live mapping of this process; `pages` is big enough.
        let rc = unsafe { libc::mincore(host.cast(), len, pages.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        pages.iter().filter(|p| **p & 1 != 0).count()
    }

    #[test]
    fn prealloc_populates() {
        let ram = GuestRam::create(16 << 20, false, true).unwrap();
        assert_eq!(ram.total_size(), 16 << 20);
        let (host, len) = ram.host_range(0).unwrap();
        assert_eq!(resident_pages(host, len), len / 4096, "prealloc=on");
        // Without it, a fresh memfd holds no page: the check above can fail.
        let lazy = GuestRam::create(16 << 20, false, false).unwrap();
        let (host, len) = lazy.host_range(0).unwrap();
        assert_eq!(resident_pages(host, len), 0, "prealloc=off");
    }
}

// --- huge pages: enough of them before any is mapped ---------------------------------------

/// The kernel's pool of huge pages of `page_size` bytes (`hugepages-2048kB` for 2 MiB pages).
fn huge_page_pool(page_size: u64) -> std::path::PathBuf {
    std::path::PathBuf::from(format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB",
        page_size >> 10
    ))
}

/// Guest RAM on huge pages needs them reserved up front: a hugetlb mapping with too few pages
/// behind it does not fail when it is made, it kills the process with SIGBUS when the guest
/// first touches a page that is not there.
#[derive(Debug, thiserror::Error)]
pub enum HugePagesError {
    #[error(
        "huge pages: guest RAM needs {needed} free {page_mib} MiB huge pages but only {available} are available; reserve them first (as root): echo {suggested} > {sysctl}",
        page_mib = page_size >> 20,
        sysctl = nr_hugepages_knob(*page_size)
    )]
    TooFew {
        page_size: u64,
        needed: u64,
        available: u64,
        suggested: u64,
    },
    #[error(
        "huge pages: cannot read the huge page pool ({path}): {source}; this kernel may not offer huge pages of that size (see /proc/sys/vm/nr_hugepages)"
    )]
    Pool {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the size of the pool of `page_size` pages is set: the sysctl for the default 2 MiB
/// pages, the pool's own file for other sizes.
fn nr_hugepages_knob(page_size: u64) -> String {
    if page_size == HUGE_PAGE_SIZE {
        "/proc/sys/vm/nr_hugepages".to_string()
    } else {
        huge_page_pool(page_size)
            .join("nr_hugepages")
            .display()
            .to_string()
    }
}

/// Checks that `pool` (a `/sys/kernel/mm/hugepages/hugepages-NkB` directory of `page_size`
/// pages) can give `bytes` of pages now: free and not promised to another mapping, plus what
/// overcommit may still add.
fn check_huge_pages(
    pool: &std::path::Path,
    bytes: u64,
    page_size: u64,
) -> Result<(), HugePagesError> {
    let read = |name: &str| {
        let path = pool.join(name);
        std::fs::read_to_string(&path)
            .and_then(|t| {
                t.trim()
                    .parse::<u64>()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .map_err(|source| HugePagesError::Pool {
                path: path.display().to_string(),
                source,
            })
    };
    let needed = bytes.div_ceil(page_size);
    let free = read("free_hugepages")?.saturating_sub(read("resv_hugepages")?);
    let overcommit = read("nr_overcommit_hugepages")?.saturating_sub(read("surplus_hugepages")?);
    let available = free + overcommit;
    if available >= needed {
        return Ok(());
    }
    Err(HugePagesError::TooFew {
        page_size,
        needed,
        available,
        suggested: read("nr_hugepages")? + (needed - available),
    })
}

#[cfg(test)]
mod huge_page_tests {
    use super::*;

    fn pool(values: &[(&str, u64)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vmm-hugepool-{}-{}",
            std::process::id(),
            values
                .iter()
                .map(|(_, v)| v.to_string())
                .collect::<Vec<_>>()
                .join("-")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, v) in values {
            std::fs::write(dir.join(name), format!("{v}\n")).unwrap();
        }
        dir
    }

    fn with(free: u64, resv: u64, nr: u64, over: u64, surplus: u64) -> std::path::PathBuf {
        pool(&[
            ("free_hugepages", free),
            ("resv_hugepages", resv),
            ("nr_hugepages", nr),
            ("nr_overcommit_hugepages", over),
            ("surplus_hugepages", surplus),
        ])
    }

    #[test]
    fn too_few_pages_names_the_sysctl_and_the_count() {
        let e = check_huge_pages(&with(0, 0, 0, 0, 0), 64 << 20, HUGE_PAGE_SIZE).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("needs 32 free 2 MiB huge pages but only 0"),
            "{text}"
        );
        assert!(
            text.contains("echo 32 > /proc/sys/vm/nr_hugepages"),
            "{text}"
        );
        // Reserved pages belong to someone else; the suggestion adds to the pool.
        let e = check_huge_pages(&with(10, 4, 20, 0, 0), 32 << 20, HUGE_PAGE_SIZE).unwrap_err();
        assert!(e.to_string().contains("only 6 are available"), "{e}");
        assert!(e.to_string().contains("echo 30 >"), "{e}");
    }

    #[test]
    fn enough_pages_or_overcommit_pass() {
        assert!(check_huge_pages(&with(32, 0, 32, 0, 0), 64 << 20, HUGE_PAGE_SIZE).is_ok());
        assert!(check_huge_pages(&with(0, 0, 0, 40, 8), 64 << 20, HUGE_PAGE_SIZE).is_ok());
    }

    #[test]
    fn no_pool_is_an_error_not_a_crash() {
        let e = check_huge_pages(
            std::path::Path::new("/nonexistent/hugepages"),
            2 << 20,
            HUGE_PAGE_SIZE,
        );
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("/proc/sys/vm/nr_hugepages")
        );
    }
}
