//! The standard Prometheus process metrics (`process_cpu_seconds_total`, memory, file
//! descriptors, threads, start time), read from `/proc/self` at scrape time.
//!
//! The `prometheus` crate has a collector for these, but it counts CPU in whole seconds (an
//! integer counter), which makes a CPU panel or a rate over a minute useless for a gateway
//! that uses a fraction of a core. This one keeps the kernel's tick resolution (10 ms).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, IntGauge, Opts};

/// Process metrics of the calling process (Linux; on other systems a scrape shows none).
#[derive(Debug)]
pub struct ProcessCollector {
    descs: Vec<Desc>,
    cpu: Counter,
    open_fds: IntGauge,
    max_fds: IntGauge,
    virtual_memory: IntGauge,
    resident_memory: IntGauge,
    start_time: Gauge,
    threads: IntGauge,
}

impl ProcessCollector {
    /// A collector for this process.
    pub fn new() -> Self {
        let gauge = |name: &str, help: &str| IntGauge::with_opts(Opts::new(name, help)).unwrap();
        let cpu = Counter::with_opts(Opts::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        ))
        .unwrap();
        let start_time = Gauge::with_opts(Opts::new(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
        ))
        .unwrap();
        if let (Ok(boot), Ok(stat)) = (
            procfs::boot_time_secs(),
            procfs::process::Process::myself().and_then(|p| p.stat()),
        ) {
            start_time.set(boot as f64 + stat.starttime as f64 / ticks());
        }
        let open_fds = gauge("process_open_fds", "Number of open file descriptors.");
        let max_fds = gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
        );
        let virtual_memory = gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        );
        let resident_memory = gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        );
        let threads = gauge("process_threads", "Number of OS threads in the process.");
        let descs = [
            cpu.desc(),
            open_fds.desc(),
            max_fds.desc(),
            virtual_memory.desc(),
            resident_memory.desc(),
            start_time.desc(),
            threads.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Self {
            descs,
            cpu,
            open_fds,
            max_fds,
            virtual_memory,
            resident_memory,
            start_time,
            threads,
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

fn ticks() -> f64 {
    procfs::ticks_per_second() as f64
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(p) = procfs::process::Process::myself() else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(7);
        if let Ok(stat) = p.stat() {
            let cpu = (stat.utime + stat.stime) as f64 / ticks();
            // A counter only goes up: add what was used since the last scrape (two scrapes at
            // once may both see the same total; the later one then adds nothing).
            let delta = cpu - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            self.virtual_memory.set(stat.vsize as i64);
            self.resident_memory
                .set((stat.rss * procfs::page_size()) as i64);
            self.threads.set(stat.num_threads);
            out.extend(self.cpu.collect());
            out.extend(self.virtual_memory.collect());
            out.extend(self.resident_memory.collect());
            out.extend(self.threads.collect());
        }
        if let Ok(n) = p.fd_count() {
            self.open_fds.set(n as i64);
            out.extend(self.open_fds.collect());
        }
        if let Ok(limits) = p.limits()
            && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
        {
            self.max_fds.set(max as i64);
            out.extend(self.max_fds.collect());
        }
        out.extend(self.start_time.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn value(c: &ProcessCollector, name: &str) -> f64 {
        let mf = c
            .collect()
            .into_iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let m = &mf.get_metric()[0];
        match mf.get_field_type() {
            prometheus::proto::MetricType::COUNTER => m.get_counter().value(),
            _ => m.get_gauge().value(),
        }
    }

    #[test]
    fn cpu_seconds_keep_sub_second_resolution() {
        let c = ProcessCollector::new();
        let before = value(&c, "process_cpu_seconds_total");
        // Burn CPU until the counter first moves: by a tick or two here, by a whole second
        // with a whole-second counter.
        let start = Instant::now();
        let mut used = 0.0;
        let mut x = 0u64;
        while start.elapsed() < Duration::from_secs(5) {
            let slice = Instant::now();
            while slice.elapsed() < Duration::from_millis(5) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            used = value(&c, "process_cpu_seconds_total") - before;
            if used > 0.0 {
                break;
            }
        }
        assert!(
            used > 0.0 && used < 0.5,
            "first step of the counter: {used} s"
        );
    }

    #[test]
    fn memory_fds_and_start_time_are_this_process() {
        let c = ProcessCollector::new();
        let rss = value(&c, "process_resident_memory_bytes");
        assert!(rss > 1e5 && rss < 1e10, "rss {rss}");
        assert!(value(&c, "process_virtual_memory_bytes") >= rss);
        assert!(value(&c, "process_open_fds") >= 3.0);
        assert!(value(&c, "process_max_fds") >= value(&c, "process_open_fds"));
        assert!(value(&c, "process_threads") >= 1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let age = now - value(&c, "process_start_time_seconds");
        assert!((0.0..3600.0).contains(&age), "age {age}");
    }
}
