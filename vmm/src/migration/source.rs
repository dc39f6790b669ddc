//! The outgoing side: a migration thread that sends RAM in passes while the guest runs
//! (precopy), then either stops the guest and sends the rest with the device state, or
//! switches to postcopy: the destination runs and the source sends what it asks for first
//! and everything else behind it. A broken connection in postcopy pauses the migration until
//! `migrate resume=true` reconnects; nothing is lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{Event, MigrationStatus};

use super::ram::{is_zero, Bitmap, PageMap, RamError, RamMap, PAGE_SIZE};
use super::replies::{Replies, Reply};
use super::stream::{self, Kind, PageRun, SectionWriter, StreamError};
use super::uri::{Channel, MigrationUri, UriError};
use super::{MigrationState, Role};
use crate::runstate::RunState;
use crate::snapshot::{MachineState, SnapshotError};
use crate::vm::Vm;

/// Pages per `RamPages` section (256 KiB: what the checksum reads from RAM is still in the
/// CPU cache when the kernel copies it to the socket).
const PAGES_PER_SECTION: usize = 64;
/// Zero-page runs collected before they are sent.
const ZERO_RUNS_PER_SECTION: usize = 4096;
/// How often a rate-limited or waiting sender looks at page requests.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Bytes that may still sit in the socket buffers when the guest is stopped for the
/// switch-over (about a section): more would be sent during the downtime, at the pace of
/// the destination, which may be far slower than the source when it first touches its RAM.
const DRAINED: usize = 512 << 10;
/// How often the source looks whether the destination took what was sent.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// Errors of an outgoing migration.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Connecting failed.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The stream broke.
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// Dirty logging failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Saving the VM state failed.
    #[error("cannot save the VM state: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The destination reported an error.
    #[error("the destination failed: {0}")]
    Destination(String),
    /// The destination closed the return path.
    #[error("the destination closed the connection{0}")]
    Closed(String),
    /// `migrate_cancel`.
    #[error("cancelled")]
    Cancelled,
    /// The VM cannot be migrated in its state.
    #[error("{0}")]
    State(String),
}

impl From<std::io::Error> for SourceError {
    fn from(e: std::io::Error) -> Self {
        SourceError::Stream(StreamError::Io(e))
    }
}

/// Starts an outgoing migration to `uri` on its own thread. Fails at once (with the
/// migration untouched) if one is already running or the VM cannot migrate.
pub fn start(vm: Arc<Vm>, uri: MigrationUri) -> Result<(), String> {
    let state = vm.migration().clone();
    if state.role() == Role::Destination && state.is_active() {
        return Err("The VM is receiving a migration".into());
    }
    let ram = RamMap::new(vm.memory());
    state.begin(Role::Source, ram.bytes()).map_err(|e| e.desc)?;
    let spawned = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let mut source = Source::new(vm, ram);
            source.run(uri);
        });
    if let Err(e) = spawned {
        state.finish(MigrationStatus::Failed, Some(e.to_string()));
        return Err(format!("cannot start the migration thread: {e}"));
    }
    Ok(())
}

/// A token-bucket-free limiter: sleeps so that bytes / elapsed stays under the limit.
struct RateLimit {
    since: Instant,
    bytes: u64,
}

impl RateLimit {
    fn new() -> Self {
        RateLimit {
            since: Instant::now(),
            bytes: 0,
        }
    }

    /// How long to wait before sending more at `limit` bytes/s (0: unlimited).
    fn delay(&mut self, sent: u64, limit: u64) -> Option<Duration> {
        self.bytes += sent;
        if limit == 0 {
            return None;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / limit as f64);
        let elapsed = self.since.elapsed();
        if elapsed > Duration::from_secs(1) && due < elapsed {
            // Start a new window so a slow phase does not bank a burst.
            *self = RateLimit::new();
            return None;
        }
        due.checked_sub(elapsed)
    }
}

/// The live connection: section writer plus the replies of the return path.
struct Connection {
    out: SectionWriter<Channel>,
    replies: Option<Replies<Channel>>,
}

