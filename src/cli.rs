//! Command-line front end: parses flags, loads the profile, dispatches, maps errors to exit codes.

mod completions;

use std::path::PathBuf;

use clap::{FromArgMatches, Parser};

pub use self::completions::{man_pages, write_man_pages, CompletionsArgs};

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
    #[arg(
        long,
        global = true,
        env = "CHVKIT_PROFILE",
        value_name = "FILE",
        value_hint = clap::ValueHint::FilePath
    )]
    pub profile: Option<PathBuf>,

    /// Prefix for every file chvkit reads or writes on the host (install dir, sysctl.d, units,
    /// state). Networking is not affected: use a network namespace for that.
    #[arg(
        long,
        global = true,
        env = "CHVKIT_ROOT",
        value_name = "DIR",
        value_hint = clap::ValueHint::DirPath
    )]
    pub root: Option<PathBuf>,

    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug)]
pub enum Command {
    Doctor(crate::doctor::DoctorArgs),
    Setup(crate::setup::SetupArgs),
    Teardown(crate::setup::TeardownArgs),
    Rootfs(crate::rootfs::RootfsArgs),
    Kernel(crate::kernel::KernelArgs),
    Launch(Box<crate::launch::LaunchArgs>),
    Vm(crate::launch::VmCommand),
    Gc(crate::launch::GcArgs),
    Completions(CompletionsArgs),
}

/// What adds a command's arguments (or subcommands) to it.
type AddArgs = fn(clap::Command) -> clap::Command;

/// Each command: name, one-line help, and what adds its arguments.
const COMMANDS: [(&str, &str, AddArgs); 9] = {
    use clap::{Args, Subcommand};
    [
        (
            "doctor",
            "Check the host against the profile (read-only) and say how to fix each finding",
            crate::doctor::DoctorArgs::augment_args,
        ),
        (
            "setup",
            "Converge the host to the profile: artifacts, bridge, sysctls, NAT. Idempotent",
            crate::setup::SetupArgs::augment_args,
        ),
        (
            "teardown",
            "Undo what setup did, and nothing else",
            crate::setup::TeardownArgs::augment_args,
        ),
        (
            "rootfs",
            "Build a raw ext4 guest root filesystem from a Dockerfile or an OCI image",
            crate::rootfs::RootfsArgs::augment_args,
        ),
        (
            "kernel",
            "Provide the guest kernel the profile asks for (build, distro or path) and say where it is",
            crate::kernel::KernelArgs::augment_args,
        ),
        (
            "launch",
            "Launch a microVM for one job and return its exit status",
            crate::launch::LaunchArgs::augment_args,
        ),
        (
            "vm",
            "Manage detached VMs (ls, info, pause, resume, snapshot, restore, stop, logs)",
            crate::launch::VmCommand::augment_subcommands,
        ),
        (
            "gc",
            "Remove what dead jobs left behind (TAPs, sockets, run dirs)",
            crate::launch::GcArgs::augment_args,
        ),
        (
            "completions",
            "Print a shell completion script (bash, zsh, fish, elvish, powershell)",
            CompletionsArgs::augment_args,
        ),
    ]
};

// By hand rather than derived so that each command's arguments are built only when that
// command runs (`Command::defer`): building all of them costs a scripted `launch` about a
// tenth of a millisecond of cold code and allocations before it can start the VMM. The
// arguments themselves stay derived in each command's module.
impl clap::Subcommand for Command {
    fn augment_subcommands(mut cmd: clap::Command) -> clap::Command {
        for (name, about, args) in COMMANDS {
            let mut sub = clap::Command::new(name).about(about).defer(args);
            if name == "vm" {
                sub = sub.subcommand_required(true).arg_required_else_help(true);
            }
            cmd = cmd.subcommand(sub);
        }
        cmd
    }

    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_subcommands(cmd)
    }

    fn has_subcommand(name: &str) -> bool {
        COMMANDS.iter().any(|(n, _, _)| *n == name)
    }
}

impl clap::FromArgMatches for Command {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut m.clone())
    }

    fn from_arg_matches_mut(m: &mut clap::ArgMatches) -> Result<Self, clap::Error> {
        use clap::error::ErrorKind;
        let Some((name, mut sub)) = m.remove_subcommand() else {
            return Err(clap::Error::raw(
                ErrorKind::MissingSubcommand,
                "a command is required",
            ));
        };
        let sub = &mut sub;
        Ok(match name.as_str() {
            "doctor" => Command::Doctor(FromArgMatches::from_arg_matches_mut(sub)?),
            "setup" => Command::Setup(FromArgMatches::from_arg_matches_mut(sub)?),
            "teardown" => Command::Teardown(FromArgMatches::from_arg_matches_mut(sub)?),
            "rootfs" => Command::Rootfs(FromArgMatches::from_arg_matches_mut(sub)?),
            "kernel" => Command::Kernel(FromArgMatches::from_arg_matches_mut(sub)?),
            "launch" => Command::Launch(Box::new(FromArgMatches::from_arg_matches_mut(sub)?)),
            "vm" => Command::Vm(FromArgMatches::from_arg_matches_mut(sub)?),
            "gc" => Command::Gc(FromArgMatches::from_arg_matches_mut(sub)?),
            "completions" => Command::Completions(FromArgMatches::from_arg_matches_mut(sub)?),
            other => {
                return Err(clap::Error::raw(
                    ErrorKind::InvalidSubcommand,
                    format!("unknown command `{other}`"),
                ))
            }
        })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
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
    // Completions describe the command line itself: no profile is loaded, so a broken
    // CHVKIT_PROFILE cannot break a shell's start-up.
    if let Command::Completions(a) = &cli.command {
        return exit_code(completions::print_completions(a));
    }
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
        Command::Kernel(a) => crate::kernel::run(&ctx, a),
        Command::Launch(a) => crate::launch::run_launch(&ctx, *a),
        Command::Vm(c) => crate::launch::run_vm(&ctx, c),
        Command::Gc(a) => crate::launch::run_gc(&ctx, a),
        // Returned above, before the profile; dispatched here too so that no arm can panic.
        Command::Completions(a) => completions::print_completions(&a),
    };
    exit_code(result)
}

fn exit_code(result: anyhow::Result<i32>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chvkit: error: {e:#}");
            exit::FAILURE
        }
    }
}
