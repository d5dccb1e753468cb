//! Changing where some disks of a domain definition read from, leaving everything else of the
//! document as libvirt wrote it (bus, address, boot order, cache mode, serial, ...).

use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesStart, Event};

use crate::domain::{DiskSource, XmlError};

/// A disk (by its target device) that is to read from another file or block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSwap {
    /// The target device (`vda`).
    pub target: String,
    /// The new source: a file or a block device.
    pub source: DiskSource,
    /// The new source's format (`qcow2`, `raw`).
    pub format: String,
}

/// `xml` (a domain definition) with the disks named in `swaps` reading from their new source:
/// the disk's `type`, its `<source>` and its driver's `type` changed, its `<backingStore>`
/// (and `<auth>`, for a disk that was a network disk) dropped so that libvirt reads the new
/// chain from the images. Everything else is kept as it was. Every swap must name a disk of
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
            Event::Start(s) if depth == 1 && matches!(s.name().as_ref(), b"source" | b"backingStore" | b"auth") => {
                if s.name().as_ref() == b"source" {
                    out.push(Event::Empty(source.clone()));
                }
                dropping = Some(depth);
                depth += 1;
            }
            Event::Empty(s) if depth == 1 && matches!(s.name().as_ref(), b"source" | b"backingStore" | b"auth") => {
                if s.name().as_ref() == b"source" {
                    out.push(Event::Empty(source.clone()));
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
            DiskSwap { target: "vdb".into(), source: DiskSource::File("/o/vdb.qcow2".into()), format: "qcow2".into() },
            DiskSwap { target: "vda".into(), source: DiskSource::Block("/dev/sdz".into()), format: "raw".into() },
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
    fn a_disk_without_a_driver_gets_one_and_a_missing_disk_is_an_error() {
        let xml = "<domain><devices><disk type='file'><source file='/a'/><target dev='sda'/></disk></devices></domain>";
        let swap = DiskSwap { target: "sda".into(), source: DiskSource::File("/b".into()), format: "qcow2".into() };
        let out = swap_disk_sources(xml, std::slice::from_ref(&swap)).unwrap();
        assert!(out.contains("type=\"qcow2\"") && out.contains("file=\"/b\""), "{out}");
        let missing = DiskSwap { target: "vdq".into(), ..swap };
        assert!(swap_disk_sources(xml, &[missing]).unwrap_err().detail.contains("no disk vdq"));
    }
}
