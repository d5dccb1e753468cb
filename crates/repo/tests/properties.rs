//! Property tests of the model: round trips and the path-safety invariants.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Component, Path};

use nasbak_repo::{
    Address, BackupId, BackupRef, CephAddress, CephMonitor, CifsAddress, Host, MountOption, MountOptions, NfsAddress,
    RepositoryLayout, VmName,
};
use proptest::prelude::*;

fn host() -> impl Strategy<Value = Host> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}[a-z0-9](\\.[a-z][a-z0-9]{0,6}){0,2}".prop_map(Host::Name),
        any::<u32>().prop_map(|v| Host::V4(Ipv4Addr::from(v))),
        any::<u128>().prop_map(|v| Host::V6(Ipv6Addr::from(v))),
    ]
    .prop_filter(
        "a name that is an IPv4 address parses as one",
        |h| !matches!(h, Host::Name(n) if n.parse::<Ipv4Addr>().is_ok()),
    )
}

fn abs_path() -> impl Strategy<Value = String> {
    "(/[A-Za-z0-9_. -]{1,8}){0,3}/?".prop_map(|p| if p.is_empty() { "/".into() } else { p })
}

proptest! {
    #[test]
    fn nfs_round_trip(host in host(), export in abs_path()) {
        let a = Address::Nfs(NfsAddress { host, export });
        prop_assert_eq!(Address::parse_nfs(&a.to_string()).unwrap(), a);
    }

    #[test]
    fn cifs_round_trip(host in host(), share in "[A-Za-z0-9$_-]{1,8}", subdir in "([A-Za-z0-9_-]{1,5}(/[A-Za-z0-9_-]{1,5}){0,2})?") {
        let a = Address::Cifs(CifsAddress { host, share, subdir });
        prop_assert_eq!(Address::parse_cifs(&a.to_string()).unwrap(), a);
    }

    #[test]
    fn ceph_round_trip(mons in prop::collection::vec((host(), prop::option::of(1u16..)), 1..4), path in abs_path(),
                       user in "[a-z][a-z0-9_-]{0,6}", fsid in prop::option::of(any::<u128>()), fs in "[a-z][a-z0-9_-]{0,6}") {
        let a = Address::Ceph(CephAddress::Monitors { monitors: mons.into_iter().map(|(host, port)| CephMonitor { host, port }).collect(), path: path.clone() });
        prop_assert_eq!(Address::parse_ceph(&a.to_string()).unwrap(), a);
        let b = Address::Ceph(CephAddress::Named { user, fsid: fsid.map(uuid_from), fs_name: fs, path });
        prop_assert_eq!(Address::parse_ceph(&b.to_string()).unwrap(), b);
    }

    #[test]
    fn options_round_trip(items in prop::collection::vec(("[a-z][a-z0-9_.-]{0,8}", prop::option::of("[A-Za-z0-9:/._ ,=-]{0,10}")), 0..6)) {
        let mut options = MountOptions::new();
        for (key, value) in &items {
            options.push(match value {
                Some(v) => MountOption::with_value(key, v).unwrap(),
                None => MountOption::flag(key).unwrap(),
            });
        }
        let written = options.to_mount_string();
        prop_assert_eq!(MountOptions::parse(&written).unwrap(), options.clone());
        if !options.has_secrets() {
            prop_assert_eq!(MountOptions::parse(&options.to_string()).unwrap(), options);
        }
    }

    #[test]
    fn options_parser_never_panics_and_is_faithful(text in ".{0,40}") {
        if let Ok(o) = MountOptions::parse(&text) {
            prop_assert_eq!(o.to_mount_string(), text);
        }
    }

    #[test]
    fn backup_id_round_trip(secs in 0i64..4_102_444_800, seq in 1u32..50) {
        let t = chrono::DateTime::from_timestamp(secs, 0).unwrap();
        let before: Vec<BackupId> =
            (1..seq).map(|n| if n == 1 { BackupId::at(t) } else { format!("{}-{n}", BackupId::at(t)).parse().unwrap() }).collect();
        let id = BackupId::next_after(t, &before);
        prop_assert_eq!(id.sequence(), seq);
        prop_assert_eq!(id.to_string().parse::<BackupId>().unwrap(), id);
    }

    #[test]
    fn a_valid_name_is_one_normal_path_component(text in ".{0,12}") {
        if let Ok(name) = VmName::new(&text) {
            let parts: Vec<_> = Path::new(name.as_str()).components().collect();
            prop_assert_eq!(parts.len(), 1);
            prop_assert!(matches!(parts[0], Component::Normal(_)));
        }
    }

    #[test]
    fn resolved_backups_stay_two_levels_inside_the_repository(text in "[a-z./0-9-]{0,30}") {
        let layout = RepositoryLayout::new("/repo");
        if let Ok((_, _, dir)) = layout.resolve_backup(&text) {
            let rest = dir.strip_prefix("/repo").unwrap();
            prop_assert_eq!(rest.components().count(), 2);
            prop_assert!(rest.components().all(|c| matches!(c, Component::Normal(_))));
        }
    }
}

fn uuid_from(v: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(v)
}

mod retention {
    use chrono::NaiveDateTime;
    use nasbak_repo::RetentionPolicy;
    use proptest::prelude::*;

