//! `chvkit launch`, `vm …`, `gc` (placeholder while being built).
use crate::Context;

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {}
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// List detached VMs.
    Ls,
}
#[derive(Debug, clap::Args)]
pub struct GcArgs {}

pub fn run_launch(_ctx: &Context, _a: LaunchArgs) -> anyhow::Result<i32> {
    anyhow::bail!("launch: not built yet")
}
pub fn run_vm(_ctx: &Context, _c: VmCommand) -> anyhow::Result<i32> {
    anyhow::bail!("vm: not built yet")
}
pub fn run_gc(_ctx: &Context, _a: GcArgs) -> anyhow::Result<i32> {
    anyhow::bail!("gc: not built yet")
}
