//! Live migration: precopy, postcopy over userfaultfd, pause and recovery, and snapshots to
//! files. The stream format is in [`stream`] (and `docs/migration-stream.md`), the outgoing
//! side in [`source`], the incoming side in [`dest`].
//!
//! [`MigrationState`] is what the monitor sees. It is changed by the migration threads and
//! read by QMP; its lock is "fast" in the sense of the out-of-band contract: it is never held
//! across I/O, a wait, guest RAM access or the big lock, so `migrate-pause` and
//! `migrate-recover` can use it from the monitor thread while the main loop is blocked on a
//! missing page.

pub mod dest;
pub mod fd_channel;
pub mod inherited;
pub mod populate;
pub mod ram;
pub mod replies;
pub mod source;
pub mod stream;
pub mod uri;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use api::{
    Event, MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationParameters,
    MigrationStats, MigrationStatus, SocketAddress,
};
use qmp::{MonitorFds, QmpError};

use self::uri::{Channel, Listener, MigrationUri};

/// QEMU's text when `migrate-pause` is used outside postcopy (QEMU 9.1 and later).
const PAUSE_WRONG_STATE: &str =
    "migrate-pause is currently only supported during postcopy-active or postcopy-recover state";
/// QEMU's text when `migrate-recover` is used while postcopy is not paused.
const RECOVER_WRONG_STATE: &str = "Migrate recover can only be run when postcopy is paused.";
/// QEMU's default `downtime-limit`, in milliseconds.
const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;

/// Which side of a migration this VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No migration yet.
    None,
    /// Sending.
    Source,
    /// Receiving.
    Destination,
}

/// Capabilities Skiff implements (the others cannot be enabled).
#[derive(Debug, Clone, Copy, Default)]
struct Capabilities {
    events: bool,
    postcopy_ram: bool,
    return_path: bool,
}

/// Tuning, as `migrate-set-parameters` sets it.
#[derive(Debug, Clone, Copy)]
pub struct Parameters {
    /// Precopy bytes per second; 0 means unlimited.
    pub max_bandwidth: u64,
    /// Longest acceptable downtime.
    pub downtime_limit_ms: u64,
    /// Postcopy background bytes per second; 0 means unlimited.
    pub max_postcopy_bandwidth: u64,
}

/// Progress counters of the current or last migration.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// When it started.
    pub start: Option<Instant>,
    /// When it ended.
    pub end: Option<Instant>,
    /// Set-up time.
    pub setup: Option<Duration>,
    /// Guest stopped time (after success).
    pub downtime: Option<Duration>,
    /// Expected downtime (while active).
    pub expected_downtime: Option<Duration>,
    /// Bytes sent or received.
    pub transferred: u64,
    /// Bytes still to send.
    pub remaining: u64,
    /// Bytes of guest RAM.
    pub total: u64,
    /// Pages sent as zero.
    pub zero_pages: u64,
    /// Pages sent with data.
    pub normal_pages: u64,
    /// Pages dirtied per second in the last pass.
    pub dirty_rate: u64,
    /// Throughput of the last pass, bytes per second.
    pub bandwidth: f64,
    /// Dirty log reads.
    pub sync_count: u64,
    /// Pages requested by the destination in postcopy.
    pub postcopy_requests: u64,
    /// Pages per second in the last pass.
    pub pages_per_second: u64,
    /// Bytes sent before the switch-over.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    /// Bytes sent in postcopy.
    pub postcopy_bytes: u64,
    /// Why it failed.
    pub error: Option<String>,
}

struct Inner {
    role: Role,
    caps: Capabilities,
    params: Parameters,
    progress: Progress,
    /// The live channel, so pause and cancel can break it from another thread.
    channel: Option<Channel>,
    cancel: bool,
    start_postcopy: bool,
    /// Source: where `migrate resume=true` asked to reconnect.
    resume_uri: Option<MigrationUri>,
    /// Destination: the listener `migrate-recover` opened.
    recover_listener: Option<Listener>,
    socket_address: Option<Vec<SocketAddress>>,
}

