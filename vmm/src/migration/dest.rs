//! The incoming side: a thread that accepts the source's connection and loads the stream
//! into the (stopped) VM. In postcopy it registers guest RAM with userfaultfd before loading
//! the device state; a fault thread asks the source for each missing page that something
//! touches, and pages are placed atomically as they arrive. A broken connection in postcopy
//! pauses the migration until `migrate-recover` gives it a new one.

use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use api::{Event, MigrationStatus, ShutdownCause};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::populate::Populator;
use super::ram::{AtomicBitmap, Bitmap, RamMap, PAGE_SIZE};
use super::stream::{self, Kind, PageRun, SectionBody, StreamError};
use super::uri::{Channel, Listener};
use super::{MigrationState, Role};
use crate::machine::MachineGuard;
use crate::runstate::RunState;
use crate::snapshot::{MachineState, SnapshotError};
use crate::uffd::{UffdError, Userfault};
use crate::vm::{Vm, VmAction};

/// How often a destination waiting for the source to reconnect checks for a newer
/// `migrate-recover`, in milliseconds.
const RECOVER_POLL_MS: libc::c_int = 20;
/// Read buffer of the incoming channel.
const READ_BUFFER: usize = 64;

/// The shape of the VM, sent first so a mismatched destination refuses the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub cpus: usize,
    /// RAM regions: (guest-physical start, length).
    pub regions: Vec<(u64, u64)>,
    /// Page size of the RAM sections.
    pub page_size: u64,
}

impl StreamConfig {
    /// The configuration of `vm`.
    pub fn of(vm: &Vm, ram: &RamMap) -> Self {
        StreamConfig {
            memory: ram.bytes(),
            cpus: vm.lock().vcpus.len(),
            regions: ram.layout(),
            page_size: PAGE_SIZE as u64,
        }
    }

    fn check(&self, ours: &StreamConfig) -> Result<(), String> {
        if self.page_size != ours.page_size {
            return Err(format!("the source uses {} byte pages", self.page_size));
        }
        if self.memory != ours.memory || self.regions != ours.regions {
            return Err(format!(
                "the source has {} MiB of RAM, this VM has {} MiB",
                self.memory >> 20,
                ours.memory >> 20
            ));
        }
        if self.cpus != ours.cpus {
            return Err(format!(
                "the source has {} vCPUs, this VM has {}",
                self.cpus, ours.cpus
            ));
        }
        Ok(())
    }
}

/// Errors of an incoming migration.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// The stream is bad or broke.
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// The source's VM does not match this one.
    #[error("the migration does not fit this VM: {0}")]
    Mismatch(String),
    /// The device state could not be loaded.
    #[error("cannot load the VM state: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The device state is not valid JSON of the right shape.
    #[error("bad VM state in the stream: {0}")]
    State(String),
    /// userfaultfd failed.
    #[error("postcopy: {0}")]
    Userfault(#[from] UffdError),
    /// Pages that failed their checksum were never sent again: the stream is corrupt.
    #[error("{pages} pages of RAM failed their checksum and were not sent again (the first at {first:#x})")]
    Unconfirmed {
        /// How many.
        pages: usize,
        /// Guest-physical address of the first.
        first: u64,
    },
    /// Guest RAM could not be discarded.
    #[error("cannot discard guest RAM: {0}")]
    Discard(std::io::Error),
    /// The fault thread could not be started.
    #[error("cannot start the postcopy fault thread: {0}")]
    Thread(std::io::Error),
}

impl From<std::io::Error> for DestError {
    fn from(e: std::io::Error) -> Self {
        DestError::Stream(StreamError::Io(e))
    }
}

/// The answer channel to the source, shared by the loader and the fault thread. Its lock is
/// held only to write one small section.
#[derive(Default)]
struct ReturnPath {
    writer: Mutex<Option<BufWriter<Channel>>>,
}

