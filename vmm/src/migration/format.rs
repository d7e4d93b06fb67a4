//! The machine state file, shared by every migration mode.
//!
//! It is a [`cpr_common::container`] (magic `CPRVMMST`, format version, CRC32C per section,
//! section table at the end) with these sections, each a bincode 2 payload except `ram`:
//!
//! ```text
//! id  name         payload
//! 1   run          SavedRun: was the guest running, which VMM version saved it, when
//! 2   description  MachineDescription: vCPU count, RAM size and regions, guest kind, devices
//! 3   vcpus        Vec<VcpuState>
//! 4   vm           VmState: PIC master/slave, IOAPIC, PIT, kvmclock
//! 5   devices      Vec<SavedDevice>: each device's id and its own state, bincode-encoded
//! 6   ram          only in "normal" mode; absent when RAM stays in preserved memfds
//! 7   ram-file     only in cpr-reboot mode: RamFileIdentity, the file that holds guest RAM
//! ```
//!
//! Section 7 is optional and was added without a version bump: it changes no existing payload,
//! and a reader that does not know it skips it (such a reader then finds no RAM and says so).
//!
//! The `ram` section is a sequence of runs of non-zero pages (zero pages are skipped; fresh
//! memfds read as zeros):
//!
//! ```text
//! +-------------+-------------+------------------------+------------------+----------------+
//! | region u32  | 0 u32       | offset in region u64   | page count u64   | pages × 4 KiB  |
//! +-------------+-------------+------------------------+------------------+----------------+
//! ```
//!
//! Compatibility policy: this VMM reads the current format version and the previous one (here
//! also version 1, which decodes like version 2), and always writes the current one. A change to
//! any payload's layout bumps the version. A new device needs no new version: its state is a new
//! entry under its own id (see [`crate::devices`]); a change to an existing device's state does.
//! Versions 1 and 2 stored devices as one enum and had no device list in the description; they
//! are converted when read ([`legacy`]). `vmm/tests/golden/` holds a state file from each
//! supported version, with a test that loads it.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cpr_common::container::{
    ContainerError, ContainerReader, ContainerWriter, ReadAt, write_file_atomically,
};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::state::{MachineDescription, MachineState};
use crate::memory::RamView;

pub const PAGE_SIZE: u64 = 4096;
const RUN_HEADER_LEN: usize = 24;
/// Pages per run record and per copy chunk (1 MiB).
const PAGES_PER_CHUNK: u64 = 256;

pub use cpr_common::state_file::{
    SECTION_DESCRIPTION, SECTION_DEVICES, SECTION_RAM, SECTION_RAM_FILE, SECTION_RUN,
    SECTION_VCPUS, SECTION_VM, STATE_FILE_FORMAT, STATE_FORMAT_VERSION,
};

/// How the machine was when it was saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRun {
    pub guest_was_running: bool,
    pub saved_by_version: String,
    pub saved_at_unix_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("state file {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path}: {source}")]
    Format {
        path: String,
        #[source]
        source: ContainerError,
    },
    #[error("state file {path}: writing: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path}: RAM {source}")]
    Ram {
        path: String,
        #[source]
        source: RamRecordError,
    },
    #[error("state file {path} describes another machine: {}", differences.join("; "))]
    Mismatch {
        path: String,
        differences: Vec<String>,
    },
    #[error(
        "state file {path} has no RAM pages (it was written for cpr-exec or cpr-transfer, where RAM stays in memfds)"
    )]
    NoRam { path: String },
}

/// RAM progress of a save in flight, read by `query-migrate` from the VMM thread.
#[derive(Debug, Default)]
pub struct RamProgress {
    pub total: AtomicU64,
    pub transferred: AtomicU64,
    pub remaining: AtomicU64,
    pub duplicate_pages: AtomicU64,
    pub normal_pages: AtomicU64,
    /// Set by `migrate_cancel`; the writer stops at the next chunk.
    pub cancelled: AtomicBool,
}