/// Where migration events go.
pub type EventSink = Box<dyn Fn(Event) + Send + Sync>;

/// The VM's migration state, shared by the monitor, the migration threads and the VMM.
pub struct MigrationState {
    status: AtomicU8,
    /// Set when something other than a vCPU rewrote guest RAM (a reset reloading the kernel):
    /// the source then treats all RAM as dirty.
    ram_rewritten: AtomicBool,
    /// Whether the guest runs once an incoming migration completes (no -S, or `cont`).
    autostart: AtomicBool,
    /// Whether guest RAM was populated at start-up (`--mem-prealloc`): a destination then
    /// writes pages in place without populating them first.
    ram_preallocated: AtomicBool,
    inner: Mutex<Inner>,
    changed: Condvar,
    events: OnceLock<EventSink>,
}

impl Default for MigrationState {
    fn default() -> Self {
        Self::new()
    }
}

fn encode(status: MigrationStatus) -> u8 {
    MigrationStatus::ALL
        .iter()
        .position(|s| *s == status)
        .unwrap_or(0) as u8
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn unsupported(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Migration capability '{name}' is not supported by Skiff"
    ))
}

impl MigrationState {
    /// No migration has happened.
    pub fn new() -> Self {
        MigrationState {
            status: AtomicU8::new(encode(MigrationStatus::None)),
            ram_rewritten: AtomicBool::new(false),
            autostart: AtomicBool::new(true),
            ram_preallocated: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                role: Role::None,
                caps: Capabilities::default(),
                params: Parameters {
                    max_bandwidth: 0,
                    downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
                    max_postcopy_bandwidth: 0,
                },
                progress: Progress::default(),
                channel: None,
                cancel: false,
                start_postcopy: false,
                resume_uri: None,
                recover_listener: None,
                socket_address: None,
            }),
            changed: Condvar::new(),
            events: OnceLock::new(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panicking migration thread must not take QMP down with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets where MIGRATION and MIGRATION_PASS events go (once).
    pub fn set_event_sink(&self, sink: EventSink) {
        if self.events.set(sink).is_err() {
            log::warn!("the migration event sink was already set");
        }
    }

    fn emit(&self, event: Event) {
        if self.inner().caps.events {
            if let Some(sink) = self.events.get() {
                sink(event);
            }
        }
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        let index = usize::from(self.status.load(Ordering::Acquire));
        MigrationStatus::ALL
            .get(index)
            .copied()
            .unwrap_or(MigrationStatus::None)
    }

    /// Moves to `status` and emits MIGRATION (with the events capability).
    pub fn set_status(&self, status: MigrationStatus) {
        if status == MigrationStatus::PostcopyActive {
            // On both sides, and again after a recovery: see `Channel::tune_for_postcopy`.
            if let Some(channel) = &self.inner().channel {
                channel.tune_for_postcopy();
            }
        }
        let old = self.status.swap(encode(status), Ordering::AcqRel);
        if old != encode(status) {
            log::info!("migration: {}", status.as_str());
            self.emit(Event::Migration { status });
        }
        self.changed.notify_all();
    }

    /// Emits MIGRATION_PASS.
    pub fn emit_pass(&self, pass: i64) {
        self.emit(Event::MigrationPass { pass });
    }

    /// Whether a migration is under way (neither idle nor ended).
    pub fn is_active(&self) -> bool {
        !matches!(
            self.status(),
            MigrationStatus::None
                | MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
        )
    }

    /// Which side this VM is.
    pub fn role(&self) -> Role {
        self.inner().role
    }

    /// Fails (with QEMU's text) while a migration is under way.
    pub fn check_idle(&self) -> Result<(), QmpError> {
        if self.is_active() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        Ok(())
    }

    /// Starts a new migration in `role`: resets progress and flags, enters `setup`.
    pub fn begin(&self, role: Role, ram_bytes: u64) -> Result<(), QmpError> {
        {
            let mut inner = self.inner();
            self.check_idle()?;
            inner.role = role;
            inner.progress = Progress {
                start: Some(Instant::now()),
                total: ram_bytes,
                remaining: ram_bytes,
                ..Progress::default()
            };
            inner.cancel = false;
            inner.start_postcopy = false;
            inner.resume_uri = None;
            inner.recover_listener = None;
            inner.channel = None;
        }
        self.ram_rewritten.store(false, Ordering::Release);
        self.set_status(MigrationStatus::Setup);
        Ok(())
    }

    /// Records the end of the migration (`error` when it failed) and its final status.
    pub fn finish(&self, status: MigrationStatus, error: Option<String>) {
        {
            let mut inner = self.inner();
            inner.progress.end = Some(Instant::now());
            if let Some(e) = &error {
                inner.progress.error = Some(e.clone());
            }
            inner.channel = None;
            inner.recover_listener = None;
        }
        self.set_status(status);
    }

    /// Updates the progress counters.
    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.inner().progress);
    }

    /// The current parameters.
    pub fn parameters(&self) -> Parameters {
        self.inner().params
    }

    /// Whether postcopy may be used.
    pub fn postcopy_enabled(&self) -> bool {
        self.inner().caps.postcopy_ram
    }

    /// Remembers the live channel (for pause and cancel); `None` forgets it.
    pub fn set_channel(&self, channel: Option<Channel>) {
        self.inner().channel = channel;
    }

    /// Records where an incoming migration listens.
    pub fn set_socket_address(&self, address: Option<SocketAddress>) {
        self.inner().socket_address = address.map(|a| vec![a]);
    }

    /// Whether `migrate_cancel` was asked for.
    pub fn cancel_requested(&self) -> bool {
        self.inner().cancel
    }

    /// Whether `migrate-start-postcopy` was asked for.
    pub fn postcopy_requested(&self) -> bool {
        self.inner().start_postcopy
    }

    /// Sets whether an incoming guest runs when its migration completes.
    pub fn set_autostart(&self, on: bool) {
        self.autostart.store(on, Ordering::Release);
    }

    /// Whether an incoming guest runs when its migration completes.
    pub fn autostart(&self) -> bool {
        self.autostart.load(Ordering::Acquire)
    }

    /// Notes that all guest RAM was populated at start-up.
    pub fn note_ram_preallocated(&self) {
        self.ram_preallocated.store(true, Ordering::Release);
    }

    /// Whether all guest RAM was populated at start-up.
    pub fn ram_preallocated(&self) -> bool {
        self.ram_preallocated.load(Ordering::Acquire)
    }

    /// Notes that guest RAM was rewritten outside KVM's dirty log.
    pub fn note_ram_rewritten(&self) {
        self.ram_rewritten.store(true, Ordering::Release);
    }

    /// Takes the note of [`MigrationState::note_ram_rewritten`].
    pub fn take_ram_rewritten(&self) -> bool {
        self.ram_rewritten.swap(false, Ordering::AcqRel)
    }

    /// Source, paused: waits for `migrate resume=true` and returns its address.
    pub fn wait_resume_uri(&self) -> MigrationUri {
        let mut inner = self.inner();
        loop {
            if let Some(uri) = inner.resume_uri.take() {
                return uri;
            }
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Destination, paused: waits for `migrate-recover` and returns its listener.
    pub fn wait_recover_listener(&self) -> Listener {
        let mut inner = self.inner();
        loop {
            if let Some(listener) = inner.recover_listener.take() {
                return listener;
            }
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Destination: whether a `migrate-recover` is waiting to be taken, i.e. it replaced the
    /// listener the migration thread waits on.
    pub fn recover_listener_pending(&self) -> bool {
        self.inner().recover_listener.is_some()
    }

    /// Fails (with QEMU's text) unless this is a paused postcopy source.
    pub fn check_resumable(&self) -> Result<(), QmpError> {
        if self.status() != MigrationStatus::PostcopyPaused || self.role() != Role::Source {
            return Err(QmpError::generic(
                "Cannot resume if there is no paused migration",
            ));
        }
        Ok(())
    }

    /// `migrate` with `resume: true` on a paused source: hands the new address to the
    /// migration thread.
    pub fn request_resume(&self, uri: MigrationUri) -> Result<(), QmpError> {
        self.check_resumable()?;
        self.inner().resume_uri = Some(uri);
        self.changed.notify_all();
        Ok(())
    }

    /// `migrate_cancel`.
    pub fn cancel(&self) -> Result<(), QmpError> {
        let status = self.status();
        if matches!(
            status,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
        ) {
            return Err(QmpError::generic(
                "Postcopy migration in progress, cannot cancel.",
            ));
        }
        if self.role() != Role::Source || !self.is_active() {
            return Ok(());
        }
        let mut inner = self.inner();
        inner.cancel = true;
        if let Some(channel) = &inner.channel {
            channel.shutdown();
        }
        drop(inner);
        self.set_status(MigrationStatus::Cancelling);
        Ok(())
    }

    /// `migrate-start-postcopy`.
    pub fn start_postcopy(&self) -> Result<(), QmpError> {
        if !self.postcopy_enabled() {
            return Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            ));
        }
        if self.role() != Role::Source || self.status() == MigrationStatus::None {
            return Err(QmpError::generic(
                "Postcopy must be started after migration has been started",
            ));
        }
        self.inner().start_postcopy = true;
        Ok(())
    }

    /// `migrate-pause`: breaks a postcopy migration's connection on purpose. Only shuts a
    /// socket down: never blocks.
    pub fn pause(&self) -> Result<(), QmpError> {
        match self.status() {
            MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover => {
                if let Some(channel) = &self.inner().channel {
                    channel.shutdown();
                }
                Ok(())
            }
            _ => Err(QmpError::generic(PAUSE_WRONG_STATE)),
        }
    }

    /// `migrate-recover`: listens on `uri` for the source to resume a paused postcopy, or,
    /// with `fd:NAME`, waits on the connected socket the issuing monitor keeps under NAME
    /// (`fds`), which is used up as in QEMU. Binding a socket or taking a descriptor does not
    /// block.
    pub fn recover(&self, uri: &str, fds: &MonitorFds) -> Result<(), QmpError> {
        if self.status() != MigrationStatus::PostcopyPaused || self.role() != Role::Destination {
            return Err(QmpError::generic(RECOVER_WRONG_STATE));
        }
        let uri = MigrationUri::parse(uri).map_err(|e| QmpError::generic(e.to_string()))?;
        fd_channel::attach(&uri, fds, false)?;
        if !uri.has_return_path() {
            // QEMU takes a file here and the recovery fails later; refuse it at once.
            return Err(QmpError::generic(match uri.fd_name() {
                Some(name) => format!(
                    "file descriptor '{name}': postcopy recovery needs a connected stream socket"
                ),
                None => "postcopy recovery needs a socket (unix:, tcp: or fd:)".to_string(),
            }));
        }
        let listener = uri.listen().map_err(|e| QmpError::generic(e.to_string()))?;
        let mut inner = self.inner();
        inner.socket_address = listener.socket_address().map(|a| vec![a]);
        inner.recover_listener = Some(listener);
        drop(inner);
        self.changed.notify_all();
        Ok(())
    }

    /// `migrate-set-capabilities`.
    pub fn set_capabilities(&self, caps: &[MigrationCapabilityStatus]) -> Result<(), QmpError> {
        let mut inner = self.inner();
        // A destination listening since start-up (`--incoming URI`) is in `setup` until the
        // source connects; as in QEMU, its capabilities may still be set then (postcopy-ram
        // and events must be on before the stream starts).
        let listening = inner.role == Role::Destination && self.status() == MigrationStatus::Setup;
        if self.is_active() && !listening {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        let mut new = inner.caps;
        for cap in caps {
            match cap.capability {
                MigrationCapability::Events => new.events = cap.state,
                MigrationCapability::PostcopyRam => new.postcopy_ram = cap.state,
                MigrationCapability::ReturnPath => new.return_path = cap.state,
                other if cap.state => return Err(unsupported(other.as_str())),
                _ => {}
            }
        }
        inner.caps = new;
        Ok(())
    }

    /// `query-migrate-capabilities`.
    pub fn capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        let caps = self.inner().caps;
        MigrationCapability::ALL
            .iter()
            .map(|&capability| MigrationCapabilityStatus {
                capability,
                state: match capability {
                    MigrationCapability::Events => caps.events,
                    MigrationCapability::PostcopyRam => caps.postcopy_ram,
                    MigrationCapability::ReturnPath => caps.return_path,
                    _ => false,
                },
            })
            .collect()
    }

    /// `migrate-set-parameters`.
    pub fn set_parameters(
        &self,
        max_bandwidth: Option<u64>,
        downtime_limit: Option<u64>,
        max_postcopy_bandwidth: Option<u64>,
    ) -> Result<(), QmpError> {
        if let Some(limit) = downtime_limit {
            if limit > 2_000_000 {
                return Err(QmpError::generic(
                    "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds",
                ));
            }
        }
        let mut inner = self.inner();
        if let Some(v) = max_bandwidth {
            inner.params.max_bandwidth = v;
        }
        if let Some(v) = downtime_limit {
            inner.params.downtime_limit_ms = v;
        }
        if let Some(v) = max_postcopy_bandwidth {
            inner.params.max_postcopy_bandwidth = v;
        }
        Ok(())
    }

    /// `query-migrate-parameters`.
    pub fn query_parameters(&self) -> MigrationParameters {
        let p = self.parameters();
        MigrationParameters {
            max_bandwidth: Some(p.max_bandwidth),
            downtime_limit: Some(p.downtime_limit_ms),
            max_postcopy_bandwidth: Some(p.max_postcopy_bandwidth),
        }
    }

    /// `query-migrate`.
    pub fn info(&self) -> MigrationInfo {
        let status = self.status();
        let inner = self.inner();
        let mut info = MigrationInfo {
            status: None,
            ram: None,
            total_time: None,
            setup_time: None,
            expected_downtime: None,
            downtime: None,
            error_desc: None,
            socket_address: None,
        };
        if status == MigrationStatus::None && inner.role == Role::None {
            return info;
        }
        info.status = Some(status);
        if inner.role == Role::Destination {
            info.socket_address = inner.socket_address.clone();
            if status == MigrationStatus::Failed {
                info.error_desc = inner.progress.error.clone();
            }
            return info;
        }
        let p = &inner.progress;
        if let Some(start) = p.start {
            let end = p.end.unwrap_or_else(Instant::now);
            info.total_time = Some(millis(end.saturating_duration_since(start)));
        }
        info.setup_time = p.setup.map(millis);
        if status == MigrationStatus::Active {
            info.expected_downtime = p.expected_downtime.map(millis);
        }
        if status == MigrationStatus::Completed {
            info.downtime = p.downtime.map(millis);
        }
        if status == MigrationStatus::Failed {
            info.error_desc = p.error.clone();
        }
        info.ram = Some(MigrationStats {
            transferred: p.transferred as i64,
            remaining: p.remaining as i64,
            total: p.total as i64,
            duplicate: p.zero_pages as i64,
            normal: p.normal_pages as i64,
            normal_bytes: (p.normal_pages * ram::PAGE_SIZE as u64) as i64,
            dirty_pages_rate: p.dirty_rate as i64,
            mbps: p.bandwidth * 8.0 / 1e6,
            dirty_sync_count: p.sync_count as i64,
            postcopy_requests: p.postcopy_requests as i64,
            page_size: ram::PAGE_SIZE as i64,
            pages_per_second: p.pages_per_second,
            precopy_bytes: p.precopy_bytes,
            downtime_bytes: p.downtime_bytes,
            postcopy_bytes: p.postcopy_bytes,
        });
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_refuse_without_a_migration() {
        let state = MigrationState::new();
        assert_eq!(state.status(), MigrationStatus::None);
        assert_eq!(state.pause().unwrap_err().desc, PAUSE_WRONG_STATE);
        assert_eq!(
            state
                .recover("unix:/x", &MonitorFds::default())
                .unwrap_err()
                .desc,
            RECOVER_WRONG_STATE
        );
        assert!(state.cancel().is_ok());
        assert!(state.start_postcopy().is_err());
        assert_eq!(state.info().status, None);
    }

    #[test]
    fn recover_refuses_what_cannot_carry_a_recovery() {
        let state = MigrationState::new();
        state.begin(Role::Destination, 4096).unwrap();
        state.set_status(MigrationStatus::PostcopyPaused);
        let fds = MonitorFds::default();
        for (uri, error) in [
            ("fd:nope", "File descriptor named 'nope' has not been found"),
            ("fd:9x", "Invalid file descriptor number '9x'"),
            (
                "file:/nonexistent",
                "postcopy recovery needs a socket (unix:, tcp: or fd:)",
            ),
        ] {
            assert_eq!(state.recover(uri, &fds).unwrap_err().desc, error, "{uri}");
        }
        assert!(!state.recover_listener_pending());
    }

    #[test]
    fn capabilities_and_parameters() {
        let state = MigrationState::new();
        state
            .set_capabilities(&[MigrationCapabilityStatus {
                capability: MigrationCapability::PostcopyRam,
                state: true,
            }])
            .unwrap();
        assert!(state.postcopy_enabled());
        assert!(state
            .set_capabilities(&[MigrationCapabilityStatus {
                capability: MigrationCapability::Multifd,
                state: true,
            }])
            .is_err());
        state.set_parameters(Some(1000), Some(5), None).unwrap();
        let p = state.query_parameters();
        assert_eq!(p.max_bandwidth, Some(1000));
        assert_eq!(p.downtime_limit, Some(5));
        assert!(state.set_parameters(None, Some(3_000_000), None).is_err());
    }

    #[test]
    fn one_migration_at_a_time_and_postcopy_cannot_be_cancelled() {
        let state = MigrationState::new();
        state.begin(Role::Source, 4096).unwrap();
        assert!(state.begin(Role::Source, 4096).is_err());
        state.set_status(MigrationStatus::PostcopyActive);
        assert!(state.cancel().is_err());
        state.finish(MigrationStatus::Completed, None);
        assert!(state.begin(Role::Source, 4096).is_ok());
    }

    #[test]
    fn entering_postcopy_shrinks_the_channels_buffers_on_either_side() {
        let send_buffer =
            |s: &std::os::unix::net::UnixStream| fd_channel::socket_option(s, libc::SO_SNDBUF);
        let (stream, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        // As connected or accepted: tuned for precopy's bulk transfer.
        let channel = Channel::unix(stream.try_clone().unwrap());
        let before = send_buffer(&stream).unwrap();
        let state = MigrationState::new();
        state.begin(Role::Destination, 4096).unwrap();
        state.set_channel(Some(channel));
        state.set_status(MigrationStatus::PostcopyPaused);
        assert_eq!(send_buffer(&stream).unwrap(), before);
        state.set_status(MigrationStatus::PostcopyActive);
        let shrunk = send_buffer(&stream).unwrap();
        assert!(shrunk < before, "{shrunk} bytes, {before} before");
    }

    fn events_on() -> [MigrationCapabilityStatus; 1] {
        [MigrationCapabilityStatus {
            capability: MigrationCapability::Events,
            state: true,
        }]
    }

    #[test]
    fn a_listening_destination_takes_capabilities() {
        let state = MigrationState::new();
        state.begin(Role::Destination, 4096).unwrap();
        assert!(state.set_capabilities(&events_on()).is_ok());
        state.set_status(MigrationStatus::Active);
        assert!(state.set_capabilities(&events_on()).is_err());
        let source = MigrationState::new();
        source.begin(Role::Source, 4096).unwrap();
        assert!(source.set_capabilities(&events_on()).is_err());
    }
}
