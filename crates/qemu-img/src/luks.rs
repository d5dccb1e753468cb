//! LUKS1 headers as QEMU writes them, read and changed without QEMU.
//!
//! Why: QEMU 7.2 times its PBKDF before it makes a keyslot or a master-key digest (about half a
//! second to a second of CPU each, whatever `iter-time` says), so every new encrypted file and
//! every keyslot changed by `qemu-img amend` costs seconds. A key rotation only changes
//! keyslots, and a new container only needs a header: both are a few hundred kilobytes of
//! bytes whose format is fixed (the LUKS1 on-disk format, which QEMU follows exactly). This
//! module makes them with a fixed iteration count ([`KEYSLOT_ITERATIONS`]) instead. The files
//! stay what stock QEMU and cryptsetup read: nothing here is a format of our own.
//!
//! Where the header is: at the start of a LUKS container ([`StoredLayout::Qcow2InLuks`]), or in
//! the clusters a qcow2's crypto header extension names ([`StoredLayout::Qcow2Luks`]). Key
//! material offsets are relative to the header's start in both.
//!
//! Only what QEMU makes is handled: `aes` in `xts-plain64` mode (a 256- or 512-bit key), with
//! `sha256` or `sha1`; anything else is refused, named.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use pbkdf2::pbkdf2_hmac;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use xts_mode::{Xts128, get_tweak_default};
use zeroize::Zeroizing;

use crate::be::be32;
use crate::stored::StoredLayout;

const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The partition header: magic to the last keyslot.
const PHDR_LEN: usize = 592;
const SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const STRIPES: u32 = 4000;
const SECTOR: u64 = 512;
const SALT_LEN: usize = 32;
const DIGEST_LEN: usize = 20;
/// Where QEMU puts the first keyslot's material, in sectors (4 KiB).
const HEADER_SECTORS: u64 = 8;
/// qcow2's header extension for the LUKS header.
pub(crate) const QCOW2_CRYPTO_EXT: u32 = 0x0537_be77;

/// The PBKDF2 iterations of a keyslot this module makes: a few milliseconds of one core here, about what `iter-time=20` gave the keyslots QEMU
/// made for earlier versions of nasbak (88 562 on this machine). A backup key is a random string of at least 32 characters;
/// stretching it buys nothing, while every open of every file of a chain pays it.
pub const KEYSLOT_ITERATIONS: u32 = 100_000;

/// The PBKDF2 iterations of a new header's master-key digest: LUKS1's minimum (QEMU's and
/// cryptsetup's). The digest only tells the right master key (512 random bits) from a wrong
/// one; stretching it would protect nothing, while every keyslot tried on every open pays it.
pub const DIGEST_ITERATIONS: u32 = 1000;

/// A LUKS header could not be read, opened or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LuksError {
    /// The file could not be read or written.
    #[error("could not {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no LUKS header this module reads.
    #[error("{path} has no LUKS header nasbak can read: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The key opens none of the file's keyslots.
    #[error("the key opens none of the keyslots of {path}")]
    WrongKey {
        /// The file.
        path: PathBuf,
    },
    /// A change that would leave the file with no keyslot, or no free keyslot for a new key.
    #[error("{path}: {detail}")]
    Slots {
        /// The file.
        path: PathBuf,
        /// What is in the way.
        detail: String,
    },
}

/// The hash LUKS derives keys and digests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha1,
}

impl Hash {
    fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Hash::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, rounds, out),
            Hash::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, rounds, out),
        }
    }

    fn digest_len(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha1 => 20,
        }
    }

    /// `H(be32(index) || block)`, the anti-forensic splitter's diffusion step.
    fn hash_block(self, index: u32, block: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => Sha256::new().chain_update(index.to_be_bytes()).chain_update(block).finalize().to_vec(),
            Hash::Sha1 => Sha1::new().chain_update(index.to_be_bytes()).chain_update(block).finalize().to_vec(),
        }
    }

    /// The splitter's diffusion of `block`, in place.
    fn diffuse(self, block: &mut [u8]) {
        let size = self.digest_len();
        for (i, chunk) in block.chunks_mut(size).enumerate() {
            let hashed = self.hash_block(i as u32, chunk);
            let n = chunk.len();
            chunk.copy_from_slice(&hashed[..n]);
        }
    }
}

/// One keyslot of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    active: bool,
    iterations: u32,
    salt: [u8; SALT_LEN],
    /// Where its key material starts, in sectors from the header's start.
    offset: u32,
    stripes: u32,
}

