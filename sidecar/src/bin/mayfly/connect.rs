//! `mayfly connect` (placeholder: the access work replaces this file).

use clap::Args;

#[derive(Args)]
pub(crate) struct ConnectArgs {}

pub(crate) async fn run(_: ConnectArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
