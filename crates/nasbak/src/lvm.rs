//! LVM2 physical volumes read as they are stored, without LVM's tools and without activating
//! anything on the host: a backup's logical volumes are found from the metadata text on its
//! physical volumes (each one's label, metadata area and the volume group's text), so nothing
//! can collide with the host's own volume groups (one of the same name included).
//!
//! A linear logical volume whose extents lie in one run on one physical volume is a byte range
//! of it: [`Placement::Range`], mounted through a loop device at its offset, with no
//! device-mapper. The others that device-mapper can show read-only are [`Placement::Mapped`]:
//! the tables of the devices to create, in order (a linear volume in several pieces or on
//! several physical volumes, striped, thin volumes over their pool, a RAID 1 or mirrored volume
//! through its first image, an old-style snapshot over its origin). What is left (RAID 4/5/6/10,
//! cache, VDO, a volume on a physical volume that is not on the disks mounted) is
//! [`Placement::NotMountable`] with the reason. The metadata is the guest's data: every size and
//! offset is checked, nothing in it can make this panic or address outside a volume.

use std::collections::BTreeMap;

/// Where a logical volume's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Placement {
    /// `size` bytes at `offset` from the start of the physical volume whose uuid is `pv`.
    Range { pv: String, offset: u64, size: u64 },
    /// The device-mapper devices that show it, those it stands on first; the last is the
    /// logical volume itself.
    Mapped(Vec<Mapping>),
    /// Why it is not mounted.
    NotMountable(String),
}

/// One device-mapper device: its name inside the volume group (a logical volume's, or one with
/// a suffix for the devices it stands on) and its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// Unique in the volume group: `root`, `pool-tpool`, `snap-cow`.
    pub name: String,
    /// The table's lines, in order.
    pub lines: Vec<Line>,
}

impl Mapping {
    /// Its size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.lines.last().map_or(0, |l| l.start + l.len)
    }
}

/// One line of a device-mapper table: `len` sectors from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub start: u64,
    pub len: u64,
    pub target: Target,
}

/// A device-mapper target. Sectors on a physical volume count from its first extent
/// (`pe_start`), so that the device under a table never begins with the volume's label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// `linear` on a physical volume.
    Linear { pv: String, sector: u64 },
    /// `linear` on another mapping of the group.
    Over { mapping: String, sector: u64 },
    /// `striped`: chunks of `chunk` sectors in turn on each (physical volume, sector).
    Striped { chunk: u64, stripes: Vec<(String, u64)> },
    /// `thin-pool`, read-only, over its metadata and data mappings.
    ThinPool { meta: String, data: String, block: u64 },
    /// `thin`: device `id` of the pool mapping.
    Thin { pool: String, id: u64 },
    /// `snapshot`, persistent, of the origin mapping with its copy-on-write store.
    Snapshot { origin: String, cow: String, chunk: u64 },
}

/// One visible logical volume of a volume group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogicalVolume {
    /// The volume group's name.
    pub vg: String,
    /// The logical volume's name.
    pub name: String,
    /// Where its bytes are.
    pub placement: Placement,
}

/// What one physical volume holds: its uuid (without dashes) and its volume group's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PhysicalVolume {
    pub uuid: String,
    /// The volume group's metadata text, as the volume stores it.
    pub text: String,
    /// The volume group's id and sequence number as the text names them (the newest text of a
    /// group wins), read once with the text.
    pub group: Option<(String, u64)>,
}

/// The volume group's id and sequence number that metadata `text` names.
fn group_of(text: &str) -> Option<(String, u64)> {
    let top = parse(text).ok()?;
    let (_, vg) = top.sections().next()?;
    Some((vg.str("id")?.to_owned(), vg.int("seqno").unwrap_or(0)))
}

