//! Off-site targets against the lab's S3 gateway (radosgw over the lab Ceph cluster, HTTPS with
//! the lab's own CA; `cargo xtask lab s3 up`): the target check writes, reads back and proves
//! the object lock; a lock asked of a bucket without one, wrong credentials and an unknown CA are
//! refused with errors that say so; no secret is ever shown. awscli, an independent client,
//! checks what the store holds.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::ImageLocation;
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{
    BackupRepository, Compression, Encryption, KeySource, LockMode, MountTimeouts, ObjectLock, ObjectTarget,
    Protection, RepositoryKind, RepositoryMounts, RetentionPolicy, S3Credentials, SystemMounter,
};
use nasbak::objstore::{CHECK_DIR, ObjectStore};
use nasbak::{
    BackupError, BackupOutcome, BackupRequest, CopyReport, CopyResult, CopySelection, Engine, FileStatus, Phase,
    RestoreRequest, VolumeRestoreRequest,
};
use nasbak_testlab::s3::LabS3;
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

/// Held for reading by every test, and for writing by the one that stops the gateway.
static GATEWAY: RwLock<()> = RwLock::new(());

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

fn engine(runtime: &Path) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts).with_agent_timeout(Duration::from_secs(10))
}

fn repository(dom: &LabDomain, name: &str) -> BackupRepository {
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = RepositoryKind::from_parts("shared", None).unwrap();
    BackupRepository::new(name, kind, root.to_str().unwrap(), "", None).unwrap()
}

fn backup(e: &LabEngine, dom: &LabDomain, repo: &BackupRepository) -> BackupOutcome {
    let request = BackupRequest::new(dom.name(), repo.clone());
    e.backup(&request, &CancelHandle::new(), &mut |_| {}).unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)))
}

fn target(lab: &LabS3, name: &str, bucket: &str, prefix: &str) -> ObjectTarget {
    ObjectTarget::new(name, &lab.endpoint, bucket, Some(prefix), S3Credentials::File(lab.credentials.clone()))
        .unwrap()
        .with_ca_file(&lab.ca_file)
        .unwrap()
}

/// Every backup of `vm` on `repo` copied to `store`.
fn copy_vm(e: &LabEngine, repo: &BackupRepository, store: &ObjectStore, vm: &str) -> Result<CopyReport, BackupError> {
    e.catalog().copy_to_target(repo, store, &CopySelection::Vm(vm.into()), None, &CancelHandle::new(), &mut |_| {})
}

/// A prefix of this test process's own.
fn prefix(what: &str) -> String {
    format!("tests/{what}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple())
}

#[test]
fn a_check_of_a_locked_target_writes_reads_back_and_proves_the_lock() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let p = prefix("locked");
    let t =
        target(&lab, "offsite", &lab.bucket_locked, &p).with_lock(ObjectLock::new(LockMode::Compliance, 1).unwrap());
    let store = ObjectStore::connect(&t).unwrap();
    let check = store.check().unwrap();
    assert!(check.bucket_lock);
    assert_eq!(check.probe_bytes, 64 << 10);
    assert_eq!(check.lock_holds, Some(true), "deleting the locked probe's version was refused");
    // Seen by another client: the probe is there, locked in compliance mode.
    let versions = lab
        .aws(&[
            "s3api",
            "list-object-versions",
            "--bucket",
            &lab.bucket_locked,
            "--prefix",
            &format!("{p}/{CHECK_DIR}/"),
        ])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&versions).unwrap();
    let probe = &v["Versions"][0];
    let key = probe["Key"].as_str().unwrap();
    let retention = lab
        .aws(&[
            "s3api",
            "get-object-retention",
            "--bucket",
            &lab.bucket_locked,
            "--key",
            key,
            &format!("--version-id={}", probe["VersionId"].as_str().unwrap()),
        ])
        .unwrap();
    assert!(retention.contains("COMPLIANCE"), "{retention}");
    // And the other client, with the same credentials, cannot delete it either.
    let refused = lab
        .aws(&[
            "s3api",
            "delete-object",
            "--bucket",
            &lab.bucket_locked,
            "--key",
            key,
            &format!("--version-id={}", probe["VersionId"].as_str().unwrap()),
        ])
        .unwrap_err();
    assert!(refused.contains("AccessDenied"), "{refused}");
}

