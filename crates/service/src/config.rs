//! The configuration file (`/etc/nasbak/nasbak.toml`): repositories, offerings, VM assignments
//! and schedules, validated on load (errors name the file and line), written atomically.
//!
//! ```toml
//! [[repository]]
//! name = "nas1"
//! type = "nfs"
//! address = "nas1.example:/exports/backup"
//!
//! [[offering]]            # ties VMs to a repository, with defaults
//! name = "gold"
//! repository = "nas1"
//! quiesce = "best-effort"
//! keep = "last=3,daily=7,weekly=4"
//!
//! [assignments]           # VM = offering
//! web1 = "gold"
//!
//! [[schedule]]
//! id = "web1-daily"
//! vm = "web1"
//! every = "daily"
//! at = "02:30"
//! tz = "Europe/Berlin"
//! keep = 7
//! quiesce = "required"
//! created = "2026-11-27T12:00:00Z"
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_repo;
use nasbak_repo::{BackupRepository, Compression, Encryption, ObjectTarget, ParseError, Protection, RetentionPolicy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::schedule::{At, Every, parse_tz};

/// Where the configuration is unless `--config` or `NASBAK_CONFIG` says otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/nasbak/nasbak.toml";

/// Where run-due keeps when each schedule last ran, unless `--state` or `NASBAK_STATE` says otherwise.
pub const DEFAULT_STATE: &str = "/var/lib/nasbak/state.json";

/// Serializes a `Display + FromStr` type as its text.
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: serde::Deserializer<'de>,
    {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Serializes an optional retention policy as its text (`last=3,daily=7`).
mod keep_text {
    use nasbak::nasbak_repo::RetentionPolicy;

    pub fn serialize<S: serde::Serializer>(v: &Option<RetentionPolicy>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(p) => s.collect_str(p),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<RetentionPolicy>, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

/// An offering: how the VMs assigned to it are backed up (the reference system's "backup
/// offering": one repository in a zone, a default quiesce policy, a retention).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offering {
    /// Its name.
    pub name: String,
    /// The repository its backups go to.
    pub repository: String,
    /// The zone (must be the repository's zone when both are set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The default quiesce policy of its backups.
    #[serde(default, with = "as_text")]
    pub quiesce: QuiescePolicy,
    /// The retention `nasbak prune` applies to its VMs' backups (none: keep everything).
    #[serde(default, with = "keep_text", skip_serializing_if = "Option::is_none")]
    pub keep: Option<RetentionPolicy>,
    /// The longest chain (a full and its incrementals) an `auto` backup builds before it takes a
    /// full again (none: [`nasbak::chain::DEFAULT_FULL_EVERY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_every: Option<u32>,
    /// Boot-verify each scheduled backup right after it is made (`run-due`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot_verify: bool,
    /// The command a boot verification runs in the guest (`/bin/sh -c`), which must exit 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_check: Option<String>,
    /// Overrides the repository's compression for this offering's backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Overrides the repository's encryption for this offering's backups. The key stays the
    /// repository's: restore, verify, `key rotate` and `key check` find every backup's key on its
    /// repository, so an offering cannot encrypt on a repository that has no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// The off-site target (`[[target]]`) each of its backups is copied to right after it is
    /// made (`run-due`, and `nasbak backup` with the offering); `prune --target` applies its
    /// retention there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_to: Option<String>,
}

impl Offering {
    /// The protection of this offering's backups on `repository` (its own, the offering's
    /// overrides applied).
    pub fn protection_on(&self, repository: &BackupRepository) -> Result<Protection, ParseError> {
        let own = repository.protection();
        let encryption = self.encryption.unwrap_or(own.encryption());
        let key = (encryption == Encryption::Luks).then(|| own.key().cloned()).flatten();
        Protection::new(self.compression.unwrap_or(own.compression()), encryption, key)
    }
}

/// A backup schedule of one VM (the VM's offering names the repository).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Its id (`<vm>-<every>`, with `-N` when taken).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The interval.
    pub every: Every,
    /// When in the interval (see [`crate::schedule::AT_FORMS`]).
    pub at: String,
    /// The time zone of `at`.
    #[serde(default = "utc_name")]
    pub tz: String,
    /// Keep at most this many backups made by this schedule (0: no limit).
    pub keep: u32,
    /// The quiesce policy.
    #[serde(default, with = "as_text")]
    pub quiesce: QuiescePolicy,
    /// When it was added: occurrences before that never run.
    pub created: DateTime<Utc>,
}

fn utc_name() -> String {
    "UTC".to_owned()
}

impl Schedule {
    /// The parsed `at` (validated on load, so this only fails for hand-built values).
    pub fn at(&self) -> Result<At, String> {
        At::parse(self.every, &self.at)
    }

    /// Whether it is due at `now`, given when it last ran.
    pub fn is_due(&self, last_run: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Result<bool, String> {
        Ok(crate::schedule::is_due(&self.at()?, parse_tz(&self.tz)?, self.created, last_run, now))
    }
}

/// The configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Config {
    /// How many scheduled backups `run-due` runs at once on this host (`max_parallel` at the
    /// top of the file); none: two per core of the host.
    #[serde(default)]
    pub max_parallel: Option<u32>,
    /// Where `run-due` writes the metrics for node_exporter's textfile collector
    /// (`metrics_textfile` at the top of the file); none: it writes none.
    #[serde(default)]
    pub metrics_textfile: Option<PathBuf>,
    /// Local scratch storage for the push jobs of running VMs (`scratch_dir` and
    /// `scratch_limit` at the top of the file): guest writes then never wait on the repository.
    /// None: the jobs write to the repository directly.
    #[serde(skip)]
    pub scratch: Option<nasbak::Scratch>,
    /// The backup repositories.
    #[serde(default, rename = "repository")]
    pub repositories: Vec<BackupRepository>,
    /// The off-site targets (`[[target]]`, `type = "s3"`).
    #[serde(default, rename = "target", skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<ObjectTarget>,
    /// How many scheduled backups `run-due` runs at once on each repository (`max_parallel`
    /// in its `[[repository]]`), by repository name; a repository not here has no limit of its
    /// own.
    #[serde(skip)]
    pub repository_max_parallel: BTreeMap<String, u32>,
    /// The offerings.
    #[serde(default, rename = "offering", skip_serializing_if = "Vec::is_empty")]
    pub offerings: Vec<Offering>,
    /// VM name to offering name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub assignments: BTreeMap<String, String>,
    /// The schedules.
    #[serde(default, rename = "schedule", skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
}

/// The file as read, each item with its place in the text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    max_parallel: Option<toml::Spanned<i64>>,
    #[serde(default)]
    metrics_textfile: Option<toml::Spanned<String>>,
    #[serde(default)]
    scratch_dir: Option<toml::Spanned<String>>,
    #[serde(default)]
    scratch_limit: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    repository: Vec<toml::Spanned<toml::Table>>,
    #[serde(default)]
    target: Vec<toml::Spanned<toml::Table>>,
    #[serde(default)]
    offering: Vec<toml::Spanned<toml::Table>>,
    #[serde(default)]
    assignments: Option<toml::Spanned<BTreeMap<String, toml::Spanned<String>>>>,
    #[serde(default)]
    schedule: Vec<toml::Spanned<toml::Table>>,
}

/// The configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Invalid content.
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line (1-based) of the problem.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// File access.
    #[error("{action} {path} failed")]
    Io {
        /// What.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A change the configuration refuses (a dangling reference, a duplicate name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Config {
    /// Reads and validates `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => return Err(ConfigError::Io { action: "reading", path: path.to_owned(), source }),
        };
        Config::parse(&text, path)
    }

    /// Parses configuration text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let invalid = |line: usize, message: String| ConfigError::Invalid { path: path.to_owned(), line, message };
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| invalid(e.span().map_or(1, |s| line_of(s.start)), e.message().to_owned()))?;
        fn items<T: DeserializeOwned>(
            tables: Vec<toml::Spanned<toml::Table>>,
            line_of: &dyn Fn(usize) -> usize,
            invalid: &dyn Fn(usize, String) -> ConfigError,
        ) -> Result<Vec<(T, usize)>, ConfigError> {
            tables
                .into_iter()
                .map(|t| {
                    let line = line_of(t.span().start);
                    toml::Value::Table(t.into_inner())
                        .try_into()
                        .map(|v| (v, line))
                        .map_err(|e: toml::de::Error| invalid(line, e.message().to_owned()))
                })
                .collect()
        }
        // A repository's `max_parallel` is the service's, not the repository's own setting.
        let mut limits = Vec::new();
        let mut tables = Vec::new();
        for mut t in raw.repository {
            let line = line_of(t.span().start);
            if let Some(v) = t.get_mut().remove("max_parallel") {
                limits.push((
                    tables.len(),
                    parallel_limit(v.as_integer(), &v.to_string()).map_err(|e| invalid(line, e))?,
                ));
            }
            tables.push(t);
        }
        let repositories: Vec<(BackupRepository, usize)> = items(tables, &line_of, &invalid)?;
        let max_parallel = match raw.max_parallel {
            Some(v) => Some(
                parallel_limit(Some(*v.get_ref()), &v.get_ref().to_string())
                    .map_err(|e| invalid(line_of(v.span().start), e))?,
            ),
            None => None,
        };
        let metrics_textfile = match raw.metrics_textfile {
            Some(v) if !v.get_ref().starts_with('/') || v.get_ref().ends_with('/') => {
                return Err(invalid(
                    line_of(v.span().start),
                    format!(
                        "metrics_textfile = {:?}: expected the absolute path of a file, such as \
                         /var/lib/prometheus/node-exporter/nasbak.prom",
                        v.get_ref()
                    ),
                ));
            }
            Some(v) => Some(PathBuf::from(v.into_inner())),
            None => None,
        };
        let scratch_limit = match raw.scratch_limit {
            Some(v) => {
                let line = line_of(v.span().start);
                Some(
                    parse_size(v.get_ref())
                        .map_err(|e| invalid(line, format!("scratch_limit = {}: {e}", v.get_ref())))?,
                )
            }
            None => None,
        };
        let scratch = match (raw.scratch_dir, scratch_limit) {
            (Some(d), limit) if d.get_ref().starts_with('/') => {
                Some(nasbak::Scratch::new(d.into_inner(), limit.unwrap_or(u64::MAX)))
            }
            (Some(d), _) => {
                return Err(invalid(
                    line_of(d.span().start),
                    format!(
                        "scratch_dir = {:?}: expected an absolute directory, such as /var/lib/nasbak/scratch",
                        d.get_ref()
                    ),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(1, "scratch_limit without scratch_dir: say where the scratch directory is".into()));
            }
            (None, None) => None,
        };
        // A target's `type` says which kind of store it is: `s3`, the only one.
        let mut target_tables = Vec::new();
        for mut t in raw.target {
            let line = line_of(t.span().start);
            match t.get_mut().remove("type") {
                Some(toml::Value::String(kind)) if kind == "s3" => {}
                None => {}
                Some(other) => {
                    return Err(invalid(
                        line,
                        format!("target type = {other}: expected \"s3\" (an S3-compatible object store)"),
                    ));
                }
            }
            target_tables.push(t);
        }
        let targets: Vec<(ObjectTarget, usize)> = items(target_tables, &line_of, &invalid)?;
        let offerings: Vec<(Offering, usize)> = items(raw.offering, &line_of, &invalid)?;
        let schedules: Vec<(Schedule, usize)> = items(raw.schedule, &line_of, &invalid)?;
        let assignments: Vec<(String, String, usize)> = raw
            .assignments
            .map(|a| {
                a.into_inner().into_iter().map(|(vm, o)| (vm, o.get_ref().clone(), line_of(o.span().start))).collect()
            })
            .unwrap_or_default();
        let mut config = Config {
            max_parallel,
            metrics_textfile,
            scratch,
            repository_max_parallel: limits
                .into_iter()
                .map(|(i, n)| (repositories[i].0.name().to_string(), n))
                .collect(),
            repositories: repositories.iter().map(|(r, _)| r.clone()).collect(),
            targets: targets.iter().map(|(t, _)| t.clone()).collect(),
            offerings: offerings.iter().map(|(o, _)| o.clone()).collect(),
            assignments: assignments.iter().map(|(vm, o, _)| (vm.clone(), o.clone())).collect(),
            schedules: Vec::new(),
        };
        let mut seen = HashSet::new();
        for (r, line) in &repositories {
            if !seen.insert(r.name().as_str()) {
                return Err(invalid(*line, format!("repository {} is defined twice", r.name())));
            }
        }
        let mut seen = HashSet::new();
        for (t, line) in &targets {
            if !seen.insert(t.name().as_str()) {
                return Err(invalid(*line, format!("target {} is defined twice", t.name())));
            }
        }
        let mut seen = HashSet::new();
        for (o, line) in &offerings {
            if !seen.insert(o.name.as_str()) {
                return Err(invalid(*line, format!("offering {} is defined twice", o.name)));
            }
            config.check_offering(o).map_err(|e| invalid(*line, e.0))?;
        }
        for (vm, offering, line) in &assignments {
            config.check_assignment(vm, offering).map_err(|e| invalid(*line, e.0))?;
        }
        for (s, line) in schedules {
            config.add_schedule(s).map_err(|e| invalid(line, e.0))?;
        }
        Ok(config)
    }

    /// The repository named `name`.
    pub fn repository(&self, name: &str) -> Option<&BackupRepository> {
        self.repositories.iter().find(|r| r.name().as_str() == name)
    }

    /// The off-site target named `name`.
    pub fn target(&self, name: &str) -> Option<&ObjectTarget> {
        self.targets.iter().find(|t| t.name().as_str() == name)
    }

    /// Adds an off-site target (its name not taken). Checking it against its store is the
    /// caller's (`nasbak target add` does before it saves).
    pub fn add_target(&mut self, t: ObjectTarget) -> Result<(), Refused> {
        if self.target(t.name().as_str()).is_some() {
            return Err(Refused(format!("a target named {} exists already; remove it first", t.name())));
        }
        self.targets.push(t);
        Ok(())
    }

    /// Removes a target no offering copies to. What was copied there stays there.
    pub fn remove_target(&mut self, name: &str) -> Result<(), Refused> {
        if self.target(name).is_none() {
            return Err(Refused(format!("there is no target named {name}")));
        }
        if let Some(o) = self.offerings.iter().find(|o| o.copy_to.as_deref() == Some(name)) {
            return Err(Refused(format!("offering {} copies to target {name}; change its copy_to first", o.name)));
        }
        self.targets.retain(|t| t.name().as_str() != name);
        Ok(())
    }

    /// The offering named `name`.
    pub fn offering(&self, name: &str) -> Option<&Offering> {
        self.offerings.iter().find(|o| o.name == name)
    }

    /// The offering `vm` is assigned to.
    pub fn offering_of(&self, vm: &str) -> Option<&Offering> {
        self.assignments.get(vm).and_then(|o| self.offering(o))
    }

    fn check_offering(&self, o: &Offering) -> Result<(), Refused> {
        nasbak_repo::RepositoryName::new(&o.name).map_err(|e| Refused(e.to_string()))?;
        let repo = self.repository(&o.repository).ok_or_else(|| {
            Refused(format!("offering {} names repository {}, which is not defined", o.name, o.repository))
        })?;
        o.protection_on(repo).map_err(|e| {
            Refused(format!(
                "offering {} cannot encrypt on repository {}, which has no key: {e} (set the key on the repository)",
                o.name, o.repository
            ))
        })?;
        if let Some(t) = o.copy_to.as_deref()
            && self.target(t).is_none()
        {
            return Err(Refused(format!("offering {} copies to target {t}, which is not defined", o.name)));
        }
        if let (Some(oz), Some(rz)) = (o.zone.as_deref(), repo.zone())
            && oz != rz
        {
            return Err(Refused(format!(
                "offering {} is in zone {oz} but repository {} is in zone {rz}; an offering's backups stay in its zone",
                o.name, o.repository
            )));
        }
        Ok(())
    }

    fn check_assignment(&self, vm: &str, offering: &str) -> Result<(), Refused> {
        nasbak_repo::VmName::new(vm).map_err(|e| Refused(e.to_string()))?;
        if self.offering(offering).is_none() {
            return Err(Refused(format!("{vm} is assigned to offering {offering}, which is not defined")));
        }
        Ok(())
    }

    /// Adds an offering after checking its repository exists (and shares its zone).
    pub fn add_offering(&mut self, o: Offering) -> Result<(), Refused> {
        if self.offering(&o.name).is_some() {
            return Err(Refused(format!("an offering named {} exists already; remove it first", o.name)));
        }
        self.check_offering(&o)?;
        self.offerings.push(o);
        Ok(())
    }

    /// Removes an offering no VM is assigned to.
    pub fn remove_offering(&mut self, name: &str) -> Result<(), Refused> {
        if self.offering(name).is_none() {
            return Err(Refused(format!("there is no offering {name}")));
        }
        let users: Vec<&str> = self.assignments.iter().filter(|(_, o)| *o == name).map(|(v, _)| v.as_str()).collect();
        if !users.is_empty() {
            return Err(Refused(format!("offering {name} is assigned to {}; unassign them first", users.join(", "))));
        }
        self.offerings.retain(|o| o.name != name);
        Ok(())
    }

    /// Assigns `vm` to `offering` (replacing an earlier assignment).
    pub fn assign(&mut self, vm: &str, offering: &str) -> Result<(), Refused> {
        self.check_assignment(vm, offering)?;
        self.assignments.insert(vm.to_owned(), offering.to_owned());
        Ok(())
    }

    /// Unassigns `vm`; refused while it has schedules.
    pub fn unassign(&mut self, vm: &str) -> Result<(), Refused> {
        if !self.assignments.contains_key(vm) {
            return Err(Refused(format!("{vm} is not assigned to an offering")));
        }
        let ids: Vec<&str> = self.schedules.iter().filter(|s| s.vm == vm).map(|s| s.id.as_str()).collect();
        if !ids.is_empty() {
            return Err(Refused(format!("{vm} has schedules ({}); remove them first", ids.join(", "))));
        }
        self.assignments.remove(vm);
        Ok(())
    }

    /// A free schedule id for `vm` and `every`.
    pub fn next_schedule_id(&self, vm: &str, every: Every) -> String {
        let base = format!("{vm}-{every}");
        (1..)
            .map(|n| if n == 1 { base.clone() } else { format!("{base}-{n}") })
            .find(|id| self.schedules.iter().all(|s| &s.id != id))
            .expect("an unbounded range has a free id")
    }

    /// Adds a schedule after validating it; its VM must be assigned to an offering.
    pub fn add_schedule(&mut self, s: Schedule) -> Result<(), Refused> {
        s.at().map_err(Refused)?;
        parse_tz(&s.tz).map_err(Refused)?;
        if self.schedules.iter().any(|x| x.id == s.id) {
            return Err(Refused(format!("schedule {} is defined twice", s.id)));
        }
        if self.offering_of(&s.vm).is_none() {
            return Err(Refused(format!(
                "{} has no offering; assign it to one first (the offering names the repository)",
                s.vm
            )));
        }
        self.schedules.push(s);
        Ok(())
    }

    /// Removes a schedule.
    pub fn remove_schedule(&mut self, id: &str) -> Result<(), Refused> {
        let before = self.schedules.len();
        self.schedules.retain(|s| s.id != id);
        if self.schedules.len() == before {
            return Err(Refused(format!("there is no schedule {id}")));
        }
        Ok(())
    }

    /// Writes the configuration atomically: a 0600 temporary file (it may hold CIFS passwords
    /// and Ceph keys) in the same directory, synced, then renamed over the old one.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Io {
            action: "serializing",
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        write_atomically(path, text.as_bytes(), 0o600)
    }
}

