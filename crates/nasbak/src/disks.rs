//! Which disk is which: a disk's volume identity, where qemu-img finds it, and the name of its
//! file in a backup.

use nasbak_libvirt::{Disk, DiskSource};
use nasbak_qemu_img::ImageLocation;
use nasbak_repo::VolumeName;
use nasbak_repo::model::layout::{DiskRole, disk_file_names};

use crate::error::BackupError;

/// The volume identity of a disk: the source file's stem when it is a valid name, else the target.
pub(crate) fn volume_of(disk: &Disk) -> VolumeName {
    let stem = match &disk.source {
        Some(DiskSource::File(p) | DiskSource::Block(p)) => p.file_stem().map(|s| s.to_string_lossy().into_owned()),
        Some(DiskSource::Volume { volume, .. }) => Some(volume.clone()),
        Some(DiskSource::Network { name, .. }) => name.as_ref().and_then(|n| n.rsplit('/').next().map(str::to_owned)),
        _ => None,
    };
    stem.and_then(|s| VolumeName::new(&s).ok())
        .unwrap_or_else(|| VolumeName::new(&disk.target).expect("targets are plain names"))
}

/// Each chosen disk with its backup file: the first is the root disk, the others data disks;
/// names are the reference's where unique, disambiguated by target where volumes collide
/// ([`disk_file_names`]).
pub(crate) fn backup_files<'a>(chosen: &[&'a Disk]) -> Vec<(&'a Disk, String)> {
    let volumes: Vec<VolumeName> = chosen.iter().map(|d| volume_of(d)).collect();
    let described: Vec<(DiskRole, &VolumeName, &str)> = chosen
        .iter()
        .zip(&volumes)
        .enumerate()
        .map(|(i, (d, v))| (if i == 0 { DiskRole::Root } else { DiskRole::Data }, v, d.target.as_str()))
        .collect();
    chosen.iter().copied().zip(disk_file_names(&described)).collect()
}

/// [`disk_location`], and for an RBD disk whose `<auth>` names a libvirt secret that libvirt
/// gives out, its key (written to a 0600 keyring for each command, never on argv). A private
/// secret leaves the client's keyring on this host (`/etc/ceph/ceph.client.ID.keyring`).
pub(crate) fn keyed_location(hypervisor: &impl nasbak_libvirt::Hypervisor, disk: &Disk) -> Option<ImageLocation> {
    keyed_source(hypervisor, disk).ok()
}

/// [`keyed_location`], or an error naming a disk nasbak cannot read: a source it does not
/// know, or an RBD disk whose key it cannot find (the secret private, no keyring on the host
/// and no ceph.conf of the domain's that could name one).
pub(crate) fn keyed_source(
    hypervisor: &impl nasbak_libvirt::Hypervisor,
    disk: &Disk,
) -> Result<ImageLocation, BackupError> {
    let mut location = disk_location(disk).ok_or_else(|| BackupError::Unsupported {
        what: format!("disk {} of a shut-off VM with source {:?}", disk.target, disk.source),
    })?;
    if let (ImageLocation::Rbd(spec), Some(DiskSource::Network { auth: Some(auth), .. })) =
        (&mut location, &disk.source)
        && (auth.secret_uuid.is_some() || auth.secret_usage.is_some())
    {
        match hypervisor.secret_value(auth) {
            Ok(key) => spec.auth = nasbak_qemu_img::RbdAuth::Key(key),
            Err(e) => {
                let user = spec.id.clone().unwrap_or_else(|| "admin".into());
                if spec.conf.is_none() && !host_keyring_exists(&user) {
                    return Err(BackupError::NoCephKey {
                        disk: disk.target.clone(),
                        secret: auth.secret_uuid.clone().or_else(|| auth.secret_usage.clone()).unwrap_or_default(),
                        user,
                        reason: e.message,
                    });
                }
            }
        }
    }
    Ok(location)
}

/// Whether librados finds a keyring for `client.<user>` where it looks by default.
fn host_keyring_exists(user: &str) -> bool {
    [
        format!("/etc/ceph/ceph.client.{user}.keyring"),
        "/etc/ceph/ceph.keyring".into(),
        "/etc/ceph/keyring".into(),
        "/etc/ceph/keyring.bin".into(),
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}

/// Where qemu-img finds a disk: a file or block device path, or an RBD image with the domain's
/// monitors, ceph.conf and client id (the key: see [`keyed_source`]).
pub(crate) fn disk_location(disk: &Disk) -> Option<ImageLocation> {
    match &disk.source {
        Some(DiskSource::File(p) | DiskSource::Block(p)) => Some(ImageLocation::Path(p.clone())),
        Some(DiskSource::Network { protocol, name: Some(name), hosts, auth, config }) if protocol == "rbd" => {
            let parts: Vec<&str> = name.split('/').collect();
            let mut spec = match parts.as_slice() {
                [pool, image] => nasbak_qemu_img::RbdSpec::new(pool, image),
                [pool, namespace, image] => {
                    let mut s = nasbak_qemu_img::RbdSpec::new(pool, image);
                    s.namespace = Some((*namespace).to_owned());
                    s
                }
                _ => return None,
            };
            spec.mon_hosts = hosts
                .iter()
                .filter_map(|h| {
                    let host = h.name.clone()?;
                    Some(match h.port {
                        Some(port) if host.contains(':') => format!("[{host}]:{port}"),
                        Some(port) => format!("{host}:{port}"),
                        None => host,
                    })
                })
                .collect();
            spec.conf.clone_from(config);
            spec.id = auth.as_ref().and_then(|a| a.username.clone());
            Some(ImageLocation::Rbd(spec))
        }
        _ => None,
    }
}