#[test]
fn a_check_without_lock_leaves_nothing_and_a_lock_on_a_bucket_without_one_is_refused() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let p = prefix("plain");
    let plain = target(&lab, "plain", &lab.bucket_plain, &p);
    let check = ObjectStore::connect(&plain).unwrap().check().unwrap();
    assert!(!check.bucket_lock);
    assert_eq!(check.lock_holds, None);
    let left = lab.aws(&["s3api", "list-objects-v2", "--bucket", &lab.bucket_plain, "--prefix", &p]).unwrap();
    assert!(!left.contains("\"Key\""), "the probe was removed: {left}");
    let locked = plain.with_lock(ObjectLock::new(LockMode::Governance, 7).unwrap());
    let e = ObjectStore::connect(&locked).unwrap().check().unwrap_err().to_string();
    assert!(e.contains("has no object lock") && e.contains(&lab.bucket_plain), "{e}");
}

#[test]
fn wrong_credentials_an_unknown_ca_and_a_missing_bucket_are_said_and_no_secret_is_shown() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let secret = lab.secret_key();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("credentials");
    fs::write(&wrong, format!("[default]\naws_access_key_id = NASBAKNOSUCHKEY\naws_secret_access_key = {}x\n", secret))
        .unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let t = ObjectTarget::new("wrong", &lab.endpoint, &lab.bucket_locked, None, S3Credentials::File(wrong))
        .unwrap()
        .with_ca_file(&lab.ca_file)
        .unwrap();
    let store = ObjectStore::connect(&t).unwrap();
    let e = store.check().unwrap_err().to_string();
    assert!(e.contains("refuses these credentials"), "{e}");
    // TLS is verified: without the lab's CA the endpoint's certificate is not trusted.
    let t = ObjectTarget::new(
        "noca",
        &lab.endpoint,
        &lab.bucket_locked,
        None,
        S3Credentials::File(lab.credentials.clone()),
    )
    .unwrap();
    let store = ObjectStore::connect(&t).unwrap();
    let e2 = store.check().unwrap_err().to_string();
    assert!(e2.to_lowercase().contains("certificate"), "{e2}");
    let t = target(&lab, "nobucket", "nasbak-no-such-bucket", "x");
    let e3 = ObjectStore::connect(&t).unwrap().check().unwrap_err().to_string();
    assert!(e3.contains("no bucket nasbak-no-such-bucket"), "{e3}");
    for said in [&e, &e2, &e3, &format!("{store:?}"), &format!("{t:?}")] {
        assert!(!said.contains(&secret), "a secret in: {said}");
    }
}