impl RamProgress {
    pub fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
        self.remaining.store(bytes, Ordering::Relaxed);
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// Whether a state file carries RAM pages.
pub enum RamContents<'a> {
    /// RAM stays where it is (memfds handed over); only the region list is in the description.
    Preserved,
    /// Copy every non-zero page.
    Pages(&'a RamView, &'a RamProgress),
    /// cpr-reboot: RAM stays in this file; the state names it.
    InFile(&'a crate::memory::RamFileIdentity),
}

/// Writes `state` to `path` atomically (temporary file, mode 0600, renamed when complete).
/// Returns the file size.
pub fn write_state_file(
    path: &Path,
    state: &MachineState,
    run: &SavedRun,
    ram: RamContents<'_>,
) -> Result<u64, StateFileError> {
    let p = path.display().to_string();
    let io_err = |source| StateFileError::Write {
        path: p.clone(),
        source,
    };
    write_file_atomically(path, io_err, |out| {
        let out = encode_state(out, state, run, ram, &p)?;
        out.flush().map_err(io_err)?;
        out.get_ref().metadata().map(|m| m.len()).map_err(io_err)
    })
}

/// Writes already-encoded state-file bytes to `path` atomically (see [`write_state_file`]).
pub fn write_state_bytes(path: &Path, bytes: &[u8]) -> Result<(), StateFileError> {
    let p = path.display().to_string();
    let io_err = |source| StateFileError::Write {
        path: p.clone(),
        source,
    };
    write_file_atomically(path, io_err, |out| out.write_all(bytes).map_err(io_err))
}

/// Writes the state-file bytes for `state` to `out` (a file, or a buffer sent over a socket).
/// `label` names the destination in errors.
pub fn encode_state<W: Write>(
    out: W,
    state: &MachineState,
    run: &SavedRun,
    ram: RamContents<'_>,
    label: &str,
) -> Result<W, StateFileError> {
    let fmt_err = |source| StateFileError::Format {
        path: label.to_string(),
        source,
    };
    let io_err = |source| StateFileError::Write {
        path: label.to_string(),
        source,
    };
    let mut w = ContainerWriter::new(out, &STATE_FILE_FORMAT).map_err(io_err)?;
    w.write_section(SECTION_RUN, run).map_err(fmt_err)?;
    w.write_section(SECTION_DESCRIPTION, &state.description)
        .map_err(fmt_err)?;
    w.write_section(SECTION_VCPUS, &state.vcpus)
        .map_err(fmt_err)?;
    w.write_section(SECTION_VM, &state.vm).map_err(fmt_err)?;
    w.write_section(SECTION_DEVICES, &state.devices)
        .map_err(fmt_err)?;
    match ram {
        RamContents::Pages(ram, progress) => {
            let mut stream = w.stream_section(SECTION_RAM);
            write_ram_pages(&mut stream, ram, progress).map_err(io_err)?;
            stream.finish();
        }
        RamContents::Preserved => {}
        RamContents::InFile(identity) => {
            w.write_section(SECTION_RAM_FILE, identity)
                .map_err(fmt_err)?;
        }
    }
    w.finish().map_err(io_err)
}

fn is_zero_page(page: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // align_to handles the unaligned ends.
        // SAFETY: reinterpreting initialised bytes as u64 is always valid.
        unsafe { page.align_to::<u64>() }
    };
    prefix.iter().all(|b| *b == 0)
        && words.iter().all(|w| *w == 0)
        && suffix.iter().all(|b| *b == 0)
}

