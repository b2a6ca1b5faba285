//! The metrics exposition formats both `/metrics` endpoints (the sidecar's and the control
//! plane's) serve: OpenMetrics when the scraper's `Accept` header asks for it, else the
//! Prometheus text format 0.0.4 (what `promtool check metrics` and older scrapers read), each
//! with its own `Content-Type`.

/// The exposition formats `/metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text,
}

impl Format {
    /// What the `Accept` header asks for: OpenMetrics when it names it (with a non-zero
    /// quality), else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let wants_om = accept.into_iter().flat_map(|a| a.split(',')).any(|part| {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or_default();
            let zero = params.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !zero
        });
        if wants_om {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    /// The `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Rewrites OpenMetrics text as the Prometheus text format 0.0.4: a counter's `# HELP` and
/// `# TYPE` name its `_total` samples (OpenMetrics names the family without the suffix, and a
/// 0.0.4 parser would see untyped samples with no help), `unknown` is `untyped`, and `# UNIT`,
/// `_created` samples and `# EOF` have no 0.0.4 form.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let renamed = |name: &str| {
        if counters.contains(name) {
            format!("{name}_total")
        } else {
            name.to_owned()
        }
    };
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            let kind = match kind {
                "unknown" => "untyped",
                "info" | "stateset" => "gauge",
                k => k,
            };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed(name)));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ")
            && let Some((name, help)) = rest.split_once(' ')
        {
            out.push_str(&format!("# HELP {} {help}\n", renamed(name)));
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or_default();
        if sample
            .strip_suffix("_created")
            .is_some_and(|base| counters.contains(base))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`: 100 in the Linux ABI on
/// every architecture we build for).
const USER_HZ: f64 = 100.0;

/// `mayfly_build_info{version,git}` (1) and the standard process metrics read from `/proc`
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`,
/// `process_start_time_seconds`), as OpenMetrics lines (no `# EOF`). A value `/proc` does
/// not give (another OS, a restricted mount) is left out, never guessed.
pub fn runtime_metrics(version: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let git = option_env!("MAYFLY_GIT_COMMIT")
        .map(|g| format!(",git=\"{g}\""))
        .unwrap_or_default();
    let _ = write!(
        out,
        "# HELP mayfly_build_info The running build: version (and git commit when known), value 1\n\
         # TYPE mayfly_build_info gauge\nmayfly_build_info{{version=\"{version}\"{git}}} 1\n"
    );
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name (which may hold spaces, hence the last `)`), from field 3.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let _ = write!(
            out,
            "# HELP process_cpu_seconds Total user and system CPU time spent in seconds\n\
             # TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total {}\n",
            (utime + stime) as f64 / USER_HZ
        );
    }
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
    if let Some(kb) = rss_kb {
        let _ = write!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n",
            kb * 1024
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let _ = write!(
            out,
            "# HELP process_open_fds Number of open file descriptors\n\
             # TYPE process_open_fds gauge\nprocess_open_fds {}\n",
            dir.count()
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        let _ = write!(
            out,
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds\n\
             # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}\n",
            boot as f64 + start as f64 / USER_HZ
        );
    }
    out
}

/// Adds `extra` (OpenMetrics lines) to an OpenMetrics exposition, before its `# EOF`.
pub fn append_metrics(om: &mut String, extra: &str) {
    let eof = om.strip_suffix("# EOF\n").map(str::len);
    match eof {
        Some(at) => om.insert_str(at, extra),
        None => om.push_str(extra),
    }
}

#[cfg(test)]
mod runtime_tests {
    #[test]
    fn runtime_metrics_are_read_from_proc_and_go_before_eof() {
        let extra = super::runtime_metrics("1.2.3");
        assert!(
            extra.contains("mayfly_build_info{version=\"1.2.3\""),
            "{extra}"
        );
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            let line = extra.lines().find(|l| l.starts_with(name));
            let value: f64 = line.unwrap().split(' ').nth(1).unwrap().parse().unwrap();
            assert!(value > 0.0, "{name}{value}");
        }
        let mut om = "# TYPE a gauge\na 1\n# EOF\n".to_owned();
        super::append_metrics(&mut om, &extra);
        assert!(
            om.ends_with("# EOF\n")
                && om.starts_with("# TYPE a gauge\na 1\n# HELP mayfly_build_info")
        );
    }
}