#[test]
fn a_chain_copied_to_a_locked_target_is_whole_there_locked_verified_and_not_copied_twice() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let dom = DomainSpec::new("s3chain").disk(DiskSpec::qcow2(64)).running(true).create();
    let repo = repository(&dom, "s3chain");
    let e = engine(&dom.dir().join("runtime"));
    dom.write_through_qemu(0, 0x11, "0", "40M");
    let full = backup(&e, &dom, &repo);
    dom.write_through_qemu(0, 0x22, "8M", "4M");
    let inc = backup(&e, &dom, &repo);
    assert_eq!(inc.manifest.parent.as_deref(), Some(full.manifest.id.as_str()), "an incremental on the full");

    let p = prefix("chain");
    let t =
        target(&lab, "offsite", &lab.bucket_locked, &p).with_lock(ObjectLock::new(LockMode::Governance, 1).unwrap());
    let store = ObjectStore::connect(&t).unwrap();
    let catalog = e.catalog();
    // The incremental alone is asked for: its full goes first.
    let selection = CopySelection::Backup { vm: dom.name().to_owned(), id: inc.manifest.id.clone() };
    let mut phases = Vec::new();
    let report = catalog
        .copy_to_target(&repo, &store, &selection, None, &CancelHandle::new(), &mut |p| phases.push(p.phase))
        .unwrap();
    let ids: Vec<(&str, &CopyResult)> = report.backups.iter().map(|b| (b.id.as_str(), &b.result)).collect();
    assert_eq!(
        ids,
        [(full.manifest.id.as_str(), &CopyResult::Copied), (inc.manifest.id.as_str(), &CopyResult::Copied)],
        "parent first"
    );
    assert!(phases.iter().all(|p| *p == Phase::Upload) && !phases.is_empty());
    let first = &report.backups[0];
    assert!(first.sent > 40 << 20, "the full's 40 MiB went up: {first:?}");
    assert!(first.locked_until.is_some());

    // On the target: both, complete, with their manifests; every object locked (governance),
    // as another client sees it.
    let listed = nasbak::target_backups(&store, None).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|b| b.manifest.is_some() && b.incomplete.is_none()));
    let disk_key = format!("{}/{}/{}", dom.name(), full.manifest.id, full.manifest.disks[0].file);
    let head: serde_json::Value = serde_json::from_str(
        &lab.aws(&["s3api", "head-object", "--bucket", &lab.bucket_locked, "--key", &format!("{p}/{disk_key}")])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(head["ObjectLockMode"], "GOVERNANCE", "{head}");
    assert!(head["Metadata"]["nasbak-checksum"].as_str().unwrap().starts_with("blake3:"), "{head}");

    // A locked backup's delete, with the same credentials, is refused by the store.
    let version = store.head(&disk_key).unwrap().unwrap().version.expect("a versioned bucket");
    let refused = store.delete(&disk_key, Some(&version)).unwrap_err();
    assert!(refused.detail.contains("AccessDenied") || refused.detail.contains("lock"), "{refused}");
    assert_eq!(store.head(&disk_key).unwrap().unwrap().version.as_deref(), Some(version.as_str()), "still there");

    // Verified there, object by object, against the manifests' checksums.
    let reports = nasbak::verify_target(&store, None, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.ok()), "{reports:#?}");

    // Copied again: nothing goes up.
    let again = copy_vm(&e, &repo, &store, dom.name()).unwrap();
    assert!(again.backups.iter().all(|b| b.result == CopyResult::AlreadyCopied && b.sent == 0), "{again:?}");
    cleanup_governance(&lab, &lab.bucket_locked, &p);

    // Pruned on a target (here one without lock) by last=1: the incremental is kept, and so is
    // the full it builds on, which a target never merges away.
    let plain = ObjectStore::connect(&target(&lab, "plain", &lab.bucket_plain, &p)).unwrap();
    copy_vm(&e, &repo, &plain, dom.name()).unwrap();
    let last1: RetentionPolicy = "last=1".parse().unwrap();
    let report = nasbak::prune_target(&plain, dom.name(), Some(&last1), &BTreeMap::new(), false).unwrap();
    assert!(report.decisions.iter().all(|d| d.keep), "{report:?}");
    let kept_full = report.decisions.iter().find(|d| d.id == full.manifest.id).unwrap();
    assert!(kept_full.reason.contains("builds on it"), "{kept_full:?}");
    assert_eq!(nasbak::target_backups(&plain, None).unwrap().len(), 2);
    remove_plain(&lab, &p);
}

#[test]
fn prune_on_a_target_keeps_what_is_locked_says_until_when_and_removes_the_rest_elsewhere() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let dom = DomainSpec::new("s3prune").disk(DiskSpec::raw(16)).running(false).create();
    let repo = repository(&dom, "s3prune");
    let e = engine(&dom.dir().join("runtime"));
    let ids: Vec<String> = (0..3).map(|_| backup(&e, &dom, &repo).manifest.id).collect();
    let last1: RetentionPolicy = "last=1".parse().unwrap();
    let p = prefix("prune");
    let all = CopySelection::Vm(dom.name().into());
    // Locked: the two the retention would remove stay, each said locked until tomorrow.
    let t =
        target(&lab, "offsite", &lab.bucket_locked, &p).with_lock(ObjectLock::new(LockMode::Governance, 1).unwrap());
    let locked = ObjectStore::connect(&t).unwrap();
    e.catalog().copy_to_target(&repo, &locked, &all, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    let report = nasbak::prune_target(&locked, dom.name(), Some(&last1), &BTreeMap::new(), false).unwrap();
    assert_eq!(report.decisions.len(), 3);
    for d in report.decisions.iter().filter(|d| d.id != ids[2]) {
        assert!(d.keep && d.reason.contains("locked on the target until"), "{d:?}");
    }
    assert_eq!(nasbak::target_backups(&locked, None).unwrap().len(), 3);
    cleanup_governance(&lab, &lab.bucket_locked, &p);
    // Without a lock: they go, every version of every object, and the one kept still verifies.
    let plain = ObjectStore::connect(&target(&lab, "plain", &lab.bucket_plain, &p)).unwrap();
    e.catalog().copy_to_target(&repo, &plain, &all, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    let dry = nasbak::prune_target(&plain, dom.name(), Some(&last1), &BTreeMap::new(), true).unwrap();
    assert_eq!(dry.decisions.iter().filter(|d| !d.keep).count(), 2);
    assert_eq!(nasbak::target_backups(&plain, None).unwrap().len(), 3, "a dry run removes nothing");
    let report = nasbak::prune_target(&plain, dom.name(), Some(&last1), &BTreeMap::new(), false).unwrap();
    assert_eq!(report.decisions.iter().filter(|d| !d.keep).count(), 2, "{report:?}");
    let left = nasbak::target_backups(&plain, None).unwrap();
    assert_eq!(left.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), [ids[2].as_str()]);
    for gone in &ids[..2] {
        assert!(plain.versions(&format!("{}/{gone}/", dom.name())).unwrap().is_empty(), "{gone}");
    }
    all_verified(&plain);
    remove_plain(&lab, &p);
}

