//! What the NAS guest's suites (`nas_cephfs.rs`, `nas_mount.rs`) share: there is no libvirt in
//! the guest, so the hypervisor is a mock that describes one shut-off VM.

use std::path::Path;

use nasbak::mock::MockHypervisor;
use nasbak::nasbak_libvirt::{DomainState, JobInfo, JobKind, LibvirtError};

/// A hypervisor that knows one shut-off VM `vm` with these disks: (target, format, file).
pub fn shut_off_vm(vm: &str, disks: &[(&str, &str, &Path)]) -> MockHypervisor {
    let devices: String = disks
        .iter()
        .map(|(target, format, file)| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{}'/>\
                 <target dev='{target}' bus='virtio'/></disk>",
                file.display()
            )
        })
        .collect();
    let xml = format!(
        "<domain type='kvm'><name>{vm}</name><uuid>6a7c3a52-7d6e-4f0a-9d43-0c7f3b1d2e11</uuid><devices>{devices}</devices></domain>"
    );
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(|_| Ok(DomainState::ShutOff));
    let x = xml.clone();
    hv.expect_domain_xml().returning(move |_| Ok(x.clone()));
    hv.expect_inactive_xml().returning(move |_| Ok(xml.clone()));
    hv.expect_current_job().returning(|_| {
        Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
    });
    hv.expect_versions().returning(|| Err(LibvirtError::new("no libvirt in the NAS guest")));
    hv.expect_checkpoints().returning(|_| Ok(Vec::new()));
    hv
}
