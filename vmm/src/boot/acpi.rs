//! ACPI tables: just enough for the CPU and IOAPIC topology (kernels built without MP table
//! support, such as Debian's cloud kernels, take SMP information from the MADT only).
//!
//! At [`ACPI_RSDP_ADDR`], all little-endian, each structure one `#[repr(C, packed)]` type below:
//!
//! - `+0x00` [`Rsdp`], revision 2 (36 bytes): no RSDT, the XSDT's address;
//! - `+0x40` XSDT: [`TableHeader`] "XSDT" and one u64 entry, the MADT's address;
//! - `+0x80` MADT: [`TableHeader`] "APIC", [`MadtFixed`] (local APIC address, PCAT_COMPAT: dual
//!   8259s present), then a [`MadtLocalApic`] per vCPU (ACPI processor UID i, APIC id i,
//!   enabled), one [`MadtIoApic`] (id = vcpus at [`IOAPIC_ADDR`], GSI base 0) and one
//!   [`MadtLocalApicNmi`] (LINT1 of all processors).
//!
//! No FADT/DSDT: there is no ACPI hardware (PM timer, SCI, power button). A kernel reads the
//! MADT at boot, then reports that it cannot load the (absent) DSDT and runs without ACPI.
//! ISA IRQs map to the same-numbered IOAPIC pins, as the absence of interrupt source overrides
//! says and KVM routes them.
//!
//! The rust-vmm `acpi_tables` crate was considered: its creator id is fixed ("RVAT", which
//! would change the bytes guests have always read here) and its MADT has no local APIC NMI
//! structure, so the few structures needed are declared here.

use std::mem::size_of;

use vm_memory::ByteValued;

use super::linux::MAX_LINUX_VCPUS;
use super::linux::{ACPI_RSDP_ADDR, EBDA_START, HIMEM_START, IOAPIC_ADDR, LAPIC_ADDR};
use super::table_checksum;

const XSDT_OFFSET: usize = 0x40;
const MADT_OFFSET: usize = 0x80;
const OEM_ID: [u8; 6] = *b"CPRVMM";
const OEM_TABLE_ID: [u8; 8] = *b"CPRVMMLX";
const CREATOR_ID: [u8; 4] = *b"CPRV";
const RSDP_REVISION: u8 = 2;
const XSDT_REVISION: u8 = 1;
const MADT_REVISION: u8 = 5;
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LAPIC_ENABLED: u32 = 1;
const ALL_PROCESSORS: u8 = 0xff;

/// The Root System Description Pointer, ACPI 2.0 form.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Rsdp {
    signature: [u8; 8],
    /// Over the first 20 bytes (the ACPI 1.0 part).
    checksum: u8,
    oem_id: [u8; 6],
    revision: u8,
    /// 0: no RSDT, the XSDT is used.
    rsdt_addr: u32,
    length: u32,
    xsdt_addr: u64,
    /// Over all 36 bytes.
    extended_checksum: u8,
    reserved: [u8; 3],
}

/// The header every system description table starts with.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct TableHeader {
    signature: [u8; 4],
    /// Header and body.
    length: u32,
    revision: u8,
    /// Over the whole table.
    checksum: u8,
    oem_id: [u8; 6],
    oem_table_id: [u8; 8],
    oem_revision: u32,
    creator_id: [u8; 4],
    creator_revision: u32,
}

/// The MADT's fields after the header.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MadtFixed {
    lapic_addr: u32,
    flags: u32,
}

/// MADT entry type 0: a processor's local APIC.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MadtLocalApic {
    entry_type: u8,
    length: u8,
    processor_uid: u8,
    apic_id: u8,
    flags: u32,
}

/// MADT entry type 1: an I/O APIC.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MadtIoApic {
    entry_type: u8,
    length: u8,
    id: u8,
    reserved: u8,
    addr: u32,
    gsi_base: u32,
}

/// MADT entry type 4: which LINT pin of which processors' local APICs is wired to NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MadtLocalApicNmi {
    entry_type: u8,
    length: u8,
    processor_uid: u8,
    /// 0: polarity and trigger mode conform to the bus.
    flags: u16,
    lint: u8,
}

