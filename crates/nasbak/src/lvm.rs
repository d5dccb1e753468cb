//! LVM2 physical volumes read as they are stored, without LVM's tools and without activating
//! anything on the host: a backup's logical volumes are found from the metadata text on the
//! physical volume (its label, its metadata area, the volume group's text), so nothing can
//! collide with the host's own volume groups (one of the same name included) and no
//! device-mapper is needed.
//!
//! A linear logical volume whose extents lie in one run on this physical volume is a byte range
//! of it: [`Placement::Range`], mounted through a loop device at its offset. Every other kind
//! (striped, thin, RAID, snapshots, a volume in several pieces or on another physical volume)
//! is [`Placement::NotMountable`] with the reason. The metadata is the guest's data: every
//! size and offset is checked, nothing in it can make this panic or read outside the volume.

use std::collections::BTreeMap;

/// Where a logical volume's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Placement {
    /// `size` bytes at `offset` from the start of the physical volume.
    Range { offset: u64, size: u64 },
    /// Why it is not mounted.
    NotMountable(String),
}

/// One visible logical volume of the volume group on a physical volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogicalVolume {
    /// The volume group's name.
    pub vg: String,
    /// The logical volume's name.
    pub name: String,
    /// Where its bytes are.
    pub placement: Placement,
}

const SECTOR: u64 = 512;
const LABEL_ID: &[u8; 8] = b"LABELONE";
const LABEL_TYPE: &[u8; 8] = b"LVM2 001";
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const MDA_HEADER_SIZE: u64 = 512;
/// The most metadata text read (LVM's own default area is 1 MiB).
const MAX_TEXT: u64 = 16 << 20;
/// How deep sections nest in the text (LVM's own nest three or four deep).
const MAX_DEPTH: usize = 32;

/// The logical volumes of the physical volume of `size` bytes that `read_at` reads (offsets
/// from its start), or why its metadata could not be read.
pub(crate) fn logical_volumes(
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    size: u64,
) -> Result<Vec<LogicalVolume>, String> {
    let mut read = |offset: u64, len: u64| -> Result<Vec<u8>, String> {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(format!("its metadata points outside the volume ({len} bytes at {offset})"));
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| "an impossible length".to_owned())?];
        read_at(offset, &mut buf).map_err(|e| format!("reading {len} bytes at {offset}: {e}"))?;
        Ok(buf)
    };
    let first = read(0, 4 * SECTOR)?;
    let (label_at, label) = (0..4)
        .map(|s| (s * SECTOR, &first[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize]))
        .find(|(_, l)| &l[..8] == LABEL_ID)
        .ok_or("no LVM2 label in its first four sectors")?;
    if &label[24..32] != LABEL_TYPE {
        return Err(format!("its label is of type {:?}, not LVM2 001", String::from_utf8_lossy(&label[24..32])));
    }
    let header_at = u64::from(u32_at(label, 20));
    if header_at < 32 || header_at + 32 + 8 + 16 > SECTOR {
        return Err(format!("its label puts the volume header at {header_at}"));
    }
    let pv = &label[header_at as usize..];
    let pv_uuid = String::from_utf8_lossy(&pv[..32]).into_owned();
    // After the uuid and the device size: data areas, then metadata areas, each list ending
    // with a zero entry.
    let mut at = 40;
    let mut areas = |pv: &[u8]| -> Vec<(u64, u64)> {
        let mut list = Vec::new();
        while at + 16 <= pv.len() {
            let (offset, len) = (u64_at(pv, at), u64_at(pv, at + 8));
            at += 16;
            if offset == 0 {
                break;
            }
            list.push((offset, len));
        }
        list
    };
    let _data = areas(pv);
    let metadata = areas(pv);
    let _ = label_at;
    if metadata.is_empty() {
        return Err("it holds no metadata area (its volume group's metadata is on another physical volume)".into());
    }
    let mut why = String::new();
    for (mda_offset, mda_size) in metadata {
        match metadata_text(&mut read, mda_offset, mda_size) {
            Ok(text) => return volumes_of(&text, &pv_uuid, size),
            Err(e) => why = e,
        }
    }
    Err(why)
}

