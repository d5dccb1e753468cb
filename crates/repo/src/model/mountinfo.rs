//! Parsing of `/proc/self/mountinfo` (the text only; reading it is the mount module's job).

use std::path::PathBuf;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfoEntry {
    /// The mount id.
    pub mount_id: u32,
    /// The mount point, with `\040`-style escapes decoded.
    pub mount_point: PathBuf,
    /// The file system type (`nfs4`, `fuse.sshfs`, `ext4`, ...).
    pub fstype: String,
    /// The mount source (`host:/export`, `/dev/loop0`, ...).
    pub source: String,
    /// Per-mount options (`rw,relatime`).
    pub mount_options: String,
    /// Per-superblock options: what the file system itself reports (for NFS: vers, timeo, ...).
    pub super_options: String,
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the whole text of a mountinfo file; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfoEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountInfoEntry> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let right: Vec<&str> = right.split(' ').collect();
    if left.len() < 6 || right.len() < 3 {
        return None;
    }
    Some(MountInfoEntry {
        mount_id: left[0].parse().ok()?,
        mount_point: PathBuf::from(unescape(left[4])),
        mount_options: left[5].to_owned(),
        fstype: right[0].to_owned(),
        source: unescape(right[1]),
        super_options: right[2].to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_optional_fields_and_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    50 27 0:45 / /run/nasbak/mnt/r1 rw,relatime shared:30 - nfs4 127.0.0.1:/ rw,vers=4.2,soft,timeo=100\n\
                    garbage\n";
        let e = parse_mountinfo(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(e[0].fstype, "ext3");
        assert_eq!(e[1].source, "127.0.0.1:/");
        assert!(e[1].super_options.contains("timeo=100"));
    }
}
