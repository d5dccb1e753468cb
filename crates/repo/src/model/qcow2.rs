//! What a qcow2 file's header says about the chain it belongs to: its virtual size and the
//! backing file it names, read from the header's bytes (no process opens the file); and where a
//! reference-system backup's backing name leads inside the repository.
//!
//! The reference system (its 4.23 script) writes an incremental backup as a qcow2 file whose
//! header names its parent's file: relative (`../<backup>/<file>`, from `qemu-img rebase -u`
//! with `realpath --relative-to`) or absolute, under the temporary mount point the script
//! mounted the repository on (`/tmp/csbackup.XXXXX/<vm>/<backup>/<file>`), which exists no
//! more. Either is resolved to a backup file of the same VM in the repository, or refused: a
//! name is never followed outside it.

use crate::model::layout::parse_disk_file_name;
use crate::{BackupId, VmName};

/// A qcow2 header's magic, `QFI\xfb`.
const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];
/// QEMU refuses backing file names longer than this.
const BACKING_MAX: usize = 1023;

/// What a qcow2 header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// The guest-visible size.
    pub virtual_size: u64,
    /// The backing file named in the header, as written.
    pub backing: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Reads a qcow2 header from the first bytes of a file (`bytes`: at least the header and the
/// backing name, which QEMU writes in the first cluster).
pub fn parse_qcow2_header(bytes: &[u8]) -> Result<Qcow2Header, String> {
    if bytes.len() < 32 || bytes[..4] != MAGIC {
        return Err("not a qcow2 file (no QFI\\xfb magic)".into());
    }
    let version = be32(bytes, 4);
    if !(2..=3).contains(&version) {
        return Err(format!("qcow2 version {version}, not 2 or 3"));
    }
    let (offset, length) = (be64(bytes, 8), be32(bytes, 16) as usize);
    let virtual_size = be64(bytes, 24);
    if offset == 0 || length == 0 {
        return Ok(Qcow2Header { virtual_size, backing: None });
    }
    if length > BACKING_MAX {
        return Err(format!("a backing file name of {length} bytes"));
    }
    let start = usize::try_from(offset).map_err(|_| format!("a backing file name at byte {offset}"))?;
    let name = bytes
        .get(start..start.saturating_add(length))
        .ok_or_else(|| format!("a backing file name at byte {offset}, past the header read"))?;
    let name = std::str::from_utf8(name).map_err(|_| "a backing file name that is not UTF-8".to_owned())?;
    Ok(Qcow2Header { virtual_size, backing: Some(name.to_owned()) })
}

/// Where the backing name `backing` of a file in backup `id` of VM `vm` leads inside the
/// repository: `(backup, file)`, a backup file of the same VM. A relative name is taken from the
/// backup's directory (`<vm>/<id>/`) and must not leave the VM's directory; an absolute one
/// must end in `<vm>/<backup>/<file>` (what is above is the reference script's temporary mount
/// point, never looked at). The parent must be an older backup than `id`.
pub fn resolve_backing(vm: &VmName, id: &BackupId, backing: &str) -> Result<(BackupId, String), String> {
    let refused = |why: &str| Err(format!("its backing file {backing:?} {why}"));
    let parts: Vec<&str> = if backing.starts_with('/') {
        let tail: Vec<&str> = backing.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        if tail.contains(&"..") || tail.len() < 3 {
            return refused("is not <mount point>/<vm>/<backup>/<file>");
        }
        tail[tail.len() - 3..].to_vec()
    } else {
        let vm_name = vm.as_str().to_owned();
        let id_name = id.to_string();
        let mut at: Vec<String> = vec![vm_name, id_name];
        for part in backing.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                if at.pop().is_none() {
                    return refused("leads out of the repository");
                }
            } else {
                at.push(part.to_owned());
            }
        }
        return match at.as_slice() {
            [v, b, f] => check(vm, id, v, b, f).or_else(|why| refused(&why)),
            _ => refused("does not lead to a backup file of this VM"),
        };
    };
    check(vm, id, parts[0], parts[1], parts[2]).or_else(|why| refused(&why))
}

