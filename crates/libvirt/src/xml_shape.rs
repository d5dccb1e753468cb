//! The serde shape of libvirt's domain XML, as far as nasbak reads it. Every element and
//! attribute nasbak does not need is ignored, so any valid domain document parses.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub(crate) struct XmlDomain {
    pub name: String,
    pub uuid: Option<String>,
    pub os: Option<XmlOs>,
    #[serde(default)]
    pub devices: XmlDevices,
}

/// `<os>`: only its `<nvram>`.
#[derive(Debug, Deserialize)]
pub(crate) struct XmlOs {
    pub nvram: Option<XmlNvram>,
}

/// `<nvram [template=…] [type='file']>PATH</nvram>` or `<nvram type='file'><source file=…/>`.
#[derive(Debug, Deserialize)]
pub(crate) struct XmlNvram {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "@template")]
    pub template: Option<String>,
    #[serde(rename = "$text")]
    pub path: Option<String>,
    pub source: Option<XmlNvramSource>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlNvramSource {
    #[serde(rename = "@file")]
    pub file: Option<String>,
}

/// `<tpm model=…><backend type=… version=… persistent_state=…><source path=…/></backend>`.
#[derive(Debug, Deserialize)]
pub(crate) struct XmlTpm {
    #[serde(rename = "@model")]
    pub model: Option<String>,
    pub backend: Option<XmlTpmBackend>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlTpmBackend {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "@version")]
    pub version: Option<String>,
    pub source: Option<XmlTpmSource>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlTpmSource {
    #[serde(rename = "@path")]
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlStatus {
    pub domain: XmlDomain,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct XmlDevices {
    #[serde(rename = "disk", default)]
    pub disks: Vec<XmlDisk>,
    #[serde(rename = "tpm", default)]
    pub tpms: Vec<XmlTpm>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Flag {}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlDisk {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "@device")]
    pub device: Option<String>,
    pub driver: Option<XmlDriver>,
    pub source: Option<XmlSource>,
    #[serde(rename = "backingStore")]
    pub backing_store: Option<Box<XmlBacking>>,
    pub target: Option<XmlTarget>,
    pub readonly: Option<Flag>,
    pub shareable: Option<Flag>,
    pub serial: Option<String>,
    pub auth: Option<XmlAuth>,
    /// The older place of a disk's encryption (libvirt moved it into `<source>`).
    pub encryption: Option<XmlEncryption>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlEncryption {
    #[serde(rename = "@format")]
    pub format: Option<String>,
    pub secret: Option<XmlSecret>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlDriver {
    #[serde(rename = "@type")]
    pub format: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlFormat {
    #[serde(rename = "@type")]
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct XmlSource {
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
    pub hosts: Vec<XmlHost>,
    pub auth: Option<XmlAuth>,
    pub config: Option<XmlConfig>,
    pub encryption: Option<XmlEncryption>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlConfig {
    #[serde(rename = "@file")]
    pub file: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlHost {
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
pub(crate) struct XmlAuth {
    #[serde(rename = "@username")]
    pub username: Option<String>,
    pub secret: Option<XmlSecret>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlSecret {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "@usage")]
    pub usage: Option<String>,
    #[serde(rename = "@uuid")]
    pub uuid: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlBacking {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    pub format: Option<XmlFormat>,
    pub source: Option<XmlSource>,
    #[serde(rename = "backingStore")]
    pub backing_store: Option<Box<XmlBacking>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct XmlTarget {
    #[serde(rename = "@dev")]
    pub dev: Option<String>,
    #[serde(rename = "@bus")]
    pub bus: Option<String>,
}