impl ReturnPath {
    fn lock(&self) -> MutexGuard<'_, Option<BufWriter<Channel>>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, channel: Option<Channel>) {
        *self.lock() = channel.map(BufWriter::new);
    }

    /// Sends one section; false (and the path is dropped) if it cannot.
    fn send(&self, kind: Kind, payload: &[u8]) -> bool {
        let mut writer = self.lock();
        let Some(out) = writer.as_mut() else {
            return false;
        };
        let ok = stream::write_section(out, kind, &[payload]).is_ok() && out.flush().is_ok();
        if !ok {
            *writer = None;
        }
        ok
    }
}

/// What the fault thread and the loader share in postcopy.
struct Faults {
    uffd: Userfault,
    ram: RamMap,
    received: Arc<AtomicBitmap>,
    /// Pages asked for and not yet placed; asked again after a recovery.
    pending: Mutex<BTreeSet<usize>>,
    rp: Arc<ReturnPath>,
    quit: EventFd,
}

impl Faults {
    fn pending(&self) -> MutexGuard<'_, BTreeSet<usize>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(&self, page: usize) {
        if let Some(gpa) = self.ram.gpa(page) {
            let mut payload = Vec::with_capacity(12);
            PageRun {
                addr: gpa,
                count: 1,
            }
            .encode(&mut payload);
            // Without a return path (paused) the page stays pending until recovery.
            self.rp.send(Kind::RequestPages, &payload);
        }
    }

    /// One page fault: a page we have already (received as zero before registration, never
    /// populated) is placed locally; any other is asked for once.
    fn handle(&self, host: u64) {
        let Some(page) = self.ram.page_of_host(host) else {
            log::warn!("postcopy: fault at {host:#x} outside guest RAM");
            return;
        };
        if self.received.get(page) {
            if let Some(addr) = self.ram.host(page) {
                if let Err(e) = self.uffd.zero(addr as u64, PAGE_SIZE as u64) {
                    log::error!("postcopy: cannot place zero page {page}: {e}");
                }
            }
            return;
        }
        if self.pending().insert(page) {
            self.request(page);
        }
    }

    fn run(&self) {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.quit.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of two pollfd structs, and its length is passed.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ret < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("postcopy fault thread: poll: {e}");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            loop {
                match self.uffd.read_fault() {
                    Ok(Some(addr)) => self.handle(addr),
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("postcopy fault thread: {e}");
                        return;
                    }
                }
            }
        }
    }

    /// Places pages that arrived (whole pages from `page`); skips those already present.
    fn place(&self, page: usize, data: &[u8]) -> Result<(), DestError> {
        for (i, chunk) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let p = page + i;
            if self.received.get(p) {
                continue;
            }
            if let Some(host) = self.ram.host(p) {
                self.uffd.copy(host as u64, chunk)?;
            }
            // Only now: the fault thread treats received pages as present.
            self.received.set(p);
            self.pending().remove(&p);
        }
        Ok(())
    }

    fn place_zero(&self, page: usize, count: usize) -> Result<(), DestError> {
        for p in page..page + count {
            if self.received.get(p) {
                continue;
            }
            if let Some(host) = self.ram.host(p) {
                self.uffd.zero(host as u64, PAGE_SIZE as u64)?;
            }
            self.received.set(p);
            self.pending().remove(&p);
        }
        Ok(())
    }
}

struct Postcopy {
    faults: Arc<Faults>,
    thread: Option<JoinHandle<()>>,
}

