//! Per-vCPU CPUID: KVM's supported set, with each vCPU's APIC id and a topology of one socket
//! with one core per vCPU (one thread per core).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things (x2APIC id shifts).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Returns the CPUID for vCPU `index` of `count`.
pub fn for_vcpu(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let core_bits = id_bits(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        patch_entry(e, index, count, core_bits);
    }
    cpuid
}

fn patch_entry(e: &mut kvm_cpuid_entry2, index: u32, count: u32, core_bits: u32) {
    match e.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count.min(255)) << 16);
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
            e.ecx |= ECX_HYPERVISOR;
        }
        LEAF_CACHE => {
            // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1.
            let cache_level = (e.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count } else { 1 };
            e.eax = (e.eax & 0x3fff)
                | ((count.saturating_sub(1) & 0x3f) << 26)
                | ((sharing.saturating_sub(1) & 0xfff) << 14);
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = index;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = count;
                    e.ecx = (LEVEL_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_SIZES => {
            // ECX[7:0] number of threads - 1, ECX[15:12] APIC id size.
            e.ecx = (e.ecx & !0xf0ff) | (count.saturating_sub(1) & 0xff) | (core_bits << 12);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let supported =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)])
                .unwrap();
        let c = for_vcpu(&supported, 2, 3);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 2);
        assert_eq!(e[2].eax, 2); // 3 cores need 2 bits
        assert_eq!(e[2].ebx, 3);
        assert_eq!((e[2].ecx >> 8) & 0xff, LEVEL_CORE);
        assert_eq!((e[3].ecx >> 8) & 0xff, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
