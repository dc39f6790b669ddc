//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! its IOAPIC and the routing of the ISA interrupts.
//!
//! Layout (MP spec chapter 4): a 16-byte floating pointer structure ("_MP_") pointing at a
//! configuration table ("PCMP") followed by its entries: one processor entry per vCPU, one ISA
//! bus, one IOAPIC, one I/O interrupt entry per IOAPIC pin and the two local interrupt entries
//! of the virtual-wire mode.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

use super::layout::{APIC_START, BIOS_ROM_START, IOAPIC_START, MPTABLE_START};

/// Most vCPUs Skiff supports (APIC ids are 0..MAX_CPUS; the IOAPIC takes the next id).
pub const MAX_CPUS: u8 = 32;

const MP_SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_PINS: u8 = 24;

// Entry types (MP spec table 4-3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTPROCESSOR: u8 = 1 << 1;
/// Processor signature: family 6 (stepping and model 0), as QEMU and Firecracker report.
const CPU_SIGNATURE: u32 = 0x600;
/// Processor features from CPUID leaf 1 EDX: FPU, APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const IOAPIC_ENABLED: u8 = 1;
// Interrupt types (MP spec table 4-8).
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus".
const IRQ_FLAGS_DEFAULT: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// Destination "all local APICs" for the LINT entries.
const ALL_LAPICS: u8 = 0xff;

const FLOATING_POINTER_SIZE: usize = 16;
const CONFIG_HEADER_SIZE: usize = 44;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The vCPU count is outside 1..=MAX_CPUS.
    #[error("{0} vCPUs requested; the MP table describes 1 to {MAX_CPUS}")]
    TooManyCpus(u8),
    /// The table does not fit below the BIOS area.
    #[error("the MP table for {0} vCPUs does not fit in the last KiB of base memory")]
    TooLarge(u8),
    /// Writing it to guest memory failed.
    #[error("cannot write the MP table: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// The IOAPIC's id: the first one after the CPUs'.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// The configuration table (header and entries) for `num_cpus` vCPUs, with its checksum.
fn config_table(num_cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count = 0u16;
    for cpu in 0..num_cpus {
        entries.push(MP_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.push(MP_BUS);
    entries.push(ISA_BUS_ID);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.push(MP_IOAPIC);
    entries.push(ioapic_id(num_cpus));
    entries.push(APIC_VERSION);
    entries.push(IOAPIC_ENABLED);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.push(MP_INTSRC);
        entries.push(INT_TYPE_INT);
        entries.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        entries.push(ISA_BUS_ID);
        entries.push(pin);
        entries.push(ioapic_id(num_cpus));
        entries.push(pin);
        count += 1;
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.push(MP_LINTSRC);
        entries.push(int_type);
        entries.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        entries.push(ISA_BUS_ID);
        entries.push(0);
        entries.push(ALL_LAPICS);
        entries.push(lint);
        count += 1;
    }

    let length = (CONFIG_HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MP_SPEC_REVISION);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"SKIFF   "); // OEM id, 8 bytes
    table.extend_from_slice(b"SKIFFVM     "); // product id, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The floating pointer structure pointing at a configuration table at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; FLOATING_POINTER_SIZE] {
    let mut fp = [0u8; FLOATING_POINTER_SIZE];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte paragraphs
    fp[9] = MP_SPEC_REVISION;
    fp[10] = checksum(&fp);
    fp
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestRam, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = MPTABLE_START.0 + FLOATING_POINTER_SIZE as u64;
    let table = config_table(num_cpus);
    if table_addr + table.len() as u64 > BIOS_ROM_START {
        return Err(MptableError::TooLarge(num_cpus));
    }
    mem.write_slice(&floating_pointer(table_addr as u32), MPTABLE_START)
        .map_err(MptableError::Write)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MIB;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_zero_and_sizes_right() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        for cpus in [1u8, 2, 4, 32] {
            setup_mptable(&mem, cpus).unwrap();
            let mut fp = [0u8; 16];
            mem.read_slice(&mut fp, MPTABLE_START).unwrap();
            assert_eq!(&fp[0..4], b"_MP_");
            assert_eq!(sum(&fp), 0);
            let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap());
            assert_eq!(table_addr as u64, MPTABLE_START.0 + 16);
            let mut header = [0u8; 44];
            mem.read_slice(&mut header, GuestAddress(table_addr as u64))
                .unwrap();
            assert_eq!(&header[0..4], b"PCMP");
            let len = u16::from_le_bytes([header[4], header[5]]) as usize;
            assert_eq!(len, 44 + 20 * cpus as usize + 8 * (1 + 1 + 24 + 2));
            let mut table = vec![0u8; len];
            mem.read_slice(&mut table, GuestAddress(table_addr as u64))
                .unwrap();
            assert_eq!(sum(&table), 0);
            let count = u16::from_le_bytes([header[34], header[35]]);
            assert_eq!(count as usize, cpus as usize + 28);
        }
    }

    #[test]
    fn processor_entries_name_each_apic_id() {
        let table = config_table(4);
        for cpu in 0..4usize {
            let e = &table[44 + cpu * 20..44 + (cpu + 1) * 20];
            assert_eq!((e[0], e[1] as usize), (MP_PROCESSOR, cpu));
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
        }
        let ioapic = &table[44 + 4 * 20 + 8..];
        assert_eq!((ioapic[0], ioapic[1]), (MP_IOAPIC, 4));
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 0),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            setup_mptable(&mem, 33),
            Err(MptableError::TooManyCpus(33))
        ));
    }
}
