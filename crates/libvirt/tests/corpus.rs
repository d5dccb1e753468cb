//! libvirt's own test data (`../shared/corpus`, beside the project): every domain, live status
//! and backup document must parse, with every disk accounted for.

use std::fs;
use std::path::{Path, PathBuf};

use nasbak_libvirt::{Checkpoint, DiskDevice, DiskSource, Domain, PushBackup};

fn corpus(sub: &str) -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus").join(sub);
    let Ok(entries) = fs::read_dir(&dir) else {
        assert!(std::env::var_os("CI").is_none(), "the corpus {} is missing in CI", dir.display());
        eprintln!("no corpus at {}; nothing to parse", dir.display());
        return Vec::new();
    };
    let mut files: Vec<_> =
        entries.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "xml")).collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), fs::read_to_string(&p).unwrap())).collect()
}

/// `<disk ` or `<disk>` occurrences inside the first `<devices>` element of the `<domain>`
/// (a live status document has another `<devices>` of its own before it).
fn disks_in_devices(xml: &str) -> usize {
    let domain = xml.find("<domain ").or_else(|| xml.find("<domain>")).unwrap_or(0);
    let start = domain + xml[domain..].find("<devices>").unwrap_or(0);
    let end = xml[start..].find("</devices>").map(|e| start + e).unwrap_or(xml.len());
    let part = &xml[start..end];
    part.matches("<disk ").count() + part.matches("<disk>").count()
}

#[test]
fn every_domain_and_status_document_parses_with_all_its_disks() {
    let mut checked = 0;
    for sub in ["domain", "status"] {
        for (path, xml) in corpus(sub) {
            let d = Domain::parse(&xml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(d.disks.len(), disks_in_devices(&xml), "{}", path.display());
            for disk in &d.disks {
                assert!(!disk.target.is_empty(), "{}: a disk without target", path.display());
            }
            checked += 1;
        }
    }
    if checked > 0 {
        assert!(checked >= 40, "only {checked} documents");
    }
}

#[test]
fn the_model_reads_what_backup_needs() {
    let files = corpus("domain");
    if files.is_empty() {
        return;
    }
    let get = |name: &str| {
        let (_, xml) = files.iter().find(|(p, _)| p.file_name().unwrap() == name).expect(name);
        Domain::parse(xml).unwrap()
    };
    // An 11-layer chain, ending at the layer that has no source.
    let chains = get("disk-backing-chains-index.xml");
    assert!(
        chains.disks.iter().any(|d| d.backing_chain.len() >= 10),
        "{:#?}",
        chains.disks.iter().map(|d| d.backing_chain.len()).collect::<Vec<_>>()
    );
    // rbd with monitors and a secret reference.
    let rbd = get("disk-network-rbd.xml");
    let with_auth = rbd.disks.iter().find_map(|d| match &d.source {
        Some(DiskSource::Network { protocol, hosts, auth: Some(a), .. }) if protocol == "rbd" => {
            Some((hosts.len(), a.clone()))
        }
        _ => None,
    });
    let (hosts, auth) = with_auth.expect("an rbd disk with auth");
    let shown = rbd.disks[0].source.as_ref().unwrap().to_string();
    assert!(shown.starts_with("rbd:"), "{shown}");
    assert!(hosts >= 1);
    assert_eq!(auth.secret_type.as_deref(), Some("ceph"));
    // Empty cdroms are skipped with a reason; nothing else in that file is backed up.
    let cdrom = get("disk-cdrom.xml");
    let (chosen, skipped) = cdrom.backup_selection();
    assert!(skipped.iter().any(|s| s.reason.contains("cdrom")));
    assert!(chosen.iter().all(|d| d.device != DiskDevice::Cdrom));
    // Shareable disks are skipped.
    let shared = get("disk-shared.xml");
    assert!(shared.backup_selection().1.iter().any(|s| s.reason.contains("shareable")));
    // Volume sources keep pool and volume.
    let pool = get("disk-source-pool-mode.x86_64-latest.xml");
    assert!(pool.disks.iter().any(|d| matches!(&d.source, Some(DiskSource::Volume { .. }))));
    // 105 disks by target.
    let many = get("pci-bridge-many-disks.xml");
    assert!(many.disks.len() >= 100 && many.disk("vdzd").is_some());
    // A disk's own encryption, in its <source> and in the older place, the <disk>.
    for (name, encrypted) in [("luks-disks-source-qcow2.xml", 2), ("encrypted-disk.xml", 1), ("luks-disks.xml", 2)] {
        let d = get(name);
        let with: Vec<_> = d.disks.iter().filter_map(|x| x.encryption.as_ref()).collect();
        assert!(with.len() >= encrypted, "{name}: {with:?}");
        assert!(with.iter().all(|e| e.secret_uuid.is_some() || e.secret_usage.is_some()), "{name}: {with:?}");
    }
    let qcow2 = get("luks-disks-source-qcow2.xml");
    let vda = qcow2.disk("vda").unwrap().encryption.clone().unwrap();
    assert_eq!(
        (vda.format.as_str(), vda.secret_uuid.as_deref()),
        ("luks", Some("0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"))
    );
    assert_eq!(
        qcow2.disk("vdb").unwrap().encryption.as_ref().unwrap().secret_usage.as_deref(),
        Some("/storage/guest_disks/encryptdisk2")
    );
    assert!(get("disk-cdrom.xml").disks.iter().all(|x| x.encryption.is_none()));
}

#[test]
fn every_backup_document_parses_with_all_its_disks() {
    for (path, xml) in corpus("backup") {
        let b = PushBackup::parse(&xml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let listed = xml.matches("<disk ").count();
        assert_eq!(b.targets.len() + b.excluded.len(), listed, "{}", path.display());
    }
}

#[test]
fn every_checkpoint_document_parses_with_all_its_disks() {
    for (path, xml) in corpus("checkpoint") {
        if path.ends_with("disk-invalid.xml") {
            // A disk without a name: libvirt rejects it, and so do we.
            assert!(Checkpoint::parse(&xml).is_err());
            continue;
        }
        let c = Checkpoint::parse(&xml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Only the checkpoint's own <disks>; an embedded <domain> has disks of its own.
        let own = xml.find("<disks>").map(|i| &xml[i..i + xml[i..].find("</disks>").unwrap()]).unwrap_or("");
        assert_eq!(c.disks.len(), own.matches("<disk ").count() + own.matches("<disk/>").count(), "{}", path.display());
        if path.ends_with("out-sample.xml") {
            assert_eq!(c.parent.as_deref(), Some("1525111885"));
            assert_eq!(c.disks, [("vda".to_owned(), true), ("vdb".to_owned(), false)]);
        }
    }
}
