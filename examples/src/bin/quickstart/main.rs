//! `quickstart`: the whole of mayfly on one machine, in one command.
//!
//! Starts a control plane (`mayfly-ca init` + `run`) and three sample services (web, orders,
//! db), each with its own `mayfly-sidecar`, in a temporary directory; then walks through
//! allowed and denied calls, the identity the app sees, `policy explain`, SVID rotation, a
//! just-in-time grant from request to expiry, the audit trail, and a person who signs in and
//! reaches db through another person's approval, with real traffic; prints
//! a summary; stops everything and removes the directory (also on
//! Ctrl-C and on failure). `--keep-running` leaves the mesh up until Ctrl-C.

mod mesh;
mod report;
mod steps;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::mesh::{Bins, Mesh};
use crate::report::Report;
use crate::steps::{Opts, Services};
use crate::ui::Ui;

/// The mayfly quickstart: a zero-standing-privilege mesh on your machine, narrated.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Leave the mesh running after the tour (until Ctrl-C) and print how to poke at it.
    #[arg(long)]
    keep_running: bool,
    /// Write each step's outcome as JSON to FILE (for scripts and tests).
    #[arg(long, value_name = "FILE")]
    json_summary: Option<PathBuf>,
    /// Non-interactive output: no animated progress.
    #[arg(long)]
    ci: bool,
    /// Do not run `cargo build` for mayfly-ca and mayfly-sidecar first (only done when started
    /// by cargo from the source tree).
    #[arg(long)]
    no_build: bool,
    /// SVID lifetime for the sidecars (seconds): short, so rotation shows within the tour.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(4..=600))]
    svid_ttl: u64,
    /// How the orders hop is proxied: by default HTTP when this build's sidecar has it
    /// (checked), else TCP.
    #[arg(long, value_enum)]
    orders_protocol: Option<steps::Mode>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async_main(cli))
}

/// Why the run ended early.
enum Stop {
    Signal(&'static str),
    Error(anyhow::Error),
}

async fn async_main(cli: Cli) -> ExitCode {
    let mut report = Report::default();
    let mut finished = false;
    let stop = {
        let tour = tour(&cli, &mut report, &mut finished);
        tokio::pin!(tour);
        tokio::select! {
            r = &mut tour => r.err().map(Stop::Error),
            s = signal() => Some(Stop::Signal(s)),
        }
        // `tour` is dropped here: the mesh stops every process and removes its directory.
    };
    let dir_left = report
        .data_dir
        .as_ref()
        .map(PathBuf::from)
        .and_then(|d| d.parent().map(|p| p.to_path_buf()))
        .filter(|d| d.exists());
    let code = match stop {
        None => {
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some(Stop::Signal(s)) if finished => {
            println!("\n{s}: stopping the mesh.");
            ExitCode::SUCCESS
        }
        Some(Stop::Signal(s)) => {
            report.aborted = Some(format!("interrupted by {s}"));
            println!("\nInterrupted ({s}): stopped every process.");
            ExitCode::from(130)
        }
        Some(Stop::Error(e)) => {
            report.aborted = Some(format!("{e:#}"));
            eprintln!("\nerror: {e:#}");
            ExitCode::FAILURE
        }
    };
    match &dir_left {
        None if report.data_dir.is_some() => {
            println!("Cleaned up: all mayfly processes stopped, temporary directory removed.");
        }
        None => {}
        Some(d) => eprintln!("warning: could not remove {}", d.display()),
    }
    if let Some(path) = &cli.json_summary
        && let Err(e) = report.write(path)
    {
        eprintln!("error: cannot write the JSON summary: {e:#}");
        return ExitCode::FAILURE;
    }
    code
}

/// Resolves on Ctrl-C or SIGTERM, with the signal's name.
async fn signal() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term => "SIGTERM",
    }
}

async fn tour(cli: &Cli, report: &mut Report, finished: &mut bool) -> anyhow::Result<()> {
    let opts = Opts {
        svid_ttl: Duration::from_secs(cli.svid_ttl),
        orders_protocol: cli.orders_protocol,
    };
    let bins = tokio::task::block_in_place(|| Bins::locate(cli.no_build))?;
    let mut ui = Ui::new(cli.ci, steps::STEPS);
    ui.title("mayfly quickstart: a zero-standing-privilege service mesh on this machine");
    ui.say(
        "A control plane, three services (web, orders, db) and a sidecar beside each, all \
         real processes on 127.0.0.1. Nothing is installed; everything is removed at the end.",
    );
    let mut mesh = Mesh::new(bins)?;
    report.data_dir = Some(mesh.data_dir().display().to_string());

    steps::control_plane(&mut ui, &mut mesh, report, &opts).await?;
    let services = steps::services(&mut ui, &mut mesh, report, &opts).await?;
    steps::policy(&mut ui, &services);
    steps::web_to_orders(&mut ui, &mesh, &services, report).await;
    steps::replicas(&mut ui, &mut mesh, &services, report).await;
    steps::web_post(&mut ui, &mesh, &services, report).await;
    steps::web_to_db(&mut ui, &mesh, &services, report).await;
    steps::rotation(&mut ui, &services, report, &opts).await;
    steps::grant(&mut ui, &mesh, &services, report).await;
    steps::audit_trail(&mut ui, &mesh, report).await;
    steps::person(&mut ui, &mut mesh, report).await;
    steps::summary(&mut ui, report);

    if cli.keep_running {
        *finished = true;
        keep_running(&ui, &mesh, &services).await?;
    } else {
        ui.blank();
        ui.say(
            "Run again with --keep-running to leave the mesh up and try it yourself. \
             Two machines: examples/README.md.",
        );
    }
    drop(services);
    drop(mesh);
    Ok(())
}

