//! What every image operation shares: its error, and how it tells its progress.

use std::path::PathBuf;

use nasbak_process::CommandError;

/// What QEMU says when the key opens none of a LUKS header's keyslots.
pub(crate) const WRONG_KEY: &str = "Invalid password, cannot unlock any keyslot";

/// Progress of a long operation, as a percentage from 0 to 100.
pub type ProgressFn = dyn Fn(f64) + Send + Sync;

/// An image operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// qemu-img failed, timed out or could not run.
    #[error("qemu-img {action} failed")]
    Command {
        /// What was being done.
        action: &'static str,
        /// argv (no secrets), status, stderr.
        #[source]
        source: CommandError,
    },
    /// qemu-img printed something we could not read.
    #[error("could not read the output of qemu-img {action}: {detail}")]
    Output {
        /// What was being done.
        action: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// qemu-storage-daemon failed, timed out or could not run.
    #[error("qemu-storage-daemon {action} failed: {detail}")]
    Daemon {
        /// What was being done.
        action: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A LUKS header could not be read, opened or changed by nasbak itself.
    #[error(transparent)]
    Luks(#[from] crate::luks::LuksError),
    /// A temporary keyring file could not be written.
    #[error("could not write a temporary keyring in {dir}")]
    Keyring {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// Whether the key given did not open an encrypted image (no LUKS keyslot took it), as
    /// opposed to a damaged image or a failure to run.
    pub fn is_wrong_key(&self) -> bool {
        let said = match self {
            ImageError::Luks(crate::luks::LuksError::WrongKey { .. }) => return true,
            ImageError::Command { source: CommandError::Failed { stderr, .. }, .. } => stderr.as_str(),
            ImageError::Daemon { detail, .. } | ImageError::Output { detail, .. } => detail.as_str(),
            _ => return false,
        };
        said.contains(WRONG_KEY)
    }
}