struct Source {
    vm: Arc<Vm>,
    state: Arc<MigrationState>,
    ram: RamMap,
    dirty: Bitmap,
    /// Where the background scan continues.
    cursor: usize,
    zero_runs: Vec<u8>,
    zero_run_count: usize,
    sent_bytes: u64,
    /// The run state before the guest was stopped for the switch-over.
    stopped_from: Option<RunState>,
    downtime_start: Option<Instant>,
    /// Pages the destination asked for in postcopy, served before the background scan.
    requests: std::collections::VecDeque<PageRun>,
    /// Finds never-populated pages, which are sent as zero without being read.
    page_map: Option<PageMap>,
    unpopulated: Vec<bool>,
    /// The pages that held data when the plan was sent (dirty logging already on), until
    /// the first dirty sync: the first pass reads the page map once, for the plan, instead
    /// of again per section. Any page written since is dirty and sent again after that sync.
    planned: Option<Bitmap>,
}

/// Which phase pages are sent in (for the statistics and the rate limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Precopy,
    Downtime,
    Postcopy,
}

impl Source {
    fn new(vm: Arc<Vm>, ram: RamMap) -> Self {
        let pages = ram.pages();
        Source {
            state: vm.migration().clone(),
            vm,
            ram,
            dirty: Bitmap::full(pages),
            cursor: 0,
            zero_runs: Vec::new(),
            zero_run_count: 0,
            sent_bytes: 0,
            stopped_from: None,
            downtime_start: None,
            requests: Default::default(),
            page_map: PageMap::open()
                .map_err(|e| log::warn!("cannot open the page map, reading every page: {e}"))
                .ok(),
            unpopulated: Vec::new(),
            planned: None,
        }
    }

    fn run(&mut self, uri: MigrationUri) {
        let result = self.migrate(&uri);
        if let Err(e) = self.ram.set_dirty_logging(self.vm.kvm().fd(), false) {
            log::warn!("{e}");
        }
        match result {
            Ok(()) => {}
            Err(SourceError::Cancelled) => {
                self.restart_guest();
                self.state.finish(MigrationStatus::Cancelled, None);
            }
            // Cancelling breaks the connection: whatever error that causes means cancelled.
            Err(_) if self.state.cancel_requested() => {
                self.restart_guest();
                self.state.finish(MigrationStatus::Cancelled, None);
            }
            Err(e) => {
                log::error!("migration failed: {e}");
                self.restart_guest();
                self.state
                    .finish(MigrationStatus::Failed, Some(e.to_string()));
            }
        }
    }

    fn migrate(&mut self, uri: &MigrationUri) -> Result<(), SourceError> {
        let mut conn = self.connect(uri)?;
        self.send_config(&mut conn)?;
        let postcopy = self.state.postcopy_enabled() && conn.replies.is_some();
        if postcopy {
            self.section(&mut conn, Kind::PostcopyAdvise, &[])?;
        }
        self.ram.set_dirty_logging(self.vm.kvm().fd(), true)?;
        self.send_plan(&mut conn)?;
        let start = self.state_start();
        self.state.update(|p| p.setup = Some(start.elapsed()));
        self.state.set_status(MigrationStatus::Active);
        let mut pass = 0i64;
        let mut drained = false;
        loop {
            let pass_start = Instant::now();
            let sent_before = self.sent_bytes;
            let pages_before = self.dirty.count();
            let finished = self.send_dirty(&mut conn, Phase::Precopy)?;
            self.check_replies(&mut conn)?;
            pass += 1;
            self.sync_dirty()?;
            self.state.emit_pass(pass);
            log::info!(
                "migration pass {pass}: {} bytes in {:?}, {} pages dirty",
                self.sent_bytes - sent_before,
                pass_start.elapsed(),
                self.dirty.count()
            );
            let elapsed = pass_start.elapsed().as_secs_f64().max(1e-6);
            let bandwidth = (self.sent_bytes - sent_before) as f64 / elapsed;
            let remaining = (self.dirty.count() * PAGE_SIZE) as u64;
            let expected = Duration::from_secs_f64(remaining as f64 / bandwidth.max(1.0));
            self.state.update(|p| {
                p.bandwidth = bandwidth;
                p.remaining = remaining;
                p.expected_downtime = Some(expected);
                p.dirty_rate = (self.dirty.count() as f64 / elapsed) as u64;
                p.pages_per_second = ((pages_before as f64) / elapsed) as u64;
            });
            if self.state.postcopy_requested() && postcopy {
                return self.postcopy(conn, uri);
            }
            let limit = Duration::from_millis(self.state.parameters().downtime_limit_ms);
            if finished && expected <= limit {
                // Once, wait for the destination to take what is queued, then make another
                // pass for what the guest wrote meanwhile.
                if drained || !self.wait_drained(&mut conn)? {
                    break;
                }
                drained = true;
            }
        }
        self.complete(&mut conn)
    }