/// A size: a whole number of bytes, or a text with a unit (`512M`, `20G`, `1T`, `1.5G`; K, M,
/// G, T are powers of 1024, an optional `iB` or `B` after them).
pub fn parse_size(value: &toml::Value) -> Result<u64, String> {
    let expected = "expected bytes or a size such as 512M, 20G or 1T";
    match value {
        toml::Value::Integer(n) if *n > 0 => Ok(*n as u64),
        toml::Value::String(text) => {
            let t = text.trim();
            let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
            let (number, shift) = match t.char_indices().last() {
                Some((i, c)) if c.is_ascii_alphabetic() => {
                    let shift = match c.to_ascii_uppercase() {
                        'K' => 10,
                        'M' => 20,
                        'G' => 30,
                        'T' => 40,
                        _ => return Err(format!("unknown unit {c:?}; {expected}")),
                    };
                    (&t[..i], shift)
                }
                _ => (t, 0),
            };
            let n: f64 = number.trim().parse().map_err(|_| expected.to_owned())?;
            let bytes = n * (1u64 << shift) as f64;
            if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
                return Err(expected.to_owned());
            }
            Ok(bytes as u64)
        }
        _ => Err(expected.to_owned()),
    }
}

/// A `max_parallel` value: a whole number from 1 to 64.
fn parallel_limit(value: Option<i64>, shown: &str) -> Result<u32, String> {
    match value {
        Some(n @ 1..=64) => Ok(n as u32),
        _ => Err(format!("max_parallel = {shown}: expected a whole number from 1 to 64")),
    }
}

