//! `chvkit launch`, `chvkit vm …` and `chvkit gc`: one job's microVM through Cloud
//! Hypervisor's REST API, from a prepared disk and TAP to its exit status, with nothing left
//! behind. See docs/launch.md.

/// `println!` that ignores a closed stdout (`chvkit vm ls | head` must not panic).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

pub mod api;
pub mod cleanup;
pub mod config;
pub mod disk;
pub mod events;
pub mod gc;
pub mod identity;
mod job;
pub mod qcow2;
mod restore;
pub mod run;
pub mod rundir;
pub mod snapshot;
mod supervisor;
pub mod tap;
mod target;
pub mod vm;
pub mod vmm;

use std::path::PathBuf;

pub use crate::jail::JailMode;
use crate::Context;

/// Exit codes of `launch` besides the guest's own (0..=255 from `CHVKIT_EXIT=<n>`). They overlap
/// with what a guest may return; `--json` reports the reason unambiguously.
pub mod code {
    /// chvkit could not set the job up (disk, TAP, bridge, ...): nothing was booted.
    pub const SETUP_FAILED: i32 = crate::exit::FAILURE;
    /// The VMM died on its own (crash, killed by someone else).
    pub const VMM_CRASHED: i32 = 70;
    /// `--timeout` passed before the guest powered off.
    pub const TIMEOUT: i32 = 71;
    /// The VM could not be started: missing kernel, VMM refused `vm.create`/`vm.boot`/restore.
    pub const BOOT_FAILED: i32 = 72;
    /// The guest powered off without printing `CHVKIT_EXIT=<n>`.
    pub const NO_EXIT_LINE: i32 = 73;
    /// The guest rebooted (Cloud Hypervisor would loop); stopped.
    pub const GUEST_REBOOTED: i32 = 74;
    /// The guest kernel panicked (pvpanic `guest panic` event); stopped.
    pub const GUEST_PANICKED: i32 = 75;
    /// SIGINT/SIGTERM/SIGHUP: 128 + the signal number, like a shell.
    pub const SIGNAL_BASE: i32 = 128;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LandlockMode {
    /// On when the kernel offers Landlock ABI v3 or newer (Cloud Hypervisor's requirement).
    Auto,
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Launch configuration (YAML or JSON; the seed's JSON shape works as is). Flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Root filesystem image (raw ext4, or qcow2). Never modified: the job gets its own view.
    #[arg(long, value_name = "FILE")]
    pub rootfs: Option<PathBuf>,
    /// Guest kernel for direct boot (beats CHV_KERNEL_PATH, the config and the profile).
    #[arg(long, value_name = "FILE", conflicts_with = "firmware")]
    pub kernel: Option<PathBuf>,
    /// Initramfs for direct kernel boot.
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    /// Firmware boot (rust-hypervisor-firmware): only for disks with a GPT and an EFI System
    /// Partition.
    #[arg(long, value_name = "FILE")]
    pub firmware: Option<PathBuf>,
    /// vCPUs (boot = max).
    #[arg(long)]
    pub cpus: Option<u8>,
    /// Guest memory: MiB, or with a unit (512M, 2G).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Extra kernel command line, appended to the profile's `vm.cmdline` and what the kernel and
    /// this host need (`init=/init` without an initramfs; `clearcpuid=…` on PVM hosts).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Job id (1-64 of [A-Za-z0-9._-]); generated when absent. Derives the guest's IPv6, MAC
    /// and TAP name.
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
    /// Extra variable for the guest's /etc/checker.env (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// CHECKER_API_URL for the guest (default: the profile's network.api_url).
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,
    /// Bridge to attach the TAP to (default: the config's network.bridge_name, else the
    /// profile's network.bridge).
    #[arg(long, value_name = "NAME")]
    pub bridge: Option<String>,
    /// Guest MAC instead of the one derived from the job id.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,
    /// Stop the VM if it has not powered off this long after boot (30s, 5m, ...).
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// How long the VMM gets to exit after vm.shutdown + vmm.shutdown before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "3s")]
    pub grace: String,
    /// Return once the VM is booted; manage it with `chvkit vm …`.
    #[arg(long)]
    pub detach: bool,
    /// Stream the guest's serial console to stdout.
    #[arg(long)]
    pub console: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Keep the per-job disk after the job ends (its path is printed).
    #[arg(long)]
    pub keep: bool,
    /// Copy serial, event and VMM logs and the state file to DIR/<job>/ when the job ends.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Landlock sandboxing of the VMM.
    #[arg(long, value_enum, default_value = "auto")]
    pub landlock: LandlockMode,
    /// Extra directory the (Landlocked) VMM may write snapshots under (repeatable).
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Vec<PathBuf>,
    /// Confine the VMM: a uid/gid of the job's own (profile `launch.uid_range`), no
    /// capabilities, no_new_privs, and a cgroup with memory, pids and CPU limits. `off` runs it
    /// as root (hosts without cgroup access); `auto` jails when the host can, else warns.
    #[arg(long, value_enum, default_value = "auto")]
    pub jail: JailMode,
    /// Where per-job disks go (default <state_dir>/disks). Put it on the rootfs's filesystem
    /// to get reflinks where the filesystem supports them.
    #[arg(long, value_name = "DIR")]
    pub disk_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// List jobs: job, state, pid, IP, TAP, uptime.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a job's state and the VMM's vm.info.
    Info {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Pause a running VM.
    Pause { job: String },
    /// Resume a paused VM.
    Resume { job: String },
    /// Snapshot a VM into DIR (pause, snapshot, resume).
    Snapshot {
        job: String,
        dir: PathBuf,
        /// End the job after the snapshot instead of resuming; the snapshot then carries the
        /// job's disk, consistent with its memory.
        #[arg(long)]
        stop: bool,
    },
    /// Restore a snapshot into a fresh VMM (TAP recreated first), resume it, print the time.
    Restore {
        dir: PathBuf,
        /// Job id for the restored VM (default: the snapshot's).
        #[arg(long, value_name = "ID")]
        job_id: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "auto")]
        landlock: LandlockMode,
        /// The same jail as `launch --jail` (the snapshot's uid again when it is free).
        #[arg(long, value_enum, default_value = "auto")]
        jail: JailMode,
    },
    /// Stop a job: vm.shutdown, vmm.shutdown, SIGKILL after the grace period; remove
    /// everything it used.
    Stop {
        job: String,
        #[arg(long, value_name = "DURATION", default_value = "3s")]
        grace: String,
    },
    /// Print a job's serial console log (or its events).
    Logs {
        job: String,
        /// Keep printing until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// The event log instead of the serial log.
        #[arg(long)]
        events: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Only say what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Also remove cached qcow2 bases whose rootfs changed or vanished and that no job uses.
    #[arg(long)]
    pub bases: bool,
}

pub fn run_launch(ctx: &Context, a: LaunchArgs) -> anyhow::Result<i32> {
    run::launch(ctx, a)
}

pub fn run_vm(ctx: &Context, c: VmCommand) -> anyhow::Result<i32> {
    vm::run(ctx, c)
}

pub fn run_gc(ctx: &Context, a: GcArgs) -> anyhow::Result<i32> {
    gc::run(ctx, a)
}