    fn state_start(&self) -> Instant {
        let mut start = Instant::now();
        self.state.update(|p| start = p.start.unwrap_or(start));
        start
    }

    fn connect(&mut self, uri: &MigrationUri) -> Result<Connection, SourceError> {
        let channel = uri.connect()?;
        self.state.set_channel(Some(channel.try_clone()?));
        let replies = if channel.has_return_path() {
            Some(Replies::new(channel.try_clone()?))
        } else {
            None
        };
        let out = SectionWriter::new(channel);
        self.count(stream::STREAM_HEADER_LEN as u64, Phase::Precopy);
        Ok(Connection { out, replies })
    }

    fn send_config(&mut self, conn: &mut Connection) -> Result<(), SourceError> {
        let config = super::dest::StreamConfig::of(&self.vm, &self.ram);
        let json = serde_json::to_vec(&config)
            .map_err(|e| SourceError::State(format!("cannot encode the configuration: {e}")))?;
        self.section(conn, Kind::Config, &[&json])
    }

    /// Tells the destination which pages will carry data (those populated here), so it
    /// can populate them ahead of the stream. Nothing is sent when the page map cannot be
    /// read: the destination then populates pages as they come.
    fn send_plan(&mut self, conn: &mut Connection) -> Result<(), SourceError> {
        let Some(map) = self.page_map.as_mut() else {
            return Ok(());
        };
        let runs = match self.ram.populated_runs(map) {
            Ok(runs) => runs,
            Err(e) => {
                log::warn!("cannot read the page map, sending no RAM plan: {e}");
                return Ok(());
            }
        };
        let mut planned = Bitmap::new(self.ram.pages());
        let mut payload = Vec::new();
        for (i, run) in runs.iter().enumerate() {
            for page in run.clone() {
                planned.set(page);
            }
            PageRun {
                addr: self.ram.gpa(run.start).unwrap_or(0),
                count: u32::try_from(run.len()).unwrap_or(u32::MAX),
            }
            .encode(&mut payload);
            if (i + 1) % ZERO_RUNS_PER_SECTION == 0 || i + 1 == runs.len() {
                let batch = std::mem::take(&mut payload);
                self.section(conn, Kind::RamPlan, &[&batch])?;
            }
        }
        self.planned = Some(planned);
        Ok(())
    }

    fn section(
        &mut self,
        conn: &mut Connection,
        kind: Kind,
        parts: &[&[u8]],
    ) -> Result<(), SourceError> {
        let n = conn.out.section(kind, parts)?;
        self.count(n, self.phase());
        Ok(())
    }

    fn phase(&self) -> Phase {
        match self.state.status() {
            MigrationStatus::Device => Phase::Downtime,
            MigrationStatus::PostcopyActive => Phase::Postcopy,
            _ => Phase::Precopy,
        }
    }

    fn count(&mut self, bytes: u64, phase: Phase) {
        self.sent_bytes += bytes;
        self.state.update(|p| {
            p.transferred += bytes;
            match phase {
                Phase::Precopy => p.precopy_bytes += bytes,
                Phase::Downtime => p.downtime_bytes += bytes,
                Phase::Postcopy => p.postcopy_bytes += bytes,
            }
        });
    }

