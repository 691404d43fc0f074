//! What the host looks like right now: the GPUs this agent uses, through NVML (none when
//! there is no NVIDIA driver), and CPU, memory and work-dir disk through sysinfo.

use std::path::{Path, PathBuf};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::{EventSet, Nvml};
use protocol::agent::{GpuTelemetry, HostTelemetry};
use sysinfo::{Disks, System};

use crate::gpu_choice::{self, HostGpu};

pub struct Probe {
    /// Lives as long as the agent: leaked so the XID event set can borrow it.
    nvml: Option<&'static Nvml>,
    /// NVML's indices of the GPUs this process's CUDA sees, in CUDA's order: the trainer
    /// trains on the first ([`gpu_choice::visible`]).
    visible: Vec<u32>,
    xid_events: Option<EventSet<'static>>,
    system: System,
    work_dir: PathBuf,
}

impl Probe {
    pub fn new(work_dir: &Path) -> Probe {
        let nvml: Option<&'static Nvml> = match Nvml::init() {
            Ok(nvml) => Some(Box::leak(Box::new(nvml))),
            Err(error) => {
                tracing::info!(%error, "no NVIDIA driver: reporting no GPUs");
                None
            }
        };
        let visible = nvml
            .map(|nvml| {
                let listed = std::env::var(gpu_choice::VISIBLE_DEVICES).ok();
                gpu_choice::visible(&host_gpus(nvml), listed.as_deref())
            })
            .unwrap_or_default();
        Probe {
            xid_events: nvml.and_then(|nvml| xid_event_set(nvml, &visible)),
            visible,
            nvml,
            system: System::new(),
            work_dir: work_dir.to_path_buf(),
        }
    }

    /// XID errors raised since the last call, by GPU uuid.
    fn drain_xid_errors(&self) -> Vec<(String, u64)> {
        let Some(events) = &self.xid_events else {
            return Vec::new();
        };
        let mut errors = Vec::new();
        // A zero timeout returns at once: Timeout when nothing is pending.
        while let Ok(event) = events.wait(0) {
            if let Some(XidError::Value(xid)) = event.event_data {
                errors.push((event.device.uuid().unwrap_or_default(), xid));
            }
        }
        errors
    }

    pub fn gpus(&self) -> Vec<GpuTelemetry> {
        let Some(nvml) = self.nvml else {
            return Vec::new();
        };
        let xid_errors = self.drain_xid_errors();
        self.visible
            .iter()
            .filter_map(|&index| {
                let device = nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok()?;
                let uuid = device.uuid().unwrap_or_default();
                Some(GpuTelemetry {
                    index,
                    name: device.name().unwrap_or_default(),
                    xid_errors: xid_errors
                        .iter()
                        .filter(|(gpu, _)| *gpu == uuid)
                        .map(|(_, xid)| *xid)
                        .collect(),
                    uuid,
                    utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                    memory_used_mb: memory.used / (1 << 20),
                    memory_total_mb: memory.total / (1 << 20),
                    temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
                    power_w: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                    sm_clock_mhz: device.clock_info(Clock::SM).ok(),
                })
            })
            .collect()
    }

    pub fn host(&mut self) -> HostTelemetry {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let disks = Disks::new_with_refreshed_list();
        let work_dir = std::fs::canonicalize(&self.work_dir).unwrap_or(self.work_dir.clone());
        // The disk whose mount point is the longest prefix of the work dir holds it.
        let disk_free = disks
            .list()
            .iter()
            .filter(|d| work_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map(|d| d.available_space())
            .unwrap_or(0);
        HostTelemetry {
            cpu_percent: f64::from(self.system.global_cpu_usage()),
            cpu_count: self.system.cpus().len(),
            memory_used_mb: self.system.used_memory() / (1 << 20),
            memory_total_mb: self.system.total_memory() / (1 << 20),
            disk_free_mb: disk_free / (1 << 20),
        }
    }

    /// Whether this agent has a GPU to use.
    pub fn uses_gpus(&self) -> bool {
        !self.visible.is_empty()
    }

    /// The GPUs the NVIDIA driver lists, `None` without a driver.
    pub fn host_gpu_count(&self) -> Option<u32> {
        self.nvml.map(|nvml| nvml.device_count().unwrap_or(0))
    }
}

/// Every GPU of the host, by NVML index.
fn host_gpus(nvml: &Nvml) -> Vec<HostGpu> {
    (0..nvml.device_count().unwrap_or(0))
        .filter_map(|index| {
            let uuid = nvml.device_by_index(index).ok()?.uuid().ok()?;
            Some(HostGpu { index, uuid })
        })
        .collect()
}

/// An event set that collects critical XID errors of the GPUs this agent uses (where the
/// driver supports it).
fn xid_event_set(nvml: &'static Nvml, visible: &[u32]) -> Option<EventSet<'static>> {
    let mut set = nvml.create_event_set().ok()?;
    for &index in visible {
        let device = nvml.device_by_index(index).ok()?;
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => set,
            Err(error) => {
                tracing::info!(error = %error.error, "XID events unavailable");
                return None;
            }
        };
    }
    Some(set)
}

/// Resident memory of this process in GiB (the trainer runs in-process), for CPU runs.
pub fn process_memory_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}
