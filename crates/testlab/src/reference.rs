//! Backups written as the reference system's host script (CloudStack's `nasbackup.sh`, 4.22
//! and 4.23) writes them, for tests that read them: made with the same tools and steps
//! (`virsh backup-begin` with a checkpoint, polling `domjobinfo`, `dumpxml`, `qemu-img rebase
//! -u`, `qemu-img convert -O qcow2` for a shut-off VM), in nasbak's words.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nasbak_process::ExternalCommand;

use crate::domain::{LabDomain, virsh};

/// A push backup of the running `dom` into `dest` as the script runs it: each `(target, file)`
/// of `disks` into `dest/<file>` (qcow2), the checkpoint `checkpoint` created with it when
/// given (the script's full-only mode, which a VM with RBD disks gets, creates none), an
/// incremental since the checkpoint `since` when given; waited for by polling `domjobinfo
/// --completed --keep-completed`; then the domain's XML saved as `domain-config.xml`.
pub fn push_backup(
    dom: &LabDomain,
    dest: &Path,
    disks: &[(&str, String)],
    checkpoint: Option<&str>,
    since: Option<&str>,
) {
    fs::create_dir_all(dest).expect("the backup directory");
    let mut backup = String::from("<domainbackup mode='push'>");
    if let Some(parent) = since {
        backup.push_str(&format!("<incremental>{parent}</incremental>"));
    }
    backup.push_str("<disks>");
    let mut cp = format!("<domaincheckpoint><name>{}</name><disks>", checkpoint.unwrap_or_default());
    for (target, file) in disks {
        let mode = if since.is_some() { "" } else { " backupmode='full'" };
        backup.push_str(&format!(
            "<disk name='{target}' backup='yes' type='file'{mode}><driver type='qcow2'/><target file='{}'/></disk>",
            dest.join(file).display()
        ));
        cp.push_str(&format!("<disk name='{target}'/>"));
    }
    backup.push_str("</disks></domainbackup>");
    cp.push_str("</disks></domaincheckpoint>");
    let (b, c) = (dest.join("backup.xml"), dest.join("checkpoint.xml"));
    fs::write(&b, backup).expect("backup.xml");
    fs::write(&c, cp).expect("checkpoint.xml");
    let (b_arg, c_arg) = (b.to_string_lossy().into_owned(), c.to_string_lossy().into_owned());
    let mut begin = vec!["backup-begin", "--domain", dom.name(), "--backupxml", &b_arg];
    if checkpoint.is_some() {
        begin.extend(["--checkpointxml", &c_arg]);
    }
    virsh(&begin).expect("backup-begin");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !virsh(&["domjobinfo", dom.name(), "--completed", "--keep-completed"])
        .unwrap_or_default()
        .contains("Completed")
    {
        assert!(Instant::now() < deadline, "the reference system's backup job did not complete");
        std::thread::sleep(Duration::from_millis(200));
    }
    let xml = virsh(&["dumpxml", dom.name()]).expect("dumpxml");
    fs::write(dest.join("domain-config.xml"), xml).expect("domain-config.xml");
    let _ = fs::remove_file(b);
    let _ = fs::remove_file(c);
}

/// `qemu-img rebase -u -F qcow2 -b BACKING FILE`: the script's last step of an incremental,
/// which points the file at its parent's (relative to the file's directory, or by the path it
/// had under the script's temporary mount point).
pub fn rebase(file: &Path, backing: &str) {
    ExternalCommand::new("qemu-img")
        .args(["rebase", "-u", "-F", "qcow2", "-b", backing])
        .arg(file)
        .run()
        .expect("qemu-img rebase");
}

/// The backup of a shut-off VM's disk `source` (a path or an `rbd:` filename) into
/// `dest/<file>` as the script makes it: `qemu-img convert -O qcow2`.
pub fn convert(source: &str, dest: &Path, file: &str) {
    fs::create_dir_all(dest).expect("the backup directory");
    ExternalCommand::new("qemu-img")
        .args(["convert", "-O", "qcow2", source])
        .arg(dest.join(file))
        .timeout(Duration::from_secs(300))
        .run()
        .expect("qemu-img convert");
}
