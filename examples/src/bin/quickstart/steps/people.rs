//! Step 11: a person signs in and reaches db for a minute. The local test identity provider
//! (tests/oidc/server.mjs: npm's `oidc-provider`, on Node.js) runs beside the control plane,
//! which trusts it (`--oidc-issuer`). alice (group `oncall`) signs in with `mayfly login` by
//! the device flow, asks for db for a minute with a reason; bob (`db-admins`) signs in and
//! approves; alice's `mayfly connect` carries her query to db; the audit names her; the
//! grant's end is shown. The quickstart completes the provider's pages itself, standing in
//! for alice's and bob's browser (`mayfly_examples::idp`, shared with the tests).
//!
//! Without Node.js only this step is skipped, with one line saying what it needs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use mayfly_examples::db;
use serde_json::{Value, json};

use crate::mesh::{Mesh, id};
use crate::report::{Outcome, Report};
use crate::ui::Ui;

/// The provider's files, in the source tree.
const IDP_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/oidc");
/// Why alice asks (a ticket or an incident, in real life).
const REASON: &str = "INC-1: orders are slow";

/// Why the step cannot run here, in one line, or `None` when Node.js and the provider are
/// ready (installing the provider's packages with `npm ci` first when they are missing).
fn idp_missing(ui: &Ui) -> Option<String> {
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        return Some(
            "the sign-in step needs Node.js 20 or later for the local identity provider: \
             install it (https://nodejs.org, or `apt install nodejs npm`) and run again"
                .into(),
        );
    }
    let root = Path::new(IDP_DIR);
    if !root.join("server.mjs").is_file() {
        return Some(format!(
            "the sign-in step needs the test identity provider from the source tree ({})",
            root.display()
        ));
    }
    if root.join("node_modules/oidc-provider").is_dir() {
        return None;
    }
    ui.say("Installing the local identity provider's packages: npm ci --prefix tests/oidc");
    match Command::new("npm")
        .args(["ci", "--silent", "--prefix"])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("npm ci --prefix tests/oidc failed ({s})")),
        Err(e) => Some(format!(
            "the sign-in step needs npm to install the local identity provider ({e})"
        )),
    }
}

/// Starts the local identity provider before the control plane, which then trusts it.
/// Without Node.js, prints why the sign-in step will be skipped; the rest goes on.
pub(crate) async fn start_idp(ui: &Ui, mesh: &mut Mesh) -> anyhow::Result<()> {
    if let Some(why) = idp_missing(ui) {
        ui.say(&format!("Note: {why}; skipping only that step."));
        return Ok(());
    }
    let jwks = mesh.dir().join("idp-keys.json");
    mayfly_examples::idp::new_key(&jwks, "quickstart")?;
    let mut cmd = Command::new("node");
    cmd.current_dir(IDP_DIR)
        .args(["server.mjs", "--port", "0", "--jwks"])
        .arg(&jwks);
    let issuer = mesh
        .start("identity provider", cmd, "oidc-provider listening")
        .await?;
    mesh.idp = Some(issuer);
    Ok(())
}

/// A person's `mayfly` command: their own configuration directory, the mesh's control plane
/// and trust bundle.
fn mayfly(mesh: &Mesh, who: &str, bundle: &Path) -> Command {
    let mut c = Command::new(&mesh.bins.mayfly);
    c.env("MAYFLY_CONFIG_DIR", config_dir(mesh, who))
        .env("MAYFLY_CONTROL_PLANE", &mesh.ca_addr)
        .env("MAYFLY_BUNDLE", bundle)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    c
}

fn config_dir(mesh: &Mesh, who: &str) -> PathBuf {
    mesh.dir().join("people").join(who)
}

