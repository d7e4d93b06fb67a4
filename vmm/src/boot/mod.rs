//! Direct 64-bit long-mode boot of the built-in guests.
//!
//! The built-in guests (`heartbeat`, `memcheck`, `blkcheck`) are small flat images
//! assembled from `guests/*.S` by `build.rs`. Like Firecracker's direct Linux
//! boot, the VMM prepares everything a 64-bit guest needs before its first
//! instruction: a GDT, identity-mapped page tables and long-mode special
//! registers, so the guest starts at its first byte already in long mode.
//!
//! Guest-physical memory map (all below 1 MiB):
//!
//! | address           | content                                            |
//! |-------------------|----------------------------------------------------|
//! | `0x0500`          | GDT: null, 64-bit code (`0x08`), flat data (`0x10`) |
//! | `0x2000..0x6fff`  | free for the guest (its IDT lives at `0x2000`)      |
//! | `0x7000`          | parameter block, see [`load_builtin_guest`]         |
//! | `0x9000..0xefff`  | PML4, PDPT, 4 page directories: 0..4 GiB identity   |
//! | `0x10000`         | guest image, entry at its first byte, max 64 KiB    |
//! | `0xa0000 - i*0x4000` | initial stack top of vCPU `i`                   |
//!
//! Guest-side constants live in `guests/abi.inc`; keep both in sync.

mod acpi;
pub mod linux;
mod mptable;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Most vCPUs a built-in guest supports (one 16 KiB stack each).
pub const MAX_BUILTIN_VCPUS: u32 = 32;
/// A 1-byte OUT to this port ends the VMM with that byte as exit status.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// Exit status a built-in guest writes to [`DEBUG_EXIT_PORT`] when it hits an
/// unexpected exception/interrupt or a bad parameter block (it prints a
/// `guest: ...` line on the serial port first).
#[allow(dead_code)] // guest ABI, for callers that interpret exit statuses
pub const GUEST_FAULT_EXIT_CODE: u8 = 0xfe;
/// Smallest `ram_end` accepted for a built-in guest.
pub const MIN_RAM_END: u64 = 2 << 20;
/// Largest `ram_end`: the low RAM region ends below the 3..4 GiB MMIO hole.
pub const MAX_RAM_END: u64 = 3 << 30;
/// Highest heartbeat tick rate. KVM clamps periodic LAPIC timers to a 200 us
/// minimum period by default (`kvm.min_timer_period_us`), i.e. 5 kHz.
pub const MAX_TICK_HZ: u32 = 5000;

/// Guest-physical address of the parameter block.
pub const PARAMS_ADDR: u64 = 0x7000;
/// Guest-physical address of vCPU 0's per-vCPU area; vCPU `i`'s area is at
/// `PERCPU_AREA_ADDR + i * PERCPU_AREA_SIZE`: `+0` u64 tick counter, `+8` u64
/// number of the last tick line printed.
pub const PERCPU_AREA_ADDR: u64 = PARAMS_ADDR + 0x100;
/// Size of one per-vCPU area.
pub const PERCPU_AREA_SIZE: u64 = 64;
/// Guest-physical load address and entry point of the guest image.
pub const GUEST_LOAD_ADDR: u64 = 0x10000;
/// memcheck increments the first byte of every 4 KiB page in
/// `[MEMCHECK_START, min(ram_end, MEMCHECK_LIMIT))`.
#[allow(dead_code)] // guest ABI, for callers that check memcheck dumps
pub const MEMCHECK_START: u64 = 1 << 20;
/// See [`MEMCHECK_START`].
#[allow(dead_code)] // guest ABI, for callers that check memcheck dumps
pub const MEMCHECK_LIMIT: u64 = 100 << 20;
/// memcheck with `sweep=sampled` increments the first byte of one page every this many bytes
/// of all RAM: from [`MEMCHECK_START`] to `ram_end`, then from 4 GiB to the end of RAM above it.
#[allow(dead_code)] // guest ABI, for callers that check memcheck dumps
pub const MEMCHECK_SAMPLE_STRIDE: u64 = 16 << 20;

