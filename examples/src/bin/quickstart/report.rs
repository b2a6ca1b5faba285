//! What each step showed, for the closing table and `--json-summary`.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The mesh did what the policy says.
    Ok,
    /// It did not (the quickstart exits non-zero).
    Failed,
    /// The feature is not in this build; nothing was claimed.
    Unavailable,
    /// Not run (an earlier step failed, or the feature is there but not demonstrated here).
    Skipped,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Unavailable => "unavailable",
            Self::Skipped => "skipped",
        }
    }
}

/// One step's record.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// Stable machine name (`web_to_orders_get`, ...).
    pub(crate) id: &'static str,
    /// Short human label for the table.
    pub(crate) label: String,
    /// What the policy or the design says should happen (`allow`, `deny`, `rotate`, ...).
    pub(crate) expected: String,
    /// What happened, in a few words.
    pub(crate) observed: String,
    pub(crate) outcome: Outcome,
    /// Machine-readable facts (status codes, decision IDs, serials, ...).
    pub(crate) detail: Value,
}

/// Everything the run showed.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) steps: Vec<Step>,
    /// `http` or `tcp`: how the orders hop ran.
    pub(crate) orders_mode: Option<&'static str>,
    /// Why the orders hop runs in TCP mode, when it does.
    pub(crate) tcp_reason: Option<String>,
    /// Process IDs of every mayfly process started (control plane and sidecars).
    pub(crate) pids: Vec<u32>,
    pub(crate) data_dir: Option<String>,
    /// Set when the run stopped on an error or a signal.
    pub(crate) aborted: Option<String>,
}

impl Report {
    pub(crate) fn push(
        &mut self,
        id: &'static str,
        label: &str,
        expected: &str,
        observed: impl Into<String>,
        outcome: Outcome,
        detail: Value,
    ) {
        self.steps.push(Step {
            id,
            label: label.to_owned(),
            expected: expected.to_owned(),
            observed: observed.into(),
            outcome,
            detail,
        });
    }

    /// True when nothing failed and the run was not cut short.
    pub(crate) fn ok(&self) -> bool {
        self.aborted.is_none() && self.steps.iter().all(|s| s.outcome != Outcome::Failed)
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "orders_mode": self.orders_mode,
            "tcp_reason": self.tcp_reason,
            "aborted": self.aborted,
            "pids": self.pids,
            "data_dir": self.data_dir,
            "steps": self.steps.iter().map(|s| json!({
                "id": s.id,
                "label": s.label,
                "expected": s.expected,
                "observed": s.observed,
                "outcome": s.outcome.as_str(),
                "detail": s.detail,
            })).collect::<Vec<_>>(),
        })
    }

    /// Writes the JSON summary (atomically: a temporary file, then a rename).
    pub(crate) fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(&self.to_json()).context("encoding")?;
        std::fs::write(&tmp, format!("{text}\n"))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}