/// Streams every non-zero page as run records.
fn write_ram_pages(
    out: &mut impl Write,
    ram: &RamView,
    progress: &RamProgress,
) -> std::io::Result<()> {
    progress.set_total(ram.total_size());
    let mut buf = vec![0u8; (PAGES_PER_CHUNK * PAGE_SIZE) as usize];
    for (index, region) in ram.regions.iter().enumerate() {
        let size = region.size;
        let mut offset = 0u64;
        while offset < size {
            if progress.cancelled.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("cancelled by migrate_cancel"));
            }
            let len = (size - offset).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..len];
            ram.memory
                .read_slice(chunk, GuestAddress(region.guest_addr + offset))
                .map_err(|e| std::io::Error::other(format!("reading guest RAM: {e}")))?;
            write_chunk_runs(out, index as u32, offset, chunk, progress)?;
            offset += len as u64;
            progress.remaining.fetch_sub(len as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Writes the runs of non-zero pages in one chunk.
fn write_chunk_runs(
    out: &mut impl Write,
    region: u32,
    chunk_offset: u64,
    chunk: &[u8],
    progress: &RamProgress,
) -> std::io::Result<()> {
    let pages: Vec<bool> = chunk
        .chunks(PAGE_SIZE as usize)
        .map(|p| !is_zero_page(p))
        .collect();
    let mut i = 0;
    while i < pages.len() {
        if !pages[i] {
            progress.duplicate_pages.fetch_add(1, Ordering::Relaxed);
            i += 1;
            continue;
        }
        let start = i;
        while i < pages.len() && pages[i] {
            i += 1;
        }
        let count = (i - start) as u64;
        let mut header = [0u8; RUN_HEADER_LEN];
        header[0..4].copy_from_slice(&region.to_le_bytes());
        header[8..16].copy_from_slice(&(chunk_offset + start as u64 * PAGE_SIZE).to_le_bytes());
        header[16..24].copy_from_slice(&count.to_le_bytes());
        out.write_all(&header)?;
        let bytes = &chunk[start * PAGE_SIZE as usize..i * PAGE_SIZE as usize];
        out.write_all(bytes)?;
        progress.transferred.fetch_add(
            RUN_HEADER_LEN as u64 + bytes.len() as u64,
            Ordering::Relaxed,
        );
        progress.normal_pages.fetch_add(count, Ordering::Relaxed);
    }
    Ok(())
}

/// A state file whose header, table and every non-RAM section have been validated and decoded.
pub struct StateFile<R: ReadAt = File> {
    path: String,
    reader: ContainerReader<R>,
    pub run: SavedRun,
    pub state: MachineState,
}

impl StateFile<File> {
    pub fn open(path: &Path) -> Result<Self, StateFileError> {
        let p = path.display().to_string();
        let file = File::open(path).map_err(|source| StateFileError::Open {
            path: p.clone(),
            source,
        })?;
        Self::read(file, p)
    }
}

impl StateFile<Vec<u8>> {
    /// A state received as bytes (cpr-transfer's STATE message); `label` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<Self, StateFileError> {
        Self::read(bytes, label.to_string())
    }
}

impl<R: ReadAt> StateFile<R> {
    /// Validates header, table and every non-RAM section, and decodes them.
    fn read(src: R, p: String) -> Result<Self, StateFileError> {
        let fmt_err = |source| StateFileError::Format {
            path: p.clone(),
            source,
        };
        let reader = ContainerReader::open(src, &STATE_FILE_FORMAT).map_err(fmt_err)?;
        let run: SavedRun = reader.read_section(SECTION_RUN).map_err(fmt_err)?;
        let (description, devices) = if reader.version() >= 3 {
            (
                reader.read_section(SECTION_DESCRIPTION).map_err(fmt_err)?,
                reader.read_section(SECTION_DEVICES).map_err(fmt_err)?,
            )
        } else {
            let description: legacy::MachineDescriptionV2 =
                reader.read_section(SECTION_DESCRIPTION).map_err(fmt_err)?;
            let devices: Vec<legacy::DeviceStateV2> =
                reader.read_section(SECTION_DEVICES).map_err(fmt_err)?;
            legacy::convert(description, devices).map_err(|detail| StateFileError::Format {
                path: p.clone(),
                source: ContainerError::Malformed {
                    what: "state file",
                    detail,
                },
            })?
        };
        let state = MachineState {
            description,
            vcpus: reader.read_section(SECTION_VCPUS).map_err(fmt_err)?,
            vm: reader.read_section(SECTION_VM).map_err(fmt_err)?,
            devices,
        };
        if state.vcpus.len() != state.description.vcpus as usize {
            return Err(StateFileError::Format {
                path: p,
                source: ContainerError::Malformed {
                    what: "state file",
                    detail: format!(
                        "{} vCPU states for {} vCPUs",
                        state.vcpus.len(),
                        state.description.vcpus
                    ),
                },
            });
        }
        Ok(StateFile {
            path: p,
            reader,
            run,
            state,
        })
    }

    pub fn has_ram(&self) -> bool {
        self.reader.has_section(SECTION_RAM)
    }