/// "CPRGUEST" as a little-endian u64.
const PARAMS_MAGIC: u64 = 0x5453_4555_4752_5043;
const PARAMS_VERSION: u32 = 1;
/// The VMM writes (and zeroes) this much at [`PARAMS_ADDR`].
const PARAMS_SIZE: usize = 0x1000;
const PB_MAGIC: usize = 0x00;
const PB_VERSION: usize = 0x08;
const PB_VCPU_COUNT: usize = 0x0c;
const PB_RAM_END: usize = 0x10;
const PB_TIMER_COUNT: usize = 0x18;
const PB_EXIT_AFTER: usize = 0x1c;
const PB_EXIT_CODE: usize = 0x20;
/// blkcheck: u32 requests kept in flight (0 = its default, [`BLKCHECK_DEFAULT_DEPTH`]).
const PB_BLK_DEPTH: usize = 0x30;
/// blkcheck: u32 nonzero = drive the disk with INTx, not MSI-X (`irq=intx`).
const PB_BLK_INTX: usize = 0x38;
/// blkcheck: u32 nonzero: visit the blocks in a pseudo-random permutation (`order=random`).
const PB_BLK_RANDOM: usize = 0x3c;
/// blkcheck: u32 request size in KiB (0 = 4; `bs=N`).
const PB_BLK_BS_KIB: usize = 0x44;

/// blkcheck's requests in flight when `depth=` is not given.
#[allow(dead_code)] // guest ABI: the guest applies it to depth 0
pub const BLKCHECK_DEFAULT_DEPTH: u32 = 8;
/// The most requests blkcheck keeps in flight (it also stays within a third of the queue).
pub const BLKCHECK_MAX_DEPTH: u32 = 64;
/// The request sizes blkcheck takes, in KiB (`bs=4K` is the default).
pub const BLKCHECK_REQUEST_KIB: [u32; 5] = [4, 8, 16, 32, 64];
/// Guest-physical address of blkcheck's counters block (u64 each): `+0x00` magic "BLKCHECK",
/// `+0x08` completed requests, `+0x10` passes completed (the last generation written, verified
/// and flushed), `+0x18` mismatched sectors, `+0x20` I/O errors, `+0x28` timer ticks, `+0x30`
/// generation in flight, `+0x38` region sectors, `+0x40` capacity, `+0x48` state (0 starting,
/// 1 running, 2 no device, 3 failed), `+0x50` queue interrupts. See guests/blkcheck.S.
#[allow(dead_code)] // guest ABI, for callers that read blkcheck's counters
pub const BLKCHECK_COUNTERS_ADDR: u64 = 0x30000;
/// blkcheck's exit status when no virtio-blk device is on PCI bus 0.
#[allow(dead_code)] // guest ABI, for callers that interpret exit statuses
pub const BLKCHECK_EXIT_NO_DEVICE: u8 = 0x20;
/// blkcheck's exit status when the device cannot be driven (printed `blkcheck: FAILED ...`).
#[allow(dead_code)] // guest ABI, for callers that interpret exit statuses
pub const BLKCHECK_EXIT_DEVICE_ERROR: u8 = 0x21;
/// blkcheck's exit status after `exit-after` passes when a request failed or a sector
/// mismatched (otherwise it exits with `exit_code`).
#[allow(dead_code)] // guest ABI, for callers that interpret exit statuses
pub const BLKCHECK_EXIT_DATA_ERROR: u8 = 0x22;
/// Guest-physical address of netcheck's counters block (u64 each): `+0x00` magic "NETCHECK",
/// `+0x08` host frames received, `+0x10` echoes sent, `+0x18` own frames sent, `+0x20` last
/// host sequence number, `+0x28` host sequence numbers missing, `+0x30` host duplicates,
/// `+0x38` other frames, `+0x40` timer ticks, `+0x48` state (0 starting, 1 running, 2 no
/// device, 3 failed), `+0x50` queue interrupts, `+0x58` frames in more than one buffer,
/// `+0x60` transmissions completed, `+0x68` first host sequence number. See
/// guests/netcheck.S; the same address as blkcheck's (one driver guest runs at a time).
#[allow(dead_code)] // guest ABI, for callers that read netcheck's counters
pub const NETCHECK_COUNTERS_ADDR: u64 = 0x30000;
/// netcheck's exit status when no virtio-net device is on PCI bus 0.
#[allow(dead_code)] // guest ABI, for callers that interpret exit statuses
pub const NETCHECK_EXIT_NO_DEVICE: u8 = 0x20;
/// netcheck's timer rate (and so its sending rate, one frame per tick) without `hz=`.
pub const NETCHECK_DEFAULT_HZ: u32 = 100;
/// u32: 1 when memcheck sweeps sampled pages of all RAM (`sweep=sampled`), 0 otherwise.
const PB_MEMCHECK_SAMPLED: usize = 0x24;
/// u64: end of the RAM that starts at 4 GiB, or 0 when there is none.
const PB_HIGH_RAM_END: usize = 0x28;
/// Guest RAM above the 32-bit hole starts here.
const HIGH_RAM_START: u64 = 4 << 30;

