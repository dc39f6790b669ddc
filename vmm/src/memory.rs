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
    /// Guest RAM could not be populated (`--mem-prealloc`).
    #[error("cannot preallocate guest memory: {0}")]
    Populate(std::io::Error),
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

/// madvise(2) advice that faults pages in for writing (Linux 5.14).
pub const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Populates every page of guest RAM now (`--mem-prealloc`), so no page faults on first touch
/// later. Kernels before 5.14 lack the advice: then every page is touched instead.
pub fn populate_guest_memory(mem: &GuestRam) -> Result<(), MemoryError> {
    for region in mem.iter() {
        let (host, len) = (region.as_ptr(), region.len() as usize);
        // SAFETY: the range is one private anonymous guest mapping owned by `mem`; populating
        // changes no contents.
        let ret = unsafe { libc::madvise(host.cast(), len, MADV_POPULATE_WRITE) };
        if ret == 0 {
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(MemoryError::Populate(e));
        }
        for offset in (0..len).step_by(4096) {
            // SAFETY: `offset < len` keeps the address inside the mapping, which nothing
            // uses yet (the VM has not started); a volatile read-write of a byte leaves its
            // value as it is and faults the page in for writing.
            unsafe {
                let byte = host.add(offset);
                std::ptr::write_volatile(byte, std::ptr::read_volatile(byte));
            }
        }
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
    fn populate_makes_every_page_resident() {
        let mem = create_guest_memory(4 * MIB).unwrap();
        populate_guest_memory(&mem).unwrap();
        let region = mem.iter().next().unwrap();
        let resident = crate::uffd::page_resident(region.as_ptr() as u64, region.len()).unwrap();
        assert!(resident.iter().all(|r| *r));
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
    }

    #[test]
    fn discard_zeroes_ram() {
        let mem = create_guest_memory(4 * MIB).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        discard_guest_memory(&mem).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
    }
}
