//! Parser throughput: mount options, addresses, backup ids.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use nasbak_repo::{Address, BackupId, MountOptions};

fn parsers(c: &mut Criterion) {
    let options = r#"username=backup,password="p,w",vers=3.1.1,rsize=1048576,wsize=1048576,context="system_u:object_r:nfs_t:s0:c1,c2",nobrl"#;
    c.bench_function("mount_options", |b| b.iter(|| MountOptions::parse(black_box(options)).unwrap()));
    c.bench_function("nfs_address", |b| b.iter(|| Address::parse_nfs(black_box("[fd00::1]:/exports/backup")).unwrap()));
    c.bench_function("ceph_address", |b| {
        b.iter(|| Address::parse_ceph(black_box("10.0.0.1:6789,10.0.0.2:6789,[fd00::3]:3300:/volumes/backup")).unwrap())
    });
    c.bench_function("backup_id", |b| b.iter(|| black_box("2026.11.27.21.30.05-2").parse::<BackupId>().unwrap()));
}

criterion_group!(benches, parsers);
criterion_main!(benches);