    /// The RAM file a cpr-reboot save names, if this is one.
    pub fn ram_file(&self) -> Result<Option<crate::memory::RamFileIdentity>, StateFileError> {
        if !self.reader.has_section(SECTION_RAM_FILE) {
            return Ok(None);
        }
        self.reader
            .read_section(SECTION_RAM_FILE)
            .map(Some)
            .map_err(|source| StateFileError::Format {
                path: self.path.clone(),
                source,
            })
    }

    /// Checks that `ours` (from this process's command line) is the saved machine.
    pub fn check_machine(&self, ours: &MachineDescription) -> Result<(), StateFileError> {
        let differences = MachineDescription::differences(&self.state.description, ours);
        if differences.is_empty() {
            Ok(())
        } else {
            Err(StateFileError::Mismatch {
                path: self.path.clone(),
                differences,
            })
        }
    }

    /// Copies the saved pages into `ram` (fresh, zeroed memfds) and verifies the section's
    /// checksum. On error `ram` holds garbage and must be discarded.
    pub fn load_ram(&self, ram: &RamView) -> Result<(), StateFileError> {
        if !self.has_ram() {
            return Err(StateFileError::NoRam {
                path: self.path.clone(),
            });
        }
        let mut parser = RunParser::new(ram);
        let outcome = self
            .reader
            .stream_section(SECTION_RAM, 1 << 20, |_, bytes| parser.feed(bytes))
            .map_err(|source| StateFileError::Format {
                path: self.path.clone(),
                source,
            })?;
        outcome
            .and_then(|()| parser.finish())
            .map_err(|source| StateFileError::Ram {
                path: self.path.clone(),
                source,
            })
    }
}

/// A `ram` section whose records do not fit this machine's RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamRecordError {
    #[error("writing guest RAM at {addr:#x}: {detail}")]
    Write { addr: u64, detail: String },
    #[error("record names region {0}, which does not exist")]
    NoRegion(usize),
    #[error("record has an invalid page count {0}")]
    PageCount(u64),
    #[error("record {offset:#x}+{len:#x} lies outside region '{region}' ({size:#x} bytes)")]
    OutsideRegion {
        offset: u64,
        len: u64,
        region: String,
        size: u64,
    },
    #[error("section ends in the middle of a record")]
    Truncated,
    #[error("the migration thread panicked")]
    WriterPanicked,
}

/// Parses run records from arbitrary chunk boundaries and writes the pages into RAM.
struct RunParser<'a> {
    ram: &'a RamView,
    header: Vec<u8>,
    /// Guest address and bytes left of the run being copied.
    current: Option<(u64, u64)>,
}

impl<'a> RunParser<'a> {
    fn new(ram: &'a RamView) -> Self {
        RunParser {
            ram,
            header: Vec::with_capacity(RUN_HEADER_LEN),
            current: None,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), RamRecordError> {
        while !bytes.is_empty() {
            match &mut self.current {
                Some((addr, left)) => {
                    let n = (*left).min(bytes.len() as u64) as usize;
                    self.ram
                        .memory
                        .write_slice(&bytes[..n], GuestAddress(*addr))
                        .map_err(|e| RamRecordError::Write {
                            addr: *addr,
                            detail: e.to_string(),
                        })?;
                    *addr += n as u64;
                    *left -= n as u64;
                    if *left == 0 {
                        self.current = None;
                    }
                    bytes = &bytes[n..];
                }
                None => {
                    let need = RUN_HEADER_LEN - self.header.len();
                    let n = need.min(bytes.len());
                    self.header.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.header.len() == RUN_HEADER_LEN {
                        self.current = Some(self.start_run()?);
                        self.header.clear();
                    }
                }
            }
        }
        Ok(())
    }

    fn start_run(&self) -> Result<(u64, u64), RamRecordError> {
        let h = &self.header;
        let region = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let offset = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
        let pages = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
        let layout = self
            .ram
            .regions
            .get(region)
            .ok_or(RamRecordError::NoRegion(region))?;
        let len = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&len| len > 0)
            .ok_or(RamRecordError::PageCount(pages))?;
        if offset % PAGE_SIZE != 0 || offset.checked_add(len).is_none_or(|end| end > layout.size) {
            return Err(RamRecordError::OutsideRegion {
                offset,
                len,
                region: layout.name.clone(),
                size: layout.size,
            });
        }
        Ok((layout.guest_addr + offset, len))
    }

