//! nasbak as a service: the configuration file ([`config`]: repositories, offerings, VM
//! assignments, schedules), where a VM's backup goes ([`placement`]), prune by offering
//! ([`prune_vm`]) and [`run_due`], what a systemd timer calls every minute; the [`status`] of
//! every VM against its schedules, and its [`metrics`] for node_exporter.
//!
//! The engine (`nasbak`) takes repositories and requests, never a configuration file: an
//! orchestrator that embeds it brings its own configuration and scheduler and does not compile
//! this crate (nor `toml` and `chrono-tz`). The `nasbak` command uses both.
//!
//! ```
//! use std::path::Path;
//! use nasbak_service::config::Config;
//!
//! let config = Config::parse(
//!     "[[repository]]\nname = \"nas1\"\ntype = \"shared\"\naddress = \"/srv/backup\"\n\
//!      [[offering]]\nname = \"gold\"\nrepository = \"nas1\"\n\
//!      [assignments]\nweb1 = \"gold\"\n",
//!     Path::new("nasbak.toml"),
//! )?;
//! let p = nasbak_service::placement(&config, "web1", None, None, None)?;
//! assert_eq!(p.repository.name().as_str(), "nas1");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod config;
pub mod metrics;
mod run_due;
pub mod schedule;
mod slots;
pub mod status;

#[cfg(feature = "s3")]
pub use run_due::prune_target_vm;
pub use run_due::{
    CopiedOffsite, DueRun, Placement, RunDue, copy_offsite, placement, prune_vm, prune_vm_with, run_due,
};