pub(crate) const GDT_ADDR: u64 = 0x500;
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
/// 64-bit code: G=1, L=1, P=1, DPL=0, S=1, type=0xb (execute/read, accessed).
const GDT_CODE: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// Flat data: G=1, D/B=1, P=1, DPL=0, S=1, type=0x3 (read/write, accessed).
const GDT_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
pub(crate) const GDT: [u64; 3] = [0, GDT_CODE, GDT_DATA];

pub(crate) const PML4_ADDR: u64 = 0x9000;
pub(crate) const PDPT_ADDR: u64 = 0xa000;
pub(crate) const PD_ADDR: u64 = 0xb000;
/// Page directories, one per GiB of the 0..4 GiB identity map.
pub(crate) const PD_COUNT: u64 = 4;
const PAGE_TABLE_SIZE: u64 = 0x1000;
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_HUGE: u64 = 1 << 7;
/// From this address on the identity map is uncached (MMIO: LAPIC, IOAPIC).
const MMIO_START: u64 = 3 << 30;

const STACK_TOP: u64 = 0xa0000;
const STACK_SIZE: u64 = 0x4000;
const MAX_GUEST_IMAGE_SIZE: usize = 0x10000;

/// KVM's emulated LAPIC bus runs at 1 GHz; the guest divides it by 16.
const LAPIC_TIMER_FREQ_HZ: u32 = 1_000_000_000 / 16;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

static HEARTBEAT_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/heartbeat.bin"));
static MEMCHECK_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memcheck.bin"));
static BLKCHECK_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blkcheck.bin"));
static NETCHECK_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/netcheck.bin"));
// build.rs checks this too; keep the load-time guarantee at compile time.
const _: () = assert!(HEARTBEAT_IMAGE.len() <= MAX_GUEST_IMAGE_SIZE);
const _: () = assert!(MEMCHECK_IMAGE.len() <= MAX_GUEST_IMAGE_SIZE);
const _: () = assert!(BLKCHECK_IMAGE.len() <= MAX_GUEST_IMAGE_SIZE);
const _: () = assert!(NETCHECK_IMAGE.len() <= MAX_GUEST_IMAGE_SIZE);
// The per-vCPU areas of all vCPUs lie in the page the load writes (and zeroes).
const _: () = assert!(
    PERCPU_AREA_ADDR + MAX_BUILTIN_VCPUS as u64 * PERCPU_AREA_SIZE
        <= PARAMS_ADDR + PARAMS_SIZE as u64
);

