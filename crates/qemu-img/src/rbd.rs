//! Ceph RBD snapshots and the differences between them, for incremental backups of RBD disks.
//!
//! The `rbd` command line tool runs as an argv with a timeout, like qemu-img, its key in a 0600
//! keyring file for the command's duration (never on argv). An incremental is
//! `rbd export-diff --from-snap PARENT POOL/IMAGE@SNAP -` streamed (never held in memory or
//! staged on disk) through [`DiffParser`] into the backup's new qcow2 file, which
//! qemu-storage-daemon exports writable as a raw file ([`crate::WritableExport`]): the file is
//! a qcow2 backed by the parent's, written compressed or encrypted as the repository asks, and
//! only the changed extents are allocated in it.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nasbak_process::{CancelHandle, ExternalCommand};
use serde::Deserialize;

use crate::location::{RbdAuth, RbdSpec};
use crate::stored::{StoredImage, TargetProtection};

/// A snapshot of an RBD image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSnapshot {
    /// Its id, unique in the image for the image's life (a deep copy or an image created anew
    /// under the same name gives other ids).
    pub id: u64,
    /// Its name.
    pub name: String,
    /// The image's size when it was taken.
    pub size: u64,
}

/// What is known of an RBD image: its identity, size and snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdImageFacts {
    /// The image's id (`rbd info`): an image removed and created again under its name has
    /// another.
    pub id: String,
    /// Its size now.
    pub size: u64,
    /// Its snapshots.
    pub snapshots: Vec<RbdSnapshot>,
}

/// The changes of an RBD image between two of its snapshots copied into a new qcow2 file.
#[derive(Debug, Clone)]
pub struct RbdDiffCopy {
    /// The image, its `snapshot` the newer one (the state the file will hold).
    pub image: RbdSpec,
    /// The older snapshot: the state the file's backing chain holds.
    pub from: String,
    /// The new file: an empty qcow2 of the image's size whose header names its parent's file
    /// (see `ImageTool::create_protected`).
    pub target: PathBuf,
    /// The image's size (the file's virtual size).
    pub size: u64,
    /// How the file is written (plain, compressed, encrypted).
    pub protection: TargetProtection,
    /// The chain the file builds on, as it is opened to write it.
    pub backing: Option<StoredImage>,
    /// Where the file is exported as a raw file while it is written (a new path).
    pub mountpoint: PathBuf,
    /// Cancelling it stops `rbd` and the export; the file is then incomplete.
    pub cancel: CancelHandle,
}

/// `pool[/namespace]/image[@snapshot]`, as `rbd` names an image.
pub(crate) fn image_name(spec: &RbdSpec) -> String {
    let mut s = format!("{}/", spec.pool);
    if let Some(ns) = &spec.namespace {
        s.push_str(&format!("{ns}/"));
    }
    s.push_str(&spec.image);
    if let Some(snap) = &spec.snapshot {
        s.push_str(&format!("@{snap}"));
    }
    s
}

/// `rbd` with the spec's client id, ceph.conf, monitors and keyring (`keyring`: a temporary
/// one holding the spec's key, else the spec's own keyring file).
pub(crate) fn rbd_command(spec: &RbdSpec, keyring: Option<&Path>) -> ExternalCommand {
    let mut command = ExternalCommand::new("rbd");
    // Every wait on the cluster bounded (librados waits for ever by default).
    for (k, v) in crate::location::rados_timeouts() {
        command = command.arg(format!("--{}", k.replace('_', "-"))).arg(v);
    }
    if let Some(id) = &spec.id {
        command = command.arg("--id").arg(id);
    }
    if let Some(conf) = &spec.conf {
        command = command.arg("--conf").arg(conf);
    }
    if !spec.mon_hosts.is_empty() {
        command = command.arg("--mon-host").arg(spec.mon_hosts.join(","));
    }
    let keyring = match (keyring, &spec.auth) {
        (Some(k), _) => Some(k.to_owned()),
        (None, RbdAuth::Keyring(k)) => Some(k.clone()),
        _ => None,
    };
    if let Some(k) = keyring {
        command = command.arg("--keyring").arg(k);
    }
    command
}

#[derive(Deserialize)]
struct Info {
    id: String,
    size: u64,
}

#[derive(Deserialize)]
struct Snap {
    id: u64,
    name: String,
    size: u64,
}

