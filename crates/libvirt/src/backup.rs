//! Backup XML (push mode, and pull mode with a Unix-socket NBD export) and checkpoint XML:
//! built from the model, parsed back.

use std::path::{Path, PathBuf};

use quick_xml::escape::escape;
use serde::Deserialize;

use crate::domain::{Domain, XmlError};

/// Where one disk goes in a push backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupTarget {
    /// The disk's target device (`vda`).
    pub disk: String,
    /// The qcow2 file QEMU writes (in pull mode: the scratch file that keeps what the guest
    /// overwrites while the export is read).
    pub file: PathBuf,
    /// For an incremental copy of this disk: the checkpoint whose changes it copies (`None`: the
    /// whole disk).
    pub incremental: Option<String>,
}

/// A push-mode `<domainbackup>`: each listed disk into its own qcow2 file, every other disk of
/// the domain explicitly `backup='no'`. With [`PushBackup::pull_socket`], the same backup in
/// pull mode: QEMU exports each disk's point-in-time view over NBD on that socket (export name:
/// the disk's target; an incremental disk's changes as the bitmap `backup-<target>`), keeping
/// what the guest overwrites in the target's scratch file, until the job is aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushBackup {
    /// The disks to back up and their files.
    pub targets: Vec<BackupTarget>,
    /// Disks of the domain not backed up.
    pub excluded: Vec<String>,
    /// A checkpoint to create with the backup (for later incrementals).
    pub checkpoint: Option<String>,
    /// Backed-up disks that keep no dirty bitmap (not qcow2): the checkpoint leaves them out.
    pub without_bitmap: Vec<String>,
    /// Every target exists already as a raw file that QEMU writes as it is (an export nasbak
    /// serves, which stores it compressed or encrypted): `<driver type='raw'/>`, and libvirt
    /// told to reuse the files (`VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL`).
    pub into_existing_raw: bool,
    /// Every target exists already as an empty LUKS-encrypted qcow2, opened with the
    /// passphrase in the libvirt secret of this UUID: `<encryption format='luks'>` in each
    /// target, and libvirt told to reuse the files. QEMU encrypts what the job writes.
    pub encryption_secret: Option<String>,
    /// Pull mode: the Unix socket QEMU's NBD server listens on.
    pub pull_socket: Option<PathBuf>,
}

/// The name of the dirty bitmap a pull-mode export of an incremental disk offers
/// (`qemu:dirty-bitmap:<name>` as an NBD metadata context).
pub fn export_bitmap(disk: &str) -> String {
    format!("backup-{disk}")
}

impl PushBackup {
    /// A backup of every disk `domain.backup_selection()` chooses, into `dir/<file_name(disk)>`.
    pub fn for_domain(domain: &Domain, dir: &Path, file_name: impl Fn(&crate::Disk) -> String) -> Self {
        let (chosen, skipped) = domain.backup_selection();
        PushBackup {
            targets: chosen
                .iter()
                .map(|d| BackupTarget { disk: d.target.clone(), file: dir.join(file_name(d)), incremental: None })
                .collect(),
            excluded: skipped.into_iter().map(|s| s.target).collect(),
            checkpoint: None,
            without_bitmap: chosen
                .iter()
                .filter(|d| d.format.as_deref() != Some("qcow2"))
                .map(|d| d.target.clone())
                .collect(),
            into_existing_raw: false,
            encryption_secret: None,
            pull_socket: None,
        }
    }

    /// Whether the targets exist before the job (`VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL`).
    pub fn reuses_targets(&self) -> bool {
        self.pull_socket.is_none() && (self.into_existing_raw || self.encryption_secret.is_some())
    }

