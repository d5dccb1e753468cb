//! Pause points for the fault matrix (`cargo xtask faults`): with the `fault-points` feature, a
//! process whose `NASBAK_FAULT_PAUSE` names a phase stops itself (SIGSTOP) when it reaches that
//! phase, so a test can SIGKILL it exactly there. Without the feature they compile to nothing.

/// The environment variable that names the phase to stop at.
#[cfg(feature = "fault-points")]
pub const PAUSE_VAR: &str = "NASBAK_FAULT_PAUSE";

/// Stops this process if `NASBAK_FAULT_PAUSE` names `phase` (feature `fault-points` only).
#[cfg(feature = "fault-points")]
pub(crate) fn point(phase: &str) {
    if std::env::var(PAUSE_VAR).is_ok_and(|p| p == phase) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

/// Nothing, without the `fault-points` feature.
#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub(crate) fn point(_phase: &str) {}
