//! A small NBD client over a Unix socket: the fixed-newstyle handshake, structured replies,
//! metadata contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`), block status, and reads
//! with several requests in flight.
//!
//! Why our own: nasbak reads a running VM's disks from libvirt's pull-mode backup export (QEMU's
//! NBD server) and encodes them itself (see the `encode` module). That needs the export's block
//! status, an incremental's dirty bitmap included, which neither `qemu-img convert` nor a
//! qemu-storage-daemon job copies by. The protocol subset QEMU's server speaks is small and
//! fixed, and a few hundred lines keep the dependency tree free of C bindings.
//!
//! Nothing waits without a bound: every read and write on the socket has the client's timeout,
//! after which the call fails with [`NbdError::Io`] (`TimedOut` or `WouldBlock`).

use crate::be::{be16, be32, be64};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// The most a request asks for: QEMU's server refuses more than 32 MiB.
pub const MAX_REQUEST: u32 = 32 << 20;
/// `base:allocation`: the range is a hole (unallocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the range is dirty.
pub const STATE_DIRTY: u32 = 1;
/// The allocation context every NBD server has.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Why an NBD exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// Connecting, reading or writing the socket failed (a timeout included).
    #[error("NBD server at {socket}: {action}: {source}")]
    Io {
        /// The server's socket.
        socket: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server said something this client does not take, or refused a request.
    #[error("NBD server at {socket}: {detail}")]
    Protocol {
        /// The server's socket.
        socket: PathBuf,
        /// What it said.
        detail: String,
    },
}

/// One range of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Where it starts in the export.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
    /// The context's flags for it ([`STATE_HOLE`], [`STATE_ZERO`], [`STATE_DIRTY`]).
    pub flags: u32,
}

/// A connection to one export, in its transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    socket: PathBuf,
    stream: UnixStream,
    size: u64,
    /// The contexts the server agreed to, by id.
    contexts: Vec<(u32, String)>,
    next_cookie: u64,
}

impl NbdClient {
    /// Connects to the export `export` of the server at `socket`, asking for the metadata
    /// `contexts` (each must be granted), every socket operation bounded by `timeout`.
    pub fn connect(socket: &Path, export: &str, contexts: &[&str], timeout: Duration) -> Result<Self, NbdError> {
        let io = |action| move |source| NbdError::Io { socket: socket.to_owned(), action, source };
        let stream = UnixStream::connect(socket).map_err(io("connect"))?;
        stream.set_read_timeout(Some(timeout)).map_err(io("set a timeout"))?;
        stream.set_write_timeout(Some(timeout)).map_err(io("set a timeout"))?;
        let mut c = NbdClient { socket: socket.to_owned(), stream, size: 0, contexts: Vec::new(), next_cookie: 1 };
        c.handshake(export, contexts)?;
        Ok(c)
    }

    fn protocol(&self, detail: String) -> NbdError {
        NbdError::Protocol { socket: self.socket.clone(), detail }
    }

    fn read_exact(&mut self, buf: &mut [u8], action: &'static str) -> Result<(), NbdError> {
        let socket = &self.socket;
        self.stream.read_exact(buf).map_err(|source| NbdError::Io { socket: socket.clone(), action, source })
    }

    fn write_all(&mut self, buf: &[u8], action: &'static str) -> Result<(), NbdError> {
        let socket = &self.socket;
        self.stream.write_all(buf).map_err(|source| NbdError::Io { socket: socket.clone(), action, source })
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.write_all(&m, "sending an option")
    }

