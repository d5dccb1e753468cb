//! A target's backups of one VM as a repository on this host, read straight from the object
//! store: restores from a target run the repository's own restore code over it, chains and all,
//! with no local copy of the backup.
//!
//! The objects under `<vm>/` are listed once and served by a read-only FUSE file system whose
//! reads are ranged GETs of [`BLOCK`] bytes, kept in a small cache and read ahead while a file is
//! read in order. An overlay puts a scratch directory on top: what a restore writes to its
//! repository (the VM's lease, a restore's mark) lands there and goes with the view. Both mounts
//! are under `<runtime dir>/views/<pid>-<n>`; dropping the view unmounts them, and a view left by
//! a killed process is unmounted by the next one.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{FileAttr, FileType, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request};
use nasbak_repo::{BackupRepository, Protection, RepositoryKind, VmName};

use crate::error::TargetError;
use crate::objstore::{ObjectStore, ReadTask};

/// The bytes of one ranged read, and of one cached block.
pub const BLOCK: u64 = 4 << 20;
/// How many blocks the cache keeps (those in flight included): 96 MiB.
const CACHED: usize = 24;
/// How many blocks are read ahead of a file read in order.
const AHEAD: u64 = 4;
/// How long the kernel may keep names and attributes: the objects do not change under a view.
const TTL: Duration = Duration::from_secs(3600);
/// The runtime threads that run the reads.
const WORKERS: usize = 2;

/// A target's backups of one VM, mounted on this host as a repository (see the module's docs).
#[derive(Debug)]
pub struct TargetView {
    target: String,
    root: PathBuf,
    session: Option<fuser::BackgroundSession>,
    overlaid: bool,
    failure: Arc<Mutex<Option<String>>>,
}

