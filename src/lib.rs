//! chvkit: take a bare Linux host to running Cloud Hypervisor microVMs.
//!
//! Modules mirror the commands; [`host`] is the shared model of the machine that `doctor` reads
//! and `setup` changes, and [`profile`] is the desired state both compare against.

pub mod cli;
pub mod doctor;
pub mod envfile;
pub mod fsutil;
pub mod host;
pub mod jail;
pub mod kernel;
pub mod launch;
pub mod lockfile;
pub mod paths;
pub mod profile;
pub mod rootfs;
pub mod setup;
#[cfg(test)]
mod testutil;

/// What every command gets: the loaded profile and the `--root` prefix.
#[derive(Debug, Clone)]
pub struct Context {
    pub profile: profile::Profile,
    /// Where the profile came from, for messages.
    pub profile_source: String,
    pub root: paths::Root,
}

/// Process exit codes shared by all commands.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// A check failed / the operation failed.
    pub const FAILURE: i32 = 1;
    /// Usage or profile error (nothing was attempted).
    pub const USAGE: i32 = 2;
}