    /// Reads the dirty log into the dirty bitmap.
    fn sync_dirty(&mut self) -> Result<(), SourceError> {
        self.planned = None;
        self.ram
            .sync_dirty_log(self.vm.kvm().fd(), self.vm.memory(), &mut self.dirty)?;
        if self.state.take_ram_rewritten() {
            self.dirty = Bitmap::full(self.ram.pages());
        }
        self.cursor = 0;
        self.state.update(|p| p.sync_count += 1);
        Ok(())
    }

    /// Sends every dirty page from the cursor on. Returns false if it stopped early
    /// because postcopy was asked for.
    fn send_dirty(&mut self, conn: &mut Connection, phase: Phase) -> Result<bool, SourceError> {
        let mut limiter = RateLimit::new();
        while let Some(first) = self.dirty.next_set(self.cursor) {
            if self.state.cancel_requested() {
                return Err(SourceError::Cancelled);
            }
            if phase == Phase::Precopy && self.state.postcopy_requested() {
                return Ok(false);
            }
            let before = self.sent_bytes;
            self.send_run(conn, first, phase)?;
            if limiter
                .delay(self.sent_bytes - before, self.limit(phase))
                .is_some()
            {
                conn.out.flush()?;
                self.throttle(conn, &mut limiter, phase)?;
            }
            if phase == Phase::Postcopy {
                self.serve_requests(conn)?;
            } else {
                self.check_replies(conn)?;
            }
        }
        self.flush_zero_runs(conn)?;
        self.cursor = 0;
        Ok(true)
    }

    /// Waits, with the guest running, until the destination has taken all but [`DRAINED`]
    /// bytes of what was sent. Returns whether it had to wait.
    fn wait_drained(&mut self, conn: &mut Connection) -> Result<bool, SourceError> {
        conn.out.flush()?;
        let mut waited = false;
        while conn.out.get_ref().unsent()? > DRAINED {
            if self.state.cancel_requested() {
                return Err(SourceError::Cancelled);
            }
            if self.state.postcopy_requested() {
                break;
            }
            self.check_replies(conn)?;
            std::thread::sleep(DRAIN_POLL);
            waited = true;
        }
        Ok(waited)
    }

    /// The bandwidth limit of `phase`, in bytes per second (0: unlimited).
    fn limit(&self, phase: Phase) -> u64 {
        match phase {
            Phase::Precopy => self.state.parameters().max_bandwidth,
            Phase::Downtime => 0,
            Phase::Postcopy => self.state.parameters().max_postcopy_bandwidth,
        }
    }

    /// Waits until `limiter` allows more bytes. Waits in short steps and reads the limit
    /// again after each, so `migrate-set-parameters` applies at once (a 1 MiB run at
    /// 4096 B/s would otherwise stall for minutes after the limit was lifted), and so cancel
    /// and `migrate-start-postcopy` are seen. Postcopy serves page requests meanwhile.
    fn throttle(
        &mut self,
        conn: &mut Connection,
        limiter: &mut RateLimit,
        phase: Phase,
    ) -> Result<(), SourceError> {
        while let Some(delay) = limiter.delay(0, self.limit(phase)) {
            if self.state.cancel_requested() {
                return Err(SourceError::Cancelled);
            }
            if phase == Phase::Precopy && self.state.postcopy_requested() {
                return Ok(());
            }
            let step = delay.min(POLL_INTERVAL);
            if phase == Phase::Postcopy {
                self.wait_for_requests(conn, step)?;
            } else {
                std::thread::sleep(step);
            }
        }
        Ok(())
    }

    /// Sends up to one section's worth of consecutive dirty pages starting at `first`
    /// (clearing their dirty bits) and moves the cursor past them.
    fn send_run(
        &mut self,
        conn: &mut Connection,
        first: usize,
        phase: Phase,
    ) -> Result<(), SourceError> {
        let max = self.ram.clamp_run(first, PAGES_PER_SECTION);
        let mut count = 0;
        while count < max && self.dirty.get(first + count) {
            self.dirty.clear(first + count);
            count += 1;
        }
        self.cursor = first + count.max(1);
        self.send_pages(conn, first, count, phase)
    }

