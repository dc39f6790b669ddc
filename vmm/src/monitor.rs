//! The VMM side of QMP: the handlers behind the generated command traits, and the event-loop
//! subscriber that runs queued in-band commands with the big lock held.
//!
//! The type system keeps the out-of-band contract: in-band handlers ([`InBandHandler`]) hold
//! the locked [`Machine`](crate::machine::Machine); out-of-band handlers ([`OobContext`]) hold
//! only the migration state, which is atomics, so they cannot take the big lock or touch guest
//! RAM.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;

use api::{
    CpuInfoFast, CpuInstanceProperties, InBandCommands, KvmInfo, MemoryInfo,
    MigrationCapabilityStatus, MigrationInfo, MigrationParameters, NameInfo, OobCommands,
    ShutdownCause, StatusInfo, SysEmuTarget, UuidInfo, VersionInfo, VersionTriple,
};
use event_manager::{EventOps, Events, MutEventSubscriber};
use qmp::{CommandFds, MonitorFds, QmpError, QmpServer};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use crate::machine::MachineGuard;
use crate::migration::fd_channel;
use crate::migration::uri::MigrationUri;
use crate::migration::{self, MigrationState, Role};
use crate::runstate::RunState;
use crate::virtio::DiskInfo;
use crate::vm::{Vm, VmAction};

/// The QEMU version Skiff's monitor reports (greeting and `query-version`): the QMP dialect
/// it speaks, so clients that check versions accept it.
pub const QEMU_VERSION: (i64, i64, i64) = (9, 2, 0);
/// The `package` string of the version: says what is really answering.
pub const PACKAGE: &str = concat!("skiff-", env!("CARGO_PKG_VERSION"));
/// Bytes copied per write by `pmemsave` and `memsave`.
const SAVE_CHUNK: usize = 64 * 1024;
const PAGE_SIZE: u64 = 4096;

/// What out-of-band handlers may use: shared migration state, nothing else.
pub struct OobContext {
    migration: Arc<MigrationState>,
}

impl OobContext {
    /// A context over the VM's migration state.
    pub fn new(migration: Arc<MigrationState>) -> Self {
        OobContext { migration }
    }
}

impl OobCommands for OobContext {
    fn migrate_pause(&self, _fds: &MonitorFds) -> Result<(), QmpError> {
        self.migration.pause()
    }

    fn migrate_recover(&self, fds: &MonitorFds, uri: String) -> Result<(), QmpError> {
        self.migration.recover(&uri, fds)
    }
}

/// Handles one in-band command with the big lock held.
pub struct InBandHandler<'a> {
    vm: &'a Arc<Vm>,
    machine: MachineGuard<'a>,
    oob: &'a OobContext,
    fds: CommandFds,
}

impl<'a> InBandHandler<'a> {
    /// A handler for one command, with the descriptors it may use; takes the big lock.
    pub fn new(vm: &'a Arc<Vm>, oob: &'a OobContext, fds: CommandFds) -> Self {
        InBandHandler {
            vm,
            machine: vm.lock(),
            oob,
            fds,
        }
    }

    fn check_cpu_index(&self, cpu_index: Option<i64>) -> Result<usize, QmpError> {
        let index = cpu_index.unwrap_or(0);
        usize::try_from(index)
            .ok()
            .filter(|i| *i < self.machine.vcpus.len())
            .ok_or_else(|| QmpError::generic(format!("CPU {index} not found")))
    }