/// The guests built into the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinGuest {
    /// Per-vCPU LAPIC timer heartbeat lines on the serial port.
    Heartbeat,
    /// QEMU migration-test style memory consistency checker ("A", then "B"s).
    Memcheck,
    /// virtio-blk driver: keeps `depth` requests in flight (0 = the default), writes,
    /// reads back and verifies generations of sector patterns (guests/blkcheck.S).
    Blkcheck {
        /// Requests in flight, `0..=BLKCHECK_MAX_DEPTH` (0 = [`BLKCHECK_DEFAULT_DEPTH`]).
        depth: u32,
        /// Interrupts through INTx (the IOAPIC pin in the interrupt line) instead of MSI-X.
        intx: bool,
        /// Visit the blocks in a pseudo-random full-period permutation, not in sector order.
        random: bool,
        /// Request size in KiB: 0 (the default, 4) or one of [`BLKCHECK_REQUEST_KIB`].
        bs_kib: u32,
    },
    /// virtio-net driver: echoes the host's numbered frames and sends its own, one per timer
    /// tick, counting gaps and duplicates (guests/netcheck.S).
    Netcheck,
    /// memcheck sweeping one sampled page every [`MEMCHECK_SAMPLE_STRIDE`] of all RAM, above
    /// 4 GiB too (`--guest memcheck,sweep=sampled`); same image, same name.
    MemcheckSampled,
}

impl BuiltinGuest {
    /// All built-in guests.
    pub const ALL: [BuiltinGuest; 4] = [
        BuiltinGuest::Heartbeat,
        BuiltinGuest::Memcheck,
        BuiltinGuest::Blkcheck {
            depth: 0,
            intx: false,
            random: false,
            bs_kib: 0,
        },
        BuiltinGuest::Netcheck,
    ];

    /// The guest's name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BuiltinGuest::Heartbeat => "heartbeat",
            BuiltinGuest::Memcheck | BuiltinGuest::MemcheckSampled => "memcheck",
            BuiltinGuest::Blkcheck { .. } => "blkcheck",
            BuiltinGuest::Netcheck => "netcheck",
        }
    }

    /// Looks a guest up by [`name`](Self::name).
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.name() == s)
    }

    /// The flat guest image, loaded at [`GUEST_LOAD_ADDR`].
    pub fn image(self) -> &'static [u8] {
        match self {
            BuiltinGuest::Heartbeat => HEARTBEAT_IMAGE,
            BuiltinGuest::Memcheck | BuiltinGuest::MemcheckSampled => MEMCHECK_IMAGE,
            BuiltinGuest::Blkcheck { .. } => BLKCHECK_IMAGE,
            BuiltinGuest::Netcheck => NETCHECK_IMAGE,
        }
    }

    /// The timer rate without `hz=`: `default` (the command line's), or netcheck's own.
    pub fn default_tick_hz(self, default: u32) -> u32 {
        match self {
            BuiltinGuest::Netcheck => NETCHECK_DEFAULT_HZ,
            _ => default,
        }
    }
}

/// What the VMM tells a built-in guest through the parameter block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestParams {
    /// Number of vCPUs, `1..=MAX_BUILTIN_VCPUS`.
    pub vcpu_count: u32,
    /// End of the RAM that is contiguous from guest-physical 0 (the low
    /// region's size), `MIN_RAM_END..=MAX_RAM_END`.
    pub ram_end: u64,
    /// heartbeat's LAPIC timer rate, `1..=MAX_TICK_HZ` (ignored by memcheck).
    pub tick_hz: u32,
    /// heartbeat: vCPU 0 writes `exit_code` to [`DEBUG_EXIT_PORT`] once it
    /// has printed this tick; 0 = run forever. blkcheck: the same after this
    /// many passes.
    pub exit_after_ticks: u32,
    /// See `exit_after_ticks`.
    pub exit_code: u8,
}