    /// Sends pages `first..first + count` (one region): zero pages as runs, the others as
    /// page sections.
    fn send_pages(
        &mut self,
        conn: &mut Connection,
        first: usize,
        count: usize,
        phase: Phase,
    ) -> Result<(), SourceError> {
        let mut data_start: Option<usize> = None;
        let mut data_pages = 0;
        let (mut zero, mut normal) = (0u64, 0u64);
        self.find_unpopulated(first, count);
        for i in 0..count {
            let page = first + i;
            let untouched = self.unpopulated.get(i).copied().unwrap_or(false);
            // SAFETY: only checked for zero; a page the guest writes meanwhile is dirty again.
            let is_zero_page = || unsafe { self.ram.live_pages(page, 1) }.is_some_and(is_zero);
            if untouched || is_zero_page() {
                zero += 1;
                if let Some(start) = data_start.take() {
                    self.send_page_data(conn, first, start, data_pages, phase)?;
                    data_pages = 0;
                }
                self.add_zero_run(conn, page)?;
            } else {
                normal += 1;
                data_start.get_or_insert(i);
                data_pages += 1;
            }
        }
        if let Some(start) = data_start {
            self.send_page_data(conn, first, start, data_pages, phase)?;
        }
        self.state.update(|p| {
            p.zero_pages += zero;
            p.normal_pages += normal;
        });
        Ok(())
    }

    /// Fills `self.unpopulated` for pages `first..first + count` (all false when unknown).
    fn find_unpopulated(&mut self, first: usize, count: usize) {
        self.unpopulated.clear();
        if let Some(planned) = &self.planned {
            self.unpopulated
                .extend((first..first + count).map(|p| !planned.get(p)));
            return;
        }
        if let (Some(map), Some(host)) = (self.page_map.as_mut(), self.ram.host(first)) {
            if let Err(e) = map.unpopulated(host, count, &mut self.unpopulated) {
                log::warn!("cannot read the page map, reading every page: {e}");
                self.page_map = None;
                self.unpopulated.clear();
            }
        }
    }

    fn send_page_data(
        &mut self,
        conn: &mut Connection,
        first: usize,
        start: usize,
        pages: usize,
        phase: Phase,
    ) -> Result<(), SourceError> {
        let page = first + start;
        let gpa = self.ram.gpa(page).unwrap_or(0);
        // SAFETY: sent as it is: if the guest writes a page during the send, the page may
        // miss its checksum at the destination, which then waits for it again, and the dirty
        // log sends it again.
        let Some(data) = (unsafe { self.ram.live_pages(page, pages) }) else {
            return Err(SourceError::State(format!(
                "pages {page}..{} are not in one RAM region",
                page + pages
            )));
        };
        let n = conn.out.ram_pages(gpa, data, PAGE_SIZE)?;
        self.count(n, phase);
        Ok(())
    }

    fn add_zero_run(&mut self, conn: &mut Connection, page: usize) -> Result<(), SourceError> {
        let gpa = self.ram.gpa(page).unwrap_or(0);
        // Extend the previous run when this page follows it.
        let len = self.zero_runs.len();
        if len >= 12 {
            let mut prev = [0u8; 8];
            prev.copy_from_slice(&self.zero_runs[len - 12..len - 4]);
            let mut count = [0u8; 4];
            count.copy_from_slice(&self.zero_runs[len - 4..]);
            let (prev, count) = (u64::from_le_bytes(prev), u32::from_le_bytes(count));
            if prev + u64::from(count) * PAGE_SIZE as u64 == gpa {
                self.zero_runs[len - 4..].copy_from_slice(&(count + 1).to_le_bytes());
                return Ok(());
            }
        }
        PageRun {
            addr: gpa,
            count: 1,
        }
        .encode(&mut self.zero_runs);
        self.zero_run_count += 1;
        if self.zero_run_count >= ZERO_RUNS_PER_SECTION {
            self.flush_zero_runs(conn)?;
        }
        Ok(())
    }

