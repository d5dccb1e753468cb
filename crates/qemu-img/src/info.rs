//! `qemu-img info --output=json` and `qemu-img check --output=json`, parsed with serde.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An image format.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// qcow2.
    Qcow2,
    /// raw.
    Raw,
    /// Anything else qemu-img knows (vmdk, vdi, ...).
    Other(String),
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
            ImageFormat::Other(s) => s,
        })
    }
}

impl FromStr for ImageFormat {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "qcow2" => ImageFormat::Qcow2,
            "raw" => ImageFormat::Raw,
            other => ImageFormat::Other(other.to_owned()),
        })
    }
}

impl Serialize for ImageFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s.parse().unwrap_or_else(|never| match never {}))
    }
}

/// One persistent dirty bitmap of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    /// Its name (libvirt names them after checkpoints).
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Flags such as `auto` or `in-use`.
    #[serde(default)]
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: FormatSpecificData,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct FormatSpecificData {
    #[serde(default)]
    bitmaps: Vec<Bitmap>,
    #[serde(rename = "compression-type")]
    compression_type: Option<String>,
    corrupt: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawInfo {
    filename: String,
    format: ImageFormat,
    virtual_size: u64,
    actual_size: Option<u64>,
    backing_filename: Option<String>,
    full_backing_filename: Option<String>,
    backing_filename_format: Option<ImageFormat>,
    #[serde(default)]
    format_specific: Option<FormatSpecific>,
}

/// What `qemu-img info` says about one image (one layer of a chain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// The file name qemu-img was given or found in the chain.
    pub filename: String,
    /// The format.
    pub format: ImageFormat,
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host, when known.
    pub actual_size: Option<u64>,
    /// The backing file as written in the image, if any.
    pub backing_file: Option<String>,
    /// The backing file's format, if recorded.
    pub backing_format: Option<ImageFormat>,
    /// Persistent dirty bitmaps (qcow2).
    pub bitmaps: Vec<Bitmap>,
    /// The qcow2 compression type (`zlib`, `zstd`).
    pub compression_type: Option<String>,
    /// Whether qcow2 marked itself corrupt.
    pub corrupt: bool,
}

impl From<RawInfo> for ImageInfo {
    fn from(r: RawInfo) -> Self {
        let specific = r.format_specific.unwrap_or_default().data;
        ImageInfo {
            filename: r.filename,
            format: r.format,
            virtual_size: r.virtual_size,
            actual_size: r.actual_size,
            backing_file: r.full_backing_filename.or(r.backing_filename),
            backing_format: r.backing_filename_format,
            bitmaps: specific.bitmaps,
            compression_type: specific.compression_type,
            corrupt: specific.corrupt.unwrap_or(false),
        }
    }
}

/// Parses `qemu-img info --output=json --backing-chain`: the image first, then its backing
/// files in order. Also accepts the single object printed without `--backing-chain`.
pub fn parse_info(json: &str) -> Result<Vec<ImageInfo>, serde_json::Error> {
    let trimmed = json.trim_start();
    if trimmed.starts_with('[') {
        let raw: Vec<RawInfo> = serde_json::from_str(json)?;
        Ok(raw.into_iter().map(ImageInfo::from).collect())
    } else {
        Ok(vec![serde_json::from_str::<RawInfo>(json)?.into()])
    }
}

/// What `qemu-img check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The verdict, from the exit code.
    pub verdict: CheckVerdict,
    /// Corrupted clusters or metadata (a damaged image).
    pub corruptions: u64,
    /// Leaked clusters (wasted space, data intact).
    pub leaks: u64,
    /// Errors that stopped the check.
    pub check_errors: u64,
}

/// The meaning of `qemu-img check`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CheckVerdict {
    /// 0: no problem.
    Clean,
    /// 3: leaked clusters only; the data is intact.
    Leaks,
    /// 2: corruptions; the image is damaged.
    Corrupt,
    /// 1: the check itself could not complete.
    Incomplete,
    /// 63: the format does not support checks (raw).
    Unsupported,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawCheck {
    #[serde(default)]
    corruptions: u64,
    #[serde(default)]
    leaks: u64,
    #[serde(default)]
    check_errors: u64,
}

/// Interprets `qemu-img check --output=json`'s exit code and output.
pub fn parse_check(exit_code: i32, json: &str) -> Option<CheckReport> {
    let verdict = match exit_code {
        0 => CheckVerdict::Clean,
        1 => CheckVerdict::Incomplete,
        2 => CheckVerdict::Corrupt,
        3 => CheckVerdict::Leaks,
        63 => CheckVerdict::Unsupported,
        _ => return None,
    };
    let raw: RawCheck = serde_json::from_str(json).unwrap_or_default();
    Some(CheckReport { verdict, corruptions: raw.corruptions, leaks: raw.leaks, check_errors: raw.check_errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_chain_with_bitmaps() {
        let json = r#"[{"virtual-size": 67108864, "filename": "top.qcow2", "format": "qcow2", "actual-size": 200704,
            "backing-filename": "base.raw", "full-backing-filename": "/v/base.raw", "backing-filename-format": "raw",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zstd",
            "bitmaps": [{"flags": ["auto"], "name": "chk1", "granularity": 65536}], "corrupt": false}}},
            {"virtual-size": 67108864, "filename": "/v/base.raw", "format": "raw", "actual-size": 4096}]"#;
        let chain = parse_info(json).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].backing_file.as_deref(), Some("/v/base.raw"));
        assert_eq!(chain[0].backing_format, Some(ImageFormat::Raw));
        assert_eq!(chain[0].bitmaps[0].name, "chk1");
        assert_eq!(chain[0].compression_type.as_deref(), Some("zstd"));
        assert_eq!(chain[1].format, ImageFormat::Raw);
        assert!(parse_info("{").is_err());
    }

    #[test]
    fn check_exit_codes() {
        let r = parse_check(3, r#"{"leaks": 4, "check-errors": 0}"#).unwrap();
        assert_eq!((r.verdict, r.leaks, r.corruptions), (CheckVerdict::Leaks, 4, 0));
        assert_eq!(parse_check(2, r#"{"corruptions": 1}"#).unwrap().verdict, CheckVerdict::Corrupt);
        assert_eq!(parse_check(63, "").unwrap().verdict, CheckVerdict::Unsupported);
        assert_eq!(parse_check(0, "{}").unwrap().verdict, CheckVerdict::Clean);
        assert!(parse_check(9, "").is_none());
    }
}
