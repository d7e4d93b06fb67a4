//! The MP table (Intel MultiProcessor Specification 1.4) that tells a Linux guest about its
//! vCPUs, the IOAPIC, and the ISA and PCI interrupt routing.
//!
//! At [`MPTABLE_ADDR`], all little-endian, each structure one `#[repr(C, packed)]` type below:
//!
//! - [`FloatingPointer`] (16 bytes), pointing at the configuration table right after it;
//! - [`ConfigHeader`] (44 bytes), then the entries in type order:
//!   - [`Processor`] (20 bytes) per vCPU: APIC id i, enabled; vCPU 0 also the bootstrap processor;
//!   - [`Bus`] (8 bytes) x2: bus 0, PCI (the MP bus id of a PCI bus is its bus number, which
//!     is how Linux matches a device to its entries), and bus 1, ISA;
//!   - [`IoApic`] (8 bytes): id = vcpus, usable, at [`IOAPIC_ADDR`];
//!   - [`Interrupt`] (8 bytes, I/O interrupt) per ISA IRQ 0..=15 (bus 1) to the same-numbered
//!     IOAPIC pin (KVM's default routing);
//!   - [`Interrupt`] (8 bytes, I/O interrupt) per PCI slot 1..=31 of bus 0: its INTA (source
//!     IRQ `slot << 2 | 0`) to the IOAPIC pin the slot is wired to
//!     ([`crate::devices::pci::intx_gsi`]), level-triggered and active low (flags 0x0f), so a
//!     kernel without ACPI interrupt routing finds the pin of every PCI function's INTx;
//!   - [`Interrupt`] (8 bytes, local interrupt) x2: ExtINT to LINT0 of APIC 0, NMI to LINT1 of
//!     all APICs.
//!
//! Both checksums make their structure's bytes sum to 0 (mod 256).

use std::mem::size_of;

use vm_memory::ByteValued;

use super::linux::{HIMEM_START, IOAPIC_ADDR, LAPIC_ADDR, MAX_LINUX_VCPUS, MPTABLE_ADDR};
use super::table_checksum;
use crate::devices::pci::intx_gsi;

const SPEC_REVISION: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const IOAPIC_USABLE: u8 = 1 << 0;
const IRQ_INT: u8 = 0;
const IRQ_NMI: u8 = 1;
const IRQ_EXTINT: u8 = 3;
/// KVM's LAPIC and IOAPIC version registers.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 in the CPU signature; FPU and APIC in the feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_IRQS: u8 = 16;
const PCI_BUS_ID: u8 = 0;
const ISA_BUS_ID: u8 = 1;
/// PCI slots whose INTA is described (slot 0 is the host bridge, which has no interrupt).
const PCI_INTX_SLOTS: std::ops::RangeInclusive<u8> = 1..=31;
const PCI_INTX_SLOT_COUNT: usize = 31;
/// I/O interrupt flags: polarity active low (bits 1:0 = 3), trigger level (bits 3:2 = 3).
const LEVEL_ACTIVE_LOW: u16 = 0x0f;
const ALL_APICS: u8 = 0xff;
/// Entries that do not depend on the vCPU count: 2 buses, IOAPIC, 16 ISA IRQs, 31 PCI INTA
/// routes, 2 local interrupts.
const FIXED_ENTRIES: usize = 2 + 1 + ISA_IRQS as usize + PCI_INTX_SLOT_COUNT + 2;

/// The MP floating pointer structure: where the configuration table is.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    config_addr: u32,
    /// In 16-byte units.
    length: u8,
    spec_revision: u8,
    checksum: u8,
    /// 0: the configuration table is present; no IMCR, virtual-wire mode.
    features: [u8; 5],
}

/// The header of the MP configuration table.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ConfigHeader {
    signature: [u8; 4],
    /// Header and entries.
    base_length: u16,
    spec_revision: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table_addr: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_addr: u32,
    extended_length: u16,
    extended_checksum: u8,
    reserved: u8,
}

/// A processor entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Processor {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    signature: u32,
    features: u32,
    reserved: [u8; 8],
}

/// A bus entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Bus {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

/// An I/O APIC entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct IoApic {
    entry_type: u8,
    id: u8,
    version: u8,
    flags: u8,
    addr: u32,
}

/// An I/O interrupt or local interrupt assignment entry (same layout; for a local interrupt the
/// destination is a local APIC and its LINT pin).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Interrupt {
    entry_type: u8,
    irq_type: u8,
    /// 0: polarity and trigger mode conform to the bus.
    flags: u16,
    source_bus: u8,
    source_irq: u8,
    dest_apic: u8,
    dest_pin: u8,
}

// SAFETY: all of these are `repr(C, packed)` structs of integers and byte arrays: no padding,
// and every bit pattern is a valid value.
unsafe impl ByteValued for FloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for ConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for Processor {}
// SAFETY: as above.
unsafe impl ByteValued for Bus {}
// SAFETY: as above.
unsafe impl ByteValued for IoApic {}
// SAFETY: as above.
unsafe impl ByteValued for Interrupt {}

