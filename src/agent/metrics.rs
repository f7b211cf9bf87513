//! System metrics for heartbeats, through sysinfo: CPU, memory, the state directory's disk, uptime, load, and the
//! hottest temperature sensor where the board has one (a Pi reports its SoC through thermal_zone0).

use std::path::{Path, PathBuf};

use sysinfo::{Components, CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

use crate::fleet::Metrics;

/// The metrics source of the agent; `Sampler::sample` is called once per heartbeat.
pub trait Sampler: Send {
    fn sample(&mut self) -> Metrics;
}

/// The live machine. The CPU figure is the usage since the previous sample, so the first one reads 0.
pub struct SystemSampler {
    system: System,
    state_dir: PathBuf,
}

impl SystemSampler {
    pub fn new(state_dir: &Path) -> SystemSampler {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        SystemSampler {
            system,
            state_dir: state_dir.to_path_buf(),
        }
    }
}

impl Sampler for SystemSampler {
    fn sample(&mut self) -> Metrics {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let load = System::load_average();
        // The disk holding the state directory: the longest mount point that is a prefix of it.
        let disks = Disks::new_with_refreshed_list();
        let disk = disks
            .list()
            .iter()
            .filter(|d| self.state_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len());
        let components = Components::new_with_refreshed_list();
        let temperature = components
            .list()
            .iter()
            .filter_map(|c| c.temperature())
            .filter(|t| t.is_finite())
            .fold(None, |m: Option<f32>, t| Some(m.map_or(t, |m| m.max(t))));
        Metrics {
            cpu_percent: Some(self.system.global_cpu_usage()),
            memory_used: Some(self.system.used_memory()),
            memory_total: Some(self.system.total_memory()),
            disk_used: disk.map(|d| d.total_space().saturating_sub(d.available_space())),
            disk_total: disk.map(|d| d.total_space()),
            uptime: Some(System::uptime()),
            load: Some([load.one, load.five, load.fifteen]),
            temperature_celsius: temperature,
            // The agent fills these in: the sampler does not see its database.
            dead_letters: None,
            outbox_pending: None,
            outbox_oldest_age_secs: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_machine_reports_memory_uptime_and_its_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SystemSampler::new(dir.path());
        let m = s.sample();
        assert!(m.memory_total.unwrap() > 0 && m.memory_used.unwrap() <= m.memory_total.unwrap());
        assert!(m.uptime.unwrap() > 0);
        assert!(m.disk_total.unwrap_or(0) > 0, "{m:?}");
    }
}
