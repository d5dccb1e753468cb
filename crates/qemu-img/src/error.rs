//! What every image operation shares: its error, and how it tells its progress.

use std::path::PathBuf;

use nasbak_process::CommandError;

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
