//! Which formats a `vmm` binary reads, recorded in the binary itself as an ELF note, so that
//! `cpr-shim` can check a target before executing it without running it.
//!
//! Reading the note costs a few small reads of the target's first pages (ELF header, program
//! headers, the note segment), far below the blackout's noise, and it cannot go stale the way a
//! manifest file beside the binary could.
//!
//! Note layout (ELF note, 4-byte aligned, in a `PT_NOTE` segment):
//!
//! ```text
//! namesz u32 = 8 | descsz u32 = 52 | type u32 = 0x43505201 | name "CPR-VMM\0"
//! desc: oldest readable state-file version u32 | newest u32
//!       oldest readable CPR-state version u32  | newest u32
//!       version string, NUL-padded [u8; 32]
//!       features u32 (bits, see FEATURE_*; absent in notes of 48 bytes: none)
//! ```
//!
//! Readers accept any `descsz` of at least 48 and ignore what they do not know, so the note can
//! grow at its end.

use std::fs::File;
use std::os::unix::fs::FileExt;

pub const NOTE_NAME: [u8; 8] = *b"CPR-VMM\0";
pub const NOTE_TYPE: u32 = 0x4350_5201;
pub const VERSION_LEN: usize = 32;
/// The shortest description a reader accepts (the first release's note).
pub const DESC_LEN: usize = 16 + VERSION_LEN;
/// The description this release writes: the first release's plus the feature bits.
pub const DESC_LEN_WITH_FEATURES: usize = DESC_LEN + 4;

/// The VMM reports to the update's rescue guard: it says when it has resumed the guest (on the
/// fd named by `VMM_CPR_RESCUE`), and rolls back by itself on SIGUSR2 while it has not.
pub const FEATURE_RESCUE: u32 = 1;
/// The VMM keeps SIGTERM, SIGINT and SIGHUP blocked and reads them from a signalfd, so one that
/// is pending across the update's execs reaches it (see `exec::block_termination_signals`).
/// A program without it gets them unblocked (and pending ones dropped) before it is executed.
pub const FEATURE_SIGNALS: u32 = 2;

/// The note as laid out in memory (the VMM places one in its binary).
#[repr(C, align(4))]
pub struct CompatNote {
    pub namesz: u32,
    pub descsz: u32,
    pub note_type: u32,
    pub name: [u8; 8],
    pub formats: [u32; 4],
    pub version: [u8; VERSION_LEN],
    pub features: u32,
}

impl CompatNote {
    /// A note for a binary that reads state files `state` and CPR states `cpr` (oldest, newest).
    pub const fn new(state: (u32, u32), cpr: (u32, u32), version: &str) -> Self {
        let mut v = [0u8; VERSION_LEN];
        let bytes = version.as_bytes();
        let mut i = 0;
        while i < bytes.len() && i < VERSION_LEN - 1 {
            v[i] = bytes[i];
            i += 1;
        }
        CompatNote {
            namesz: NOTE_NAME.len() as u32,
            descsz: DESC_LEN_WITH_FEATURES as u32,
            note_type: NOTE_TYPE,
            name: NOTE_NAME,
            formats: [state.0, state.1, cpr.0, cpr.1],
            version: v,
            features: 0,
        }
    }

    /// The same note, claiming `features` (FEATURE_* bits).
    pub const fn with_features(mut self, features: u32) -> Self {
        self.features = features;
        self
    }
}

/// What a binary's note says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compat {
    pub state_versions: (u32, u32),
    pub cpr_versions: (u32, u32),
    pub version: String,
    pub features: u32,
}

impl Compat {
    pub fn reads_state(&self, v: u32) -> bool {
        (self.state_versions.0..=self.state_versions.1).contains(&v)
    }

    pub fn reads_cpr(&self, v: u32) -> bool {
        (self.cpr_versions.0..=self.cpr_versions.1).contains(&v)
    }