// The sizes the MP specification gives.
const _: () = assert!(size_of::<FloatingPointer>() == 16);
const _: () = assert!(size_of::<ConfigHeader>() == 44);
const _: () = assert!(size_of::<Processor>() == 20);
const _: () = assert!(size_of::<Bus>() == 8);
const _: () = assert!(size_of::<IoApic>() == 8);
const _: () = assert!(size_of::<Interrupt>() == 8);

/// Size in bytes of the MP table for `vcpus` vCPUs.
pub fn mptable_size(vcpus: u32) -> usize {
    size_of::<FloatingPointer>() + size_of::<ConfigHeader>() + entries_size(vcpus)
}

fn entries_size(vcpus: u32) -> usize {
    vcpus as usize * size_of::<Processor>() + FIXED_ENTRIES * size_of::<Interrupt>()
}

/// The MP table for `vcpus` (1..=[`MAX_LINUX_VCPUS`]) vCPUs, to be written at [`MPTABLE_ADDR`].
pub fn mptable(vcpus: u32) -> Vec<u8> {
    let ioapic_id = vcpus as u8;
    let mut entries = Vec::with_capacity(entries_size(vcpus));
    for cpu in 0..vcpus {
        let processor = Processor {
            entry_type: ENTRY_PROCESSOR,
            apic_id: cpu as u8,
            apic_version: LAPIC_VERSION,
            flags: CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 },
            signature: CPU_SIGNATURE.to_le(),
            features: CPU_FEATURES.to_le(),
            reserved: [0; 8],
        };
        entries.extend_from_slice(processor.as_slice());
    }
    for (bus_id, bus_type) in [(PCI_BUS_ID, *b"PCI   "), (ISA_BUS_ID, *b"ISA   ")] {
        let bus = Bus {
            entry_type: ENTRY_BUS,
            bus_id,
            bus_type,
        };
        entries.extend_from_slice(bus.as_slice());
    }
    let ioapic = IoApic {
        entry_type: ENTRY_IOAPIC,
        id: ioapic_id,
        version: IOAPIC_VERSION,
        flags: IOAPIC_USABLE,
        addr: IOAPIC_ADDR.to_le(),
    };
    entries.extend_from_slice(ioapic.as_slice());
    for irq in 0..ISA_IRQS {
        let route = Interrupt {
            entry_type: ENTRY_IO_INTERRUPT,
            irq_type: IRQ_INT,
            flags: 0,
            source_bus: ISA_BUS_ID,
            source_irq: irq,
            dest_apic: ioapic_id,
            dest_pin: irq,
        };
        entries.extend_from_slice(route.as_slice());
    }
    for slot in PCI_INTX_SLOTS {
        let route = Interrupt {
            entry_type: ENTRY_IO_INTERRUPT,
            irq_type: IRQ_INT,
            flags: LEVEL_ACTIVE_LOW.to_le(),
            source_bus: PCI_BUS_ID,
            source_irq: slot << 2, // INTA
            dest_apic: ioapic_id,
            dest_pin: intx_gsi(slot) as u8,
        };
        entries.extend_from_slice(route.as_slice());
    }
    let extint = Interrupt {
        entry_type: ENTRY_LOCAL_INTERRUPT,
        irq_type: IRQ_EXTINT,
        flags: 0,
        source_bus: ISA_BUS_ID,
        source_irq: 0,
        dest_apic: 0,
        dest_pin: 0,
    };
    let nmi = Interrupt {
        irq_type: IRQ_NMI,
        dest_apic: ALL_APICS,
        dest_pin: 1,
        ..extint
    };
    entries.extend_from_slice(extint.as_slice());
    entries.extend_from_slice(nmi.as_slice());

    let mut header = ConfigHeader {
        signature: *b"PCMP",
        base_length: ((size_of::<ConfigHeader>() + entries.len()) as u16).to_le(),
        spec_revision: SPEC_REVISION,
        checksum: 0,
        oem_id: *b"CPR-VMM ",
        product_id: *b"LINUX-BOOT  ",
        entry_count: (vcpus as u16 + FIXED_ENTRIES as u16).to_le(),
        lapic_addr: LAPIC_ADDR.to_le(),
        ..Default::default()
    };
    header.checksum = table_checksum(&[header.as_slice(), &entries]);

    let mut pointer = FloatingPointer {
        signature: *b"_MP_",
        config_addr: (MPTABLE_ADDR as u32 + size_of::<FloatingPointer>() as u32).to_le(),
        length: 1,
        spec_revision: SPEC_REVISION,
        ..Default::default()
    };
    pointer.checksum = table_checksum(&[pointer.as_slice()]);

    let mut table = Vec::with_capacity(mptable_size(vcpus));
    table.extend_from_slice(pointer.as_slice());
    table.extend_from_slice(header.as_slice());
    table.extend_from_slice(&entries);
    table
}

