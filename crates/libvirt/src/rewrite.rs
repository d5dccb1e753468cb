//! Changing where some disks of a domain definition read from, leaving everything else of the
//! document as libvirt wrote it (bus, address, boot order, cache mode, serial, ...).

use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesStart, Event};

use crate::domain::{DiskEncryption, DiskSource, XmlError};

/// A disk (by its target device) that is to read from another file or block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSwap {
    /// The target device (`vda`).
    pub target: String,
    /// The new source: a file or a block device.
    pub source: DiskSource,
    /// The new source's format (`qcow2`, `raw`).
    pub format: String,
    /// The new source's own encryption (`<encryption>` in its `<source>`, QEMU decrypting it
    /// with the libvirt secret named); `None`: the new source is plain, whatever the disk's
    /// old source was.
    pub encryption: Option<DiskEncryption>,
}

/// `xml` (a domain definition) with the disks named in `swaps` reading from their new source:
/// the disk's `type`, its `<source>` and its driver's `type` changed, its `<backingStore>`
/// (and `<auth>`, for a disk that was a network disk) dropped so that libvirt reads the new
/// chain from the images, and its encryption the swap's (an `<encryption>` in the old place,
/// the `<disk>`, dropped with the old source's). Everything else is kept as it was. Every swap must name a disk of
/// the document.
pub fn swap_disk_sources(xml: &str, swaps: &[DiskSwap]) -> Result<String, XmlError> {
    let err = |detail: String| XmlError { detail };
    for s in swaps {
        if !matches!(s.source, DiskSource::File(_) | DiskSource::Block(_)) {
            return Err(err(format!("disk {} can only be swapped to a file or a block device", s.target)));
        }
    }
    let mut reader = Reader::from_str(xml);
    let mut writer = Writer::new(Vec::new());
    let mut disk: Option<Vec<Event<'static>>> = None;
    let mut depth = 0usize;
    let mut swapped = Vec::new();
    loop {
        let event = reader.read_event().map_err(|e| err(format!("at byte {}: {e}", reader.buffer_position())))?;
        match event {
            Event::Eof => break,
            Event::Start(e) if disk.is_none() && e.name().as_ref() == b"disk" => {
                disk = Some(vec![Event::Start(e.into_owned())]);
                depth = 1;
            }
            event if disk.is_some() => {
                match &event {
                    Event::Start(_) => depth += 1,
                    Event::End(_) => depth -= 1,
                    _ => {}
                }
                let events = disk.as_mut().expect("inside a disk");
                events.push(event.into_owned());
                if depth == 0 {
                    let events = disk.take().expect("inside a disk");
                    let target = target_of(&events);
                    let swap = swaps.iter().find(|s| Some(&s.target) == target.as_ref());
                    let out = match swap {
                        Some(s) => {
                            swapped.push(s.target.clone());
                            rewrite(events, s)?
                        }
                        None => events,
                    };
                    for e in out {
                        writer.write_event(e).map_err(|e| err(e.to_string()))?;
                    }
                }
            }
            event => writer.write_event(event).map_err(|e| err(e.to_string()))?,
        }
    }
    if let Some(s) = swaps.iter().find(|s| !swapped.contains(&s.target)) {
        return Err(err(format!("the domain has no disk {}", s.target)));
    }
    String::from_utf8(writer.into_inner()).map_err(|e| err(e.to_string()))
}

/// What makes a throwaway copy of a domain ([`throwaway_definition`]).
#[derive(Debug, Clone)]
pub struct Throwaway<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its UUID.
    pub uuid: &'a str,
    /// The disks it keeps, each on its new source; every other disk is dropped.
    pub disks: &'a [DiskSwap],
    /// The file its serial console is written to.
    pub console_log: &'a std::path::Path,
    /// Whether it gets a guest-agent channel.
    pub agent: bool,
    /// Its UEFI variable store (`<os><nvram>`): a copy of the backup's, so that a VM that boots
    /// only from its own entries boots. None: no store of its own (libvirt makes one from the
    /// firmware's template, if the firmware needs one).
    pub nvram: Option<&'a std::path::Path>,
}

