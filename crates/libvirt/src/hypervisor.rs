//! The hypervisor seam, and its real implementation on the `virt` crate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nasbak_process::run_with_timeout;
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
    /// Only what the disk's top image holds is copied (`VIR_DOMAIN_BLOCK_COPY_SHALLOW`): with
    /// `reuse_external`, the destination already holds what the images below it hold (a copy
    /// of them, with no backing file of its own); after the pivot it is the whole disk.
    pub shallow: bool,
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

/// A libvirt call failed, or did not answer by its deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("libvirt: {message}")]
#[non_exhaustive]
pub struct LibvirtError {
    /// libvirt's words, or what did not answer.
    pub message: String,
    no_domain: bool,
    timed_out: bool,
    not_sent: bool,
}

impl LibvirtError {
    /// An error with libvirt's words (for other implementations of [`Hypervisor`] and mocks).
    pub fn new(message: impl Into<String>) -> Self {
        LibvirtError { message: message.into(), no_domain: false, timed_out: false, not_sent: false }
    }

    /// The error libvirt gives for a domain it does not have.
    pub fn no_such_domain(domain: &str) -> Self {
        LibvirtError {
            message: format!("Domain not found: no domain with matching name '{domain}'"),
            no_domain: true,
            timed_out: false,
            not_sent: false,
        }
    }

    /// A call that did not answer by its deadline (see [`crate::deadline`]); `message` says
    /// what stopped answering and what is left in flight.
    pub fn timeout(message: impl Into<String>) -> Self {
        LibvirtError { message: message.into(), no_domain: false, timed_out: true, not_sent: false }
    }

    /// A call never sent: the deadline of the operation it served had passed (see
    /// [`crate::deadline`]). The operation ran out of time; nothing is left in flight.
    pub fn past_deadline(message: impl Into<String>) -> Self {
        LibvirtError { message: message.into(), no_domain: false, timed_out: true, not_sent: true }
    }

    /// Whether the call was never sent because its operation's deadline had passed (a
    /// [`LibvirtError::is_timeout`] that says the operation ran out of time, not that libvirt
    /// or QEMU stopped answering).
    pub fn is_past_deadline(&self) -> bool {
        self.not_sent
    }

    /// Whether libvirt said there is no such domain.
    pub fn is_no_domain(&self) -> bool {
        self.no_domain
    }

    /// Whether the call did not answer by its deadline: libvirtd or the domain's QEMU stopped
    /// answering, and the call may still take effect later.
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }
}

