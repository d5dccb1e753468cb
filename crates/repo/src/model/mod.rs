//! The pure model: names, addresses, mount options, repositories, layout, retention, mountinfo
//! text.
//!
//! Invariant: nothing in this module does any I/O (no files, no processes, no clock). It can
//! be fuzzed and property-tested freely, and everything with side effects lives in
//! the `mount` and `store` modules.

pub mod address;
pub mod error;
pub mod host;
pub mod layout;
pub mod manifest;
pub mod mountinfo;
pub mod name;
pub mod options;
pub mod protection;
pub mod qcow2;
pub mod reference;
pub mod repository;
pub mod retention;
pub mod target;
