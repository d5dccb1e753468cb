//! The typed domain model: disks, their sources and backing chains, and which to back up.

use std::path::PathBuf;

use crate::xml_shape::{XmlAuth, XmlBacking, XmlDisk, XmlDomain, XmlSource, XmlStatus};

/// A domain XML document could not be read.
#[derive(Debug, thiserror::Error)]
#[error("could not read the domain XML: {detail}")]
#[non_exhaustive]
pub struct XmlError {
    /// What was wrong, from the XML reader.
    pub detail: String,
}

/// What kind of device a disk is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDevice {
    /// A disk.
    Disk,
    /// A cdrom.
    Cdrom,
    /// A floppy.
    Floppy,
    /// A SCSI LUN passed through.
    Lun,
}

/// A network disk's server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkHost {
    /// Host name or address.
    pub name: Option<String>,
    /// Port.
    pub port: Option<u16>,
    /// `tcp`, `unix`, `rdma`.
    pub transport: Option<String>,
    /// The unix socket, for `transport='unix'`.
    pub socket: Option<String>,
}

/// Authentication of a network disk (the secret stays in libvirt; only its reference is here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAuth {
    /// The user name.
    pub username: Option<String>,
    /// The secret's type (`ceph`, `iscsi`).
    pub secret_type: Option<String>,
    /// The secret's usage name.
    pub secret_usage: Option<String>,
    /// The secret's UUID.
    pub secret_uuid: Option<String>,
}

/// Where a disk's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A file.
    File(PathBuf),
    /// A block device.
    Block(PathBuf),
    /// A network disk (rbd, nbd, iscsi, gluster, http, ...).
    Network {
        /// The protocol.
        protocol: String,
        /// The image or export name (`pool/image` for rbd).
        name: Option<String>,
        /// Its servers (Ceph monitors for rbd).
        hosts: Vec<NetworkHost>,
        /// Its authentication.
        auth: Option<NetworkAuth>,
        /// A config file (rbd's ceph.conf).
        config: Option<PathBuf>,
    },
    /// A volume of a libvirt storage pool.
    Volume {
        /// The pool.
        pool: String,
        /// The volume.
        volume: String,
    },
    /// Any other source type (nvme, vhostuser, dir), by its type name.
    Other(String),
}

impl std::fmt::Display for DiskSource {
    /// A one-line description for reports: the path, `rbd:pool/image`, `pool/volume`, or the
    /// source type.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSource::File(p) | DiskSource::Block(p) => write!(f, "{}", p.display()),
            DiskSource::Network { protocol, name, .. } => {
                write!(f, "{protocol}:{}", name.as_deref().unwrap_or_default())
            }
            DiskSource::Volume { pool, volume } => write!(f, "{pool}/{volume}"),
            DiskSource::Other(kind) => f.write_str(kind),
        }
    }
}

/// One layer of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingLayer {
    /// Where it is.
    pub source: DiskSource,
    /// Its format.
    pub format: Option<String>,
}

/// One disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// disk, cdrom, floppy or lun.
    pub device: DiskDevice,
    /// The source, or `None` for an empty drive.
    pub source: Option<DiskSource>,
    /// The driver format (`qcow2`, `raw`).
    pub format: Option<String>,
    /// The target device name in the guest (`vda`): the disk's identity in a domain.
    pub target: String,
    /// The bus (`virtio`, `sata`, `scsi`, ...).
    pub bus: Option<String>,
    /// Read-only.
    pub readonly: bool,
    /// Shared between domains.
    pub shareable: bool,
    /// The serial the guest sees.
    pub serial: Option<String>,
    /// The backing chain below the source, top first.
    pub backing_chain: Vec<BackingLayer>,
    /// The disk's own encryption, QEMU decrypting it with a libvirt secret (`None`: plain).
    pub encryption: Option<DiskEncryption>,
}

/// A disk's own encryption: `<encryption format='luks'>` in its `<source>` (or, as older
/// libvirt wrote it, in the `<disk>`), its passphrase a libvirt secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEncryption {
    /// `luks` (a qcow2 disk's built-in LUKS, or a raw LUKS volume), or another format.
    pub format: String,
    /// The passphrase's libvirt secret, by UUID.
    pub secret_uuid: Option<String>,
    /// The passphrase's libvirt secret, by usage (a volume's path).
    pub secret_usage: Option<String>,
}