    fn flush_zero_runs(&mut self, conn: &mut Connection) -> Result<(), SourceError> {
        if self.zero_runs.is_empty() {
            return Ok(());
        }
        let runs = std::mem::take(&mut self.zero_runs);
        self.zero_run_count = 0;
        self.section(conn, Kind::RamZero, &[&runs])
    }

    /// Sorts out one reply: a page request is queued, an error or the connection's end
    /// ends the migration (or pauses postcopy), anything else is for the caller.
    fn route(&mut self, reply: Reply) -> Result<Option<Reply>, SourceError> {
        match reply {
            Reply::RequestPages(run) => {
                self.requests.push_back(run);
                Ok(None)
            }
            Reply::Error(e) => Err(SourceError::Destination(e)),
            Reply::Closed(why) => Err(SourceError::Closed(why)),
            other => Ok(Some(other)),
        }
    }

    /// Looks at return-path messages without waiting: an error from the destination ends
    /// the migration.
    fn check_replies(&mut self, conn: &mut Connection) -> Result<(), SourceError> {
        let Some(replies) = conn.replies.as_mut() else {
            return Ok(());
        };
        while let Some(reply) = replies.next(Duration::ZERO) {
            if let Some(other) = self.route(reply)? {
                log::debug!("migration: unexpected reply {other:?} in precopy");
            }
        }
        Ok(())
    }

    /// Waits for the next reply (or the connection's end).
    fn wait_reply(&mut self, conn: &mut Connection) -> Result<Reply, SourceError> {
        let replies = conn
            .replies
            .as_mut()
            .ok_or_else(|| SourceError::Closed(" (no return path)".into()))?;
        loop {
            if self.state.cancel_requested() {
                return Err(SourceError::Cancelled);
            }
            if let Some(reply) = replies.next(Duration::from_millis(100)) {
                if let Some(other) = self.route(reply)? {
                    return Ok(other);
                }
            }
        }
    }

    /// Stops the guest for the switch-over (remembering how to restart it on failure) and
    /// saves its vCPU, VM and device state.
    fn stop_and_save(&mut self) -> Result<MachineState, SourceError> {
        let vm = self.vm.clone();
        let mut machine = vm.lock();
        let from = machine.run_state;
        if !matches!(
            from,
            RunState::Running | RunState::Paused | RunState::Prelaunch
        ) {
            return Err(SourceError::State(format!(
                "the VM cannot be migrated while it is {from}"
            )));
        }
        if from == RunState::Running {
            vm.pause_vcpus(&mut machine);
            vm.emit(Event::Stop);
        }
        machine.run_state = RunState::FinishMigrate;
        self.stopped_from = Some(from);
        self.downtime_start = Some(Instant::now());
        self.state.set_status(MigrationStatus::Device);
        Ok(vm.save_machine_state(&mut machine)?)
    }

    /// Puts the guest back as it was before the switch-over (after a failure).
    fn restart_guest(&mut self) {
        let Some(from) = self.stopped_from.take() else {
            return;
        };
        let mut machine = self.vm.lock();
        machine.run_state = from;
        if from == RunState::Running {
            self.vm.emit(Event::Resume);
            self.vm.resume_vcpus(&mut machine);
        }
    }

    fn finish_guest(&mut self) {
        self.stopped_from = None;
        let mut machine = self.vm.lock();
        machine.run_state = RunState::Postmigrate;
    }

    fn record_downtime(&self) {
        if let Some(start) = self.downtime_start {
            let downtime = start.elapsed();
            self.state.update(|p| p.downtime = Some(downtime));
        }
    }

