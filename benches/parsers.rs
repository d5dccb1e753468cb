//! Parser throughput (mount options, addresses, backup ids) and the retention planner.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use nasbak_repo::{Address, BackupId, MountOptions, RetentionPolicy};

fn parsers(c: &mut Criterion) {
    let options = r#"username=backup,password="p,w",vers=3.1.1,rsize=1048576,wsize=1048576,context="system_u:object_r:nfs_t:s0:c1,c2",nobrl"#;
    c.bench_function("mount_options", |b| b.iter(|| MountOptions::parse(black_box(options)).unwrap()));
    c.bench_function("nfs_address", |b| b.iter(|| Address::parse_nfs(black_box("[fd00::1]:/exports/backup")).unwrap()));
    c.bench_function("ceph_address", |b| {
        b.iter(|| Address::parse_ceph(black_box("10.0.0.1:6789,10.0.0.2:6789,[fd00::3]:3300:/volumes/backup")).unwrap())
    });
    c.bench_function("backup_id", |b| b.iter(|| black_box("2026.11.27.21.30.05-2").parse::<BackupId>().unwrap()));
}

fn retention(c: &mut Criterion) {
    // Two years of hourly backups.
    let start = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap().naive_utc();
    let backups: Vec<(u32, chrono::NaiveDateTime)> =
        (0..2 * 365 * 24).map(|h| (h, start + chrono::Duration::hours(h as i64))).collect();
    let policy: RetentionPolicy = "last=24,daily=7,weekly=4,monthly=12,yearly=3".parse().unwrap();
    c.bench_function("retention_plan_17520", |b| b.iter(|| policy.plan(black_box(&backups))));
}

criterion_group!(benches, parsers, retention);
criterion_main!(benches);