impl Serialize for Config {
    /// As the file is written: `max_parallel` first, each repository's `max_parallel` in its
    /// `[[repository]]` table.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct File<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            max_parallel: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            metrics_textfile: Option<&'a Path>,
            #[serde(skip_serializing_if = "Option::is_none")]
            scratch_dir: Option<&'a Path>,
            #[serde(skip_serializing_if = "Option::is_none")]
            scratch_limit: Option<String>,
            repository: Vec<toml::Table>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            target: Vec<toml::Table>,
            #[serde(skip_serializing_if = "<[Offering]>::is_empty")]
            offering: &'a [Offering],
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            assignments: &'a BTreeMap<String, String>,
            #[serde(skip_serializing_if = "<[Schedule]>::is_empty")]
            schedule: &'a [Schedule],
        }
        let mut repository = Vec::new();
        for r in &self.repositories {
            let mut table = toml::Table::try_from(r).map_err(serde::ser::Error::custom)?;
            if let Some(n) = self.repository_max_parallel.get(r.name().as_str()) {
                table.insert("max_parallel".into(), toml::Value::Integer(i64::from(*n)));
            }
            repository.push(table);
        }
        let mut target = Vec::new();
        for t in &self.targets {
            let mut table = toml::Table::new();
            table.insert("type".into(), toml::Value::String("s3".into()));
            table.extend(toml::Table::try_from(t).map_err(serde::ser::Error::custom)?);
            target.push(table);
        }
        File {
            max_parallel: self.max_parallel,
            metrics_textfile: self.metrics_textfile.as_deref(),
            scratch_dir: self.scratch.as_ref().map(|s| s.dir.as_path()),
            scratch_limit: self.scratch.as_ref().filter(|s| s.limit != u64::MAX).map(|s| format!("{}", s.limit)),
            repository,
            target,
            offering: &self.offerings,
            assignments: &self.assignments,
            schedule: &self.schedules,
        }
        .serialize(s)
    }
}

