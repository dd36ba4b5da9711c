//! Command-line front end: parses flags, loads the profile, dispatches, maps errors to exit codes.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{exit, paths::Root, profile::Profile, Context};

#[derive(Debug, Parser)]
#[command(
    name = "chvkit",
    version,
    about = "Take a bare Linux host to running Cloud Hypervisor microVMs",
    propagate_version = true
)]
pub struct Cli {
    /// Host profile (YAML). Default: the embedded profiles/default.yaml.
    #[arg(long, global = true, env = "CHVKIT_PROFILE", value_name = "FILE")]
    pub profile: Option<PathBuf>,

    /// Prefix for every file chvkit reads or writes on the host (install dir, sysctl.d, units,
    /// state). Networking is not affected: use a network namespace for that.
    #[arg(long, global = true, env = "CHVKIT_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the host against the profile (read-only) and say how to fix each finding.
    Doctor(crate::doctor::DoctorArgs),
    /// Converge the host to the profile: artifacts, bridge, sysctls, NAT. Idempotent.
    Setup(crate::setup::SetupArgs),
    /// Undo what setup did, and nothing else.
    Teardown(crate::setup::TeardownArgs),
    /// Build a raw ext4 guest root filesystem from a Dockerfile or an OCI image.
    Rootfs(crate::rootfs::RootfsArgs),
    /// Launch a microVM for one job and return its exit status.
    Launch(Box<crate::launch::LaunchArgs>),
    /// Manage detached VMs (ls, info, pause, resume, snapshot, restore, stop, logs).
    #[command(subcommand)]
    Vm(crate::launch::VmCommand),
    /// Remove what dead jobs left behind (TAPs, sockets, run dirs).
    Gc(crate::launch::GcArgs),
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Parse the command line, run, and return the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let profile = match Profile::load(cli.profile.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("chvkit: profile error: {e}");
            return exit::USAGE;
        }
    };
    let ctx = Context {
        profile,
        profile_source: cli
            .profile
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| crate::profile::DEFAULT_PROFILE_NAME.to_string()),
        root: Root::new(cli.root.clone()),
    };
    let result = match cli.command {
        Command::Doctor(a) => crate::doctor::run(&ctx, a),
        Command::Setup(a) => crate::setup::run_setup(&ctx, a),
        Command::Teardown(a) => crate::setup::run_teardown(&ctx, a),
        Command::Rootfs(a) => crate::rootfs::run(&ctx, a),
        Command::Launch(a) => crate::launch::run_launch(&ctx, *a),
        Command::Vm(c) => crate::launch::run_vm(&ctx, c),
        Command::Gc(a) => crate::launch::run_gc(&ctx, a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chvkit: error: {e:#}");
            exit::FAILURE
        }
    }
}