    fn finish(&self) -> Result<(), RamRecordError> {
        if self.current.is_some() || !self.header.is_empty() {
            return Err(RamRecordError::Truncated);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn ram_runs_round_trip_and_bounds_are_checked() {
        use crate::memory::GuestRam;
        let owner = GuestRam::create(16 << 20, false, false).unwrap();
        let ram = owner.view();
        ram.memory.write_obj(0x11u8, GuestAddress(0x1000)).unwrap();
        ram.memory.write_obj(0x22u8, GuestAddress(0x2000)).unwrap();
        ram.memory
            .write_obj(0x33u8, GuestAddress(0xff_f000))
            .unwrap();
        let progress = RamProgress::default();
        let mut out = Vec::new();
        write_ram_pages(&mut out, &ram, &progress).unwrap();
        assert_eq!(progress.normal_pages.load(Ordering::Relaxed), 3);
        // Two runs: pages 1-2 and the last page.
        assert_eq!(out.len(), 2 * RUN_HEADER_LEN + 3 * 4096);

        let fresh_owner = GuestRam::create(16 << 20, false, false).unwrap();
        let fresh = fresh_owner.view();
        let mut parser = RunParser::new(&fresh);
        for chunk in out.chunks(1000) {
            parser.feed(chunk).unwrap();
        }
        parser.finish().unwrap();
        let v: u8 = fresh.memory.read_obj(GuestAddress(0xff_f000)).unwrap();
        assert_eq!(v, 0x33);

        let mut bad = out.clone();
        bad[23] = 0x7f; // page count far beyond the region
        let mut parser = RunParser::new(&fresh);
        assert!(parser.feed(&bad).is_err());
        let mut parser = RunParser::new(&fresh);
        parser.feed(&out[..out.len() - 1]).unwrap();
        assert!(parser.finish().is_err());
    }
}

/// State-file versions 1 and 2: devices as one enum, no device list in the description. Read
/// and converted to version 3's shapes; never written.
pub mod legacy {
    use serde::{Deserialize, Serialize};

    use crate::devices::i8042::I8042Snapshot;
    use crate::devices::pci::PciConfigSnapshot;
    use crate::devices::rtc::RtcSnapshot;
    use crate::devices::serial::SerialSnapshot;
    use crate::devices::{SavedDevice, encode_state};
    use crate::memory::RegionLayout;
    use crate::migration::state::{GuestKind, MachineDescription};

    #[derive(Serialize, Deserialize)]
    pub struct MachineDescriptionV2 {
        pub vcpus: u32,
        pub ram_size: u64,
        pub regions: Vec<RegionLayout>,
        pub guest: GuestKind,
    }

    /// Version 1 had only `Serial`; version 2 added the others at the end.
    #[derive(Serialize, Deserialize)]
    pub enum DeviceStateV2 {
        Serial(SerialSnapshot),
        I8042(I8042Snapshot),
        Rtc(RtcSnapshot),
        PciConfig(PciConfigSnapshot),
    }

    /// Every device a version 1 or 2 VMM had is in today's machine under these ids, at the same
    /// places; a device the file lacks starts as at power-on.
    pub fn convert(
        d: MachineDescriptionV2,
        devices: Vec<DeviceStateV2>,
    ) -> Result<(MachineDescription, Vec<SavedDevice>), String> {
        let saved = devices
            .into_iter()
            .map(|dev| {
                let (id, state) = match &dev {
                    DeviceStateV2::Serial(s) => ("serial", encode_state(s)),
                    DeviceStateV2::I8042(s) => ("i8042", encode_state(s)),
                    DeviceStateV2::Rtc(s) => ("rtc", encode_state(s)),
                    DeviceStateV2::PciConfig(s) => ("pci-config", encode_state(s)),
                };
                Ok(SavedDevice {
                    id: id.to_string(),
                    state: state.map_err(|e| format!("device {id}: {e}"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let description = MachineDescription {
            vcpus: d.vcpus,
            ram_size: d.ram_size,
            regions: d.regions,
            guest: d.guest,
            // Versions 1 and 2 had no disks.
            devices: crate::machine::device_descriptions(&[], &[]),
        };
        Ok((description, saved))
    }
}