impl From<virt::error::Error> for LibvirtError {
    fn from(e: virt::error::Error) -> Self {
        LibvirtError {
            message: e.message().to_owned(),
            no_domain: matches!(e.code(), virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)),
            timed_out: false,
            not_sent: false,
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
    fn backup_begin(
        &self,
        domain: &str,
        backup_xml: &str,
        checkpoint_xml: Option<String>,
        reuse_external: bool,
    ) -> Result<(), LibvirtError>;
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
    /// Defines a passphrase secret that lives in libvirtd's memory only (`ephemeral='yes'`,
    /// `private='yes'`: never written to disk, never given back to a client), holding `value`,
    /// described as `description`, for QEMU to open an encrypted file with. Returns its UUID;
    /// [`Hypervisor::undefine_secret`] removes it.
    fn define_transient_secret(
        &self,
        description: &str,
        value: &nasbak_process::Secret,
    ) -> Result<String, LibvirtError>;
    /// Removes the secret of UUID `uuid`.
    fn undefine_secret(&self, uuid: &str) -> Result<(), LibvirtError>;
    /// The transient (ephemeral) secrets whose description starts with `prefix`: their UUIDs and
    /// descriptions. What [`Hypervisor::define_transient_secret`] defined for a process killed
    /// before it undefined them.
    fn transient_secrets(&self, prefix: &str) -> Result<Vec<(String, String)>, LibvirtError>;
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
///
/// Every call runs under a deadline (see [`crate::deadline`]): on a helper thread, waited for
/// until the earlier of the call timeout and the deadline the calling thread's operation set.
///
/// A call that did not answer is left on its connection, and the calls after it go over a new
/// one: libvirtd goes on answering other connections, but on this kind of host one of its
/// clients with a call stuck behind a silent QEMU also had calls that need no QEMU at all
/// (`virDomainGetState`, `virConnectGetVersion`) go unanswered, one time in two.
#[derive(Debug, Clone)]
pub struct LibvirtHypervisor {
    conn: Arc<Mutex<Arc<Connect>>>,
    uri: String,
    call_timeout: Duration,
}

fn split_version(v: u32) -> (u32, u32, u32) {
    (v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// What a call is, for the error when it does not answer.
struct Call {
    api: &'static str,
    domain: Option<String>,
    detail: Option<String>,
}

impl Call {
    fn new(api: &'static str) -> Self {
        Call { api, domain: None, detail: None }
    }
    fn on(api: &'static str, domain: &str) -> Self {
        Call { api, domain: Some(domain.to_owned()), detail: None }
    }
    fn about(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
    fn describe(&self) -> String {
        let mut s = self.api.to_owned();
        if let Some(d) = &self.domain {
            s.push_str(&format!(" on domain '{d}'"));
        }
        if let Some(d) = &self.detail {
            s.push_str(&format!(" ({d})"));
        }
        s
    }
}

/// How long the probe that tells a silent QEMU from a silent libvirtd may take.
const PROBE: Duration = Duration::from_secs(1);

impl LibvirtHypervisor {
    /// Connects to `uri` (under the default call timeout). Also silences libvirt's default error
    /// printer (errors come back as values).
    pub fn connect(uri: &str) -> Result<Self, LibvirtError> {
        virt::error::clear_error_callback();
        let owned = uri.to_owned();
        let deadline = crate::deadline::for_call(crate::deadline::DEFAULT_CALL_TIMEOUT);
        let wait = deadline.saturating_duration_since(Instant::now());
        match run_with_timeout(wait, move || Connect::open(Some(&owned))) {
            Some(conn) => Ok(LibvirtHypervisor {
                conn: Arc::new(Mutex::new(Arc::new(conn?))),
                uri: uri.to_owned(),
                call_timeout: crate::deadline::DEFAULT_CALL_TIMEOUT,
            }),
            None => Err(LibvirtError::timeout(format!(
                "connecting to {uri} did not answer within {}: libvirtd is not answering (is it running?)",
                crate::deadline::human(wait)
            ))),
        }
    }

    /// The same connection, each call of which takes at most `timeout` (the default is
    /// [`DEFAULT_CALL_TIMEOUT`](crate::deadline::DEFAULT_CALL_TIMEOUT)).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The longest one call may take.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The connection's URI as libvirt states it (for helpers that run `virsh`).
    pub fn uri(&self) -> Result<String, LibvirtError> {
        self.call(Call::new("virConnectGetURI"), |conn| Ok(conn.uri()?))
    }

    /// The domain handle, for callers that need `virt` directly (the guest agent).
    pub fn lookup(&self, domain: &str) -> Result<VirtDomain, LibvirtError> {
        let owned = domain.to_owned();
        self.call(Call::on("virDomainLookupByName", domain), move |conn| Ok(conn.lookup_domain_by_name(&owned)?))
    }

    /// Runs `f` on a helper thread and waits for it until the call's deadline.
    fn call<T: Send + 'static>(
        &self,
        what: Call,
        f: impl FnOnce(&Connect) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, LibvirtError> {
        let started = Instant::now();
        let deadline = crate::deadline::for_call(self.call_timeout);
        let wait = deadline.saturating_duration_since(started);
        if wait.is_zero() {
            return Err(LibvirtError::past_deadline(format!(
                "{} was not sent: the operation's deadline had passed",
                what.describe()
            )));
        }
        let conn = self.connection();
        match run_with_timeout(wait, move || f(&conn)) {
            Some(result) => result,
            None => Err(self.silent(&what, started.elapsed())),
        }
    }

    fn connection(&self) -> Arc<Connect> {
        Arc::clone(&self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Runs `f` on the domain `domain` (looked up on the helper thread too).
    fn on_domain<T: Send + 'static>(
        &self,
        what: Call,
        f: impl FnOnce(&VirtDomain) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, LibvirtError> {
        let name = what.domain.clone().unwrap_or_default();
        self.call(what, move |conn| f(&conn.lookup_domain_by_name(&name)?))
    }

    /// The error for a call that did not answer: whose silence it is (libvirtd answers a new
    /// connection and a version query that never reaches QEMU, or it does not), and what is
    /// left in flight. The new connection replaces the one the call is stuck on.
    fn silent(&self, what: &Call, waited: Duration) -> LibvirtError {
        let uri = self.uri.clone();
        let fresh = run_with_timeout(PROBE, move || {
            let conn = Connect::open(Some(&uri)).ok()?;
            conn.lib_version().is_ok().then_some(conn)
        })
        .flatten();
        let libvirtd_answers = fresh.is_some();
        if let Some(conn) = fresh {
            *self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(conn);
        }
        let who = match (&what.domain, libvirtd_answers) {
            (Some(d), true) => format!("the QEMU of domain '{d}' is not answering (libvirtd is)"),
            (None, true) => "libvirtd answers other calls but not this one".to_owned(),
            (_, false) => "libvirtd is not answering".to_owned(),
        };
        LibvirtError::timeout(format!(
            "{} timed out after {}: {who}; the call is left in flight on a helper thread and may still take effect",
            what.describe(),
            crate::deadline::human(waited)
        ))
    }

    fn job(&self, domain: &str, flags: u32) -> Result<JobInfo, LibvirtError> {
        let stats = self.on_domain(Call::on("virDomainGetJobStats", domain), move |d| Ok(ffi::job_stats(d, flags)?))?;
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
        self.call(Call::new("virConnectGetVersion"), |conn| {
            Ok(Versions { libvirt: split_version(conn.lib_version()?), qemu: split_version(conn.hyp_version()?) })
        })
    }

    fn domain_xml(&self, domain: &str) -> Result<String, LibvirtError> {
        self.on_domain(Call::on("virDomainGetXMLDesc", domain), |d| Ok(d.xml_desc(0)?))
    }

    fn domain_state(&self, domain: &str) -> Result<DomainState, LibvirtError> {
        let (state, _) = self.on_domain(Call::on("virDomainGetState", domain), |d| Ok(d.state()?))?;
        use virt::domain::DomainState as S;
        use virt::enumutil::Enum;
        Ok(match state {
            Enum::Known(S::Shutoff) => DomainState::ShutOff,
            Enum::Known(S::Running | S::Paused | S::Blocked) => DomainState::Running,
            _ => DomainState::Other,
        })
    }

    fn backup_begin(
        &self,
        domain: &str,
        backup_xml: &str,
        checkpoint_xml: Option<String>,
        reuse_external: bool,
    ) -> Result<(), LibvirtError> {
        let xml = backup_xml.to_owned();
        self.on_domain(Call::on("virDomainBackupBegin", domain), move |d| {
            Ok(ffi::backup_begin(d, &xml, checkpoint_xml.as_deref(), reuse_external)?)
        })
    }

    fn current_job(&self, domain: &str) -> Result<JobInfo, LibvirtError> {
        self.job(domain, 0)
    }

    fn completed_job(&self, domain: &str) -> Result<JobInfo, LibvirtError> {
        self.job(domain, virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
    }

    fn abort_job(&self, domain: &str) -> Result<(), LibvirtError> {
        self.on_domain(Call::on("virDomainAbortJob", domain), |d| Ok(ffi::abort_job(d)?))
    }

    fn backup_xml(&self, domain: &str) -> Result<String, LibvirtError> {
        self.on_domain(Call::on("virDomainBackupGetXMLDesc", domain), |d| Ok(ffi::backup_xml(d)?))
    }

    fn checkpoints(&self, domain: &str) -> Result<Vec<String>, LibvirtError> {
        self.on_domain(Call::on("virDomainListAllCheckpoints", domain), |d| Ok(ffi::checkpoint_names(d)?))
    }

    fn delete_checkpoint(&self, domain: &str, name: &str) -> Result<(), LibvirtError> {
        let owned = name.to_owned();
        let call = Call::on("virDomainCheckpointDelete", domain).about(format!("checkpoint {name}"));
        self.on_domain(call, move |d| Ok(ffi::delete_checkpoint(d, &owned, false)?))
    }

    fn forget_checkpoint(&self, domain: &str, name: &str) -> Result<(), LibvirtError> {
        let owned = name.to_owned();
        let call = Call::on("virDomainCheckpointDelete", domain).about(format!("checkpoint {name}, metadata only"));
        self.on_domain(call, move |d| Ok(ffi::delete_checkpoint(d, &owned, true)?))
    }

    fn checkpoint_xml(&self, domain: &str, name: &str) -> Result<String, LibvirtError> {
        let owned = name.to_owned();
        let call = Call::on("virDomainCheckpointGetXMLDesc", domain).about(format!("checkpoint {name}"));
        self.on_domain(call, move |d| Ok(ffi::checkpoint_xml(d, &owned)?))
    }

    fn redefine_checkpoint(&self, domain: &str, xml: &str, validate: bool) -> Result<(), LibvirtError> {
        let owned = xml.to_owned();
        self.on_domain(Call::on("virDomainCheckpointCreateXML", domain).about("redefine"), move |d| {
            Ok(ffi::redefine_checkpoint(d, &owned, validate)?)
        })
    }

    fn attach_disk(&self, domain: &str, disk_xml: &str, live: bool) -> Result<(), LibvirtError> {
        let mut flags = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
        if live {
            flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        let owned = disk_xml.to_owned();
        self.on_domain(Call::on("virDomainAttachDeviceFlags", domain), move |d| {
            d.attach_device_flags(&owned, flags)?;
            Ok(())
        })
    }

    fn secret_value(&self, auth: &crate::NetworkAuth) -> Result<nasbak_process::Secret, LibvirtError> {
        let auth = auth.clone();
        self.call(Call::new("virSecretGetValue"), move |conn| secret_value(conn, &auth))
    }

    fn define_transient_secret(
        &self,
        description: &str,
        value: &nasbak_process::Secret,
    ) -> Result<String, LibvirtError> {
        let xml = format!(
            "<secret ephemeral='yes' private='yes'><description>{}</description></secret>",
            quick_xml::escape::escape(description)
        );
        let value = ZeroOnDrop(value.expose().as_bytes().to_vec());
        self.call(Call::new("virSecretDefineXML"), move |conn| {
            let secret = conn.define_secret_xml(&xml, 0)?;
            let uuid = secret.uuid_string()?;
            if let Err(e) = secret.set_value(&value.0, 0) {
                let _ = secret.undefine();
                return Err(e.into());
            }
            Ok(uuid)
        })
    }

    fn undefine_secret(&self, uuid: &str) -> Result<(), LibvirtError> {
        let uuid = uuid.to_owned();
        self.call(Call::new("virSecretUndefine"), move |conn| {
            conn.lookup_secret_by_uuid_string(&uuid)?.undefine()?;
            Ok(())
        })
    }

    fn transient_secrets(&self, prefix: &str) -> Result<Vec<(String, String)>, LibvirtError> {
        let prefix = prefix.to_owned();
        self.call(Call::new("virConnectListAllSecrets"), move |conn| {
            let mut found = Vec::new();
            for secret in conn.list_all_secrets(virt::sys::VIR_CONNECT_LIST_SECRETS_EPHEMERAL)? {
                let xml = secret.xml_desc(0)?;
                let description = xml
                    .split_once("<description>")
                    .and_then(|(_, rest)| rest.split_once("</description>"))
                    .map(|(d, _)| quick_xml::escape::unescape(d).map_or_else(|_| d.to_owned(), |c| c.into_owned()))
                    .unwrap_or_default();
                if description.starts_with(&prefix) {
                    found.push((secret.uuid_string()?, description));
                }
            }
            Ok(found)
        })
    }

    fn block_size(&self, domain: &str, disk: &str) -> Result<BlockSize, LibvirtError> {
        let owned = disk.to_owned();
        let info = self
            .on_domain(Call::on("virDomainGetBlockInfo", domain).about(format!("disk {disk}")), move |d| {
                Ok(d.block_info(&owned, 0)?)
            })?;
        Ok(BlockSize { capacity: info.capacity, allocation: info.allocation })
    }

    fn inactive_xml(&self, domain: &str) -> Result<String, LibvirtError> {
        self.on_domain(Call::on("virDomainGetXMLDesc", domain).about("inactive"), |d| {
            Ok(d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE | virt::sys::VIR_DOMAIN_XML_SECURE)?)
        })
    }

    fn start_with_xml(&self, xml: &str) -> Result<(), LibvirtError> {
        let owned = xml.to_owned();
        self.call(Call::new("virDomainCreateXML"), move |conn| {
            conn.create_domain_xml(&owned, 0)?;
            Ok(())
        })
    }

    fn block_copy(&self, domain: &str, disk: &str, dest_xml: &str, flags: BlockCopyFlags) -> Result<(), LibvirtError> {
        let mut f = virt::sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
        if flags.reuse_external {
            f |= virt::sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT;
        }
        if flags.shallow {
            f |= virt::sys::VIR_DOMAIN_BLOCK_COPY_SHALLOW;
        }
        let (disk_owned, dest) = (disk.to_owned(), dest_xml.to_owned());
        self.on_domain(Call::on("virDomainBlockCopy", domain).about(format!("disk {disk}")), move |d| {
            Ok(ffi::block_copy(d, &disk_owned, &dest, flags.bandwidth, f)?)
        })
    }

    fn block_job(&self, domain: &str, disk: &str) -> Result<Option<BlockJob>, LibvirtError> {
        let owned = disk.to_owned();
        let call = Call::on("virDomainGetBlockJobInfo", domain).about(format!("disk {disk}"));
        let info = self.on_domain(call, move |d| Ok(ffi::block_job_info(d, &owned)?))?;
        Ok(info.map(|(_, cur, end)| BlockJob { cur, end }))
    }

    fn block_job_end(&self, domain: &str, disk: &str, pivot: bool) -> Result<(), LibvirtError> {
        let flags = if pivot { virt::sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT } else { 0 };
        let owned = disk.to_owned();
        let what = if pivot { "pivot" } else { "abandon" };
        let call = Call::on("virDomainBlockJobAbort", domain).about(format!("disk {disk}, {what}"));
        self.on_domain(call, move |d| Ok(ffi::block_job_abort(d, &owned, flags)?))
    }

    fn destroy(&self, domain: &str) -> Result<(), LibvirtError> {
        self.on_domain(Call::on("virDomainDestroy", domain), |d| {
            d.destroy()?;
            Ok(())
        })
    }
}

/// Bytes zeroed when dropped.
struct ZeroOnDrop(Vec<u8>);

impl Drop for ZeroOnDrop {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

/// The value of the secret `auth` names (see [`Hypervisor::secret_value`]).
fn secret_value(conn: &Connect, auth: &crate::NetworkAuth) -> Result<nasbak_process::Secret, LibvirtError> {
    let secret = match (&auth.secret_uuid, &auth.secret_usage, auth.secret_type.as_deref()) {
        (Some(uuid), _, _) => conn.lookup_secret_by_uuid_string(uuid)?,
        (None, Some(usage), Some("ceph")) => {
            conn.lookup_secret_by_usage(virt::sys::VIR_SECRET_USAGE_TYPE_CEPH as i32, usage)?
        }
        (None, Some(usage), Some("iscsi")) => {
            conn.lookup_secret_by_usage(virt::sys::VIR_SECRET_USAGE_TYPE_ISCSI as i32, usage)?
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
