//! The machine state file's container identity: magic, format versions and section ids.
//!
//! The payloads are the VMM's (`vmm/src/migration/format.rs` documents them); this part is
//! shared so that `cpr-shim` can check a target VMM against a state file without decoding it.
//!
//! Compatibility policy: a VMM reads the current state-file version and the previous one, and
//! writes the current one. Any change to a payload's layout bumps the version.

use crate::container::FormatSpec;

pub const SECTION_RUN: u32 = 1;
pub const SECTION_DESCRIPTION: u32 = 2;
pub const SECTION_VCPUS: u32 = 3;
pub const SECTION_VM: u32 = 4;
pub const SECTION_DEVICES: u32 = 5;
pub const SECTION_RAM: u32 = 6;
/// cpr-reboot: which file holds guest RAM (path, device, inode, size). Optional and new in
/// version 3 files: readers that do not know it ignore it (no version bump).
pub const SECTION_RAM_FILE: u32 = 7;

/// Version 2 added the i8042, RTC and PCI-configuration device states; version 3 stores every
/// device's state as an opaque blob under its id and lists the devices in the description.
pub const STATE_FORMAT_VERSION: u32 = 3;

pub static STATE_FILE_FORMAT: FormatSpec = FormatSpec {
    what: "state file",
    magic: *b"CPRVMMST",
    current_version: STATE_FORMAT_VERSION,
    // Version 1 files (no i8042/RTC/PCI state) restore with those devices fresh; version 1 and
    // 2 files are converted to version 3's shapes when read.
    readable_versions: &[1, 2, 3],
    sections: &[
        (SECTION_RUN, "run"),
        (SECTION_DESCRIPTION, "description"),
        (SECTION_VCPUS, "vcpus"),
        (SECTION_VM, "vm"),
        (SECTION_DEVICES, "devices"),
        (SECTION_RAM, "ram"),
        (SECTION_RAM_FILE, "ram-file"),
    ],
};