/// The devices a throwaway copy never has: what reaches the network or the host's devices and
/// files, and the consoles and channels it gets afresh.
const DROPPED_DEVICES: &[&[u8]] = &[
    b"interface",
    b"hostdev",
    b"filesystem",
    b"redirdev",
    b"smartcard",
    b"graphics",
    b"serial",
    b"console",
    b"channel",
    b"parallel",
    b"shmem",
];

/// A copy of the domain definition `xml` that can run beside the domain without touching
/// anything of it: another name and UUID, the disks of `t.disks` on their new sources and no
/// other disk, no network interface, host device, shared file system, graphics, channel or
/// console of its own, no NVRAM file but `t.nvram`, an emulated TPM's state in libvirt's place
/// for its UUID (never a directory the definition names: the original's), and no fixed
/// security label; a serial console written to
/// `t.console_log` (the firmware's messages too), and a guest-agent channel when `t.agent`.
pub fn throwaway_definition(xml: &str, t: &Throwaway<'_>) -> Result<String, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut out = ThrowawayWriter {
        t,
        writer: Writer::new(Vec::new()),
        path: Vec::new(),
        disk: None,
        skip: None,
        replace_text: None,
        bios_seen: false,
        kept: Vec::new(),
    };
    loop {
        let event = reader
            .read_event()
            .map_err(|e| XmlError { detail: format!("at byte {}: {e}", reader.buffer_position()) })?;
        match event {
            Event::Eof => break,
            // Inside a dropped element: only the depth is followed.
            e if out.skip.is_some() => out.skipped(&e),
            // Inside a disk: buffered until its end, then swapped or dropped.
            e if out.disk.is_some() => out.buffered(e)?,
            Event::Start(e) => out.start(e)?,
            Event::Empty(e) => out.empty(e)?,
            Event::Text(text) => match out.replace_text.take() {
                Some(new) => out.write(Event::Text(quick_xml::events::BytesText::new(&new)))?,
                None => out.write(Event::Text(text))?,
            },
            Event::End(e) => out.end(e)?,
            other => out.write(other)?,
        }
    }
    if let Some(s) = t.disks.iter().find(|s| !out.kept.contains(&s.target)) {
        return Err(XmlError { detail: format!("the domain has no disk {}", s.target) });
    }
    String::from_utf8(out.writer.into_inner()).map_err(|e| XmlError { detail: e.to_string() })
}

/// The state of [`throwaway_definition`] while it copies a definition, event by event.
struct ThrowawayWriter<'t> {
    t: &'t Throwaway<'t>,
    writer: Writer<Vec<u8>>,
    /// The names of the open elements.
    path: Vec<Vec<u8>>,
    /// A `<disk>` being buffered, and the depth it opened at.
    disk: Option<(Vec<Event<'static>>, usize)>,
    /// The depth of an element being dropped.
    skip: Option<usize>,
    /// The text that replaces the next text (the new name or UUID).
    replace_text: Option<String>,
    bios_seen: bool,
    /// The targets of the disks kept (swapped).
    kept: Vec<String>,
}

