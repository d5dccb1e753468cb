//! qcow2 files stored compressed, encrypted or both, as QEMU opens them.
//!
//! Every such file is still one that stock qemu-img reads: what it needs is the key, given as
//! a secret object read from a file (`--object secret,id=nasbak-key,file=KEY`; never on argv,
//! never in the environment), and the layout of each file of the chain, given as a `json:`
//! filename. Three layouts exist:
//!
//! - [`StoredLayout::Qcow2`]: a plain qcow2, whose clusters may be zstd-compressed (reading a
//!   compressed cluster needs nothing more);
//! - [`StoredLayout::Qcow2Luks`]: qcow2's built-in LUKS (`encrypt.format=luks`);
//! - [`StoredLayout::Qcow2InLuks`]: a LUKS container (QEMU's `luks` format) whose payload is a
//!   zstd-compressed qcow2, because qcow2 refuses compression and encryption in one image
//!   ("Compression and encryption not supported at the same time"). Random access holds: LUKS
//!   encrypts sector by sector, qcow2 finds each cluster by its tables.
//!
//! A chain is opened with every file's layout and path given, so nothing is probed and the
//! backing names written in the files' headers are not followed.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The id of the secret object of the key that opens a [`StoredImage`].
pub const KEY_SECRET_ID: &str = "nasbak-key";
/// The id of the secret object of the key a new file is written with ([`TargetProtection`]):
/// another id, since a source and its copy may have different keys.
pub const TARGET_KEY_SECRET_ID: &str = "nasbak-target-key";

/// How a qcow2 file is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredLayout {
    /// A qcow2 (its clusters possibly compressed).
    Qcow2,
    /// A qcow2 with built-in LUKS encryption.
    Qcow2Luks,
    /// A compressed qcow2 inside a LUKS container.
    Qcow2InLuks,
}

impl StoredLayout {
    /// Whether its data needs the key.
    pub fn needs_key(self) -> bool {
        !matches!(self, StoredLayout::Qcow2)
    }
}

/// One file of a stored chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Where it is.
    pub path: PathBuf,
    /// How it is laid out.
    pub layout: StoredLayout,
}

/// A qcow2 file and the chain of files under it (top first, each file's backing the next), with
/// the key file that opens the encrypted ones. The key file is read by QEMU only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    /// The files, top first; the last one has no backing file.
    pub chain: Vec<StoredFile>,
    /// The key file (root-owned, 0600), needed when a file of the chain is encrypted.
    pub key: Option<PathBuf>,
}

impl StoredImage {
    /// A single self-contained file.
    pub fn single(path: impl Into<PathBuf>, layout: StoredLayout, key: Option<PathBuf>) -> Self {
        StoredImage { chain: vec![StoredFile { path: path.into(), layout }], key }
    }

    /// The top file.
    pub fn top(&self) -> Option<&Path> {
        self.chain.first().map(|f| f.path.as_path())
    }

    /// The block node tree that opens the chain (`with_backing` false: the top file alone, its
    /// backing left as its header says, for commands that open no backing file).
    pub fn json(&self, with_backing: bool) -> Value {
        fn node(files: &[StoredFile], with_backing: bool) -> Value {
            let Some((first, rest)) = files.split_first() else { return Value::Null };
            let file = json!({"driver": "file", "filename": first.path});
            let mut n = match first.layout {
                StoredLayout::Qcow2 => json!({"driver": "qcow2", "file": file}),
                StoredLayout::Qcow2Luks => json!({
                    "driver": "qcow2", "file": file,
                    "encrypt": {"format": "luks", "key-secret": KEY_SECRET_ID}
                }),
                StoredLayout::Qcow2InLuks => json!({
                    "driver": "qcow2",
                    "file": {"driver": "luks", "key-secret": KEY_SECRET_ID, "file": file}
                }),
            };
            if with_backing && !rest.is_empty() {
                n["backing"] = node(rest, true);
            } else if with_backing {
                // The chain ends here: the header's backing name is not followed (an encrypted
                // one could not be opened without the key anyway; a reference-system file's may
                // name a path outside the repository).
                n["backing"] = Value::Null;
            }
            n
        }
        node(&self.chain, with_backing)
    }

    /// The `json:` filename qemu-img opens it by.
    pub fn filename(&self, with_backing: bool) -> String {
        format!("json:{}", self.json(with_backing))
    }

    /// Whether any file of the chain needs the key.
    pub fn needs_key(&self) -> bool {
        self.chain.iter().any(|f| f.layout.needs_key())
    }
}

