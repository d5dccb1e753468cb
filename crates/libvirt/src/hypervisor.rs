//! The hypervisor seam, and its real implementation on the `virt` crate.

use std::time::Duration;

use virt::connect::Connect;
use virt::domain::Domain as VirtDomain;

use crate::ffi;

/// Whether a domain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// Running (or paused, or otherwise active): back up with a push job.
    Running,
    /// Shut off: back up with qemu-img.
    ShutOff,
    /// Anything else (crashed, being shut down, ...).
    Other,
}

/// The kind of a job libvirt reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// No job.
    None,
    /// A job is running.
    Active,
    /// The last job completed.
    Completed,
    /// The last job failed.
    Failed,
    /// The last job was cancelled.
    Cancelled,
}

/// A snapshot of job statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The kind.
    pub kind: JobKind,
    /// Whether the job is (was) a backup.
    pub is_backup: bool,
    /// Bytes processed.
    pub processed: u64,
    /// Bytes in all.
    pub total: u64,
    /// libvirt's message for a failed job.
    pub error: Option<String>,
    /// Time the job ran, when libvirt reports it.
    pub elapsed: Option<Duration>,
}

/// A block job on one disk (a copy started with [`Hypervisor::block_copy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJob {
    /// Bytes copied so far (libvirt's cursor).
    pub cur: u64,
    /// Bytes to copy in all; a copy whose `cur` equals `end` mirrors every write and is ready
    /// to pivot.
    pub end: u64,
}

impl BlockJob {
    /// Whether the copy has caught up (ready to pivot).
    pub fn ready(&self) -> bool {
        self.end > 0 && self.cur == self.end
    }
}

/// How a block copy treats its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockCopyFlags {
    /// The destination exists and is used as it is (a block device, or an image made for it).
    pub reuse_external: bool,
    /// At most this many bytes per second (unlimited when `None`).
    pub bandwidth: Option<u64>,
}

/// libvirt and QEMU versions, as `(major, minor, micro)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    /// libvirt.
    pub libvirt: (u32, u32, u32),
    /// QEMU.
    pub qemu: (u32, u32, u32),
}

/// A libvirt call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("libvirt: {message}")]
#[non_exhaustive]
pub struct LibvirtError {
    /// libvirt's words.
    pub message: String,
    no_domain: bool,
}

impl LibvirtError {
    /// An error with libvirt's words (for other implementations of [`Hypervisor`] and mocks).
    pub fn new(message: impl Into<String>) -> Self {
        LibvirtError { message: message.into(), no_domain: false }
    }

    /// The error libvirt gives for a domain it does not have.
    pub fn no_such_domain(domain: &str) -> Self {
        LibvirtError { message: format!("Domain not found: no domain with matching name '{domain}'"), no_domain: true }
    }

    /// Whether libvirt said there is no such domain.
    pub fn is_no_domain(&self) -> bool {
        self.no_domain
    }
}

impl From<virt::error::Error> for LibvirtError {
    fn from(e: virt::error::Error) -> Self {
        LibvirtError {
            message: e.message().to_owned(),
            no_domain: matches!(e.code(), virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)),
        }
    }
}