    /// The `<domainbackup mode='push'>` document.
    ///
    /// ```
    /// use nasbak_libvirt::{BackupTarget, PushBackup};
    /// let b = PushBackup { targets: vec![BackupTarget { disk: "vda".into(), file: "/r/a&b.qcow2".into(), incremental: None }],
    ///                      excluded: vec!["hdc".into()], checkpoint: None, without_bitmap: vec![],
    ///                      into_existing_raw: false, encryption_secret: None, pull_socket: None };
    /// let xml = b.to_xml();
    /// assert!(xml.contains("<target file='/r/a&amp;b.qcow2'/>"));
    /// assert_eq!(PushBackup::parse(&xml).unwrap(), b);
    /// ```
    pub fn to_xml(&self) -> String {
        let mut x = match &self.pull_socket {
            None => String::from("<domainbackup mode='push'>\n  <disks>\n"),
            Some(socket) => format!(
                "<domainbackup mode='pull'>\n  <server transport='unix' socket='{}'/>\n  <disks>\n",
                escape(socket.to_string_lossy().as_ref())
            ),
        };
        let any_incremental = self.targets.iter().any(|t| t.incremental.is_some());
        for t in &self.targets {
            // Per disk (libvirt >= 7.6): an incremental copy names its checkpoint; in a backup
            // with incremental disks, the others say they are full.
            let mode = match &t.incremental {
                Some(c) => format!(" backupmode='incremental' incremental='{}'", escape(c.as_str())),
                None if any_incremental => " backupmode='full'".to_owned(),
                None => String::new(),
            };
            let driver = if self.into_existing_raw && self.pull_socket.is_none() { "raw" } else { "qcow2" };
            let file = escape(t.file.to_string_lossy().as_ref()).into_owned();
            if self.pull_socket.is_some() {
                let disk = escape(t.disk.as_str());
                let bitmap = match &t.incremental {
                    Some(_) => format!(" exportbitmap='{}'", escape(export_bitmap(&t.disk).as_str())),
                    None => String::new(),
                };
                x.push_str(&format!(
                    "    <disk name='{disk}' backup='yes' type='file' exportname='{disk}'{bitmap}{mode}>\n      <driver type='qcow2'/>\n      <scratch file='{file}'/>\n    </disk>\n",
                ));
                continue;
            }
            let target = match &self.encryption_secret {
                None => format!("<target file='{file}'/>"),
                Some(uuid) => format!(
                    "<target file='{file}'>\n        <encryption format='luks'>\n          <secret type='passphrase' uuid='{}'/>\n        </encryption>\n      </target>",
                    escape(uuid.as_str())
                ),
            };
            x.push_str(&format!(
                "    <disk name='{}' backup='yes' type='file'{mode}>\n      <driver type='{driver}'/>\n      {target}\n    </disk>\n",
                escape(t.disk.as_str()),
            ));
        }
        for d in &self.excluded {
            x.push_str(&format!("    <disk name='{}' backup='no'/>\n", escape(d.as_str())));
        }
        x.push_str("  </disks>\n</domainbackup>\n");
        x
    }

    /// The `<domaincheckpoint>` to pass along with [`PushBackup::to_xml`], if a checkpoint is
    /// wanted and some backed-up disk can keep a bitmap: a bitmap on each such disk.
    pub fn checkpoint_xml(&self) -> Option<String> {
        let name = self.checkpoint.as_ref()?;
        let bitmap = |t: &BackupTarget| !self.without_bitmap.contains(&t.disk);
        if !self.targets.iter().any(bitmap) {
            return None;
        }
        let mut x = format!("<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n", escape(name.as_str()));
        for t in &self.targets {
            let kind = if bitmap(t) { "bitmap" } else { "no" };
            x.push_str(&format!("    <disk name='{}' checkpoint='{kind}'/>\n", escape(t.disk.as_str())));
        }
        for d in &self.excluded {
            x.push_str(&format!("    <disk name='{}' checkpoint='no'/>\n", escape(d.as_str())));
        }
        x.push_str("  </disks>\n</domaincheckpoint>\n");
        Some(x)
    }

