//! The lab fixtures against the real libvirtd and the real test guest.

use std::path::Path;
use std::time::{Duration, Instant};

use nasbak_testlab::{DiskKind, DiskSpec, DomainSpec, shared_agent_guest, virsh};

#[test]
fn a_stopped_domain_with_every_kind_of_disk_is_created_and_removed_with_its_files() {
    let dom = DomainSpec::new("mix")
        .disk(DiskSpec::qcow2(16))
        .disk(DiskSpec::raw(8).ext4())
        .disk(DiskSpec::block(8))
        .disk(DiskSpec::cdrom())
        .create();
    let name = dom.name().to_owned();
    let dir = dom.dir().to_owned();
    assert_eq!(virsh(&["domstate", &name]).unwrap().trim(), "shut off");
    let list = virsh(&["domblklist", &name, "--details"]).unwrap();
    for disk in dom.disks() {
        let line =
            list.lines().find(|l| l.contains(&disk.target)).unwrap_or_else(|| panic!("{} not in\n{list}", disk.target));
        assert!(line.contains(&*disk.path.to_string_lossy()), "{line}");
        let expect = match disk.kind {
            DiskKind::Block => "block",
            DiskKind::Cdrom => "cdrom",
            _ => "file",
        };
        assert!(line.contains(expect), "{line}");
    }
    let info = nasbak_process::ExternalCommand::new("qemu-img").args(["info"]).arg(&dom.disks()[0].path).run().unwrap();
    assert!(info.stdout_text().contains("file format: qcow2"));
    let loop_dev = dom.disks()[2].path.clone();
    assert!(loop_dev.to_string_lossy().starts_with("/dev/loop"), "{loop_dev:?}");
    drop(dom);
    assert!(virsh(&["domstate", &name]).is_err(), "{name} still defined");
    assert!(!dir.exists(), "{dir:?} left behind");
    let loops = nasbak_process::ExternalCommand::new("losetup").args(["-l", "-n"]).run().unwrap().stdout_text();
    assert!(!loops.contains(&*dir.to_string_lossy()), "loop device left: {loops}");
}

#[test]
fn the_shared_guest_freezes_and_thaws_a_real_ext4_file_system() {
    let dom = shared_agent_guest();
    let froze = virsh(&["domfsfreeze", dom.name()]).unwrap();
    let status = dom.agent_command(r#"{"execute":"guest-fsfreeze-status"}"#);
    let thawed = virsh(&["domfsthaw", dom.name()]).unwrap();
    assert!(froze.contains("Froze 1 filesystem"), "{froze}");
    assert_eq!(status, r#"{"return":"frozen"}"#);
    assert!(thawed.contains("Thawed 1 filesystem"), "{thawed}");
    assert_eq!(dom.agent_command(r#"{"execute":"guest-fsfreeze-status"}"#), r#"{"return":"thawed"}"#);
    let info = dom.agent_command(r#"{"execute":"guest-get-fsinfo"}"#);
    assert!(info.contains(r#""mountpoint":"/data""#) && info.contains("ext4"), "{info}");
}

#[test]
fn a_running_domain_without_an_agent_fails_agent_calls_quickly() {
    let dom = DomainSpec::new("noagent").disk(DiskSpec::raw(8)).running(true).create();
    assert!(dom.is_running());
    let start = Instant::now();
    let err = dom.try_agent_command(r#"{"execute":"guest-ping"}"#).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(15), "{:?}", start.elapsed());
    assert!(err.contains("agent"), "{err}");
    let dir = dom.dir().to_owned();
    drop(dom);
    assert!(!Path::new(&dir).exists());
}