/// A LUKS1 partition header (the part before the key material).
#[derive(Clone, PartialEq, Eq)]
struct Header {
    bytes: [u8; PHDR_LEN],
    hash: Hash,
    key_bytes: usize,
    slots: Vec<Slot>,
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header").field("hash", &self.hash).field("key_bytes", &self.key_bytes).finish_non_exhaustive()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
}

impl Header {
    fn parse(bytes: [u8; PHDR_LEN]) -> Result<Self, String> {
        if bytes[..6] != MAGIC {
            return Err("no LUKS magic".into());
        }
        let version = u16::from_be_bytes([bytes[6], bytes[7]]);
        if version != 1 {
            return Err(format!("LUKS version {version} (only version 1, which QEMU writes, is read)"));
        }
        let (cipher, mode, hash) = (text(&bytes[8..40]), text(&bytes[40..72]), text(&bytes[72..104]));
        let key_bytes = be32(&bytes, 108) as usize;
        if cipher != "aes" || mode != "xts-plain64" || !(key_bytes == 32 || key_bytes == 64) {
            return Err(format!(
                "cipher {cipher}-{mode} with a {}-bit key (aes-xts-plain64 with a 256- or 512-bit key is read)",
                key_bytes * 8
            ));
        }
        let hash = match hash.as_str() {
            "sha256" => Hash::Sha256,
            "sha1" => Hash::Sha1,
            other => return Err(format!("hash {other} (sha256 or sha1 is read)")),
        };
        let slots = (0..SLOTS)
            .map(|i| {
                let s = &bytes[208 + i * 48..208 + (i + 1) * 48];
                Slot {
                    active: be32(s, 0) == SLOT_ACTIVE,
                    iterations: be32(s, 4),
                    salt: s[8..40].try_into().expect("32 bytes"),
                    offset: be32(s, 40),
                    stripes: be32(s, 44),
                }
            })
            .collect::<Vec<_>>();
        if let Some(s) = slots.iter().find(|s| s.stripes != STRIPES) {
            return Err(format!("a keyslot with {} stripes ({STRIPES} expected)", s.stripes));
        }
        let header = Header { bytes, hash, key_bytes, slots };
        let material = (header.material_len() as u64).div_ceil(SECTOR);
        if let Some(s) =
            header.slots.iter().find(|s| u64::from(s.offset) + material > u64::from(header.payload_sectors()))
        {
            return Err(format!("a keyslot at sector {} runs into the payload", s.offset));
        }
        Ok(header)
    }

    fn payload_sectors(&self) -> u32 {
        be32(&self.bytes, 104)
    }

    fn material_len(&self) -> usize {
        self.key_bytes * STRIPES as usize
    }

    /// Writes the keyslots back into the header's bytes.
    fn store_slots(&mut self) {
        for (i, s) in self.slots.iter().enumerate() {
            let b = &mut self.bytes[208 + i * 48..208 + (i + 1) * 48];
            b[0..4].copy_from_slice(&if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE }.to_be_bytes());
            b[4..8].copy_from_slice(&s.iterations.to_be_bytes());
            b[8..40].copy_from_slice(&s.salt);
            b[40..44].copy_from_slice(&s.offset.to_be_bytes());
            b[44..48].copy_from_slice(&s.stripes.to_be_bytes());
        }
    }

    /// Whether `key` is the master key the header's digest stands for.
    fn is_master_key(&self, key: &[u8]) -> bool {
        let mut digest = [0u8; DIGEST_LEN];
        self.hash.pbkdf2(key, &self.bytes[132..164], be32(&self.bytes, 164), &mut digest);
        digest[..] == self.bytes[112..132]
    }
}

/// Encrypts (or decrypts) key material with the key derived from a passphrase: AES-XTS, 512-byte
/// sectors numbered from 0, the IV the sector's number (`plain64`).
fn xts(key: &[u8], data: &mut [u8], encrypt: bool) {
    let half = key.len() / 2;
    macro_rules! run {
        ($cipher:ty) => {{
            let xts = Xts128::<$cipher>::new(
                <$cipher>::new_from_slice(&key[..half]).expect("an AES key"),
                <$cipher>::new_from_slice(&key[half..]).expect("an AES key"),
            );
            if encrypt {
                xts.encrypt_area(data, SECTOR as usize, 0, get_tweak_default);
            } else {
                xts.decrypt_area(data, SECTOR as usize, 0, get_tweak_default);
            }
        }};
    }
    if half == 32 { run!(Aes256) } else { run!(Aes128) }
}