    /// One option reply: its type and data.
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut h = [0u8; 20];
        self.read_exact(&mut h, "reading an option reply")?;
        if be64(&h, 0) != REPLY_MAGIC || be32(&h, 8) != option {
            return Err(self.protocol(format!("an option reply that is not one to option {option}")));
        }
        let (kind, len) = (be32(&h, 12), be32(&h, 16));
        if len > 1 << 20 {
            return Err(self.protocol(format!("an option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data, "reading an option reply")?;
        if kind & (1 << 31) != 0 {
            let text = String::from_utf8_lossy(&data).into_owned();
            return Err(self.protocol(format!(
                "option {option} refused (error {:#x}){}",
                kind,
                if text.is_empty() { String::new() } else { format!(": {text}") }
            )));
        }
        Ok((kind, data))
    }

    fn handshake(&mut self, export: &str, contexts: &[&str]) -> Result<(), NbdError> {
        let mut h = [0u8; 18];
        self.read_exact(&mut h, "reading the greeting")?;
        if be64(&h, 0) != NBDMAGIC || be64(&h, 8) != IHAVEOPT {
            return Err(self.protocol("not a newstyle NBD server".into()));
        }
        let flags = be16(&h, 16);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("the server does not speak fixed newstyle".into()));
        }
        let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        self.write_all(&client_flags.to_be_bytes(), "sending the client flags")?;
        let result = self.negotiate(export, contexts);
        if result.is_err() {
            // Leave politely; the error is what matters.
            let _ = self.send_option(OPT_ABORT, &[]);
        }
        result
    }

    fn negotiate(&mut self, export: &str, contexts: &[&str]) -> Result<(), NbdError> {
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        if kind != REP_ACK {
            return Err(self.protocol(format!("reply {kind} to the structured-reply option")));
        }
        let name = export.as_bytes();
        if !contexts.is_empty() {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name);
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                d.extend_from_slice(&(c.len() as u32).to_be_bytes());
                d.extend_from_slice(c.as_bytes());
            }
            self.send_option(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let name = String::from_utf8_lossy(&data[4..]).into_owned();
                        self.contexts.push((be32(&data, 0), name));
                    }
                    REP_ACK => break,
                    other => return Err(self.protocol(format!("reply {other} to the metadata-context option"))),
                }
            }
            if let Some(missing) = contexts.iter().find(|c| !self.contexts.iter().any(|(_, n)| n == *c)) {
                return Err(self.protocol(format!("export {export:?} has no metadata context {missing:?}")));
            }
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        self.send_option(OPT_GO, &d)?;
        let mut size = None;
        loop {
            let (kind, data) = self.option_reply(OPT_GO)?;
            match kind {
                REP_INFO if data.len() >= 12 && be16(&data, 0) == INFO_EXPORT => size = Some(be64(&data, 2)),
                REP_INFO => {}
                REP_ACK => break,
                other => return Err(self.protocol(format!("reply {other} to the go option"))),
            }
        }
        self.size = size.ok_or_else(|| self.protocol(format!("no size given for export {export:?}")))?;
        Ok(())
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, command: u16, offset: u64, len: u32) -> Result<u64, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut m = [0u8; 28];
        m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m[6..8].copy_from_slice(&command.to_be_bytes());
        m[8..16].copy_from_slice(&cookie.to_be_bytes());
        m[16..24].copy_from_slice(&offset.to_be_bytes());
        m[24..28].copy_from_slice(&len.to_be_bytes());
        self.write_all(&m, "sending a request")?;
        Ok(cookie)
    }

    /// Reads one reply (a simple one, or one chunk of a structured one): the cookie it answers,
    /// whether it is the last for it, and what it carries.
    fn reply(&mut self, reads: &mut dyn Targets) -> Result<(u64, bool, Chunk), NbdError> {
        let mut m = [0u8; 4];
        self.read_exact(&mut m, "reading a reply")?;
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.read_exact(&mut h, "reading a reply")?;
                let (error, cookie) = (be32(&h, 0), be64(&h, 4));
                if error != 0 {
                    return Ok((cookie, true, Chunk::Error(format!("error {error} ({})", errno_name(error)))));
                }
                // A simple reply to a read carries the whole range.
                if let Some((_, buf)) = reads.target(cookie) {
                    let socket = &self.socket;
                    self.stream.read_exact(buf).map_err(|source| NbdError::Io {
                        socket: socket.clone(),
                        action: "reading data",
                        source,
                    })?;
                    return Ok((cookie, true, Chunk::Data(buf.len() as u64)));
                }
                Ok((cookie, true, Chunk::Done))
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.read_exact(&mut h, "reading a reply")?;
                let (flags, kind, cookie, len) = (be16(&h, 0), be16(&h, 2), be64(&h, 4), be32(&h, 12));
                let done = flags & REPLY_FLAG_DONE != 0;
                match kind {
                    REPLY_TYPE_NONE => Ok((cookie, done, Chunk::Done)),
                    REPLY_TYPE_OFFSET_DATA if len >= 8 => {
                        let mut o = [0u8; 8];
                        self.read_exact(&mut o, "reading data")?;
                        let offset = u64::from_be_bytes(o);
                        let n = (len - 8) as usize;
                        let socket = &self.socket;
                        let protocol = |detail| NbdError::Protocol { socket: socket.clone(), detail };
                        let Some((start, buf)) = reads.target(cookie) else {
                            return Err(protocol(format!("data for request {cookie}, which read nothing")));
                        };
                        let at = offset.checked_sub(start).map(|a| a as usize);
                        let Some(at) = at.filter(|a| a + n <= buf.len()) else {
                            return Err(protocol(format!("data at {offset} outside the range read")));
                        };
                        self.stream.read_exact(&mut buf[at..at + n]).map_err(|source| NbdError::Io {
                            socket: socket.clone(),
                            action: "reading data",
                            source,
                        })?;
                        Ok((cookie, done, Chunk::Data(n as u64)))
                    }
                    REPLY_TYPE_OFFSET_HOLE if len == 12 => {
                        let mut b = [0u8; 12];
                        self.read_exact(&mut b, "reading a hole")?;
                        let (offset, n) = (be64(&b, 0), be32(&b, 8) as usize);
                        if let Some((start, buf)) = reads.target(cookie) {
                            let at = offset.checked_sub(start).map(|a| a as usize);
                            let Some(at) = at.filter(|a| a + n <= buf.len()) else {
                                return Err(NbdError::Protocol {
                                    socket: self.socket.clone(),
                                    detail: format!("a hole at {offset} outside the range read"),
                                });
                            };
                            buf[at..at + n].fill(0);
                        }
                        Ok((cookie, done, Chunk::Data(n as u64)))
                    }
                    REPLY_TYPE_BLOCK_STATUS if len >= 4 && len % 8 == 4 && len <= 16 << 20 => {
                        let mut b = vec![0u8; len as usize];
                        self.read_exact(&mut b, "reading a block status")?;
                        let id = be32(&b, 0);
                        let list = b[4..].chunks_exact(8).map(|d| (be32(d, 0), be32(d, 4))).collect();
                        Ok((cookie, done, Chunk::Status(id, list)))
                    }
                    k if k & REPLY_TYPE_ERROR_BIT != 0 && (6..=1 << 20).contains(&len) => {
                        let mut b = vec![0u8; len as usize];
                        self.read_exact(&mut b, "reading an error")?;
                        let error = be32(&b, 0);
                        let text_len = (be16(&b, 4) as usize).min(b.len() - 6);
                        let text = String::from_utf8_lossy(&b[6..6 + text_len]).into_owned();
                        Ok((
                            cookie,
                            done,
                            Chunk::Error(format!(
                                "error {error} ({}){}",
                                errno_name(error),
                                if text.is_empty() { String::new() } else { format!(": {text}") }
                            )),
                        ))
                    }
                    k => Err(self.protocol(format!("a reply chunk of type {k} and {len} bytes"))),
                }
            }
            other => Err(self.protocol(format!("a reply with magic {other:#x}"))),
        }
    }

    /// The block status of `context` from `offset` on: the extents the server gives for one
    /// request of up to `len` bytes (at least one; together they may cover less than `len`).
    pub fn block_status(&mut self, context: &str, offset: u64, len: u64) -> Result<Vec<StatusExtent>, NbdError> {
        let id = self
            .contexts
            .iter()
            .find(|(_, n)| n == context)
            .map(|(id, _)| *id)
            .ok_or_else(|| self.protocol(format!("metadata context {context:?} was not negotiated")))?;
        let len = len.min(self.size.saturating_sub(offset)).min(u64::from(u32::MAX) & !0xffff) as u32;
        if len == 0 {
            return Ok(Vec::new());
        }
        let cookie = self.request(CMD_BLOCK_STATUS, offset, len)?;
        let mut out = Vec::new();
        let mut failure = None;
        loop {
            let (c, done, chunk) = self.reply(&mut NoTargets)?;
            if c != cookie {
                return Err(self.protocol(format!("a reply to request {c} while waiting for {cookie}")));
            }
            match chunk {
                Chunk::Status(i, list) if i == id => {
                    let mut at = offset;
                    for (n, flags) in list {
                        out.push(StatusExtent { offset: at, len: u64::from(n), flags });
                        at += u64::from(n);
                    }
                }
                Chunk::Error(e) => failure = Some(e),
                _ => {}
            }
            if done {
                break;
            }
        }
        if let Some(e) = failure {
            return Err(self.protocol(format!("block status of {context} at {offset}: {e}")));
        }
        if out.is_empty() {
            return Err(self.protocol(format!("no block status of {context} at {offset}")));
        }
        Ok(out)
    }

    /// The block status of `context` over the whole export, merged where neighbours have the
    /// same flags.
    pub fn map(&mut self, context: &str) -> Result<Vec<StatusExtent>, NbdError> {
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut at = 0;
        while at < self.size {
            let before = at;
            for e in self.block_status(context, at, self.size - at)? {
                // Nothing past the export's end (a server may describe more than was asked).
                if e.offset >= self.size {
                    break;
                }
                let e = StatusExtent { len: e.len.min(self.size - e.offset), ..e };
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.offset + last.len == e.offset => last.len += e.len,
                    _ => out.push(e),
                }
                at = e.offset + e.len;
            }
            // An answer that describes nothing would be asked again for ever.
            if at == before {
                return Err(self.protocol(format!("a block status of {context} at {at} that describes no byte")));
            }
        }
        Ok(out)
    }

    /// Reads each range of `ranges` (offset, length up to [`MAX_REQUEST`]), up to `window`
    /// requests in flight, and gives them to `sink` in the order given. A hole the server
    /// reports reads as zeros. `sink` may stop the reading by returning an error.
    pub fn read_ranges<E: From<NbdError>>(
        &mut self,
        ranges: impl IntoIterator<Item = (u64, u32)>,
        window: usize,
        sink: impl FnMut(u64, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.read_ranges_into(ranges, window, Vec::new, sink)
    }

    /// [`NbdClient::read_ranges`] into buffers `buffer` gives (sized to each range here): the
    /// buffers a caller is done with can be given again, so that reading a disk does not map
    /// and zero fresh memory for every range. Whatever a buffer held is overwritten: the replies
    /// must cover every byte of a read.
    pub fn read_ranges_into<E: From<NbdError>>(
        &mut self,
        ranges: impl IntoIterator<Item = (u64, u32)>,
        window: usize,
        mut buffer: impl FnMut() -> Vec<u8>,
        mut sink: impl FnMut(u64, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut ranges = ranges.into_iter();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        loop {
            while pending.len() < window.max(1) {
                let Some((offset, len)) = ranges.next() else { break };
                if len > MAX_REQUEST || offset.saturating_add(u64::from(len)) > self.size {
                    return Err(self
                        .protocol(format!(
                            "a read of {len} bytes at {offset} (export of {} bytes, {} at most at once)",
                            self.size, MAX_REQUEST
                        ))
                        .into());
                }
                let cookie = self.request(CMD_READ, offset, len)?;
                let mut buf = buffer();
                buf.resize(len as usize, 0);
                pending.push_back(Pending { cookie, offset, buf, covered: 0, done: false, error: None });
            }
            if pending.is_empty() {
                return Ok(());
            }
            while pending.front().is_some_and(|p| p.done) {
                let p = pending.pop_front().expect("a front");
                if let Some(e) = p.error {
                    return Err(self.protocol(format!("reading {} bytes at {}: {e}", p.buf.len(), p.offset)).into());
                }
                sink(p.offset, p.buf)?;
            }
            if pending.is_empty() {
                continue;
            }
            let (cookie, done, chunk) = self.reply(&mut pending)?;
            let Some(p) = pending.iter_mut().find(|p| p.cookie == cookie) else {
                return Err(self.protocol(format!("a reply to request {cookie}, which is not waiting")).into());
            };
            match chunk {
                Chunk::Error(e) => p.error = Some(e),
                Chunk::Data(n) => p.covered += n,
                _ => {}
            }
            p.done |= done;
            if p.done && p.error.is_none() && p.covered != p.buf.len() as u64 {
                p.error = Some(format!("the replies gave {} of its bytes", p.covered));
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let mut at = 0usize;
        let ranges: Vec<(u64, u32)> = std::iter::from_fn(|| {
            (at < buf.len()).then(|| {
                let n = (buf.len() - at).min(MAX_REQUEST as usize);
                let r = (offset + at as u64, n as u32);
                at += n;
                r
            })
        })
        .collect();
        self.read_ranges(ranges, 4, |o, data| {
            let at = (o - offset) as usize;
            buf[at..at + data.len()].copy_from_slice(&data);
            Ok::<(), NbdError>(())
        })
    }

    /// Ends the session (the server closes the export's connection).
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.request(CMD_DISC, 0, 0).map(|_| ())
    }
}

/// A read waiting for its reply.
struct Pending {
    cookie: u64,
    offset: u64,
    buf: Vec<u8>,
    /// How many of its bytes the replies have given.
    covered: u64,
    done: bool,
    error: Option<String>,
}

/// Where the data of a read's reply goes: the range's start and buffer, by request cookie.
trait Targets {
    fn target(&mut self, cookie: u64) -> Option<(u64, &mut [u8])>;
}

impl Targets for VecDeque<Pending> {
    fn target(&mut self, cookie: u64) -> Option<(u64, &mut [u8])> {
        self.iter_mut().find(|p| p.cookie == cookie).map(|p| (p.offset, p.buf.as_mut_slice()))
    }
}

/// No read waits (a block-status request).
struct NoTargets;

impl Targets for NoTargets {
    fn target(&mut self, _: u64) -> Option<(u64, &mut [u8])> {
        None
    }
}

/// What one reply chunk carried, data aside (written into the read's buffer).
enum Chunk {
    Done,
    /// Bytes of a read's range given (data, or a hole).
    Data(u64),
    Status(u32, Vec<(u32, u32)>),
    Error(String),
}

fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_is_not_nbd_is_refused_with_its_socket_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        });
        let e = NbdClient::connect(&path, "x", &[], Duration::from_secs(5)).unwrap_err();
        t.join().unwrap();
        assert!(e.to_string().contains("not a newstyle NBD server"), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    /// A server that completes the handshake with `context` and then answers every block
    /// status with `descriptors` (length, flags).
    fn status_server(path: &Path, context: &'static str, descriptors: Vec<(u32, u32)>) -> std::thread::JoinHandle<()> {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
            greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
            greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            s.write_all(&greeting).unwrap();
            let mut flags = [0u8; 4];
            s.read_exact(&mut flags).unwrap();
            let reply = |s: &mut UnixStream, option: u32, kind: u32, data: &[u8]| {
                let mut m = REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&option.to_be_bytes());
                m.extend_from_slice(&kind.to_be_bytes());
                m.extend_from_slice(&(data.len() as u32).to_be_bytes());
                m.extend_from_slice(data);
                s.write_all(&m).unwrap();
            };
            loop {
                let mut h = [0u8; 16];
                s.read_exact(&mut h).unwrap();
                let (option, len) = (be32(&h, 8), be32(&h, 12));
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).unwrap();
                match option {
                    OPT_SET_META_CONTEXT => {
                        let mut d = 7u32.to_be_bytes().to_vec();
                        d.extend_from_slice(context.as_bytes());
                        reply(&mut s, option, REP_META_CONTEXT, &d);
                        reply(&mut s, option, REP_ACK, &[]);
                    }
                    OPT_GO => {
                        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                        d.extend_from_slice(&(1u64 << 20).to_be_bytes());
                        d.extend_from_slice(&0u16.to_be_bytes());
                        reply(&mut s, option, REP_INFO, &d);
                        reply(&mut s, option, REP_ACK, &[]);
                        break;
                    }
                    _ => reply(&mut s, option, REP_ACK, &[]),
                }
            }
            loop {
                let mut r = [0u8; 28];
                if s.read_exact(&mut r).is_err() {
                    return;
                }
                let cookie = be64(&r, 8);
                let mut payload = 7u32.to_be_bytes().to_vec();
                for (len, flags) in &descriptors {
                    payload.extend_from_slice(&len.to_be_bytes());
                    payload.extend_from_slice(&flags.to_be_bytes());
                }
                let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                m.extend_from_slice(&REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
                m.extend_from_slice(&cookie.to_be_bytes());
                m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                m.extend_from_slice(&payload);
                if s.write_all(&m).is_err() {
                    return;
                }
            }
        })
    }

    #[test]
    fn a_block_status_that_describes_nothing_fails_and_one_past_the_end_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zero");
        let t = status_server(&path, BASE_ALLOCATION, vec![(0, 0)]);
        let mut c = NbdClient::connect(&path, "x", &[BASE_ALLOCATION], Duration::from_secs(5)).unwrap();
        let e = c.map(BASE_ALLOCATION).unwrap_err();
        assert!(e.to_string().contains("describes no byte"), "{e}");
        drop(c);
        t.join().unwrap();
        // 2 MiB described for a 1 MiB export: the map ends at the export's end.
        let path = dir.path().join("long");
        let t = status_server(&path, BASE_ALLOCATION, vec![(512 << 10, 0), (1 << 20, 3), (512 << 10, 0)]);
        let mut c = NbdClient::connect(&path, "x", &[BASE_ALLOCATION], Duration::from_secs(5)).unwrap();
        let map = c.map(BASE_ALLOCATION).unwrap();
        assert_eq!(
            map,
            vec![
                StatusExtent { offset: 0, len: 512 << 10, flags: 0 },
                StatusExtent { offset: 512 << 10, len: 512 << 10, flags: 3 }
            ]
        );
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn a_server_that_says_nothing_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(600));
            drop(s);
        });
        let started = std::time::Instant::now();
        let e = NbdClient::connect(&path, "x", &[], Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(550), "{:?}", started.elapsed());
        assert!(matches!(e, NbdError::Io { action: "reading the greeting", .. }), "{e}");
        t.join().unwrap();
    }
}
