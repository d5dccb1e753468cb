//! Process plumbing for nasbak: external programs run as an argv (never through a shell) with a
//! timeout and process-group kill, blocking calls run under a deadline, cancel handles, and the
//! redaction that keeps secrets out of every argv shown in a message, and the [`Secret`] type
//! that never shows itself.
//!
//! The key decision: nothing here may hang its caller. A command that outlives its timeout or
//! its cancel is killed with its whole process group (the helpers `mount` forks die too); a
//! child stuck in the kernel on a dead server leaves only a waiting thread behind, never a
//! blocked caller.
//!
//! ```
//! use std::time::Duration;
//! use nasbak_process::{CancelHandle, CommandError, ExternalCommand};
//!
//! let out = ExternalCommand::new("sh").args(["-c", "echo hello"]).timeout(Duration::from_secs(5)).run()?;
//! assert_eq!(out.stdout_text(), "hello\n");
//!
//! // A cancelled handle kills the command (and its children) within 100 ms.
//! let cancel = CancelHandle::new();
//! cancel.cancel();
//! let e = ExternalCommand::new("sleep").arg("30").cancel_on(&cancel).run().unwrap_err();
//! assert!(matches!(e, CommandError::Cancelled { .. }));
//!
//! // Secrets never reach a message.
//! let mount = ExternalCommand::new("mount").args(["-o", "username=b,password=hunter2"]);
//! assert_eq!(mount.display_argv(), "mount -o username=b,password=***");
//! # Ok::<(), CommandError>(())
//! ```

#![deny(missing_docs)]

pub mod cancel;
pub mod command;
pub mod redact;
pub mod secret;
pub mod timed;

pub use cancel::CancelHandle;
pub use command::{CommandError, CommandOutput, ExternalCommand, StdoutObserver, StdoutSink};
pub use secret::Secret;
pub use timed::run_with_timeout;
