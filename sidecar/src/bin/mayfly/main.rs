//! `mayfly`: the person's command line. Sign in with the identity provider (`login`), ask for
//! and decide access (`access`), reach a service through the mesh with the user SVID
//! (`connect`). No standing access: what a sign-in yields lives minutes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod access;
mod admin;
mod connect;
mod login;
mod session;

#[derive(Parser)]
#[command(
    name = "mayfly",
    version,
    about = "mayfly for people: sign in, ask for access, connect"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sign in with the identity provider and obtain a user SVID.
    Login(login::LoginArgs),
    /// Forget this machine's credentials.
    Logout(login::LogoutArgs),
    /// Who is signed in, until when.
    Status(login::StatusArgs),
    /// Ask for, decide, list and revoke access.
    #[command(subcommand)]
    Access(access::AccessCmd),
    /// Tunnel local connections to a service with the user SVID.
    Connect(connect::ConnectArgs),
    /// One control-plane admin operation over mTLS (needs an active admin grant).
    Admin(admin::AdminArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MAYFLY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mayfly: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Login(a) => login::login(a).await,
            Cmd::Logout(a) => login::logout(a).await,
            Cmd::Status(a) => login::status(a).await,
            Cmd::Access(c) => access::run(c).await,
            Cmd::Connect(a) => connect::run(a).await,
            Cmd::Admin(a) => admin::run(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mayfly: {e:#}");
            ExitCode::FAILURE
        }
    }
}