/// Writes `data` to `path` through a synced temporary file in the same directory and a rename.
pub(crate) fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), ConfigError> {
    let io = |action, source| ConfigError::Io { action, path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    nasbak_repo::store::write_atomic(path, data, mode).map_err(|e| io("writing", e))
}

/// An offering as listings show it: with the VMs assigned to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OfferingSummary {
    /// Its name.
    pub name: String,
    /// The repository its backups go to.
    pub repository: String,
    /// Its zone.
    pub zone: Option<String>,
    /// The default quiesce policy.
    pub quiesce: String,
    /// The retention (`None`: keep everything).
    pub keep: Option<String>,
    /// The longest chain `auto` backups build.
    pub full_every: u32,
    /// Whether scheduled backups are boot-verified.
    pub boot_verify: bool,
    /// The VMs assigned to it.
    pub vms: Vec<String>,
}

/// A schedule as listings show it: with when it last ran and how that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ScheduleSummary {
    /// Its id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The interval.
    pub every: String,
    /// When in the interval.
    pub at: String,
    /// The time zone of `at`.
    pub tz: String,
    /// Keep at most this many of its backups (0: no limit).
    pub keep: u32,
    /// The quiesce policy.
    pub quiesce: String,
    /// When it last ran.
    pub last_run: Option<DateTime<Utc>>,
    /// How that ended.
    pub last_outcome: Option<RunOutcome>,
}