#[test]
fn a_copy_cut_off_mid_upload_resumes_from_its_last_part_and_a_corrupted_object_is_found() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let dom = DomainSpec::new("s3resume").disk(DiskSpec::raw(160)).running(false).create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[0].path, 150);
    let repo = repository(&dom, "s3resume");
    let e = engine(&dom.dir().join("runtime"));
    let b = backup(&e, &dom, &repo);
    let p = prefix("resume");
    let store = ObjectStore::connect(&target(&lab, "plain", &lab.bucket_plain, &p)).unwrap();
    let catalog = e.catalog();
    let selection = CopySelection::Vm(dom.name().into());

    // Cut off (Ctrl-C) past half of the disk file's upload.
    let cancel = CancelHandle::new();
    let mut seen = 0u64;
    let cut = catalog.copy_to_target(&repo, &store, &selection, None, &cancel, &mut |p| {
        if p.disk.as_deref().is_some_and(|d| d.ends_with(".qcow2")) && p.done * 2 > p.total {
            seen = p.done;
            cancel.cancel();
        }
    });
    assert!(matches!(cut, Err(nasbak::BackupError::Cancelled)), "{cut:?}");
    assert!(seen > 0);
    // Nothing claims to be copied: no manifest, an interrupted copy, an unfinished upload.
    let listed = nasbak::target_backups(&store, None).unwrap();
    assert!(listed.iter().all(|b| b.manifest.is_none()), "{listed:?}");
    assert!(listed.iter().all(|b| b.incomplete.as_deref().is_some_and(|r| r.contains("interrupted"))), "{listed:?}");
    let unfinished = store.unfinished_uploads(&format!("{}/", dom.name())).unwrap();
    assert_eq!(unfinished.len(), 1, "{unfinished:?}");

    // The upload is journaled on this host; without its journal (here removed, as after a
    // reboot) a resume checks each part it keeps against the file (`nasbak copy` killed and
    // resumed, in the CLI's test, keeps them by the journal).
    let journal = dom.dir().join("runtime").join("uploads");
    let journaled: Vec<_> = fs::read_dir(&journal).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(journaled.len(), 1, "{journaled:?}");
    assert!(fs::read_to_string(&journaled[0]).unwrap().contains(&unfinished[0].1), "the upload's id");
    fs::remove_file(&journaled[0]).unwrap();

    // Resumed: the parts that went up are kept (their MD5s checked), the rest is sent.
    let report = catalog.copy_to_target(&repo, &store, &selection, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    let copy = &report.backups[0];
    assert_eq!(copy.result, CopyResult::Copied);
    let disk_size =
        fs::metadata(repo.shared_path().unwrap().join(&b.relative_dir).join(&b.manifest.disks[0].file)).unwrap().len();
    assert!(copy.kept >= 32 << 20, "at least two parts kept: {copy:?}");
    assert!(copy.sent < disk_size, "less than the whole file sent again: {copy:?}");
    assert!(store.unfinished_uploads(&format!("{}/", dom.name())).unwrap().is_empty());
    assert_eq!(fs::read_dir(&journal).unwrap().count(), 0, "a completed upload's journal goes");
    all_verified(&store);

    // An object corrupted on the store (overwritten with other bytes) is found.
    let xml_key = format!("{}/{}/domain-config.xml", dom.name(), b.manifest.id);
    let object = format!("{p}/{xml_key}");
    let damaged = dom.dir().join("damaged.xml");
    fs::write(&damaged, "<domain>not the same</domain>").unwrap();
    // Keeping the checksum on the object, as a silent corruption would.
    let meta = store.head(&xml_key).unwrap().unwrap().checksum.unwrap();
    lab.aws(&[
        "s3api",
        "put-object",
        "--bucket",
        &lab.bucket_plain,
        "--key",
        &object,
        "--body",
        damaged.to_str().unwrap(),
        "--metadata",
        &format!("nasbak-checksum={meta}"),
    ])
    .unwrap();
    let reports = nasbak::verify_target(&store, None, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    let bad: Vec<_> = reports[0].files.iter().filter(|f| !f.ok()).collect();
    assert_eq!(bad.len(), 1, "{reports:#?}");
    assert_eq!((bad[0].file.as_str(), bad[0].status), ("domain-config.xml", FileStatus::Differs));
    remove_plain(&lab, &p);
}

#[test]
fn the_gateway_stopped_mid_upload_is_a_clear_error_and_nothing_claims_to_be_copied() {
    let _gateway = GATEWAY.write().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let dom = DomainSpec::new("s3cut").disk(DiskSpec::raw(96)).running(false).create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[0].path, 90);
    let repo = repository(&dom, "s3cut");
    let e = engine(&dom.dir().join("runtime"));
    backup(&e, &dom, &repo);
    let p = prefix("cut");
    let store = ObjectStore::connect(&target(&lab, "plain", &lab.bucket_plain, &p)).unwrap();
    let catalog = e.catalog();
    let selection = CopySelection::Vm(dom.name().into());
    let mut stopped = false;
    let started = std::time::Instant::now();
    let cut = catalog.copy_to_target(&repo, &store, &selection, None, &CancelHandle::new(), &mut |p| {
        if !stopped && p.total > 0 && p.done * 3 > p.total {
            stopped = true;
            lab.stop_gateway();
        }
    });
    let took = started.elapsed();
    lab.start_gateway();
    let err = cut.expect_err("the copy fails when the gateway goes away");
    assert!(stopped);
    let said = err.to_string();
    assert!(said.contains("target plain") && said.contains("failed"), "{said}");
    assert!(took < Duration::from_secs(180), "it gives up in time: {took:?}");
    // Nothing claims to be copied; a copy afterwards finishes it.
    let listed = nasbak::target_backups(&store, None).unwrap();
    assert!(listed.iter().all(|b| b.manifest.is_none()), "{listed:?}");
    let report = catalog.copy_to_target(&repo, &store, &selection, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(report.backups[0].result, CopyResult::Copied);
    all_verified(&store);
    remove_plain(&lab, &p);
}

#[test]
fn no_key_of_the_target_is_on_any_command_line_while_copying() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let dom = DomainSpec::new("s3argv").disk(DiskSpec::qcow2(16)).running(false).create();
    let repo = repository(&dom, "s3argv");
    let e = engine(&dom.dir().join("runtime"));
    backup(&e, &dom, &repo);
    let p = prefix("argv");
    let store = ObjectStore::connect(&target(&lab, "plain", &lab.bucket_plain, &p)).unwrap();
    let secret = lab.secret_key();
    let (report, seen) = nasbak_testlab::watching_argv(&secret, || copy_vm(&e, &repo, &store, dom.name()));
    assert_eq!(report.unwrap().backups[0].result, CopyResult::Copied);
    assert!(!seen, "the secret key was on a command line");
    assert!(!format!("{store:?}").contains(&secret));
    remove_plain(&lab, &p);
}

