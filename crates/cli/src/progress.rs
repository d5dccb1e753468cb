//! Progress for operators: a bar with bytes, rate and ETA on a terminal, a line every 10 % when
//! stderr is a file or a pipe (logs, systemd's journal), JSON lines with `--json`.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nasbak::Progress;
use serde::Serialize;

/// One `--json` progress line: the library's [`Progress`] with the operation and the percent.
#[derive(Serialize)]
struct Line<'a> {
    operation: &'a str,
    #[serde(flatten)]
    progress: &'a Progress,
    percent: f64,
}

/// Turns [`Progress`] updates into what the operator sees.
pub struct Reporter {
    json: bool,
    label: String,
    bar: Option<ProgressBar>,
    disk: Option<String>,
    last_decile: i64,
    started: Instant,
}

impl Reporter {
    /// A reporter for one operation called `label`.
    pub fn new(json: bool, label: &str) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_owned());
            bar
        });
        Reporter { json, label: label.to_owned(), bar, disk: None, last_decile: -1, started: Instant::now() }
    }

    /// A reporter for one of several operations running at once: on a terminal, its bar is one
    /// line of `group`'s.
    pub fn in_group(group: &MultiProgress, json: bool, label: &str) -> Self {
        let mut r = Reporter::new(json, label);
        r.bar = r.bar.take().map(|bar| group.add(bar));
        r
    }

    /// One update.
    pub fn update(&mut self, p: &Progress) {
        let (processed, total, disk) = (p.done, p.total, p.disk.clone());
        if disk != self.disk {
            self.last_decile = -1;
            self.disk.clone_from(&disk);
            if let (Some(bar), Some(d)) = (&self.bar, &disk) {
                bar.reset();
                bar.set_message(format!("{} {d}", self.label));
            }
        }
        if self.json {
            let line = Line { operation: &self.label, progress: p, percent: (p.percent() * 10.0).round() / 10.0 };
            eprintln!("{}", serde_json::to_string(&line).unwrap_or_default());
            return;
        }
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(processed);
            return;
        }
        // Not a terminal: one line per 10 %, with the rate so far.
        let decile = (processed.saturating_mul(10)).checked_div(total).unwrap_or(0) as i64;
        if decile > self.last_decile {
            self.last_decile = decile;
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let what = self.disk.as_ref().map_or_else(|| self.label.clone(), |d| format!("{} {d}", self.label));
            eprintln!(
                "{what}: {:3}%  {} / {} MiB  {:.1} MiB/s",
                decile * 10,
                processed >> 20,
                total >> 20,
                processed as f64 / secs / (1 << 20) as f64
            );
        }
    }

    /// Clears the bar.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