/// What nasbak needs from a hypervisor.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait Hypervisor {
    /// Versions of libvirt and of the hypervisor.
    fn versions(&self) -> Result<Versions, LibvirtError>;
    /// The domain's XML (inactive or live as libvirt gives it).
    fn domain_xml(&self, domain: &str) -> Result<String, LibvirtError>;
    /// Whether the domain runs.
    fn domain_state(&self, domain: &str) -> Result<DomainState, LibvirtError>;
    /// Starts a backup job.
    fn backup_begin(&self, domain: &str, backup_xml: &str, checkpoint_xml: Option<String>) -> Result<(), LibvirtError>;
    /// The job running now (`None` kind when there is none).
    fn current_job(&self, domain: &str) -> Result<JobInfo, LibvirtError>;
    /// The statistics of the job that ended last, consumed by this call.
    fn completed_job(&self, domain: &str) -> Result<JobInfo, LibvirtError>;
    /// Aborts the running job.
    fn abort_job(&self, domain: &str) -> Result<(), LibvirtError>;
    /// The `<domainbackup>` XML of the backup job running now.
    fn backup_xml(&self, domain: &str) -> Result<String, LibvirtError>;
    /// Names of the domain's checkpoints.
    fn checkpoints(&self, domain: &str) -> Result<Vec<String>, LibvirtError>;
    /// Deletes a checkpoint and its bitmaps.
    fn delete_checkpoint(&self, domain: &str, name: &str) -> Result<(), LibvirtError>;
    /// Forgets a checkpoint, keeping its bitmaps in the images.
    fn forget_checkpoint(&self, domain: &str, name: &str) -> Result<(), LibvirtError>;
    /// The `<domaincheckpoint>` definition of a checkpoint.
    fn checkpoint_xml(&self, domain: &str, name: &str) -> Result<String, LibvirtError>;
    /// Re-registers a checkpoint from its definition (its bitmaps must still be in the images);
    /// `validate` checks the bitmaps (the domain must run).
    fn redefine_checkpoint(&self, domain: &str, xml: &str, validate: bool) -> Result<(), LibvirtError>;
    /// Attaches a `<disk>` to the domain's persistent definition, and to the running domain too
    /// when `live`.
    fn attach_disk(&self, domain: &str, disk_xml: &str, live: bool) -> Result<(), LibvirtError>;
    /// The domain's persistent definition, secrets included (for a definition to start from).
    fn inactive_xml(&self, domain: &str) -> Result<String, LibvirtError>;
    /// Starts the domain with `xml` as its running definition; a defined (persistent) domain of
    /// that name and UUID keeps its persistent definition unchanged.
    fn start_with_xml(&self, xml: &str) -> Result<(), LibvirtError>;
    /// Starts a block copy of the running domain's disk `disk` (its target) to the destination
    /// `<disk>` of `dest_xml`, as a transient job (not kept in the persistent definition): a
    /// libvirt block job that goes on without the caller.
    fn block_copy(&self, domain: &str, disk: &str, dest_xml: &str, flags: BlockCopyFlags) -> Result<(), LibvirtError>;
    /// The block job on disk `disk`, if one runs.
    fn block_job(&self, domain: &str, disk: &str) -> Result<Option<BlockJob>, LibvirtError>;
    /// Ends the block job on `disk`: with `pivot`, the disk switches to the copy (which must be
    /// ready); without, the copy is abandoned.
    fn block_job_end(&self, domain: &str, disk: &str, pivot: bool) -> Result<(), LibvirtError>;
    /// Stops the domain at once (power off).
    fn destroy(&self, domain: &str) -> Result<(), LibvirtError>;
    /// The value of the secret a network disk's `<auth>` names (by UUID, else by usage), as
    /// the text its user gives to the server: a Ceph key base64-encoded. libvirt refuses to give
    /// out a secret defined `private='yes'`.
    fn secret_value(&self, auth: &crate::NetworkAuth) -> Result<nasbak_process::Secret, LibvirtError>;
    /// The size of the running domain's disk `disk` (its target) as QEMU sees it: no image is
    /// opened and no key is needed, whatever the disk is (file, block device, RBD).
    fn block_size(&self, domain: &str, disk: &str) -> Result<BlockSize, LibvirtError>;
}

/// The size of a disk ([`Hypervisor::block_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// What the guest sees, in bytes.
    pub capacity: u64,
    /// What the image occupies on its storage, in bytes.
    pub allocation: u64,
}

/// A connection to libvirt (`qemu:///system`, `qemu+ssh://host/system`, ...). Clones share the
/// connection.
#[derive(Debug, Clone)]
pub struct LibvirtHypervisor {
    conn: std::sync::Arc<Connect>,
}