/// Every backup on the target verifies.
fn all_verified(store: &ObjectStore) {
    let reports = nasbak::verify_target(store, None, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(reports.iter().all(|r| r.ok()), "{reports:#?}");
}

/// Removes what a test wrote under `prefix` of the bucket without lock.
fn remove_plain(lab: &LabS3, prefix: &str) {
    let _ = lab.aws(&["s3", "rm", "--recursive", &format!("s3://{}/{prefix}", lab.bucket_plain)]);
}

/// Removes every version under `prefix` of a bucket whose objects are in governance mode
/// (the lab user may bypass it; a compliance lock could not be).
fn cleanup_governance(lab: &LabS3, bucket: &str, prefix: &str) {
    let listed = lab.aws(&["s3api", "list-object-versions", "--bucket", bucket, "--prefix", prefix]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap_or_default();
    for item in
        v["Versions"].as_array().into_iter().flatten().chain(v["DeleteMarkers"].as_array().into_iter().flatten())
    {
        let (Some(key), Some(id)) = (item["Key"].as_str(), item["VersionId"].as_str()) else { continue };
        let _ = lab.aws(&[
            "s3api",
            "delete-object",
            "--bucket",
            bucket,
            "--key",
            key,
            &format!("--version-id={}", id),
            "--bypass-governance-retention",
        ]);
    }
}

#[test]
fn objects_copied_before_the_target_locked_are_locked_by_the_next_copy() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    let dom = DomainSpec::new("s3relock").disk(DiskSpec::raw(16)).running(false).create();
    let repo = repository(&dom, "s3relock");
    let e = engine(&dom.dir().join("runtime"));
    let b = backup(&e, &dom, &repo);
    let p = prefix("relock");
    let all = CopySelection::Vm(dom.name().into());
    // First without a lock, into the bucket that has object lock: nothing is locked.
    let unlocked = ObjectStore::connect(&target(&lab, "offsite", &lab.bucket_locked, &p)).unwrap();
    e.catalog().copy_to_target(&repo, &unlocked, &all, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    let keys: Vec<String> = unlocked.list("").unwrap().into_iter().map(|o| o.key).collect();
    assert!(keys.iter().all(|k| unlocked.head(k).unwrap().unwrap().locked_until.is_none()), "{keys:?}");
    // The same target with its lock: the copy is not skipped, nothing is sent again, and every
    // object is locked.
    let t =
        target(&lab, "offsite", &lab.bucket_locked, &p).with_lock(ObjectLock::new(LockMode::Governance, 1).unwrap());
    let locked = ObjectStore::connect(&t).unwrap();
    let report = e.catalog().copy_to_target(&repo, &locked, &all, None, &CancelHandle::new(), &mut |_| {}).unwrap();
    let copy = &report.backups[0];
    assert_eq!((copy.id.as_str(), &copy.result), (b.manifest.id.as_str(), &CopyResult::Copied), "{report:?}");
    assert!(copy.kept > 0, "{copy:?}");
    for k in &keys {
        assert!(locked.head(k).unwrap().unwrap().locked_until.is_some(), "{k} is locked");
    }
    cleanup_governance(&lab, &lab.bucket_locked, &p);
}

/// Whether two images hold the same data (`qemu-img compare`).
fn same(a: &Path, b: &Path) -> bool {
    nasbak::nasbak_process::ExternalCommand::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .run_unchecked()
        .unwrap()
        .status
        .success()
}

/// What is mounted under `dir`, as /proc/self/mountinfo says.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_string_lossy().into_owned();
    info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&dir)).map(str::to_owned).collect()
}

