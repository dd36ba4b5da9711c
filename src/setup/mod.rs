//! `chvkit setup` / `teardown` (placeholder while being built).
use crate::Context;

#[derive(Debug, clap::Args)]
pub struct SetupArgs {}
#[derive(Debug, clap::Args)]
pub struct TeardownArgs {}

pub fn run_setup(_ctx: &Context, _a: SetupArgs) -> anyhow::Result<i32> {
    anyhow::bail!("setup: not built yet")
}
pub fn run_teardown(_ctx: &Context, _a: TeardownArgs) -> anyhow::Result<i32> {
    anyhow::bail!("teardown: not built yet")
}