fn split_version(v: u32) -> (u32, u32, u32) {
    (v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

impl LibvirtHypervisor {
    /// Connects to `uri`. Also silences libvirt's default error printer (errors come back as
    /// values).
    pub fn connect(uri: &str) -> Result<Self, LibvirtError> {
        virt::error::clear_error_callback();
        Ok(LibvirtHypervisor { conn: std::sync::Arc::new(Connect::open(Some(uri))?) })
    }

    /// The connection's URI as libvirt states it (for helpers that run `virsh`).
    pub fn uri(&self) -> Result<String, LibvirtError> {
        Ok(self.conn.uri()?)
    }

    /// The domain handle, for callers that need `virt` directly (the guest agent).
    pub fn lookup(&self, domain: &str) -> Result<VirtDomain, LibvirtError> {
        Ok(self.conn.lookup_domain_by_name(domain)?)
    }

    fn job(&self, domain: &str, flags: u32) -> Result<JobInfo, LibvirtError> {
        let stats = ffi::job_stats(&self.lookup(domain)?, flags)?;
        let kind = match stats.kind as u32 {
            virt::sys::VIR_DOMAIN_JOB_NONE => JobKind::None,
            virt::sys::VIR_DOMAIN_JOB_COMPLETED => JobKind::Completed,
            virt::sys::VIR_DOMAIN_JOB_FAILED => JobKind::Failed,
            virt::sys::VIR_DOMAIN_JOB_CANCELLED => JobKind::Cancelled,
            _ => JobKind::Active,
        };
        Ok(JobInfo {
            kind,
            is_backup: stats.operation == Some(virt::sys::VIR_DOMAIN_JOB_OPERATION_BACKUP as i32),
            processed: stats.disk_processed.or(stats.data_processed).unwrap_or(0),
            total: stats.disk_total.or(stats.data_total).unwrap_or(0),
            error: stats.error,
            elapsed: stats.time_elapsed.map(Duration::from_millis),
        })
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn versions(&self) -> Result<Versions, LibvirtError> {
        Ok(Versions { libvirt: split_version(self.conn.lib_version()?), qemu: split_version(self.conn.hyp_version()?) })
    }

    fn domain_xml(&self, domain: &str) -> Result<String, LibvirtError> {
        Ok(self.lookup(domain)?.xml_desc(0)?)
    }

    fn domain_state(&self, domain: &str) -> Result<DomainState, LibvirtError> {
        let (state, _) = self.lookup(domain)?.state()?;
        use virt::domain::DomainState as S;
        use virt::enumutil::Enum;
        Ok(match state {
            Enum::Known(S::Shutoff) => DomainState::ShutOff,
            Enum::Known(S::Running | S::Paused | S::Blocked) => DomainState::Running,
            _ => DomainState::Other,
        })
    }

    fn backup_begin(&self, domain: &str, backup_xml: &str, checkpoint_xml: Option<String>) -> Result<(), LibvirtError> {
        Ok(ffi::backup_begin(&self.lookup(domain)?, backup_xml, checkpoint_xml.as_deref())?)
    }

    fn current_job(&self, domain: &str) -> Result<JobInfo, LibvirtError> {
        self.job(domain, 0)
    }

    fn completed_job(&self, domain: &str) -> Result<JobInfo, LibvirtError> {
        self.job(domain, virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
    }

    fn abort_job(&self, domain: &str) -> Result<(), LibvirtError> {
        Ok(ffi::abort_job(&self.lookup(domain)?)?)
    }

    fn backup_xml(&self, domain: &str) -> Result<String, LibvirtError> {
        Ok(ffi::backup_xml(&self.lookup(domain)?)?)
    }

    fn checkpoints(&self, domain: &str) -> Result<Vec<String>, LibvirtError> {
        Ok(ffi::checkpoint_names(&self.lookup(domain)?)?)
    }

    fn delete_checkpoint(&self, domain: &str, name: &str) -> Result<(), LibvirtError> {
        Ok(ffi::delete_checkpoint(&self.lookup(domain)?, name, false)?)
    }

    fn forget_checkpoint(&self, domain: &str, name: &str) -> Result<(), LibvirtError> {
        Ok(ffi::delete_checkpoint(&self.lookup(domain)?, name, true)?)
    }

    fn checkpoint_xml(&self, domain: &str, name: &str) -> Result<String, LibvirtError> {
        Ok(ffi::checkpoint_xml(&self.lookup(domain)?, name)?)
    }

    fn redefine_checkpoint(&self, domain: &str, xml: &str, validate: bool) -> Result<(), LibvirtError> {
        Ok(ffi::redefine_checkpoint(&self.lookup(domain)?, xml, validate)?)
    }

    fn attach_disk(&self, domain: &str, disk_xml: &str, live: bool) -> Result<(), LibvirtError> {
        let mut flags = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
        if live {
            flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        self.lookup(domain)?.attach_device_flags(disk_xml, flags)?;
        Ok(())
    }

    fn secret_value(&self, auth: &crate::NetworkAuth) -> Result<nasbak_process::Secret, LibvirtError> {
        let secret = match (&auth.secret_uuid, &auth.secret_usage, auth.secret_type.as_deref()) {
            (Some(uuid), _, _) => self.conn.lookup_secret_by_uuid_string(uuid)?,
            (None, Some(usage), Some("ceph")) => {
                self.conn.lookup_secret_by_usage(virt::sys::VIR_SECRET_USAGE_TYPE_CEPH as i32, usage)?
            }
            (None, Some(usage), Some("iscsi")) => {
                self.conn.lookup_secret_by_usage(virt::sys::VIR_SECRET_USAGE_TYPE_ISCSI as i32, usage)?
            }
            _ => {
                return Err(LibvirtError::new(format!(
                    "the disk's <auth> names no secret by uuid, or by usage of type ceph or iscsi: {auth:?}"
                )));
            }
        };
        let mut value = secret.value(0)?;
        let text = match auth.secret_type.as_deref() {
            // libvirt keeps a Ceph key decoded; keyrings and `secret=` want it in base64.
            Some("ceph") => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(&value)
            }
            _ => String::from_utf8_lossy(&value).into_owned(),
        };
        value.iter_mut().for_each(|b| *b = 0);
        Ok(nasbak_process::Secret::new(text))
    }

    fn block_size(&self, domain: &str, disk: &str) -> Result<BlockSize, LibvirtError> {
        let info = self.lookup(domain)?.block_info(disk, 0)?;
        Ok(BlockSize { capacity: info.capacity, allocation: info.allocation })
    }

    fn inactive_xml(&self, domain: &str) -> Result<String, LibvirtError> {
        Ok(self.lookup(domain)?.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE | virt::sys::VIR_DOMAIN_XML_SECURE)?)
    }

    fn start_with_xml(&self, xml: &str) -> Result<(), LibvirtError> {
        self.conn.create_domain_xml(xml, 0)?;
        Ok(())
    }

    fn block_copy(&self, domain: &str, disk: &str, dest_xml: &str, flags: BlockCopyFlags) -> Result<(), LibvirtError> {
        let mut f = virt::sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
        if flags.reuse_external {
            f |= virt::sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT;
        }
        Ok(ffi::block_copy(&self.lookup(domain)?, disk, dest_xml, flags.bandwidth, f)?)
    }

    fn block_job(&self, domain: &str, disk: &str) -> Result<Option<BlockJob>, LibvirtError> {
        Ok(ffi::block_job_info(&self.lookup(domain)?, disk)?.map(|(_, cur, end)| BlockJob { cur, end }))
    }

    fn block_job_end(&self, domain: &str, disk: &str, pivot: bool) -> Result<(), LibvirtError> {
        let flags = if pivot { virt::sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT } else { 0 };
        Ok(ffi::block_job_abort(&self.lookup(domain)?, disk, flags)?)
    }

    fn destroy(&self, domain: &str) -> Result<(), LibvirtError> {
        self.lookup(domain)?.destroy()?;
        Ok(())
    }
}