/// The current metadata text of the metadata area at `offset` (`size` bytes, a circular buffer
/// after its 512-byte header).
fn metadata_text(
    read: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>, String>,
    offset: u64,
    size: u64,
) -> Result<String, String> {
    let header = read(offset, MDA_HEADER_SIZE)?;
    if &header[4..20] != MDA_MAGIC {
        return Err(format!("no metadata area header at {offset}"));
    }
    let (text_at, len, flags) = (u64_at(&header, 40), u64_at(&header, 48), u32_at(&header, 60));
    if len == 0 || flags & 1 != 0 {
        return Err("its metadata area holds no metadata".into());
    }
    if len > MAX_TEXT || text_at >= size || text_at < MDA_HEADER_SIZE || len > size - MDA_HEADER_SIZE {
        return Err(format!("its metadata area says {len} bytes of text at {text_at} in {size}"));
    }
    // The text may wrap round to just after the header.
    let first = len.min(size - text_at);
    let mut text = read(offset + text_at, first)?;
    if first < len {
        text.extend(read(offset + MDA_HEADER_SIZE, len - first)?);
    }
    while text.last() == Some(&0) {
        text.pop();
    }
    String::from_utf8(text).map_err(|_| "its metadata text is not UTF-8".to_owned())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

/// A value in LVM's metadata text.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(i64),
    Str(String),
    List(Vec<Value>),
    Section(BTreeMap<String, Value>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(m) => m.get(key),
            _ => None,
        }
    }
    fn int(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn sections(&self) -> impl Iterator<Item = (&String, &Value)> {
        let map = match self {
            Value::Section(m) => Some(m),
            _ => None,
        };
        map.into_iter().flatten().filter(|(_, v)| matches!(v, Value::Section(_)))
    }
}

/// Parses LVM's metadata text (`name = value`, `name { ... }`, lists, strings, `#` comments).
fn parse(text: &str) -> Result<Value, String> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let top = p.items(0)?;
    p.skip();
    if p.i < p.s.len() {
        return Err(format!("unexpected {:?} at byte {}", p.s[p.i] as char, p.i));
    }
    Ok(top)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while self.i < self.s.len() {
            match self.s[self.i] {
                b'#' => {
                    while self.i < self.s.len() && self.s[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                c if c.is_ascii_whitespace() => self.i += 1,
                _ => break,
            }
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip();
        self.s.get(self.i).copied()
    }
    fn name(&mut self) -> Result<String, String> {
        self.skip();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || b"_.+-".contains(&self.s[self.i])) {
            self.i += 1;
        }
        if start == self.i {
            return Err(format!("a name expected at byte {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    /// Items up to a closing brace (not taken) or the end.
    fn items(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("sections nest too deep".into());
        }
        let mut map = BTreeMap::new();
        while !matches!(self.peek(), None | Some(b'}')) {
            let name = self.name()?;
            match self.peek() {
                Some(b'{') => {
                    self.i += 1;
                    let inner = self.items(depth + 1)?;
                    if self.peek() != Some(b'}') {
                        return Err(format!("section {name} is not closed"));
                    }
                    self.i += 1;
                    map.insert(name, inner);
                }
                Some(b'=') => {
                    self.i += 1;
                    let v = self.value(depth)?;
                    map.insert(name, v);
                }
                other => return Err(format!("after {name}: {:?}", other.map(char::from))),
            }
        }
        Ok(Value::Section(map))
    }
    fn value(&mut self, depth: usize) -> Result<Value, String> {
        match self.peek() {
            Some(b'"') => {
                self.i += 1;
                let mut out = Vec::new();
                loop {
                    match self.s.get(self.i) {
                        None => return Err("a string is not closed".into()),
                        Some(b'"') => break,
                        Some(b'\\') if self.i + 1 < self.s.len() => {
                            out.push(self.s[self.i + 1]);
                            self.i += 2;
                        }
                        Some(c) => {
                            out.push(*c);
                            self.i += 1;
                        }
                    }
                }
                self.i += 1;
                Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()))
            }
            Some(b'[') => {
                if depth > MAX_DEPTH {
                    return Err("lists nest too deep".into());
                }
                self.i += 1;
                let mut list = Vec::new();
                loop {
                    match self.peek() {
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Value::List(list));
                        }
                        Some(b',') => self.i += 1,
                        None => return Err("a list is not closed".into()),
                        _ => list.push(self.value(depth + 1)?),
                    }
                }
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                self.i += 1;
                while self.i < self.s.len() && (self.s[self.i].is_ascii_digit() || self.s[self.i] == b'.') {
                    self.i += 1;
                }
                let text = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                // Decimals (LVM writes none in volume groups) are kept as their whole part.
                let whole = text.split('.').next().unwrap_or_default();
                whole.parse::<i64>().map(Value::Int).map_err(|_| format!("the number {text} at byte {start}"))
            }
            other => Err(format!("a value expected at byte {}, found {:?}", self.i, other.map(char::from))),
        }
    }
}