impl Config {
    /// Every offering, with its VMs.
    pub fn offering_summaries(&self) -> Vec<OfferingSummary> {
        self.offerings
            .iter()
            .map(|o| OfferingSummary {
                name: o.name.clone(),
                repository: o.repository.clone(),
                zone: o.zone.clone(),
                quiesce: o.quiesce.to_string(),
                keep: o.keep.map(|k| k.to_string()),
                full_every: o.full_every.unwrap_or(nasbak::chain::DEFAULT_FULL_EVERY),
                boot_verify: o.boot_verify,
                vms: self.assignments.iter().filter(|(_, x)| **x == o.name).map(|(v, _)| v.clone()).collect(),
            })
            .collect()
    }

    /// Every schedule, with its last run from `state`.
    pub fn schedule_summaries(&self, state: &ScheduleState) -> Vec<ScheduleSummary> {
        self.schedules
            .iter()
            .map(|s| ScheduleSummary {
                id: s.id.clone(),
                vm: s.vm.clone(),
                every: s.every.to_string(),
                at: s.at.clone(),
                tz: s.tz.clone(),
                keep: s.keep,
                quiesce: s.quiesce.to_string(),
                last_run: state.last_run.get(&s.id).copied(),
                last_outcome: state.last_outcome.get(&s.id).cloned(),
            })
            .collect()
    }
}