// SAFETY: all of these are `repr(C, packed)` structs of integers and byte arrays: no padding,
// and every bit pattern is a valid value.
unsafe impl ByteValued for Rsdp {}
// SAFETY: as above.
unsafe impl ByteValued for TableHeader {}
// SAFETY: as above.
unsafe impl ByteValued for MadtFixed {}
// SAFETY: as above.
unsafe impl ByteValued for MadtLocalApic {}
// SAFETY: as above.
unsafe impl ByteValued for MadtIoApic {}
// SAFETY: as above.
unsafe impl ByteValued for MadtLocalApicNmi {}

// The sizes the ACPI specification gives.
const _: () = assert!(size_of::<Rsdp>() == 36);
const _: () = assert!(size_of::<TableHeader>() == 36);
const _: () = assert!(size_of::<MadtFixed>() == 8);
const _: () = assert!(size_of::<MadtLocalApic>() == 8);
const _: () = assert!(size_of::<MadtIoApic>() == 12);
const _: () = assert!(size_of::<MadtLocalApicNmi>() == 6);

/// A table: the standard header (checksum filled in) followed by `body`.
fn table(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut header = TableHeader {
        signature,
        length: ((size_of::<TableHeader>() + body.len()) as u32).to_le(),
        revision,
        checksum: 0,
        oem_id: OEM_ID,
        oem_table_id: OEM_TABLE_ID,
        oem_revision: 1u32.to_le(),
        creator_id: CREATOR_ID,
        creator_revision: 1u32.to_le(),
    };
    header.checksum = table_checksum(&[header.as_slice(), body]);
    let mut t = Vec::with_capacity(size_of::<TableHeader>() + body.len());
    t.extend_from_slice(header.as_slice());
    t.extend_from_slice(body);
    t
}

/// RSDP, XSDT and MADT for `vcpus` vCPUs, to be written at [`ACPI_RSDP_ADDR`].
pub fn acpi_tables(vcpus: u32) -> Vec<u8> {
    let mut madt = Vec::new();
    let fixed = MadtFixed {
        lapic_addr: LAPIC_ADDR.to_le(),
        flags: MADT_PCAT_COMPAT.to_le(),
    };
    madt.extend_from_slice(fixed.as_slice());
    for cpu in 0..vcpus {
        let lapic = MadtLocalApic {
            entry_type: MADT_LOCAL_APIC,
            length: size_of::<MadtLocalApic>() as u8,
            processor_uid: cpu as u8,
            apic_id: cpu as u8,
            flags: MADT_LAPIC_ENABLED.to_le(),
        };
        madt.extend_from_slice(lapic.as_slice());
    }
    let ioapic = MadtIoApic {
        entry_type: MADT_IOAPIC,
        length: size_of::<MadtIoApic>() as u8,
        id: vcpus as u8,
        reserved: 0,
        addr: IOAPIC_ADDR.to_le(),
        gsi_base: 0,
    };
    madt.extend_from_slice(ioapic.as_slice());
    let nmi = MadtLocalApicNmi {
        entry_type: MADT_LOCAL_APIC_NMI,
        length: size_of::<MadtLocalApicNmi>() as u8,
        processor_uid: ALL_PROCESSORS,
        flags: 0,
        lint: 1,
    };
    madt.extend_from_slice(nmi.as_slice());
    let madt = table(*b"APIC", MADT_REVISION, &madt);

    let madt_addr = ACPI_RSDP_ADDR + MADT_OFFSET as u64;
    let xsdt = table(*b"XSDT", XSDT_REVISION, &madt_addr.to_le_bytes());

    let mut rsdp = Rsdp {
        signature: *b"RSD PTR ",
        checksum: 0,
        oem_id: OEM_ID,
        revision: RSDP_REVISION,
        rsdt_addr: 0,
        length: (size_of::<Rsdp>() as u32).to_le(),
        xsdt_addr: (ACPI_RSDP_ADDR + XSDT_OFFSET as u64).to_le(),
        extended_checksum: 0,
        reserved: [0; 3],
    };
    rsdp.checksum = table_checksum(&[&rsdp.as_slice()[..20]]);
    rsdp.extended_checksum = table_checksum(&[rsdp.as_slice()]);

    let mut tables = vec![0u8; MADT_OFFSET + madt.len()];
    tables[..size_of::<Rsdp>()].copy_from_slice(rsdp.as_slice());
    tables[XSDT_OFFSET..XSDT_OFFSET + xsdt.len()].copy_from_slice(&xsdt);
    tables[MADT_OFFSET..].copy_from_slice(&madt);
    tables
}

