//! The serde shape of libvirt's domain XML, as far as nasbak reads it. Every element and
//! attribute nasbak does not need is ignored, so any valid domain document parses.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub(crate) struct RawDomain {
    pub name: String,
    pub uuid: Option<String>,
    #[serde(default)]
    pub devices: RawDevices,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawStatus {
    pub domain: RawDomain,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawDevices {
    #[serde(rename = "disk", default)]
    pub disks: Vec<RawDisk>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Flag {}

#[derive(Debug, Deserialize)]
pub(crate) struct RawDisk {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "@device")]
    pub device: Option<String>,
    pub driver: Option<RawDriver>,
    pub source: Option<RawSource>,
    #[serde(rename = "backingStore")]
    pub backing_store: Option<Box<RawBacking>>,
    pub target: Option<RawTarget>,
    pub readonly: Option<Flag>,
    pub shareable: Option<Flag>,
    pub serial: Option<String>,
    pub auth: Option<RawAuth>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawDriver {
    #[serde(rename = "@type")]
    pub format: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawFormat {
    #[serde(rename = "@type")]
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawSource {
    #[serde(rename = "@file")]
    pub file: Option<String>,
    #[serde(rename = "@dev")]
    pub dev: Option<String>,
    #[serde(rename = "@protocol")]
    pub protocol: Option<String>,
    #[serde(rename = "@name")]
    pub name: Option<String>,
    #[serde(rename = "@pool")]
    pub pool: Option<String>,
    #[serde(rename = "@volume")]
    pub volume: Option<String>,
    #[serde(rename = "host", default)]
    pub hosts: Vec<RawHost>,
    pub auth: Option<RawAuth>,
    pub config: Option<RawConfig>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawConfig {
    #[serde(rename = "@file")]
    pub file: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawHost {
    #[serde(rename = "@name")]
    pub name: Option<String>,
    #[serde(rename = "@port")]
    pub port: Option<String>,
    #[serde(rename = "@transport")]
    pub transport: Option<String>,
    #[serde(rename = "@socket")]
    pub socket: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawAuth {
    #[serde(rename = "@username")]
    pub username: Option<String>,
    pub secret: Option<RawSecret>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawSecret {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "@usage")]
    pub usage: Option<String>,
    #[serde(rename = "@uuid")]
    pub uuid: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawBacking {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    pub format: Option<RawFormat>,
    pub source: Option<RawSource>,
    #[serde(rename = "backingStore")]
    pub backing_store: Option<Box<RawBacking>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawTarget {
    #[serde(rename = "@dev")]
    pub dev: Option<String>,
    #[serde(rename = "@bus")]
    pub bus: Option<String>,
}