/// The visible logical volumes the metadata `text` describes, placed on the physical volume
/// whose uuid (without dashes) is `pv_uuid` and whose size is `size`.
fn volumes_of(text: &str, pv_uuid: &str, size: u64) -> Result<Vec<LogicalVolume>, String> {
    let top = parse(text).map_err(|e| format!("its metadata text does not parse: {e}"))?;
    let (vg_name, vg) = top.sections().next().ok_or("its metadata text names no volume group")?;
    let extent = vg.int("extent_size").filter(|e| *e > 0).ok_or("its volume group has no extent size")? * SECTOR;
    let pvs = vg.get("physical_volumes").ok_or("its volume group lists no physical volumes")?;
    let here = pvs
        .sections()
        .find(|(_, pv)| pv.str("id").is_some_and(|id| id.replace('-', "") == pv_uuid))
        .map(|(key, pv)| (key.clone(), pv.int("pe_start").unwrap_or(0) * SECTOR));
    let Some((pv_key, pe_start)) = here else {
        return Err("its volume group's metadata does not list this physical volume".into());
    };
    let mut out = Vec::new();
    let Some(lvs) = vg.get("logical_volumes") else { return Ok(out) };
    for (name, lv) in lvs.sections() {
        let status = match lv.get("status") {
            Some(Value::List(l)) => {
                l.iter().filter_map(|v| if let Value::Str(s) = v { Some(s.as_str()) } else { None }).collect()
            }
            _ => Vec::new(),
        };
        if !status.contains(&"VISIBLE") {
            continue;
        }
        let placement = place(lv, (&pv_key, pe_start, extent), size)
            .map_or_else(Placement::NotMountable, |(offset, size)| Placement::Range { offset, size });
        out.push(LogicalVolume { vg: vg_name.clone(), name: name.clone(), placement });
    }
    Ok(out)
}

