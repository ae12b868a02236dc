//! Helpers for kvroute's cross-crate process tests: locating the built binaries, spawning them on
//! loopback, and waiting for readiness.
