//! The real [`Mounter`]: mount(8)/umount(8) as argv with timeouts, statvfs under a timeout.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, umount2};

use super::{Capacity, MountError, Mounter, UnmountOutcome};
use crate::model::mountinfo::{MountInfoEntry, parse_mountinfo};
use crate::model::options::MountOption;
use crate::model::repository::MountPlan;
use nasbak_process::ExternalCommand;
use nasbak_process::run_with_timeout;

/// Mounts with the host's mount(8) and umount(8).
///
/// Credentials go to a file created 0600 with `O_EXCL` in a 0700 private directory, named by
/// the `credentials=`/`secretfile=` option and removed as soon as mount(8) returns, whatever it
/// returned. The argv of mount(8) never holds a secret.
#[derive(Debug, Clone)]
pub struct SystemMounter {
    mount_program: PathBuf,
    umount_program: PathBuf,
    private_dir: PathBuf,
}

impl SystemMounter {
    /// Uses `mount` and `umount` from `PATH`, with credentials files under
    /// `<runtime_dir>/private`.
    pub fn new(runtime_dir: impl AsRef<Path>) -> Self {
        SystemMounter {
            mount_program: "mount".into(),
            umount_program: "umount".into(),
            private_dir: runtime_dir.as_ref().join("private"),
        }
    }

    /// Uses another mount(8), for instance a wrapper that records what it was given.
    pub fn with_mount_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.mount_program = program.into();
        self
    }

    fn write_credentials(&self, contents: &str) -> Result<CredentialsGuard, MountError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| MountError::Io { action, path, source }
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.private_dir)
            .map_err(io("creating the private directory", &self.private_dir))?;
        fs::set_permissions(&self.private_dir, fs::Permissions::from_mode(0o700))
            .map_err(io("restricting the private directory", &self.private_dir))?;
        let path = self.private_dir.join(format!("cred-{}", uuid::Uuid::new_v4()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("creating the credentials file", &path))?;
        let guard = CredentialsGuard(path.clone());
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io("writing the credentials file", &path))?;
        Ok(guard)
    }
}

/// Removes the credentials file on every path out.
struct CredentialsGuard(PathBuf);

impl Drop for CredentialsGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

impl Mounter for SystemMounter {
    fn mount(&self, plan: &MountPlan, target: &Path, timeout: Duration) -> Result<(), MountError> {
        let mut options = plan.options.clone();
        let _guard = match &plan.credentials {
            Some(creds) => {
                let guard = self.write_credentials(creds.contents.expose())?;
                let path = guard.0.to_string_lossy().into_owned();
                options.push(MountOption::with_value(creds.option, &path).map_err(|e| MountError::Io {
                    action: "naming the credentials file",
                    path: guard.0.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                })?);
                Some(guard)
            }
            None => None,
        };
        let mut cmd = ExternalCommand::new(&self.mount_program).arg("-t").arg(&plan.fstype);
        if !options.is_empty() {
            cmd = cmd.arg("-o").arg(options.to_mount_string());
        }
        cmd.arg(&plan.source).arg(target).timeout(timeout).run().map(drop).map_err(|source| MountError::Command {
            action: "mounting",
            path: target.to_owned(),
            source,
        })
    }

    fn unmount(&self, target: &Path, timeout: Duration) -> Result<UnmountOutcome, MountError> {
        let reason = match ExternalCommand::new(&self.umount_program).arg("-c").arg(target).timeout(timeout).run() {
            Ok(_) => return Ok(UnmountOutcome::Clean),
            Err(e) => e.to_string(),
        };
        let owned = target.to_owned();
        match run_with_timeout(Duration::from_secs(5), move || umount2(&owned, MntFlags::MNT_DETACH)) {
            Some(Ok(())) => Ok(UnmountOutcome::Lazy { reason }),
            Some(Err(errno)) => Err(MountError::Io {
                action: "lazily unmounting",
                path: target.to_owned(),
                source: std::io::Error::other(format!("{errno} after {reason}")),
            }),
            None => Err(MountError::TimedOut {
                action: "lazily unmounting",
                path: target.to_owned(),
                timeout: Duration::from_secs(5),
            }),
        }
    }

    fn mounts(&self) -> Result<Vec<MountInfoEntry>, MountError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|source| MountError::Io {
            action: "reading",
            path: path.to_owned(),
            source,
        })?;
        Ok(parse_mountinfo(&text))
    }

    fn probe(&self, path: &Path, timeout: Duration) -> Result<(), MountError> {
        statvfs_timed(path, timeout, "probing").map(drop)
    }

    fn capacity(&self, path: &Path, timeout: Duration) -> Result<Capacity, MountError> {
        let s = statvfs_timed(path, timeout, "measuring")?;
        let frag = s.fragment_size();
        let total = s.blocks() * frag;
        let free = s.blocks_free() * frag;
        Ok(Capacity { total, used: total.saturating_sub(free), available: s.blocks_available() * frag })
    }
}

fn statvfs_timed(
    path: &Path,
    timeout: Duration,
    action: &'static str,
) -> Result<nix::sys::statvfs::Statvfs, MountError> {
    let owned = path.to_owned();
    match run_with_timeout(timeout, move || nix::sys::statvfs::statvfs(&owned)) {
        Some(Ok(s)) => Ok(s),
        Some(Err(errno)) => Err(MountError::Io { action, path: path.to_owned(), source: errno.into() }),
        None => Err(MountError::TimedOut { action, path: path.to_owned(), timeout }),
    }
}