/// Reads `rbd info --format json` and `rbd snap ls --format json` output.
pub fn parse_image_facts(info: &str, snapshots: &str) -> Result<RbdImageFacts, String> {
    let i: Info = serde_json::from_str(info).map_err(|e| format!("unreadable rbd info output: {e}"))?;
    Ok(RbdImageFacts { id: i.id, size: i.size, snapshots: parse_snapshots(snapshots)? })
}

/// Reads `rbd snap ls --format json` output.
pub fn parse_snapshots(snapshots: &str) -> Result<Vec<RbdSnapshot>, String> {
    let s: Vec<Snap> = serde_json::from_str(snapshots).map_err(|e| format!("unreadable rbd snap ls output: {e}"))?;
    Ok(s.into_iter().map(|s| RbdSnapshot { id: s.id, name: s.name, size: s.size }).collect())
}

/// One record of an `rbd export-diff` stream.
#[derive(Debug, PartialEq, Eq)]
pub enum DiffEvent<'a> {
    /// The snapshot the differences start from (`f`).
    From(&'a str),
    /// The snapshot they lead to (`t`).
    To(&'a str),
    /// The image's size at that snapshot (`s`).
    Size(u64),
    /// Bytes that changed, at `offset` (`w`; one record may come in several pieces).
    Data {
        /// Where in the image.
        offset: u64,
        /// This piece of the data.
        bytes: &'a [u8],
    },
    /// A range that reads as zeros now (`z`).
    Zero {
        /// Where in the image.
        offset: u64,
        /// How long.
        length: u64,
    },
}

const MAGIC: &[u8] = b"rbd diff v1\n";
/// Snapshot names are short; a longer one is a damaged stream.
const NAME_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Magic,
    Tag,
    NameLength(u8),
    Name(u8, usize),
    Size,
    Extent(u8),
    Data { offset: u64, left: u64 },
    Done,
}

/// A streaming parser of `rbd export-diff`'s format 1 (`rbd diff v1`): a magic line, then
/// records tagged `f` (from snapshot: le32 length and name), `t` (to snapshot), `s` (le64
/// size), `w` (le64 offset, le64 length, the data), `z` (le64 offset, le64 length) and `e` (the
/// end). Fed chunks as they arrive, cut anywhere.
#[derive(Debug)]
pub struct DiffParser {
    state: State,
    pending: Vec<u8>,
}

impl Default for DiffParser {
    fn default() -> Self {
        DiffParser { state: State::Magic, pending: Vec::new() }
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl DiffParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        DiffParser::default()
    }

    /// How many header bytes the current state needs.
    fn need(&self) -> usize {
        match self.state {
            State::Magic => MAGIC.len(),
            State::Tag => 1,
            State::NameLength(_) => 4,
            State::Name(_, n) => n,
            State::Size => 8,
            State::Extent(_) => 16,
            State::Data { .. } | State::Done => 0,
        }
    }