/// A volume group as its metadata describes it, placed on the physical volumes found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeGroup {
    /// Its name.
    pub name: String,
    /// Where each physical volume found (by uuid) has its first extent, in bytes.
    pub pe_start: BTreeMap<String, u64>,
    /// Its visible logical volumes.
    pub lvs: Vec<LogicalVolume>,
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
/// How deep logical volumes stand on one another (a thin volume on its pool on its data
/// volume is three).
const MAX_STACK: usize = 8;

/// The label and metadata of the physical volume of `size` bytes that `read_at` reads (offsets
/// from its start), or why it could not be read.
pub(crate) fn physical_volume(
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    size: u64,
) -> Result<PhysicalVolume, String> {
    let mut read = |offset: u64, len: u64| -> Result<Vec<u8>, String> {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(format!("its metadata points outside the volume ({len} bytes at {offset})"));
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| "an impossible length".to_owned())?];
        read_at(offset, &mut buf).map_err(|e| format!("reading {len} bytes at {offset}: {e}"))?;
        Ok(buf)
    };
    let first = read(0, 4 * SECTOR)?;
    let label = (0..4)
        .map(|s| &first[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize])
        .find(|l| &l[..8] == LABEL_ID)
        .ok_or("no LVM2 label in its first four sectors")?;
    if &label[24..32] != LABEL_TYPE {
        return Err(format!("its label is of type {:?}, not LVM2 001", String::from_utf8_lossy(&label[24..32])));
    }
    let header_at = u64::from(u32_at(label, 20));
    if header_at < 32 || header_at + 32 + 8 + 16 > SECTOR {
        return Err(format!("its label puts the volume header at {header_at}"));
    }
    let pv = &label[header_at as usize..];
    let uuid = String::from_utf8_lossy(&pv[..32]).into_owned();
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
    if metadata.is_empty() {
        return Err("it holds no metadata area (its volume group's metadata is on another physical volume)".into());
    }
    let mut why = String::new();
    for (mda_offset, mda_size) in metadata {
        match metadata_text(&mut read, mda_offset, mda_size) {
            Ok(text) => return Ok(PhysicalVolume { uuid, group: group_of(&text), text }),
            Err(e) => why = e,
        }
    }
    Err(why)
}