/// Why a disk is not backed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedDisk {
    /// Its target.
    pub target: String,
    /// Why.
    pub reason: &'static str,
}

impl Disk {
    /// `None` when the disk is backed up, else why not.
    pub fn skip_reason(&self) -> Option<&'static str> {
        match (&self.device, &self.source) {
            (DiskDevice::Cdrom, _) => Some("a cdrom holds install media, not VM data"),
            (DiskDevice::Floppy, _) => Some("a floppy holds install media, not VM data"),
            (_, None) => Some("the drive is empty"),
            _ if self.shareable => {
                Some("a shareable disk belongs to several VMs and cannot be backed up consistently from one")
            }
            (_, Some(DiskSource::Other(kind))) if kind == "vhostuser" => {
                Some("libvirt cannot back up vhost-user disks")
            }
            _ => None,
        }
    }
}

/// A domain, as far as backup and restore need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: Option<String>,
    /// Its disks, in document order.
    pub disks: Vec<Disk>,
    /// Its UEFI variable store (`<os><nvram>`), when it has one in a local file.
    pub nvram: Option<Nvram>,
    /// Its emulated TPM (`<tpm><backend type='emulator'>`), when it has one.
    pub tpm: Option<EmulatedTpm>,
}

/// A UEFI variable store in a local file: the firmware's boot entries and Secure Boot keys.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Nvram {
    /// The file QEMU's pflash reads and writes.
    pub path: String,
    /// The template libvirt copies to `path` when the file is missing.
    pub template: Option<String>,
}

/// An emulated TPM (swtpm), whose state libvirt keeps in a directory of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmulatedTpm {
    /// The device model (`tpm-tis`, `tpm-crb`, ...).
    pub model: Option<String>,
    /// The TPM version (`2.0`, `1.2`); libvirt's default is 2.0.
    pub version: String,
    /// The state's location the definition names (`<backend><source path=…/>`), if it names one.
    pub source: Option<String>,
}

impl Domain {
    /// Where swtpm keeps this domain's TPM state: the directory its definition names, else
    /// libvirt's default, `/var/lib/libvirt/swtpm/<uuid>/tpm2` (`tpm1.2` for a 1.2 TPM). None
    /// without an emulated TPM, or without a UUID to find the default by.
    pub fn tpm_state_dir(&self) -> Option<std::path::PathBuf> {
        let tpm = self.tpm.as_ref()?;
        if let Some(dir) = &tpm.source {
            return Some(dir.into());
        }
        let sub = if tpm.version == "1.2" { "tpm1.2" } else { "tpm2" };
        Some(std::path::Path::new("/var/lib/libvirt/swtpm").join(self.uuid.as_ref()?).join(sub))
    }
}

impl Domain {
    /// Parses a `<domain>` document (as `virsh dumpxml` prints it) or a live `<domstatus>`.
    ///
    /// ```
    /// let d = nasbak_libvirt::Domain::parse(
    ///     "<domain type='kvm'><name>vm1</name><devices>\
    ///        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
    ///          <source file='/v/vm1.qcow2'/><target dev='vda' bus='virtio'/></disk>\
    ///        <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>\
    ///      </devices></domain>",
    /// ).unwrap();
    /// let (backed_up, skipped) = d.backup_selection();
    /// assert_eq!(backed_up[0].target, "vda");
    /// assert_eq!(skipped[0].target, "sda");
    /// ```
    pub fn parse(xml: &str) -> Result<Domain, XmlError> {
        let raw = if xml.contains("<domstatus") {
            quick_xml::de::from_str::<XmlStatus>(xml).map(|s| s.domain)
        } else {
            quick_xml::de::from_str::<XmlDomain>(xml)
        }
        .map_err(|e| XmlError { detail: e.to_string() })?;
        Ok(raw.into())
    }

    /// The disks to back up, and the others with the reason.
    pub fn backup_selection(&self) -> (Vec<&Disk>, Vec<SkippedDisk>) {
        let mut chosen = Vec::new();
        let mut skipped = Vec::new();
        for d in &self.disks {
            match d.skip_reason() {
                None => chosen.push(d),
                Some(reason) => skipped.push(SkippedDisk { target: d.target.clone(), reason }),
            }
        }
        (chosen, skipped)
    }