/// When each schedule last ran and how that ended (`/var/lib/nasbak/state.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// Schedule id to the start of its last run.
    #[serde(default)]
    pub last_run: BTreeMap<String, DateTime<Utc>>,
    /// Schedule id to how its last run ended (absent while it runs, and in older state files).
    #[serde(default)]
    pub last_outcome: BTreeMap<String, RunOutcome>,
    /// VM name to the failures of its scheduled runs (absent in older state files).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, FailureHistory>,
}

/// The failures of a VM's scheduled runs: a failed backup, or a boot verification of the new
/// backup that did not pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FailureHistory {
    /// Failed runs since the state began.
    pub total: u64,
    /// Failed runs since its last successful one.
    pub consecutive: u32,
    /// The last failure.
    pub last: Option<Failure>,
}

/// One failed scheduled run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Failure {
    /// When it ended.
    pub at: DateTime<Utc>,
    /// The schedule.
    pub schedule: String,
    /// Why, with the causes.
    pub reason: String,
}

impl FailureHistory {
    /// Counts a run that ended at `at`: a failure (with its schedule and reason) or a success.
    pub fn record(&mut self, at: DateTime<Utc>, failure: Option<(&str, &str)>) {
        match failure {
            Some((schedule, reason)) => {
                self.total += 1;
                self.consecutive = self.consecutive.saturating_add(1);
                self.last = Some(Failure { at, schedule: schedule.to_owned(), reason: reason.to_owned() });
            }
            None => self.consecutive = 0,
        }
    }
}

/// How a scheduled run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunOutcome {
    /// The backup was made: `REPO:VM/ID`.
    Succeeded(String),
    /// The backup failed, with the error and its causes.
    Failed(String),
    /// The run was cancelled (Ctrl-C, SIGTERM): not a failure.
    Cancelled,
    /// Not started: the VM's backup by an earlier `run-due` still goes (the reason says which
    /// process, since when). Never recorded in the state.
    Skipped(String),
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::Succeeded(id) => write!(f, "succeeded ({id})"),
            RunOutcome::Failed(e) => write!(f, "failed: {e}"),
            RunOutcome::Cancelled => f.write_str("cancelled"),
            RunOutcome::Skipped(why) => write!(f, "skipped: {why}"),
        }
    }
}