/// The anti-forensic merge: the master key from its `stripes` stripes.
fn af_merge(hash: Hash, material: &[u8], key_bytes: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_bytes]);
    let stripes: Vec<&[u8]> = material.chunks(key_bytes).collect();
    let (last, rest) = stripes.split_last().expect("stripes");
    for stripe in rest {
        d.iter_mut().zip(*stripe).for_each(|(a, b)| *a ^= b);
        hash.diffuse(&mut d);
    }
    d.iter_mut().zip(*last).for_each(|(a, b)| *a ^= b);
    d
}

/// The anti-forensic split of `key` into [`STRIPES`] stripes, all but the last random.
fn af_split(hash: Hash, key: &[u8]) -> Result<Zeroizing<Vec<u8>>, getrandom::Error> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * STRIPES as usize]);
    getrandom::fill(&mut out[..n * (STRIPES as usize - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; n]);
    for stripe in out[..n * (STRIPES as usize - 1)].chunks(n) {
        d.iter_mut().zip(stripe).for_each(|(a, b)| *a ^= b);
        hash.diffuse(&mut d);
    }
    let last = &mut out[n * (STRIPES as usize - 1)..];
    last.iter_mut().zip(key).zip(d.iter()).for_each(|((o, k), x)| *o = k ^ x);
    Ok(out)
}

/// A file's master key, opened with a passphrase; zeroed when dropped.
pub struct MasterKey {
    key: Zeroizing<Vec<u8>>,
    /// The keyslot the passphrase opened.
    slot: usize,
}

impl MasterKey {
    /// The keyslot the passphrase opened.
    pub fn slot(&self) -> usize {
        self.slot
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey").field("slot", &self.slot).finish_non_exhaustive()
    }
}

impl MasterKey {
    /// The cipher of the data this key encrypts (aes-xts-plain64, 512-byte sectors).
    pub fn data_cipher(&self) -> DataCipher {
        let half = self.key.len() / 2;
        let (k1, k2) = (&self.key[..half], &self.key[half..]);
        match half {
            32 => DataCipher::Aes256(
                Box::new(Aes256::new_from_slice(k1).expect("an AES-256 key")),
                Box::new(Aes256::new_from_slice(k2).expect("an AES-256 key")),
            ),
            _ => DataCipher::Aes128(
                Box::new(Aes128::new_from_slice(k1).expect("an AES-128 key")),
                Box::new(Aes128::new_from_slice(k2).expect("an AES-128 key")),
            ),
        }
    }
}

/// The data cipher of a LUKS file (aes-xts-plain64, 512-byte sectors, the IV a sector's number),
/// decrypting whole sectors with the CPU's parallel AES: the tweaks of a sector's 32 blocks are
/// computed first and the blocks decrypted together, where a block-by-block XTS decrypts one at
/// a time. Shared by the threads of a restore; its round keys are wiped when it drops (the
/// `aes` crate's `zeroize` feature).
pub enum DataCipher {
    /// A 256-bit XTS key (two AES-128 keys).
    Aes128(Box<Aes128>, Box<Aes128>),
    /// A 512-bit XTS key (two AES-256 keys), what QEMU and nasbak make.
    Aes256(Box<Aes256>, Box<Aes256>),
}

impl std::fmt::Debug for DataCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataCipher::Aes128(..) => "DataCipher(aes-128-xts)",
            DataCipher::Aes256(..) => "DataCipher(aes-256-xts)",
        })
    }
}

impl DataCipher {
    /// Decrypts `data` (whole 512-byte sectors) in place, its first sector numbered `sector`.
    pub fn decrypt(&self, data: &mut [u8], sector: u64) {
        match self {
            DataCipher::Aes128(k1, k2) => xts_decrypt(k1.as_ref(), k2.as_ref(), data, sector),
            DataCipher::Aes256(k1, k2) => xts_decrypt(k1.as_ref(), k2.as_ref(), data, sector),
        }
    }

    /// Encrypts `data` (whole 512-byte sectors) in place, its first sector numbered `sector`
    /// (the encoder's, see the `encode` module).
    pub fn encrypt(&self, data: &mut [u8], sector: u64) {
        match self {
            DataCipher::Aes128(k1, k2) => xts_encrypt(k1.as_ref(), k2.as_ref(), data, sector),
            DataCipher::Aes256(k1, k2) => xts_encrypt(k1.as_ref(), k2.as_ref(), data, sector),
        }
    }
}

/// AES-128 or AES-256: a 16-byte block cipher.
trait AesCipher:
    aes::cipher::BlockEncrypt + aes::cipher::BlockDecrypt + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>
{
}

impl AesCipher for Aes128 {}
impl AesCipher for Aes256 {}