/// The `--object` arguments that hand QEMU the key file `key` as secret `id`, if there is one.
pub(crate) fn key_object_args(id: &str, key: Option<&Path>) -> Vec<String> {
    match key {
        Some(k) => vec!["--object".into(), format!("secret,id={id},file={}", escape_opt(&k.to_string_lossy()))],
        None => Vec::new(),
    }
}

/// A value in QEMU's `key=value,...` option syntax: a comma is doubled.
pub(crate) fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

/// How a new qcow2 file is written: compressed, encrypted, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetProtection {
    /// Its layout.
    pub layout: StoredLayout,
    /// Written with compressed clusters (zstd).
    pub compressed: bool,
    /// The key file, for an encrypted layout.
    pub key: Option<PathBuf>,
}

impl TargetProtection {
    /// The protection that writes `layout` (compressed for [`StoredLayout::Qcow2InLuks`] always,
    /// for [`StoredLayout::Qcow2`] when `compressed`).
    pub fn new(layout: StoredLayout, compressed: bool, key: Option<PathBuf>) -> Self {
        let compressed = compressed || layout == StoredLayout::Qcow2InLuks;
        TargetProtection { layout, compressed: compressed && layout != StoredLayout::Qcow2Luks, key }
    }

    /// The `-o` options of `qemu-img create` or `convert` for a qcow2 of this protection (for
    /// [`StoredLayout::Qcow2InLuks`], those of the inner qcow2). An encrypted file is never made
    /// by qemu-img: nasbak writes its empty qcow2 and LUKS header itself (the `luks` module),
    /// since QEMU 7.2 spends seconds timing its PBKDF for each.
    pub fn create_options(&self) -> Vec<String> {
        let mut o = Vec::new();
        if self.compressed {
            o.push("compression_type=zstd".to_owned());
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_opens_with_every_files_layout_and_the_key_by_id_only() {
        let chain = StoredImage {
            chain: vec![
                StoredFile { path: "/r/vm/2/root.a.qcow2".into(), layout: StoredLayout::Qcow2InLuks },
                StoredFile { path: "/r/vm/1/root.a.qcow2".into(), layout: StoredLayout::Qcow2Luks },
                StoredFile { path: "/r/vm/0/root.a.qcow2".into(), layout: StoredLayout::Qcow2 },
            ],
            key: Some("/etc/nasbak/k".into()),
        };
        let j = chain.json(true);
        assert_eq!(j["file"]["driver"], "luks");
        assert_eq!(j["file"]["key-secret"], KEY_SECRET_ID);
        assert_eq!(j["file"]["file"]["filename"], "/r/vm/2/root.a.qcow2");
        assert_eq!(j["backing"]["encrypt"]["key-secret"], KEY_SECRET_ID);
        assert_eq!(j["backing"]["backing"]["file"]["filename"], "/r/vm/0/root.a.qcow2");
        // The chain ends where it is given: no header's backing name is followed.
        assert!(j["backing"]["backing"]["backing"].is_null() && j["backing"]["backing"].get("backing").is_some());
        assert!(chain.json(false).get("backing").is_none());
        assert!(chain.filename(true).starts_with("json:{"));
        assert!(chain.needs_key());
        assert_eq!(
            key_object_args(KEY_SECRET_ID, chain.key.as_deref()),
            ["--object", "secret,id=nasbak-key,file=/etc/nasbak/k"]
        );
        assert_eq!(key_object_args("x", Some(Path::new("/a,b")))[1], "secret,id=x,file=/a,,b");
        assert!(key_object_args(KEY_SECRET_ID, None).is_empty());
    }

    #[test]
    fn compression_goes_where_qcow2_allows_it() {
        let both = TargetProtection::new(StoredLayout::Qcow2InLuks, false, Some("/k".into()));
        assert!(both.compressed);
        assert_eq!(both.create_options(), ["compression_type=zstd"]);
        let enc = TargetProtection::new(StoredLayout::Qcow2Luks, true, Some("/k".into()));
        assert!(!enc.compressed, "qcow2 refuses compression with its own encryption");
        assert!(enc.create_options().is_empty(), "nasbak makes an encrypted file itself");
        assert_eq!(TargetProtection::new(StoredLayout::Qcow2, true, None).create_options(), ["compression_type=zstd"]);
        assert!(TargetProtection::new(StoredLayout::Qcow2, false, None).create_options().is_empty());
    }
}