impl TargetView {
    /// Lists `vm`'s objects on the store's target and mounts them under `runtime_dir/views`.
    /// Views that a killed process left there are unmounted and removed first.
    pub fn open(
        target: &nasbak_repo::ObjectTarget,
        vm: &VmName,
        runtime_dir: &Path,
    ) -> Result<TargetView, TargetError> {
        let err = |action: &str, detail: String| TargetError {
            target: target.name().to_string(),
            action: action.to_owned(),
            detail,
        };
        let store = ObjectStore::connect_with(target, WORKERS)?;
        let objects = store.list(&format!("{vm}/"))?;
        let views = runtime_dir.join("views");
        remove_stale(&views);
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let root = views.join(format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst)));
        for d in ["lower", "upper", "work", "repository"] {
            fs::create_dir_all(root.join(d))
                .map_err(|e| err("preparing its view", format!("{}: {e}", root.display())))?;
        }
        let failure = Arc::new(Mutex::new(None));
        let fs = ViewFs::new(store, objects.iter().map(|o| (o.key.as_str(), o.size)), failure.clone());
        let mut view = TargetView {
            target: target.name().to_string(),
            root: root.clone(),
            session: None,
            overlaid: false,
            failure,
        };
        let options = [
            MountOption::RO,
            MountOption::FSName(format!("nasbak-{}", target.name())),
            MountOption::NoExec,
            MountOption::NoSuid,
        ];
        view.session = Some(
            fuser::spawn_mount2(fs, root.join("lower"), &options)
                .map_err(|e| err("mounting its view", format!("{}: {e}", root.join("lower").display())))?,
        );
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            root.join("lower").display(),
            root.join("upper").display(),
            root.join("work").display()
        );
        nix::mount::mount(
            Some("nasbak-view"),
            &root.join("repository"),
            Some("overlay"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(|e| err("mounting its view", format!("overlay on {}: {e}", root.join("repository").display())))?;
        view.overlaid = true;
        Ok(view)
    }

    /// Where the view is: `<vm>/<backup id>/<file>` as on a repository.
    pub fn path(&self) -> PathBuf {
        self.root.join("repository")
    }

    /// The view as a repository of kind `shared`, named after the target, with `protection`
    /// (the key of the repository the backups came from, for encrypted backups).
    pub fn repository(&self, protection: Protection) -> BackupRepository {
        let path = self.path().to_string_lossy().into_owned();
        BackupRepository::new(&self.target, RepositoryKind::Shared, &path, "", None)
            .or_else(|_| BackupRepository::new("target", RepositoryKind::Shared, &path, "", None))
            .expect("a view's path is absolute")
            .with_protection(protection)
    }

    /// The first read the store failed, if one did: what a reader of the view saw as an I/O
    /// error.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

impl Drop for TargetView {
    fn drop(&mut self) {
        if self.overlaid {
            let _ = nix::mount::umount2(&self.root.join("repository"), nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(session) = self.session.take() {
            let _ = nix::mount::umount2(&self.root.join("lower"), nix::mount::MntFlags::MNT_DETACH);
            drop(session);
        }
        remove_unmounted(&self.root);
    }
}

/// Unmounts and removes the views of processes that no longer run.
fn remove_stale(views: &Path) {
    let Ok(entries) = fs::read_dir(views) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid == std::process::id() as i32 || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = nix::mount::umount2(&e.path().join("repository"), nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&e.path().join("lower"), nix::mount::MntFlags::MNT_DETACH);
        remove_unmounted(&e.path());
    }
}

/// Removes a view's directory once nothing is mounted in it (never into a mount).
fn remove_unmounted(root: &Path) {
    let mounted = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        match (fs::symlink_metadata(p), fs::symlink_metadata(root)) {
            (Ok(a), Ok(b)) => a.dev() != b.dev(),
            (Err(e), _) => e.kind() != std::io::ErrorKind::NotFound, // a dead FUSE mount
            _ => true,
        }
    };
    if !mounted(&root.join("repository")) && !mounted(&root.join("lower")) {
        let _ = fs::remove_dir_all(root);
    }
}

/// One name of the view.
#[derive(Debug)]
struct Node {
    name: String,
    parent: u64,
    /// A directory's children, by inode.
    children: Vec<u64>,
    /// A file's key and size.
    file: Option<(String, u64)>,
}

/// A block of a file: being read, or read.
enum Slot {
    Reading(ReadTask),
    Read(Arc<Vec<u8>>),
}

/// The FUSE file system of a view: inode `n` is `nodes[n - 1]`, the root is 1.
struct ViewFs {
    store: ObjectStore,
    nodes: Vec<Node>,
    blocks: HashMap<(u64, u64), Slot>,
    order: VecDeque<(u64, u64)>,
    /// The last block each file was read at, to tell reads in order.
    last: HashMap<u64, u64>,
    failure: Arc<Mutex<Option<String>>>,
    since: SystemTime,
}

impl ViewFs {
    fn new<'a>(
        store: ObjectStore,
        objects: impl Iterator<Item = (&'a str, u64)>,
        failure: Arc<Mutex<Option<String>>>,
    ) -> Self {
        let mut fs = ViewFs {
            store,
            nodes: vec![Node { name: String::new(), parent: 1, children: Vec::new(), file: None }],
            blocks: HashMap::new(),
            order: VecDeque::new(),
            last: HashMap::new(),
            failure,
            since: SystemTime::now(),
        };
        for (key, size) in objects {
            fs.add(key, size);
        }
        fs
    }

    /// Adds the object `key` by its path; a key with an empty, `.` or `..` part, or one that a
    /// directory already has (or has under it), is left out.
    fn add(&mut self, key: &str, size: u64) {
        let parts: Vec<&str> = key.split('/').collect();
        if parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return;
        }
        let mut at = 1u64;
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            match self.child(at, part) {
                Some(n) if !last && self.node(n).file.is_none() => at = n,
                Some(_) => return,
                None => {
                    let file = last.then(|| (key.to_owned(), size));
                    self.nodes.push(Node { name: (*part).to_owned(), parent: at, children: Vec::new(), file });
                    let n = self.nodes.len() as u64;
                    self.nodes[at as usize - 1].children.push(n);
                    at = n;
                }
            }
        }
    }

    fn node(&self, ino: u64) -> &Node {
        &self.nodes[ino as usize - 1]
    }

    fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.get(parent)?.children.iter().copied().find(|c| self.node(*c).name == name)
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let n = self.node(ino);
        let (kind, size, perm, nlink) = match &n.file {
            Some((_, size)) => (FileType::RegularFile, *size, 0o444, 1),
            None => (FileType::Directory, 0, 0o555, 2),
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.since,
            mtime: self.since,
            ctime: self.since,
            crtime: self.since,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        }
    }

    /// Starts reading block `index` of file `ino` unless it is cached or being read; the
    /// oldest blocks go when the cache is full.
    fn start(&mut self, ino: u64, index: u64) {
        if self.blocks.contains_key(&(ino, index)) {
            return;
        }
        let Some((key, size)) = self.node(ino).file.clone() else { return };
        let start = index * BLOCK;
        if start >= size {
            return;
        }
        let task = self.store.spawn_read_range(&key, start, BLOCK.min(size - start));
        self.blocks.insert((ino, index), Slot::Reading(task));
        self.order.push_back((ino, index));
        while self.order.len() > CACHED {
            if let Some(Slot::Reading(t)) = self.order.pop_front().and_then(|old| self.blocks.remove(&old)) {
                t.abort();
            }
        }
    }

    /// Block `index` of file `ino`, read now or waited for.
    fn block(&mut self, ino: u64, index: u64) -> Result<Arc<Vec<u8>>, TargetError> {
        self.start(ino, index);
        match self.blocks.remove(&(ino, index)) {
            Some(Slot::Read(b)) => {
                self.blocks.insert((ino, index), Slot::Read(b.clone()));
                Ok(b)
            }
            Some(Slot::Reading(task)) => {
                self.order.retain(|k| *k != (ino, index));
                let bytes = Arc::new(self.store.wait(task)?);
                self.blocks.insert((ino, index), Slot::Read(bytes.clone()));
                self.order.push_back((ino, index));
                Ok(bytes)
            }
            None => Err(TargetError {
                target: self.store.target().name().to_string(),
                action: format!("reading {}", self.node(ino).file.as_ref().map_or("", |f| f.0.as_str())),
                detail: format!("block {index} is past the object's end"),
            }),
        }
    }

    /// Bytes `offset..offset + len` of file `ino` (fewer at its end).
    fn read_at(&mut self, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, TargetError> {
        let size = self.node(ino).file.as_ref().map_or(0, |f| f.1);
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        // Read ahead only while the file is read in order (qemu-img check jumps about).
        if self.last.get(&ino).is_none_or(|p| first == *p || first == p + 1) {
            for i in last + 1..=last + AHEAD {
                self.start(ino, i);
            }
        }
        self.last.insert(ino, last);
        let mut out = Vec::with_capacity((end - offset) as usize);
        for i in first..=last {
            let block = self.block(ino, i)?;
            let from = offset.max(i * BLOCK) - i * BLOCK;
            let to = end.min((i + 1) * BLOCK) - i * BLOCK;
            out.extend_from_slice(&block[from as usize..(to as usize).min(block.len())]);
        }
        Ok(out)
    }
}