/// Prints how to poke at the mesh, then waits for Ctrl-C (the caller's signal branch).
async fn keep_running(ui: &Ui, mesh: &Mesh, s: &Services) -> anyhow::Result<()> {
    let (l, front) = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the web front end")?;
        let a = l.local_addr().context("local address")?.to_string();
        (l, a)
    };
    let orders = s.web_to_orders().to_owned();
    let task = tokio::spawn(async move {
        let _ = mayfly_examples::web::serve(l, orders).await;
    });
    let bin_dir = mesh.bins.dir.display();
    let dd = mesh.data_dir();
    ui.blank();
    ui.title("The mesh is still running. Press Ctrl-C to stop it and clean up.");
    ui.item("Console: ", &mesh.console_url);
    ui.say("(in a browser on this machine: the mesh graph, live decisions, grants, audit)");
    ui.say("In another terminal:");
    let ttl = s.svid_ttl_secs();
    let lines: Vec<(String, String)> = vec![
        (format!("export PATH={bin_dir}:$PATH"), String::new()),
        (
            format!("export MAYFLY_DATA_DIR={}", dd.display()),
            String::new(),
        ),
        (format!("curl http://{front}/"), "web's front page".into()),
        (
            format!("curl http://{}/orders", s.web_to_orders()),
            "as web, through its sidecar".into(),
        ),
        (
            format!(
                "curl -i -X POST http://{}/orders -d '{{\"item\":\"tea\"}}'",
                s.web_to_orders()
            ),
            String::new(),
        ),
        (
            format!("curl http://{}/svid", s.web.admin),
            format!("web's SVID, renewed every ~{}s", ttl / 2),
        ),
        (
            format!("curl http://{}/metrics", s.orders.admin),
            "orders' sidecar".into(),
        ),
        (
            "mayfly-ca token list".into(),
            "one used token per sidecar".into(),
        ),
        ("mayfly-ca ca status".into(), "root and intermediate".into()),
    ];
    for (cmd, comment) in lines {
        if comment.is_empty() {
            ui.command(&cmd);
        } else {
            ui.command(&format!("{cmd:<40} # {comment}"));
        }
    }
    ui.command_chunks(&[
        "mayfly-ca policy explain".to_owned(),
        format!("--policy {}", s.policy.display()),
        format!("--from {}", mesh::id("web")),
        format!("--to {}", mesh::id("db")),
    ]);
    let nc_db = format!(
        "printf 'KEYS order:\\n' | nc {}",
        s.web_to_db().replace(':', " ")
    );
    ui.say("Just-in-time access: web -> db is denied, a grant opens it for a while:");
    ui.command(&format!("{nc_db:<40} # web -> db: denied"));
    ui.command_chunks(&[
        "mayfly-ca grant request".to_owned(),
        format!("--from {}", mesh::id("web")),
        format!("--to {}", mesh::id("db")),
        "--ttl 30s --reason \"trying it\"".to_owned(),
    ]);
    ui.command(&format!("{nc_db:<40} # allowed for 30 s"));
    for (cmd, comment) in [
        ("mayfly-ca grant list", "active, then expired"),
        (
            "mayfly-ca audit query --kind grant.expired",
            "by the control plane",
        ),
    ] {
        ui.command(&format!("{cmd:<40} # {comment}"));
    }
    ui.say(&format!(
        "The grant is active at once because the policy says approvals = 0 (a one-person \
         demo; in production approvals = 1, and a second admin approves). The control plane \
         distributes {}: edit it and every sidecar enforces the new version within a second \
         (policy_version in /readyz).",
        s.policy.display()
    ));
    if let Some(issuer) = &mesh.idp {
        ui.say(&format!(
            "People: sign in as alice (group oncall) or bob (db-admins) at the local identity \
             provider {issuer}; its development login takes any password. mayfly login prints \
             a URL to open in a browser:"
        ));
        ui.command(&format!(
            "export MAYFLY_CONTROL_PLANE={} MAYFLY_BUNDLE={}",
            mesh.ca_addr,
            mesh.dir().join("bundle.pem").display()
        ));
        for (cmd, comment) in [
            ("mayfly login", "log in as alice, any password"),
            (
                "mayfly access request --to spiffe://mayfly.local/db --ttl 1m --reason why",
                "",
            ),
            (
                "MAYFLY_CONFIG_DIR=$PWD/bob mayfly login",
                "bob, in his own directory",
            ),
            (
                "MAYFLY_CONFIG_DIR=$PWD/bob mayfly access approve ID",
                "ID: the request's",
            ),
            (
                "mayfly connect spiffe://mayfly.local/db --listen 127.0.0.1:7000",
                "then: nc 127.0.0.1 7000",
            ),
        ] {
            if comment.is_empty() {
                ui.command(cmd);
            } else {
                ui.command(&format!("{cmd:<40} # {comment}"));
            }
        }
    }
    ui.say(&format!(
        "Sidecar configurations, tokens and policy: {}",
        mesh.dir().display()
    ));
    std::future::pending::<()>().await;
    task.abort();
    Ok(())
}