/// The logical volumes of the physical volume of `size` bytes that `read_at` reads, placed as
/// if it were the only physical volume found.
#[cfg(test)]
fn logical_volumes(
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    size: u64,
) -> Result<Vec<LogicalVolume>, String> {
    let pv = physical_volume(read_at, size)?;
    Ok(volume_group(&pv.text, &BTreeMap::from([(pv.uuid, size)]))?.lvs)
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

/// The volume group the metadata `text` describes, its logical volumes placed on the physical
/// volumes `found` (uuid without dashes to size in bytes).
pub(crate) fn volume_group(text: &str, found: &BTreeMap<String, u64>) -> Result<VolumeGroup, String> {
    let top = parse(text).map_err(|e| format!("its metadata text does not parse: {e}"))?;
    let (vg_name, vg) = top.sections().next().ok_or("its metadata text names no volume group")?;
    let extent = vg.int("extent_size").filter(|e| *e > 0).ok_or("its volume group has no extent size")?;
    let pvs = vg.get("physical_volumes").ok_or("its volume group lists no physical volumes")?;
    // The metadata's key of each physical volume (pv0, pv1...) to its uuid, size and first
    // extent, for those found.
    let mut here = BTreeMap::new();
    let mut pe_start = BTreeMap::new();
    for (key, pv) in pvs.sections() {
        let Some(uuid) = pv.str("id").map(|id| id.replace('-', "")) else { continue };
        if let Some(&size) = found.get(&uuid) {
            let start = pv.int("pe_start").unwrap_or(0).checked_mul(SECTOR).filter(|s| *s < size);
            let Some(start) = start else { continue };
            here.insert(key.clone(), (uuid.clone(), (size - start) / SECTOR));
            pe_start.insert(uuid, start);
        }
    }
    if here.is_empty() {
        return Err("its volume group's metadata lists none of the physical volumes found".into());
    }
    let mut group = VolumeGroup { name: vg_name.clone(), pe_start, lvs: Vec::new() };
    let Some(lvs) = vg.get("logical_volumes") else { return Ok(group) };
    // Old-style snapshots: a `snapshotN` volume (the one LVM marks visible) names the origin,
    // the chunk size and the copy-on-write store, whose name is the one users know the
    // snapshot by. The snapshot is listed under that name, once.
    let mut snapshots = BTreeMap::new();
    let mut snapshot_lvs = Vec::new();
    for (name, lv) in lvs.sections() {
        for (_, seg) in segments(lv) {
            if seg.str("type") == Some("snapshot") {
                snapshot_lvs.push(name.clone());
                if let (Some(cow), Some(origin)) = (seg.str("cow_store"), seg.str("origin")) {
                    snapshots.insert(cow.to_owned(), (origin.to_owned(), seg.int("chunk_size").unwrap_or(0)));
                }
            }
        }
    }
    let group_of = Group { lvs, here: &here, extent };
    for (name, lv) in lvs.sections() {
        let status = match lv.get("status") {
            Some(Value::List(l)) => {
                l.iter().filter_map(|v| if let Value::Str(s) = v { Some(s.as_str()) } else { None }).collect()
            }
            _ => Vec::new(),
        };
        if snapshot_lvs.contains(name) || !(status.contains(&"VISIBLE") || snapshots.contains_key(name)) {
            continue;
        }
        let placement = match snapshots.get(name) {
            Some((origin, chunk)) => group_of.snapshot(name, origin, *chunk),
            None => group_of.place(name),
        };
        let placement = placement.unwrap_or_else(Placement::NotMountable);
        group.lvs.push(LogicalVolume { vg: vg_name.clone(), name: name.clone(), placement });
    }
    Ok(group)
}

/// A logical volume's segments, in the order of their first extent.
fn segments(lv: &Value) -> Vec<(u64, &Value)> {
    let mut list: Vec<(u64, &Value)> = lv
        .sections()
        .filter(|(k, _)| k.starts_with("segment"))
        .map(|(_, v)| (v.int("start_extent").unwrap_or(u64::MAX), v))
        .collect();
    list.sort_by_key(|(start, _)| *start);
    list
}

/// A volume group's logical volumes and the physical volumes found, to build tables from.
struct Group<'a> {
    lvs: &'a Value,
    /// Metadata key to (uuid, sectors from the first extent to the volume's end).
    here: &'a BTreeMap<String, (String, u64)>,
    /// Sectors per extent.
    extent: u64,
}

