//! A reference to one backup, as operators and tools write it: `REPO:VM/BACKUP-ID`, or
//! `VM/BACKUP-ID` where the repository is implied (the VM's offering, the only repository).

use std::fmt;
use std::str::FromStr;

use super::error::ParseError;
use super::layout::BackupId;
use super::name::{RepositoryName, VmName};

const EXPECTED: &str = "expected REPO:VM/BACKUP-ID or VM/BACKUP-ID, e.g. nas1:web1/2026.11.27.02.30.00";

/// One backup: its repository (when said), VM and id.
///
/// ```
/// use nasbak_repo::BackupRef;
/// let r: BackupRef = "nas1:web1/2026.11.27.02.30.00".parse()?;
/// assert_eq!((r.repository.as_ref().unwrap().as_str(), r.vm.as_str()), ("nas1", "web1"));
/// assert_eq!(r.to_string(), "nas1:web1/2026.11.27.02.30.00");
/// assert!("web1".parse::<BackupRef>().unwrap_err().to_string().contains("REPO:VM/BACKUP-ID"));
/// # Ok::<(), nasbak_repo::ParseError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackupRef {
    /// The repository, when the reference names it.
    pub repository: Option<RepositoryName>,
    /// The VM.
    pub vm: VmName,
    /// The backup id.
    pub id: BackupId,
}

impl BackupRef {
    /// A reference to backup `id` of `vm` on `repository`.
    pub fn new(repository: Option<RepositoryName>, vm: VmName, id: BackupId) -> Self {
        BackupRef { repository, vm, id }
    }

    /// `VM/BACKUP-ID`, the backup's directory relative to the repository root.
    pub fn relative(&self) -> String {
        format!("{}/{}", self.vm, self.id)
    }
}

impl FromStr for BackupRef {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        // A part's own error, placed in the whole input.
        let within = |offset: usize, e: ParseError| {
            ParseError::new(
                "backup reference",
                s,
                offset + e.position,
                format!("in the {}: {}", e.what, e.problem),
                EXPECTED,
            )
        };
        let (repository, rest, offset) = match s.split_once(':') {
            Some((r, rest)) => (Some(RepositoryName::new(r).map_err(|e| within(0, e))?), rest, r.len() + 1),
            None => (None, s, 0),
        };
        let Some((vm, id)) = rest.split_once('/') else {
            return Err(ParseError::new(
                "backup reference",
                s,
                s.len(),
                "there is no '/' before the backup id",
                EXPECTED,
            ));
        };
        let vm = VmName::new(vm).map_err(|e| within(offset, e))?;
        let id = id.parse().map_err(|e| within(offset + vm.as_str().len() + 1, e))?;
        Ok(BackupRef { repository, vm, id })
    }
}

impl fmt::Display for BackupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.repository {
            write!(f, "{r}:")?;
        }
        write!(f, "{}/{}", self.vm, self.id)
    }
}

impl serde::Serialize for BackupRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BackupRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_errors() {
        let r: BackupRef = "web1/2026.11.27.02.30.00-2".parse().unwrap();
        assert_eq!((r.repository, r.vm.as_str(), r.id.sequence()), (None, "web1", 2));
        for (bad, position) in [("web1", 4), ("a:web1", 6), ("../x:web1/2026.11.27.02.30.00", 0), ("r:w/2026", 4)] {
            let e = bad.parse::<BackupRef>().unwrap_err();
            assert_eq!(e.position, position, "{bad}: {e}");
            assert!(e.to_string().contains("REPO:VM/BACKUP-ID"), "{e}");
        }
        let json = serde_json::to_string(&"n:v/2026.01.02.03.04.05".parse::<BackupRef>().unwrap()).unwrap();
        assert_eq!(json, "\"n:v/2026.01.02.03.04.05\"");
        assert!(serde_json::from_str::<BackupRef>("\"v\"").is_err());
    }
}
