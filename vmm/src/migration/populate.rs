//! Populating a destination's RAM ahead of the stream. The first touch of fresh memory is
//! the slowest part of loading it (the kernel allocates and clears every page, and on hosts
//! that are VMs themselves their host may have to fault the memory in too). The source says
//! which pages will carry data (`RamPlan`); a helper thread populates those while the loader
//! thread copies the stream in, so both costs run side by side. Pages never planned stay
//! unpopulated, as on the source.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::ram::PAGE_SIZE;
use crate::memory::MADV_POPULATE_WRITE;

/// Pages populated per call (2 MiB: one transparent huge page where the mapping has them).
const CHUNK_PAGES: usize = 512;

/// A run of pages to populate: first page number, host address, page count.
#[derive(Debug, Clone, Copy)]
struct Job {
    first: usize,
    host: usize,
    pages: usize,
}

/// The helper thread and what it shares with the loader.
pub struct Populator {
    jobs: Option<Sender<Job>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Page number up to which the loader has loaded: the helper skips what lies below.
    loader_at: AtomicUsize,
    /// Page number up to which every planned page is populated.
    populated_to: AtomicUsize,
}

impl Populator {
    /// Starts the helper thread, idle until runs are added.
    pub fn start() -> std::io::Result<Populator> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("migration-populate".into())
            .spawn(move || {
                for job in rx {
                    if !populate(&worker, job) {
                        return;
                    }
                }
            })?;
        Ok(Populator {
            jobs: Some(jobs),
            shared,
            thread: Some(thread),
        })
    }

    /// Populates `pages` pages from page number `first` at host address `host` (one
    /// mapping), after the runs added before (runs must come in ascending page order).
    pub fn add(&self, first: usize, host: usize, pages: usize) {
        if let Some(jobs) = &self.jobs {
            // The helper only goes away when stopped; a send error then means nothing.
            let _ = jobs.send(Job { first, host, pages });
        }
    }

    /// The loader loaded everything below page `page`.
    pub fn loader_reached(&self, page: usize) {
        self.shared.loader_at.fetch_max(page, Ordering::Relaxed);
    }

    /// Whether every planned page below page `page` is populated.
    pub fn populated_below(&self, page: usize) -> bool {
        page <= self.shared.populated_to.load(Ordering::Acquire)
    }

    /// Stops the helper and waits for it: after this nothing populates RAM any more (needed
    /// before pages are discarded or registered with userfaultfd).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Populator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Populates one run, in chunks, skipping what the loader already passed. False if told
/// to stop.
fn populate(shared: &Shared, job: Job) -> bool {
    let mut done = 0;
    while done < job.pages {
        if shared.stop.load(Ordering::Acquire) {
            return false;
        }
        let pages = CHUNK_PAGES.min(job.pages - done);
        let end = job.first + done + pages;
        if end > shared.loader_at.load(Ordering::Relaxed) {
            // SAFETY: the range lies in a live private anonymous guest mapping (the caller
            // of `add` resolved it); populating changes no contents, and a kernel without
            // MADV_POPULATE_WRITE refuses it harmlessly.
            unsafe {
                libc::madvise(
                    (job.host + done * PAGE_SIZE) as *mut libc::c_void,
                    pages * PAGE_SIZE,
                    MADV_POPULATE_WRITE,
                )
            };
        }
        shared.populated_to.store(end, Ordering::Release);
        done += pages;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use crate::migration::ram::{PageMap, RamMap};

    #[test]
    fn planned_pages_are_populated_and_the_rest_stay_untouched() {
        let mem = create_guest_memory(8 << 20).unwrap();
        let ram = RamMap::new(&mem);
        let mut populator = Populator::start().unwrap();
        populator.add(16, ram.host(16).unwrap(), 600);
        populator.add(1000, ram.host(1000).unwrap(), 3);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !populator.populated_below(1003) {
            assert!(std::time::Instant::now() < deadline, "not populated");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        populator.stop();
        let mut map = PageMap::open().unwrap();
        let mut unpopulated = Vec::new();
        map.unpopulated(ram.host(0).unwrap(), 1100, &mut unpopulated)
            .unwrap();
        let planned = |p: usize| (16..616).contains(&p) || (1000..1003).contains(&p);
        for (page, untouched) in unpopulated.iter().enumerate() {
            assert_eq!(*untouched, !planned(page), "page {page}");
        }
    }

    #[test]
    fn the_helper_skips_what_the_loader_passed_and_stops_when_told() {
        let mem = create_guest_memory(8 << 20).unwrap();
        let ram = RamMap::new(&mem);
        let mut populator = Populator::start().unwrap();
        populator.loader_reached(512);
        populator.add(0, ram.host(0).unwrap(), 1024);
        populator.stop();
        // Stopped at once or after the run: either way nothing below the loader was touched.
        let mut map = PageMap::open().unwrap();
        let mut unpopulated = Vec::new();
        map.unpopulated(ram.host(0).unwrap(), 512, &mut unpopulated)
            .unwrap();
        assert!(unpopulated.iter().all(|u| *u));
        populator.add(0, ram.host(0).unwrap(), 1);
    }
}