impl Group<'_> {
    /// Where the logical volume `name` is: one range on one physical volume, or mappings.
    fn place(&self, name: &str) -> Result<Placement, String> {
        let mut deps = Vec::new();
        let lines = self.lines(name, &mut deps, 0)?;
        // Linear pieces on one physical volume that follow one another: a byte range.
        if deps.is_empty() {
            let mut range: Option<(String, u64, u64)> = None;
            let mut contiguous = true;
            for line in &lines {
                match (&line.target, &mut range) {
                    (Target::Linear { pv, sector }, None) => range = Some((pv.clone(), *sector, line.len)),
                    (Target::Linear { pv, sector }, Some((p, s, len))) if p == pv && *s + *len == *sector => {
                        *len += line.len;
                    }
                    _ => contiguous = false,
                }
            }
            if contiguous && let Some((pv, sector, len)) = range {
                return Ok(Placement::Range { pv, offset: sector * SECTOR, size: len * SECTOR });
            }
        }
        deps.push(Mapping { name: name.to_owned(), lines });
        Ok(Placement::Mapped(deps))
    }

    /// An old-style snapshot: its origin and its copy-on-write store (the visible volume
    /// `name`) as mappings, under a `snapshot` mapping of the origin's size.
    fn snapshot(&self, name: &str, origin: &str, chunk: u64) -> Result<Placement, String> {
        if chunk == 0 {
            return Err("a snapshot without a chunk size".into());
        }
        let mut deps = Vec::new();
        let origin_lines = self.lines(origin, &mut deps, 1)?;
        let cow_lines = self.lines(name, &mut deps, 1)?;
        let size = origin_lines.last().map_or(0, |l| l.start + l.len);
        let (origin_map, cow_map) = (format!("{name}-origin"), format!("{name}-cow"));
        deps.push(Mapping { name: origin_map.clone(), lines: origin_lines });
        deps.push(Mapping { name: cow_map.clone(), lines: cow_lines });
        let target = Target::Snapshot { origin: origin_map, cow: cow_map, chunk };
        deps.push(Mapping { name: name.to_owned(), lines: vec![Line { start: 0, len: size, target }] });
        Ok(Placement::Mapped(deps))
    }

    /// Adds the mapping of the logical volume `name` (and those it stands on) to `deps`, once.
    fn need(&self, name: &str, deps: &mut Vec<Mapping>, depth: usize) -> Result<(), String> {
        if !deps.iter().any(|m| m.name == name) {
            let lines = self.lines(name, deps, depth + 1)?;
            deps.push(Mapping { name: name.to_owned(), lines });
        }
        Ok(())
    }

    /// The table of the logical volume `name`; the mappings it stands on are added to `deps`.
    fn lines(&self, name: &str, deps: &mut Vec<Mapping>, depth: usize) -> Result<Vec<Line>, String> {
        if depth > MAX_STACK {
            return Err("its volumes stand on one another too deep".into());
        }
        let lv = self.lvs.get(name).ok_or_else(|| format!("it needs the volume {name}, which the metadata lacks"))?;
        let segs = segments(lv);
        if segs.is_empty() {
            return Err("it has no segments".into());
        }
        let mut lines = Vec::new();
        let mut next = 0u64;
        for (start_extent, seg) in segs {
            let kind = seg.str("type").unwrap_or("?");
            let count = seg.int("extent_count").ok_or("a segment without an extent count")?;
            let start = start_extent.checked_mul(self.extent).filter(|s| *s == next);
            let len = count.checked_mul(self.extent).filter(|l| *l > 0);
            let (Some(start), Some(len)) = (start, len) else {
                return Err(format!("its segments do not follow one another ({name})"));
            };
            next = start.checked_add(len).ok_or("its size overflows")?;
            let target = match kind {
                "striped" => self.striped(seg, count)?,
                "thin" => {
                    let pool = seg.str("thin_pool").ok_or("a thin segment without its pool")?;
                    let id = seg.int("device_id").ok_or("a thin segment without its device id")?;
                    let mapping = self.pool(pool, deps, depth)?;
                    Target::Thin { pool: mapping, id }
                }
                "thin-pool" => {
                    return Err("a thin pool: the thin volumes in it are shown, not the pool".into());
                }
                "raid1" | "mirror" => {
                    // Each image holds the whole volume: the first is read.
                    let key = if kind == "raid1" { "raids" } else { "mirrors" };
                    let list = match seg.get(key) {
                        Some(Value::List(l)) => l,
                        _ => return Err(format!("a {kind} segment without its images")),
                    };
                    let (image, at) = match kind {
                        "raid1" => (list.get(1), 0),
                        _ => (list.first(), list.get(1).and_then(int_of).unwrap_or(0)),
                    };
                    let Some(Value::Str(image)) = image else {
                        return Err(format!("a {kind} segment whose images are not readable"));
                    };
                    if seg.int("data_offset").unwrap_or(0) != 0 {
                        return Err(format!("a {kind} volume with a data offset"));
                    }
                    self.need(image, deps, depth)?;
                    let sector = at.checked_mul(self.extent).ok_or("its size overflows")?;
                    Target::Over { mapping: image.clone(), sector }
                }
                other => {
                    return Err(format!(
                        "a {other} logical volume: not mounted (linear, striped, thin, RAID 1, mirrored and snapshot volumes are)"
                    ));
                }
            };
            lines.push(Line { start, len, target });
        }
        Ok(lines)
    }

    /// A `striped` segment of `count` extents: linear with one stripe.
    fn striped(&self, seg: &Value, count: u64) -> Result<Target, String> {
        let stripes = seg.int("stripe_count").filter(|n| *n > 0).ok_or("a segment without a stripe count")?;
        let list = match seg.get("stripes") {
            Some(Value::List(l)) if l.len() as u64 == 2 * stripes => l,
            _ => return Err("a segment whose stripes are not readable".into()),
        };
        if !count.is_multiple_of(stripes) {
            return Err(format!("{count} extents do not divide into {stripes} stripes"));
        }
        let per_stripe = (count / stripes).checked_mul(self.extent).ok_or("its size overflows")?;
        let mut placed = Vec::new();
        for pair in list.chunks(2) {
            let (Value::Str(key), Some(first)) = (&pair[0], int_of(&pair[1])) else {
                return Err("a segment whose stripes are not readable".into());
            };
            let Some((uuid, room)) = self.here.get(key) else {
                return Err(format!(
                    "its extents are on a physical volume ({key}) that is not on the disks mounted (another disk, or one not backed up)"
                ));
            };
            let sector = first.checked_mul(self.extent).ok_or("its size overflows")?;
            if sector.checked_add(per_stripe).is_none_or(|end| end > *room) {
                return Err("its metadata places it beyond the end of the physical volume".into());
            }
            placed.push((uuid.clone(), sector));
        }
        if stripes == 1 {
            let (pv, sector) = placed.remove(0);
            return Ok(Target::Linear { pv, sector });
        }
        let chunk = seg.int("stripe_size").filter(|c| *c > 0).ok_or("a striped segment without a stripe size")?;
        Ok(Target::Striped { chunk, stripes: placed })
    }

    /// The mappings of thin pool `pool` (its metadata and data volumes, and the pool over
    /// them) added to `deps` once; the pool mapping's name.
    fn pool(&self, pool: &str, deps: &mut Vec<Mapping>, depth: usize) -> Result<String, String> {
        let mapping = format!("{pool}-tpool");
        if deps.iter().any(|m| m.name == mapping) {
            return Ok(mapping);
        }
        let lv = self.lvs.get(pool).ok_or_else(|| format!("its thin pool {pool} is not in the metadata"))?;
        let segs = segments(lv);
        let [(_, seg)] = segs.as_slice() else {
            return Err(format!("its thin pool {pool} has {} segments", segs.len()));
        };
        if seg.str("type") != Some("thin-pool") {
            return Err(format!("its thin pool {pool} is not one"));
        }
        let (Some(meta), Some(data)) = (seg.str("metadata"), seg.str("pool")) else {
            return Err(format!("its thin pool {pool} names no metadata or data volume"));
        };
        let block = seg.int("chunk_size").filter(|c| *c > 0).ok_or("a thin pool without a chunk size")?;
        self.need(meta, deps, depth + 1)?;
        self.need(data, deps, depth + 1)?;
        let len = deps.iter().find(|m| m.name == data).map_or(0, Mapping::sectors);
        let target = Target::ThinPool { meta: meta.to_owned(), data: data.to_owned(), block };
        deps.push(Mapping { name: mapping.clone(), lines: vec![Line { start: 0, len, target }] });
        Ok(mapping)
    }
}