    /// Stop-and-copy: stop the guest, send the last dirty pages and the device state, and
    /// wait for the destination to confirm it loaded everything.
    fn complete(&mut self, conn: &mut Connection) -> Result<(), SourceError> {
        let device_state = self.stop_and_save()?;
        self.sync_dirty()?;
        self.send_dirty(conn, Phase::Downtime)?;
        let json = serde_json::to_vec(&device_state)
            .map_err(|e| SourceError::State(format!("cannot encode the VM state: {e}")))?;
        self.section(conn, Kind::DeviceState, &[&json])?;
        self.section(conn, Kind::End, &[])?;
        conn.out.flush()?;
        if conn.replies.is_some() {
            match self.wait_reply(conn)? {
                Reply::Ack => {}
                other => {
                    return Err(SourceError::State(format!(
                        "unexpected reply {other:?} from the destination"
                    )))
                }
            }
        } else {
            conn.out.get_ref().sync()?;
        }
        self.record_downtime();
        self.state.update(|p| p.remaining = 0);
        self.finish_guest();
        self.state.finish(MigrationStatus::Completed, None);
        Ok(())
    }

    /// The switch to postcopy and everything after it.
    fn postcopy(&mut self, mut conn: Connection, uri: &MigrationUri) -> Result<(), SourceError> {
        let device_state = self.stop_and_save()?;
        self.sync_dirty()?;
        self.send_discards(&mut conn)?;
        let json = serde_json::to_vec(&device_state)
            .map_err(|e| SourceError::State(format!("cannot encode the VM state: {e}")))?;
        self.section(&mut conn, Kind::PostcopyRun, &[&json])?;
        conn.out.flush()?;
        match self.wait_reply(&mut conn)? {
            Reply::PostcopyRunning => {}
            other => {
                return Err(SourceError::State(format!(
                    "unexpected reply {other:?} to the postcopy switch-over"
                )))
            }
        }
        // From here on the destination runs the guest: failures pause, never fail.
        self.record_downtime();
        self.finish_guest();
        self.state.set_status(MigrationStatus::PostcopyActive);
        loop {
            match self.postcopy_send(&mut conn) {
                Ok(()) => break,
                Err(e) => {
                    log::warn!("postcopy interrupted: {e}");
                    conn = self.pause_until_resumed(uri);
                }
            }
        }
        self.state.update(|p| p.remaining = 0);
        self.state.finish(MigrationStatus::Completed, None);
        Ok(())
    }

    /// Tells the destination which pages it must drop: those dirtied since it got them.
    fn send_discards(&mut self, conn: &mut Connection) -> Result<(), SourceError> {
        let mut runs = Vec::new();
        let mut page = self.dirty.next_set(0);
        while let Some(first) = page {
            let max = self.ram.clamp_run(first, u32::MAX as usize);
            let mut count = 0;
            while count < max && self.dirty.get(first + count) {
                count += 1;
            }
            PageRun {
                addr: self.ram.gpa(first).unwrap_or(0),
                count: count as u32,
            }
            .encode(&mut runs);
            if runs.len() >= ZERO_RUNS_PER_SECTION * 12 {
                let batch = std::mem::take(&mut runs);
                self.section(conn, Kind::PostcopyDiscard, &[&batch])?;
            }
            page = self.dirty.next_set(first + count.max(1));
        }
        if !runs.is_empty() {
            self.section(conn, Kind::PostcopyDiscard, &[&runs])?;
        }
        Ok(())
    }

    /// Postcopy: requested pages first, the rest in the background; then End and Ack.
    fn postcopy_send(&mut self, conn: &mut Connection) -> Result<(), SourceError> {
        self.serve_requests(conn)?;
        self.send_dirty(conn, Phase::Postcopy)?;
        self.section(conn, Kind::End, &[])?;
        conn.out.flush()?;
        loop {
            match self.wait_reply(conn)? {
                Reply::Ack => return Ok(()),
                other => log::debug!("migration: reply {other:?} while finishing postcopy"),
            }
            self.serve_requests(conn)?;
        }
    }

    /// Sends the pages the destination asked for that it does not have yet.
    fn serve_requests(&mut self, conn: &mut Connection) -> Result<(), SourceError> {
        self.check_replies(conn)?;
        let mut served = false;
        while let Some(run) = self.requests.pop_front() {
            let Some(pages) = self.ram.run(run.addr, run.count as usize) else {
                log::warn!("migration: the destination asked for a bad range {run:?}");
                continue;
            };
            self.state.update(|p| p.postcopy_requests += 1);
            for page in pages {
                if self.dirty.get(page) {
                    self.dirty.clear(page);
                    self.send_pages(conn, page, 1, Phase::Postcopy)?;
                    served = true;
                }
            }
        }
        if served {
            self.flush_zero_runs(conn)?;
            conn.out.flush()?;
        }
        Ok(())
    }