impl Postcopy {
    /// Registers all guest RAM and starts the fault thread.
    fn start(
        ram: &RamMap,
        received: &Arc<AtomicBitmap>,
        rp: &Arc<ReturnPath>,
    ) -> Result<Self, DestError> {
        let uffd = Userfault::new()?;
        for (host, len) in ram.host_ranges() {
            // SAFETY: the range is one private anonymous guest RAM mapping, which Skiff only
            // accesses through raw pointers (vm-memory and RamMap), never through references.
            unsafe { uffd.register(host as u64, len as u64) }?;
        }
        let faults = Arc::new(Faults {
            uffd,
            ram: ram.clone(),
            received: received.clone(),
            pending: Mutex::new(BTreeSet::new()),
            rp: rp.clone(),
            quit: EventFd::new(libc::EFD_NONBLOCK).map_err(DestError::Thread)?,
        });
        let worker = faults.clone();
        let thread = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || worker.run())
            .map_err(DestError::Thread)?;
        Ok(Postcopy {
            faults,
            thread: Some(thread),
        })
    }

    /// Asks again for every page still pending (after a recovery).
    fn resend_pending(&self) {
        let pages: Vec<usize> = self.faults.pending().iter().copied().collect();
        for page in pages {
            if !self.faults.received.get(page) {
                self.faults.request(page);
            }
        }
    }

    /// Stops the fault thread and unregisters guest RAM.
    fn finish(mut self) -> Result<(), DestError> {
        if let Err(e) = self.faults.quit.write(1) {
            log::error!("cannot stop the postcopy fault thread: {e}");
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for (host, len) in self.faults.ram.host_ranges() {
            self.faults.uffd.unregister(host as u64, len as u64)?;
        }
        Ok(())
    }
}

/// Starts loading an incoming migration from `listener` on its own thread.
pub fn start(vm: Arc<Vm>, listener: Listener, exit_on_error: bool) -> Result<(), String> {
    let state = vm.migration().clone();
    let ram = RamMap::new(vm.memory());
    state
        .begin(Role::Destination, ram.bytes())
        .map_err(|e| e.desc)?;
    state.set_socket_address(listener.socket_address());
    let spawned = std::thread::Builder::new()
        .name("migration-in".into())
        .spawn(move || {
            let mut dest = Dest::new(vm, ram, exit_on_error);
            dest.run(listener);
        });
    if let Err(e) = spawned {
        state.finish(MigrationStatus::Failed, Some(e.to_string()));
        return Err(format!("cannot start the incoming migration thread: {e}"));
    }
    Ok(())
}

/// Where the loader is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the configuration.
    Start,
    /// Loading RAM (precopy).
    Ram,
    /// Device state loaded; only End may follow.
    Loaded,
    /// Postcopy: the guest runs on this side.
    Postcopy,
    /// Done.
    Done,
}

struct Dest {
    vm: Arc<Vm>,
    state: Arc<MigrationState>,
    ram: RamMap,
    received: Arc<AtomicBitmap>,
    /// Pages this side wrote data to: the others are still untouched (an incoming VM's RAM
    /// starts unpopulated), so a zero page needs no work there.
    written: Bitmap,
    /// Pages whose last data failed its section checksum: the source read them while the
    /// guest wrote them, and must send them again (or discard them) before the switch-over.
    unconfirmed: Bitmap,
    /// Populates the pages the source's plan names, ahead of the stream (precopy only).
    populator: Option<Populator>,
    rp: Arc<ReturnPath>,
    postcopy: Option<Postcopy>,
    stage: Stage,
    exit_on_error: bool,
    payload: Vec<u8>,
}

impl Dest {
    fn new(vm: Arc<Vm>, ram: RamMap, exit_on_error: bool) -> Self {
        let pages = ram.pages();
        Dest {
            state: vm.migration().clone(),
            vm,
            ram,
            received: Arc::new(AtomicBitmap::new(pages)),
            written: Bitmap::new(pages),
            unconfirmed: Bitmap::new(pages),
            populator: None,
            rp: Arc::new(ReturnPath::default()),
            postcopy: None,
            stage: Stage::Start,
            exit_on_error,
            payload: Vec::new(),
        }
    }

