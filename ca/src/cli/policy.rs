//! `mayfly-ca policy check|explain|replay`: validate a policy file, explain a decision, and
//! replay the recorded decisions of a window against a candidate.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use mayfly_policy::{DecidedBy, Diagnostic, HttpRequest, Loaded, Policy, Request, normalize_path};
use serde_json::{Value, json};

use super::{ExitWith, Reported, StoreArg};

/// Policy subcommands.
#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Validate a policy file: every error with file:line:col, warnings too.
    Check {
        /// The policy file.
        file: PathBuf,
        /// Print JSON on standard output: `ok`, `rules`, `version`, `errors`, `warnings`
        /// (each with file, line, col, severity, message).
        #[arg(long)]
        json: bool,
    },
    /// Show how a policy decides one request, rule by rule.
    Explain {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The caller's SPIFFE ID.
        #[arg(long)]
        from: String,
        /// The destination's SPIFFE ID.
        #[arg(long)]
        to: String,
        /// Destination port.
        #[arg(long)]
        port: Option<u16>,
        /// HTTP method (omit for a TCP connection).
        #[arg(long)]
        method: Option<String>,
        /// HTTP path (normalised as the sidecar would).
        #[arg(long)]
        path: Option<String>,
        /// HTTP header NAME=VALUE (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// The caller's IP address.
        #[arg(long)]
        source_ip: Option<IpAddr>,
        /// Evaluate at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
        /// Print JSON on standard output: the request, each rule or grant considered and the
        /// decision.
        #[arg(long)]
        json: bool,
    },
    /// What-if: replay the decisions recorded in the audit store against a candidate policy
    /// and report the flows that would change and the allow rules nothing used. Exit status:
    /// 0 nothing would change, 1 something would change, 2 error.
    Replay {
        /// The candidate policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The window: a duration ago (such as 24h) or an RFC 3339 time.
        #[arg(long, default_value = "24h")]
        since: String,
        /// The control plane's data directory.
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// Print the report as JSON on standard output.
        #[arg(long)]
        json: bool,
    },
}

fn diag_json(d: &Diagnostic) -> Value {
    json!({
        "file": d.file,
        "line": d.line,
        "col": d.col,
        "severity": d.severity.to_string(),
        "message": d.message,
    })
}

/// Loads a policy. Each diagnostic is printed once, as `file:line:col: severity: message` on
/// stderr (it already says "error"), or, with `json`, as the JSON report on stdout; warnings
/// are left to the caller when the policy loads.
fn load(file: &PathBuf, now: time::OffsetDateTime, json: bool) -> Result<Loaded> {
    let src =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = file.display().to_string();
    match Policy::from_toml_at(&src, &name, now) {
        Ok(loaded) => {
            if !json {
                for w in &loaded.warnings {
                    eprintln!("{w}");
                }
            }
            Ok(loaded)
        }
        Err(e) => {
            if json {
                let v = json!({
                    "file": name,
                    "ok": false,
                    "errors": e.diagnostics.iter().map(diag_json).collect::<Vec<_>>(),
                    "warnings": [],
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                eprintln!("{e}");
            }
            Err(Reported.into())
        }
    }
}

fn decided_by_json(d: &DecidedBy) -> Value {
    match d {
        DecidedBy::Rule(n) => json!({ "rule": n.as_ref() }),
        DecidedBy::Grant(id) => json!({ "grant": id }),
        DecidedBy::Default => json!("default_deny"),
        DecidedBy::UnnormalizedPath => json!("unnormalised_path"),
        other => json!(other.to_string()),
    }
}

pub(crate) fn run(cmd: PolicyCmd) -> Result<()> {
    let now = time::OffsetDateTime::now_utc();
    match cmd {
        PolicyCmd::Replay {
            policy,
            since,
            data_dir,
            store,
            json,
        } => match super::replay::run(&policy, &since, &data_dir, &store, json, now) {
            Ok(changed) => match changed {
                true => Err(ExitWith(1).into()),
                false => Ok(()),
            },
            Err(e) => {
                if !e.is::<Reported>() {
                    eprintln!("error: {}", mayfly_ca::report::report(e.as_ref()));
                }
                Err(ExitWith(2).into())
            }
        },
        PolicyCmd::Check { file, json } => {
            let Loaded {
                policy: p,
                warnings,
            } = load(&file, now, json)?;
            if json {
                let v = json!({
                    "file": file.display().to_string(),
                    "ok": true,
                    "rules": p.rules().len(),
                    "version": p.version().to_string(),
                    "errors": [],
                    "warnings": warnings.iter().map(diag_json).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{}: ok, {} rules, version {}",
                file.display(),
                p.rules().len(),
                p.version()
            );
            Ok(())
        }
        PolicyCmd::Explain {
            policy,
            from,
            to,
            port,
            method,
            path,
            headers,
            source_ip,
            at,
            json,
        } => {
            let now = match at {
                Some(s) => {
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .with_context(|| format!("--at {s}: not an RFC 3339 time"))?
                }
                None => now,
            };
            let p = load(&policy, now, json)?.policy;
            let engine = p.compile();
            let pairs: Vec<(String, String)> = headers
                .iter()
                .map(|h| {
                    h.split_once('=')
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .with_context(|| format!("--header {h}: expected NAME=VALUE"))
                })
                .collect::<Result<_>>()?;
            let header_refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let norm = match &path {
                Some(p) => Some(normalize_path(p).with_context(|| format!("--path {p}"))?),
                None => None,
            };
            let http = match (&method, &norm) {
                (None, None) => None,
                (m, p) => Some(HttpRequest {
                    method: m.as_deref().unwrap_or("GET"),
                    path: p.as_deref().unwrap_or("/"),
                    headers: &header_refs,
                }),
            };
            let req = Request {
                source: &from,
                destination: &to,
                port,
                source_ip,
                http,
                now,
            };
            let x = engine.explain(&req, &[]);
            if json {
                let d = &x.decision;
                let v = json!({
                    "request": x.request,
                    "steps": x.steps.iter().map(|s| json!({
                        "subject": s.subject,
                        "matched": s.failed.is_none(),
                        "failed": s.failed,
                    })).collect::<Vec<_>>(),
                    "decision": {
                        "allow": d.allow,
                        "enforced": d.enforced,
                        "permits": d.permits(),
                        "decided_by": decided_by_json(&d.decided_by),
                        "dry_run": d.dry_run.as_ref().map(|r| json!({ "allow": r.allow, "rule": r.rule.as_ref() })),
                        "policy_version": d.policy_version.as_ref(),
                        "decision_id": d.decision_id,
                    },
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", x.to_string().trim_end());
            }
            Ok(())
        }
    }
}