    /// Copies `size` bytes from `read_at(offset)` into a new file, as pmemsave/memsave do.
    fn save_to_file(
        filename: &str,
        size: u64,
        mut read_at: impl FnMut(u64, &mut [u8]) -> Result<(), QmpError>,
    ) -> Result<(), QmpError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(filename)
            .map_err(|e| QmpError::generic(format!("Could not open '{filename}': {e}")))?;
        let mut buf = vec![0u8; SAVE_CHUNK];
        let mut done = 0u64;
        while done < size {
            let len = (size - done).min(SAVE_CHUNK as u64) as usize;
            read_at(done, &mut buf[..len])?;
            file.write_all(&buf[..len]).map_err(|e| {
                QmpError::generic(format!("writing memory to '{filename}' failed: {e}"))
            })?;
            done += len as u64;
        }
        Ok(())
    }

    fn info_registers(&mut self, cpu_index: Option<i64>) -> Result<String, QmpError> {
        let index = self.check_cpu_index(cpu_index)?;
        let dump = self
            .vm
            .run_on_vcpu(&mut self.machine, index, |vcpu| {
                crate::arch::dump::register_dump(vcpu.fd())
            })
            .ok_or_else(|| QmpError::generic(format!("CPU {index} not found")))?;
        dump.map_err(|e| QmpError::generic(format!("cannot read the registers: {e}")))
    }

    fn info_cpus(&self) -> String {
        (0..self.machine.vcpus.len())
            .map(|i| {
                let tid = self.vm.kick(i).thread_id().unwrap_or(0);
                let current = if i == 0 { '*' } else { ' ' };
                format!("{current} CPU #{i}: thread_id={tid}\n")
            })
            .collect()
    }
}

/// A counter as QMP's `int`.
fn qmp_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The guest device path QMP reports for a disk.
fn disk_qdev(disk: &DiskInfo) -> String {
    format!("/machine/peripheral/{}/virtio-backend", disk.name)
}

/// A disk as `query-block` reports it (QEMU's shape for a raw image on virtio-blk).
fn block_info(disk: &DiskInfo) -> api::BlockInfo {
    let size = qmp_int(disk.size);
    api::BlockInfo {
        device: disk.name.clone(),
        qdev: Some(disk_qdev(disk)),
        r#type: "unknown".to_string(),
        removable: false,
        locked: false,
        inserted: Some(api::BlockDeviceInfo {
            file: disk.path.clone(),
            node_name: None,
            ro: disk.read_only,
            drv: "raw".to_string(),
            backing_file_depth: 0,
            encrypted: false,
            detect_zeroes: api::BlockdevDetectZeroesOptions::Off,
            bps: 0,
            bps_rd: 0,
            bps_wr: 0,
            iops: 0,
            iops_rd: 0,
            iops_wr: 0,
            image: api::ImageInfo {
                filename: disk.path.clone(),
                format: "raw".to_string(),
                virtual_size: size,
                actual_size: None,
                dirty_flag: Some(false),
            },
            cache: api::BlockdevCacheInfo {
                writeback: true,
                direct: false,
                no_flush: false,
            },
            write_threshold: 0,
        }),
    }
}

/// A disk's counters as `query-blockstats` reports them.
fn block_stats(disk: &DiskInfo) -> api::BlockStats {
    let s = &disk.stats;
    api::BlockStats {
        device: Some(disk.name.clone()),
        qdev: Some(disk_qdev(disk)),
        node_name: None,
        stats: api::BlockDeviceStats {
            rd_bytes: qmp_int(s.rd_bytes),
            wr_bytes: qmp_int(s.wr_bytes),
            unmap_bytes: qmp_int(s.unmap_bytes),
            rd_operations: qmp_int(s.rd_operations),
            wr_operations: qmp_int(s.wr_operations),
            flush_operations: qmp_int(s.flush_operations),
            unmap_operations: qmp_int(s.unmap_operations),
            rd_total_time_ns: qmp_int(s.rd_total_time_ns),
            wr_total_time_ns: qmp_int(s.wr_total_time_ns),
            flush_total_time_ns: qmp_int(s.flush_total_time_ns),
            unmap_total_time_ns: 0,
            wr_highest_offset: 0,
            rd_merged: 0,
            wr_merged: 0,
            unmap_merged: 0,
            failed_rd_operations: qmp_int(s.failed_rd_operations),
            failed_wr_operations: qmp_int(s.failed_wr_operations),
            failed_flush_operations: qmp_int(s.failed_flush_operations),
            failed_unmap_operations: qmp_int(s.failed_unmap_operations),
            invalid_rd_operations: qmp_int(s.invalid_operations),
            invalid_wr_operations: 0,
            invalid_flush_operations: 0,
            invalid_unmap_operations: 0,
            account_invalid: true,
            account_failed: true,
            timed_stats: Vec::new(),
        },
    }
}