/// Why a built-in guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// `vcpu_count` is 0 or above [`MAX_BUILTIN_VCPUS`].
    #[error("built-in guests support 1 to {MAX_BUILTIN_VCPUS} vCPUs, but {0} were requested")]
    InvalidVcpuCount(u32),
    /// `ram_end` is below [`MIN_RAM_END`].
    #[error(
        "RAM too small for a built-in guest: RAM ends at {0:#x}, at least {MIN_RAM_END:#x} \
         (2 MiB) is needed"
    )]
    RamTooSmall(u64),
    /// `ram_end` is above [`MAX_RAM_END`].
    #[error("ram_end {0:#x} is above {MAX_RAM_END:#x}: the low RAM region must end below 3 GiB")]
    RamEndTooLarge(u64),
    /// The guest memory does not back all of `[0, ram_end)`.
    #[error("guest memory does not cover [0, {0:#x}) without holes, as ram_end claims")]
    RamNotBacked(u64),
    /// `depth` is above [`BLKCHECK_MAX_DEPTH`].
    #[error("blkcheck depth {0} is invalid: use 1..={BLKCHECK_MAX_DEPTH} requests in flight")]
    InvalidDepth(u32),
    /// A blkcheck request size that is not one of [`BLKCHECK_REQUEST_KIB`].
    #[error("blkcheck request size {0} KiB is invalid: use bs=4K, 8K, 16K, 32K or 64K")]
    InvalidRequestSize(u32),
    /// `tick_hz` is out of range for heartbeat.
    #[error("tick rate {0} Hz is invalid for the heartbeat guest (must be 1..={MAX_TICK_HZ} Hz)")]
    InvalidTickRate(u32),
    /// Writing one of the boot structures failed.
    #[error("failed to write the {what} to guest memory at {addr:#x}: {source}")]
    GuestMemoryWrite {
        /// Which structure.
        what: &'static str,
        /// Guest-physical address of the write.
        addr: u64,
        /// The underlying error.
        #[source]
        source: GuestMemoryError,
    },
}

