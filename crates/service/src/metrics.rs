//! The status as metrics for node_exporter's textfile collector: the Prometheus text format
//! (what the collector parses and `promtool check metrics` lints), written atomically so the
//! collector never reads half a file. See `docs/monitoring.md` for the alert rules.

use std::fmt::Write as _;
use std::path::Path;

use nasbak::BootResult;
use nasbak::nasbak_repo::BackupMode;

use crate::config::ConfigError;
use crate::status::{RpoState, StatusReport};

/// One metric family: its name, type and help, and its samples (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Family { name, kind, help, samples: Vec::new() }
    }

    fn add(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.samples.push((labels, value));
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The report as the Prometheus text format: per VM its last good backup (time, duration,
/// bytes, mode), RPO, chain, failures and boot verification; per repository its capacity and
/// whether it answered; and when the file was made.
pub fn render(report: &StatusReport) -> String {
    let seconds = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis() as f64 / 1000.0;
    let mut generated = Family::new(
        "nasbak_metrics_generated_timestamp_seconds",
        "gauge",
        "When nasbak wrote these metrics (alert when it is old: run-due has stopped).",
    );
    generated.add(Vec::new(), seconds(report.generated));
    let mut success = Family::new(
        "nasbak_vm_last_success_timestamp_seconds",
        "gauge",
        "When the VM's newest good backup began (the point in time it restores to).",
    );
    let mut duration =
        Family::new("nasbak_vm_last_success_duration_seconds", "gauge", "How long the VM's newest good backup took.");
    let mut bytes = Family::new(
        "nasbak_vm_last_success_written_bytes",
        "gauge",
        "The bytes the VM's newest good backup holds on the repository.",
    );
    let mut mode = Family::new(
        "nasbak_vm_last_success_mode",
        "gauge",
        "The mode of the VM's newest good backup: 1 for the mode it has, 0 for the other.",
    );
    let mut chain = Family::new(
        "nasbak_vm_chain_length",
        "gauge",
        "How many backups a restore of the VM's newest good backup reads (1: a full).",
    );
    let mut rpo = Family::new(
        "nasbak_vm_rpo_met",
        "gauge",
        "1 when the VM's newest good backup is as recent as its schedules ask.",
    );
    let mut scheduled = Family::new("nasbak_vm_scheduled", "gauge", "1 when the VM has a schedule (an RPO to meet).");
    let mut failures = Family::new(
        "nasbak_vm_failures_total",
        "counter",
        "The VM's scheduled runs that failed (backup or boot check).",
    );
    let mut consecutive = Family::new(
        "nasbak_vm_consecutive_failures",
        "gauge",
        "The VM's scheduled runs that failed since its last successful one.",
    );
    let mut last_failure =
        Family::new("nasbak_vm_last_failure_timestamp_seconds", "gauge", "When the VM's last failed run ended.");
    let mut boot = Family::new(
        "nasbak_vm_boot_verified",
        "gauge",
        "The VM's newest boot verification: 1 it booted, 0 it did not or could not be verified.",
    );
    let mut boot_time = Family::new(
        "nasbak_vm_boot_verified_timestamp_seconds",
        "gauge",
        "When the VM's newest boot verification ran.",
    );
    let mut known =
        Family::new("nasbak_vm_status_known", "gauge", "0 when the VM's backups could not be read (its repository).");
    let mut up = Family::new("nasbak_repository_up", "gauge", "1 when the repository could be reached and measured.");
    let mut size = Family::new("nasbak_repository_size_bytes", "gauge", "The size of the repository's file system.");
    let mut used = Family::new("nasbak_repository_used_bytes", "gauge", "The bytes in use on the repository.");
    let mut available = Family::new(
        "nasbak_repository_available_bytes",
        "gauge",
        "The bytes a backup may still write to the repository.",
    );
    for vm in &report.vms {
        let labels = || vec![("vm", vm.vm.clone()), ("repository", vm.repository.clone().unwrap_or_default())];
        known.add(labels(), if vm.error.is_none() { 1.0 } else { 0.0 });
        failures.add(labels(), vm.failures_total as f64);
        consecutive.add(labels(), f64::from(vm.consecutive_failures));
        if let Some(f) = &vm.last_failure {
            last_failure.add(labels(), seconds(f.at));
        }
        if vm.error.is_some() {
            continue;
        }
        scheduled.add(labels(), if vm.rpo.state == RpoState::Unscheduled { 0.0 } else { 1.0 });
        if vm.rpo.state != RpoState::Unscheduled {
            rpo.add(labels(), if vm.rpo.state == RpoState::Missed { 0.0 } else { 1.0 });
        }
        if let Some(n) = &vm.newest {
            success.add(labels(), seconds(n.started));
            duration.add(labels(), n.duration_seconds);
            bytes.add(labels(), n.bytes_written as f64);
            for (m, name) in [(BackupMode::Full, "full"), (BackupMode::Incremental, "incremental")] {
                let mut l = labels();
                l.push(("mode", name.to_owned()));
                mode.add(l, if n.mode == m { 1.0 } else { 0.0 });
            }
        }
        if let Some(c) = vm.chain_length {
            chain.add(labels(), f64::from(c));
        }
        if let Some(v) = &vm.boot_verified {
            boot.add(labels(), if v.result == BootResult::Passed { 1.0 } else { 0.0 });
            boot_time.add(labels(), seconds(v.at));
        }
    }
    for r in &report.repositories {
        let labels = || vec![("repository", r.repository.clone())];
        up.add(labels(), if r.capacity.is_some() { 1.0 } else { 0.0 });
        if let Some(c) = &r.capacity {
            size.add(labels(), c.total as f64);
            used.add(labels(), c.used as f64);
            available.add(labels(), c.available as f64);
        }
    }
    let mut out = String::new();
    for f in [
        generated,
        success,
        duration,
        bytes,
        mode,
        chain,
        rpo,
        scheduled,
        failures,
        consecutive,
        last_failure,
        boot,
        boot_time,
        known,
        up,
        size,
        used,
        available,
    ] {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in &f.samples {
            out.push_str(f.name);
            if !labels.is_empty() {
                let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
                let _ = write!(out, "{{{}}}", shown.join(","));
            }
            let _ = writeln!(out, " {value}");
        }
    }
    out
}

/// Writes the report's metrics to `path` atomically (a temporary file in its directory, then
/// a rename), readable by the collector (mode 0644).
pub fn write_textfile(path: &Path, report: &StatusReport) -> Result<(), ConfigError> {
    crate::config::write_atomically(path, render(report).as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{NewestBackup, RepositoryStatus, Rpo, VmStatus};

    fn report() -> StatusReport {
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
        let vm = |name: &str| VmStatus {
            vm: name.into(),
            offering: Some("gold".into()),
            repository: Some("nas \"1\"".into()),
            schedules: vec![format!("{name}-daily")],
            newest: None,
            rpo: Rpo { state: RpoState::Missed, required_since: Some(t("2026-03-10T02:00:00Z")), schedule: None },
            failures_total: 0,
            consecutive_failures: 0,
            last_failure: None,
            chain_length: None,
            boot_verified: None,
            error: None,
        };
        let mut good = vm("web1");
        good.newest = Some(NewestBackup {
            backup: "nas1:web1/x".into(),
            started: t("2026-03-10T02:00:05Z"),
            finished: t("2026-03-10T02:01:35.5Z"),
            age_seconds: 60,
            duration_seconds: 90.5,
            mode: BackupMode::Incremental,
            bytes_written: 3 << 20,
        });
        good.rpo.state = RpoState::Met;
        good.chain_length = Some(3);
        let mut broken = vm("db1");
        broken.failures_total = 4;
        broken.consecutive_failures = 2;
        broken.last_failure = Some(crate::config::Failure {
            at: t("2026-03-10T02:03:00Z"),
            schedule: "db1-daily".into(),
            reason: "x".into(),
        });
        let mut lost = vm("app1");
        lost.error = Some("repository nas2: unreachable".into());
        StatusReport {
            generated: t("2026-03-10T03:00:00Z"),
            vms: vec![good, broken, lost],
            repositories: vec![RepositoryStatus {
                repository: "nas \"1\"".into(),
                capacity: Some(nasbak::CapacityReport::new("nas1", 100, 40, 60)),
                error: None,
            }],
        }
    }

    #[test]
    fn the_metrics_parse_and_say_what_the_status_says() {
        let text = render(&report());
        let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_owned())).collect();
        let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let value = |name: &str, vm: Option<&str>| -> Option<f64> {
            scrape.samples.iter().find(|s| s.metric == name && vm.is_none_or(|v| s.labels.get("vm") == Some(v))).map(
                |s| match s.value {
                    prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                },
            )
        };
        assert_eq!(value("nasbak_vm_rpo_met", Some("web1")), Some(1.0));
        assert_eq!(value("nasbak_vm_rpo_met", Some("db1")), Some(0.0), "{text}");
        assert_eq!(value("nasbak_vm_last_success_duration_seconds", Some("web1")), Some(90.5));
        assert_eq!(value("nasbak_vm_last_success_written_bytes", Some("web1")), Some(f64::from(3 << 20)));
        assert_eq!(value("nasbak_vm_last_success_timestamp_seconds", Some("web1")), Some(1_773_108_005.0));
        assert_eq!(value("nasbak_vm_chain_length", Some("web1")), Some(3.0));
        assert_eq!(value("nasbak_vm_failures_total", Some("db1")), Some(4.0));
        assert_eq!(value("nasbak_vm_consecutive_failures", Some("db1")), Some(2.0));
        assert_eq!(value("nasbak_vm_status_known", Some("app1")), Some(0.0));
        assert_eq!(value("nasbak_vm_rpo_met", Some("app1")), None, "unknown is not reported as met or missed");
        assert_eq!(value("nasbak_repository_available_bytes", None), Some(60.0));
        let modes: Vec<(String, f64)> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "nasbak_vm_last_success_mode")
            .map(|s| (s.labels.get("mode").unwrap().to_owned(), value_of(&s.value)))
            .collect();
        assert_eq!(modes, [("full".to_owned(), 0.0), ("incremental".to_owned(), 1.0)]);
        // A quote in a label is escaped (the parser keeps the escape; promtool reads it in the
        // CLI's lab test); every family says its type.
        assert!(text.contains(r#"repository="nas \"1\"""#), "{text}");
        assert_eq!(scrape.docs.len(), 18, "{:?}", scrape.docs.keys());
    }

    fn value_of(v: &prometheus_parse::Value) -> f64 {
        match v {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            _ => f64::NAN,
        }
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("textfile/nasbak.prom");
        write_textfile(&path, &report()).unwrap();
        write_textfile(&path, &report()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), render(&report()));
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["nasbak.prom"], "no temporary file is left");
    }
}