    /// Parses a push backup document (as built here, or as `virsh backup-dumpxml` prints it).
    pub fn parse(xml: &str) -> Result<PushBackup, XmlError> {
        let raw: XmlBackup = quick_xml::de::from_str(xml).map_err(|e| XmlError { detail: e.to_string() })?;
        let mut b = PushBackup {
            targets: Vec::new(),
            excluded: Vec::new(),
            checkpoint: None,
            without_bitmap: Vec::new(),
            into_existing_raw: false,
            encryption_secret: None,
            pull_socket: raw
                .server
                .filter(|_| raw.mode.as_deref() == Some("pull"))
                .and_then(|s| s.socket)
                .map(PathBuf::from),
        };
        for d in raw.disks.map(|d| d.disks).unwrap_or_default() {
            if let Some(uuid) = d.target.as_ref().and_then(|t| t.encryption.as_ref()).and_then(|e| e.secret.as_ref()) {
                b.encryption_secret = uuid.uuid.clone();
            }
            match (d.backup.as_deref(), d.target.or(d.scratch).and_then(|t| t.file)) {
                (Some("no"), _) => b.excluded.push(d.name),
                (_, Some(file)) => b.targets.push(BackupTarget {
                    disk: d.name,
                    file: file.into(),
                    incremental: d.incremental.filter(|_| d.backupmode.as_deref() != Some("full")),
                }),
                (_, None) => b.excluded.push(d.name),
            }
        }
        Ok(b)
    }
}

#[derive(Debug, Deserialize)]
struct XmlBackup {
    #[serde(rename = "@mode")]
    mode: Option<String>,
    server: Option<XmlServer>,
    disks: Option<XmlBackupDisks>,
}

#[derive(Debug, Deserialize)]
struct XmlServer {
    #[serde(rename = "@socket")]
    socket: Option<String>,
}

#[derive(Debug, Deserialize)]
struct XmlBackupDisks {
    #[serde(rename = "disk", default)]
    disks: Vec<XmlBackupDisk>,
}

#[derive(Debug, Deserialize)]
struct XmlBackupDisk {
    #[serde(rename = "@name")]
    name: String,
    #[serde(rename = "@backup")]
    backup: Option<String>,
    #[serde(rename = "@backupmode")]
    backupmode: Option<String>,
    #[serde(rename = "@incremental")]
    incremental: Option<String>,
    target: Option<XmlBackupTarget>,
    scratch: Option<XmlBackupTarget>,
}

#[derive(Debug, Deserialize)]
struct XmlBackupTarget {
    #[serde(rename = "@file")]
    file: Option<String>,
    encryption: Option<XmlEncryption>,
}

#[derive(Debug, Deserialize)]
struct XmlEncryption {
    secret: Option<XmlSecret>,
}

