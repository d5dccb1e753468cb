//! The libvirt calls the `virt` crate does not wrap. Every raw call of the crate is here.

use std::ffi::CString;
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;

fn cstring(s: &str) -> Result<CString, Error> {
    // An XML document never holds NUL; report it as libvirt would report bad XML.
    CString::new(s).map_err(|_| Error::last_error())
}

/// `virDomainBackupBegin(dom, backup_xml, checkpoint_xml, flags)`: `VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL` when the
/// targets exist already.
pub(crate) fn backup_begin(
    domain: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
    reuse_external: bool,
) -> Result<(), Error> {
    let backup = cstring(backup_xml)?;
    let checkpoint = checkpoint_xml.map(cstring).transpose()?;
    let checkpoint_ptr = checkpoint.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    let flags = if reuse_external { virt::sys::VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL } else { 0 };
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain` for the whole call;
    // `backup` and `checkpoint` are NUL-terminated strings that outlive the call (libvirt copies
    // what it keeps); a null checkpoint pointer is allowed by the API.
    let rc = unsafe { virt::sys::virDomainBackupBegin(domain.as_ptr(), backup.as_ptr(), checkpoint_ptr, flags) };
    if rc < 0 { Err(Error::last_error()) } else { Ok(()) }
}

/// `virDomainAbortJob(dom)`.
pub(crate) fn abort_job(domain: &Domain) -> Result<(), Error> {
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain` for the whole call.
    let rc = unsafe { virt::sys::virDomainAbortJob(domain.as_ptr()) };
    if rc < 0 { Err(Error::last_error()) } else { Ok(()) }
}

/// The fields of `virDomainGetJobStats` nasbak reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RawJobStats {
    pub kind: i32,
    pub operation: Option<i32>,
    pub disk_processed: Option<u64>,
    pub disk_total: Option<u64>,
    pub data_processed: Option<u64>,
    pub data_total: Option<u64>,
    pub time_elapsed: Option<u64>,
    pub error: Option<String>,
}

/// Owns the typed parameters libvirt allocated; frees them with libvirt's allocator.
struct TypedParams {
    ptr: virt::sys::virTypedParameterPtr,
    n: std::os::raw::c_int,
}

