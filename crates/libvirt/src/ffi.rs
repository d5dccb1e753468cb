//! The libvirt calls the `virt` crate does not wrap. Every raw call of the crate is here.

use std::ffi::CString;
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;

fn cstring(s: &str) -> Result<CString, Error> {
    // An XML document never holds NUL; report it as libvirt would report bad XML.
    CString::new(s).map_err(|_| Error::last_error())
}

/// `virDomainBackupBegin(dom, backup_xml, checkpoint_xml, 0)`.
pub(crate) fn backup_begin(domain: &Domain, backup_xml: &str, checkpoint_xml: Option<&str>) -> Result<(), Error> {
    let backup = cstring(backup_xml)?;
    let checkpoint = checkpoint_xml.map(cstring).transpose()?;
    let checkpoint_ptr = checkpoint.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain` for the whole call;
    // `backup` and `checkpoint` are NUL-terminated strings that outlive the call (libvirt copies
    // what it keeps); a null checkpoint pointer is allowed by the API.
    let rc = unsafe { virt::sys::virDomainBackupBegin(domain.as_ptr(), backup.as_ptr(), checkpoint_ptr, 0) };
    if rc < 0 { Err(Error::last_error()) } else { Ok(()) }
}

/// `virDomainAbortJob(dom)`.
pub(crate) fn abort_job(domain: &Domain) -> Result<(), Error> {
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain` for the whole call.
    let rc = unsafe { virt::sys::virDomainAbortJob(domain.as_ptr()) };
    if rc < 0 { Err(Error::last_error()) } else { Ok(()) }
}
