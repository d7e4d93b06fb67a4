//! Booting a Linux kernel: a bzImage or an uncompressed ELF `vmlinux`, loaded through
//! linux-loader and entered through the 64-bit boot protocol, as Firecracker does.
//!
//! The VMM prepares what the protocol promises a 64-bit kernel at its entry point: long mode with
//! an identity map covering the kernel, the zero page and the command line; a flat GDT;
//! interrupts off; RSI pointing at `boot_params` (the "zero page"), which carries a copy of the
//! image's setup header, the command line pointer, the initrd, the ACPI RSDP address and an e820
//! memory map. An MP table ([`super::mptable`]) and an ACPI MADT ([`super::acpi`]) both
//! describe the vCPUs and the IOAPIC (kernels without MP table support, such as Debian's cloud
//! kernels, read only the MADT). Only the bootstrap processor (vCPU 0) starts at the entry
//! point; the others stay in KVM's wait-for-INIT/SIPI state until the guest starts them through
//! its local APIC.
//!
//! Guest-physical memory map:
//!
//! | address                 | content                                                     |
//! |-------------------------|-------------------------------------------------------------|
//! | `0x0500`                | GDT: null, 64-bit code (`0x08`), flat data (`0x10`)          |
//! | `0x7000`                | `boot_params` (zero page), 4 KiB                             |
//! | `0x8ff0`                | initial stack pointer of vCPU 0 (grows down)                 |
//! | `0x9000..0xefff`        | PML4, PDPT, 4 page directories: 0..4 GiB identity, 2 MiB pages, 3..4 GiB uncached |
//! | `0x20000`               | kernel command line, NUL-terminated                         |
//! | `0x9fc00`               | MP floating pointer, then the MP configuration table        |
//! | `0xe0000`               | ACPI RSDP, then XSDT and MADT                               |
//! | `0x100000..`            | ELF `vmlinux`: its segments at their physical addresses      |
//! | `pref_address` (16 MiB) | bzImage: the protected-mode payload; 64-bit entry at +0x200  |
//! | top of low RAM          | initrd, page aligned, as high as the kernel allows          |
//!
//! e820 map, for each RAM region: RAM below `0x9fc00` is usable, `0x9fc00..0x100000` (EBDA with
//! the MP table, VGA hole, BIOS area with the ACPI tables) is reserved, RAM from 1 MiB up is
//! usable. With the usual layout that is `[0, 0x9fc00)` usable, `[0x9fc00, 0x100000)` reserved,
//! `[0x100000, low end)` usable and, above 3 GiB of RAM, `[4 GiB, 4 GiB + rest)` usable.

use std::fs::File;
use std::io::Cursor;

/// A kernel image in memory, read like a file.
type Image<'a> = Cursor<&'a [u8]>;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{acpi, mptable};

use kvm_bindings::kvm_regs;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, load_cmdline};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Guest-physical address of `boot_params` (the zero page); RSI points here at entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial RSP (and RBP) of the bootstrap processor.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Guest-physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Start of the Extended BIOS Data Area: the MP table lives here, in its last KiB below 640 KiB,
/// where Linux looks for it.
pub const EBDA_START: u64 = 0x9fc00;
/// Guest-physical address of the MP floating pointer structure.
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// RAM from here (1 MiB) up is usable by the kernel.
pub const HIMEM_START: u64 = 0x10_0000;
/// The IOAPIC's MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Most vCPUs the MP table can describe: xAPIC ids are 8 bits, 0xff is the broadcast id, and the
/// IOAPIC takes the id after the last vCPU's.
pub const MAX_LINUX_VCPUS: u32 = 254;
/// Guest-physical address of the ACPI RSDP, in the BIOS area where Linux also searches for it;
/// the XSDT and MADT follow it.
pub const ACPI_RSDP_ADDR: u64 = 0xe0000;
/// Offset of the 64-bit entry point in a bzImage's protected-mode payload (`startup_64`).
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Longest command line for a kernel without a setup header (ELF `vmlinux`): x86's
/// `COMMAND_LINE_SIZE` is 2048 bytes including the NUL.
const DEFAULT_CMDLINE_MAX: usize = 2047;
/// The command line may not run into the MP table.
const CMDLINE_AREA_MAX: usize = (EBDA_START - CMDLINE_ADDR - 1) as usize;
/// Highest address an initrd may occupy when the kernel does not say (the setup header's
/// default since boot protocol 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// `kernel_alignment` given to a kernel without a setup header (as Firecracker does).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 0x1000;

