//! One module per command group; this one holds what they share: the services (libvirt only for
//! the commands that touch a VM), Ctrl-C, and resolving repositories and backup references.

mod backup;
mod catalog;
mod offsite;
mod restore;
mod settings;

use anyhow::{Context, Result, anyhow};
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{BackupRef, BackupRepository, MountTimeouts, RepositoryMounts, SystemMounter};
use nasbak::{BackupError, Catalog, Engine};
use nasbak_service::config::Config;

use crate::args::{Cli, Command};

/// Where nasbak keeps its mount points, locks and temporary keyrings.
pub const RUNTIME: &str = "/run/nasbak";

/// Runs the command; returns the exit code of a command that ran to its end.
pub fn run(cli: &Cli) -> Result<u8> {
    // Completions and the manual page are made from the command line's own definition: no
    // configuration is read for them.
    let mut config = match &cli.command {
        Command::Completions { .. } | Command::Man => Config::default(),
        _ => Config::load(&cli.config)?,
    };
    match &cli.command {
        Command::Completions { shell } => {
            // Made in memory first: a closed stdout is an error, not a panic in the generator.
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "nasbak", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(0)
        }
        Command::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
            Ok(0)
        }
        Command::Repo(cmd) => settings::repo(cli, &mut config, cmd),
        Command::Key(cmd) => settings::key(cli, &mut config, cmd),
        Command::Offering(cmd) => settings::offering(cli, &mut config, cmd),
        Command::Assign { vm, offering } => settings::assign(cli, &mut config, vm, offering),
        Command::Unassign { vm } => settings::unassign(cli, &mut config, vm),
        Command::Schedule(cmd) => settings::schedule(cli, &mut config, cmd),
        Command::Backup { vm, offering, repo, quiesce, timeout, mode } => {
            backup::backup(cli, &config, vm, (offering.as_deref(), repo.as_deref()), *quiesce, *timeout, *mode)
        }
        Command::RunDue => backup::run_due(cli, &config),
        Command::Status => catalog::status(cli, &config),
        Command::Metrics { textfile } => catalog::metrics(&config, &cli.state, textfile.as_deref()),
        Command::Target(cmd) => offsite::target(cli, &mut config, cmd),
        Command::Copy { backup, all: _, to, repo, bandwidth } => {
            offsite::copy(cli, &config, backup.as_deref(), to, repo.as_deref(), *bandwidth)
        }
        Command::List { vm, target: Some(t), .. } => offsite::list(cli, &config, t, vm.as_deref()),
        Command::List { vm, repo, target: None } => catalog::list(cli, &config, vm.as_deref(), repo.as_deref()),
        Command::Show { id } => catalog::show(cli, &config, id),
        Command::Verify { id: Some(id), boot: true, timeout, check, .. } => {
            backup::verify_boot(cli, &config, id, *timeout, check.as_deref())
        }
        Command::Verify { id, target: Some(t), .. } => offsite::verify(cli, &config, t, id.as_ref()),
        Command::Verify { id, all, repo, .. } => catalog::verify(cli, &config, id.as_ref(), *all, repo.as_deref()),
        Command::Delete { id } => catalog::delete(&config, id),
        Command::Mount { id, dir, disk, luks_key_file } => {
            catalog::mount(cli, &config, id, dir, disk.as_deref(), luks_key_file.as_deref())
        }
        Command::Umount { dir } => catalog::umount(cli, dir),
        Command::Prune { vm, dry_run, target: None } => catalog::prune(cli, &config, vm.as_deref(), *dry_run),
        Command::Prune { vm, dry_run, target: Some(t) } => offsite::prune(cli, &config, t, vm.as_deref(), *dry_run),
        Command::Restore { id, vm, instant: false, from, .. } => {
            restore::restore(cli, &config, id, vm.as_deref(), from.as_deref())
        }
        Command::Restore { id, vm, instant: true, detach, timeout, bandwidth, .. } => {
            restore::instant(cli, &config, id, vm.as_deref(), (*detach, *timeout, *bandwidth))
        }
        Command::Instant(cmd) => restore::instant_command(cli, cmd),
        Command::RestoreVolume { id, disk, to, format, attach, bandwidth, from } => restore::restore_volume(
            cli,
            &config,
            id,
            (disk, to, format.as_deref()),
            (attach.as_deref(), *bandwidth, from.as_deref()),
        ),
    }
}

fn mounts() -> RepositoryMounts<SystemMounter> {
    RepositoryMounts::new(SystemMounter::new(RUNTIME), RUNTIME, MountTimeouts::default())
}

/// qemu-img and the mounts: all the catalog commands need (never libvirt).
struct CatalogServices {
    images: QemuImg,
    mounts: RepositoryMounts<SystemMounter>,
}

impl CatalogServices {
    fn new() -> Self {
        CatalogServices { images: QemuImg::new(RUNTIME), mounts: mounts() }
    }
    fn catalog(&self) -> Catalog<'_, QemuImg, SystemMounter> {
        Catalog::new(&self.images, &self.mounts)
    }
}

pub(crate) type LibvirtEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

/// The engine over libvirt at `uri` (also the source of guest agents), qemu-img and the mounts.
fn engine(cli: &Cli) -> Result<LibvirtEngine> {
    let uri = &cli.uri;
    let libvirt = LibvirtHypervisor::connect(uri)
        .with_context(|| format!("connecting to {uri}"))?
        .with_call_timeout(cli.libvirt_timeout);
    Ok(Engine::new(libvirt.clone(), libvirt, QemuImg::new(RUNTIME), mounts()).with_runtime_dir(RUNTIME))
}

/// The engine for backups: [`engine`] with the configuration's scratch storage, if any.
fn backup_engine(cli: &Cli, config: &Config) -> Result<LibvirtEngine> {
    let e = engine(cli)?;
    Ok(match &config.scratch {
        Some(scratch) => e.with_scratch(scratch.clone()),
        None => e,
    })
}

/// A cancel handle that Ctrl-C (and SIGTERM from systemd) triggers.
fn cancel_on_interrupt() -> Result<CancelHandle> {
    let cancel = CancelHandle::new();
    let handle = cancel.clone();
    ctrlc::set_handler(move || handle.cancel()).context("installing the Ctrl-C handler")?;
    Ok(cancel)
}

fn not_found(what: String) -> anyhow::Error {
    anyhow!(BackupError::NotFound { what })
}

/// The repository called `name`, or the only one there is.
fn pick_repo<'a>(config: &'a Config, name: Option<&str>) -> Result<&'a BackupRepository> {
    match name {
        Some(n) => config.repository(n).ok_or_else(|| not_found(format!("repository {n}"))),
        None if config.repositories.len() == 1 => Ok(&config.repositories[0]),
        None => Err(anyhow!(BackupError::Ambiguous {
            what: format!("which repository with REPO: or --repo (there are {})", config.repositories.len())
        })),
    }
}

/// The repository of a backup reference: the one it names, else the VM's offering's, else the
/// only one there is.
fn repo_of<'a>(config: &'a Config, id: &BackupRef) -> Result<&'a BackupRepository> {
    let named = id.repository.as_ref().map(|r| r.as_str());
    let repo = named.or_else(|| config.offering_of(id.vm.as_str()).map(|o| o.repository.as_str()));
    pick_repo(config, repo)
}

/// Every repository, or only the one called `name`.
fn repos<'a>(config: &'a Config, name: Option<&str>) -> Result<Vec<&'a BackupRepository>> {
    Ok(match name {
        Some(r) => vec![pick_repo(config, Some(r))?],
        None => config.repositories.iter().collect(),
    })
}