#[derive(Debug, Deserialize)]
struct XmlSecret {
    #[serde(rename = "@uuid")]
    uuid: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_from_a_domain_with_a_checkpoint() {
        let d = Domain::parse(
            "<domain><name>v</name><devices>\
             <disk type='file' device='disk'><driver type='qcow2'/><source file='/a.qcow2'/><target dev='vda'/></disk>\
             <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/sdb'/><target dev='vdb'/></disk>\
             <disk type='file' device='cdrom'><target dev='hdc'/></disk></devices></domain>",
        )
        .unwrap();
        let mut b = PushBackup::for_domain(&d, Path::new("/r/x.partial"), |disk| format!("{}.qcow2", disk.target));
        b.checkpoint = Some("nasbak-1".into());
        assert_eq!(b.targets.len(), 2);
        assert_eq!(b.excluded, ["hdc"]);
        // The backup document does not say which disks get bitmaps (the checkpoint does).
        let shape = |t: &[BackupTarget]| {
            t.iter().map(|t| (t.disk.clone(), t.file.clone(), t.incremental.clone())).collect::<Vec<_>>()
        };
        let back = PushBackup::parse(&b.to_xml()).unwrap();
        assert_eq!(shape(&back.targets), shape(&b.targets));
        assert_eq!(b.without_bitmap, ["vdb"], "a raw disk keeps no bitmap");
        // An incremental copy of vda from checkpoint nasbak-0, vdb in full, read back the same.
        b.targets[0].incremental = Some("nasbak-0".into());
        let xml = b.to_xml();
        assert!(
            xml.contains("<disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='nasbak-0'>"),
            "{xml}"
        );
        assert!(xml.contains("<disk name='vdb' backup='yes' type='file' backupmode='full'>"), "{xml}");
        assert_eq!(shape(&PushBackup::parse(&xml).unwrap().targets), shape(&b.targets));
        let c = b.checkpoint_xml().unwrap();
        let parsed = Checkpoint::parse(&c).unwrap();
        assert_eq!(parsed.name.as_deref(), Some("nasbak-1"));
        assert_eq!(parsed.disks, [("vda".to_owned(), true), ("vdb".to_owned(), false), ("hdc".to_owned(), false)]);
        assert!(
            c.contains("<name>nasbak-1</name>")
                && c.contains("<disk name='vdb' checkpoint='no'/>")
                && c.contains("<disk name='hdc' checkpoint='no'/>"),
            "{c}"
        );
        // Into existing raw files (the exports of a protected repository): raw drivers.
        assert!(xml.contains("<driver type='qcow2'/>") && !xml.contains("<driver type='raw'/>"));
        b.into_existing_raw = true;
        let raw = b.to_xml();
        assert_eq!(raw.matches("<driver type='raw'/>").count(), 2, "{raw}");
        assert_eq!(shape(&PushBackup::parse(&raw).unwrap().targets), shape(&b.targets));
        assert!(b.reuses_targets());
        // Into existing LUKS-encrypted qcow2 files: each target names the secret; reused.
        b.into_existing_raw = false;
        assert!(!b.reuses_targets());
        b.encryption_secret = Some("0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f".into());
        let enc = b.to_xml();
        assert_eq!(enc.matches("<encryption format='luks'>").count(), 2, "{enc}");
        assert_eq!(enc.matches("<secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/>").count(), 2);
        assert_eq!(enc.matches("<driver type='qcow2'/>").count(), 2, "{enc}");
        let back = PushBackup::parse(&enc).unwrap();
        assert_eq!(
            (shape(&back.targets), back.encryption_secret.clone()),
            (shape(&b.targets), b.encryption_secret.clone())
        );
        assert!(b.reuses_targets());
        // Pull mode: a Unix-socket server, each disk exported by its target's name with a
        // scratch file, an incremental disk's bitmap exported; libvirt makes the scratch files.
        b.encryption_secret = None;
        b.pull_socket = Some("/run/nasbak/exports/v/pull-1/nbd.sock".into());
        let pull = b.to_xml();
        assert!(pull.starts_with("<domainbackup mode='pull'>\n  <server transport='unix' socket='/run/nasbak/exports/v/pull-1/nbd.sock'/>"), "{pull}");
        assert!(
            pull.contains("<disk name='vda' backup='yes' type='file' exportname='vda' exportbitmap='backup-vda' backupmode='incremental' incremental='nasbak-0'>"),
            "{pull}"
        );
        assert!(
            pull.contains("<disk name='vdb' backup='yes' type='file' exportname='vdb' backupmode='full'>"),
            "{pull}"
        );
        assert_eq!(pull.matches("<scratch file=").count(), 2, "{pull}");
        assert!(!pull.contains("<target") && !pull.contains("type='raw'"), "{pull}");
        assert!(!b.reuses_targets());
        let back = PushBackup::parse(&pull).unwrap();
        assert_eq!((shape(&back.targets), back.pull_socket.clone()), (shape(&b.targets), b.pull_socket.clone()));
    }
}

/// A `<domaincheckpoint>` document, as nasbak builds it or libvirt prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Its name (libvirt picks one when absent).
    pub name: Option<String>,
    /// Its parent checkpoint, if any.
    pub parent: Option<String>,
    /// Per disk: the disk's target and whether it gets a bitmap (libvirt's default is yes).
    pub disks: Vec<(String, bool)>,
}

impl Checkpoint {
    /// `xml` (a `<domaincheckpoint>` as libvirt prints it) without its `<parent>`: a definition
    /// that can be redefined on its own after its parent checkpoint is gone.
    ///
    /// ```
    /// let xml = "<domaincheckpoint>\n  <name>c2</name>\n  <parent>\n    <name>c1</name>\n  </parent>\n</domaincheckpoint>";
    /// assert_eq!(nasbak_libvirt::Checkpoint::without_parent(xml), "<domaincheckpoint>\n  <name>c2</name>\n</domaincheckpoint>");
    /// ```
    pub fn without_parent(xml: &str) -> String {
        match (xml.find("<parent>"), xml.find("</parent>")) {
            (Some(start), Some(end)) if end > start => {
                let end = end + "</parent>".len();
                // The whole line the element sat on, when it had one to itself.
                let line_start =
                    xml[..start].rfind('\n').filter(|&i| xml[i + 1..start].trim().is_empty()).unwrap_or(start);
                format!("{}{}", &xml[..line_start], &xml[end..])
            }
            _ => xml.to_owned(),
        }
    }