/// Setup header magic "HdrS" and its offset in a bzImage.
const HDRS_MAGIC: u32 = 0x5372_6448;
const HDRS_OFFSET: usize = 0x202;
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` "undefined/other".
const LOADER_TYPE_OTHER: u8 = 0xff;
/// loadflags bit 0: the protected-mode code loads at 1 MiB (bzImage, not zImage).
const LOADED_HIGH: u8 = 1 << 0;
/// xloadflags bit 0: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Boot protocol 2.12 added xloadflags.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Entries that fit in `boot_params.e820_table`.
const E820_MAX_ENTRIES: usize = 128;

// GDT and page tables: the built-in guests' (see `super`), so that
// `super::setup_long_mode_sregs` applies unchanged.
#[cfg(test)]
use super::{GDT, GDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR};

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBootConfig {
    /// A bzImage or an uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    /// An initrd/initramfs, loaded as is.
    pub initrd: Option<PathBuf>,
    /// The kernel command line (leading and trailing spaces are dropped, as linux-loader does).
    pub cmdline: String,
}

impl LinuxBootError {
    /// Whether the failure came after guest memory was written (the input checks all come
    /// first, so only I/O and loader failures midway do).
    pub fn wrote_guest_memory(&self) -> bool {
        matches!(
            self,
            LinuxBootError::Loader { .. }
                | LinuxBootError::CmdlineWrite(_)
                | LinuxBootError::ReadIntoGuest { .. }
                | LinuxBootError::BootParamsWrite(_)
                | LinuxBootError::GuestMemoryWrite { .. }
        )
    }
}

/// Which kind of image was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage (setup header with "HdrS"); entered at its payload's 64-bit entry point.
    BzImage,
    /// An ELF `vmlinux`; entered at its ELF entry point.
    Elf,
}

/// An e820 memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved (type 2).
    Reserved,
}

impl E820Kind {
    /// The type number in the e820 table.
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => E820_RAM,
            E820Kind::Reserved => E820_RESERVED,
        }
    }
}

/// One entry of the e820 map given to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// Where the initrd went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// The loaded kernel and what the bootstrap processor needs to enter it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    pub format: KernelFormat,
    /// RIP of vCPU 0.
    pub entry: u64,
    /// RSI of vCPU 0: `boot_params`.
    pub boot_params_addr: u64,
    /// Where the kernel image starts in guest memory.
    pub kernel_start: u64,
    /// End of the memory the kernel claims from `kernel_start` (bzImage: the larger of the
    /// payload and `init_size`; ELF: the end of its highest segment).
    pub kernel_end: u64,
    /// The setup header's boot protocol version (bzImage only).
    pub protocol_version: Option<u16>,
    pub cmdline_addr: u64,
    /// The command line as written to guest memory (without the NUL).
    pub cmdline: String,
    pub initrd: Option<InitrdPlacement>,
    /// The e820 map in `boot_params`, sorted by address.
    pub e820: Vec<E820Entry>,
    /// Where the MP floating pointer is.
    pub mptable_addr: u64,
    /// Where the ACPI RSDP is (also in `boot_params.acpi_rsdp_addr`).
    pub acpi_rsdp_addr: u64,
}

/// Why a Linux kernel could not be loaded. Each message names the file and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not a Linux kernel: it is neither a bzImage (no \"HdrS\" setup header at offset \
         0x202) nor an ELF executable",
        path.display()
    )]
    NotAKernel { path: PathBuf },
    #[error("kernel {} cannot be booted: {reason}", path.display())]
    UnsupportedKernel { path: PathBuf, reason: String },
    #[error(
        "kernel {} does not fit in guest RAM: it occupies {start:#x}..{end:#x}, so it needs at \
         least {} MiB of RAM below the 32-bit PCI hole, but there are only {} MiB",
        path.display(), end.div_ceil(1 << 20), ram_end >> 20
    )]
    KernelTooBig {
        path: PathBuf,
        start: u64,
        end: u64,
        ram_end: u64,
    },
    #[error(
        "initrd {} does not fit in guest RAM: it is {size} bytes, but only {available} bytes are \
         free between the kernel's end ({floor:#x}) and {limit:#x} (the lower of the end of low \
         RAM and the kernel's initrd_addr_max)",
        path.display()
    )]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        available: u64,
        floor: u64,
        limit: u64,
    },
    #[error("initrd {} is empty", path.display())]
    InitrdEmpty { path: PathBuf },
    #[error("kernel command line is {len} bytes long, but this kernel accepts at most {max} bytes")]
    CmdlineTooLong { len: usize, max: usize },
    #[error(
        "kernel command line has a byte that is not printable ASCII ({byte:#04x} at offset \
         {offset}); only characters 0x20..=0x7e are allowed"
    )]
    CmdlineInvalid { offset: usize, byte: u8 },
    #[error("a Linux guest can have 1 to {MAX_LINUX_VCPUS} vCPUs, but {0} were requested")]
    VcpuCount(u32),
    #[error("guest RAM layout cannot boot Linux: {0}")]
    RamLayout(String),
    #[error("loading kernel {}: {source}", path.display())]
    Loader {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("writing the command line to guest memory: {0}")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    #[error("reading {what} {} into guest memory: {source}", path.display())]
    ReadIntoGuest {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: GuestMemoryError,
    },
    #[error("writing boot_params to guest memory: {0}")]
    BootParamsWrite(#[source] linux_loader::configurator::Error),
    #[error("failed to write the {what} to guest memory at {addr:#x}: {source}")]
    GuestMemoryWrite {
        what: &'static str,
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}

/// Where and how the kernel will be loaded, worked out before anything is written.
#[derive(Debug)]
struct KernelPlan {
    format: KernelFormat,
    start: u64,
    end: u64,
    entry: u64,
    header: Option<setup_header>,
    cmdline_max: usize,
    initrd_addr_max: u64,
}

/// The kernel and initrd as read from their files, kept so that a reset boots the same images
/// even if the files are replaced or removed meanwhile (as QEMU does).
#[derive(Debug)]
pub struct LinuxImages {
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    kernel_path: PathBuf,
    initrd_path: Option<PathBuf>,
    cmdline: String,
}

impl LinuxImages {
    /// Reads the files `cfg` names (regular files only).
    pub fn read(cfg: &LinuxBootConfig) -> Result<Self, LinuxBootError> {
        let read = |what: &'static str, path: &Path| -> Result<Vec<u8>, LinuxBootError> {
            let mut file = File::open(path).map_err(io_err(what, path))?;
            let len = regular_file_len(&file).map_err(io_err(what, path))?;
            let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            file.read_to_end(&mut bytes).map_err(io_err(what, path))?;
            Ok(bytes)
        };
        Ok(LinuxImages {
            kernel: read("kernel", &cfg.kernel)?,
            initrd: cfg
                .initrd
                .as_deref()
                .map(|p| read("initrd", p))
                .transpose()?,
            kernel_path: cfg.kernel.clone(),
            initrd_path: cfg.initrd.clone(),
            cmdline: cfg.cmdline.clone(),
        })
    }
}

/// Reads the files `cfg` names and loads them (see [`load_linux_images`]).
#[cfg(test)]
pub fn load_linux<M: GuestMemoryBackend>(
    mem: &M,
    ram_layout: &[(u64, u64)],
    cfg: &LinuxBootConfig,
    vcpus: u32,
) -> Result<LinuxBoot, LinuxBootError> {
    load_linux_images(mem, ram_layout, &LinuxImages::read(cfg)?, vcpus)
}

/// Loads the kernel (bzImage or ELF `vmlinux`), its initrd and command line into `mem`, whose
/// RAM regions are `ram_layout` (`(guest address, size)`, the first one at 0), and writes
/// `boot_params` with the e820 map, an MP table and ACPI tables for `vcpus` vCPUs, the GDT and
/// the page tables.
///
/// Everything that can be wrong with the input (not a kernel, too big, initrd too big, command
/// line too long or invalid) is found before guest memory is touched.
pub fn load_linux_images<M: GuestMemoryBackend>(
    mem: &M,
    ram_layout: &[(u64, u64)],
    images: &LinuxImages,
    vcpus: u32,
) -> Result<LinuxBoot, LinuxBootError> {
    if vcpus == 0 || vcpus > MAX_LINUX_VCPUS {
        return Err(LinuxBootError::VcpuCount(vcpus));
    }
    let low_end = low_ram_end(mem, ram_layout)?;

    let kernel_path = images.kernel_path.as_path();
    let mut kernel = Cursor::new(images.kernel.as_slice());
    let plan = plan_kernel(&mut kernel, kernel_path)?;
    if plan.start < HIMEM_START || plan.end > low_end {
        return Err(LinuxBootError::KernelTooBig {
            path: kernel_path.to_path_buf(),
            start: plan.start,
            end: plan.end,
            ram_end: low_end,
        });
    }

    let cmdline = build_cmdline(&images.cmdline, plan.cmdline_max)?;

    let initrd = match (&images.initrd, &images.initrd_path) {
        (Some(bytes), Some(path)) => {
            let size = bytes.len() as u64;
            let addr = place_initrd(path, size, plan.end, low_end, plan.initrd_addr_max)?;
            Some((bytes, path, InitrdPlacement { addr, size }))
        }
        _ => None,
    };

    // All checks passed: write guest memory.
    let header = load_kernel_image(mem, &mut kernel, kernel_path, &plan)?;
    let initrd = match initrd {
        Some((bytes, path, placement)) => {
            mem.write_slice(bytes, GuestAddress(placement.addr))
                .map_err(|source| LinuxBootError::ReadIntoGuest {
                    what: "initrd",
                    path: path.clone(),
                    source,
                })?;
            Some(placement)
        }
        None => None,
    };
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline.loader)
        .map_err(LinuxBootError::CmdlineWrite)?;

    let e820 = e820_map(ram_layout);
    write_guest(mem, "MP table", MPTABLE_ADDR, &mptable::mptable(vcpus))?;
    write_guest(
        mem,
        "ACPI tables",
        ACPI_RSDP_ADDR,
        &acpi::acpi_tables(vcpus),
    )?;
    write_boot_tables(mem)?;

    let params = fill_boot_params(header, &plan, cmdline.text.len(), initrd, &e820);
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(LinuxBootError::BootParamsWrite)?;

    Ok(LinuxBoot {
        format: plan.format,
        entry: plan.entry,
        boot_params_addr: ZERO_PAGE_ADDR,
        kernel_start: plan.start,
        kernel_end: plan.end,
        protocol_version: plan.header.map(|h| h.version),
        cmdline_addr: CMDLINE_ADDR,
        cmdline: cmdline.text,
        initrd,
        e820,
        mptable_addr: MPTABLE_ADDR,
        acpi_rsdp_addr: ACPI_RSDP_ADDR,
    })
}

/// Initial general-purpose registers of the bootstrap processor: RIP at the kernel's entry,
/// RSI = `boot_params`, RSP = RBP = [`BOOT_STACK_POINTER`], interrupts off.
pub fn linux_boot_regs(boot: &LinuxBoot) -> kvm_regs {
    kvm_regs {
        rip: boot.entry,
        rsi: boot.boot_params_addr,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rflags: 0x2, // bit 1 is reserved and always set; IF = 0
        ..Default::default()
    }
}

/// Writes the GDT at `0x500` (null, 64-bit code `0x08`, flat data `0x10`) and page tables at
/// `0x9000..0xefff` identity-mapping 0..4 GiB with 2 MiB pages (3..4 GiB uncached), the state
/// [`super::setup_long_mode_sregs`] points the CPU at. Linux's 64-bit boot protocol needs the kernel, the
/// zero page and the command line identity-mapped; this covers all of low RAM and the APICs.
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), LinuxBootError> {
    super::write_long_mode_tables(mem).map_err(|e| match e {
        super::BootError::GuestMemoryWrite { what, addr, source } => {
            LinuxBootError::GuestMemoryWrite { what, addr, source }
        }
        other => LinuxBootError::RamLayout(other.to_string()),
    })
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LinuxBootError {
    let path = path.to_path_buf();
    move |source| LinuxBootError::Io { what, path, source }
}

fn write_guest<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), LinuxBootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| LinuxBootError::GuestMemoryWrite { what, addr, source })
}

/// The end of the RAM region at guest-physical 0, after checking that the layout is backed by
/// `mem` and leaves room above 1 MiB.
fn low_ram_end<M: GuestMemoryBackend>(
    mem: &M,
    ram_layout: &[(u64, u64)],
) -> Result<u64, LinuxBootError> {
    let bad = |msg: String| Err(LinuxBootError::RamLayout(msg));
    for &(addr, size) in ram_layout {
        let backed =
            usize::try_from(size).is_ok_and(|len| mem.check_range(GuestAddress(addr), len));
        if !backed {
            return bad(format!(
                "region {addr:#x}+{size:#x} is not backed by guest memory"
            ));
        }
    }
    let Some(&(_, low_size)) = ram_layout.iter().find(|&&(addr, _)| addr == 0) else {
        return bad("no RAM region starts at guest-physical address 0".into());
    };
    if low_size <= HIMEM_START {
        return bad(format!(
            "the RAM at address 0 is {low_size:#x} bytes; Linux needs RAM above 1 MiB"
        ));
    }
    Ok(low_size)
}

/// Works out the format, load range and entry of the kernel without loading it.
fn plan_kernel(file: &mut Image<'_>, path: &Path) -> Result<KernelPlan, LinuxBootError> {
    let file_len = file.get_ref().len() as u64;
    let mut head = Vec::new();
    file.by_ref()
        .take(0x1000)
        .read_to_end(&mut head)
        .map_err(io_err("kernel", path))?;
    if head.starts_with(ELF_MAGIC) {
        plan_elf(file, path, file_len)
    } else if head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(HDRS_MAGIC.to_le_bytes().as_slice()) {
        plan_bzimage(&head, path, file_len)
    } else {
        Err(LinuxBootError::NotAKernel {
            path: path.to_path_buf(),
        })
    }
}

/// The size of an open regular file (a directory or device is an error).
fn regular_file_len(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        Ok(meta.len())
    } else {
        Err(std::io::Error::other("not a regular file"))
    }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> LinuxBootError {
    LinuxBootError::UnsupportedKernel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn plan_bzimage(head: &[u8], path: &Path, file_len: u64) -> Result<KernelPlan, LinuxBootError> {
    let mut hdr = setup_header::default();
    let raw = head
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>())
        .ok_or_else(|| unsupported(path, "the file ends inside its setup header"))?;
    hdr.as_mut_slice().copy_from_slice(raw);
    let (version, loadflags, xloadflags) = (hdr.version, hdr.loadflags, hdr.xloadflags);
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(unsupported(
            path,
            format!(
                "it has no 64-bit entry point (boot protocol {}.{:02}, xloadflags {xloadflags:#x}; \
                 protocol 2.12 or later with XLF_KERNEL_64 is needed: is it a 32-bit kernel?)",
                version >> 8,
                version & 0xff
            ),
        ));
    }
    if loadflags & LOADED_HIGH == 0 {
        return Err(unsupported(
            path,
            "it is a zImage (loads below 1 MiB), not a bzImage",
        ));
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload = file_len
        .checked_sub(setup_size)
        .filter(|&p| p > BZIMAGE_64BIT_ENTRY_OFFSET)
        .ok_or_else(|| unsupported(path, "the file is shorter than its setup code and entry"))?;

    // Load where the kernel prefers to run (protocol 2.10+), aligned as it asks if relocatable.
    let pref_address = hdr.pref_address;
    let mut start = if pref_address != 0 {
        pref_address
    } else {
        HIMEM_START
    };
    let alignment = u64::from(hdr.kernel_alignment);
    if hdr.relocatable_kernel != 0 && alignment.is_power_of_two() {
        start = start
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| unsupported(path, "its preferred load address overflows"))?;
    }
    let needed = payload.max(u64::from(hdr.init_size));
    let end = start
        .checked_add(needed)
        .ok_or_else(|| unsupported(path, "its size overflows the address space"))?;
    Ok(KernelPlan {
        format: KernelFormat::BzImage,
        start,
        end,
        entry: start + BZIMAGE_64BIT_ENTRY_OFFSET,
        header: Some(hdr),
        cmdline_max: usize::try_from(hdr.cmdline_size)
            .unwrap_or(usize::MAX)
            .min(CMDLINE_AREA_MAX),
        initrd_addr_max: u64::from(hdr.initrd_addr_max),
    })
}

fn plan_elf(
    file: &mut Image<'_>,
    path: &Path,
    file_len: u64,
) -> Result<KernelPlan, LinuxBootError> {
    const EHDR_SIZE: usize = 64;
    const PHDR_SIZE: usize = 56;
    const MAX_PHDRS: usize = 256;
    const PT_LOAD: u32 = 1;
    const EM_X86_64: u16 = 62;

    let mut ehdr = [0u8; EHDR_SIZE];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut ehdr))
        .map_err(|_| unsupported(path, "the file ends inside its ELF header"))?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(std::array::from_fn(|i| b[o + i]));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(std::array::from_fn(|i| b[o + i]));
    if ehdr[4] != 2 || ehdr[5] != 1 || u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(unsupported(
            path,
            "it is an ELF file, but not a little-endian x86-64 ELF64 executable",
        ));
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = usize::from(u16_at(&ehdr, 54));
    let phnum = usize::from(u16_at(&ehdr, 56));
    if phentsize != PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS {
        return Err(unsupported(
            path,
            format!("its ELF program headers are unusable ({phnum} of {phentsize} bytes)"),
        ));
    }
    let mut phdrs = vec![0u8; phnum * PHDR_SIZE];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|_| unsupported(path, "the file ends inside its ELF program headers"))?;

    let mut range: Option<(u64, u64)> = None;
    for ph in phdrs.chunks_exact(PHDR_SIZE) {
        let (p_type, offset, paddr) = (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        if p_type != PT_LOAD || memsz == 0 {
            continue;
        }
        if offset.checked_add(filesz).is_none_or(|e| e > file_len) || filesz > memsz {
            return Err(unsupported(
                path,
                "an ELF segment lies beyond the end of the file",
            ));
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| unsupported(path, "an ELF segment overflows the address space"))?;
        range = Some(match range {
            Some((lo, hi)) => (lo.min(paddr), hi.max(end)),
            None => (paddr, end),
        });
    }
    let (start, end) = range.ok_or_else(|| unsupported(path, "it has no loadable segment"))?;
    if !(start..end).contains(&entry) {
        return Err(unsupported(
            path,
            format!("its entry point {entry:#x} is outside its segments ({start:#x}..{end:#x})"),
        ));
    }
    Ok(KernelPlan {
        format: KernelFormat::Elf,
        start,
        end,
        entry,
        header: None,
        cmdline_max: DEFAULT_CMDLINE_MAX,
        initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
    })
}

/// Loads the image with linux-loader; returns the setup header (bzImage) with `code32_start`
/// set to the load address.
fn load_kernel_image<M: GuestMemoryBackend>(
    mem: &M,
    file: &mut Image<'_>,
    path: &Path,
    plan: &KernelPlan,
) -> Result<Option<setup_header>, LinuxBootError> {
    let loader_err = |source| LinuxBootError::Loader {
        path: path.to_path_buf(),
        source,
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    let result = match plan.format {
        KernelFormat::BzImage => {
            BzImage::load(mem, Some(GuestAddress(plan.start)), file, highmem).map_err(loader_err)?
        }
        KernelFormat::Elf => Elf::load(mem, None, file, highmem).map_err(loader_err)?,
    };
    Ok(result.setup_header)
}

struct KernelCmdline {
    loader: Cmdline,
    text: String,
}

fn build_cmdline(cmdline: &str, max: usize) -> Result<KernelCmdline, LinuxBootError> {
    if let Some((offset, &byte)) = cmdline
        .as_bytes()
        .iter()
        .enumerate()
        .find(|&(_, &b)| !(0x20..=0x7e).contains(&b))
    {
        return Err(LinuxBootError::CmdlineInvalid { offset, byte });
    }
    let text = cmdline.trim();
    if text.len() > max {
        return Err(LinuxBootError::CmdlineTooLong {
            len: text.len(),
            max,
        });
    }
    // linux-loader counts the NUL in its capacity.
    let too_long = |_| LinuxBootError::CmdlineTooLong {
        len: text.len(),
        max,
    };
    let mut loader = Cmdline::new(max + 1).map_err(too_long)?;
    loader.insert_str(text).map_err(too_long)?;
    Ok(KernelCmdline {
        loader,
        text: text.to_string(),
    })
}

/// The highest page-aligned address where `size` bytes fit below both the end of low RAM and
/// the kernel's `initrd_addr_max`, above the kernel (as Firecracker places it).
fn place_initrd(
    path: &Path,
    size: u64,
    kernel_end: u64,
    low_end: u64,
    initrd_addr_max: u64,
) -> Result<u64, LinuxBootError> {
    if size == 0 {
        return Err(LinuxBootError::InitrdEmpty {
            path: path.to_path_buf(),
        });
    }
    let limit = low_end.min(initrd_addr_max.saturating_add(1));
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    limit
        .checked_sub(size)
        .map(|top| top & !(PAGE_SIZE - 1))
        .filter(|&addr| addr >= floor)
        .ok_or(LinuxBootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
            available: limit.saturating_sub(floor),
            floor,
            limit,
        })
}

/// The e820 map for the RAM regions: every byte of RAM is in exactly one entry.
pub fn e820_map(ram_layout: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut regions: Vec<(u64, u64)> = ram_layout.to_vec();
    regions.sort_unstable();
    let mut map = Vec::new();
    let mut push = |start: u64, end: u64, kind: E820Kind| {
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind,
            });
        }
    };
    for (start, size) in regions {
        let end = start.saturating_add(size);
        push(start, end.min(EBDA_START), E820Kind::Ram);
        push(
            start.max(EBDA_START),
            end.min(HIMEM_START),
            E820Kind::Reserved,
        );
        push(start.max(HIMEM_START), end, E820Kind::Ram);
    }
    map
}

fn fill_boot_params(
    header: Option<setup_header>,
    plan: &KernelPlan,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
) -> boot_params {
    let mut params = boot_params::default();
    match header.or(plan.header) {
        // A bzImage: the zero page starts from a copy of its own setup header.
        Some(hdr) => params.hdr = hdr,
        // An ELF vmlinux has none: fill the fields a kernel checks.
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
            params.hdr.cmdline_size = u32::try_from(cmdline_len + 1).unwrap_or(u32::MAX);
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_OTHER;
    params.acpi_rsdp_addr = ACPI_RSDP_ADDR;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.ext_cmd_line_ptr = 0;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    for (slot, entry) in params
        .e820_table
        .iter_mut()
        .zip(e820.iter().take(E820_MAX_ENTRIES))
    {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind.code(),
        };
    }
    params.e820_entries = e820.len().min(E820_MAX_ENTRIES) as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU32, Ordering};

    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A file in the temp directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(bytes: &[u8]) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "linux-boot-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn layout(ram: u64) -> Vec<(u64, u64)> {
        let low = ram.min(3 * GIB);
        let mut regions = vec![(0, low)];
        if ram > low {
            regions.push((4 * GIB, ram - low));
        }
        regions
    }

    fn memory(regions: &[(u64, u64)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    /// Field offsets in a bzImage / in boot_params (they are the same from 0x1f1 on).
    const OFF_SETUP_SECTS: usize = 0x1f1;
    const OFF_SYSSIZE: usize = 0x1f4;
    const OFF_BOOT_FLAG: usize = 0x1fe;
    const OFF_VERSION: usize = 0x206;
    const OFF_TYPE_OF_LOADER: usize = 0x210;
    const OFF_LOADFLAGS: usize = 0x211;
    const OFF_CODE32_START: usize = 0x214;
    const OFF_RAMDISK_IMAGE: usize = 0x218;
    const OFF_RAMDISK_SIZE: usize = 0x21c;
    const OFF_CMD_LINE_PTR: usize = 0x228;
    const OFF_INITRD_ADDR_MAX: usize = 0x22c;
    const OFF_KERNEL_ALIGNMENT: usize = 0x230;
    const OFF_RELOCATABLE: usize = 0x234;
    const OFF_XLOADFLAGS: usize = 0x236;
    const OFF_CMDLINE_SIZE: usize = 0x238;
    const OFF_PREF_ADDRESS: usize = 0x258;
    const OFF_INIT_SIZE: usize = 0x260;
    const OFF_E820_ENTRIES: usize = 0x1e8;
    const OFF_E820_TABLE: usize = 0x2d0;

    fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
        buf[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Knobs of a synthetic bzImage.
    struct BzParams {
        version: u16,
        xloadflags: u16,
        cmdline_size: u32,
        initrd_addr_max: u32,
        init_size: u32,
        payload: usize,
    }

    impl Default for BzParams {
        fn default() -> Self {
            BzParams {
                version: 0x020f,
                xloadflags: XLF_KERNEL_64,
                cmdline_size: 2047,
                initrd_addr_max: 0x7fff_ffff,
                init_size: 0x40_0000,
                payload: 0x1000,
            }
        }
    }

    /// A bzImage with one setup sector after the boot sector and a payload of `p.payload`
    /// bytes whose byte i is `i as u8`.
    fn bzimage(p: &BzParams) -> Vec<u8> {
        let mut image = vec![0u8; 1024];
        image[OFF_SETUP_SECTS] = 1;
        put(
            &mut image,
            OFF_SYSSIZE,
            &(p.payload.div_ceil(16) as u32).to_le_bytes(),
        );
        put(&mut image, OFF_BOOT_FLAG, &BOOT_FLAG_MAGIC.to_le_bytes());
        put(&mut image, HDRS_OFFSET, b"HdrS");
        put(&mut image, OFF_VERSION, &p.version.to_le_bytes());
        image[OFF_LOADFLAGS] = LOADED_HIGH;
        put(&mut image, OFF_CODE32_START, &0x10_0000u32.to_le_bytes());
        put(
            &mut image,
            OFF_INITRD_ADDR_MAX,
            &p.initrd_addr_max.to_le_bytes(),
        );
        put(
            &mut image,
            OFF_KERNEL_ALIGNMENT,
            &0x20_0000u32.to_le_bytes(),
        );
        image[OFF_RELOCATABLE] = 1;
        put(&mut image, OFF_XLOADFLAGS, &p.xloadflags.to_le_bytes());
        put(&mut image, OFF_CMDLINE_SIZE, &p.cmdline_size.to_le_bytes());
        put(&mut image, OFF_PREF_ADDRESS, &0x100_0000u64.to_le_bytes());
        put(&mut image, OFF_INIT_SIZE, &p.init_size.to_le_bytes());
        image.extend((0..p.payload).map(|i| i as u8));
        image
    }

    /// An ELF64 x86-64 executable with one PT_LOAD segment of `filesz` bytes (memsz `memsz`) at
    /// physical `paddr`, entry at `paddr`.
    fn elf(paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut image = vec![0u8; 64 + 56];
        put(&mut image, 0, b"\x7fELF");
        image[4] = 2; // ELFCLASS64
        image[5] = 1; // little endian
        image[6] = 1; // EV_CURRENT
        put(&mut image, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut image, 18, &62u16.to_le_bytes()); // EM_X86_64
        put(&mut image, 20, &1u32.to_le_bytes());
        put(&mut image, 24, &paddr.to_le_bytes()); // e_entry
        put(&mut image, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut image, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut image, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut image, 56, &1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        put(&mut image, ph, &1u32.to_le_bytes()); // PT_LOAD
        put(&mut image, ph + 4, &7u32.to_le_bytes());
        put(&mut image, ph + 8, &0x1000u64.to_le_bytes()); // p_offset
        put(
            &mut image,
            ph + 16,
            &(0xffff_ffff_8000_0000 | paddr).to_le_bytes(),
        );
        put(&mut image, ph + 24, &paddr.to_le_bytes());
        put(&mut image, ph + 32, &filesz.to_le_bytes());
        put(&mut image, ph + 40, &memsz.to_le_bytes());
        put(&mut image, ph + 48, &0x20_0000u64.to_le_bytes());
        image.resize(0x1000, 0);
        image.extend((0..filesz).map(|i| (i as u8) ^ 0xa5));
        image
    }

    fn config(kernel: &TempFile, initrd: Option<&TempFile>, cmdline: &str) -> LinuxBootConfig {
        LinuxBootConfig {
            kernel: kernel.0.clone(),
            initrd: initrd.map(|f| f.0.clone()),
            cmdline: cmdline.to_string(),
        }
    }

    fn read_u8(mem: &GuestMemoryMmap, addr: u64) -> u8 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }
    fn read_u16(mem: &GuestMemoryMmap, addr: u64) -> u16 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }
    fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }
    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }
    fn zp(offset: usize) -> u64 {
        ZERO_PAGE_ADDR + offset as u64
    }

    fn read_e820(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
        let n = read_u8(mem, zp(OFF_E820_ENTRIES)) as u64;
        (0..n)
            .map(|i| {
                let at = zp(OFF_E820_TABLE) + i * 20;
                (
                    read_u64(mem, at),
                    read_u64(mem, at + 8),
                    read_u32(mem, at + 16),
                )
            })
            .collect()
    }

    #[test]
    fn e820_covers_ram_exactly_with_the_legacy_area_reserved() {
        use E820Kind::{Ram, Reserved};
        let e = |addr, size, kind| E820Entry { addr, size, kind };
        assert_eq!(
            e820_map(&layout(64 * MIB)),
            vec![
                e(0, 0x9fc00, Ram),
                e(0x9fc00, 0x60400, Reserved),
                e(MIB, 63 * MIB, Ram)
            ]
        );
        assert_eq!(
            e820_map(&layout(5 * GIB)),
            vec![
                e(0, 0x9fc00, Ram),
                e(0x9fc00, 0x60400, Reserved),
                e(MIB, 3 * GIB - MIB, Ram),
                e(4 * GIB, 2 * GIB, Ram),
            ]
        );
        // Every region's bytes are covered once, without gaps.
        for ram in [2 * MIB, GIB, 3 * GIB, 5 * GIB] {
            let map = e820_map(&layout(ram));
            assert_eq!(map.iter().map(|e| e.size).sum::<u64>(), ram);
        }
    }

    #[test]
    fn loads_a_bzimage_with_initrd_and_cmdline() {
        let kernel = TempFile::new(&bzimage(&BzParams::default()));
        let initrd_bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let initrd = TempFile::new(&initrd_bytes);
        let ram = layout(64 * MIB);
        let mem = memory(&ram);
        let cfg = config(&kernel, Some(&initrd), " console=ttyS0 probe.hz=50 ");
        let boot = load_linux(&mem, &ram, &cfg, 2).unwrap();

        assert_eq!(boot.format, KernelFormat::BzImage);
        assert_eq!(boot.kernel_start, 0x100_0000);
        assert_eq!(boot.entry, 0x100_0200);
        assert_eq!(
            boot.kernel_end, 0x140_0000,
            "init_size claims more than the payload"
        );
        assert_eq!(boot.protocol_version, Some(0x020f));
        assert_eq!(boot.boot_params_addr, ZERO_PAGE_ADDR);
        assert_eq!(boot.cmdline, "console=ttyS0 probe.hz=50");
        // The payload is at the load address.
        let mut payload = vec![0u8; 0x1000];
        mem.read_slice(&mut payload, GuestAddress(0x100_0000))
            .unwrap();
        assert!(payload.iter().enumerate().all(|(i, &b)| b == i as u8));

        // Zero page: a copy of the header plus what the loader fills in.
        assert_eq!(read_u16(&mem, zp(OFF_BOOT_FLAG)), 0xaa55);
        assert_eq!(read_u32(&mem, zp(HDRS_OFFSET)), HDRS_MAGIC);
        assert_eq!(read_u16(&mem, zp(OFF_VERSION)), 0x020f);
        assert_eq!(read_u8(&mem, zp(OFF_TYPE_OF_LOADER)), 0xff);
        assert_eq!(read_u32(&mem, zp(OFF_CODE32_START)), 0x100_0000);
        assert_eq!(read_u32(&mem, zp(OFF_CMDLINE_SIZE)), 2047);
        assert_eq!(read_u32(&mem, zp(OFF_CMD_LINE_PTR)) as u64, CMDLINE_ADDR);
        let mut cmdline = vec![0u8; boot.cmdline.len() + 1];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmdline[..], b"console=ttyS0 probe.hz=50\0");

        // The initrd: page aligned, as high as possible in low RAM.
        let placement = boot.initrd.unwrap();
        assert_eq!(placement.size, 10_000);
        assert_eq!(placement.addr, (64 * MIB - 10_000) & !0xfff);
        assert_eq!(read_u32(&mem, zp(OFF_RAMDISK_IMAGE)) as u64, placement.addr);
        assert_eq!(read_u32(&mem, zp(OFF_RAMDISK_SIZE)), 10_000);
        let mut loaded = vec![0u8; initrd_bytes.len()];
        mem.read_slice(&mut loaded, GuestAddress(placement.addr))
            .unwrap();
        assert_eq!(loaded, initrd_bytes);

        // e820 in the zero page matches the returned map.
        let e820: Vec<_> = boot
            .e820
            .iter()
            .map(|e| (e.addr, e.size, e.kind.code()))
            .collect();
        assert_eq!(read_e820(&mem), e820);
        assert_eq!(e820.len(), 3);

        // MP table at the EBDA, ACPI in the BIOS area, found through boot_params too.
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig[..4], GuestAddress(boot.mptable_addr))
            .unwrap();
        assert_eq!(&sig[..4], b"_MP_");
        mem.read_slice(&mut sig, GuestAddress(boot.acpi_rsdp_addr))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert_eq!(read_u64(&mem, zp(0x070)), ACPI_RSDP_ADDR);

        let regs = linux_boot_regs(&boot);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rbp, regs.rflags),
            (0x100_0200, ZERO_PAGE_ADDR, 0x8ff0, 0x8ff0, 2)
        );
    }

    #[test]
    fn initrd_respects_initrd_addr_max_and_high_ram() {
        let kernel = TempFile::new(&bzimage(&BzParams {
            initrd_addr_max: 0x3fff_ffff,
            ..BzParams::default()
        }));
        let initrd = TempFile::new(&[0x5a; 8192]);
        let ram = layout(5 * GIB);
        let mem = memory(&ram);
        let boot = load_linux(&mem, &ram, &config(&kernel, Some(&initrd), ""), 1).unwrap();
        let placement = boot.initrd.unwrap();
        assert_eq!(placement.addr, 0x4000_0000 - 8192);
        assert_eq!(boot.e820.len(), 4);
        assert_eq!(read_e820(&mem).len(), 4);
        assert_eq!(boot.e820[3].addr, 4 * GIB);
        assert_eq!(boot.e820[3].size, 2 * GIB);
        assert_eq!(boot.cmdline, "");
    }

    #[test]
    fn loads_an_elf_vmlinux_with_default_header() {
        let kernel = TempFile::new(&elf(0x100_0000, 0x3000, 0x8000));
        let ram = layout(64 * MIB);
        let mem = memory(&ram);
        let initrd = TempFile::new(&[1, 2, 3]);
        let boot = load_linux(
            &mem,
            &ram,
            &config(&kernel, Some(&initrd), "root=/dev/vda"),
            1,
        )
        .unwrap();
        assert_eq!(boot.format, KernelFormat::Elf);
        assert_eq!(boot.entry, 0x100_0000);
        assert_eq!(boot.kernel_start, 0x100_0000);
        assert_eq!(boot.kernel_end, 0x100_8000);
        assert_eq!(boot.protocol_version, None);
        assert_eq!(read_u8(&mem, 0x100_0001), 1 ^ 0xa5);
        assert_eq!(read_u16(&mem, zp(OFF_BOOT_FLAG)), 0xaa55);
        assert_eq!(read_u32(&mem, zp(HDRS_OFFSET)), HDRS_MAGIC);
        assert_eq!(read_u8(&mem, zp(OFF_TYPE_OF_LOADER)), 0xff);
        assert_eq!(read_u32(&mem, zp(OFF_KERNEL_ALIGNMENT)), 0x100_0000);
        assert_eq!(read_u32(&mem, zp(OFF_CMDLINE_SIZE)), 14);
        assert_eq!(read_u32(&mem, zp(OFF_RAMDISK_SIZE)), 3);
        assert_eq!(
            read_u32(&mem, zp(OFF_RAMDISK_IMAGE)) as u64,
            64 * MIB - PAGE_SIZE
        );
    }

    #[test]
    fn boot_tables_match_the_long_mode_sregs() {
        let ram = layout(64 * MIB);
        let mem = memory(&ram);
        write_boot_tables(&mem).unwrap();
        let mut sregs = kvm_bindings::kvm_sregs::default();
        crate::boot::setup_long_mode_sregs(&mut sregs);
        assert_eq!(sregs.gdt.base, GDT_ADDR);
        assert_eq!(sregs.gdt.limit as usize, GDT.len() * 8 - 1);
        assert_eq!(sregs.cr3, PML4_ADDR);
        // CS is a 64-bit code segment and DS flat data in the GDT the tables hold.
        let cs = read_u64(&mem, GDT_ADDR + u64::from(sregs.cs.selector));
        let ds = read_u64(&mem, GDT_ADDR + u64::from(sregs.ds.selector));
        assert_eq!((cs >> 53) & 1, 1, "L bit");
        assert_eq!((cs >> 40) & 0xf, u64::from(sregs.cs.type_));
        assert_eq!((ds >> 40) & 0xf, u64::from(sregs.ds.type_));
        assert_eq!(sregs.cs.l, 1);
        // Identity map: the kernel's 16 MiB and the LAPIC's 2 MiB page.
        assert_eq!(read_u64(&mem, PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(
            read_u64(&mem, PDPT_ADDR + 3 * 8),
            (PD_ADDR + 3 * PAGE_SIZE) | 3
        );
        assert_eq!(read_u64(&mem, PD_ADDR + 8 * 8), 0x100_0000 | 0x83);
        let lapic_pde = PD_ADDR + (u64::from(LAPIC_ADDR) >> 21) * 8;
        assert_eq!(read_u64(&mem, lapic_pde), u64::from(LAPIC_ADDR) | 0x9b);
    }

    fn load_err(kernel: &[u8], initrd: Option<&[u8]>, cmdline: &str, ram: u64) -> LinuxBootError {
        let kernel = TempFile::new(kernel);
        let initrd = initrd.map(TempFile::new);
        let regions = layout(ram);
        let mem = memory(&regions);
        load_linux(
            &mem,
            &regions,
            &config(&kernel, initrd.as_ref(), cmdline),
            1,
        )
        .unwrap_err()
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        for bytes in [&b""[..], b"hello world", &[0u8; 4096]] {
            let err = load_err(bytes, None, "", 64 * MIB);
            assert!(matches!(err, LinuxBootError::NotAKernel { .. }), "{err}");
            assert!(err.to_string().contains("is not a Linux kernel"), "{err}");
        }
        // An ELF that is not x86-64.
        let mut arm = elf(0x100_0000, 0x100, 0x100);
        arm[18] = 183;
        let err = load_err(&arm, None, "", 64 * MIB);
        assert!(
            err.to_string().contains("not a little-endian x86-64"),
            "{err}"
        );
        // A truncated bzImage.
        let err = load_err(&bzimage(&BzParams::default())[..700], None, "", 64 * MIB);
        assert!(err.to_string().contains("shorter than"), "{err}");
    }

    #[test]
    fn rejects_kernels_without_a_64bit_entry() {
        for p in [
            BzParams {
                xloadflags: 0,
                ..BzParams::default()
            },
            BzParams {
                version: 0x020a,
                ..BzParams::default()
            },
        ] {
            let err = load_err(&bzimage(&p), None, "", 64 * MIB);
            assert!(err.to_string().contains("no 64-bit entry point"), "{err}");
        }
    }

    #[test]
    fn kernel_that_does_not_fit_is_an_error() {
        let big = bzimage(&BzParams {
            init_size: 0x800_0000,
            ..BzParams::default()
        });
        let err = load_err(&big, None, "", 64 * MIB);
        assert!(matches!(err, LinuxBootError::KernelTooBig { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("does not fit in guest RAM"), "{msg}");
        assert!(msg.contains("0x1000000..0x9000000"), "{msg}");
        // The same with an ELF segment past the end of RAM.
        let err = load_err(&elf(0x100_0000, 0x100, 0x400_0000), None, "", 64 * MIB);
        assert!(matches!(err, LinuxBootError::KernelTooBig { .. }), "{err}");
        // And with RAM that has nothing above 1 MiB.
        let err = load_err(&bzimage(&BzParams::default()), None, "", MIB);
        assert!(matches!(err, LinuxBootError::RamLayout(_)), "{err}");
    }

    #[test]
    fn initrd_that_does_not_fit_is_an_error_with_sizes() {
        let kernel = bzimage(&BzParams::default());
        let err = load_err(&kernel, Some(&vec![0u8; 61 * MIB as usize]), "", 64 * MIB);
        let msg = err.to_string();
        assert!(matches!(err, LinuxBootError::InitrdTooBig { .. }), "{msg}");
        assert!(msg.contains(&format!("{} bytes", 61 * MIB)), "{msg}");
        assert!(
            msg.contains(&format!("only {} bytes are free", 44 * MIB)),
            "{msg}"
        );
        let err = load_err(&kernel, Some(&[]), "", 64 * MIB);
        assert!(err.to_string().contains("is empty"), "{err}");
    }

    #[test]
    fn command_line_limits_come_from_the_kernel() {
        let kernel = bzimage(&BzParams {
            cmdline_size: 16,
            ..BzParams::default()
        });
        let err = load_err(&kernel, None, "console=ttyS0 quiet", 64 * MIB);
        assert_eq!(
            err.to_string(),
            "kernel command line is 19 bytes long, but this kernel accepts at most 16 bytes"
        );
        let ok = TempFile::new(&kernel);
        let ram = layout(64 * MIB);
        let mem = memory(&ram);
        let boot = load_linux(&mem, &ram, &config(&ok, None, "0123456789abcdef"), 1).unwrap();
        assert_eq!(boot.cmdline.len(), 16);
        // ELF kernels get x86's COMMAND_LINE_SIZE.
        let vmlinux = elf(0x100_0000, 0x100, 0x100);
        let err = load_err(&vmlinux, None, &"x".repeat(2048), 64 * MIB);
        assert!(err.to_string().contains("at most 2047 bytes"), "{err}");
        let err = load_err(&vmlinux, None, "a\tb", 64 * MIB);
        assert!(err.to_string().contains("0x09 at offset 1"), "{err}");
    }

    #[test]
    fn missing_files_and_bad_vcpu_counts_are_clear_errors() {
        let ram = layout(64 * MIB);
        let mem = memory(&ram);
        let cfg = LinuxBootConfig {
            kernel: PathBuf::from("/nonexistent/bzImage"),
            initrd: None,
            cmdline: String::new(),
        };
        let err = load_linux(&mem, &ram, &cfg, 1).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read kernel /nonexistent/bzImage:"),
            "{err}"
        );
        let kernel = TempFile::new(&bzimage(&BzParams::default()));
        let cfg = LinuxBootConfig {
            initrd: Some(PathBuf::from("/nonexistent/initrd")),
            ..config(&kernel, None, "")
        };
        let err = load_linux(&mem, &ram, &cfg, 1).unwrap_err();
        assert!(
            err.to_string().contains("initrd /nonexistent/initrd"),
            "{err}"
        );
        let cfg = LinuxBootConfig {
            kernel: std::env::temp_dir(),
            ..config(&kernel, None, "")
        };
        let err = load_linux(&mem, &ram, &cfg, 1).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        for vcpus in [0, 255] {
            let err = load_linux(&mem, &ram, &config(&kernel, None, ""), vcpus).unwrap_err();
            assert!(matches!(err, LinuxBootError::VcpuCount(_)), "{err}");
        }
        // A layout the memory does not back.
        let err = load_linux(&mem, &layout(128 * MIB), &config(&kernel, None, ""), 1).unwrap_err();
        assert!(err.to_string().contains("not backed"), "{err}");
    }
}