impl fuser::Filesystem for ViewFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match name.to_str().and_then(|n| self.child(parent, n)) {
            Some(ino) => reply.entry(&TTL, &self.attr(ino), 0),
            None => reply.error(nix::libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.get(ino) {
            Some(_) => reply.attr(&TTL, &self.attr(ino)),
            None => reply.error(nix::libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        match self.get(ino).map(|n| n.file.is_some()) {
            Some(true) if flags & nix::libc::O_ACCMODE == nix::libc::O_RDONLY => {
                reply.opened(0, fuser::consts::FOPEN_KEEP_CACHE)
            }
            Some(true) => reply.error(nix::libc::EROFS),
            Some(false) => reply.error(nix::libc::EISDIR),
            None => reply.error(nix::libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        if self.get(ino).is_none_or(|n| n.file.is_none()) {
            return reply.error(nix::libc::EISDIR);
        }
        match self.read_at(ino, offset.max(0) as u64, u64::from(size)) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => {
                if let Ok(mut f) = self.failure.lock() {
                    f.get_or_insert_with(|| e.to_string());
                }
                reply.error(nix::libc::EIO)
            }
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let Some(n) = self.get(ino).filter(|n| n.file.is_none()) else { return reply.error(nix::libc::ENOTDIR) };
        let mut entries =
            vec![(ino, FileType::Directory, ".".to_owned()), (n.parent, FileType::Directory, "..".to_owned())];
        for c in &n.children {
            let kind = if self.node(*c).file.is_some() { FileType::RegularFile } else { FileType::Directory };
            entries.push((*c, kind, self.node(*c).name.clone()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(fs: &ViewFs, ino: u64) -> Vec<String> {
        fs.node(ino).children.iter().map(|c| fs.node(*c).name.clone()).collect()
    }

    #[test]
    fn keys_become_a_tree_and_odd_keys_are_left_out() {
        let target = nasbak_repo::ObjectTarget::new(
            "offsite",
            "https://s3.example.com",
            "backups",
            None,
            nasbak_repo::S3Credentials::Environment,
        )
        .unwrap();
        let store = ObjectStore::connect_with(&target, 1).unwrap();
        let keys = [
            ("web.1/2026.01.01.00.00.00/manifest.json", 10),
            ("web.1/2026.01.01.00.00.00/root.vda.qcow2", 1 << 30),
            ("web.1/2026.01.02.00.00.00/root.vda.qcow2", 5),
            ("web.1//x", 1),                                  // an empty part
            ("web.1/../etc", 1),                              // a parent
            ("web.1/2026.01.01.00.00.00", 3),                 // a directory already
            ("web.1/2026.01.01.00.00.00/manifest.json/x", 1), // under a file
        ];
        let fs = ViewFs::new(store, keys.iter().map(|(k, s)| (*k, *s)), Arc::default());
        assert_eq!(names(&fs, 1), ["web.1"]);
        let vm = fs.child(1, "web.1").unwrap();
        assert_eq!(names(&fs, vm), ["2026.01.01.00.00.00", "2026.01.02.00.00.00"]);
        let b = fs.child(vm, "2026.01.01.00.00.00").unwrap();
        assert_eq!(names(&fs, b), ["manifest.json", "root.vda.qcow2"]);
        let disk = fs.child(b, "root.vda.qcow2").unwrap();
        assert_eq!(fs.attr(disk).size, 1 << 30);
        assert_eq!(fs.attr(disk).kind, FileType::RegularFile);
        assert_eq!(fs.attr(b).kind, FileType::Directory);
        assert!(fs.get(0).is_none() && fs.get(99).is_none());
    }
}