    /// The checkpoint document `xml` with a bitmap kept for the disks in `keep` only: every
    /// other disk of its `<disks>` becomes `checkpoint='no'`. Redefined so, libvirt validates
    /// (and an incremental uses) the kept disks' bitmaps alone. Expects libvirt's own
    /// formatting (each checkpoint disk one empty element).
    ///
    /// ```
    /// let xml = "<domaincheckpoint><disks><disk name='vda' checkpoint='bitmap' bitmap='c'/><disk name='vdb' checkpoint='bitmap' bitmap='c'/></disks><domain><devices><disk type='file'/></devices></domain></domaincheckpoint>";
    /// let kept = nasbak_libvirt::Checkpoint::with_bitmaps_only(xml, &["vdb"]);
    /// assert_eq!(kept, "<domaincheckpoint><disks><disk name='vda' checkpoint='no'/><disk name='vdb' checkpoint='bitmap' bitmap='c'/></disks><domain><devices><disk type='file'/></devices></domain></domaincheckpoint>");
    /// ```
    pub fn with_bitmaps_only(xml: &str, keep: &[&str]) -> String {
        let (Some(start), Some(end)) = (xml.find("<disks>"), xml.find("</disks>")) else { return xml.to_owned() };
        if end < start {
            return xml.to_owned();
        }
        let mut out = String::from(&xml[..start]);
        let mut rest = &xml[start..end];
        while let Some(i) = rest.find("<disk ") {
            out.push_str(&rest[..i]);
            let close = rest[i..].find("/>").map_or(rest.len(), |j| i + j + 2);
            let element = &rest[i..close];
            match attribute(element, "name") {
                Some(name) if !keep.contains(&name) => {
                    out.push_str(&format!("<disk name='{name}' checkpoint='no'/>"));
                }
                _ => out.push_str(element),
            }
            rest = &rest[close..];
        }
        out.push_str(rest);
        out.push_str(&xml[end..]);
        out
    }

    /// Parses a checkpoint document.
    pub fn parse(xml: &str) -> Result<Checkpoint, XmlError> {
        let raw: XmlCheckpoint = quick_xml::de::from_str(xml).map_err(|e| XmlError { detail: e.to_string() })?;
        Ok(Checkpoint {
            name: raw.name,
            parent: raw.parent.and_then(|p| p.name),
            disks: raw
                .disks
                .map(|d| d.disks)
                .unwrap_or_default()
                .into_iter()
                .map(|d| (d.name, d.checkpoint.as_deref() != Some("no")))
                .collect(),
        })
    }
}

/// The value of attribute `name` in one XML start tag (either quote).
fn attribute<'a>(element: &'a str, name: &str) -> Option<&'a str> {
    for quote in ['\'', '"'] {
        let key = format!(" {name}={quote}");
        if let Some(i) = element.find(&key) {
            let value = &element[i + key.len()..];
            return value.find(quote).map(|j| &value[..j]);
        }
    }
    None
}

#[derive(Debug, Deserialize)]
struct XmlCheckpoint {
    name: Option<String>,
    parent: Option<XmlParent>,
    disks: Option<XmlCheckpointDisks>,
}

#[derive(Debug, Deserialize)]
struct XmlParent {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct XmlCheckpointDisks {
    #[serde(rename = "disk", default)]
    disks: Vec<XmlCheckpointDisk>,
}

#[derive(Debug, Deserialize)]
struct XmlCheckpointDisk {
    #[serde(rename = "@name")]
    name: String,
    #[serde(rename = "@checkpoint")]
    checkpoint: Option<String>,
}