    /// The disk with this target.
    pub fn disk(&self, target: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// The first target name with `prefix` (`vd`, `sd`, `hd`) that no device of the domain uses,
    /// in libvirt's order: `vda` .. `vdz`, `vdaa` .. `vdzz`, ...
    pub fn next_free_target(&self, prefix: &str) -> String {
        (0u32..)
            .map(|i| format!("{prefix}{}", target_suffix(i)))
            .find(|name| self.disks.iter().all(|d| &d.target != name))
            .expect("an unbounded range has a free name")
    }
}

/// The letters libvirt appends for disk index `i`: 0 `a`, 25 `z`, 26 `aa`, 701 `zz`, 702 `aaa`.
fn target_suffix(mut i: u32) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    letters.reverse();
    String::from_utf8(letters).expect("ASCII letters")
}

/// The target prefix and bus for a disk attached next to others: `vd`/virtio for a running VM
/// (the bus that hot-plugs), else the bus the backed-up disk's target implies.
pub fn attach_bus(original_target: &str, running: bool) -> (&'static str, &'static str) {
    if running {
        return ("vd", "virtio");
    }
    match &original_target[..original_target.len().min(2)] {
        "sd" => ("sd", "scsi"),
        "hd" => ("hd", "ide"),
        _ => ("vd", "virtio"),
    }
}

fn xml_escape(s: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(s)
}

/// The `<disk>` element attaching an image: a file, a block device or an rbd image.
pub fn disk_attach_xml(source: &DiskSource, format: &str, target: &str, bus: &str) -> Result<String, XmlError> {
    let (kind, source_xml) = source_xml(source)?;
    Ok(format!(
        "<disk type='{kind}' device='disk'><driver name='qemu' type='{}'/>{source_xml}<target dev='{}' bus='{}'/></disk>",
        xml_escape(format),
        xml_escape(target),
        xml_escape(bus)
    ))
}

/// The `<disk>` element of a block copy's destination: the image, its format and, for an image
/// that is itself encrypted, its `<encryption>` (QEMU then encrypts what it copies, with the
/// libvirt secret named). The disk keeps its target.
pub fn disk_copy_destination_xml(
    source: &DiskSource,
    format: &str,
    encryption: Option<&DiskEncryption>,
) -> Result<String, XmlError> {
    let (kind, mut source_xml) = source_xml(source)?;
    if let Some(e) = encryption {
        let inner = encryption_xml(e);
        match source_xml.strip_suffix("/>") {
            Some(open) => source_xml = format!("{open}>{inner}</source>"),
            None => source_xml.insert_str(source_xml.len() - "</source>".len(), &inner),
        }
    }
    Ok(format!("<disk type='{kind}'>{source_xml}<driver type='{}'/></disk>", xml_escape(format)))
}

/// `<encryption format=…><secret type='passphrase' uuid=…|usage=…/></encryption>`.
fn encryption_xml(e: &DiskEncryption) -> String {
    let mut x = format!("<encryption format='{}'><secret type='passphrase'", xml_escape(&e.format));
    if let Some(uuid) = &e.secret_uuid {
        x.push_str(&format!(" uuid='{}'", xml_escape(uuid)));
    }
    if let Some(usage) = &e.secret_usage {
        x.push_str(&format!(" usage='{}'", xml_escape(usage)));
    }
    x.push_str("/></encryption>");
    x
}