fn check(vm: &VmName, id: &BackupId, v: &str, b: &str, f: &str) -> Result<(BackupId, String), String> {
    if v != vm.as_str() {
        return Err(format!("names VM {v:?}, not {:?}", vm.as_str()));
    }
    let parent: BackupId = b.parse().map_err(|_| format!("names {b:?}, not a backup"))?;
    if parent >= *id {
        return Err(format!("names backup {parent}, which is not older than {id}"));
    }
    parse_disk_file_name(f).ok_or_else(|| format!("names {f:?}, not a backup file"))?;
    Ok((parent, f.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(size: u64, backing: Option<&str>) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        if let Some(b) = backing {
            h[8..16].copy_from_slice(&512u64.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            h[512..512 + b.len()].copy_from_slice(b.as_bytes());
        }
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h
    }

    #[test]
    fn the_header_gives_the_size_and_the_backing_name() {
        let h = parse_qcow2_header(&header(1 << 30, None)).unwrap();
        assert_eq!(h, Qcow2Header { virtual_size: 1 << 30, backing: None });
        let h = parse_qcow2_header(&header(5, Some("../2026.01.01.00.00.00/root.v.qcow2"))).unwrap();
        assert_eq!(h.backing.as_deref(), Some("../2026.01.01.00.00.00/root.v.qcow2"));
        assert!(parse_qcow2_header(b"not a qcow2 file at all, no no no").is_err());
        assert!(parse_qcow2_header(&header(5, Some("x"))[..300]).unwrap_err().contains("past the header"));
    }

    fn names() -> (VmName, BackupId) {
        (VmName::new("i-2-10-VM").unwrap(), "2026.03.02.00.00.00".parse().unwrap())
    }

    #[test]
    fn relative_and_mount_point_names_resolve_inside_the_vm_and_nothing_else_does() {
        let (vm, id) = names();
        let parent: BackupId = "2026.03.01.00.00.00".parse().unwrap();
        let ok = |b: &str| resolve_backing(&vm, &id, b);
        let want = Ok((parent, "root.5d6a.qcow2".to_owned()));
        assert_eq!(ok("../2026.03.01.00.00.00/root.5d6a.qcow2"), want);
        assert_eq!(ok("./../2026.03.01.00.00.00/root.5d6a.qcow2"), want);
        assert_eq!(ok("../../i-2-10-VM/2026.03.01.00.00.00/root.5d6a.qcow2"), want);
        assert_eq!(ok("/tmp/csbackup.AbC12/i-2-10-VM/2026.03.01.00.00.00/root.5d6a.qcow2"), want);
        for (bad, why) in [
            ("../../../etc/root.5d6a.qcow2", "out of the repository"),
            ("../../other-VM/2026.03.01.00.00.00/root.5d6a.qcow2", "names VM"),
            ("/var/lib/libvirt/images/5d6a", "names VM \"libvirt\""),
            ("/2026.03.01.00.00.00/root.5d6a.qcow2", "not <mount point>"),
            ("/tmp/x/other/2026.03.01.00.00.00/root.5d6a.qcow2", "names VM"),
            ("../2026.03.01.00.00.00/passwd", "not a backup file"),
            ("../2026.03.03.00.00.00/root.5d6a.qcow2", "not older"),
            ("../2026.03.02.00.00.00/root.5d6a.qcow2", "not older"),
            ("../latest/root.5d6a.qcow2", "not a backup"),
            ("root.5d6a.qcow2", "not older"),
            ("..", "does not lead"),
        ] {
            let err = ok(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    proptest! {
        /// Whatever the name, it resolves only to an older backup file of the same VM, and the
        /// header parser never panics.
        #[test]
        fn never_outside_the_vm(parts in proptest::collection::vec(prop_oneof![
            Just("..".to_owned()), Just(".".to_owned()), Just("i-2-10-VM".to_owned()), Just("other".to_owned()),
            Just("2026.03.01.00.00.00".to_owned()), Just("2026.04.01.00.00.00".to_owned()),
            Just("root.v.qcow2".to_owned()), Just("tmp".to_owned()), Just(String::new())], 0..8),
            absolute in any::<bool>(), bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (vm, id) = names();
            let name = format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"));
            if let Ok((parent, file)) = resolve_backing(&vm, &id, &name) {
                prop_assert!(parent < id);
                prop_assert!(parse_disk_file_name(&file).is_some());
            }
            let _ = parse_qcow2_header(&bytes);
        }
    }
}