/// Writes GDT, page tables, parameter block and the guest image into RAM.
///
/// Parameter block at [`PARAMS_ADDR`] (little-endian): `+0x00` u64 magic
/// "CPRGUEST", `+0x08` u32 version 1, `+0x0c` u32 vcpu_count, `+0x10` u64
/// ram_end, `+0x18` u32 LAPIC timer initial count, `+0x1c` u32
/// exit_after_ticks, `+0x20` u32 exit_code, `+0x30` u32 blkcheck depth, `+0x38` u32 blkcheck
/// INTx, `+0x3c` u32 blkcheck order=random, `+0x40` u32 print spinlock, `+0x44` u32 blkcheck
/// request KiB,
/// `+0x100 + 64*i` per-vCPU areas; everything not listed is zeroed.
///
/// memcheck expects the pages it checks to start out equal, as they are in
/// fresh (zeroed) RAM.
pub fn load_builtin_guest<M: GuestMemory>(
    mem: &M,
    guest: BuiltinGuest,
    params: &GuestParams,
) -> Result<(), BootError> {
    if params.vcpu_count == 0 || params.vcpu_count > MAX_BUILTIN_VCPUS {
        return Err(BootError::InvalidVcpuCount(params.vcpu_count));
    }
    if params.ram_end < MIN_RAM_END {
        return Err(BootError::RamTooSmall(params.ram_end));
    }
    if params.ram_end > MAX_RAM_END {
        return Err(BootError::RamEndTooLarge(params.ram_end));
    }
    let ram_len =
        usize::try_from(params.ram_end).map_err(|_| BootError::RamEndTooLarge(params.ram_end))?;
    if !mem.check_range(GuestAddress(0), ram_len, Permissions::ReadWrite) {
        return Err(BootError::RamNotBacked(params.ram_end));
    }
    let timer_count = match timer_initial_count(params.tick_hz) {
        Some(count) => count,
        None if matches!(
            guest,
            BuiltinGuest::Memcheck | BuiltinGuest::MemcheckSampled
        ) =>
        {
            0
        }
        None => return Err(BootError::InvalidTickRate(params.tick_hz)),
    };

    let (depth, intx, random, bs_kib) = match guest {
        BuiltinGuest::Blkcheck { depth, .. } if depth > BLKCHECK_MAX_DEPTH => {
            return Err(BootError::InvalidDepth(depth));
        }
        BuiltinGuest::Blkcheck { bs_kib, .. }
            if bs_kib != 0 && !BLKCHECK_REQUEST_KIB.contains(&bs_kib) =>
        {
            return Err(BootError::InvalidRequestSize(bs_kib));
        }
        BuiltinGuest::Blkcheck {
            depth,
            intx,
            random,
            bs_kib,
        } => (depth, intx, random, bs_kib),
        _ => (0, false, false, 0),
    };

    write_long_mode_tables(mem)?;

    let mut block = [0u8; PARAMS_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        block[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(PB_MAGIC, &PARAMS_MAGIC.to_le_bytes());
    put(PB_VERSION, &PARAMS_VERSION.to_le_bytes());
    put(PB_VCPU_COUNT, &params.vcpu_count.to_le_bytes());
    put(PB_RAM_END, &params.ram_end.to_le_bytes());
    put(PB_TIMER_COUNT, &timer_count.to_le_bytes());
    put(PB_EXIT_AFTER, &params.exit_after_ticks.to_le_bytes());
    put(PB_EXIT_CODE, &u32::from(params.exit_code).to_le_bytes());
    put(PB_BLK_DEPTH, &depth.to_le_bytes());
    put(PB_BLK_INTX, &u32::from(intx).to_le_bytes());
    put(PB_BLK_RANDOM, &u32::from(random).to_le_bytes());
    put(PB_BLK_BS_KIB, &bs_kib.to_le_bytes());
    let sampled = u32::from(guest == BuiltinGuest::MemcheckSampled);
    put(PB_MEMCHECK_SAMPLED, &sampled.to_le_bytes());
    put(PB_HIGH_RAM_END, &high_ram_end(mem).to_le_bytes());
    write(mem, "parameter block", PARAMS_ADDR, &block)?;

    write(mem, "guest image", GUEST_LOAD_ADDR, guest.image())
}

/// End of the RAM contiguous from [`HIGH_RAM_START`] (page granularity), or 0 when none is
/// there.
fn high_ram_end<M: GuestMemory>(mem: &M) -> u64 {
    const PAGE: u64 = 4096;
    let backed = |pages: u64| {
        usize::try_from(pages * PAGE).is_ok_and(|len| {
            mem.check_range(GuestAddress(HIGH_RAM_START), len, Permissions::ReadWrite)
        })
    };
    // Largest page count `lo` with [4 GiB, 4 GiB + lo pages) backed: binary search up to 2^40.
    let (mut lo, mut hi) = (0u64, 1u64 << 28);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if backed(mid) { lo = mid } else { hi = mid - 1 }
    }
    if lo == 0 {
        0
    } else {
        HIGH_RAM_START + lo * PAGE
    }
}

/// Initial general-purpose registers for vCPU `index` (< [`MAX_BUILTIN_VCPUS`]):
/// RIP at the image entry, a private 16 KiB stack, RDI = index,
/// RSI = parameter block, interrupts off.
pub fn builtin_boot_regs(index: u32) -> kvm_regs {
    debug_assert!(index < MAX_BUILTIN_VCPUS, "vCPU index {index} out of range");
    kvm_regs {
        rip: GUEST_LOAD_ADDR,
        rsp: STACK_TOP.saturating_sub(u64::from(index) * STACK_SIZE),
        rdi: u64::from(index),
        rsi: PARAMS_ADDR,
        rflags: 0x2, // bit 1 is reserved and always set; IF = 0
        ..Default::default()
    }
}

/// Adjusts the sregs KVM gave a fresh vCPU into the long-mode entry state:
/// paging on with CR3 = PML4, PAE, EFER.LME|LMA, CS = 64-bit code 0x08,
/// DS/ES/FS/GS/SS = data 0x10, GDTR = the VMM's GDT, IDTR empty (the guest
/// loads its own). TR, LDTR and the APIC base are kept as KVM set them.
pub fn setup_long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment_from_gdt(GDT_CODE, CODE_SELECTOR);
    let data = segment_from_gdt(GDT_DATA, DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;

    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Initial FPU state: FCW 0x37f (all exceptions masked, extended precision),
/// MXCSR 0x1f80 (all SSE exceptions masked), everything else zero.
pub fn builtin_boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// LAPIC timer initial count for `tick_hz`, or `None` if the rate is out of
/// range.
fn timer_initial_count(tick_hz: u32) -> Option<u32> {
    (1..=MAX_TICK_HZ)
        .contains(&tick_hz)
        .then(|| LAPIC_TIMER_FREQ_HZ / tick_hz)
}

fn write<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::GuestMemoryWrite { what, addr, source })
}

