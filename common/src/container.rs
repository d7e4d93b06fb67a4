//! The versioned, checksummed container used by every file that crosses a process boundary: the
//! machine state file and the CPR state.
//!
//! Byte layout (all integers little-endian):
//!
//! ```text
//! 0          +---------------------------------------------------------------+
//!            | magic [8] | format version u32 | flags u32 (0)                 |  header, 16 bytes
//! 16         +---------------------------------------------------------------+
//!            | section payloads, back to back (bincode 2 + serde, or raw)    |
//! table_off  +---------------------------------------------------------------+
//!            | section entry x count, 32 bytes each:                         |
//!            |   id u32 | 0 u32 | offset u64 | length u64 | crc32c u32 | 0 u32 |
//! len - 32   +---------------------------------------------------------------+
//!            | table_off u64 | count u32 | table crc32c u32 | total len u64 |  footer, 32 bytes
//!            | end magic [8]                                                 |
//!            +---------------------------------------------------------------+
//! ```
//!
//! Every section carries its own CRC32C; the table CRC covers the header and the section table,
//! so a flipped byte anywhere is detected. The table sits at the end so that a writer can stream
//! a section of unknown length (guest RAM) without buffering it; a file cut short loses its
//! footer and is reported as truncated.
//!
//! Readers validate magic, version, footer, lengths and checksums before they hand out any
//! payload, and decode payloads with a size limit, so hostile or damaged input yields a
//! [`ContainerError`] rather than a huge allocation or a panic.
//!
//! Compatibility policy: a format's reader accepts its current version and the previous one
//! (see each [`FormatSpec`]); a writer always writes the current version.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub const HEADER_LEN: u64 = 16;
pub const ENTRY_LEN: u64 = 32;
pub const FOOTER_LEN: u64 = 32;
const END_MAGIC: [u8; 8] = *b"CPRVMEND";
/// Sections are few; a count above this is damage, not data.
const MAX_SECTIONS: u32 = 4096;
/// Largest payload decoded into memory (RAM is streamed, never decoded).
pub const MAX_DECODED_SECTION: u64 = 64 << 20;

/// What a reader expects of one kind of container.
#[derive(Debug)]
pub struct FormatSpec {
    /// Human name used in error messages ("state file", "CPR state").
    pub what: &'static str,
    pub magic: [u8; 8],
    /// The version writers produce.
    pub current_version: u32,
    /// Every version readers accept (current and previous).
    pub readable_versions: &'static [u32],
    /// Known section ids and their names, for error messages.
    pub sections: &'static [(u32, &'static str)],
}

impl FormatSpec {
    fn section_name(&self, id: u32) -> String {
        self.sections
            .iter()
            .find(|(known, _)| *known == id)
            .map(|(_, name)| format!("'{name}'"))
            .unwrap_or_else(|| format!("#{id}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{what}: {context}: {source}")]
    Io {
        what: &'static str,
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{what} is {len} bytes, shorter than the smallest valid one ({min} bytes): truncated or not a {what}"
    )]
    TooShort {
        what: &'static str,
        len: u64,
        min: u64,
    },
    #[error("not a {what}: magic is {found:02x?}, expected {expected:02x?}")]
    BadMagic {
        what: &'static str,
        found: [u8; 8],
        expected: [u8; 8],
    },
    #[error(
        "{what} has format version {found}, this build reads versions {readable:?}: use a VMM release that reads it"
    )]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        readable: &'static [u32],
    },
    #[error("{what} has no valid end marker: truncated, or still being written")]
    MissingFooter { what: &'static str },
    #[error(
        "{what} records a length of {recorded} bytes but is {actual} bytes: truncated or appended to"
    )]
    LengthMismatch {
        what: &'static str,
        recorded: u64,
        actual: u64,
    },
    #[error("{what} is damaged: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error(
        "{what} header or section table checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupted"
    )]
    TableChecksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error(
        "{what} section {section} checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupted"
    )]
    SectionChecksum {
        what: &'static str,
        section: String,
        stored: u32,
        computed: u32,
    },
    #[error("{what} has no section {section}")]
    MissingSection { what: &'static str, section: String },
    #[error("{what} section {section} could not be decoded: {message}")]
    Decode {
        what: &'static str,
        section: String,
        message: String,
    },
    #[error("{what} section {section} could not be encoded: {source}")]
    Encode {
        what: &'static str,
        section: String,
        #[source]
        source: bincode::error::EncodeError,
    },
}

/// The one bincode configuration every payload uses.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_DECODED_SECTION as usize }>()
}

