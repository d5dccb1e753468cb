//! The engine: the services a workflow composes, each behind its seam.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nasbak_agent::AgentTransport;
use nasbak_libvirt::{Hypervisor, LibvirtError};
use nasbak_qemu_img::ImageTool;
use nasbak_repo::{Mounter, RepositoryMounts};

use crate::clock::{Clock, SystemClock};

/// Where guest agents come from: a transport to the agent of a domain. Separate from
/// [`Hypervisor`] so an embedder can give the engine its own (a fake agent in tests, a proxy).
#[cfg_attr(any(test, feature = "mock"), mockall::automock(type Transport = nasbak_agent::fake::FakeAgent;))]
pub trait AgentSource {
    /// The transport type.
    type Transport: AgentTransport;
    /// A transport to the agent of `domain`.
    fn agent_transport(&self, domain: &str) -> Result<Self::Transport, LibvirtError>;
    /// The libvirt URI a thaw watchdog process reaches the domain by (`None`: no watchdog; a
    /// killed process then leaves the thaw to the next backup of the VM).
    fn watchdog_uri(&self) -> Option<String> {
        None
    }
}

impl AgentSource for nasbak_libvirt::LibvirtHypervisor {
    type Transport = nasbak_agent::LibvirtAgentTransport;
    fn agent_transport(&self, domain: &str) -> Result<Self::Transport, LibvirtError> {
        Ok(nasbak_agent::LibvirtAgentTransport::new(self.lookup(domain)?))
    }
    fn watchdog_uri(&self) -> Option<String> {
        self.uri().ok()
    }
}

/// The services the workflows compose: the hypervisor (`H`), the guest agents (`A`), qemu-img
/// (`I`) and the repository mounts (`M`), each a trait an embedder may implement or mock, and a
/// [`Clock`].
///
/// ```no_run
/// use nasbak::Engine;
/// use nasbak::nasbak_libvirt::LibvirtHypervisor;
/// use nasbak::nasbak_qemu_img::QemuImg;
/// use nasbak::nasbak_repo::{MountTimeouts, RepositoryMounts, SystemMounter};
///
/// let libvirt = LibvirtHypervisor::connect("qemu:///system")?;
/// let mounts = RepositoryMounts::new(SystemMounter::new("/run/nasbak"), "/run/nasbak", MountTimeouts::default());
/// // libvirt is both the hypervisor and the source of guest agents here; clones share a connection.
/// let engine = Engine::new(libvirt.clone(), libvirt, QemuImg::new("/run/nasbak"), mounts);
/// # Ok::<(), nasbak::nasbak_libvirt::LibvirtError>(())
/// ```
#[derive(Debug)]
pub struct Engine<H, A, I, M> {
    pub(crate) hypervisor: H,
    pub(crate) agents: A,
    pub(crate) images: I,
    pub(crate) mounts: RepositoryMounts<M>,
    pub(crate) agent_timeout: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) runtime_dir: PathBuf,
    pub(crate) scratch: Option<crate::request::Scratch>,
}

/// Where the engine keeps what lives only while this host runs (the NBD sockets of instant
/// restores and boot verifications, under `nbd/`) when the embedder does not say.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/nasbak";

/// The default time limit of each guest-agent call.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

impl<H, A, I, M> Engine<H, A, I, M>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    /// An engine over these services, with the system clock and a 10 s limit on each
    /// guest-agent call.
    pub fn new(hypervisor: H, agents: A, images: I, mounts: RepositoryMounts<M>) -> Self {
        Engine {
            hypervisor,
            agents,
            images,
            mounts,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            clock: Arc::new(SystemClock),
            runtime_dir: PathBuf::from(DEFAULT_RUNTIME_DIR),
            scratch: None,
        }
    }

    /// Has the push jobs of running VMs write to local scratch storage first (see
    /// [`crate::Scratch`]): guest writes never wait on the repository. Without it (the
    /// default) the job writes to the repository directly.
    pub fn with_scratch(mut self, scratch: crate::request::Scratch) -> Self {
        self.scratch = Some(scratch);
        self
    }

    /// Keeps the engine's runtime files (NBD sockets) under `dir` (default
    /// [`DEFAULT_RUNTIME_DIR`]); short, as a unix socket's path must be.
    pub fn with_runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_dir = dir.into();
        self
    }

    /// The time limit of each guest-agent call.
    pub fn with_agent_timeout(mut self, timeout: Duration) -> Self {
        self.agent_timeout = timeout;
        self
    }

    /// The clock backup ids, manifests and due schedules are decided by.
    pub fn with_clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The hypervisor.
    pub fn hypervisor(&self) -> &H {
        &self.hypervisor
    }

    /// The source of guest agents.
    pub fn agents(&self) -> &A {
        &self.agents
    }

    /// qemu-img.
    pub fn images(&self) -> &I {
        &self.images
    }

    /// The repository mounts.
    pub fn mounts(&self) -> &RepositoryMounts<M> {
        &self.mounts
    }

    /// The clock.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// The catalog (list, show, verify, delete, prune) over this engine's qemu-img and mounts.
    pub fn catalog(&self) -> Catalog<'_, I, M> {
        Catalog::new(&self.images, &self.mounts)
    }
}

/// The catalog of backups on repositories: list, verify, delete, prune and mount. It needs
/// qemu-img (to check images) and the repository mounts, never a hypervisor. Like [`Engine`], a
/// facade the catalog's workflows add their methods to.
#[derive(Debug)]
pub struct Catalog<'a, I, M> {
    images: &'a I,
    mounts: &'a RepositoryMounts<M>,
}

impl<'a, I: ImageTool, M: Mounter> Catalog<'a, I, M> {
    /// A catalog over these services.
    pub fn new(images: &'a I, mounts: &'a RepositoryMounts<M>) -> Self {
        Catalog { images, mounts }
    }

    /// The image tool.
    pub(crate) fn images(&self) -> &'a I {
        self.images
    }

    /// The repository mounts.
    pub fn mounts(&self) -> &'a RepositoryMounts<M> {
        self.mounts
    }
}