impl ThrowawayWriter<'_> {
    fn write(&mut self, e: Event<'_>) -> Result<(), XmlError> {
        self.writer.write_event(e).map_err(|e| XmlError { detail: e.to_string() })
    }

    fn parent(&self) -> Option<&[u8]> {
        self.path.last().map(Vec::as_slice)
    }

    fn in_devices(&self) -> bool {
        self.parent() == Some(b"devices".as_slice()) && self.path.len() == 2
    }

    /// Inside `<devices><tpm><backend>`, where `<source>` names the TPM's state directory.
    fn in_tpm_backend(&self) -> bool {
        self.path.len() == 4 && self.path[1] == b"devices" && self.path[2] == b"tpm" && self.path[3] == b"backend"
    }

    /// An event inside a dropped element.
    fn skipped(&mut self, event: &Event<'_>) {
        match event {
            Event::Start(_) => self.path.push(Vec::new()),
            Event::End(_) => {
                self.path.pop();
                if Some(self.path.len()) == self.skip {
                    self.skip = None;
                }
            }
            _ => {}
        }
    }

    /// An event inside a `<disk>`: at its end, the disk is written swapped, or dropped.
    fn buffered(&mut self, event: Event<'_>) -> Result<(), XmlError> {
        match &event {
            Event::Start(_) => self.path.push(Vec::new()),
            Event::End(_) => {
                self.path.pop();
            }
            _ => {}
        }
        let (events, depth) = self.disk.as_mut().expect("inside a disk");
        events.push(event.into_owned());
        if self.path.len() == *depth {
            let (events, _) = self.disk.take().expect("inside a disk");
            let target = target_of(&events);
            if let Some(swap) = self.t.disks.iter().find(|s| Some(&s.target) == target.as_ref()) {
                self.kept.push(swap.target.clone());
                for e in rewrite(events, swap)? {
                    self.write(e)?;
                }
            }
        }
        Ok(())
    }

    fn start(&mut self, e: BytesStart<'_>) -> Result<(), XmlError> {
        let (in_devices, parent) = (self.in_devices(), self.parent().map(<[u8]>::to_vec));
        let in_tpm = self.in_tpm_backend();
        let parent = parent.as_deref();
        let name = e.name().as_ref().to_vec();
        let depth = self.path.len();
        self.path.push(name.clone());
        if in_devices && name == b"disk" {
            self.disk = Some((vec![Event::Start(e.into_owned())], depth));
            return Ok(());
        }
        if (in_devices && DROPPED_DEVICES.contains(&name.as_slice()))
            || (depth == 1 && name == b"seclabel")
            || (parent == Some(b"os".as_slice()) && name == b"nvram")
            || (in_tpm && name == b"source")
        {
            self.skip = Some(depth);
            return Ok(());
        }
        if depth == 1 && name == b"name" {
            self.replace_text = Some(self.t.name.to_owned());
        } else if depth == 1 && name == b"uuid" {
            self.replace_text = Some(self.t.uuid.to_owned());
        }
        if depth == 0 && name == b"domain" {
            // A live definition's `id` is not the throwaway's.
            let mut d = BytesStart::new("domain");
            for a in e.attributes().flatten().filter(|a| a.key.as_ref() != b"id") {
                d.push_attribute(a);
            }
            self.write(Event::Start(d))
        } else if parent == Some(b"os".as_slice()) && name == b"bios" {
            self.bios_seen = true;
            self.write(Event::Start(with_attribute(&e, "useserial", "yes")))
        } else {
            self.write(Event::Start(e))
        }
    }

    fn empty(&mut self, e: BytesStart<'_>) -> Result<(), XmlError> {
        let (in_devices, parent) = (self.in_devices(), self.parent().map(<[u8]>::to_vec));
        let parent = parent.as_deref();
        let qname = e.name();
        let name = qname.as_ref();
        if (in_devices && (name == b"disk" || DROPPED_DEVICES.contains(&name)))
            || (self.path.len() == 1 && name == b"seclabel")
            || (parent == Some(b"os".as_slice()) && name == b"nvram")
            || (self.in_tpm_backend() && name == b"source")
        {
            return Ok(());
        }
        if parent == Some(b"os".as_slice()) && name == b"bios" {
            self.bios_seen = true;
            self.write(Event::Empty(with_attribute(&e, "useserial", "yes")))
        } else {
            self.write(Event::Empty(e))
        }
    }

    fn end(&mut self, e: quick_xml::events::BytesEnd<'_>) -> Result<(), XmlError> {
        let name = self.path.pop().unwrap_or_default();
        if name == b"devices" && self.path.len() == 1 {
            self.console_and_agent()?;
        }
        if name == b"os" && self.path.len() == 1 && !self.bios_seen {
            let mut bios = BytesStart::new("bios");
            bios.push_attribute(("useserial", "yes"));
            self.write(Event::Empty(bios))?;
        }
        if name == b"os"
            && self.path.len() == 1
            && let Some(nvram) = self.t.nvram
        {
            self.write(Event::Start(BytesStart::new("nvram")))?;
            let path = nvram.to_string_lossy();
            self.write(Event::Text(quick_xml::events::BytesText::new(&path)))?;
            self.write(Event::End(quick_xml::events::BytesEnd::new("nvram")))?;
        }
        self.replace_text = None;
        self.write(Event::End(e))
    }

    /// At the end of `<devices>`: a serial console into the log file, and the agent's channel.
    fn console_and_agent(&mut self) -> Result<(), XmlError> {
        let log = self.t.console_log.to_string_lossy().into_owned();
        let mut serial = BytesStart::new("serial");
        serial.push_attribute(("type", "file"));
        self.write(Event::Start(serial))?;
        let mut source = BytesStart::new("source");
        source.push_attribute(("path", log.as_str()));
        self.write(Event::Empty(source))?;
        self.write(Event::End(quick_xml::events::BytesEnd::new("serial")))?;
        if self.t.agent {
            let mut channel = BytesStart::new("channel");
            channel.push_attribute(("type", "unix"));
            self.write(Event::Start(channel))?;
            let mut target = BytesStart::new("target");
            target.push_attribute(("type", "virtio"));
            target.push_attribute(("name", "org.qemu.guest_agent.0"));
            self.write(Event::Empty(target))?;
            self.write(Event::End(quick_xml::events::BytesEnd::new("channel")))?;
        }
        Ok(())
    }
}