    fn times() -> impl Strategy<Value = Vec<NaiveDateTime>> {
        // Up to 60 backups over about three years, some within the same hour.
        prop::collection::vec(1_700_000_000i64..1_800_000_000, 0..60)
            .prop_map(|v| v.into_iter().map(|s| chrono::DateTime::from_timestamp(s, 0).unwrap().naive_utc()).collect())
    }

    fn policy() -> impl Strategy<Value = RetentionPolicy> {
        let n = || prop::option::of(0u32..6);
        (n(), n(), n(), n(), n(), n()).prop_map(|(last, hourly, daily, weekly, monthly, yearly)| RetentionPolicy {
            last,
            hourly,
            daily,
            weekly,
            monthly,
            yearly,
        })
    }

    fn active(p: &RetentionPolicy) -> u32 {
        [p.last, p.hourly, p.daily, p.weekly, p.monthly, p.yearly].iter().map(|v| v.unwrap_or(0)).sum()
    }

    proptest! {
        #[test]
        fn plan_invariants(times in times(), policy in policy()) {
            let backups: Vec<(usize, NaiveDateTime)> = times.iter().copied().enumerate().collect();
            let plan = policy.plan(&backups);
            // Every backup gets exactly one decision.
            prop_assert_eq!(plan.len(), backups.len());
            let kept = plan.iter().filter(|d| d.keep.is_some()).count();
            if active(&policy) == 0 {
                prop_assert_eq!(kept, backups.len());
            } else {
                // Never more than the rules allow, and the newest backup is always kept.
                prop_assert!(kept as u32 <= active(&policy));
                if let Some(first) = plan.first() {
                    prop_assert!(first.keep.is_some());
                }
            }
            // The plan does not depend on the order the backups came in.
            let mut reversed = backups.clone();
            reversed.reverse();
            prop_assert_eq!(policy.plan(&reversed), plan);
        }

        #[test]
        fn keep_last_keeps_exactly_the_newest(times in times(), n in 0u32..10) {
            let backups: Vec<(usize, NaiveDateTime)> = times.iter().copied().enumerate().collect();
            let plan = RetentionPolicy::keep_last(n).plan(&backups);
            let kept: Vec<bool> = plan.iter().map(|d| d.keep.is_some()).collect();
            let expect = if n == 0 { backups.len() } else { (n as usize).min(backups.len()) };
            prop_assert_eq!(kept.iter().filter(|k| **k).count(), expect);
            // ... and they are the first (newest) ones.
            prop_assert!(kept.windows(2).all(|w| w[0] || !w[1]));
        }

        #[test]
        fn policy_text_round_trips(policy in policy()) {
            prop_assert_eq!(policy.to_string().parse::<RetentionPolicy>().unwrap(), policy);
        }
    }
}

mod disk_files {
    use nasbak_repo::VolumeName;
    use nasbak_repo::model::layout::{DiskRole, disk_file_name, disk_file_names, parse_disk_file_name};
    use proptest::prelude::*;

    proptest! {
        /// Every disk gets its own file (also on a case-folding share), every name is a backup
        /// file name, and a disk whose reference name is unique keeps it.
        #[test]
        fn every_disk_gets_its_own_file(vols in proptest::collection::vec("[a-cA-C@]{1,3}(@vd[a-c])?", 1..8)) {
            let vols: Vec<VolumeName> = vols.iter().map(|v| VolumeName::new(v).unwrap()).collect();
            let targets: Vec<String> = (0..vols.len()).map(|i| format!("vd{}", (b'a' + i as u8) as char)).collect();
            let disks: Vec<(DiskRole, &VolumeName, &str)> = vols
                .iter()
                .zip(&targets)
                .enumerate()
                .map(|(i, (v, t))| (if i == 0 { DiskRole::Root } else { DiskRole::Data }, v, t.as_str()))
                .collect();
            let names = disk_file_names(&disks);
            let mut folded: Vec<String> = names.iter().map(|n| n.to_lowercase()).collect();
            folded.sort();
            folded.dedup();
            prop_assert_eq!(folded.len(), names.len(), "{:?}", names);
            for (i, name) in names.iter().enumerate() {
                prop_assert!(parse_disk_file_name(name).is_some(), "{}", name);
                let plain = disk_file_name(disks[i].0, disks[i].1).to_lowercase();
                let alone = disks.iter().filter(|d| disk_file_name(d.0, d.1).to_lowercase() == plain).count() == 1;
                if alone {
                    prop_assert_eq!(name, &disk_file_name(disks[i].0, disks[i].1));
                }
            }
            prop_assert_eq!(disk_file_names(&disks), names, "deterministic");
        }
    }
}

proptest! {
    #[test]
    fn backup_refs_round_trip(
        repo in proptest::option::of("[A-Za-z0-9][A-Za-z0-9_-]{0,8}"),
        vm in "[A-Za-z0-9][A-Za-z0-9_.-]{0,8}",
        secs in 0i64..4_000_000_000,
        seq in 1u32..5,
    ) {
        let time = chrono::DateTime::from_timestamp(secs, 0).unwrap();
        let mut id = BackupId::at(time);
        for _ in 1..seq {
            id = BackupId::next_after(time, &[id]);
        }
        let text = match &repo {
            Some(r) => format!("{r}:{vm}/{id}"),
            None => format!("{vm}/{id}"),
        };
        let parsed: BackupRef = text.parse().unwrap();
        prop_assert_eq!(parsed.to_string(), text);
        prop_assert_eq!(parsed.vm.as_str(), vm.as_str());
        prop_assert_eq!(parsed.id, id);
    }
}
