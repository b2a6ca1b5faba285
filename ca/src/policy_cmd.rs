//! `mayfly-ca policy check|explain`: validate a policy file and explain a decision.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mayfly_policy::{HttpRequest, Policy, Request, normalize_path};

/// Policy subcommands.
#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Validate a policy file: every error with file:line:col, warnings too.
    Check {
        /// The policy file.
        file: PathBuf,
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
    },
}

fn load(file: &PathBuf, now: time::OffsetDateTime) -> Result<Policy> {
    let src =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = file.display().to_string();
    match Policy::from_toml_at(&src, &name, now) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("{w}");
            }
            Ok(loaded.policy)
        }
        Err(e) => bail!("{e}"),
    }
}

pub(crate) fn run(cmd: PolicyCmd) -> Result<()> {
    let now = time::OffsetDateTime::now_utc();
    match cmd {
        PolicyCmd::Check { file } => {
            let p = load(&file, now)?;
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
        } => {
            let now = match at {
                Some(s) => {
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .with_context(|| format!("--at {s}: not an RFC 3339 time"))?
                }
                None => now,
            };
            let p = load(&policy, now)?;
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
            println!("{}", engine.explain(&req, &[]).to_string().trim_end());
            Ok(())
        }
    }
}