/// Encodes a payload the way [`ContainerWriter::write_section`] does (exposed for callers that
/// need the bytes first, e.g. to hand them to another thread).
pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(value, bincode_config())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SectionEntry {
    id: u32,
    offset: u64,
    length: u64,
    crc: u32,
}

impl SectionEntry {
    fn to_bytes(self) -> [u8; ENTRY_LEN as usize] {
        let mut b = [0u8; ENTRY_LEN as usize];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.length.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Self {
        SectionEntry {
            id: le_u32(&b[0..4]),
            offset: le_u64(&b[8..16]),
            length: le_u64(&b[16..24]),
            crc: le_u32(&b[24..28]),
        }
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn header_bytes(magic: [u8; 8], version: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(&magic);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h
}

/// Writes a container front to back. Sections are written in the order they are added.
pub struct ContainerWriter<W: Write> {
    out: W,
    spec: &'static FormatSpec,
    header: [u8; HEADER_LEN as usize],
    pos: u64,
    entries: Vec<SectionEntry>,
}

impl<W: Write> ContainerWriter<W> {
    pub fn new(mut out: W, spec: &'static FormatSpec) -> io::Result<Self> {
        let header = header_bytes(spec.magic, spec.current_version);
        out.write_all(&header)?;
        Ok(ContainerWriter {
            out,
            spec,
            header,
            pos: HEADER_LEN,
            entries: Vec::new(),
        })
    }

    /// Adds a serde payload (bincode 2) as section `id`.
    pub fn write_section<T: Serialize>(
        &mut self,
        id: u32,
        value: &T,
    ) -> Result<(), ContainerError> {
        let bytes = encode_payload(value).map_err(|source| ContainerError::Encode {
            what: self.spec.what,
            section: self.spec.section_name(id),
            source,
        })?;
        self.write_raw_section(id, &bytes)
            .map_err(|source| ContainerError::Io {
                what: self.spec.what,
                context: format!("writing section {}", self.spec.section_name(id)),
                source,
            })
    }

    /// Adds already-encoded bytes as section `id`.
    pub fn write_raw_section(&mut self, id: u32, bytes: &[u8]) -> io::Result<()> {
        let mut stream = self.stream_section(id);
        stream.write_all(bytes)?;
        stream.finish();
        Ok(())
    }

    /// Starts a section whose bytes are written through the returned stream (for payloads too
    /// large to hold in memory). Call [`SectionStream::finish`] to record it.
    pub fn stream_section(&mut self, id: u32) -> SectionStream<'_, W> {
        SectionStream {
            offset: self.pos,
            writer: self,
            id,
            length: 0,
            crc: 0,
        }
    }

    /// Writes the section table and footer, returning the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        let table_off = self.pos;
        let mut table = Vec::with_capacity(self.entries.len() * ENTRY_LEN as usize);
        for e in &self.entries {
            table.extend_from_slice(&e.to_bytes());
        }
        let table_crc = crc32c::crc32c_append(crc32c::crc32c(&self.header), &table);
        let total_len = table_off + table.len() as u64 + FOOTER_LEN;
        let mut footer = [0u8; FOOTER_LEN as usize];
        footer[0..8].copy_from_slice(&table_off.to_le_bytes());
        footer[8..12].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        footer[12..16].copy_from_slice(&table_crc.to_le_bytes());
        footer[16..24].copy_from_slice(&total_len.to_le_bytes());
        footer[24..32].copy_from_slice(&END_MAGIC);
        self.out.write_all(&table)?;
        self.out.write_all(&footer)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One section being written; computes its CRC on the fly.
pub struct SectionStream<'a, W: Write> {
    writer: &'a mut ContainerWriter<W>,
    id: u32,
    offset: u64,
    length: u64,
    crc: u32,
}

impl<W: Write> SectionStream<'_, W> {
    /// Records the section in the table.
    pub fn finish(self) {
        let entry = SectionEntry {
            id: self.id,
            offset: self.offset,
            length: self.length,
            crc: self.crc,
        };
        self.writer.entries.push(entry);
    }
}

impl<W: Write> Write for SectionStream<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.writer.out.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.length += n as u64;
        self.writer.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.out.flush()
    }
}