// The largest MP table stays inside the reserved EBDA..1 MiB range.
const _: () = assert!(
    MPTABLE_ADDR as usize
        + size_of::<FloatingPointer>()
        + size_of::<ConfigHeader>()
        + MAX_LINUX_VCPUS as usize * size_of::<Processor>()
        + FIXED_ENTRIES * size_of::<Interrupt>()
        <= HIMEM_START as usize
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mptable_is_well_formed() {
        for vcpus in [1, 2, 8, MAX_LINUX_VCPUS] {
            let t = mptable(vcpus);
            assert_eq!(t.len(), mptable_size(vcpus));
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let config_addr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(u64::from(config_addr), MPTABLE_ADDR + 16);
            let config = &t[16..];
            assert_eq!(&config[..4], b"PCMP");
            let len = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(len, config.len());
            assert_eq!(config.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([config[34], config[35]]);
            assert_eq!(count as u32, vcpus + 52);
            assert_eq!(
                u32::from_le_bytes(config[36..40].try_into().unwrap()),
                LAPIC_ADDR
            );
            // Walk the entries.
            let mut at = 44;
            let mut cpus = Vec::new();
            let mut ioapic = None;
            let mut irqs = Vec::new();
            let mut buses = Vec::new();
            for _ in 0..count {
                match config[at] {
                    ENTRY_PROCESSOR => {
                        cpus.push((config[at + 1], config[at + 3]));
                        at += 20;
                    }
                    ENTRY_IOAPIC => {
                        ioapic = Some((
                            config[at + 1],
                            u32::from_le_bytes(config[at + 4..at + 8].try_into().unwrap()),
                        ));
                        at += 8;
                    }
                    ENTRY_IO_INTERRUPT => {
                        let flags = u16::from_le_bytes([config[at + 2], config[at + 3]]);
                        irqs.push((
                            flags,
                            config[at + 4],
                            config[at + 5],
                            config[at + 6],
                            config[at + 7],
                        ));
                        at += 8;
                    }
                    ENTRY_BUS => {
                        buses.push((config[at + 1], config[at + 2..at + 8].to_vec()));
                        at += 8;
                    }
                    _ => at += 8,
                }
            }
            assert_eq!(at, config.len());
            let expected: Vec<(u8, u8)> = (0..vcpus)
                .map(|i| (i as u8, if i == 0 { 3 } else { 1 }))
                .collect();
            assert_eq!(cpus, expected);
            assert_eq!(ioapic, Some((vcpus as u8, IOAPIC_ADDR)));
            assert_eq!(
                buses,
                [(0, b"PCI   ".to_vec()), (1, b"ISA   ".to_vec())],
                "the PCI bus's MP id is its bus number"
            );
            let ioapic_id = vcpus as u8;
            // ISA IRQs (bus 1) to the same pins, conforming to the bus (edge, active high).
            let mut expected_irqs: Vec<_> = (0..16).map(|i| (0, 1, i, ioapic_id, i)).collect();
            // PCI slot s INTA (bus 0, IRQ s << 2) to its pin, level and active low.
            expected_irqs.extend((1u8..32).map(|s| (0x0f, 0, s << 2, ioapic_id, 16 + s % 8)));
            assert_eq!(irqs, expected_irqs);
            assert!(MPTABLE_ADDR + t.len() as u64 <= HIMEM_START);
        }
    }

    const MPTABLE_2_VCPUS: &str = concat!(
        "5f4d505f10fc090001048b000000000050434d50f40104f74350522d564d4d204c494e55582d424f",
        "4f54202000000000000036000000e0fe000000000000140300060000010200000000000000000000",
        "00011401000600000102000000000000000000000100504349202020010149534120202002021101",
        "0000c0fe030000000100020003000000010102010300000001020202030000000103020303000000",
        "01040204030000000105020503000000010602060300000001070207030000000108020803000000",
        "0109020903000000010a020a03000000010b020b03000000010c020c03000000010d020d03000000",
        "010e020e03000000010f020f03000f000004021103000f000008021203000f00000c021303000f00",
        "0010021403000f000014021503000f000018021603000f00001c021703000f000020021003000f00",
        "0024021103000f000028021203000f00002c021303000f000030021403000f000034021503000f00",
        "0038021603000f00003c021703000f000040021003000f000044021103000f000048021203000f00",
        "004c021303000f000050021403000f000054021503000f000058021603000f00005c021703000f00",
        "0060021003000f000064021103000f000068021203000f00006c021303000f000070021403000f00",
        "0074021503000f000078021603000f00007c02170403000001000000040100000100ff01",
    );

    /// The bytes are those the VMM writes: the full table for 2 vCPUs, an FNV-1a hash for other
    /// counts. Recorded before the table was built from named structs, and again when the PCI
    /// bus and its INTA routes were added (the ISA bus became bus 1): a change here must be
    /// deliberate.
    #[test]
    fn mptable_bytes_are_unchanged() {
        use super::super::test_golden::{fnv1a, hex};
        assert_eq!(hex(&mptable(2)), MPTABLE_2_VCPUS);
        for (vcpus, hash) in [
            (1, 0xbc1c61afc34484c1),
            (3, 0x247231b597312d5d),
            (8, 0x5ca33a849897030f),
            (MAX_LINUX_VCPUS, 0xb16773c699291db7),
        ] {
            assert_eq!(fnv1a(&mptable(vcpus)), hash, "{vcpus} vCPUs");
        }
    }
}
