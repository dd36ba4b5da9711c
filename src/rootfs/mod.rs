//! `chvkit rootfs` (placeholder while being built).
use crate::Context;

#[derive(Debug, clap::Args)]
pub struct RootfsArgs {}

pub fn run(_ctx: &Context, _a: RootfsArgs) -> anyhow::Result<i32> {
    anyhow::bail!("rootfs: not built yet")
}
