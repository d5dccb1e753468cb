//! How a repository protects its backup files: compression (`zstd` or `none`), encryption
//! (`luks` or `none`) and where the encryption key comes from. Pure: the key file's owner and
//! mode are checked where it is read (the store's `keys`).
//!
//! Every backup file stays a qcow2 that stock `qemu-img` reads (see `docs/encryption.md`):
//! compressed clusters use qcow2's `compression_type=zstd`, encryption is qcow2's built-in LUKS
//! (`encrypt.format=luks`), and both at once, which qcow2 refuses within one image, are a
//! compressed qcow2 inside a LUKS container ([`FileFormat::CompressedInLuks`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::{ParseError, first_control};

/// Whether backup files are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as written.
    #[default]
    None,
    /// qcow2 compressed clusters with `compression_type=zstd`.
    Zstd,
}

/// Whether backup files are encrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// Plaintext.
    #[default]
    None,
    /// LUKS (qcow2's built-in `encrypt.format=luks`; AES-256-XTS, a passphrase in a keyslot).
    Luks,
}

impl FromStr for Compression {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            _ => Err(ParseError::new("compression", s, 0, "not a known compression", "zstd or none")),
        }
    }
}

impl FromStr for Encryption {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "luks" => Ok(Encryption::Luks),
            "none" => Ok(Encryption::None),
            _ => Err(ParseError::new("encryption", s, 0, "not a known encryption", "luks or none")),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        })
    }
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encryption::None => "none",
            Encryption::Luks => "luks",
        })
    }
}

/// Where an encryption key (a passphrase) comes from. Only its location is ever held or shown,
/// never its value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// A file, root-owned with mode 0600, holding the passphrase (a trailing newline is part of
    /// it, as `qemu-img --object secret,file=` reads it).
    File(PathBuf),
    /// A libvirt secret (usage type `volume` or `passphrase`), by UUID.
    LibvirtSecret(uuid::Uuid),
}

impl KeySource {
    /// A key file at the absolute path `path`.
    pub fn file(path: &str) -> Result<KeySource, ParseError> {
        let err = |pos, problem: &str| ParseError::new("key file", path, pos, problem, "an absolute path to a file");
        if let Some(pos) = first_control(path) {
            return Err(err(pos, "a control character is not allowed"));
        }
        if !path.starts_with('/') {
            return Err(err(0, "not an absolute path"));
        }
        if path.contains(',') {
            // qemu's option syntax would need `,,`; keep every consumer simple.
            return Err(err(path.find(',').unwrap_or(0), "a comma is not allowed in a key file's path"));
        }
        Ok(KeySource::File(PathBuf::from(path)))
    }

    /// The libvirt secret `uuid`.
    pub fn libvirt_secret(uuid: &str) -> Result<KeySource, ParseError> {
        uuid::Uuid::parse_str(uuid).map(KeySource::LibvirtSecret).map_err(|e| {
            ParseError::new("libvirt secret", uuid, 0, e.to_string(), "a UUID as `virsh secret-list` shows it")
        })
    }

    /// The key file, if that is where the key comes from.
    pub fn path(&self) -> Option<&Path> {
        match self {
            KeySource::File(p) => Some(p),
            KeySource::LibvirtSecret(_) => None,
        }
    }
}

impl fmt::Display for KeySource {
    /// `file:PATH` or `libvirt-secret:UUID`: where, never what.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "file:{}", p.display()),
            KeySource::LibvirtSecret(u) => write!(f, "libvirt-secret:{u}"),
        }
    }
}

impl FromStr for KeySource {
    type Err = ParseError;
    /// `file:PATH`, `libvirt-secret:UUID`, or an absolute path.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if let Some(u) = s.strip_prefix("libvirt-secret:") {
            return KeySource::libvirt_secret(u);
        }
        KeySource::file(s.strip_prefix("file:").unwrap_or(s))
    }
}

/// How a repository (or an offering, overriding it) protects the backup files it writes.
/// Changing it affects later backups only: each backup records how its files are stored, and a
/// chain keeps the protection of its full.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Protection {
    compression: Compression,
    encryption: Encryption,
    key: Option<KeySource>,
}

impl Protection {
    /// No compression, no encryption.
    pub fn none() -> Protection {
        Protection::default()
    }

    /// Checks that the pieces fit: encryption needs a key, and a key without encryption is a
    /// mistake worth saying (it would silently protect nothing).
    pub fn new(compression: Compression, encryption: Encryption, key: Option<KeySource>) -> Result<Self, ParseError> {
        match (encryption, &key) {
            (Encryption::Luks, None) => Err(ParseError::new(
                "encryption",
                "luks",
                0,
                "an encrypted repository needs a key",
                "give a key file (--key-file PATH, root-owned, mode 0600) or a libvirt secret (--key-secret UUID)",
            )),
            (Encryption::None, Some(k)) => Err(ParseError::new(
                "key",
                &k.to_string(),
                0,
                "a key was given but encryption is none",
                "add --encrypt luks, or leave the key out",
            )),
            _ => Ok(Protection { compression, encryption, key }),
        }
    }

