//! `mayfly access ...` (placeholder: the access work replaces this file).

use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum AccessCmd {
    /// List access requests.
    List,
}

pub(crate) async fn run(_: AccessCmd) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