#[test]
fn a_chain_whose_repository_is_gone_restores_from_the_target_at_every_point_plain_and_encrypted() {
    let _gateway = GATEWAY.read().unwrap_or_else(|e| e.into_inner());
    let lab = LabS3::get();
    // A dot in the VM's name: its objects and its view are found by the name as it is.
    let dom = DomainSpec::new("s3.from").disk(DiskSpec::qcow2(32)).disk(DiskSpec::raw(8)).create();
    let runtime = dom.dir().join("runtime");
    let e = engine(&runtime).with_runtime_dir(&runtime);
    let key = dom.dir().join("backup.key");
    fs::write(&key, "7bq0C4HzJ8yQ2yT1c2V9m0sXr5kLwP3aNfGd6hEiUoA=").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    for (name, encryption) in [("plain", Encryption::None), ("luks", Encryption::Luks)] {
        let root = dom.dir().join(format!("repo-{name}"));
        fs::create_dir_all(&root).unwrap();
        let k = (encryption == Encryption::Luks).then(|| KeySource::File(key.clone()));
        let protection = Protection::new(Compression::None, encryption, k).unwrap();
        let repo = BackupRepository::new(name, RepositoryKind::Shared, root.to_str().unwrap(), "", None)
            .unwrap()
            .with_protection(protection.clone());
        // A full and two incrementals, each point kept as raw images to compare with.
        let mut points = Vec::new();
        for (i, (pattern, offset)) in [(0x11, "0"), (0x22, "8M"), (0x33, "20M")].into_iter().enumerate() {
            dom.write_offline(0, pattern, offset, "4M");
            dom.write_offline(1, pattern, &format!("{}M", i * 2), "1M");
            let made = e
                .backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {})
                .unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
            let want = (dom.raw_copy(0, &format!("{name}-{i}-a")), dom.raw_copy(1, &format!("{name}-{i}-b")));
            points.push((made.manifest.id.clone(), made.manifest.parent.clone(), want));
        }
        assert!(points[2].1.as_deref() == Some(points[1].0.as_str()), "{name}: a chain of three");

        let p = prefix(&format!("from-{name}"));
        let t = target(&lab, "offsite", &lab.bucket_plain, &p);
        let store = ObjectStore::connect(&t).unwrap();
        copy_vm(&e, &repo, &store, dom.name()).unwrap();
        // The repository is gone.
        fs::remove_dir_all(&root).unwrap();

        // Each point of the qcow2 disk as a new volume, read straight from the target.
        for (i, (id, _, (want_a, _))) in points.iter().enumerate() {
            let view = e.target_view(&t, dom.name()).unwrap();
            let from = view.repository(protection.clone());
            let to = dom.dir().join(format!("{name}-restored-{i}.qcow2"));
            let request =
                VolumeRestoreRequest::new(from, dom.name(), id.as_str(), "vda", ImageLocation::Path(to.clone()));
            e.restore_volume(&request, &CancelHandle::new(), &mut |_| {})
                .unwrap_or_else(|err| panic!("{name} {id}: {} ({:?})", nasbak::chain(&err), view.failure()));
            assert!(same(&to, want_a), "{name}: the point of {id}");
            assert!(view.failure().is_none());
            drop(view);
            assert!(mounts_under(&runtime).is_empty(), "{name}: the view is unmounted: {:?}", mounts_under(&runtime));
            let left: Vec<_> = fs::read_dir(runtime.join("views")).unwrap().collect();
            assert!(left.is_empty(), "{name}: the view's directory is gone: {left:?}");
        }
        // The whole VM back to the middle point, both disks, from the target.
        let view = e.target_view(&t, dom.name()).unwrap();
        let (id, _, (want_a, want_b)) = &points[1];
        e.restore(
            &RestoreRequest::new(view.repository(protection.clone()), dom.name(), id.as_str()),
            &CancelHandle::new(),
            &mut |_| {},
        )
        .unwrap_or_else(|err| panic!("{name} {id}: {} ({:?})", nasbak::chain(&err), view.failure()));
        assert!(same(&dom.disks()[0].path, want_a), "{name}: vda is the middle point again");
        assert!(same(&dom.disks()[1].path, want_b), "{name}: vdb is the middle point again");
        // Nothing the restore wrote (the VM's lease) reached the store.
        drop(view);
        let keys: Vec<String> = store.list("").unwrap().into_iter().map(|o| o.key).collect();
        assert!(keys.iter().all(|k| k.ends_with(".qcow2") || k.ends_with(".json") || k.ends_with(".xml")), "{keys:?}");
        if encryption == Encryption::Luks {
            // Without the key the encrypted chain is refused, and nothing is written.
            let view = e.target_view(&t, dom.name()).unwrap();
            let to = dom.dir().join(format!("{name}-keyless.qcow2"));
            let request = VolumeRestoreRequest::new(
                view.repository(Protection::default()),
                dom.name(),
                points[2].0.as_str(),
                "vda",
                ImageLocation::Path(to.clone()),
            );
            let err = e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap_err();
            assert!(nasbak::chain(&err).contains("key"), "{}", nasbak::chain(&err));
            assert!(!to.exists());
        }
        remove_plain(&lab, &p);
    }
    // A view of a VM the target has nothing of: an empty repository, the restore says so.
    let view = e.target_view(&target(&lab, "offsite", &lab.bucket_plain, &prefix("none")), dom.name()).unwrap();
    let request = RestoreRequest::new(view.repository(Protection::default()), dom.name(), "2026.01.01.00.00.00");
    let err = e.restore(&request, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(nasbak::chain(&err).contains("2026.01.01.00.00.00"), "{}", nasbak::chain(&err));
}
