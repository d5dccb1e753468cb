//! Builders the unit tests share.

use nasbak_repo::{BackupMode, Manifest, ManifestDisk};

/// A full backup `id` of VM `vm` on repository `r` holding `disks` (target, volume), each as
/// `datadisk.<volume>.qcow2` of 1 byte, with no checkpoint.
pub(crate) fn manifest(id: &str, disks: &[(&str, &str)]) -> Manifest {
    let t = chrono::DateTime::from_timestamp(0, 0).expect("the epoch");
    Manifest {
        version: 1,
        id: id.into(),
        repository: "r".into(),
        vm: "vm".into(),
        method: nasbak_repo::BackupMethod::QemuImg,
        started: t,
        finished: t,
        quiesced: false,
        quiesce_note: None,
        libvirt_version: None,
        qemu_version: None,
        schedule: None,
        disks: disks
            .iter()
            .map(|(target, volume)| ManifestDisk {
                target: target.to_string(),
                volume: volume.to_string(),
                source: String::new(),
                source_format: None,
                file: format!("datadisk.{volume}.qcow2"),
                format: "qcow2".into(),
                virtual_size: 1,
                size: 1,
                checksum: None,
                mode: BackupMode::Full,
                backing: None,
                full_reason: None,
                stored_as: nasbak_repo::FileFormat::Plain,
                rbd_snapshot: None,
                reference: false,
            })
            .collect(),
        mode: BackupMode::Full,
        parent: None,
        checkpoint: None,
        full_reason: None,
        state: Vec::new(),
        state_note: None,
    }
}
