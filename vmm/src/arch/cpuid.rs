//! CPUID as each vCPU sees it: KVM's supported set, normalised for the vCPU's APIC id and the
//! machine's topology (one socket, one thread per core, `num_cpus` cores).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

// Leaf 1.
const LEAF_FEATURES: u32 = 0x1;
const EBX_CLFLUSH_SIZE_SHIFT: u32 = 8;
const EBX_CPU_COUNT_SHIFT: u32 = 16;
const EBX_APIC_ID_SHIFT: u32 = 24;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_SIZE: u32 = 8;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

// Leaf 4: deterministic cache parameters (Intel).
const LEAF_CACHE_PARAMS: u32 = 0x4;
const EAX_CORES_PER_PACKAGE_SHIFT: u32 = 26;
const EAX_THREADS_SHARING_SHIFT: u32 = 14;
const EAX_CACHE_LEVEL_SHIFT: u32 = 5;

// Leaf 6: thermal and power management.
const LEAF_POWER: u32 = 0x6;
const ECX_EPB: u32 = 1 << 3;

// Leaf 0xa: architectural performance monitoring (no vPMU).
const LEAF_PERFMON: u32 = 0xa;

// Leaves 0xb and 0x1f: extended topology.
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
const LEVEL_TYPE_SHIFT: u32 = 8;

/// Rounds up to a power of two's exponent: the bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn normalize_entry(entry: &mut kvm_cpuid_entry2, cpu_index: u8, num_cpus: u8) {
    let apic_id = u32::from(cpu_index);
    let cpus = u32::from(num_cpus);
    match entry.function {
        LEAF_FEATURES => {
            entry.ebx = (apic_id << EBX_APIC_ID_SHIFT)
                | ((1 << bits_for(cpus)) << EBX_CPU_COUNT_SHIFT)
                | (CLFLUSH_SIZE << EBX_CLFLUSH_SIZE_SHIFT);
            entry.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
            if cpus > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // Keep the host cache description; say that every core of the package shares the
            // levels above L2 and that each core has one thread.
            let level = (entry.eax >> EAX_CACHE_LEVEL_SHIFT) & 0x7;
            let sharing = if level >= 3 {
                cpus.saturating_sub(1)
            } else {
                0
            };
            entry.eax &= (1 << EAX_THREADS_SHARING_SHIFT) - 1;
            entry.eax |= (sharing & 0xfff) << EAX_THREADS_SHARING_SHIFT;
            entry.eax |= ((cpus.saturating_sub(1)) & 0x3f) << EAX_CORES_PER_PACKAGE_SHIFT;
        }
        LEAF_POWER => entry.ecx &= !ECX_EPB,
        LEAF_PERFMON => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            entry.edx = apic_id;
            match entry.index {
                // One thread per core.
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << LEVEL_TYPE_SHIFT) | entry.index;
                }
                // All cores in one package.
                1 => {
                    entry.eax = bits_for(cpus);
                    entry.ebx = cpus;
                    entry.ecx = (LEVEL_TYPE_CORE << LEVEL_TYPE_SHIFT) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        _ => {}
    }
}

/// The CPUID of vCPU `cpu_index` out of `num_cpus`, from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, cpu_index: u8, num_cpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, cpu_index, num_cpus);
    }
    cpuid
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
    fn leaf_one_carries_apic_id_and_count() {
        let mut e = entry(1, 0);
        normalize_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        let mut single = entry(1, 0);
        single.edx = EDX_HTT;
        normalize_entry(&mut single, 0, 1);
        assert_eq!(single.edx & EDX_HTT, 0);
        assert_eq!((single.ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn topology_leaves() {
        let mut smt = entry(0xb, 0);
        normalize_entry(&mut smt, 2, 3);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let mut core = entry(0xb, 1);
        normalize_entry(&mut core, 2, 3);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let mut end = entry(0x1f, 2);
        normalize_entry(&mut end, 2, 3);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 2));
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(bits_for), [0, 1, 2, 2, 3, 5]);
    }
}