/// Whether the domain definition `xml` has a guest-agent channel.
pub fn has_agent_channel(xml: &str) -> bool {
    let mut reader = Reader::from_str(xml);
    let mut in_channel = false;
    loop {
        match reader.read_event() {
            Ok(Event::Eof) | Err(_) => return false,
            Ok(Event::Start(e)) if e.name().as_ref() == b"channel" => in_channel = true,
            Ok(Event::End(e)) if e.name().as_ref() == b"channel" => in_channel = false,
            Ok(Event::Empty(e) | Event::Start(e))
                if in_channel
                    && e.name().as_ref() == b"target"
                    && attribute(&e, b"name").as_deref() == Some("org.qemu.guest_agent.0") =>
            {
                return true;
            }
            _ => {}
        }
    }
}

fn attribute(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.unescape_value().ok())
        .map(|v| v.into_owned())
}

/// The `dev` of the disk's direct child `<target>`.
fn target_of(events: &[Event<'_>]) -> Option<String> {
    let mut depth = 0usize;
    for e in events {
        match e {
            Event::Start(s) => {
                if depth == 1 && s.name().as_ref() == b"target" {
                    return attribute(s, b"dev");
                }
                depth += 1;
            }
            Event::Empty(s) if depth == 1 && s.name().as_ref() == b"target" => return attribute(s, b"dev"),
            Event::End(_) => depth -= 1,
            _ => {}
        }
    }
    None
}

/// `e` with attribute `name` set to `value` (added if missing), the others kept in order.
fn with_attribute(e: &BytesStart<'_>, name: &str, value: &str) -> BytesStart<'static> {
    let mut out = BytesStart::new(String::from_utf8_lossy(e.name().as_ref()).into_owned());
    let mut set = false;
    for a in e.attributes().flatten() {
        if a.key.as_ref() == name.as_bytes() {
            out.push_attribute((name, value));
            set = true;
        } else {
            let value = a.unescape_value().map(|v| v.into_owned()).unwrap_or_default();
            out.push_attribute((String::from_utf8_lossy(a.key.as_ref()).as_ref(), value.as_str()));
        }
    }
    if !set {
        out.push_attribute((name, value));
    }
    out
}

fn rewrite(events: Vec<Event<'static>>, swap: &DiskSwap) -> Result<Vec<Event<'static>>, XmlError> {
    let (kind, source) = match &swap.source {
        DiskSource::File(p) => {
            ("file", BytesStart::new("source").with_attributes([("file", p.to_string_lossy().as_ref())]))
        }
        DiskSource::Block(p) => {
            ("block", BytesStart::new("source").with_attributes([("dev", p.to_string_lossy().as_ref())]))
        }
        _ => unreachable!("checked by swap_disk_sources"),
    };
    let has_driver = {
        let mut depth = 0usize;
        events.iter().any(|e| match e {
            Event::Start(s) => {
                let hit = depth == 1 && s.name().as_ref() == b"driver";
                depth += 1;
                hit
            }
            Event::Empty(s) => depth == 1 && s.name().as_ref() == b"driver",
            Event::End(_) => {
                depth -= 1;
                false
            }
            _ => false,
        })
    };
    let mut out = Vec::with_capacity(events.len());
    let mut depth = 0usize;
    // Inside a child being dropped (source, backingStore, auth): the depth it started at.
    let mut dropping: Option<usize> = None;
    for e in events {
        if let Some(from) = dropping {
            match &e {
                Event::Start(_) => depth += 1,
                Event::End(_) => {
                    depth -= 1;
                    if depth == from {
                        dropping = None;
                    }
                }
                _ => {}
            }
            continue;
        }
        match e {
            Event::Start(s) if depth == 0 => {
                out.push(Event::Start(with_attribute(&s, "type", kind)));
                if !has_driver {
                    out.push(Event::Empty(
                        BytesStart::new("driver").with_attributes([("name", "qemu"), ("type", swap.format.as_str())]),
                    ));
                }
                depth += 1;
            }
            Event::Start(s) if depth == 1 && goes_with_old_source(s.name().as_ref()) => {
                if s.name().as_ref() == b"source" {
                    out.extend(new_source(&source, swap.encryption.as_ref()));
                }
                dropping = Some(depth);
                depth += 1;
            }
            Event::Empty(s) if depth == 1 && goes_with_old_source(s.name().as_ref()) => {
                if s.name().as_ref() == b"source" {
                    out.extend(new_source(&source, swap.encryption.as_ref()));
                }
            }
            Event::Start(s) if depth == 1 && s.name().as_ref() == b"driver" => {
                out.push(Event::Start(with_attribute(&s, "type", &swap.format)));
                depth += 1;
            }
            Event::Empty(s) if depth == 1 && s.name().as_ref() == b"driver" => {
                out.push(Event::Empty(with_attribute(&s, "type", &swap.format)));
            }
            Event::Start(s) => {
                depth += 1;
                out.push(Event::Start(s));
            }
            Event::End(s) => {
                depth -= 1;
                out.push(Event::End(s));
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Whether a child of a swapped `<disk>` goes with its old source: the source, its backing
/// chain, a network disk's `<auth>`, and `<encryption>` in its old place.
fn goes_with_old_source(name: &[u8]) -> bool {
    matches!(name, b"source" | b"backingStore" | b"auth" | b"encryption")
}

/// The swapped disk's `<source>`: `source`, with `<encryption>` inside when it is encrypted.
fn new_source(source: &BytesStart<'static>, encryption: Option<&DiskEncryption>) -> Vec<Event<'static>> {
    let Some(e) = encryption else { return vec![Event::Empty(source.clone())] };
    let mut secret = BytesStart::new("secret").with_attributes([("type", "passphrase")]);
    if let Some(uuid) = &e.secret_uuid {
        secret.push_attribute(("uuid", uuid.as_str()));
    }
    if let Some(usage) = &e.secret_usage {
        secret.push_attribute(("usage", usage.as_str()));
    }
    vec![
        Event::Start(source.clone()),
        Event::Start(BytesStart::new("encryption").with_attributes([("format", e.format.as_str())])),
        Event::Empty(secret),
        Event::End(quick_xml::events::BytesEnd::new("encryption")),
        Event::End(quick_xml::events::BytesEnd::new("source")),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::Domain;

    const XML: &str = r#"<domain type='kvm'>
  <name>web1</name>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <auth username='libvirt'><secret type='ceph' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></auth>
      <source protocol='rbd' name='pool/web1-root'><host name='mon1' port='6789'/></source>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/data &amp; more.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/base.qcow2'/><backingStore/></backingStore>
      <target dev='vdb' bus='virtio'/>
      <serial>data-1</serial>
    </disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>"#;

    #[test]
    fn swapped_disks_read_from_the_new_source_and_keep_everything_else() {
        let swaps = [
            DiskSwap {
                target: "vdb".into(),
                source: DiskSource::File("/o/vdb.qcow2".into()),
                format: "qcow2".into(),
                encryption: None,
            },
            DiskSwap {
                target: "vda".into(),
                source: DiskSource::Block("/dev/sdz".into()),
                format: "raw".into(),
                encryption: None,
            },
        ];
        let out = swap_disk_sources(XML, &swaps).unwrap();
        let d = Domain::parse(&out).unwrap();
        assert_eq!(d.disks[0].source, Some(DiskSource::Block(PathBuf::from("/dev/sdz"))));
        assert_eq!(d.disks[1].source, Some(DiskSource::File(PathBuf::from("/o/vdb.qcow2"))));
        assert!(!out.contains("backingStore") && !out.contains("<auth") && !out.contains("mon1"), "{out}");
        for kept in [
            "cache=\"none\"",
            "<boot order='1'/>",
            "slot='0x04'",
            "<serial>data-1</serial>",
            "<readonly/>",
            "network='default'",
        ] {
            assert!(out.contains(kept), "{kept} kept: {out}");
        }
        assert!(out.contains("<disk type=\"block\" device=\"disk\">"), "{out}");
        // Unchanged disks stay byte for byte, escapes included.
        let untouched = swap_disk_sources(XML, &swaps[..1]).unwrap();
        assert!(untouched.contains("<source protocol='rbd' name='pool/web1-root'>"), "{untouched}");
    }

    #[test]
    fn a_throwaway_copy_touches_nothing_of_the_domain() {
        let live = XML.replace("<domain type='kvm'>", "<domain type='kvm' id='7'>").replace(
            "<name>web1</name>",
            "<name>web1</name><uuid>11111111-2222-3333-4444-555555555555</uuid><os><type>hvm</type><loader>/x.fd</loader><nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os><seclabel type='dynamic' model='dac'><label>+64055:+107</label></seclabel>",
        ).replace("</devices>", "<channel type='unix'><source mode='bind' path='/run/web1.agent'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel><serial type='pty'/><graphics type='vnc' port='5901'/></devices>");
        assert!(has_agent_channel(&live) && !has_agent_channel(XML));
        let swaps = [DiskSwap {
            target: "vdb".into(),
            source: DiskSource::File("/w/vdb.qcow2".into()),
            format: "qcow2".into(),
            encryption: None,
        }];
        let t = Throwaway {
            name: "nasbak-verify-web1",
            uuid: "99999999-8888-7777-6666-555555555555",
            disks: &swaps,
            console_log: std::path::Path::new("/w/console.log"),
            agent: true,
            nvram: None,
        };
        let out = throwaway_definition(&live, &t).unwrap();
        let d = Domain::parse(&out).unwrap();
        assert_eq!(d.name, "nasbak-verify-web1");
        assert_eq!(d.uuid.as_deref(), Some("99999999-8888-7777-6666-555555555555"));
        assert_eq!(d.disks.len(), 1, "only the swapped disk: {out}");
        assert_eq!(d.disks[0].source, Some(DiskSource::File(PathBuf::from("/w/vdb.qcow2"))));
        for gone in
            ["<interface", "5901", "/run/web1.agent", "nvram", "+64055", "id='7'", "pool/web1-root", "type='pty'"]
        {
            assert!(!out.contains(gone), "{gone} dropped: {out}");
        }
        for kept in ["<loader>/x.fd</loader>", "useserial=\"yes\"", "path=\"/w/console.log\"", "org.qemu.guest_agent.0"]
        {
            assert!(out.contains(kept), "{kept} in: {out}");
        }
        assert!(has_agent_channel(&out));
        // A UEFI VM's copy gets a variable store of its own; an emulated TPM keeps its model but
        // never the original's state directory.
        let uefi = live.replace(
            "</devices>",
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><source type='dir' path='/var/lib/web1-tpm'/></backend></tpm></devices>",
        );
        let copy = std::path::Path::new("/w/nvram.fd");
        let out = throwaway_definition(&uefi, &Throwaway { nvram: Some(copy), ..t }).unwrap();
        let d = Domain::parse(&out).unwrap();
        assert_eq!(d.nvram.as_ref().map(|n| n.path.as_str()), Some("/w/nvram.fd"), "{out}");
        assert!(!out.contains("web1_VARS") && !out.contains("/var/lib/web1-tpm"), "{out}");
        assert_eq!(d.tpm.as_ref().map(|t| t.version.as_str()), Some("2.0"));
        assert_eq!(
            d.tpm_state_dir(),
            Some(PathBuf::from("/var/lib/libvirt/swtpm/99999999-8888-7777-6666-555555555555/tpm2"))
        );
    }

    #[test]
    fn a_disk_without_a_driver_gets_one_and_a_missing_disk_is_an_error() {
        let xml = "<domain><devices><disk type='file'><source file='/a'/><target dev='sda'/></disk></devices></domain>";
        let swap = DiskSwap {
            target: "sda".into(),
            source: DiskSource::File("/b".into()),
            format: "qcow2".into(),
            encryption: None,
        };
        let out = swap_disk_sources(xml, std::slice::from_ref(&swap)).unwrap();
        assert!(out.contains("type=\"qcow2\"") && out.contains("file=\"/b\""), "{out}");
        let missing = DiskSwap { target: "vdq".into(), ..swap };
        assert!(swap_disk_sources(xml, &[missing]).unwrap_err().detail.contains("no disk vdq"));
    }

    #[test]
    fn an_encrypted_disk_swapped_gets_the_encryption_its_new_source_has() {
        let secret = "6c2e5a8f-1d3b-4c7e-9a0f-2b4d6e8f0a1c";
        let xml = format!(
            "<domain><name>v</name><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/enc.qcow2'><encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption></source><target dev='vda'/></disk></devices></domain>"
        );
        let old_place = format!(
            "<domain><name>v</name><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption><source file='/v/enc.qcow2'/><target dev='vda'/></disk></devices></domain>"
        );
        let encryption = DiskEncryption { format: "luks".into(), secret_uuid: Some(secret.into()), secret_usage: None };
        for xml in [&xml, &old_place] {
            // Onto an encrypted overlay: the secret goes with the new source.
            let swap = DiskSwap {
                target: "vda".into(),
                source: DiskSource::File("/w/vda.overlay.qcow2".into()),
                format: "qcow2".into(),
                encryption: Some(encryption.clone()),
            };
            let out = swap_disk_sources(xml, std::slice::from_ref(&swap)).unwrap();
            let d = Domain::parse(&out).unwrap();
            assert_eq!(d.disks[0].source, Some(DiskSource::File(PathBuf::from("/w/vda.overlay.qcow2"))), "{out}");
            assert_eq!(d.disks[0].encryption.as_ref(), Some(&encryption), "{out}");
            assert_eq!(out.matches("<encryption").count(), 1, "{out}");
            assert!(!out.contains("/v/enc.qcow2"), "{out}");
            // Onto a plain file: no encryption left anywhere.
            let plain = DiskSwap { encryption: None, ..swap };
            let out = swap_disk_sources(xml, &[plain]).unwrap();
            assert!(!out.contains("encryption") && !out.contains(secret), "{out}");
            assert_eq!(Domain::parse(&out).unwrap().disks[0].encryption, None);
        }
        // A secret named by its usage keeps its usage.
        let by_usage =
            DiskEncryption { format: "luks".into(), secret_uuid: None, secret_usage: Some("/v/enc.qcow2".into()) };
        let swap = DiskSwap {
            target: "vda".into(),
            source: DiskSource::File("/w/o.qcow2".into()),
            format: "qcow2".into(),
            encryption: Some(by_usage.clone()),
        };
        let out = swap_disk_sources(&xml, &[swap]).unwrap();
        assert_eq!(Domain::parse(&out).unwrap().disks[0].encryption, Some(by_usage), "{out}");
    }
}