    fn run(&mut self, listener: Listener) {
        match self.receive(listener) {
            Ok(()) => {}
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: DestError) {
        let message = e.to_string();
        log::error!("load of migration failed: {message}");
        self.rp.send(Kind::Error, message.as_bytes());
        self.rp.set(None);
        if let Some(postcopy) = self.postcopy.take() {
            let _ = postcopy.finish();
        }
        self.state.finish(MigrationStatus::Failed, Some(message));
        if self.exit_on_error {
            let mut machine = self.vm.lock();
            self.vm.request(
                &mut machine,
                VmAction::Shutdown {
                    guest: false,
                    reason: ShutdownCause::HostError,
                    code: 1,
                },
            );
        }
    }

    fn attach(&mut self, channel: Channel) -> Result<BufReader<Channel>, DestError> {
        self.state.set_channel(Some(channel.try_clone()?));
        if channel.has_return_path() {
            self.rp.set(Some(channel.try_clone()?));
        }
        let mut input = BufReader::with_capacity(READ_BUFFER, channel);
        stream::read_header(&mut input)?;
        Ok(input)
    }

    fn receive(&mut self, mut listener: Listener) -> Result<(), DestError> {
        let channel = listener.accept()?;
        drop(listener);
        self.ram.set_huge_pages(true);
        self.state.set_status(MigrationStatus::Active);
        let mut input = self.attach(channel)?;
        while self.stage != Stage::Done {
            match self.load_section(&mut input) {
                Ok(()) => {}
                Err(e) if self.stage == Stage::Postcopy => {
                    log::warn!("postcopy interrupted: {e}");
                    input = self.pause_until_recovered();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Postcopy broke: `postcopy-paused` until `migrate-recover` brings a new connection.
    fn pause_until_recovered(&mut self) -> BufReader<Channel> {
        self.rp.set(None);
        self.state.set_channel(None);
        self.state.set_status(MigrationStatus::PostcopyPaused);
        loop {
            let mut listener = self.state.wait_recover_listener();
            let Some(accepted) = self.accept_recovery(&mut listener) else {
                // A retried migrate-recover replaced this listener: wait on the new one.
                continue;
            };
            drop(listener);
            match accepted.map_err(DestError::from).and_then(|c| {
                // The channel first: `migrate-pause` in postcopy-recover must find it.
                self.state.set_channel(Some(c.try_clone()?));
                self.state.set_status(MigrationStatus::PostcopyRecover);
                self.attach(c)
            }) {
                Ok(input) => return input,
                Err(e) => {
                    log::warn!("postcopy recovery failed: {e}");
                    self.rp.set(None);
                    self.state.set_channel(None);
                    self.state.set_status(MigrationStatus::PostcopyPaused);
                }
            }
        }
    }

    /// Waits for the source to connect to `listener` (from `migrate-recover`). Returns
    /// `None` if another `migrate-recover` came first: as in QEMU, it may be retried (with
    /// another address, or the same), and the last one counts.
    fn accept_recovery(&self, listener: &mut Listener) -> Option<std::io::Result<Channel>> {
        loop {
            if self.state.recover_listener_pending() {
                return None;
            }
            let mut fds = [libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: `fds` is a live array of one pollfd, and its length is passed.
            let ret =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, RECOVER_POLL_MS) };
            if ret > 0 {
                return Some(listener.accept());
            }
            if ret < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Some(Err(e));
                }
            }
        }
    }

    fn unexpected(kind: Kind, when: &'static str) -> DestError {
        DestError::Stream(StreamError::Unexpected { kind, when })
    }

    fn load_section(&mut self, input: &mut BufReader<Channel>) -> Result<(), DestError> {
        let body = SectionBody::start(input)?;
        let len = body.len as u64;
        self.state.update(|p| p.transferred += len);
        if body.kind == Kind::RamPages {
            return self.load_pages(input, body);
        }
        if !matches!(body.kind, Kind::RamZero | Kind::RamPlan) {
            // Precopy RAM is over: nothing may populate pages that are about to be
            // discarded or registered for postcopy.
            if let Some(mut populator) = self.populator.take() {
                populator.stop();
            }
        }
        let mut payload = std::mem::take(&mut self.payload);
        let result = body
            .read_all(input, &mut payload)
            .map_err(DestError::from)
            .and_then(|kind| self.apply(kind, &payload));
        self.payload = payload;
        result
    }

    /// A `RamPages` section. Its head (address, length and page checksums) is checked
    /// before anything is written. In precopy the pages are read straight into guest RAM
    /// (one copy instead of two), and a page that misses its checksum is unconfirmed: the
    /// source read it while its guest wrote it and sends it again (see
    /// [`Dest::check_confirmed`]); nothing runs on it before that. In postcopy the source's
    /// guest is stopped, so a page that misses its checksum is corrupt, and it is placed
    /// atomically only once checked.
    fn load_pages(
        &mut self,
        input: &mut BufReader<Channel>,
        mut body: SectionBody,
    ) -> Result<(), DestError> {
        match self.stage {
            Stage::Start => {
                return Err(Self::unexpected(Kind::RamPages, "before the configuration"))
            }
            Stage::Ram | Stage::Postcopy => {}
            _ => {
                return Err(Self::unexpected(
                    Kind::RamPages,
                    "at this point of the migration",
                ))
            }
        }
        let head = stream::read_pages_head(&mut body, input, PAGE_SIZE)?;
        let (gpa, count) = (head.addr, head.page_crcs.len());
        let bad = |reason: String| {
            DestError::Stream(StreamError::Payload {
                kind: Kind::RamPages,
                reason,
            })
        };
        let pages = self
            .ram
            .run(gpa, count)
            .ok_or_else(|| bad(format!("{count} pages at {gpa:#x} are not guest RAM")))?;
        if let Some(postcopy) = &self.postcopy {
            let mut data = std::mem::take(&mut self.payload);
            data.resize(count * PAGE_SIZE, 0);
            body.read_unhashed(input, &mut data)?;
            body.finish(input)?;
            let intact = head.intact_pages(&data, PAGE_SIZE).all(|ok| ok);
            let placed = if intact {
                postcopy.faults.place(pages.start, &data)
            } else {
                Err(bad(format!("a page at {gpa:#x} fails its checksum")))
            };
            self.payload = data;
            return placed;
        }
        let populated_ahead = self
            .populator
            .as_ref()
            .is_some_and(|p| p.populated_below(pages.end));
        let populate = !self.state.ram_preallocated()
            && !populated_ahead
            && !pages.clone().all(|p| self.written.get(p));
        // SAFETY: `run` checked the pages lie in one region; in precopy the destination's
        // vCPUs are stopped and no userfaultfd is registered, so nothing else uses them.
        let target = unsafe { self.ram.pages_mut(pages.start, count, populate) }
            .ok_or_else(|| bad(format!("no mapping for {gpa:#x}")))?;
        body.read_unhashed(input, target)?;
        body.finish(input)?;
        if let Some(populator) = &self.populator {
            populator.loader_reached(pages.end);
        }
        let mut changed = 0;
        for (page, intact) in pages.zip(head.intact_pages(target, PAGE_SIZE)) {
            self.received.set(page);
            self.written.set(page);
            if intact {
                self.unconfirmed.clear(page);
            } else {
                self.unconfirmed.set(page);
                changed += 1;
            }
        }
        if changed > 0 {
            log::debug!("migration: {changed} pages at {gpa:#x} changed while they were sent");
        }
        Ok(())
    }

    /// Fails if a page whose data failed its checksum was not sent again: past this point
    /// (the device state, or the postcopy switch-over) the source sends no more precopy.
    fn check_confirmed(&self) -> Result<(), DestError> {
        match self.unconfirmed.next_set(0) {
            None => Ok(()),
            Some(page) => Err(DestError::Unconfirmed {
                pages: self.unconfirmed.count(),
                first: self.ram.gpa(page).unwrap_or(0),
            }),
        }
    }

    fn apply(&mut self, kind: Kind, payload: &[u8]) -> Result<(), DestError> {
        match (self.stage, kind) {
            (Stage::Start, Kind::Config) => self.check_config(payload),
            (Stage::Start, _) => Err(Self::unexpected(kind, "before the configuration")),
            (Stage::Ram | Stage::Postcopy, Kind::RamZero) => self.load_zero(payload),
            (Stage::Ram, Kind::RamPlan) => self.plan(payload),
            (Stage::Ram, Kind::PostcopyAdvise) => {
                // Postcopy discards and places single 4 KiB pages. (Pages never sent, also
                // those of RAM preallocated with --mem-prealloc, are dropped by the
                // switch-over's discards, which cover every page the source has not sent.)
                self.ram.set_huge_pages(false);
                Userfault::new().map(drop).map_err(DestError::from)
            }
            (Stage::Ram, Kind::PostcopyDiscard) => self.discard(payload),
            (Stage::Ram, Kind::DeviceState) => {
                self.check_confirmed()?;
                self.load_state(payload)?;
                self.stage = Stage::Loaded;
                Ok(())
            }
            (Stage::Ram, Kind::PostcopyRun) => self.postcopy_run(payload),
            (Stage::Loaded, Kind::End) => self.complete(),
            (Stage::Postcopy, Kind::End) => self.complete(),
            (Stage::Postcopy, Kind::ResumeRequest) => {
                let bitmap = self.received.snapshot().to_bytes();
                self.rp.send(Kind::RecvBitmap, &bitmap);
                Ok(())
            }
            (Stage::Postcopy, Kind::PostcopyResume) => {
                self.state.set_status(MigrationStatus::PostcopyActive);
                self.rp.send(Kind::ResumeAck, &[]);
                if let Some(postcopy) = &self.postcopy {
                    postcopy.resend_pending();
                }
                Ok(())
            }
            (Stage::Ram, Kind::End) => Err(DestError::Stream(StreamError::Unexpected {
                kind,
                when: "before the device state",
            })),
            _ => Err(Self::unexpected(kind, "at this point of the migration")),
        }
    }

    fn check_config(&mut self, payload: &[u8]) -> Result<(), DestError> {
        let theirs: StreamConfig = serde_json::from_slice(payload)
            .map_err(|e| DestError::Mismatch(format!("bad configuration section: {e}")))?;
        theirs
            .check(&StreamConfig::of(&self.vm, &self.ram))
            .map_err(DestError::Mismatch)?;
        self.stage = Stage::Ram;
        Ok(())
    }

    fn runs(&self, kind: Kind, payload: &[u8]) -> Result<Vec<std::ops::Range<usize>>, DestError> {
        PageRun::decode_all(kind, payload)?
            .into_iter()
            .map(|run| {
                self.ram.run(run.addr, run.count as usize).ok_or_else(|| {
                    DestError::Stream(StreamError::Payload {
                        kind,
                        reason: format!("{} pages at {:#x} are not guest RAM", run.count, run.addr),
                    })
                })
            })
            .collect()
    }

    /// The source's plan: pages it will send data for, populated here ahead of them
    /// (unless RAM was preallocated).
    fn plan(&mut self, payload: &[u8]) -> Result<(), DestError> {
        let runs = self.runs(Kind::RamPlan, payload)?;
        if self.state.ram_preallocated() {
            return Ok(());
        }
        if self.populator.is_none() {
            match Populator::start() {
                Ok(populator) => self.populator = Some(populator),
                // Not fatal: the loader populates pages as they come.
                Err(e) => log::warn!("cannot start the thread that populates RAM: {e}"),
            }
        }
        if let Some(populator) = &self.populator {
            for pages in runs {
                if let Some(host) = self.ram.host(pages.start) {
                    populator.add(pages.start, host, pages.len());
                }
            }
        }
        Ok(())
    }

    fn load_zero(&mut self, payload: &[u8]) -> Result<(), DestError> {
        for pages in self.runs(Kind::RamZero, payload)? {
            if let Some(postcopy) = &self.postcopy {
                postcopy.faults.place_zero(pages.start, pages.len())?;
                continue;
            }
            for page in pages {
                if self.written.get(page) {
                    self.ram.zero_page(page);
                    self.written.clear(page);
                }
                self.received.set(page);
                self.unconfirmed.clear(page);
            }
        }
        Ok(())
    }

    fn discard(&mut self, payload: &[u8]) -> Result<(), DestError> {
        for pages in self.runs(Kind::PostcopyDiscard, payload)? {
            self.ram
                .discard(pages.start, pages.len())
                .map_err(DestError::Discard)?;
            for page in pages {
                self.received.clear(page);
                self.written.clear(page);
                self.unconfirmed.clear(page);
            }
        }
        Ok(())
    }

    fn parse_state(payload: &[u8]) -> Result<MachineState, DestError> {
        serde_json::from_slice(payload).map_err(|e| DestError::State(e.to_string()))
    }

    fn load_state(&mut self, payload: &[u8]) -> Result<(), DestError> {
        let state = Self::parse_state(payload)?;
        let vm = self.vm.clone();
        let mut machine = vm.lock();
        vm.restore_machine_state(&mut machine, &state)?;
        Ok(())
    }

    /// Postcopy switch-over: register RAM, load the devices, run.
    ///
    /// All of it happens under the big lock, and this thread never takes the lock again
    /// until every page is in: once RAM is registered, a thread holding the lock (an in-band
    /// QMP command, a vCPU emulating MMIO) may wait for a page that only this thread can
    /// place. Holding the lock while registering guarantees nobody is touching RAM then.
    fn postcopy_run(&mut self, payload: &[u8]) -> Result<(), DestError> {
        self.check_confirmed()?;
        let state = Self::parse_state(payload)?;
        let vm = self.vm.clone();
        let mut machine = vm.lock();
        self.postcopy = Some(Postcopy::start(&self.ram, &self.received, &self.rp)?);
        vm.restore_machine_state(&mut machine, &state)?;
        self.stage = Stage::Postcopy;
        self.state.set_status(MigrationStatus::PostcopyActive);
        self.start_guest_locked(&mut machine);
        drop(machine);
        self.rp.send(Kind::PostcopyRunning, &[]);
        Ok(())
    }

    fn complete(&mut self) -> Result<(), DestError> {
        if let Some(postcopy) = self.postcopy.take() {
            postcopy.finish()?;
        }
        self.stage = Stage::Done;
        self.rp.send(Kind::Ack, &[]);
        self.rp.set(None);
        // The guest runs before `completed` is announced, as in QEMU: a client that sees
        // the status (or the MIGRATION event) finds the VM running (or paused with -S).
        self.start_guest();
        self.state.finish(MigrationStatus::Completed, None);
        Ok(())
    }

    /// Leaves `inmigrate`: runs the guest (unless started with -S), as QEMU does.
    fn start_guest(&self) {
        let vm = self.vm.clone();
        let mut machine = vm.lock();
        self.start_guest_locked(&mut machine);
    }

    /// [`Dest::start_guest`] with the big lock held.
    fn start_guest_locked(&self, machine: &mut MachineGuard<'_>) {
        if machine.run_state != RunState::Inmigrate {
            return;
        }
        if self.state.autostart() {
            machine.run_state = RunState::Running;
            self.vm.emit(Event::Resume);
            self.vm.resume_vcpus(machine);
        } else {
            machine.run_state = RunState::Paused;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_mismatches_are_explained() {
        let ours = StreamConfig {
            memory: 256 << 20,
            cpus: 1,
            regions: vec![(0, 256 << 20)],
            page_size: 4096,
        };
        let mut theirs = ours.clone();
        assert!(theirs.check(&ours).is_ok());
        theirs.memory = 512 << 20;
        assert_eq!(
            theirs.check(&ours).unwrap_err(),
            "the source has 512 MiB of RAM, this VM has 256 MiB"
        );
        let mut theirs = ours.clone();
        theirs.cpus = 2;
        assert!(theirs.check(&ours).unwrap_err().contains("2 vCPUs"));
    }
}
