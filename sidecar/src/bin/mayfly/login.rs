//! `mayfly login`, `logout`, `status` (placeholder: the sign-in work replaces this file).

use clap::Args;

#[derive(Args)]
pub(crate) struct LoginArgs {}
#[derive(Args)]
pub(crate) struct LogoutArgs {}
#[derive(Args)]
pub(crate) struct StatusArgs {}

pub(crate) async fn login(_: LoginArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub(crate) async fn logout(_: LogoutArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub(crate) async fn status(_: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
