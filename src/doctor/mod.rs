//! `chvkit doctor` (placeholder while being built).
use crate::Context;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {}

pub fn run(_ctx: &Context, _a: DoctorArgs) -> anyhow::Result<i32> {
    anyhow::bail!("doctor: not built yet")
}