/// The byte range of a logical volume on this physical volume (`pv_key` in the metadata, its
/// extents from `pe_start`, each `extent` bytes), or why it is not one range here.
fn place(lv: &Value, (pv_key, pe_start, extent): (&str, u64, u64), size: u64) -> Result<(u64, u64), String> {
    let mut segments: Vec<&Value> = lv.sections().filter(|(k, _)| k.starts_with("segment")).map(|(_, v)| v).collect();
    segments.sort_by_key(|s| s.int("start_extent").unwrap_or(u64::MAX));
    if segments.is_empty() {
        return Err("it has no segments".into());
    }
    // (first extent on the physical volume, extent count), in the logical volume's order.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for seg in &segments {
        let kind = seg.str("type").unwrap_or("?");
        let stripes = seg.int("stripe_count").unwrap_or(0);
        if kind != "striped" {
            return Err(format!(
                "a {kind} logical volume: only linear logical volumes are mounted (others need device-mapper)"
            ));
        }
        if stripes != 1 {
            return Err(format!(
                "striped over {stripes} physical volumes: only linear logical volumes are mounted (others need device-mapper)"
            ));
        }
        let count = seg.int("extent_count").ok_or("a segment without an extent count")?;
        let (pv, first) = match seg.get("stripes") {
            Some(Value::List(l)) => match (l.first(), l.get(1)) {
                (Some(Value::Str(pv)), Some(Value::Int(first))) => {
                    (pv.as_str(), u64::try_from(*first).unwrap_or(u64::MAX))
                }
                _ => return Err("a segment whose stripes are not readable".into()),
            },
            _ => return Err("a segment without stripes".into()),
        };
        if pv != pv_key {
            return Err(format!("its extents are on another physical volume ({pv}), not on this disk"));
        }
        match runs.last_mut() {
            Some((f, c)) if f.checked_add(*c) == Some(first) => *c += count,
            _ => runs.push((first, count)),
        }
    }
    if runs.len() > 1 {
        return Err(format!(
            "its extents are in {} separate pieces: only logical volumes in one piece are mounted (others need device-mapper)",
            runs.len()
        ));
    }
    let (first, count) = runs[0];
    let offset = first.checked_mul(extent).and_then(|o| o.checked_add(pe_start));
    let bytes = count.checked_mul(extent);
    match (offset, bytes) {
        (Some(o), Some(b)) if o.checked_add(b).is_some_and(|end| end <= size) => Ok((o, b)),
        _ => Err(format!("its metadata places it beyond the end of the physical volume ({size} bytes)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"rhel {
id = "abc"
seqno = 4
format = "lvm2" # informational
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192		# 4 Megabytes
physical_volumes {
pv0 {
id = "AAAAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGGGG"
device = "/dev/vda2"
pe_start = 2048
pe_count = 30
}
}
logical_volumes {
root {
id = "r"
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 {
start_extent = 0
extent_count = 4
type = "striped"
stripe_count = 1	# linear
stripes = [
"pv0", 2
]
}
}
home {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment2 {
start_extent = 2
extent_count = 1
type = "striped"
stripe_count = 1
stripes = ["pv0", 10]
}
segment1 {
start_extent = 0
extent_count = 2
type = "striped"
stripe_count = 1
stripes = ["pv0", 8]
}
}
split {
status = ["READ", "WRITE", "VISIBLE"]
segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv0", 20] }
segment2 { start_extent = 1 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv0", 25] }
}
pool { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 1 type = "thin-pool" } }
hidden { status = ["READ", "WRITE"] segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv0", 0] } }
far { status = ["VISIBLE"] segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv1", 0] } }
huge { status = ["VISIBLE"] segment1 { start_extent = 0 extent_count = 1000 type = "striped" stripe_count = 1 stripes = ["pv0", 0] } }
}
}
contents = "Text Format Volume Group"
version = 1
"#;

    const UUID: &str = "AAAAAABBBBCCCCDDDDEEEEFFFFGGGGGG";

    fn placement(lvs: &[LogicalVolume], name: &str) -> Placement {
        lvs.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("{name} in {lvs:?}")).placement.clone()
    }

    #[test]
    fn linear_volumes_are_byte_ranges_and_the_rest_say_why() {
        let size = 2048 * 512 + 30 * (4 << 20);
        let lvs = volumes_of(TEXT, UUID, size).unwrap();
        assert!(lvs.iter().all(|l| l.vg == "rhel"));
        assert!(!lvs.iter().any(|l| l.name == "hidden"), "hidden volumes are not listed");
        let mib4 = 4u64 << 20;
        assert_eq!(placement(&lvs, "root"), Placement::Range { offset: (1 << 20) + 2 * mib4, size: 4 * mib4 });
        // Two segments, one after the other on the volume: one piece.
        assert_eq!(placement(&lvs, "home"), Placement::Range { offset: (1 << 20) + 8 * mib4, size: 3 * mib4 });
        let why = |n| match placement(&lvs, n) {
            Placement::NotMountable(w) => w,
            p => panic!("{n}: {p:?}"),
        };
        assert!(why("split").contains("2 separate pieces"), "{}", why("split"));
        assert!(why("pool").contains("thin-pool"), "{}", why("pool"));
        assert!(why("far").contains("another physical volume (pv1)"), "{}", why("far"));
        assert!(why("huge").contains("beyond the end"), "{}", why("huge"));
    }

    #[test]
    fn another_physical_volume_of_the_group_is_said() {
        let e = volumes_of(TEXT, "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ", 1 << 30).unwrap_err();
        assert!(e.contains("does not list this physical volume"), "{e}");
    }

    /// A physical volume as LVM lays it out: label in sector 1, metadata area at 4 KiB, its
    /// text after the 512-byte header, wrapping round when `wrap` says so.
    fn volume(text: &str, wrap: bool) -> Vec<u8> {
        let mut v = vec![0u8; 2 << 20];
        let label = 512;
        v[label..label + 8].copy_from_slice(LABEL_ID);
        v[label + 8..label + 16].copy_from_slice(&1u64.to_le_bytes());
        v[label + 20..label + 24].copy_from_slice(&32u32.to_le_bytes());
        v[label + 24..label + 32].copy_from_slice(LABEL_TYPE);
        let pv = label + 32;
        v[pv..pv + 32].copy_from_slice(UUID.as_bytes());
        let mut at = pv + 40;
        for (o, s) in [(1u64 << 20, 0u64), (0, 0), (4096, (1 << 20) - 4096), (0, 0)] {
            v[at..at + 8].copy_from_slice(&o.to_le_bytes());
            v[at + 8..at + 16].copy_from_slice(&s.to_le_bytes());
            at += 16;
        }
        let mda = 4096usize;
        let mda_size = (1usize << 20) - 4096;
        v[mda + 4..mda + 20].copy_from_slice(MDA_MAGIC);
        let bytes = text.as_bytes();
        let text_at = if wrap { mda_size - 100 } else { 512 };
        v[mda + 40..mda + 48].copy_from_slice(&(text_at as u64).to_le_bytes());
        v[mda + 48..mda + 56].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        let first = bytes.len().min(mda_size - text_at);
        v[mda + text_at..mda + text_at + first].copy_from_slice(&bytes[..first]);
        v[mda + 512..mda + 512 + bytes.len() - first].copy_from_slice(&bytes[first..]);
        v
    }

    fn read(v: &[u8]) -> Result<Vec<LogicalVolume>, String> {
        let size = v.len() as u64;
        logical_volumes(
            &mut |o, buf| {
                buf.copy_from_slice(&v[o as usize..o as usize + buf.len()]);
                Ok(())
            },
            size,
        )
    }

    #[test]
    fn the_label_and_the_metadata_area_are_read_also_when_the_text_wraps() {
        let text = TEXT.replace("pe_count = 30", "pe_count = 0").replace("extent_size = 8192", "extent_size = 8");
        for wrap in [false, true] {
            let lvs = read(&volume(&text, wrap)).unwrap();
            assert_eq!(placement(&lvs, "root"), Placement::Range { offset: (1 << 20) + 2 * 4096, size: 4 * 4096 });
        }
        let mut no_label = volume(&text, false);
        no_label[512..520].copy_from_slice(b"LABELTWO");
        assert!(read(&no_label).unwrap_err().contains("no LVM2 label"));
        let mut bad_magic = volume(&text, false);
        bad_magic[4096 + 4] = b'X';
        assert!(read(&bad_magic).unwrap_err().contains("no metadata area header"));
    }

    proptest::proptest! {
        #[test]
        fn nothing_a_guest_writes_makes_it_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096), at in 0usize..4096) {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let _ = parse(&text);
            let _ = volumes_of(&text, UUID, 1 << 30);
            let mut v = volume(TEXT, false);
            let end = (at + bytes.len()).min(v.len());
            v[at..end].copy_from_slice(&bytes[..end - at]);
            let _ = read(&v);
        }

        #[test]
        fn cut_metadata_never_panics(cut in 0usize..TEXT.len()) {
            let _ = volumes_of(&TEXT[..cut], UUID, 1 << 30);
        }
    }
}