// The RSDP and the XSDT fit before the MADT.
const _: () = assert!(size_of::<Rsdp>() <= XSDT_OFFSET);
const _: () = assert!(XSDT_OFFSET + size_of::<TableHeader>() + 8 <= MADT_OFFSET);
// The largest ACPI tables stay below 1 MiB, in the reserved BIOS area.
const _: () = assert!(
    ACPI_RSDP_ADDR as usize
        + MADT_OFFSET
        + size_of::<TableHeader>()
        + size_of::<MadtFixed>()
        + MAX_LINUX_VCPUS as usize * size_of::<MadtLocalApic>()
        + size_of::<MadtIoApic>()
        + size_of::<MadtLocalApicNmi>()
        <= HIMEM_START as usize
);
const _: () = assert!(EBDA_START as usize + 0x1800 <= ACPI_RSDP_ADDR as usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_tables_are_well_formed() {
        let sum = |b: &[u8]| b.iter().fold(0u8, |s, x| s.wrapping_add(*x));
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        for vcpus in [1, 3, MAX_LINUX_VCPUS] {
            let t = acpi_tables(vcpus);
            assert!(ACPI_RSDP_ADDR + t.len() as u64 <= HIMEM_START);
            let rsdp = &t[..36];
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(rsdp), 0);
            assert_eq!(rsdp[15], 2, "revision");
            assert_eq!(u32_at(rsdp, 20), 36);
            let xsdt_off = (u64_at(rsdp, 24) - ACPI_RSDP_ADDR) as usize;
            let xsdt = &t[xsdt_off..xsdt_off + u32_at(&t, xsdt_off + 4) as usize];
            assert_eq!(&xsdt[..4], b"XSDT");
            assert_eq!(sum(xsdt), 0);
            assert_eq!(xsdt.len(), 44);
            let madt_off = (u64_at(xsdt, 36) - ACPI_RSDP_ADDR) as usize;
            let madt = &t[madt_off..];
            assert_eq!(&madt[..4], b"APIC");
            assert_eq!(u32_at(madt, 4) as usize, madt.len());
            assert_eq!(sum(madt), 0);
            assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
            let mut at = 44;
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut nmis = 0;
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                match kind {
                    0 => lapics.push((madt[at + 2], madt[at + 3], u32_at(madt, at + 4))),
                    1 => ioapics.push((madt[at + 2], u32_at(madt, at + 4), u32_at(madt, at + 8))),
                    4 => nmis += 1,
                    other => panic!("unexpected MADT entry {other}"),
                }
                at += len;
            }
            assert_eq!(at, madt.len());
            let expected: Vec<_> = (0..vcpus).map(|i| (i as u8, i as u8, 1)).collect();
            assert_eq!(lapics, expected);
            assert_eq!(ioapics, vec![(vcpus as u8, IOAPIC_ADDR, 0)]);
            assert_eq!(nmis, 1);
        }
    }

    const ACPI_2_VCPUS: &str = concat!(
        "52534420505452200a435052564d4d02000000002400000040000e00000000008e00000000000000",
        "000000000000000000000000000000000000000000000000585344542c0000000177435052564d4d",
        "435052564d4d4c5801000000435052560100000080000e0000000000000000000000000000000000",
        "0000000000000000415049434e000000053b435052564d4d435052564d4d4c580100000043505256",
        "010000000000e0fe0100000000080000010000000008010101000000010c02000000c0fe00000000",
        "0406ff000001",
    );

    /// The bytes are those the VMM has always written (recorded before the tables were built
    /// from named structs): all of them for 2 vCPUs, an FNV-1a hash for other counts.
    #[test]
    fn acpi_table_bytes_are_unchanged() {
        use super::super::test_golden::{fnv1a, hex};
        assert_eq!(hex(&acpi_tables(2)), ACPI_2_VCPUS);
        for (vcpus, hash) in [
            (1, 0x1238e4993df4038d),
            (3, 0x527790bc19bf73d7),
            (8, 0x034cd8a6f762fa03),
            (MAX_LINUX_VCPUS, 0x7149731bff47c8ad),
        ] {
            assert_eq!(fnv1a(&acpi_tables(vcpus)), hash, "{vcpus} vCPUs");
        }
    }
}
