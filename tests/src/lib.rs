//! Test support for diskchain: a brute-force planning oracle that shares no code with the
//! planner, and fixtures that build real qcow2 chains with `qemu-img`/`qemu-io` and read them back
//! with `qemu-img map` as an independent oracle.
//!
//! The end-to-end tests themselves live in `tests/tests/` and drive the built `diskchain` binary.

pub mod alloc;
pub mod bitmap;
pub mod env;
pub mod libvirt;
pub mod oracle;
pub mod qemu;