/// Writes the GDT and the identity page tables that [`setup_long_mode_sregs`] points the CPU at:
/// every 64-bit boot here (built-in guests and Linux) starts on them.
pub fn write_long_mode_tables<M: GuestMemory>(mem: &M) -> Result<(), BootError> {
    write(mem, "GDT", GDT_ADDR, &GDT.map(u64::to_le_bytes).concat())?;
    write(mem, "page tables", PML4_ADDR, &page_tables())
}

/// PML4, PDPT and four page directories, contiguous from [`PML4_ADDR`]:
/// an identity map of 0..4 GiB with 2 MiB pages; 3..4 GiB is uncached.
fn page_tables() -> Vec<u8> {
    let table_entries = (PAGE_TABLE_SIZE / 8) as usize;
    let mut entries = vec![0u64; (2 + PD_COUNT as usize) * table_entries];
    let (pml4, rest) = entries.split_at_mut(table_entries);
    let (pdpt, pds) = rest.split_at_mut(table_entries);

    pml4[0] = PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE;
    for (gib, pdpte) in pdpt.iter_mut().take(PD_COUNT as usize).enumerate() {
        *pdpte = (PD_ADDR + gib as u64 * PAGE_TABLE_SIZE) | PTE_PRESENT | PTE_WRITABLE;
    }
    for (i, pde) in pds.iter_mut().enumerate() {
        let addr = (i as u64) << 21;
        let mut flags = PTE_PRESENT | PTE_WRITABLE | PTE_HUGE;
        if addr >= MMIO_START {
            flags |= PTE_PCD | PTE_PWT;
        }
        *pde = addr | flags;
    }
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Packs a segment descriptor (flags in the layout of descriptor bits 40..55).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The hidden segment-register state that loading `selector` for `entry`
/// would produce, so KVM's state matches what the guest reloads on iretq.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        s: bit(44),
        dpl: ((entry >> 45) & 0x3) as u8,
        present: bit(47),
        avl: bit(52),
        l: bit(53),
        db: bit(54),
        g,
        unusable: 1 - bit(47),
        padding: 0,
    }
}

/// The byte that makes `parts` (one table, possibly in pieces) sum to 0 (mod 256), as the MP and
/// ACPI tables' checksum fields require; the checksum field itself must be 0 in `parts`.
fn table_checksum(parts: &[&[u8]]) -> u8 {
    parts
        .iter()
        .flat_map(|part| part.iter())
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Helpers for tests that pin the bytes of tables written into guest RAM.
#[cfg(test)]
mod test_golden {
    /// The bytes in lowercase hex.
    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The 64-bit FNV-1a hash of the bytes.
    pub fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
            (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }
}

#[cfg(test)]
mod tests;
