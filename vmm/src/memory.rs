//! Guest RAM: anonymous private mappings registered with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest RAM: mmap-backed regions with a dirty bitmap per region, in which every write the
/// VMM itself makes through vm-memory (device emulation) is recorded; live migration adds it
/// to KVM's dirty log, which only sees the guest's own writes.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

use crate::arch::layout::ram_regions;

/// Errors while creating or registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the RAM failed (usually: not enough address space or memory).
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map {
        /// Requested size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory slot {slot} with KVM: {source}")]
    SetSlot {
        /// The slot number.
        slot: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// madvise failed while discarding RAM contents.
    #[error("cannot discard guest memory: {0}")]
    Discard(std::io::Error),
}

/// Maps `mem_size` bytes of guest RAM, laid out around the device gap.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestRam, MemoryError> {
    let ranges: Vec<_> = ram_regions(mem_size)
        .into_iter()
        .map(|(start, size)| (start, size as usize))
        .collect();
    GuestRam::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        size: mem_size,
        reason: e.to_string(),
    })
}

/// Registers each RAM region as a KVM memory slot (slot i = region i).
pub fn register_memory_slots(vm: &VmFd, mem: &GuestRam) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let region_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the VMM
        // keeps both until exit), and its size and address are what vm-memory mapped.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|source| MemoryError::SetSlot { slot, source })?;
    }
    Ok(())
}

/// Throws away all guest RAM contents: the next access of any page reads zeroes. Used on guest
/// reset before the kernel is loaded again.
pub fn discard_guest_memory(mem: &GuestRam) -> Result<(), MemoryError> {
    for region in mem.iter() {
        // SAFETY: the range is exactly one private anonymous mapping owned by `mem`; with
        // MADV_DONTNEED its pages are replaced by zero-fill-on-demand pages, which is the
        // intended effect. No Rust reference into guest memory is held across this call.
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(MemoryError::Discard(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MIB;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn discard_zeroes_ram() {
        let mem = create_guest_memory(4 * MIB).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        discard_guest_memory(&mem).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
    }
}