    /// Parses `input`, handing each record to `on`; an error of `on` stops the parse with it.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        on: &mut dyn FnMut(DiffEvent<'_>) -> Result<(), String>,
    ) -> Result<(), String> {
        while !input.is_empty() {
            if let State::Data { offset, left } = self.state {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                on(DiffEvent::Data { offset, bytes: &input[..n] })?;
                input = &input[n..];
                let left = left - n as u64;
                self.state = if left == 0 { State::Tag } else { State::Data { offset: offset + n as u64, left } };
                continue;
            }
            if self.state == State::Done {
                return Err(format!("{} bytes after the end record", input.len()));
            }
            let need = self.need();
            let take = (need - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < need {
                return Ok(());
            }
            let header = std::mem::take(&mut self.pending);
            self.state = self.advance(&header, on)?;
        }
        Ok(())
    }

    fn advance(&self, h: &[u8], on: &mut dyn FnMut(DiffEvent<'_>) -> Result<(), String>) -> Result<State, String> {
        Ok(match self.state {
            State::Magic if h == MAGIC => State::Tag,
            State::Magic => {
                return Err(format!("not an rbd diff v1 stream (it starts {:?})", String::from_utf8_lossy(h)));
            }
            State::Tag => match h[0] {
                b'f' | b't' => State::NameLength(h[0]),
                b's' => State::Size,
                b'w' | b'z' => State::Extent(h[0]),
                b'e' => State::Done,
                other => return Err(format!("unknown record tag {other:#04x}")),
            },
            State::NameLength(tag) => {
                let n = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                if n > NAME_MAX {
                    return Err(format!("a snapshot name of {n} bytes"));
                }
                if n == 0 {
                    on(if tag == b'f' { DiffEvent::From("") } else { DiffEvent::To("") })?;
                    State::Tag
                } else {
                    State::Name(tag, n)
                }
            }
            State::Name(tag, _) => {
                let name = std::str::from_utf8(h).map_err(|_| "a snapshot name that is not UTF-8".to_owned())?;
                on(if tag == b'f' { DiffEvent::From(name) } else { DiffEvent::To(name) })?;
                State::Tag
            }
            State::Size => {
                on(DiffEvent::Size(le64(h)))?;
                State::Tag
            }
            State::Extent(tag) => {
                let (offset, length) = (le64(h), le64(&h[8..]));
                offset.checked_add(length).ok_or_else(|| format!("an extent at {offset} of {length} bytes"))?;
                if tag == b'z' {
                    on(DiffEvent::Zero { offset, length })?;
                    State::Tag
                } else if length == 0 {
                    State::Tag
                } else {
                    State::Data { offset, left: length }
                }
            }
            State::Data { .. } | State::Done => unreachable!("no header is read in these states"),
        })
    }

    /// Whether the stream ended with its end record.
    pub fn finished(&self) -> bool {
        self.state == State::Done
    }
}

/// Applies the records of an `rbd export-diff` stream to `file` (the raw view of the new
/// file), checking that it goes from snapshot `from` to `to` of an image of `size` bytes and
/// stays within it; `written` counts the data bytes. Zeroed ranges are written as zeros
/// (`fallocate` `ZERO_RANGE` where the file takes it).
pub(crate) struct DiffWriter<'a> {
    pub file: &'a std::fs::File,
    pub from: &'a str,
    pub to: &'a str,
    pub size: u64,
    pub written: u64,
    pub position: u64,
}