fn int_of(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
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

    fn group(text: &str, size: u64) -> Result<Vec<LogicalVolume>, String> {
        volume_group(text, &BTreeMap::from([(UUID.to_owned(), size)])).map(|g| g.lvs)
    }

    fn lin(pv: &str, sector: u64) -> Target {
        Target::Linear { pv: pv.to_owned(), sector }
    }

    #[test]
    fn linear_volumes_are_byte_ranges_and_the_rest_are_mapped_or_say_why() {
        let size = 2048 * 512 + 30 * (4 << 20);
        let lvs = group(TEXT, size).unwrap();
        assert!(lvs.iter().all(|l| l.vg == "rhel"));
        assert!(!lvs.iter().any(|l| l.name == "hidden"), "hidden volumes are not listed");
        let mib4 = 4u64 << 20;
        let range = |offset, size| Placement::Range { pv: UUID.to_owned(), offset, size };
        // Offsets count from the volume's first extent (pe_start 1 MiB).
        assert_eq!(placement(&lvs, "root"), range(2 * mib4, 4 * mib4));
        // Two segments, one after the other on the volume: one piece.
        assert_eq!(placement(&lvs, "home"), range(8 * mib4, 3 * mib4));
        // Two pieces apart: a linear mapping of two lines.
        let e = 8192;
        let split = Mapping {
            name: "split".into(),
            lines: vec![
                Line { start: 0, len: e, target: lin(UUID, 20 * e) },
                Line { start: e, len: e, target: lin(UUID, 25 * e) },
            ],
        };
        assert_eq!(placement(&lvs, "split"), Placement::Mapped(vec![split]));
        let why = |n| match placement(&lvs, n) {
            Placement::NotMountable(w) => w,
            p => panic!("{n}: {p:?}"),
        };
        assert!(why("pool").contains("thin pool"), "{}", why("pool"));
        assert!(why("far").contains("(pv1) that is not on the disks mounted"), "{}", why("far"));
        assert!(why("huge").contains("beyond the end"), "{}", why("huge"));
    }

    /// Two physical volumes (pv0 here, pv1 on another disk) and every kind of volume.
    const KINDS: &str = r#"vg { id = "g" seqno = 9 extent_size = 8
physical_volumes {
pv0 { id = "AAAAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGGGG" pe_start = 2048 }
pv1 { id = "ZZZZZZ-BBBB-CCCC-DDDD-EEEE-FFFF-GGGGGG" pe_start = 4096 }
}
logical_volumes {
both { status = ["VISIBLE"]
segment1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1 stripes = ["pv0", 0] }
segment2 { start_extent = 2 extent_count = 2 type = "striped" stripe_count = 1 stripes = ["pv1", 5] } }
wide { status = ["VISIBLE"]
segment1 { start_extent = 0 extent_count = 4 type = "striped" stripe_count = 2 stripe_size = 128 stripes = ["pv0", 10, "pv1", 10] } }
pool { status = ["VISIBLE"] segment1 { start_extent = 0 extent_count = 8 type = "thin-pool" metadata = "pool_tmeta" pool = "pool_tdata" chunk_size = 128 } }
pool_tmeta { status = ["READ"] segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv0", 20] } }
pool_tdata { status = ["READ"] segment1 { start_extent = 0 extent_count = 8 type = "striped" stripe_count = 1 stripes = ["pv0", 21] } }
thin1 { status = ["VISIBLE"] segment1 { start_extent = 0 extent_count = 16 type = "thin" thin_pool = "pool" transaction_id = 1 device_id = 1 } }
mirrored { status = ["VISIBLE"] segment1 { start_extent = 0 extent_count = 2 type = "raid1" device_count = 2 region_size = 1024 raids = ["mirrored_rmeta_0", "mirrored_rimage_0", "mirrored_rmeta_1", "mirrored_rimage_1"] } }
mirrored_rimage_0 { status = ["READ"] segment1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1 stripes = ["pv0", 40] } }
origin { status = ["VISIBLE"] segment1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1 stripes = ["pv0", 50] } }
snap { status = ["READ"] segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv0", 52] } }
snapshot0 { status = ["READ", "VISIBLE"] segment1 { start_extent = 0 extent_count = 2 type = "snapshot" chunk_size = 8 origin = "origin" cow_store = "snap" } }
r5 { status = ["VISIBLE"] segment1 { start_extent = 0 extent_count = 2 type = "raid5" } }
}
}
"#;

    #[test]
    fn striped_thin_raid1_snapshot_and_spanning_volumes_are_mapped() {
        let other = "ZZZZZZBBBBCCCCDDDDEEEEFFFFGGGGGG".to_owned();
        let found = BTreeMap::from([(UUID.to_owned(), 64u64 << 20), (other.clone(), 64 << 20)]);
        let g = volume_group(KINDS, &found).unwrap();
        assert_eq!(g.pe_start, BTreeMap::from([(UUID.to_owned(), 2048 * 512), (other.clone(), 4096 * 512)]));
        let mapped = |n: &str| match placement(&g.lvs, n) {
            Placement::Mapped(m) => m,
            p => panic!("{n}: {p:?}"),
        };
        let both = mapped("both");
        assert_eq!(both.len(), 1);
        assert_eq!(both[0].lines[1], Line { start: 16, len: 16, target: lin(&other, 40) });
        let wide = mapped("wide");
        let stripes = vec![(UUID.to_owned(), 80), (other.clone(), 80)];
        assert_eq!(wide[0].lines, vec![Line { start: 0, len: 32, target: Target::Striped { chunk: 128, stripes } }]);
        let thin = mapped("thin1");
        let names: Vec<&str> = thin.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["pool_tmeta", "pool_tdata", "pool-tpool", "thin1"]);
        assert_eq!(thin[2].lines[0].len, 64, "the pool is as large as its data volume");
        assert_eq!(thin[3].lines[0].target, Target::Thin { pool: "pool-tpool".into(), id: 1 });
        let raid = mapped("mirrored");
        assert_eq!(raid[0].lines[0].target, lin(UUID, 320));
        assert_eq!(raid[1].lines[0].target, Target::Over { mapping: "mirrored_rimage_0".into(), sector: 0 });
        let snap = mapped("snap");
        let names: Vec<&str> = snap.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["snap-origin", "snap-cow", "snap"]);
        assert_eq!(snap[2].lines[0].len, 16, "a snapshot is as large as its origin");
        assert!(!g.lvs.iter().any(|l| l.name == "snapshot0"), "listed once, by the name users know");
        // The origin itself is a plain range.
        assert!(matches!(placement(&g.lvs, "origin"), Placement::Range { .. }));
        let why = |n| match placement(&g.lvs, n) {
            Placement::NotMountable(w) => w,
            p => panic!("{n}: {p:?}"),
        };
        assert!(why("r5").contains("a raid5 logical volume"), "{}", why("r5"));
        // Without the other disk: what stands on it says so, the rest still shows.
        let g = volume_group(KINDS, &BTreeMap::from([(UUID.to_owned(), 64u64 << 20)])).unwrap();
        let why = |n| match placement(&g.lvs, n) {
            Placement::NotMountable(w) => w,
            p => panic!("{n}: {p:?}"),
        };
        assert!(why("both").contains("(pv1) that is not on the disks mounted"), "{}", why("both"));
        assert!(why("wide").contains("(pv1)"), "{}", why("wide"));
        assert!(matches!(placement(&g.lvs, "thin1"), Placement::Mapped(_)));
    }

    #[test]
    fn another_physical_volume_of_the_group_is_said() {
        let e = volume_group(TEXT, &BTreeMap::from([("Z".repeat(32), 1 << 30)])).unwrap_err();
        assert!(e.contains("lists none of the physical volumes found"), "{e}");
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
            let root = Placement::Range { pv: UUID.to_owned(), offset: 2 * 4096, size: 4 * 4096 };
            assert_eq!(placement(&lvs, "root"), root);
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
            let _ = group(&text, 1 << 30);
            let _ = group(KINDS, 1 << 30);
            let mut v = volume(TEXT, false);
            let end = (at + bytes.len()).min(v.len());
            v[at..end].copy_from_slice(&bytes[..end - at]);
            let _ = read(&v);
        }

        #[test]
        fn cut_metadata_never_panics(cut in 0usize..TEXT.len()) {
            let _ = group(&TEXT[..cut], 1 << 30);
            let _ = group(&KINDS[..cut.min(KINDS.len())], 1 << 30);
        }
    }
}