/// A `<disk>`'s type and `<source>` element.
fn source_xml(source: &DiskSource) -> Result<(&'static str, String), XmlError> {
    Ok(match source {
        DiskSource::File(p) => ("file", format!("<source file='{}'/>", xml_escape(&p.to_string_lossy()))),
        DiskSource::Block(p) => ("block", format!("<source dev='{}'/>", xml_escape(&p.to_string_lossy()))),
        DiskSource::Network { protocol, name: Some(name), hosts, auth, config } if protocol == "rbd" => {
            // The monitors, ceph.conf and cephx user and secret: without them QEMU looks for
            // /etc/ceph/ceph.conf and the admin's key.
            let mut inner = String::new();
            for h in hosts {
                let Some(host) = &h.name else { continue };
                inner.push_str(&format!("<host name='{}'", xml_escape(host)));
                if let Some(port) = h.port {
                    inner.push_str(&format!(" port='{port}'"));
                }
                inner.push_str("/>");
            }
            if let Some(c) = config {
                inner.push_str(&format!("<config file='{}'/>", xml_escape(&c.to_string_lossy())));
            }
            if let Some(a) = auth {
                inner.push_str(&auth_xml(a));
            }
            ("network", format!("<source protocol='rbd' name='{}'>{inner}</source>", xml_escape(name)))
        }
        other => return Err(XmlError { detail: format!("cannot attach a disk with source {other}") }),
    })
}

/// `<auth username=…><secret type=… uuid=…|usage=…/></auth>` of a network disk.
fn auth_xml(a: &NetworkAuth) -> String {
    let mut x = String::from("<auth");
    if let Some(u) = &a.username {
        x.push_str(&format!(" username='{}'", xml_escape(u)));
    }
    x.push_str("><secret");
    if let Some(t) = &a.secret_type {
        x.push_str(&format!(" type='{}'", xml_escape(t)));
    }
    match (&a.secret_uuid, &a.secret_usage) {
        (Some(uuid), _) => x.push_str(&format!(" uuid='{}'", xml_escape(uuid))),
        (None, Some(usage)) => x.push_str(&format!(" usage='{}'", xml_escape(usage))),
        (None, None) => {}
    }
    x.push_str("/></auth>");
    x
}

impl From<XmlDomain> for Domain {
    fn from(r: XmlDomain) -> Self {
        let nvram = r.os.and_then(|o| o.nvram).and_then(|n| {
            // A file (the default type): its path as text, or its `<source file=…>`.
            if n.kind.as_deref().is_some_and(|k| k != "file") {
                return None;
            }
            let path =
                n.source.and_then(|s| s.file).or(n.path).map(|p| p.trim().to_owned()).filter(|p| !p.is_empty())?;
            Some(Nvram { path, template: n.template })
        });
        let tpm = r.devices.tpms.into_iter().find_map(|t| {
            let backend = t.backend?;
            (backend.kind.as_deref() == Some("emulator")).then(|| EmulatedTpm {
                model: t.model,
                version: backend.version.unwrap_or_else(|| "2.0".to_owned()),
                source: backend.source.and_then(|s| s.path),
            })
        });
        Domain { name: r.name, uuid: r.uuid, disks: r.devices.disks.into_iter().map(Disk::from).collect(), nvram, tpm }
    }
}

fn auth(a: Option<XmlAuth>) -> Option<NetworkAuth> {
    a.map(|a| NetworkAuth {
        username: a.username,
        secret_type: a.secret.as_ref().and_then(|s| s.kind.clone()),
        secret_usage: a.secret.as_ref().and_then(|s| s.usage.clone()),
        secret_uuid: a.secret.and_then(|s| s.uuid),
    })
}

fn source(kind: Option<&str>, s: XmlSource, outer_auth: Option<XmlAuth>) -> Option<DiskSource> {
    Some(match kind.unwrap_or("file") {
        "file" => DiskSource::File(s.file?.into()),
        "block" => DiskSource::Block(s.dev?.into()),
        "network" => DiskSource::Network {
            protocol: s.protocol.unwrap_or_default(),
            name: s.name,
            hosts: s
                .hosts
                .into_iter()
                .map(|h| NetworkHost {
                    name: h.name,
                    port: h.port.and_then(|p| p.parse().ok()),
                    transport: h.transport,
                    socket: h.socket,
                })
                .collect(),
            auth: auth(s.auth.or(outer_auth)),
            config: s.config.and_then(|c| c.file).map(PathBuf::from),
        },
        "volume" => DiskSource::Volume { pool: s.pool?, volume: s.volume? },
        other => DiskSource::Other(other.to_owned()),
    })
}

