//! `mayfly-ca policy replay`: the report of [`mayfly_ca::server::replay`], as a table or JSON.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mayfly_ca::duration::parse_duration;
use mayfly_ca::server::replay::{ReplayReport, replay};
use time::OffsetDateTime;

use super::{Reported, StoreArg};
use mayfly_policy::Policy;

/// `--since`: a duration ago, or an RFC 3339 time.
fn since_arg(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime> {
    if let Ok(d) = parse_duration(s) {
        let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        return Ok(now - time::Duration::seconds(secs));
    }
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("--since {s:?} is neither an RFC 3339 time nor a duration"))
}

/// Runs the replay and prints its report; whether something would change.
pub(super) fn run(
    policy: &PathBuf,
    since: &str,
    data_dir: &Path,
    store: &StoreArg,
    json: bool,
    now: OffsetDateTime,
) -> Result<bool> {
    let since = since_arg(since, now)?;
    let src = std::fs::read_to_string(policy)
        .with_context(|| format!("cannot read {}", policy.display()))?;
    let name = policy.display().to_string();
    // Each diagnostic once, as `file:line:col: severity: message`.
    let loaded = Policy::from_toml_at(&src, &name, now).map_err(|e| {
        eprintln!("{e}");
        Reported
    })?;
    for w in &loaded.warnings {
        eprintln!("{w}");
    }
    let candidate = loaded.policy;
    let (_, store, _) = store.open(data_dir)?;
    let report = replay(store.as_ref(), &candidate, since).context("policy replay")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report, &policy.display().to_string()));
    }
    Ok(report.changes_anything())
}

fn table(r: &ReplayReport, file: &str) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let since = OffsetDateTime::from_unix_timestamp(r.since_ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| r.since_ms.to_string());
    let _ = writeln!(
        s,
        "{file} (version {}) replayed on {} decisions since {since}: {} unchanged ({} allowed by a grant, kept), {} records unreadable",
        r.candidate_version, r.decisions, r.unchanged, r.allowed_by_grant, r.unreadable
    );
    if r.changes.is_empty() {
        let _ = writeln!(s, "no decision would change");
    } else {
        let _ = writeln!(
            s,
            "\n{:<14} {:>6}  {:<9} {:<36} {:<36} {:<7} {:<24} EXAMPLE",
            "CHANGE", "COUNT", "SIDE", "CALLER", "CALLEE", "METHOD", "PATH/PORT"
        );
        for c in &r.changes {
            let _ = writeln!(
                s,
                "{:<14} {:>6}  {:<9} {:<36} {:<36} {:<7} {:<24} {}",
                c.change.as_str(),
                c.count,
                c.flow.direction,
                c.flow.caller,
                c.flow.callee,
                c.flow.method.as_deref().unwrap_or("-"),
                c.flow.target,
                c.example_decision_id
            );
        }
    }
    if r.unused_allow_rules.is_empty() {
        let _ = writeln!(s, "\nevery allow rule matched some request");
    } else {
        let _ = writeln!(
            s,
            "\nallow rules that matched nothing in the window (standing privilege no one used):"
        );
        for n in &r.unused_allow_rules {
            let _ = writeln!(s, "  {n}");
        }
    }
    for rule in &r.removed_rules {
        let _ = match rule.matched {
            0 => writeln!(
                s,
                "removed {} rule `{}` matched nothing in the window: unused",
                rule.action, rule.name
            ),
            n => writeln!(
                s,
                "removed {} rule `{}` matched {n} requests in the window",
                rule.action, rule.name
            ),
        };
    }
    if !r.header_rules.is_empty() {
        let _ = writeln!(
            s,
            "\nnote: headers are not recorded; these rules were evaluated as if no header was sent: {}",
            r.header_rules.join(", ")
        );
    }
    s
}
