//! Off-site targets against the lab's S3 gateway (radosgw over the lab Ceph cluster, HTTPS with
//! the lab's own CA; `cargo xtask lab s3 up`): the target check writes, reads back and proves
//! the object lock; a lock asked of a bucket without one, wrong credentials and an unknown CA are
//! refused with errors that say so; no secret is ever shown. awscli, an independent client,
//! checks what the store holds.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use nasbak::nasbak_repo::{LockMode, ObjectLock, ObjectTarget, S3Credentials};
use nasbak::objstore::{CHECK_DIR, ObjectStore};
use nasbak_testlab::s3::LabS3;

fn target(lab: &LabS3, name: &str, bucket: &str, prefix: &str) -> ObjectTarget {
    ObjectTarget::new(name, &lab.endpoint, bucket, Some(prefix), S3Credentials::File(lab.credentials.clone()))
        .unwrap()
        .with_ca_file(&lab.ca_file)
        .unwrap()
}

/// A prefix of this test process's own.
fn prefix(what: &str) -> String {
    format!("tests/{what}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple())
}

#[test]
fn a_check_of_a_locked_target_writes_reads_back_and_proves_the_lock() {
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
            "--version-id",
            probe["VersionId"].as_str().unwrap(),
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
            "--version-id",
            probe["VersionId"].as_str().unwrap(),
        ])
        .unwrap_err();
    assert!(refused.contains("AccessDenied"), "{refused}");
}

#[test]
fn a_check_without_lock_leaves_nothing_and_a_lock_on_a_bucket_without_one_is_refused() {
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