/// HMP `info block`, as QEMU prints a raw image on a non-removable device.
fn info_block(disks: &[DiskInfo]) -> String {
    disks
        .iter()
        .map(|d| {
            let ro = if d.read_only { ", read-only" } else { "" };
            format!(
                "{}: {} (raw{ro})\n    Attached to:      {}\n    Cache mode:       writeback\n",
                d.name,
                d.path,
                disk_qdev(d)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// HMP prints lines ending in `\n`; the monitor turns them into `\r\n`.
fn hmp_lines(text: &str) -> String {
    text.replace('\n', "\r\n")
}

impl InBandCommands for InBandHandler<'_> {
    fn oob(&self) -> &dyn OobCommands {
        self.oob
    }

    fn monitor_fds(&self) -> &MonitorFds {
        self.fds.monitor()
    }

    fn query_block(&mut self) -> Result<Vec<api::BlockInfo>, QmpError> {
        Ok(self.machine.disks().iter().map(block_info).collect())
    }

    fn query_blockstats(
        &mut self,
        _query_nodes: Option<bool>,
    ) -> Result<Vec<api::BlockStats>, QmpError> {
        Ok(self.machine.disks().iter().map(block_stats).collect())
    }

    fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        let state = self.machine.run_state;
        let status = api::RunState::from_wire(state.as_str())
            .ok_or_else(|| QmpError::generic(format!("unknown run state {state}")))?;
        Ok(StatusInfo {
            running: state.is_running(),
            status,
        })
    }

    fn query_cpus_fast(&mut self) -> Result<Vec<CpuInfoFast>, QmpError> {
        Ok((0..self.machine.vcpus.len())
            .map(|i| CpuInfoFast {
                cpu_index: i as i64,
                qom_path: format!("/machine/unattached/device[{i}]"),
                thread_id: i64::from(self.vm.kick(i).thread_id().unwrap_or(0)),
                props: Some(CpuInstanceProperties {
                    node_id: None,
                    drawer_id: None,
                    book_id: None,
                    socket_id: Some(0),
                    die_id: Some(0),
                    cluster_id: None,
                    module_id: None,
                    core_id: Some(i as i64),
                    thread_id: Some(0),
                }),
                target: SysEmuTarget::X86_64,
                s390x: None,
            })
            .collect())
    }

    fn query_uuid(&mut self) -> Result<UuidInfo, QmpError> {
        Ok(UuidInfo {
            uuid: "00000000-0000-0000-0000-000000000000".to_string(),
        })
    }

    fn system_reset(&mut self) -> Result<(), QmpError> {
        self.vm.request(
            &mut self.machine,
            VmAction::Reset {
                guest: false,
                reason: ShutdownCause::HostQmpSystemReset,
            },
        );
        Ok(())
    }

    fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.vm.request(&mut self.machine, VmAction::Powerdown);
        Ok(())
    }

    fn query_kvm(&mut self) -> Result<KvmInfo, QmpError> {
        Ok(KvmInfo {
            enabled: true,
            present: true,
        })
    }

    fn memsave(
        &mut self,
        val: u64,
        size: u64,
        filename: String,
        cpu_index: Option<i64>,
    ) -> Result<(), QmpError> {
        let index = self.check_cpu_index(cpu_index)?;
        let vm = self.vm;
        let machine = &mut self.machine;
        Self::save_to_file(&filename, size, |offset, buf| {
            // Translate page by page on the vCPU's thread, then read guest RAM here.
            let mut done = 0usize;
            while done < buf.len() {
                let virt = val.wrapping_add(offset).wrapping_add(done as u64);
                let in_page = (PAGE_SIZE - virt % PAGE_SIZE) as usize;
                let len = in_page.min(buf.len() - done);
                let translation = vm
                    .run_on_vcpu(machine, index, move |vcpu| vcpu.fd().translate_gva(virt))
                    .ok_or_else(|| QmpError::generic(format!("CPU {index} not found")))?;
                let phys = translation
                    .ok()
                    .filter(|t| t.valid != 0)
                    .map(|t| t.physical_address)
                    .ok_or_else(|| {
                        QmpError::generic(format!(
                            "Invalid addr 0x{virt:016x}/size {size} specified"
                        ))
                    })?;
                vm.memory()
                    .read_slice(&mut buf[done..done + len], GuestAddress(phys))
                    .map_err(|_| QmpError::generic(format!("Invalid addr 0x{virt:x} specified")))?;
                done += len;
            }
            Ok(())
        })
    }

    fn pmemsave(&mut self, val: u64, size: u64, filename: String) -> Result<(), QmpError> {
        let vm = self.vm;
        Self::save_to_file(&filename, size, |offset, buf| {
            let addr = val.wrapping_add(offset);
            vm.memory()
                .read_slice(buf, GuestAddress(addr))
                .map_err(|_| QmpError::generic(format!("Invalid addr 0x{addr:x} specified")))
        })
    }

    fn query_memory_size_summary(&mut self) -> Result<MemoryInfo, QmpError> {
        Ok(MemoryInfo {
            base_memory: self.vm.image().mem_size,
            plugged_memory: Some(0),
        })
    }

    fn query_name(&mut self) -> Result<NameInfo, QmpError> {
        Ok(NameInfo {
            name: self.vm.name().map(str::to_string),
        })
    }

    fn stop(&mut self) -> Result<(), QmpError> {
        self.vm.stop(&mut self.machine);
        Ok(())
    }

    fn cont(&mut self) -> Result<(), QmpError> {
        self.vm.cont(&mut self.machine).map_err(QmpError::generic)
    }

    fn human_monitor_command(
        &mut self,
        command_line: String,
        cpu_index: Option<i64>,
    ) -> Result<String, QmpError> {
        let words: Vec<&str> = command_line.split_whitespace().collect();
        let text = match words.as_slice() {
            [] => String::new(),
            ["info", "status"] => {
                let state = self.machine.run_state;
                match state {
                    RunState::Running => "VM status: running\n".to_string(),
                    RunState::Paused => "VM status: paused\n".to_string(),
                    other => format!("VM status: paused ({other})\n"),
                }
            }
            ["info", "registers"] => self.info_registers(cpu_index)?,
            ["info", "cpus"] => self.info_cpus(),
            ["info", "kvm"] => "kvm support: enabled\n".to_string(),
            ["info", "block"] => info_block(&self.machine.disks()),
            ["info", "name"] => self.vm.name().map(|n| format!("{n}\n")).unwrap_or_default(),
            ["info", "version"] => {
                let (major, minor, micro) = QEMU_VERSION;
                format!("{major}.{minor}.{micro} ({PACKAGE})\n")
            }
            ["info"] | ["info", _] => {
                "info status|registers|cpus|kvm|name|version|block\n".to_string()
            }
            [command, ..] => format!("unknown command: '{command}'\n"),
        };
        Ok(hmp_lines(&text))
    }

    fn query_version(&mut self) -> Result<VersionInfo, QmpError> {
        let (major, minor, micro) = QEMU_VERSION;
        Ok(VersionInfo {
            qemu: VersionTriple {
                major,
                minor,
                micro,
            },
            package: PACKAGE.to_string(),
        })
    }

    fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        Ok(self.vm.migration().info())
    }

    fn migrate_set_capabilities(
        &mut self,
        capabilities: Vec<MigrationCapabilityStatus>,
    ) -> Result<(), QmpError> {
        self.vm.migration().set_capabilities(&capabilities)
    }

    fn query_migrate_capabilities(&mut self) -> Result<Vec<MigrationCapabilityStatus>, QmpError> {
        Ok(self.vm.migration().capabilities())
    }

    fn query_migrate_parameters(&mut self) -> Result<MigrationParameters, QmpError> {
        Ok(self.vm.migration().query_parameters())
    }

    fn migrate_set_parameters(
        &mut self,
        max_bandwidth: Option<u64>,
        downtime_limit: Option<u64>,
        max_postcopy_bandwidth: Option<u64>,
    ) -> Result<(), QmpError> {
        self.vm
            .migration()
            .set_parameters(max_bandwidth, downtime_limit, max_postcopy_bandwidth)
    }

    fn migrate(
        &mut self,
        uri: String,
        _detach: Option<bool>,
        resume: Option<bool>,
    ) -> Result<(), QmpError> {
        let uri = MigrationUri::parse(&uri).map_err(|e| QmpError::generic(e.to_string()))?;
        if resume.unwrap_or(false) {
            self.vm.migration().check_resumable()?;
            fd_channel::attach(&uri, self.fds.monitor(), true)?;
            return self.vm.migration().request_resume(uri);
        }
        match self.machine.run_state {
            RunState::Running | RunState::Paused | RunState::Prelaunch | RunState::Postmigrate => {}
            RunState::Inmigrate => {
                return Err(QmpError::generic(
                    "Guest is waiting for an incoming migration",
                ))
            }
            other => {
                return Err(QmpError::generic(format!(
                    "The VM cannot be migrated while it is {other}"
                )))
            }
        }
        // The descriptor stays with the monitor if the migration cannot start at all.
        self.vm.migration().check_idle()?;
        fd_channel::attach(&uri, self.fds.monitor(), true)?;
        migration::source::start(self.vm.clone(), uri).map_err(QmpError::generic)
    }

    fn migrate_incoming(
        &mut self,
        uri: String,
        exit_on_error: Option<bool>,
    ) -> Result<(), QmpError> {
        let state = self.vm.migration();
        if self.machine.run_state != RunState::Inmigrate {
            return Err(QmpError::generic(
                "'-incoming' was not specified on the command line",
            ));
        }
        if state.role() == Role::Destination {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        let uri = MigrationUri::parse(&uri).map_err(|e| QmpError::generic(e.to_string()))?;
        fd_channel::attach(&uri, self.fds.monitor(), false)?;
        let listener = uri.listen().map_err(|e| QmpError::generic(e.to_string()))?;
        migration::dest::start(self.vm.clone(), listener, exit_on_error.unwrap_or(true))
            .map_err(QmpError::generic)
    }

    fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.vm.migration().cancel()
    }

    fn migrate_start_postcopy(&mut self) -> Result<(), QmpError> {
        self.vm.migration().start_postcopy()
    }

    fn getfd(&mut self, fdname: String) -> Result<(), QmpError> {
        self.fds.getfd(&fdname)
    }

    fn closefd(&mut self, fdname: String) -> Result<(), QmpError> {
        self.fds.monitor().closefd(&fdname)
    }

    fn quit(&mut self) -> Result<(), QmpError> {
        self.vm.request(
            &mut self.machine,
            VmAction::Shutdown {
                guest: false,
                reason: ShutdownCause::HostQmpQuit,
                code: 0,
            },
        );
        Ok(())
    }
}

/// The event-loop subscriber running queued in-band QMP commands, one per wake-up, with the
/// big lock held.
pub struct QmpDispatcher {
    vm: Arc<Vm>,
    server: QmpServer,
    oob: Arc<OobContext>,
}

impl QmpDispatcher {
    /// Serves `server`'s in-band queue against `vm`.
    pub fn new(vm: Arc<Vm>, server: QmpServer, oob: Arc<OobContext>) -> Self {
        QmpDispatcher { vm, server, oob }
    }
}

impl MutEventSubscriber for QmpDispatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let vm = &self.vm;
        let oob = &self.oob;
        self.server.run_next(&mut |name, arguments, fds| {
            let mut handler = InBandHandler::new(vm, oob, fds);
            api::dispatch_inband(&mut handler, name, arguments)
        });
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.server.request_event(), EventSet::IN)) {
            log::error!("cannot watch the QMP request queue: {e:?}");
        }
    }
}