impl Drop for TypedParams {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr`/`n` are exactly what virDomainGetJobStats returned and nothing else
            // frees them; virTypedParamsFree is the documented way to release them.
            unsafe { virt::sys::virTypedParamsFree(self.ptr, self.n) };
        }
    }
}

impl TypedParams {
    fn ullong(&self, name: &std::ffi::CStr) -> Option<u64> {
        let mut v: std::os::raw::c_ulonglong = 0;
        // SAFETY: `ptr`/`n` describe a valid array (or null with n = 0, which libvirt accepts);
        // `name` is NUL-terminated; `v` is a valid out pointer.
        let rc = unsafe { virt::sys::virTypedParamsGetULLong(self.ptr, self.n, name.as_ptr(), &mut v) };
        (rc == 1).then_some(v)
    }

    fn int(&self, name: &std::ffi::CStr) -> Option<i32> {
        let mut v: std::os::raw::c_int = 0;
        // SAFETY: as in `ullong`.
        let rc = unsafe { virt::sys::virTypedParamsGetInt(self.ptr, self.n, name.as_ptr(), &mut v) };
        (rc == 1).then_some(v)
    }

    fn string(&self, name: &std::ffi::CStr) -> Option<String> {
        let mut v: *const std::os::raw::c_char = ptr::null();
        // SAFETY: as in `ullong`; the returned string points into the array and is copied
        // before the array is freed.
        let rc = unsafe { virt::sys::virTypedParamsGetString(self.ptr, self.n, name.as_ptr(), &mut v) };
        if rc != 1 || v.is_null() {
            return None;
        }
        // SAFETY: libvirt returned a NUL-terminated string that lives as long as `self`.
        Some(unsafe { std::ffi::CStr::from_ptr(v) }.to_string_lossy().into_owned())
    }
}

/// `virDomainGetJobStats(dom, flags)`. (The `virt` crate's wrapper is unsound when there is no
/// job: it builds a Vec from libvirt's null pointer and frees libvirt memory with Rust's
/// allocator.)
pub(crate) fn job_stats(domain: &Domain, flags: u32) -> Result<RawJobStats, Error> {
    let mut kind: std::os::raw::c_int = 0;
    let mut params = TypedParams { ptr: ptr::null_mut(), n: 0 };
    // SAFETY: `domain.as_ptr()` is live for the call; the out pointers are valid; libvirt fills
    // `params.ptr`/`params.n` with an array it allocated, which `TypedParams` frees.
    let rc =
        unsafe { virt::sys::virDomainGetJobStats(domain.as_ptr(), &mut kind, &mut params.ptr, &mut params.n, flags) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    use virt::sys as s;
    Ok(RawJobStats {
        kind,
        operation: params.int(s::VIR_DOMAIN_JOB_OPERATION),
        disk_processed: params.ullong(s::VIR_DOMAIN_JOB_DISK_PROCESSED),
        disk_total: params.ullong(s::VIR_DOMAIN_JOB_DISK_TOTAL),
        data_processed: params.ullong(s::VIR_DOMAIN_JOB_DATA_PROCESSED),
        data_total: params.ullong(s::VIR_DOMAIN_JOB_DATA_TOTAL),
        time_elapsed: params.ullong(s::VIR_DOMAIN_JOB_TIME_ELAPSED),
        error: params.string(s::VIR_DOMAIN_JOB_ERRMSG),
    })
}

/// `virDomainBackupGetXMLDesc(dom, 0)`: the XML of the backup job running now.
pub(crate) fn backup_xml(domain: &Domain) -> Result<String, Error> {
    // SAFETY: `domain.as_ptr()` is live for the call.
    let p = unsafe { virt::sys::virDomainBackupGetXMLDesc(domain.as_ptr(), 0) };
    if p.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: libvirt returned a NUL-terminated string that the caller owns.
    let text = unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: the string was allocated by libvirt and is freed exactly once, with libc's free as
    // libvirt documents for returned strings.
    unsafe { libc::free(p.cast()) };
    Ok(text)
}

/// Owns a virDomainCheckpointPtr; frees it on drop.
struct CheckpointHandle(virt::sys::virDomainCheckpointPtr);

impl Drop for CheckpointHandle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from libvirt, is owned by this handle and freed once.
            unsafe { virt::sys::virDomainCheckpointFree(self.0) };
        }
    }
}

/// Names of the domain's checkpoints (`virDomainListAllCheckpoints`).
pub(crate) fn checkpoint_names(domain: &Domain) -> Result<Vec<String>, Error> {
    let mut list: *mut virt::sys::virDomainCheckpointPtr = ptr::null_mut();
    // SAFETY: `domain.as_ptr()` is live; `list` is a valid out pointer that libvirt fills with
    // an array it allocated (freed below with libc's free, after each element is freed).
    let n = unsafe { virt::sys::virDomainListAllCheckpoints(domain.as_ptr(), &mut list, 0) };
    if n < 0 {
        return Err(Error::last_error());
    }
    let mut names = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: libvirt returned `n` valid pointers at `list`.
        let handle = CheckpointHandle(unsafe { *list.add(i) });
        // SAFETY: the name is owned by the live checkpoint object and copied before it is freed.
        let name = unsafe { virt::sys::virDomainCheckpointGetName(handle.0) };
        if !name.is_null() {
            // SAFETY: libvirt returned a NUL-terminated string.
            names.push(unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned());
        }
    }
    if !list.is_null() {
        // SAFETY: the array itself was allocated by libvirt and is freed once.
        unsafe { libc::free(list.cast()) };
    }
    Ok(names)
}

/// The checkpoint `name` of `domain` (`virDomainCheckpointLookupByName`).
fn lookup_checkpoint(domain: &Domain, name: &str) -> Result<CheckpointHandle, Error> {
    let c = cstring(name)?;
    // SAFETY: `domain.as_ptr()` is live and `c` is NUL-terminated for the call.
    let handle =
        CheckpointHandle(unsafe { virt::sys::virDomainCheckpointLookupByName(domain.as_ptr(), c.as_ptr(), 0) });
    if handle.0.is_null() { Err(Error::last_error()) } else { Ok(handle) }
}

/// Deletes the checkpoint `name` (`virDomainCheckpointDelete`): with its bitmaps, or with
/// `metadata_only` only libvirt's record of it (the bitmaps stay in the images).
pub(crate) fn delete_checkpoint(domain: &Domain, name: &str, metadata_only: bool) -> Result<(), Error> {
    let handle = lookup_checkpoint(domain, name)?;
    let flags = if metadata_only { virt::sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY } else { 0 };
    // SAFETY: `handle.0` is a live checkpoint pointer.
    let rc = unsafe { virt::sys::virDomainCheckpointDelete(handle.0, flags) };
    if rc < 0 { Err(Error::last_error()) } else { Ok(()) }
}

/// The `<domaincheckpoint>` definition of checkpoint `name` (`virDomainCheckpointGetXMLDesc`).
pub(crate) fn checkpoint_xml(domain: &Domain, name: &str) -> Result<String, Error> {
    let handle = lookup_checkpoint(domain, name)?;
    // SAFETY: `handle.0` is a live checkpoint pointer; libvirt returns a string it allocated.
    let text = unsafe { virt::sys::virDomainCheckpointGetXMLDesc(handle.0, 0) };
    if text.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: libvirt returned a NUL-terminated string, copied here before it is freed once.
    let xml = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().into_owned();
    // SAFETY: the string was allocated by libvirt for the caller and is freed exactly once.
    unsafe { libc::free(text.cast()) };
    Ok(xml)
}

/// Re-registers a checkpoint whose bitmaps are still in the images (`virDomainCheckpointCreateXML`
/// with `REDEFINE`, and `REDEFINE_VALIDATE`, which checks the bitmaps, when `validate`).
pub(crate) fn redefine_checkpoint(domain: &Domain, xml: &str, validate: bool) -> Result<(), Error> {
    let c = cstring(xml)?;
    let mut flags = virt::sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE;
    if validate {
        flags |= virt::sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;
    }
    // SAFETY: `domain.as_ptr()` is live and `c` is NUL-terminated for the call; the returned
    // pointer is owned (and freed) by the handle.
    let handle =
        CheckpointHandle(unsafe { virt::sys::virDomainCheckpointCreateXML(domain.as_ptr(), c.as_ptr(), flags) });
    if handle.0.is_null() { Err(Error::last_error()) } else { Ok(()) }
}

/// `virDomainBlockCopy(dom, disk, dest_xml, params, n, flags)`, with the `bandwidth` parameter
/// (bytes per second) when given.
pub(crate) fn block_copy(
    domain: &Domain,
    disk: &str,
    dest_xml: &str,
    bandwidth: Option<u64>,
    flags: u32,
) -> Result<(), Error> {
    let (d, x) = (cstring(disk)?, cstring(dest_xml)?);
    let mut params = TypedParams { ptr: ptr::null_mut(), n: 0 };
    if let Some(bytes) = bandwidth {
        let mut max = 0;
        // SAFETY: `params.ptr`/`params.n`/`max` are valid out pointers for libvirt's growable
        // array (allocated by libvirt, freed by `TypedParams`'s drop); the name is a static
        // NUL-terminated string.
        let rc = unsafe {
            virt::sys::virTypedParamsAddULLong(
                &mut params.ptr,
                &mut params.n,
                &mut max,
                virt::sys::VIR_DOMAIN_BLOCK_COPY_BANDWIDTH.as_ptr(),
                bytes,
            )
        };
        if rc < 0 {
            return Err(Error::last_error());
        }
    }
    // SAFETY: `domain.as_ptr()` is live; `d` and `x` are NUL-terminated strings that outlive
    // the call; `params` holds `params.n` parameters libvirt built (or is null with 0).
    let rc =
        unsafe { virt::sys::virDomainBlockCopy(domain.as_ptr(), d.as_ptr(), x.as_ptr(), params.ptr, params.n, flags) };
    if rc < 0 { Err(Error::last_error()) } else { Ok(()) }
}

/// `virDomainGetBlockJobInfo`: the block job on `disk` as `(type, cur, end)`, `None` when none.
pub(crate) fn block_job_info(domain: &Domain, disk: &str) -> Result<Option<(i32, u64, u64)>, Error> {
    let d = cstring(disk)?;
    let mut info = virt::sys::virDomainBlockJobInfo { type_: 0, bandwidth: 0, cur: 0, end: 0 };
    // SAFETY: `domain.as_ptr()` is live, `d` is NUL-terminated, `info` is a valid struct that
    // libvirt fills in during the call.
    let rc = unsafe { virt::sys::virDomainGetBlockJobInfo(domain.as_ptr(), d.as_ptr(), &mut info, 0) };
    match rc {
        r if r < 0 => Err(Error::last_error()),
        0 => Ok(None),
        _ => Ok(Some((info.type_, info.cur, info.end))),
    }
}

/// `virDomainBlockJobAbort(dom, disk, flags)`.
pub(crate) fn block_job_abort(domain: &Domain, disk: &str, flags: u32) -> Result<(), Error> {
    let d = cstring(disk)?;
    // SAFETY: `domain.as_ptr()` is live and `d` is NUL-terminated for the call.
    let rc = unsafe { virt::sys::virDomainBlockJobAbort(domain.as_ptr(), d.as_ptr(), flags) };
    if rc < 0 { Err(Error::last_error()) } else { Ok(()) }
}
