//! The configuration file (`/etc/nasbak/nasbak.toml`): repositories, validated on load, written
//! atomically.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nasbak_repo::BackupRepository;
use serde::{Deserialize, Serialize};

/// Where the configuration is unless `--config` or `NASBAK_CONFIG` says otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/nasbak/nasbak.toml";

/// The configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The backup repositories.
    #[serde(default, rename = "repository")]
    pub repositories: Vec<BackupRepository>,
}

/// The file as read, each repository with its place in the text.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    repository: Vec<toml::Spanned<toml::Table>>,
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(s.start)),
            message: e.message().to_owned(),
        })?;
        let mut config = Config::default();
        for table in raw.repository {
            let line = line_of(table.span().start);
            let repo: BackupRepository =
                toml::Value::Table(table.into_inner()).try_into().map_err(|e: toml::de::Error| {
                    ConfigError::Invalid { path: path.to_owned(), line, message: e.message().to_owned() }
                })?;
            config.repositories.push(repo);
        }
        let mut seen = std::collections::HashSet::new();
        for r in &config.repositories {
            if !seen.insert(r.name().as_str()) {
                let line = text.find(&format!("\"{}\"", r.name())).map_or(1, |i| text[..i].matches('\n').count() + 1);
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    line,
                    message: format!("repository {} is defined twice", r.name()),
                });
            }
        }
        Ok(config)
    }

    /// The repository named `name`.
    pub fn repository(&self, name: &str) -> Option<&BackupRepository> {
        self.repositories.iter().find(|r| r.name().as_str() == name)
    }

    /// Writes the configuration atomically: a 0600 temporary file (it may hold CIFS passwords
    /// and Ceph keys) in the same directory, synced, then renamed over the old one.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let io = |action, source| ConfigError::Io { action, path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        }
        let text = toml::to_string_pretty(self).map_err(|e| io("serializing", std::io::Error::other(e)))?;
        let tmp = path.with_extension("toml.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("writing", e))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| io("writing", e))?;
        fs::rename(&tmp, path).map_err(|e| io("replacing", e))
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
}