/// The 32 tweaks of one sector's blocks: the sector number encrypted with the second key, then
/// each multiplied by x in GF(2^128) (little-endian, as XTS says).
fn sector_tweaks<C: AesCipher>(k2: &C, sector: u64) -> [[u8; 16]; 32] {
    let mut t = aes::Block::default();
    t[..8].copy_from_slice(&sector.to_le_bytes());
    k2.encrypt_block(&mut t);
    let mut tweaks = [[0u8; 16]; 32];
    let mut cur = u128::from_le_bytes(t.into());
    for tw in &mut tweaks {
        *tw = cur.to_le_bytes();
        let carry = cur >> 127;
        cur = (cur << 1) ^ (carry * 0x87);
    }
    tweaks
}

fn xts_decrypt<C: AesCipher>(k1: &C, k2: &C, data: &mut [u8], first: u64) {
    xts_run(k2, data, first, |blocks| k1.decrypt_blocks(blocks));
}

fn xts_encrypt<C: AesCipher>(k1: &C, k2: &C, data: &mut [u8], first: u64) {
    xts_run(k2, data, first, |blocks| k1.encrypt_blocks(blocks));
}

/// XTS over whole sectors: each block XORed with its tweak, `cipher` over the sector's blocks
/// at once, XORed again.
fn xts_run<C: AesCipher>(k2: &C, data: &mut [u8], first: u64, cipher: impl Fn(&mut [aes::Block])) {
    assert!(data.len().is_multiple_of(SECTOR as usize), "XTS over whole 512-byte sectors");
    let mut blocks = [aes::Block::default(); 32];
    for (i, sector) in data.chunks_exact_mut(SECTOR as usize).enumerate() {
        let tweaks = sector_tweaks(k2, first + i as u64);
        for ((b, chunk), tw) in blocks.iter_mut().zip(sector.chunks_exact(16)).zip(&tweaks) {
            for j in 0..16 {
                b[j] = chunk[j] ^ tw[j];
            }
        }
        cipher(&mut blocks);
        for ((b, chunk), tw) in blocks.iter().zip(sector.chunks_exact_mut(16)).zip(&tweaks) {
            for j in 0..16 {
                chunk[j] = b[j] ^ tw[j];
            }
        }
    }
}

/// The LUKS header of one file, read.
#[derive(Debug)]
pub struct LuksFile {
    path: PathBuf,
    /// Where the header starts in the file.
    base: u64,
    header: Header,
}

