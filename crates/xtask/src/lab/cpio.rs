//! A minimal writer of the cpio "newc" format, which is what the kernel unpacks as initramfs.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Writes every file, directory and symlink under `root` (paths relative to it) to `out`.
pub fn write_tree(root: &Path, out: &mut impl Write) -> io::Result<()> {
    let mut ino = 1u32;
    walk(root, root, out, &mut ino)?;
    entry(out, "TRAILER!!!", 0, 0, &[], 0)?;
    Ok(())
}

fn walk(root: &Path, dir: &Path, out: &mut impl Write, ino: &mut u32) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = path.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
        let meta = fs::symlink_metadata(&path)?;
        *ino += 1;
        let perm = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            entry(out, &name, 0o120000 | 0o777, *ino, target.to_string_lossy().as_bytes(), meta.mtime())?;
        } else if meta.is_dir() {
            entry(out, &name, 0o040000 | perm, *ino, &[], meta.mtime())?;
            walk(root, &path, out, ino)?;
        } else {
            entry(out, &name, 0o100000 | perm, *ino, &fs::read(&path)?, meta.mtime())?;
        }
    }
    Ok(())
}

fn pad(out: &mut impl Write, len: usize) -> io::Result<()> {
    out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

fn entry(out: &mut impl Write, name: &str, mode: u32, ino: u32, data: &[u8], mtime: i64) -> io::Result<()> {
    let namesize = name.len() + 1;
    let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{z:08x}{z:08x}{z:08x}{z:08x}{namesize:08x}{z:08x}",
        uid = 0,
        gid = 0,
        mtime = mtime.max(0) as u32,
        size = data.len(),
        z = 0,
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, header.len() + namesize)?;
    out.write_all(data)?;
    pad(out, data.len())
}