impl ScheduleState {
    /// Reads the state; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<ScheduleState, ConfigError> {
        match fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                line: e.line(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ScheduleState::default()),
            Err(source) => Err(ConfigError::Io { action: "reading", path: path.to_owned(), source }),
        }
    }

    /// Writes the state atomically.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = serde_json::to_string_pretty(self).expect("a map of strings and times serializes");
        write_atomically(path, text.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_point_at_the_line() {
        let text = "[[repository]]\nname = \"a\"\ntype = \"nfs\"\naddress = \"nas1:/x\"\n\n[[repository]]\nname = \"b\"\ntype = \"nfs\"\naddress = \"nohost\"\n";
        let e = Config::parse(text, Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.starts_with("c.toml:6:") && e.contains("NFS address"), "{e}");
        let dup = "[[repository]]\nname = \"a\"\ntype = \"shared\"\naddress = \"/x\"\n[[repository]]\nname = \"a\"\ntype = \"shared\"\naddress = \"/y\"\n";
        let e = Config::parse(dup, Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("defined twice"), "{e}");
    }

    #[test]
    fn the_metrics_file_is_an_absolute_file_path_kept_on_save() {
        let c = Config::parse("metrics_textfile = \"/var/lib/node/nasbak.prom\"\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.metrics_textfile.as_deref(), Some(Path::new("/var/lib/node/nasbak.prom")));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        c.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
        for bad in ["nasbak.prom", "/var/lib/node/"] {
            let e = Config::parse(&format!("\n\nmetrics_textfile = {bad:?}\n"), Path::new("c.toml")).unwrap_err();
            let e = e.to_string();
            assert!(e.starts_with("c.toml:3:") && e.contains("absolute path of a file"), "{e}");
        }
    }

    #[test]
    fn scratch_storage_is_a_directory_with_a_size() {
        let c =
            Config::parse("scratch_dir = \"/var/lib/nasbak/scratch\"\nscratch_limit = \"20G\"\n", Path::new("c.toml"))
                .unwrap();
        assert_eq!(c.scratch, Some(nasbak::Scratch::new("/var/lib/nasbak/scratch", 20 << 30)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        c.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c, "{}", fs::read_to_string(&path).unwrap());
        let unlimited = Config::parse("scratch_dir = \"/s\"\n", Path::new("c.toml")).unwrap();
        assert_eq!(unlimited.scratch.map(|s| s.limit), Some(u64::MAX));
        for (value, bytes) in
            [("1073741824", 1u64 << 30), ("\"512M\"", 512 << 20), ("\"1.5GiB\"", 3 << 29), ("\"2T\"", 2 << 40)]
        {
            let c = Config::parse(&format!("scratch_dir = \"/s\"\nscratch_limit = {value}\n"), Path::new("c.toml"))
                .unwrap();
            assert_eq!(c.scratch.unwrap().limit, bytes, "{value}");
        }
        for (text, says) in [
            ("scratch_dir = \"/s\"\nscratch_limit = \"lots\"\n", "c.toml:2: scratch_limit = \"lots\""),
            ("scratch_dir = \"/s\"\nscratch_limit = \"5Q\"\n", "unknown unit 'Q'"),
            ("scratch_dir = \"/s\"\nscratch_limit = -3\n", "expected bytes"),
            ("scratch_dir = \"scratch\"\n", "c.toml:1: scratch_dir = \"scratch\": expected an absolute directory"),
            ("scratch_limit = \"1G\"\n", "without scratch_dir"),
        ] {
            let e = Config::parse(text, Path::new("c.toml")).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn failures_count_in_a_row_until_a_success() {
        let t = |m: i64| DateTime::<Utc>::from_timestamp(1_700_000_000 + m * 60, 0).unwrap();
        let mut h = FailureHistory::default();
        h.record(t(0), Some(("web1-daily", "no space")));
        h.record(t(1), Some(("web1-hourly", "timeout")));
        assert_eq!((h.total, h.consecutive), (2, 2));
        assert_eq!(
            h.last.as_ref().map(|f| (f.schedule.as_str(), f.reason.as_str(), f.at)),
            Some(("web1-hourly", "timeout", t(1)))
        );
        h.record(t(2), None);
        assert_eq!((h.total, h.consecutive), (2, 0), "a success ends the run of failures, not the count");
        assert!(h.last.is_some(), "the last failure stays for the status");
        // An older state file (no failures) reads; a new one round-trips.
        let old: ScheduleState = serde_json::from_str(r#"{"last_run":{},"last_outcome":{}}"#).unwrap();
        assert!(old.failures.is_empty());
        let mut st = ScheduleState::default();
        st.failures.insert("web1".into(), h);
        let text = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<ScheduleState>(&text).unwrap(), st);
    }

    #[test]
    fn saves_atomically_readably_and_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/nasbak.toml");
        let mut c = Config::default();
        let kind = nasbak_repo::RepositoryKind::Cifs;
        c.repositories
            .push(BackupRepository::new("smb", kind, "//nas/b", "username=u,password=pw", Some("z1")).unwrap());
        c.save(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("[[repository]]") && text.contains("name = \"smb\""), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Config::load(&path).unwrap(), c);
        assert_eq!(Config::load(&dir.path().join("missing.toml")).unwrap(), Config::default());
    }

    const FULL: &str = r#"[[repository]]
name = "nas1"
type = "shared"
address = "/srv/backup"
zone = "z1"

[[offering]]
name = "gold"
repository = "nas1"
quiesce = "required"
keep = "last=3,daily=7"

[assignments]
web1 = "gold"

[[schedule]]
id = "web1-daily"
vm = "web1"
every = "daily"
at = "02:30"
tz = "Europe/Berlin"
keep = 7
created = "2026-11-27T12:00:00Z"
"#;

    #[test]
    fn offerings_assignments_and_schedules_round_trip() {
        let c = Config::parse(FULL, Path::new("c.toml")).unwrap();
        assert_eq!(c.offering_of("web1").unwrap().quiesce, QuiescePolicy::Required);
        assert_eq!(c.offering("gold").unwrap().keep.unwrap().daily, Some(7));
        assert_eq!(c.schedules[0].quiesce, QuiescePolicy::BestEffort);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        c.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
        assert_eq!(c.next_schedule_id("web1", Every::Daily), "web1-daily-2");
        assert_eq!(c.next_schedule_id("web1", Every::Hourly), "web1-hourly");
    }

    #[test]
    fn dangling_references_are_refused_with_their_line() {
        let cases = [
            ("repository = \"nas1\"", "repository = \"nas9\"", 7, "names repository nas9, which is not defined"),
            ("web1 = \"gold\"", "web1 = \"silver\"", 14, "offering silver, which is not defined"),
            ("at = \"02:30\"", "at = \"25:00\"", 16, "the hour must be 0 to 23"),
            ("tz = \"Europe/Berlin\"", "tz = \"Moon/Base\"", 16, "unknown time zone"),
            ("vm = \"web1\"", "vm = \"db1\"", 16, "db1 has no offering"),
            ("keep = \"last=3,daily=7\"", "keep = \"forever\"", 7, "no =N"),
            (
                "zone = \"z1\"",
                "zone = \"z1\"\n[[offering]]\nname = \"x\"\nrepository = \"nas1\"\nzone = \"z2\"",
                7,
                "zone z2",
            ),
        ];
        for (from, to, line, says) in cases {
            let text = FULL.replace(from, to);
            let e = Config::parse(&text, Path::new("c.toml")).unwrap_err().to_string();
            assert!(e.contains(says), "{to}: {e}");
            if !to.contains("zone") {
                assert!(e.starts_with(&format!("c.toml:{line}:")), "{to}: {e}");
            }
        }
        let e = Config::parse(&format!("{FULL}\n[unknown]\n"), Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn changes_keep_references_whole() {
        let mut c = Config::parse(FULL, Path::new("c.toml")).unwrap();
        assert!(c.remove_offering("gold").unwrap_err().0.contains("assigned to web1"));
        assert!(c.unassign("web1").unwrap_err().0.contains("web1-daily"));
        c.remove_schedule("web1-daily").unwrap();
        assert!(c.remove_schedule("web1-daily").is_err());
        c.unassign("web1").unwrap();
        c.remove_offering("gold").unwrap();
        assert!(c.assign("web1", "gold").unwrap_err().0.contains("not defined"));
        let o = Offering {
            name: "x".into(),
            repository: "none".into(),
            zone: None,
            quiesce: QuiescePolicy::Off,
            keep: None,
            full_every: None,
            boot_verify: false,
            boot_check: None,
            compression: None,
            encryption: None,
            copy_to: None,
        };
        assert!(c.add_offering(o.clone()).unwrap_err().0.contains("not defined"));
        // An offering may compress or encrypt on its repository, with the repository's key only.
        let keyless = Offering { repository: "nas1".into(), encryption: Some(Encryption::Luks), ..o.clone() };
        assert!(c.add_offering(keyless).unwrap_err().0.contains("has no key"), "refused");
        let zstd = Offering { repository: "nas1".into(), compression: Some(Compression::Zstd), ..o };
        let p = zstd.protection_on(c.repository("nas1").unwrap()).unwrap();
        assert_eq!((p.compression(), p.encryption()), (Compression::Zstd, Encryption::None));
        c.add_offering(zstd).unwrap();
    }

    #[test]
    fn schedule_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var/state.json");
        assert_eq!(ScheduleState::load(&path).unwrap(), ScheduleState::default());
        let mut st = ScheduleState::default();
        st.last_run.insert("a".into(), DateTime::from_timestamp(1_800_000_000, 0).unwrap());
        st.save(&path).unwrap();
        assert_eq!(ScheduleState::load(&path).unwrap(), st);
        fs::write(&path, "{not json").unwrap();
        assert!(ScheduleState::load(&path).unwrap_err().to_string().contains("state.json:1"));
    }

    #[test]
    fn targets_are_read_checked_written_back_and_kept_while_an_offering_copies_to_them() {
        let text = r#"
[[repository]]
name = "nas1"
type = "shared"
address = "/srv/backups"

[[target]]
type = "s3"
name = "offsite"
endpoint = "https://s3.example.com"
bucket = "kvm-backups"
prefix = "/hosts/kvm1/"
credentials = { file = "/etc/nasbak/s3.credentials" }
lock = { mode = "compliance", days = 30 }

[[offering]]
name = "gold"
repository = "nas1"
copy_to = "offsite"
"#;
        let path = Path::new("/etc/nasbak/config.toml");
        let c = Config::parse(text, path).unwrap();
        let t = c.target("offsite").unwrap();
        assert_eq!(t.prefix(), Some("hosts/kvm1"), "the prefix is canonical");
        assert_eq!(t.lock().unwrap().days, 30);
        assert_eq!(c.offering("gold").unwrap().copy_to.as_deref(), Some("offsite"));
        // Written back and read again: the same.
        let written = toml::to_string_pretty(&c).unwrap();
        assert!(written.contains("type = \"s3\""), "{written}");
        assert_eq!(Config::parse(&written, path).unwrap(), c);
        // Refused: another type, a bad bucket, an unknown field, a target named twice, an
        // offering copying to a target not defined, removing a target an offering copies to.
        let bad = |from: &str, to: &str, says: &str| {
            let e = Config::parse(&text.replacen(from, to, 1), path).unwrap_err().to_string();
            assert!(e.contains(says), "{from} -> {to}: {e}");
        };
        bad("type = \"s3\"", "type = \"gcs\"", "expected \"s3\"");
        bad("bucket = \"kvm-backups\"", "bucket = \"Kvm_Backups\"", "bucket");
        bad("bucket = \"kvm-backups\"", "bucket = \"kvm-backups\"\nsecret = \"x\"", "unknown field");
        bad("endpoint = \"https://s3.example.com\"", "endpoint = \"http://s3.example.com\"", "in the clear");
        bad("copy_to = \"offsite\"", "copy_to = \"elsewhere\"", "not defined");
        let twice = format!(
            "{text}\n[[target]]\nname = \"offsite\"\nendpoint = \"https://b.example.com\"\nbucket = \"bbb\"\ncredentials = \"environment\"\n"
        );
        let e = Config::parse(&twice, path).unwrap_err().to_string();
        assert!(e.contains("defined twice"), "{e}");
        let mut c = c;
        assert!(c.remove_target("offsite").unwrap_err().0.contains("offering gold copies to"));
        c.offerings[0].copy_to = None;
        c.remove_target("offsite").unwrap();
        assert!(c.targets.is_empty());
    }
}