/// `mayfly ARGS` as `who`, to completion: its JSON answer.
fn run_json(mesh: &Mesh, who: &str, bundle: &Path, args: &[&str]) -> anyhow::Result<Value> {
    let o = mayfly(mesh, who, bundle)
        .args(args)
        .output()
        .context("cannot run mayfly")?;
    if !o.status.success() {
        bail!(
            "mayfly {} failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    serde_json::from_slice(&o.stdout).context("mayfly printed no JSON")
}

/// `mayfly login` as `who`, by the device flow: the printed URL is opened and completed
/// here, as `who`'s browser would.
async fn log_in(ui: &Ui, mesh: &Mesh, who: &str, bundle: &Path) -> anyhow::Result<()> {
    ui.command(&format!("MAYFLY_CONFIG_DIR=people/{who} mayfly login"));
    let mut child = mayfly(mesh, who, bundle)
        .arg("login")
        // No browser to open: the quickstart is the browser.
        .env("PATH", "/nonexistent")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run mayfly login")?;
    let stderr = child.stderr.take().context("mayfly login's stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result: anyhow::Result<()> = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    ui.quote(&line);
                    if let Some(url) = line.strip_prefix("or open ") {
                        break url.trim().to_owned();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => bail!("mayfly login printed no verification URL"),
            }
        };
        ui.say(&format!(
            "(The quickstart opens that page itself, standing in for {who}'s browser: the \
             provider's development login as {who}, then its consent page.)"
        ));
        mayfly_examples::idp::complete_device_flow(&url, who).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            while let Ok(line) = rx.try_recv() {
                ui.quote(&line);
            }
            if let Some(s) = child.try_wait().context("mayfly login")? {
                if !s.success() {
                    bail!("mayfly login failed ({s})");
                }
                while let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                    ui.quote(&line);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("mayfly login did not finish within 30 s of the sign-in");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    .await;
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// alice's query, through her `mayfly connect` (retried while the grant reaches db's sidecar).
async fn query(local: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r: anyhow::Result<String> = async {
            let mut c = db::Client::connect(local).await?;
            tokio::time::timeout(Duration::from_secs(2), c.command("KEYS order:"))
                .await
                .map_err(|_| anyhow!("no answer within 2 s"))?
        }
        .await;
        match r {
            Ok(answer) => return Ok(answer),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The audit records naming `user` (`mayfly-ca audit query --user`), once db's sidecar has
/// shipped its `connection.open` (up to 15 s).
async fn audit_of(mesh: &Mesh, user: &str) -> anyhow::Result<Vec<Value>> {
    let dd = mesh.data_dir().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, out, err) = mesh.bins.ca_cmd(&[
            "audit",
            "query",
            "--user",
            user,
            "--json",
            "--data-dir",
            &dd,
        ])?;
        if code != 0 {
            bail!("mayfly-ca audit query failed: {}", err.trim());
        }
        let records: Vec<Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let opened = records
            .iter()
            .any(|r| r["kind"] == "connection.open" && r["peer_id"] == user);
        if opened || Instant::now() > deadline {
            return Ok(records);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What the step saw.
#[derive(Default)]
struct Seen {
    grant: String,
    expires: i64,
    answer: Option<String>,
    audit_names_alice: bool,
    kinds: Vec<String>,
}

/// Step 11.
pub(crate) async fn person(ui: &mut Ui, mesh: &mut Mesh, report: &mut Report) {
    ui.step("A person signs in and reaches db for a minute");
    let Some(issuer) = mesh.idp.clone() else {
        ui.say("Skipped: the local identity provider is not running (see the note at step 1).");
        report.push(
            "person_reaches_db",
            "alice -> db, 1m",
            "allow for 1m",
            "skipped: no identity provider",
            Outcome::Skipped,
            json!({}),
        );
        return;
    };
    ui.say(&format!(
        "People hold no standing access either. The control plane trusts the identity provider \
         at {issuer}; the policy's [[access.rule]] lets its group oncall ask for db for up to a \
         minute, approved by someone in db-admins. alice is in oncall, bob in db-admins."
    ));
    let mut seen = Seen::default();
    let r = walk(ui, mesh, &mut seen).await;
    report.pids.clone_from(&mesh.pids);
    mesh.kill("mayfly connect");
    let reached = seen.answer.is_some();
    let (observed, outcome) = match &r {
        Ok(()) if reached && seen.audit_names_alice => (
            "alice's query reached db; the audit names her".to_owned(),
            Outcome::Ok,
        ),
        Ok(()) => (
            "the audit does not name alice's connection".to_owned(),
            Outcome::Failed,
        ),
        Err(e) => (format!("{e:#}"), Outcome::Failed),
    };
    if let Err(e) = &r {
        ui.say(&format!("FAILED: {e:#}"));
    }
    report.push(
        "person_reaches_db",
        "alice -> db, 1m",
        "allow for 1m",
        observed,
        outcome,
        json!({
            "grant": seen.grant,
            "expires": seen.expires,
            "bytes_reached_db": reached,
            "answer": seen.answer,
            "audit_names_alice": seen.audit_names_alice,
            "audit_kinds": seen.kinds,
        }),
    );
}

async fn walk(ui: &Ui, mesh: &mut Mesh, seen: &mut Seen) -> anyhow::Result<()> {
    let dd = mesh.data_dir().display().to_string();
    let (code, pem, err) =
        mesh.bins
            .ca_cmd(&["bundle", "show", "--format", "pem", "--data-dir", &dd])?;
    if code != 0 {
        bail!("mayfly-ca bundle show failed: {}", err.trim());
    }
    let bundle = mesh.dir().join("bundle.pem");
    std::fs::write(&bundle, pem).context("writing the trust bundle")?;
    ui.say("Each person's mayfly knows the control plane and its trust bundle:");
    ui.command("mayfly-ca bundle show --format pem > bundle.pem");
    ui.command(&format!(
        "export MAYFLY_CONTROL_PLANE={} MAYFLY_BUNDLE=bundle.pem",
        mesh.ca_addr
    ));

    ui.say("alice signs in by the device flow (a URL and a code, for any browser):");
    log_in(ui, mesh, "alice", &bundle).await?;
    let db_id = id("db");
    ui.say("alice asks for db, for a minute, saying why:");
    ui.command_chunks(&[
        "mayfly access request".to_owned(),
        format!("--to {db_id}"),
        format!("--ttl 1m --reason \"{REASON}\""),
    ]);
    let g = run_json(
        mesh,
        "alice",
        &bundle,
        &[
            "access", "request", "--to", &db_id, "--ttl", "1m", "--reason", REASON, "--json",
        ],
    )?;
    seen.grant = g["id"].as_str().unwrap_or_default().to_owned();
    ui.item(
        "request       ",
        &format!("{} {}", seen.grant, g["state"].as_str().unwrap_or("?")),
    );
    let own = mayfly(mesh, "alice", &bundle)
        .args(["access", "approve", &seen.grant])
        .output()
        .context("cannot run mayfly")?;
    if own.status.success() {
        bail!("alice approved her own request");
    }
    ui.command(&format!("mayfly access approve {}", seen.grant));
    ui.quote(String::from_utf8_lossy(&own.stderr).trim());

    ui.say("bob signs in and approves:");
    log_in(ui, mesh, "bob", &bundle).await?;
    ui.command(&format!(
        "MAYFLY_CONFIG_DIR=people/bob mayfly access approve {}",
        seen.grant
    ));
    let g = run_json(
        mesh,
        "bob",
        &bundle,
        &["access", "approve", &seen.grant, "--json"],
    )?;
    if g["state"] != "active" {
        bail!("the approved request is {}, not active", g["state"]);
    }
    seen.expires = g["expires"].as_i64().unwrap_or_default();
    ui.item(
        "grant         ",
        &format!(
            "active, for {} until {} (Unix time {})",
            g["from"].as_str().unwrap_or("?"),
            super::grant::clock(seen.expires),
            seen.expires
        ),
    );

    ui.say("alice opens a local port to db with her user SVID and queries db through it:");
    ui.command(&format!("mayfly connect {db_id} --listen 127.0.0.1:0 &"));
    let mut cmd = mayfly(mesh, "alice", &bundle);
    cmd.args(["connect", &db_id, "--listen", "127.0.0.1:0"]);
    let local = mesh
        .start("mayfly connect", cmd, "mayfly connect listening")
        .await?;
    ui.command(&format!(
        "printf 'KEYS order:\\n' | nc {}",
        local.replace(':', " ")
    ));
    let answer = query(&local)
        .await
        .context("alice's query through mayfly connect")?;
    ui.quote(answer.trim());
    seen.answer = Some(answer);

    let alice = format!("spiffe://{}/user/alice", crate::mesh::TD);
    ui.say("The audit trail names alice, her groups, her reason and her approver:");
    ui.command(&format!("mayfly-ca audit query --user {alice}"));
    let records = audit_of(mesh, &alice).await?;
    for r in &records {
        let kind = r["kind"].as_str().unwrap_or("?");
        seen.kinds.push(kind.to_owned());
        let more = match kind {
            "access.requested" => format!("groups {} reason {}", r["groups"], r["reason"]),
            "access.approved" => format!("approver {}", r["approver"]),
            "access.refused" => format!("{} refused", r["action"]),
            "connection.open" => format!("at db's sidecar, peer {}", r["peer_id"]),
            _ => String::new(),
        };
        ui.item(&format!("{kind:<20}"), &more);
    }
    seen.audit_names_alice = records.iter().any(|r| {
        r["kind"] == "connection.open"
            && r["peer_id"] == alice.as_str()
            && r["grant"] == seen.grant.as_str()
    });
    let left = seen.expires - unix_now();
    ui.say(&format!(
        "The grant ends at {} UTC, in {left} s: db's sidecar then cuts alice's connection and \
         refuses new ones, as in step 9 (the tour does not wait the minute out).",
        super::grant::clock(seen.expires)
    ));
    Ok(())
}