    /// The compression of new backup files.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The encryption of new backup files.
    pub fn encryption(&self) -> Encryption {
        self.encryption
    }

    /// Where the key comes from (set exactly when encrypting).
    pub fn key(&self) -> Option<&KeySource> {
        self.key.as_ref()
    }

    /// Whether backup files are written plain (neither compressed nor encrypted).
    pub fn is_plain(&self) -> bool {
        self.file_format() == FileFormat::Plain
    }

    /// How each backup file is stored under this protection.
    pub fn file_format(&self) -> FileFormat {
        match (self.compression, self.encryption) {
            (Compression::None, Encryption::None) => FileFormat::Plain,
            (Compression::Zstd, Encryption::None) => FileFormat::Compressed,
            (Compression::None, Encryption::Luks) => FileFormat::Encrypted,
            (Compression::Zstd, Encryption::Luks) => FileFormat::CompressedInLuks,
        }
    }
}

impl fmt::Display for Protection {
    /// `compression zstd, encryption luks (key file:/etc/nasbak/k)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "compression {}, encryption {}", self.compression, self.encryption)?;
        if let Some(k) = &self.key {
            write!(f, " (key {k})")?;
        }
        Ok(())
    }
}

/// How one backup file is stored, as its manifest records it (`format_detail`). Readers open a
/// file by this, never by probing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileFormat {
    /// A plain qcow2.
    #[default]
    Plain,
    /// A qcow2 whose clusters are zstd-compressed.
    Compressed,
    /// A qcow2 with built-in LUKS encryption (`encrypt.format=luks`).
    Encrypted,
    /// A LUKS container (QEMU's `luks` format) whose payload is a zstd-compressed qcow2: qcow2
    /// refuses compression and encryption in one image, and this keeps random access.
    CompressedInLuks,
}

impl FileFormat {
    /// Whether reading the file's data needs the key.
    pub fn is_encrypted(self) -> bool {
        matches!(self, FileFormat::Encrypted | FileFormat::CompressedInLuks)
    }

    /// Whether new clusters are written compressed.
    pub fn is_compressed(self) -> bool {
        matches!(self, FileFormat::Compressed | FileFormat::CompressedInLuks)
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileFormat::Plain => "plain",
            FileFormat::Compressed => "compressed",
            FileFormat::Encrypted => "encrypted",
            FileFormat::CompressedInLuks => "compressed-in-luks",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_say_what_is_valid() {
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd);
        assert_eq!("none".parse::<Encryption>().unwrap(), Encryption::None);
        let e = "gzip".parse::<Compression>().unwrap_err().to_string();
        assert!(e.contains("\"gzip\"") && e.contains("zstd or none"), "{e}");
        let e = "aes".parse::<Encryption>().unwrap_err().to_string();
        assert!(e.contains("luks or none"), "{e}");
        assert_eq!("/etc/k".parse::<KeySource>().unwrap(), KeySource::File("/etc/k".into()));
        assert_eq!("file:/etc/k".parse::<KeySource>().unwrap().to_string(), "file:/etc/k");
        let u = "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f";
        assert_eq!(
            format!("libvirt-secret:{u}").parse::<KeySource>().unwrap().to_string(),
            format!("libvirt-secret:{u}")
        );
        for bad in ["k", "/a,b", "/a\nb", "libvirt-secret:nope"] {
            assert!(bad.parse::<KeySource>().is_err(), "{bad}");
        }
    }

    #[test]
    fn encryption_needs_a_key_and_a_key_needs_encryption() {
        let key = Some(KeySource::File("/etc/k".into()));
        let e = Protection::new(Compression::None, Encryption::Luks, None).unwrap_err().to_string();
        assert!(e.contains("needs a key") && e.contains("--key-file"), "{e}");
        let e = Protection::new(Compression::Zstd, Encryption::None, key.clone()).unwrap_err().to_string();
        assert!(e.contains("encryption is none"), "{e}");
        let both = Protection::new(Compression::Zstd, Encryption::Luks, key).unwrap();
        assert_eq!(both.file_format(), FileFormat::CompressedInLuks);
        assert!(both.file_format().is_encrypted() && both.file_format().is_compressed());
        assert_eq!(both.to_string(), "compression zstd, encryption luks (key file:/etc/k)");
        assert!(Protection::none().is_plain());
        let zstd = Protection::new(Compression::Zstd, Encryption::None, None).unwrap();
        assert_eq!(zstd.file_format(), FileFormat::Compressed);
        assert!(!zstd.file_format().is_encrypted());
    }
}
