//! Guest RAM as migration sees it: pages numbered 0..n across the RAM regions, their host
//! addresses, page bitmaps, and KVM dirty logging.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::{GuestRam, MADV_POPULATE_WRITE};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Migration moves guest RAM in pages of this size.
pub const PAGE_SIZE: usize = 4096;
const PAGE_SHIFT: u32 = 12;

/// One RAM region: guest-physical start, length, host mapping, first page number.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    len: u64,
    host: usize,
    first_page: usize,
}

impl Region {
    fn pages(&self) -> usize {
        (self.len >> PAGE_SHIFT) as usize
    }
}

/// Errors of RAM bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// Turning dirty logging on or off failed.
    #[error("cannot {what} dirty logging on memory slot {slot}: {source}")]
    DirtyLogging {
        /// "start" or "stop".
        what: &'static str,
        /// The slot.
        slot: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_DIRTY_LOG failed.
    #[error("cannot read the dirty log of memory slot {slot}: {source}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

/// The page numbering of guest RAM. Holds host addresses of the VM's mappings: the owner of
/// the guest memory must outlive it (migration threads hold the `Vm`).
#[derive(Debug, Clone)]
pub struct RamMap {
    regions: Vec<Region>,
    pages: usize,
}

impl RamMap {
    /// The numbering of `mem`'s regions, in order (slot i = region i, as registered).
    pub fn new(mem: &GuestRam) -> Self {
        let mut regions = Vec::new();
        let mut pages = 0;
        for region in mem.iter() {
            let r = Region {
                gpa: region.start_addr().0,
                len: region.len(),
                host: region.as_ptr() as usize,
                first_page: pages,
            };
            pages += r.pages();
            regions.push(r);
        }
        RamMap { regions, pages }
    }

    /// Number of pages of guest RAM.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Bytes of guest RAM.
    pub fn bytes(&self) -> u64 {
        (self.pages as u64) << PAGE_SHIFT
    }

    /// The (guest-physical start, length) of each region.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.gpa, r.len)).collect()
    }

    /// Page number of the guest-physical address, if it is RAM.
    pub fn page_of_gpa(&self, gpa: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
            .map(|r| r.first_page + ((gpa - r.gpa) >> PAGE_SHIFT) as usize)
    }

    /// Page number of a host address inside guest RAM.
    pub fn page_of_host(&self, host: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|r| host >= r.host as u64 && host - (r.host as u64) < r.len)
            .map(|r| r.first_page + ((host - r.host as u64) >> PAGE_SHIFT) as usize)
    }

    fn region_of_page(&self, page: usize) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| page >= r.first_page && page < r.first_page + r.pages())
    }

    /// Guest-physical address of page `page`.
    pub fn gpa(&self, page: usize) -> Option<u64> {
        let r = self.region_of_page(page)?;
        Some(r.gpa + (((page - r.first_page) as u64) << PAGE_SHIFT))
    }

    /// Host address of page `page`.
    pub fn host(&self, page: usize) -> Option<usize> {
        let r = self.region_of_page(page)?;
        Some(r.host + ((page - r.first_page) << PAGE_SHIFT))
    }

    /// The page numbers of `count` pages from `gpa`, if they all lie in one region.
    pub fn run(&self, gpa: u64, count: usize) -> Option<std::ops::Range<usize>> {
        if gpa % PAGE_SIZE as u64 != 0 || count == 0 {
            return None;
        }
        let first = self.page_of_gpa(gpa)?;
        let r = self.region_of_page(first)?;
        (first + count <= r.first_page + r.pages()).then_some(first..first + count)
    }

    /// The largest run of pages from `first` (at most `max`) that stays in one region.
    pub fn clamp_run(&self, first: usize, max: usize) -> usize {
        self.region_of_page(first)
            .map(|r| max.min(r.first_page + r.pages() - first))
            .unwrap_or(0)
    }

    /// The guest RAM of `count` pages from `page`, to send as it is (no copy); `None` unless
    /// they lie in one region.
    ///
    /// # Safety
    ///
    /// vCPUs and devices may write these bytes while they are read. The caller only checks,
    /// checksums and sends them, and copes with a torn read because the dirty log brings
    /// every page written meanwhile back for another send.
    pub unsafe fn live_pages(&self, page: usize, count: usize) -> Option<&[u8]> {
        if self.clamp_run(page, count) != count {
            return None;
        }
        let host = self.host(page)?;
        // SAFETY: the pages lie in one live guest mapping (checked above, see the type's
        // contract) that outlives `self`; concurrent writes are the caller's contract.
        Some(unsafe { std::slice::from_raw_parts(host as *const u8, count * PAGE_SIZE) })
    }

    /// The guest RAM of `count` pages from `page` (one region, as `run` checked) as a
    /// mutable byte slice to load a stream into directly; populated for writing first when
    /// `populate` (one call instead of a page fault per page; a waste on populated pages).
    ///
    /// # Safety
    ///
    /// Nothing else may access those pages while the slice lives (the destination's vCPUs
    /// are stopped and no userfaultfd covers them), and the pages must lie in one region.
    // The slice is guest RAM reached through a raw host address, not borrowed from `self`;
    // exclusivity is the caller's contract above.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn pages_mut(&self, page: usize, count: usize, populate: bool) -> Option<&mut [u8]> {
        let host = self.host(page)?;
        let len = count * PAGE_SIZE;
        if populate {
            // SAFETY: populating pages of a live private anonymous mapping changes no contents.
            unsafe { libc::madvise(host as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
        }
        // SAFETY: the caller guarantees the range is one live mapping nobody else uses now.
        Some(unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len) })
    }

    /// Zeroes page `page` if it is not zero already (reading a never-touched page maps the
    /// shared zero page and allocates nothing).
    pub fn zero_page(&self, page: usize) {
        if let Some(host) = self.host(page) {
            // SAFETY: a page of a live guest mapping (the type's contract) nobody else writes now.
            let slice = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, PAGE_SIZE) };
            if !is_zero(slice) {
                slice.fill(0);
            }
        }
    }

    /// Drops the contents of `count` pages from `page`: they read as zero (or fault, when
    /// registered with userfaultfd) afterwards.
    pub fn discard(&self, page: usize, count: usize) -> std::io::Result<()> {
        let Some(host) = self.host(page) else {
            return Ok(());
        };
        // SAFETY: the range is inside one private anonymous guest mapping (callers clamp
        // runs to a region); MADV_DONTNEED only drops its contents, which is the intent.
        let ret = unsafe {
            libc::madvise(
                host as *mut libc::c_void,
                count * PAGE_SIZE,
                libc::MADV_DONTNEED,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Asks for (or against) transparent huge pages on all of guest RAM. The destination
    /// loads precopy into huge pages (one fault and one clear per 2 MiB instead of 512);
    /// postcopy turns them off first, so its 4 KiB discards and placements stay 4 KiB.
    /// Advisory: a kernel without THP ignores it.
    pub fn set_huge_pages(&self, on: bool) {
        let advice = if on {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        for r in &self.regions {
            // SAFETY: the range is one live private anonymous guest mapping; the advice
            // changes how pages are backed, never their contents.
            let ret = unsafe { libc::madvise(r.host as *mut libc::c_void, r.len as usize, advice) };
            if ret != 0 {
                log::debug!(
                    "madvise huge pages {on} on guest RAM: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// Host ranges of every region, for userfaultfd registration.
    pub fn host_ranges(&self) -> Vec<(usize, usize)> {
        self.regions
            .iter()
            .map(|r| (r.host, r.len as usize))
            .collect()
    }

    /// The runs of pages (numbers) that hold data: populated or swapped out, per `map`. A
    /// run never spans two regions.
    pub fn populated_runs(
        &self,
        map: &mut PageMap,
    ) -> std::io::Result<Vec<std::ops::Range<usize>>> {
        /// Page-map entries read at a time.
        const CHUNK: usize = 1 << 16;
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        let mut unpopulated = Vec::new();
        let mut page = 0;
        while page < self.pages() {
            let count = self.clamp_run(page, CHUNK);
            let Some(host) = self.host(page) else { break };
            map.unpopulated(host, count, &mut unpopulated)?;
            let region_start = self.region_of_page(page).map(|r| r.first_page);
            for (i, untouched) in unpopulated.iter().enumerate() {
                if *untouched {
                    continue;
                }
                let p = page + i;
                match runs.last_mut() {
                    // Extend the last run unless a region starts between.
                    Some(run) if run.end == p && region_start.is_some_and(|s| run.start >= s) => {
                        run.end = p + 1;
                    }
                    _ => runs.push(p..p + 1),
                }
            }
            page += count.max(1);
        }
        Ok(runs)
    }

    /// Turns KVM dirty logging on or off for every slot (slot i = region i).
    pub fn set_dirty_logging(&self, vm: &VmFd, on: bool) -> Result<(), RamError> {
        for (slot, r) in self.regions.iter().enumerate() {
            let slot = slot as u32;
            let region = kvm_userspace_memory_region {
                slot,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: r.host as u64,
            };
            // SAFETY: the same slot, addresses and mapping as registered at start-up (see
            // memory::register_memory_slots); only the logging flag changes.
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
                RamError::DirtyLogging {
                    what: if on { "start" } else { "stop" },
                    slot,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// ORs KVM's dirty log (the guest's writes) and the VMM's own dirty bitmap (device
    /// writes through vm-memory) into `dirty`; both are cleared as they are read.
    pub fn sync_dirty_log(
        &self,
        vm: &VmFd,
        mem: &GuestRam,
        dirty: &mut Bitmap,
    ) -> Result<(), RamError> {
        for (slot, (r, region)) in self.regions.iter().zip(mem.iter()).enumerate() {
            let slot = slot as u32;
            let log = vm
                .get_dirty_log(slot, r.len as usize)
                .map_err(|source| RamError::DirtyLog { slot, source })?;
            Self::or_bits(r, &log, dirty);
            // The region's own bitmap (MmapRegion::bitmap), not the trait's slice of it.
            let vmm_writes = std::ops::Deref::deref(region).bitmap().get_and_reset();
            Self::or_bits(r, &vmm_writes, dirty);
        }
        Ok(())
    }

    /// Sets in `dirty` the pages of region `r` whose bits are set in `words`.
    fn or_bits(r: &Region, words: &[u64], dirty: &mut Bitmap) {
        for (word_index, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let page = word_index * 64 + bit;
                if page < r.pages() {
                    dirty.set(r.first_page + page);
                }
            }
        }
    }
}

/// Bits of a /proc/self/pagemap entry.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// Bytes per pagemap entry.
const PAGEMAP_ENTRY: usize = 8;

/// The kernel's page table view of this process (`/proc/self/pagemap`): tells which pages
/// of a private anonymous mapping were never populated, so they read as zero without being
/// touched (touching them would fault each one in).
#[derive(Debug)]
pub struct PageMap {
    file: std::fs::File,
    entries: Vec<u8>,
}

impl PageMap {
    /// Opens the page map.
    pub fn open() -> std::io::Result<PageMap> {
        Ok(PageMap {
            file: std::fs::File::open("/proc/self/pagemap")?,
            entries: Vec::new(),
        })
    }

    /// For each of the `count` pages from host address `host`, whether it is neither present
    /// nor swapped out: a never-written page of anonymous memory, all zeroes.
    pub fn unpopulated(
        &mut self,
        host: usize,
        count: usize,
        out: &mut Vec<bool>,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.entries.resize(count * PAGEMAP_ENTRY, 0);
        let offset = (host / PAGE_SIZE * PAGEMAP_ENTRY) as u64;
        self.file.read_exact_at(&mut self.entries, offset)?;
        out.clear();
        out.extend(self.entries.chunks_exact(PAGEMAP_ENTRY).map(|e| {
            let mut word = [0u8; PAGEMAP_ENTRY];
            word.copy_from_slice(e);
            u64::from_le_bytes(word) & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) == 0
        }));
        Ok(())
    }
}

/// Whether a buffer is all zero bytes.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 is valid for any bit pattern;
        // align_to puts only the aligned middle part in `words`.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// A bitmap over page numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: usize,
}

impl Bitmap {
    /// All clear.
    pub fn new(len: usize) -> Self {
        Bitmap {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// All set.
    pub fn full(len: usize) -> Self {
        let mut b = Bitmap::new(len);
        b.words.iter_mut().for_each(|w| *w = u64::MAX);
        b.trim();
        b
    }

    fn trim(&mut self) {
        let extra = self.words.len() * 64 - self.len;
        if extra > 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= u64::MAX >> extra;
            }
        }
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets bit `i`.
    pub fn set(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Clears bit `i`.
    pub fn clear(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Number of set bits.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: usize) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let mut index = from / 64;
        let mut word = self.words[index] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let bit = index * 64 + word.trailing_zeros() as usize;
                return (bit < self.len).then_some(bit);
            }
            index += 1;
            word = *self.words.get(index)?;
        }
    }

    /// Every bit flipped.
    pub fn complement(&self) -> Bitmap {
        let mut b = Bitmap {
            words: self.words.iter().map(|w| !w).collect(),
            len: self.len,
        };
        b.trim();
        b
    }

    /// The little-endian encoding of the words.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Decodes `len` bits from their little-endian encoding; `None` if the size is wrong.
    pub fn from_bytes(len: usize, bytes: &[u8]) -> Option<Bitmap> {
        if bytes.len() != len.div_ceil(64) * 8 {
            return None;
        }
        let mut b = Bitmap {
            words: bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(c);
                    u64::from_le_bytes(w)
                })
                .collect(),
            len,
        };
        b.trim();
        Some(b)
    }
}

/// A bitmap shared between threads without a lock.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    len: usize,
}

impl AtomicBitmap {
    /// All clear.
    pub fn new(len: usize) -> Self {
        AtomicBitmap {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Sets bit `i`.
    pub fn set(&self, i: usize) {
        if i < self.len {
            self.words[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel);
        }
    }

    /// Clears bit `i`.
    pub fn clear(&self, i: usize) {
        if i < self.len {
            self.words[i / 64].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// A copy of the current bits.
    pub fn snapshot(&self) -> Bitmap {
        Bitmap {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            len: self.len,
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MIB;
    use crate::memory::create_guest_memory;

    #[test]
    fn bitmap_operations() {
        let mut b = Bitmap::new(130);
        assert_eq!(b.next_set(0), None);
        b.set(3);
        b.set(129);
        b.set(200);
        assert_eq!(b.count(), 2);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(129));
        assert_eq!(b.complement().count(), 128);
        let round = Bitmap::from_bytes(130, &b.to_bytes()).unwrap();
        assert_eq!(round, b);
        assert!(Bitmap::from_bytes(130, &[0; 8]).is_none());
        assert_eq!(Bitmap::full(130).count(), 130);
        b.clear(3);
        assert!(!b.get(3));
    }

    #[test]
    fn page_numbering_follows_the_regions() {
        let mem = create_guest_memory(8 * MIB).unwrap();
        let ram = RamMap::new(&mem);
        assert_eq!(ram.pages(), 2048);
        assert_eq!(ram.gpa(5), Some(5 * 4096));
        assert_eq!(ram.page_of_gpa(0x5000), Some(5));
        assert_eq!(ram.page_of_gpa(8 * MIB), None);
        assert_eq!(ram.run(0x1000, 2), Some(1..3));
        assert_eq!(ram.run(0x1001, 1), None);
        assert_eq!(ram.run(8 * MIB - 4096, 2), None);
        let host = ram.host(7).unwrap() as u64;
        assert_eq!(ram.page_of_host(host + 100), Some(7));
    }

    #[test]
    fn vmm_writes_are_dirty() {
        use vm_memory::Bytes;
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let mem = create_guest_memory(4 * MIB).unwrap();
        let vm = kvm.create_vm().unwrap();
        crate::memory::register_memory_slots(&vm, &mem).unwrap();
        let ram = RamMap::new(&mem);
        ram.set_dirty_logging(&vm, true).unwrap();
        let mut dirty = Bitmap::new(ram.pages());
        ram.sync_dirty_log(&vm, &mem, &mut dirty).unwrap();
        dirty = Bitmap::new(ram.pages());
        mem.write_obj(7u32, vm_memory::GuestAddress(5 * 4096 + 8))
            .unwrap();
        ram.sync_dirty_log(&vm, &mem, &mut dirty).unwrap();
        assert_eq!(dirty.count(), 1);
        assert!(dirty.get(5));
        let mut again = Bitmap::new(ram.pages());
        ram.sync_dirty_log(&vm, &mem, &mut again).unwrap();
        assert_eq!(again.count(), 0, "the VMM's bitmap is cleared when read");
    }

    /// Writes `data` (whole pages) to the pages from `page` on.
    fn fill(ram: &RamMap, page: usize, data: &[u8]) {
        // SAFETY: no vCPU runs on this memory and the pages lie in its one region.
        unsafe { ram.pages_mut(page, data.len() / PAGE_SIZE, true) }
            .unwrap()
            .copy_from_slice(data);
    }

    #[test]
    fn page_map_tells_untouched_pages() {
        let mem = create_guest_memory(4 * MIB).unwrap();
        let ram = RamMap::new(&mem);
        fill(&ram, 1, &[1u8; PAGE_SIZE]);
        let mut map = PageMap::open().unwrap();
        let mut out = Vec::new();
        map.unpopulated(ram.host(0).unwrap(), 3, &mut out).unwrap();
        assert_eq!(out, vec![true, false, true]);
    }

    #[test]
    fn pages_are_written_read_zeroed_and_discarded() {
        let mem = create_guest_memory(4 * MIB).unwrap();
        let ram = RamMap::new(&mem);
        fill(&ram, 2, &[9u8; 2 * PAGE_SIZE]);
        // SAFETY: no vCPU runs on this memory.
        let page = |n| unsafe { ram.live_pages(n, 1) }.unwrap().to_vec();
        assert!(page(3).iter().all(|b| *b == 9));
        ram.zero_page(3);
        assert!(is_zero(&page(3)));
        assert!(page(2).iter().all(|b| *b == 9));
        ram.discard(2, 1).unwrap();
        assert!(is_zero(&page(2)));
    }

    #[test]
    fn populated_runs_are_the_pages_written() {
        let mem = create_guest_memory(4 * MIB).unwrap();
        let ram = RamMap::new(&mem);
        fill(&ram, 3, &[1u8; 2 * PAGE_SIZE]);
        fill(&ram, 9, &[1u8; PAGE_SIZE]);
        let mut map = PageMap::open().unwrap();
        assert_eq!(ram.populated_runs(&mut map).unwrap(), vec![3..5, 9..10]);
    }

    #[test]
    fn live_pages_stay_in_one_region() {
        let mem = create_guest_memory(4 * MIB).unwrap();
        let ram = RamMap::new(&mem);
        let last = ram.pages() - 1;
        // SAFETY: no vCPU runs on this memory.
        unsafe {
            assert_eq!(ram.live_pages(last, 1).map(<[u8]>::len), Some(PAGE_SIZE));
            assert!(ram.live_pages(last, 2).is_none());
        }
    }
}