    pub fn has(&self, feature: u32) -> bool {
        self.features & feature == feature
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompatError {
    #[error("reading it: {0}")]
    Io(#[from] std::io::Error),
    #[error("it is not a 64-bit little-endian ELF executable")]
    NotElf,
    #[error(
        "it has no CPR-VMM compatibility note: not a cpr-vmm VMM binary, or one too old for live update"
    )]
    NoNote,
}

const PT_NOTE: u32 = 4;
/// Program headers and notes larger than this are not a VMM's.
const MAX_READ: u64 = 1 << 20;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Reads the compatibility note of the ELF executable `file`.
pub fn read_note(file: &File) -> Result<Compat, CompatError> {
    let mut eh = [0u8; 64];
    file.read_exact_at(&mut eh, 0)
        .map_err(|_| CompatError::NotElf)?;
    // ELF magic, 64-bit class, little-endian.
    if eh[0..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Err(CompatError::NotElf);
    }
    let phoff = le64(&eh, 32);
    let phentsize = u64::from(u16::from_le_bytes([eh[54], eh[55]]));
    let phnum = u64::from(u16::from_le_bytes([eh[56], eh[57]]));
    if phentsize < 56 || phentsize * phnum > MAX_READ {
        return Err(CompatError::NotElf);
    }
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    file.read_exact_at(&mut ph, phoff)?;
    for i in 0..phnum as usize {
        let h = &ph[i * phentsize as usize..];
        if le32(h, 0) != PT_NOTE {
            continue;
        }
        let offset = le64(h, 8);
        let size = le64(h, 32);
        if size > MAX_READ {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        file.read_exact_at(&mut notes, offset)?;
        if let Some(c) = find_in_notes(&notes) {
            return Ok(c);
        }
    }
    Err(CompatError::NoNote)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The compatibility note among the ELF notes `notes` (a PT_NOTE segment's bytes), if any.
pub fn find_in_notes(mut notes: &[u8]) -> Option<Compat> {
    while notes.len() >= 12 {
        let namesz = le32(notes, 0) as usize;
        let descsz = le32(notes, 4) as usize;
        let ntype = le32(notes, 8);
        let name_end = 12 + align4(namesz);
        let desc_end = name_end.checked_add(align4(descsz))?;
        if desc_end > notes.len() {
            return None;
        }
        if ntype == NOTE_TYPE && notes[12..12 + namesz] == NOTE_NAME && descsz >= DESC_LEN {
            let d = &notes[name_end..name_end + descsz];
            let v = &d[16..16 + VERSION_LEN];
            let end = v.iter().position(|b| *b == 0).unwrap_or(VERSION_LEN);
            return Some(Compat {
                state_versions: (le32(d, 0), le32(d, 4)),
                cpr_versions: (le32(d, 8), le32(d, 12)),
                version: String::from_utf8_lossy(&v[..end]).into_owned(),
                features: if descsz >= DESC_LEN_WITH_FEATURES {
                    le32(d, DESC_LEN)
                } else {
                    0
                },
            });
        }
        notes = &notes[desc_end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note_bytes(n: &CompatNote) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&n.namesz.to_le_bytes());
        b.extend_from_slice(&n.descsz.to_le_bytes());
        b.extend_from_slice(&n.note_type.to_le_bytes());
        b.extend_from_slice(&n.name);
        for f in n.formats {
            b.extend_from_slice(&f.to_le_bytes());
        }
        b.extend_from_slice(&n.version);
        if n.descsz as usize >= DESC_LEN_WITH_FEATURES {
            b.extend_from_slice(&n.features.to_le_bytes());
        }
        b
    }

    #[test]
    fn finds_our_note_among_others() {
        let mut notes = Vec::new();
        // A GNU build-id note first.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&8u32.to_le_bytes());
        notes.extend_from_slice(&3u32.to_le_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[1u8; 8]);
        notes.extend_from_slice(&note_bytes(&CompatNote::new((1, 2), (1, 1), "2.0")));
        let c = find_in_notes(&notes).unwrap();
        assert_eq!(c.state_versions, (1, 2));
        assert!(c.reads_state(2) && !c.reads_state(3));
        assert!(c.reads_cpr(1));
        assert_eq!(c.version, "2.0");
        assert!(!c.has(FEATURE_RESCUE));
        assert!(find_in_notes(&notes[..notes.len() - 1]).is_none());
    }

    #[test]
    fn feature_bits_are_read_and_a_first_release_note_has_none() {
        let with = CompatNote::new((1, 3), (1, 1), "2.1").with_features(FEATURE_RESCUE);
        assert!(
            find_in_notes(&note_bytes(&with))
                .unwrap()
                .has(FEATURE_RESCUE)
        );
        // The first release's note: 48 bytes of description, no feature word.
        let mut first = CompatNote::new((1, 2), (1, 1), "0.1.0");
        first.descsz = DESC_LEN as u32;
        let c = find_in_notes(&note_bytes(&first)).unwrap();
        assert_eq!((c.version.as_str(), c.features), ("0.1.0", 0));
    }

    #[test]
    fn a_binary_without_the_note_is_refused() {
        let f = File::open("/bin/sh").unwrap();
        assert!(matches!(read_note(&f), Err(CompatError::NoNote)));
        let f = File::open("/etc/hostname")
            .or_else(|_| File::open("/etc/passwd"))
            .unwrap();
        assert!(matches!(read_note(&f), Err(CompatError::NotElf)));
    }
}