impl DiffWriter<'_> {
    pub(crate) fn apply(&mut self, event: DiffEvent<'_>) -> Result<(), String> {
        let within = |offset: u64, length: u64, size: u64| {
            if offset.saturating_add(length) > size {
                Err(format!("an extent at {offset} of {length} bytes beyond the image's {size} bytes"))
            } else {
                Ok(())
            }
        };
        match event {
            DiffEvent::From(name) if name != self.from => {
                return Err(format!("the differences start at snapshot {name:?}, not {:?}", self.from));
            }
            DiffEvent::To(name) if name != self.to => {
                return Err(format!("the differences lead to snapshot {name:?}, not {:?}", self.to));
            }
            DiffEvent::From(_) | DiffEvent::To(_) => {}
            DiffEvent::Size(s) if s != self.size => {
                return Err(format!("the image is {s} bytes at the snapshot, the file {} bytes", self.size));
            }
            DiffEvent::Size(_) => {}
            DiffEvent::Data { offset, bytes } => {
                within(offset, bytes.len() as u64, self.size)?;
                self.file.write_all_at(bytes, offset).map_err(|e| format!("writing at {offset}: {e}"))?;
                self.written += bytes.len() as u64;
                self.position = offset + bytes.len() as u64;
            }
            DiffEvent::Zero { offset, length } => {
                within(offset, length, self.size)?;
                self.zero(offset, length)?;
                self.position = offset + length;
            }
        }
        Ok(())
    }

    fn zero(&self, offset: u64, length: u64) -> Result<(), String> {
        use nix::fcntl::{FallocateFlags, fallocate};
        let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Err(format!("an extent at {offset} of {length} bytes"));
        };
        if fallocate(std::os::fd::AsRawFd::as_raw_fd(self.file), FallocateFlags::FALLOC_FL_ZERO_RANGE, o, l).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < offset + length {
            let n = (offset + length - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at).map_err(|e| format!("writing zeros at {at}: {e}"))?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Opens the export of the new file for the diff's writes.
pub(crate) fn open_for_writes(path: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new().write(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream(records: &[(u8, u64, Vec<u8>)], size: u64) -> Vec<u8> {
        let mut s = MAGIC.to_vec();
        for (tag, name) in [(b'f', "nasbak-a"), (b't', "nasbak-b")] {
            s.push(tag);
            s.extend_from_slice(&(name.len() as u32).to_le_bytes());
            s.extend_from_slice(name.as_bytes());
        }
        s.push(b's');
        s.extend_from_slice(&size.to_le_bytes());
        for (tag, offset, data) in records {
            s.push(*tag);
            s.extend_from_slice(&offset.to_le_bytes());
            if *tag == b'w' {
                s.extend_from_slice(&(data.len() as u64).to_le_bytes());
                s.extend_from_slice(data);
            } else {
                s.extend_from_slice(&(data.len() as u64).to_le_bytes());
            }
        }
        s.push(b'e');
        s
    }

    /// The image `records` describe, applied to `base`.
    fn applied(base: &[u8], bytes: &[u8], cut: usize) -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, base).unwrap();
        let file = open_for_writes(&path).unwrap();
        let mut w = DiffWriter {
            file: &file,
            from: "nasbak-a",
            to: "nasbak-b",
            size: base.len() as u64,
            written: 0,
            position: 0,
        };
        let mut p = DiffParser::new();
        for piece in bytes.chunks(cut.max(1)) {
            p.feed(piece, &mut |e| w.apply(e))?;
        }
        if !p.finished() {
            return Err("no end record".into());
        }
        Ok(std::fs::read(&path).unwrap())
    }

    #[test]
    fn records_apply_wherever_the_stream_is_cut() {
        let base = vec![7u8; 64 << 10];
        let s = stream(
            &[(b'w', 4096, vec![1u8; 5000]), (b'z', 20000, vec![0u8; 8192]), (b'w', 60000, vec![2u8; 5536])],
            65536,
        );
        let mut expected = base.clone();
        expected[4096..9096].fill(1);
        expected[20000..28192].fill(0);
        expected[60000..65536].fill(2);
        for cut in [1, 3, 17, 4096, 1 << 20] {
            assert_eq!(applied(&base, &s, cut).unwrap(), expected, "cut {cut}");
        }
    }

    #[test]
    fn a_damaged_or_foreign_stream_is_refused() {
        let base = vec![0u8; 4096];
        let good = stream(&[(b'w', 0, vec![1u8; 10])], 4096);
        assert!(applied(&base, &good, 5).is_ok());
        let err = applied(&base, &good[..good.len() - 1], 5).unwrap_err();
        assert!(err.contains("no end record"), "{err}");
        let mut trailing = good.clone();
        trailing.push(b'x');
        assert!(applied(&base, &trailing, 5).unwrap_err().contains("after the end record"));
        assert!(applied(&base, b"rbd diff v2\n", 5).unwrap_err().contains("not an rbd diff v1"));
        let beyond = stream(&[(b'w', 4090, vec![1u8; 10])], 4096);
        assert!(applied(&base, &beyond, 5).unwrap_err().contains("beyond the image"));
        let resized = stream(&[], 8192);
        assert!(applied(&base, &resized, 5).unwrap_err().contains("8192 bytes at the snapshot"));
        let mut other = good.clone();
        other[MAGIC.len() + 5 + 7] = b'x';
        assert!(applied(&base, &other, 5).unwrap_err().contains("start at snapshot \"nasbak-x\""));
    }

    #[test]
    fn image_facts_are_read_from_rbd_json() {
        let facts = parse_image_facts(
            r#"{"name":"d","id":"10b8a1b2c3","size":1073741824,"objects":256,"order":22}"#,
            r#"[{"id":4,"name":"nasbak-2026.12.06.10.00.00","size":1073741824,"protected":"false","timestamp":"Sun Dec  6 10:00:00 2026"}]"#,
        )
        .unwrap();
        assert_eq!(facts.id, "10b8a1b2c3");
        assert_eq!(
            facts.snapshots,
            vec![RbdSnapshot { id: 4, name: "nasbak-2026.12.06.10.00.00".into(), size: 1 << 30 }]
        );
        assert!(parse_image_facts("{}", "[]").is_err());
    }

    proptest! {
        /// Any stream, cut anywhere, is parsed without a panic; a valid one gives its records.
        #[test]
        fn the_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), cut in 1usize..40) {
            let mut p = DiffParser::new();
            for piece in bytes.chunks(cut) {
                if p.feed(piece, &mut |_| Ok(())).is_err() {
                    break;
                }
            }
        }
    }
}