    /// Waits up to `delay` (the rate limit), serving page requests as they come.
    fn wait_for_requests(
        &mut self,
        conn: &mut Connection,
        delay: Duration,
    ) -> Result<(), SourceError> {
        let until = Instant::now() + delay;
        while Instant::now() < until {
            let Some(replies) = conn.replies.as_mut() else {
                std::thread::sleep(delay);
                return Ok(());
            };
            let wait = until
                .saturating_duration_since(Instant::now())
                .min(POLL_INTERVAL);
            if let Some(reply) = replies.next(wait) {
                match self.route(reply)? {
                    None => self.serve_requests(conn)?,
                    Some(other) => log::debug!("migration: unexpected reply {other:?}"),
                }
            }
        }
        Ok(())
    }

    /// Postcopy broke: enter `postcopy-paused` and wait for `migrate resume=true`; retry
    /// until a reconnection completes the handshake.
    fn pause_until_resumed(&mut self, _old: &MigrationUri) -> Connection {
        self.state.set_channel(None);
        self.state.set_status(MigrationStatus::PostcopyPaused);
        loop {
            let uri = self.state.wait_resume_uri();
            self.state.set_status(MigrationStatus::PostcopyRecoverSetup);
            match self.resume(&uri) {
                Ok(conn) => {
                    self.state.set_status(MigrationStatus::PostcopyActive);
                    return conn;
                }
                Err(e) => {
                    log::warn!("postcopy recovery failed: {e}");
                    self.state.set_channel(None);
                    self.state.set_status(MigrationStatus::PostcopyPaused);
                }
            }
        }
    }

    /// The recovery handshake: get the destination's received-page bitmap, resend
    /// everything it lacks.
    fn resume(&mut self, uri: &MigrationUri) -> Result<Connection, SourceError> {
        let mut conn = self.connect(uri)?;
        self.state.set_status(MigrationStatus::PostcopyRecover);
        self.section(&mut conn, Kind::ResumeRequest, &[])?;
        conn.out.flush()?;
        let bitmap = match self.wait_reply(&mut conn)? {
            Reply::RecvBitmap(bytes) => {
                Bitmap::from_bytes(self.ram.pages(), &bytes).ok_or_else(|| {
                    SourceError::State(format!(
                        "received-page bitmap of {} bytes does not fit {} pages",
                        bytes.len(),
                        self.ram.pages()
                    ))
                })?
            }
            other => {
                return Err(SourceError::State(format!(
                    "unexpected reply {other:?} to the resume request"
                )))
            }
        };
        self.dirty = bitmap.complement();
        self.cursor = 0;
        self.requests.clear();
        self.section(&mut conn, Kind::PostcopyResume, &[])?;
        conn.out.flush()?;
        match self.wait_reply(&mut conn)? {
            Reply::ResumeAck => Ok(conn),
            other => Err(SourceError::State(format!(
                "unexpected reply {other:?} to postcopy resume"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_delays_to_the_limit() {
        let mut limit = RateLimit::new();
        assert_eq!(limit.delay(1 << 20, 0), None);
        let delay = limit.delay(1 << 20, 1 << 20).unwrap();
        assert!(delay > Duration::from_millis(900), "{delay:?}");
    }

    #[test]
    fn rate_limit_follows_a_changed_limit() {
        let mut limit = RateLimit::new();
        let slow = limit.delay(1 << 20, 4096).unwrap();
        assert!(slow > Duration::from_secs(200), "{slow:?}");
        // Lifting or raising the limit ends the wait at once (throttle re-reads it).
        assert_eq!(limit.delay(0, 0), None);
        let fast = limit.delay(0, 1 << 30).unwrap_or_default();
        assert!(fast < Duration::from_millis(10), "{fast:?}");
    }
}