fn random(path: &Path, buf: &mut [u8]) -> Result<(), LuksError> {
    getrandom::fill(buf).map_err(|e| LuksError::Io {
        action: "draw random bytes for",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}

impl LuksFile {
    /// Reads the LUKS header of `path`, laid out as `layout` says.
    pub fn open(path: &Path, layout: StoredLayout) -> Result<Self, LuksError> {
        let io = |action| move |source| LuksError::Io { action, path: path.to_owned(), source };
        let format = |detail: String| LuksError::Format { path: path.to_owned(), detail };
        let file = File::open(path).map_err(io("open"))?;
        let base = match layout {
            StoredLayout::Qcow2InLuks => 0,
            StoredLayout::Qcow2Luks => qcow2_crypto_header(&file).map_err(io("read"))?.ok_or_else(|| {
                format("its qcow2 header has no crypto header extension (it is not a LUKS-encrypted qcow2)".into())
            })?,
            StoredLayout::Qcow2 => return Err(format("it is a plain qcow2".into())),
        };
        let mut bytes = [0u8; PHDR_LEN];
        file.read_exact_at(&mut bytes, base).map_err(io("read"))?;
        let header = Header::parse(bytes).map_err(format)?;
        Ok(LuksFile { path: path.to_owned(), base, header })
    }

    /// Where the LUKS header (the partition header and every keyslot's material) lies in the
    /// file: its offset and length. Changing keys changes nothing outside it.
    pub fn region(&self) -> (u64, u64) {
        (self.base, u64::from(self.header.payload_sectors()) * SECTOR)
    }

    /// How many keyslots hold a key.
    pub fn active_slots(&self) -> usize {
        self.header.slots.iter().filter(|s| s.active).count()
    }

    /// The master key, if `passphrase` opens one of the keyslots.
    pub fn unlock(&self, passphrase: &[u8]) -> Result<Option<MasterKey>, LuksError> {
        let file = File::open(&self.path).map_err(|source| self.io("open", source))?;
        let h = &self.header;
        for (i, slot) in h.slots.iter().enumerate().filter(|(_, s)| s.active) {
            let mut derived = Zeroizing::new(vec![0u8; h.key_bytes]);
            h.hash.pbkdf2(passphrase, &slot.salt, slot.iterations, &mut derived);
            let mut material = Zeroizing::new(vec![0u8; h.material_len()]);
            file.read_exact_at(&mut material, self.base + u64::from(slot.offset) * SECTOR)
                .map_err(|source| self.io("read", source))?;
            xts(&derived, &mut material, false);
            let key = af_merge(h.hash, &material, h.key_bytes);
            if h.is_master_key(&key) {
                return Ok(Some(MasterKey { key, slot: i }));
            }
        }
        Ok(None)
    }

    /// Adds `passphrase` in a free keyslot, for the master key `key` (from [`LuksFile::unlock`]).
    /// The key material is written and synced before the slot is marked active, so a kill
    /// between the two leaves the header as it was.
    pub fn add(&mut self, key: &MasterKey, passphrase: &[u8]) -> Result<(), LuksError> {
        let Some(free) = self.header.slots.iter().position(|s| !s.active) else {
            return Err(LuksError::Slots { path: self.path.clone(), detail: "no keyslot is free".into() });
        };
        let h = &self.header;
        let mut salt = [0u8; SALT_LEN];
        random(&self.path, &mut salt)?;
        let mut derived = Zeroizing::new(vec![0u8; h.key_bytes]);
        h.hash.pbkdf2(passphrase, &salt, KEYSLOT_ITERATIONS, &mut derived);
        let mut material =
            af_split(h.hash, &key.key).map_err(|e| self.io("split a key for", std::io::Error::other(e.to_string())))?;
        xts(&derived, &mut material, true);
        let offset = h.slots[free].offset;
        let file = self.writable()?;
        file.write_all_at(&material, self.base + u64::from(offset) * SECTOR).map_err(|e| self.io("write", e))?;
        file.sync_data().map_err(|e| self.io("sync", e))?;
        let slot = &mut self.header.slots[free];
        (slot.active, slot.iterations, slot.salt) = (true, KEYSLOT_ITERATIONS, salt);
        self.write_header(&file)
    }

    /// Removes the keyslot `key` was opened with (see [`LuksFile::remove_slot`]).
    pub fn remove(&mut self, key: &MasterKey) -> Result<(), LuksError> {
        self.remove_slot(key.slot)
    }

    /// Removes the keyslot `slot`: marked inactive (synced), then its material overwritten with
    /// random bytes. An inactive slot is left as it is; the file's last keyslot is never removed.
    pub fn remove_slot(&mut self, slot: usize) -> Result<(), LuksError> {
        if !self.header.slots.get(slot).is_some_and(|s| s.active) {
            return Ok(());
        }
        if self.active_slots() < 2 {
            return Err(LuksError::Slots {
                path: self.path.clone(),
                detail: "removing its only keyslot would leave it unreadable".into(),
            });
        }
        let file = self.writable()?;
        let slot = &mut self.header.slots[slot];
        (slot.active, slot.iterations, slot.salt) = (false, 0, [0; SALT_LEN]);
        let offset = slot.offset;
        self.write_header(&file)?;
        let mut noise = vec![0u8; self.header.material_len()];
        random(&self.path, &mut noise)?;
        file.write_all_at(&noise, self.base + u64::from(offset) * SECTOR).map_err(|e| self.io("write", e))?;
        file.sync_data().map_err(|e| self.io("sync", e))
    }

    fn writable(&self) -> Result<File, LuksError> {
        OpenOptions::new().write(true).open(&self.path).map_err(|e| self.io("open for writing", e))
    }

    fn write_header(&mut self, file: &File) -> Result<(), LuksError> {
        self.header.store_slots();
        file.write_all_at(&self.header.bytes, self.base).map_err(|e| self.io("write", e))?;
        file.sync_data().map_err(|e| self.io("sync", e))
    }

    fn io(&self, action: &'static str, source: std::io::Error) -> LuksError {
        LuksError::Io { action, path: self.path.clone(), source }
    }
}

/// Where the LUKS header of a LUKS-encrypted qcow2 starts (its crypto header extension), or
/// `None` when the file is a qcow2 without one; an error when it is not a qcow2.
fn qcow2_crypto_header(file: &File) -> std::io::Result<Option<u64>> {
    let mut head = [0u8; 104];
    file.read_exact_at(&mut head, 0)?;
    if head[..4] != *b"QFI\xfb" {
        return Err(std::io::Error::other("it is not a qcow2 file"));
    }
    let version = be32(&head, 4);
    let start = if version >= 3 { u64::from(be32(&head, 100)) } else { 72 };
    let cluster = 1u64 << be32(&head, 20).min(21);
    let mut at = start;
    while at + 8 <= cluster {
        let mut ext = [0u8; 8];
        file.read_exact_at(&mut ext, at)?;
        let (kind, len) = (be32(&ext, 0), u64::from(be32(&ext, 4)));
        if kind == 0 {
            return Ok(None);
        }
        if kind == QCOW2_CRYPTO_EXT && len >= 16 {
            let mut data = [0u8; 8];
            file.read_exact_at(&mut data, at + 8)?;
            return Ok(Some(u64::from_be_bytes(data)));
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(None)
}

/// The sectors of one keyslot's material, aligned as QEMU (and cryptsetup) align it.
fn split_key_sectors(key_bytes: usize) -> u64 {
    let sectors = (key_bytes as u64 * u64::from(STRIPES)).div_ceil(SECTOR);
    sectors.div_ceil(HEADER_SECTORS) * HEADER_SECTORS
}

/// The bytes a LUKS header with eight keyslots of a 512-bit key takes before the payload, as
/// QEMU lays it out.
pub fn header_len() -> u64 {
    (HEADER_SECTORS + SLOTS as u64 * split_key_sectors(64)) * SECTOR
}

/// A new LUKS header (aes-256 xts-plain64, sha256, laid out as QEMU lays it out) for the file
/// `path` at `base`, its first keyslot holding `passphrase`, written into `file`; its master key
/// (new, random) given back.
pub(crate) fn write_new_header(file: &File, path: &Path, base: u64, passphrase: &[u8]) -> Result<MasterKey, LuksError> {
    let hash = Hash::Sha256;
    let key_bytes = 64usize;
    let mut master = Zeroizing::new(vec![0u8; key_bytes]);
    random(path, &mut master)?;
    let mut b = [0u8; PHDR_LEN];
    b[..6].copy_from_slice(&MAGIC);
    b[6..8].copy_from_slice(&1u16.to_be_bytes());
    b[8..11].copy_from_slice(b"aes");
    b[40..51].copy_from_slice(b"xts-plain64");
    b[72..78].copy_from_slice(b"sha256");
    let split = split_key_sectors(key_bytes);
    b[104..108].copy_from_slice(&((header_len() / SECTOR) as u32).to_be_bytes());
    b[108..112].copy_from_slice(&(key_bytes as u32).to_be_bytes());
    let mut salt = [0u8; SALT_LEN];
    random(path, &mut salt)?;
    b[132..164].copy_from_slice(&salt);
    b[164..168].copy_from_slice(&DIGEST_ITERATIONS.to_be_bytes());
    let mut digest = [0u8; DIGEST_LEN];
    hash.pbkdf2(&master, &salt, DIGEST_ITERATIONS, &mut digest);
    b[112..132].copy_from_slice(&digest);
    let uuid = uuid::Uuid::new_v4().hyphenated().to_string();
    b[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
    for i in 0..SLOTS {
        let s = &mut b[208 + i * 48..208 + (i + 1) * 48];
        s[0..4].copy_from_slice(&SLOT_INACTIVE.to_be_bytes());
        s[40..44].copy_from_slice(&((HEADER_SECTORS + i as u64 * split) as u32).to_be_bytes());
        s[44..48].copy_from_slice(&STRIPES.to_be_bytes());
    }
    let header = Header::parse(b).map_err(|detail| LuksError::Format { path: path.to_owned(), detail })?;
    let mut luks = LuksFile { path: path.to_owned(), base, header };
    luks.write_header(file)?;
    let key = MasterKey { key: master, slot: 0 };
    luks.add(&key, passphrase)?;
    Ok(key)
}

/// Creates (or replaces) `path` as a sparse LUKS container (QEMU's `luks` format, aes-256
/// xts-plain64, sha256) with a payload of `payload` bytes, one keyslot holding `passphrase`,
/// laid out as QEMU lays it out (so `qemu-img` and cryptsetup read it), without QEMU's PBKDF
/// timing. The payload is left unwritten: what it holds is for the caller to write through
/// QEMU's `luks` driver.
pub fn create_container(path: &Path, payload: u64, passphrase: &[u8]) -> Result<(), LuksError> {
    let io = |action| move |source| LuksError::Io { action, path: path.to_owned(), source };
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io("create"))?;
    file.set_len(header_len() + payload).map_err(io("size"))?;
    write_new_header(&file, path, 0, passphrase)?;
    file.sync_all().map_err(io("sync"))
}

/// qcow2's header extension naming the backing file's format.
pub(crate) const QCOW2_BACKING_FORMAT_EXT: u32 = 0xe279_2aca;
const QCOW2_CLUSTER_BITS: u32 = 16;

/// Creates (or replaces) `path` as an empty qcow2 (version 3, 64 KiB clusters) of `size` bytes
/// with built-in LUKS encryption (`encrypt.format=luks`, aes-256 xts-plain64, sha256), one
/// keyslot holding `passphrase`, its header naming `backing` (its name, as written into the
/// header, and its format) when given. The layout is the one `qemu-img create -f qcow2 -o
/// encrypt.format=luks` makes: header, refcount table, refcount block, L1 table, then the LUKS
/// header's clusters; without QEMU's PBKDF timing.
pub fn create_encrypted_qcow2(
    path: &Path,
    size: u64,
    backing: Option<(&str, &crate::ImageFormat)>,
    passphrase: &[u8],
) -> Result<(), LuksError> {
    let io = |action| move |source| LuksError::Io { action, path: path.to_owned(), source };
    let cs = 1u64 << QCOW2_CLUSTER_BITS;
    // One L1 entry maps one L2 table's worth: 8192 clusters of 64 KiB.
    let l1_size = size.div_ceil(cs * (cs / 8));
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let luks_clusters = header_len().div_ceil(cs);
    let luks_at = (3 + l1_clusters) * cs;
    let clusters = 3 + l1_clusters + luks_clusters;
    // One refcount block of 16-bit counts covers 32768 clusters; the header extension area
    // holds a backing name of up to 1023 bytes, as QEMU's.
    let too = |detail: String| LuksError::Format { path: path.to_owned(), detail };
    if clusters > cs / 2 || l1_size > u64::from(u32::MAX) {
        return Err(too(format!("a virtual size of {size} bytes is more than an encrypted qcow2 nasbak makes holds")));
    }
    if backing.is_some_and(|(b, _)| b.is_empty() || b.len() > 1023) {
        return Err(too("a backing file name must have 1 to 1023 bytes".into()));
    }
    let backing_format = backing.map(|(_, f)| f.to_string());
    if backing_format.as_ref().is_some_and(|f| f.is_empty() || f.len() > 16) {
        return Err(too(format!("a backing format of 1 to 16 bytes, not {backing_format:?}")));
    }
    let mut head = vec![0u8; 4096];
    let put32 = |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    head[..4].copy_from_slice(b"QFI\xfb");
    put32(&mut head, 4, 3);
    put32(&mut head, 20, QCOW2_CLUSTER_BITS);
    put64(&mut head, 24, size);
    put32(&mut head, 32, 2); // crypt_method: LUKS
    put32(&mut head, 36, l1_size as u32);
    put64(&mut head, 40, 3 * cs); // L1 table
    put64(&mut head, 48, cs); // refcount table
    put32(&mut head, 56, 1);
    put32(&mut head, 96, 4); // refcount_order: 16-bit
    put32(&mut head, 100, 112); // header_length (compression_type 0, zlib, at 104)
    let mut at = 112;
    if let Some(format) = &backing_format {
        // The extension's data padded to 8 bytes.
        put32(&mut head, at, QCOW2_BACKING_FORMAT_EXT);
        put32(&mut head, at + 4, format.len() as u32);
        head[at + 8..at + 8 + format.len()].copy_from_slice(format.as_bytes());
        at += 8 + format.len().next_multiple_of(8);
    }
    put32(&mut head, at, QCOW2_CRYPTO_EXT);
    put32(&mut head, at + 4, 16);
    put64(&mut head, at + 8, luks_at);
    put64(&mut head, at + 16, header_len());
    at += 24 + 8; // the extension, then the end marker (zeroes)
    if let Some((b, _)) = backing {
        put64(&mut head, 8, at as u64);
        put32(&mut head, 16, b.len() as u32);
        head[at..at + b.len()].copy_from_slice(b.as_bytes());
    }
    let mut refcounts = vec![0u8; (clusters * 2) as usize];
    refcounts.chunks_mut(2).for_each(|c| c.copy_from_slice(&1u16.to_be_bytes()));
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io("create"))?;
    file.set_len(clusters * cs).map_err(io("size"))?;
    file.write_all_at(&(2 * cs).to_be_bytes(), cs).map_err(io("write"))?;
    file.write_all_at(&refcounts, 2 * cs).map_err(io("write"))?;
    write_new_header(&file, path, luks_at, passphrase)?;
    // The qcow2 header last: until it is written, the file is no qcow2 at all.
    file.write_all_at(&head, 0).map_err(io("write"))?;
    file.sync_all().map_err(io("sync"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_splitter_merges_back_to_the_key_and_the_stripes_differ_each_time() {
        for hash in [Hash::Sha256, Hash::Sha1] {
            let key: Vec<u8> = (0..64u8).collect();
            let a = af_split(hash, &key).unwrap();
            let b = af_split(hash, &key).unwrap();
            assert_ne!(a, b);
            assert_eq!(*af_merge(hash, &a, 64), key);
            assert_eq!(*af_merge(hash, &b, 64), key);
            // One flipped bit anywhere in the material loses the key.
            let mut c = a.clone();
            c[1234] ^= 1;
            assert_ne!(*af_merge(hash, &c, 64), key);
        }
    }

    #[test]
    fn the_batched_data_cipher_is_the_xts_of_the_xts_crate_for_both_key_sizes() {
        for key_bytes in [32usize, 64] {
            let key: Vec<u8> = (0..key_bytes as u8).map(|b| b.wrapping_mul(37)).collect();
            let master = MasterKey { key: Zeroizing::new(key.clone()), slot: 0 };
            let cipher = master.data_cipher();
            let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 512) as u8).collect();
            // The reference: xts-mode, sector by sector, with the tweak of each sector's number.
            let half = key_bytes / 2;
            let mut expected = plain.clone();
            macro_rules! reference {
                ($c:ty) => {
                    Xts128::<$c>::new(
                        <$c>::new_from_slice(&key[..half]).unwrap(),
                        <$c>::new_from_slice(&key[half..]).unwrap(),
                    )
                    .encrypt_area(&mut expected, 512, 1_000_003, get_tweak_default)
                };
            }
            if half == 32 {
                reference!(Aes256)
            } else {
                reference!(Aes128)
            }
            let mut data = plain.clone();
            cipher.encrypt(&mut data, 1_000_003);
            assert_eq!(data, expected, "{key_bytes}-byte key");
            cipher.decrypt(&mut data, 1_000_003);
            assert_eq!(data, plain);
        }
    }

    #[test]
    fn xts_round_trips_and_each_sector_is_tweaked() {
        let key = [7u8; 64];
        let mut data = vec![0u8; 2048];
        xts(&key, &mut data, true);
        assert_ne!(data[..512], data[512..1024], "two zero sectors encrypt differently");
        xts(&key, &mut data, false);
        assert!(data.iter().all(|b| *b == 0));
    }

    #[test]
    fn a_container_opens_with_its_passphrase_only_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.luks");
        create_container(&path, 1 << 20, b"first passphrase of 32 bytes....").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), header_len() + (1 << 20));
        let mut luks = LuksFile::open(&path, StoredLayout::Qcow2InLuks).unwrap();
        assert_eq!(luks.active_slots(), 1);
        assert_eq!(luks.region(), (0, header_len()));
        assert!(luks.unlock(b"another passphrase").unwrap().is_none());
        let key = luks.unlock(b"first passphrase of 32 bytes....").unwrap().unwrap();
        luks.add(&key, b"second").unwrap();
        let reread = LuksFile::open(&path, StoredLayout::Qcow2InLuks).unwrap();
        assert_eq!(reread.active_slots(), 2);
        let second = reread.unlock(b"second").unwrap().unwrap();
        assert_eq!(second.slot, 1);
        assert_eq!(*second.key, *key.key);
        luks.remove(&key).unwrap();
        let reread = LuksFile::open(&path, StoredLayout::Qcow2InLuks).unwrap();
        assert!(reread.unlock(b"first passphrase of 32 bytes....").unwrap().is_none());
        let mut last = reread;
        let k = last.unlock(b"second").unwrap().unwrap();
        assert!(matches!(last.remove(&k), Err(LuksError::Slots { .. })));
    }

    #[test]
    fn what_is_not_a_luks_header_is_refused_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let e = LuksFile::open(&path, StoredLayout::Qcow2InLuks).unwrap_err();
        assert!(e.to_string().contains("no LUKS magic") || e.to_string().contains(&path.display().to_string()));
        let e = LuksFile::open(&path, StoredLayout::Qcow2Luks).unwrap_err();
        assert!(e.to_string().contains("x"), "{e}");
    }

    #[test]
    fn the_header_layout_is_qemus() {
        // QEMU 7.2 puts 8 keyslots of 504 sectors after 8 sectors of header: 4040 sectors.
        assert_eq!(split_key_sectors(64), 504);
        assert_eq!(header_len(), 4040 * 512);
    }
}