fn chain(mut next: Option<Box<XmlBacking>>) -> Vec<BackingLayer> {
    let mut layers = Vec::new();
    while let Some(b) = next {
        let b = *b;
        if let Some(src) = b.source.and_then(|s| source(b.kind.as_deref(), s, None)) {
            layers.push(BackingLayer { source: src, format: b.format.and_then(|f| f.format) });
        }
        next = b.backing_store;
    }
    layers
}

impl From<XmlDisk> for Disk {
    fn from(r: XmlDisk) -> Self {
        let device = match r.device.as_deref().unwrap_or("disk") {
            "cdrom" => DiskDevice::Cdrom,
            "floppy" => DiskDevice::Floppy,
            "lun" => DiskDevice::Lun,
            _ => DiskDevice::Disk,
        };
        let target = r.target.as_ref().and_then(|t| t.dev.clone()).unwrap_or_default();
        let encryption =
            r.source.as_ref().and_then(|s| s.encryption.as_ref()).or(r.encryption.as_ref()).map(|e| DiskEncryption {
                format: e.format.clone().unwrap_or_default(),
                secret_uuid: e.secret.as_ref().and_then(|s| s.uuid.clone()),
                secret_usage: e.secret.as_ref().and_then(|s| s.usage.clone()),
            });
        Disk {
            encryption,
            device,
            source: r.source.and_then(|s| source(r.kind.as_deref(), s, r.auth)),
            format: r.driver.and_then(|d| d.format),
            bus: r.target.and_then(|t| t.bus),
            target,
            readonly: r.readonly.is_some(),
            shareable: r.shareable.is_some(),
            serial: r.serial,
            backing_chain: chain(r.backing_store),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uefi_variable_store_and_the_emulated_tpm_are_found_in_every_form() {
        let uuid = "63561709-46ed-4cf5-afeb-1c01dbb1a830";
        // As libvirt 9.0 prints a UEFI VM with an emulated TPM 2.0 (its default version).
        let d = Domain::parse(&format!(
            "<domain type='qemu'><name>u</name><uuid>{uuid}</uuid><os>\
               <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>\
               <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\
               <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/u_VARS.fd</nvram>\
             </os><devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>"
        ))
        .unwrap();
        let nvram = d.nvram.as_ref().unwrap();
        assert_eq!(nvram.path, "/var/lib/libvirt/qemu/nvram/u_VARS.fd");
        assert_eq!(nvram.template.as_deref(), Some("/usr/share/OVMF/OVMF_VARS_4M.fd"));
        let tpm = d.tpm.as_ref().unwrap();
        assert_eq!((tpm.model.as_deref(), tpm.version.as_str()), (Some("tpm-crb"), "2.0"));
        assert_eq!(d.tpm_state_dir().unwrap(), std::path::Path::new("/var/lib/libvirt/swtpm").join(uuid).join("tpm2"));
        // The newer form of the store, a TPM 1.2 with no version said, a state directory named.
        let d = Domain::parse(&format!(
            "<domain><name>u</name><uuid>{uuid}</uuid><os><nvram type='file'><source file='/n/u.fd'/></nvram></os>\
             <devices><tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm></devices></domain>"
        ))
        .unwrap();
        assert_eq!(d.nvram.as_ref().unwrap().path, "/n/u.fd");
        assert!(d.tpm_state_dir().unwrap().ends_with("tpm1.2"));
        let d = Domain::parse(
            "<domain><name>u</name><devices><tpm model='tpm-crb'><backend type='emulator'>\
               <source type='dir' path='/srv/tpm/u'/></backend></tpm></devices></domain>",
        )
        .unwrap();
        assert_eq!(d.tpm.as_ref().unwrap().version, "2.0");
        assert_eq!(d.tpm_state_dir().unwrap(), std::path::Path::new("/srv/tpm/u"));
        // No store in a file (a network one, none at all), a passthrough TPM: nothing to keep.
        let d = Domain::parse(
            "<domain><name>u</name><os><nvram type='network'><source protocol='iscsi' name='x'/></nvram></os>\
             <devices><tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>\
             </devices></domain>",
        )
        .unwrap();
        assert_eq!((d.nvram, d.tpm), (None, None));
        let d = Domain::parse("<domain><name>u</name><os><type>hvm</type></os></domain>").unwrap();
        assert_eq!((&d.nvram, d.tpm_state_dir()), (&None, None));
    }

    #[test]
    fn next_free_target_skips_every_used_name() {
        let d = Domain::parse(
            "<domain><name>v</name><devices>\
               <disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk>\
               <disk type='file' device='cdrom'><target dev='vdb'/></disk>\
               <disk type='file' device='disk'><source file='/c'/><target dev='vdd'/></disk>\
             </devices></domain>",
        )
        .unwrap();
        assert_eq!(d.next_free_target("vd"), "vdc");
        assert_eq!(d.next_free_target("sd"), "sda");
        assert_eq!([0, 25, 26, 51, 701, 702].map(target_suffix), ["a", "z", "aa", "az", "zz", "aaa"]);
        assert_eq!(attach_bus("sdb", false), ("sd", "scsi"));
        assert_eq!(attach_bus("sdb", true), ("vd", "virtio"));
        let xml = disk_attach_xml(&DiskSource::File("/v/it's.qcow2".into()), "qcow2", "vdc", "virtio").unwrap();
        assert_eq!(
            xml,
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/it&apos;s.qcow2'/><target dev='vdc' bus='virtio'/></disk>"
        );
        let back = Domain::parse(&format!("<domain><name>v</name><devices>{xml}</devices></domain>")).unwrap();
        assert_eq!(back.disks[0].source, Some(DiskSource::File("/v/it's.qcow2".into())));
        assert!(disk_attach_xml(&DiskSource::Other("nvme".into()), "raw", "vdc", "virtio").is_err());
        // An RBD disk keeps its monitors, ceph.conf and cephx user and secret, and reads back
        // the same.
        let rbd = DiskSource::Network {
            protocol: "rbd".into(),
            name: Some("vms/new".into()),
            hosts: vec![
                NetworkHost { name: Some("10.0.0.1".into()), port: Some(6789), transport: None, socket: None },
                NetworkHost { name: Some("mon2".into()), port: None, transport: None, socket: None },
            ],
            auth: Some(NetworkAuth {
                username: Some("cloud".into()),
                secret_type: Some("ceph".into()),
                secret_usage: Some("client.cloud's".into()),
                secret_uuid: None,
            }),
            config: Some("/etc/ceph/ceph.conf".into()),
        };
        let xml = disk_attach_xml(&rbd, "raw", "vdc", "virtio").unwrap();
        assert!(xml.contains("usage='client.cloud&apos;s'"), "{xml}");
        let parsed = Domain::parse(&format!("<domain><name>x</name><devices>{xml}</devices></domain>")).unwrap();
        assert_eq!(parsed.disks[0].source.as_ref(), Some(&rbd));
    }

    #[test]
    fn a_copy_destination_keeps_its_source_and_says_its_encryption() {
        let e = DiskEncryption {
            format: "luks".into(),
            secret_uuid: Some("6c2e5a8f-1d3b-4c7e-9a0f-2b4d6e8f0a1c".into()),
            secret_usage: None,
        };
        let file = DiskSource::File("/v/it's.qcow2".into());
        assert_eq!(
            disk_copy_destination_xml(&file, "qcow2", None).unwrap(),
            "<disk type='file'><source file='/v/it&apos;s.qcow2'/><driver type='qcow2'/></disk>"
        );
        let rbd = DiskSource::Network {
            protocol: "rbd".into(),
            name: Some("vms/x".into()),
            hosts: vec![NetworkHost { name: Some("mon1".into()), port: None, transport: None, socket: None }],
            auth: None,
            config: None,
        };
        for (source, format) in [(&file, "qcow2"), (&DiskSource::Block("/dev/sdz".into()), "qcow2"), (&rbd, "raw")] {
            let xml = disk_copy_destination_xml(source, format, Some(&e)).unwrap();
            let parsed = Domain::parse(&format!(
                "<domain><name>x</name><devices>{}</devices></domain>",
                xml.replace("<disk type=", "<disk device='disk' type=")
                    .replace("</disk>", "<target dev='vda'/></disk>")
            ))
            .unwrap();
            assert_eq!(parsed.disks[0].source.as_ref(), Some(source), "{xml}");
            assert_eq!(parsed.disks[0].encryption.as_ref(), Some(&e), "{xml}");
        }
    }
}