/// Positioned reads, so a reader can validate a large file without loading it.
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn total_len(&self) -> io::Result<u64>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn total_len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&end| end <= self.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }

    fn total_len(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }

    fn total_len(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// The format version of a container, from its header alone (a cheap compatibility check before
/// handing a file to another program).
pub fn peek_version<R: ReadAt + ?Sized>(
    src: &R,
    spec: &'static FormatSpec,
) -> Result<u32, ContainerError> {
    let mut header = [0u8; HEADER_LEN as usize];
    src.read_exact_at(&mut header, 0)
        .map_err(|_| ContainerError::TooShort {
            what: spec.what,
            len: src.total_len().unwrap_or(0),
            min: HEADER_LEN + FOOTER_LEN,
        })?;
    if header[0..8] != spec.magic {
        let mut found = [0u8; 8];
        found.copy_from_slice(&header[0..8]);
        return Err(ContainerError::BadMagic {
            what: spec.what,
            found,
            expected: spec.magic,
        });
    }
    Ok(le_u32(&header[8..12]))
}

/// A validated container: header, footer and table have been checked; section payloads are
/// checked when read (or all at once with [`ContainerReader::verify_all`]).
#[derive(Debug)]
pub struct ContainerReader<R: ReadAt> {
    src: R,
    spec: &'static FormatSpec,
    version: u32,
    entries: Vec<SectionEntry>,
}

impl<R: ReadAt> ContainerReader<R> {
    pub fn open(src: R, spec: &'static FormatSpec) -> Result<Self, ContainerError> {
        let what = spec.what;
        let io_err = |context: &str| {
            let context = context.to_string();
            move |source| ContainerError::Io {
                what,
                context,
                source,
            }
        };
        let len = src.total_len().map_err(io_err("reading its length"))?;
        let min = HEADER_LEN + FOOTER_LEN;
        if len < HEADER_LEN {
            return Err(ContainerError::TooShort { what, len, min });
        }
        let mut header = [0u8; HEADER_LEN as usize];
        src.read_exact_at(&mut header, 0)
            .map_err(io_err("reading the header"))?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&header[0..8]);
        if magic != spec.magic {
            return Err(ContainerError::BadMagic {
                what,
                found: magic,
                expected: spec.magic,
            });
        }
        let version = le_u32(&header[8..12]);
        if !spec.readable_versions.contains(&version) {
            return Err(ContainerError::UnsupportedVersion {
                what,
                found: version,
                readable: spec.readable_versions,
            });
        }
        if len < min {
            return Err(ContainerError::TooShort { what, len, min });
        }
        let mut footer = [0u8; FOOTER_LEN as usize];
        src.read_exact_at(&mut footer, len - FOOTER_LEN)
            .map_err(io_err("reading the footer"))?;
        if footer[24..32] != END_MAGIC {
            return Err(ContainerError::MissingFooter { what });
        }
        let table_off = le_u64(&footer[0..8]);
        let count = le_u32(&footer[8..12]);
        let stored_crc = le_u32(&footer[12..16]);
        let recorded = le_u64(&footer[16..24]);
        if recorded != len {
            return Err(ContainerError::LengthMismatch {
                what,
                recorded,
                actual: len,
            });
        }
        let malformed = |detail: String| ContainerError::Malformed { what, detail };
        if count > MAX_SECTIONS {
            return Err(malformed(format!("section count {count} is implausible")));
        }
        let table_len = u64::from(count) * ENTRY_LEN;
        if table_off < HEADER_LEN || table_off.checked_add(table_len) != Some(len - FOOTER_LEN) {
            return Err(malformed(format!(
                "section table at {table_off} with {count} entries does not end at the footer"
            )));
        }
        let mut table = vec![0u8; table_len as usize];
        src.read_exact_at(&mut table, table_off)
            .map_err(io_err("reading the section table"))?;
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header), &table);
        if computed != stored_crc {
            return Err(ContainerError::TableChecksum {
                what,
                stored: stored_crc,
                computed,
            });
        }
        let entries: Vec<SectionEntry> = table
            .chunks_exact(ENTRY_LEN as usize)
            .map(SectionEntry::from_bytes)
            .collect();
        let mut next_free = HEADER_LEN;
        for e in &entries {
            let end = e.offset.checked_add(e.length);
            if e.offset < next_free || end.is_none_or(|end| end > table_off) {
                return Err(malformed(format!(
                    "section {} at {}+{} overlaps another section or the table",
                    spec.section_name(e.id),
                    e.offset,
                    e.length
                )));
            }
            next_free = e.offset + e.length;
        }
        for (i, e) in entries.iter().enumerate() {
            if entries[..i].iter().any(|other| other.id == e.id) {
                return Err(malformed(format!(
                    "section {} appears twice",
                    spec.section_name(e.id)
                )));
            }
        }
        Ok(ContainerReader {
            src,
            spec,
            version,
            entries,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn has_section(&self, id: u32) -> bool {
        self.entry(id).is_some()
    }

    pub fn section_len(&self, id: u32) -> Option<u64> {
        self.entry(id).map(|e| e.length)
    }

    fn entry(&self, id: u32) -> Option<SectionEntry> {
        self.entries.iter().copied().find(|e| e.id == id)
    }

    fn require(&self, id: u32) -> Result<SectionEntry, ContainerError> {
        self.entry(id)
            .ok_or_else(|| ContainerError::MissingSection {
                what: self.spec.what,
                section: self.spec.section_name(id),
            })
    }

    /// Reads a section's bytes and checks its CRC.
    pub fn read_raw_section(&self, id: u32) -> Result<Vec<u8>, ContainerError> {
        let e = self.require(id)?;
        if e.length > MAX_DECODED_SECTION {
            return Err(ContainerError::Malformed {
                what: self.spec.what,
                detail: format!(
                    "section {} is {} bytes, over the {} byte limit for decoded sections",
                    self.spec.section_name(id),
                    e.length,
                    MAX_DECODED_SECTION
                ),
            });
        }
        let mut buf = vec![0u8; e.length as usize];
        self.src
            .read_exact_at(&mut buf, e.offset)
            .map_err(|source| ContainerError::Io {
                what: self.spec.what,
                context: format!("reading section {}", self.spec.section_name(id)),
                source,
            })?;
        self.check_crc(e, crc32c::crc32c(&buf))?;
        Ok(buf)
    }

    /// Reads, checks and decodes a serde section. The payload must be consumed exactly.
    pub fn read_section<T: DeserializeOwned>(&self, id: u32) -> Result<T, ContainerError> {
        let bytes = self.read_raw_section(id)?;
        let decode_err = |message: String| ContainerError::Decode {
            what: self.spec.what,
            section: self.spec.section_name(id),
            message,
        };
        let (value, used) = bincode::serde::decode_from_slice(&bytes, bincode_config())
            .map_err(|e| decode_err(e.to_string()))?;
        if used != bytes.len() {
            return Err(decode_err(format!(
                "{} trailing bytes after the payload",
                bytes.len() - used
            )));
        }
        Ok(value)
    }

    /// Streams a section in chunks of at most `chunk` bytes to `sink(offset_in_section, bytes)`,
    /// then checks its CRC. The sink must treat the data as provisional until this returns Ok.
    pub fn stream_section<E>(
        &self,
        id: u32,
        chunk: usize,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, ContainerError> {
        let e = self.require(id)?;
        let mut buf = vec![0u8; chunk.max(1)];
        let mut done = 0u64;
        let mut crc = 0u32;
        while done < e.length {
            let n = (e.length - done).min(buf.len() as u64) as usize;
            self.src
                .read_exact_at(&mut buf[..n], e.offset + done)
                .map_err(|source| ContainerError::Io {
                    what: self.spec.what,
                    context: format!("reading section {}", self.spec.section_name(id)),
                    source,
                })?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            if let Err(err) = sink(done, &buf[..n]) {
                return Ok(Err(err));
            }
            done += n as u64;
        }
        self.check_crc(e, crc)?;
        Ok(Ok(()))
    }

    /// Checks the CRC of every section (streaming, so it works for sections of any size).
    pub fn verify_all(&self) -> Result<(), ContainerError> {
        for e in &self.entries {
            self.stream_section(e.id, 1 << 20, |_, _| Ok::<(), ()>(()))?
                .ok();
        }
        Ok(())
    }

    fn check_crc(&self, e: SectionEntry, computed: u32) -> Result<(), ContainerError> {
        if computed != e.crc {
            return Err(ContainerError::SectionChecksum {
                what: self.spec.what,
                section: self.spec.section_name(e.id),
                stored: e.crc,
                computed,
            });
        }
        Ok(())
    }
}

/// Writes `path` atomically: a temporary file (mode 0600) in the same directory is filled by
/// `fill` and renamed over `path` only when `fill` succeeded; on any error it is removed, so a
/// failed save never leaves a partial file behind. No fsync: the readers run on the same host
/// and the page cache survives an exec.
pub fn write_file_atomically<T, E>(
    path: &Path,
    io_error: impl Fn(io::Error) -> E,
    fill: impl FnOnce(&mut BufWriter<&File>) -> Result<T, E>,
) -> Result<T, E> {
    let tmp = temporary_path_for(path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(&io_error)?;
    let result = (|| {
        let mut writer = BufWriter::with_capacity(1 << 20, &file);
        let value = fill(&mut writer)?;
        writer.flush().map_err(&io_error)?;
        drop(writer);
        std::fs::rename(&tmp, path).map_err(&io_error)?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temporary_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".to_string());
    let unique = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        crate::timing::monotonic_ns()
    );
    path.with_file_name(unique)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    static SPEC: FormatSpec = FormatSpec {
        what: "test file",
        magic: *b"TESTFMT1",
        current_version: 2,
        readable_versions: &[1, 2],
        sections: &[(1, "alpha"), (2, "beta"), (3, "bulk")],
    };

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Alpha {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Vec<u8> {
        let mut w = ContainerWriter::new(Vec::new(), &SPEC).unwrap();
        w.write_section(
            1,
            &Alpha {
                name: "x".into(),
                values: vec![1, 2, 3],
            },
        )
        .unwrap();
        w.write_section(2, &42u32).unwrap();
        let mut s = w.stream_section(3);
        for i in 0..10u8 {
            s.write_all(&[i; 1000]).unwrap();
        }
        s.finish();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let r = ContainerReader::open(bytes, &SPEC).unwrap();
        assert_eq!(r.version(), 2);
        let a: Alpha = r.read_section(1).unwrap();
        assert_eq!(a.values, vec![1, 2, 3]);
        assert_eq!(r.read_section::<u32>(2).unwrap(), 42);
        let mut bulk = Vec::new();
        r.stream_section(3, 333, |off, b| {
            assert_eq!(off as usize, bulk.len());
            bulk.extend_from_slice(b);
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(bulk.len(), 10_000);
        assert_eq!(bulk[9999], 9);
        r.verify_all().unwrap();
        assert!(matches!(
            r.read_section::<u32>(7),
            Err(ContainerError::MissingSection { .. })
        ));
    }

    /// Found by fuzzing (fuzz/corpus/cpr_state/crash-…): a table offset near u64::MAX in the
    /// footer overflowed the check that the table ends at the footer.
    #[test]
    fn a_table_offset_near_the_top_is_refused() {
        let mut bytes = sample();
        let footer = bytes.len() - FOOTER_LEN as usize;
        bytes[footer..footer + 8].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        assert!(matches!(
            ContainerReader::open(bytes, &SPEC),
            Err(ContainerError::Malformed { .. })
        ));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = sample();
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            let outcome = ContainerReader::open(damaged, &SPEC).and_then(|r| {
                r.verify_all()?;
                r.read_section::<Alpha>(1)?;
                r.read_section::<u32>(2)
            });
            assert!(outcome.is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let err = ContainerReader::open(bytes[..len].to_vec(), &SPEC).unwrap_err();
            let msg = err.to_string();
            assert!(!msg.is_empty());
        }
    }

    #[test]
    fn version_and_magic_errors_say_what_is_wrong() {
        let mut bytes = sample();
        bytes[8] = 9;
        let err = ContainerReader::open(bytes, &SPEC).unwrap_err();
        assert!(matches!(
            err,
            ContainerError::UnsupportedVersion { found: 9, .. }
        ));
        assert!(err.to_string().contains("version 9"), "{err}");
        let err = ContainerReader::open(b"garbage-garbage-garbage".to_vec(), &SPEC).unwrap_err();
        assert!(err.to_string().contains("not a test file"), "{err}");
    }

    #[test]
    fn peek_reads_only_the_header() {
        let bytes = sample();
        assert_eq!(peek_version(&bytes[..16], &SPEC).unwrap(), 2);
        assert!(peek_version(&b"nope"[..], &SPEC).is_err());
    }

    #[test]
    fn previous_version_is_readable() {
        let mut bytes = sample();
        bytes[8] = 1;
        // The header is covered by the table CRC, so re-stamp it as a version-1 writer would.
        let len = bytes.len();
        let table_off = le_u64(&bytes[len - 32..len - 24]) as usize;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..16]), &bytes[table_off..len - 32]);
        bytes[len - 20..len - 16].copy_from_slice(&crc.to_le_bytes());
        let r = ContainerReader::open(bytes, &SPEC).unwrap();
        assert_eq!(r.version(), 1);
    }

    #[test]
    fn atomic_write_leaves_nothing_on_failure() {
        let dir = std::env::temp_dir().join(format!("cpr-common-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("state");
        let r: Result<(), io::Error> =
            write_file_atomically(&target, |e| e, |_| Err(io::Error::other("disk on fire")));
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        write_file_atomically(&target, |e| e, |w| w.write_all(b"ok")).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"ok");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
