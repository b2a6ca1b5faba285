//! The deployment files check out offline: every Kubernetes manifest (ours, the examples, and
//! the examples after `mayfly-sidecar inject`) against the Kubernetes schemas with PyPI
//! `kubernetes-validate --strict`, the systemd units with `systemd-analyze verify`, and the
//! policies in the ConfigMaps with `mayfly-ca policy check`. A checker that is not installed is
//! skipped with a notice (CI installs kubernetes-validate).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mayfly_tests::bin;

const PIN: &str = "3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no YAML in {}", dir.display());
    v
}

fn installed(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn inject(file: &Path) -> String {
    let out = Command::new(bin("mayfly-sidecar"))
        .args(["inject", "--ca-pin", PIN])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inject {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn injected_examples_are_stable_and_stdin_works() {
    let tmp = tempfile::tempdir().unwrap();
    for f in yaml_files(&root().join("examples/kubernetes")) {
        let once = inject(&f);
        let again = tmp.path().join("again.yaml");
        std::fs::write(&again, &once).unwrap();
        assert_eq!(inject(&again), once, "{}", f.display());
    }
    let mut child = Command::new(bin("mayfly-sidecar"))
        .args(["inject", "-", "--ca-pin", PIN])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: a, ports: [{containerPort: 80}]}]}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("name: mayfly-sidecar"));
    // A bad pin is a usage error, before reading anything.
    let out = Command::new(bin("mayfly-sidecar"))
        .args(["inject", "-", "--ca-pin", "nope"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-pin"));
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    if !installed("kubernetes-validate", "--version") {
        eprintln!(
            "SKIPPED: kubernetes-validate is not installed (python3 -m pip install kubernetes-validate)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut files = yaml_files(&root().join("deploy/kubernetes"));
    let examples = yaml_files(&root().join("examples/kubernetes"));
    for f in &examples {
        let injected = tmp.path().join(format!(
            "injected-{}",
            f.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&injected, inject(f)).unwrap();
        files.push(injected);
    }
    files.extend(examples);
    // Native sidecars (restartPolicy on init containers) need Kubernetes 1.29 or later.
    for version in ["1.29.0", "1.33.0"] {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("ERROR"),
            "Kubernetes {version}:\n{text}"
        );
    }
}

#[test]
fn systemd_units_verify() {
    if !installed("systemd-analyze", "--version") {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bindir = bin("mayfly-ca").parent().unwrap().display().to_string();
    let mut units = Vec::new();
    for (name, as_name) in [
        ("mayfly-ca.service", "mayfly-ca.service"),
        ("mayfly-sidecar@.service", "mayfly-sidecar@orders.service"),
    ] {
        let text = std::fs::read_to_string(root().join("deploy/systemd").join(name)).unwrap();
        // verify checks that ExecStart exists: point it at the binaries just built.
        let text = text.replace("/usr/local/bin", &bindir);
        let p = tmp.path().join(as_name);
        std::fs::write(&p, text).unwrap();
        units.push(p);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings for systemd: fail on any output about
    // our units.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("mayfly")).collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}

/// The `policy.toml` of a ConfigMap manifest (the block scalar under `policy.toml: |`).
fn configmap_policy(text: &str) -> String {
    let mut out = String::new();
    let mut indent = None;
    for line in text.lines() {
        match indent {
            None if line.trim_start().starts_with("policy.toml: |") => indent = Some(0),
            Some(0) if !line.trim().is_empty() => {
                let n = line.len() - line.trim_start().len();
                indent = Some(n);
                out.push_str(&line[n..]);
                out.push('\n');
            }
            Some(n) if n > 0 => {
                if !line.trim().is_empty() && !line.starts_with(&" ".repeat(n)) {
                    break;
                }
                out.push_str(line.get(n..).unwrap_or(""));
                out.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn policies_in_configmaps_pass_policy_check() {
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        root().join("deploy/kubernetes/10-policy.yaml"),
        root().join("examples/kubernetes/policy.yaml"),
    ] {
        let policy = configmap_policy(&std::fs::read_to_string(&f).unwrap());
        assert!(policy.contains("[[rule]]"), "{}: {policy}", f.display());
        let p = tmp.path().join("policy.toml");
        std::fs::write(&p, policy).unwrap();
        let out = Command::new(bin("mayfly-ca"))
            .args(["policy", "check"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every PodDisruptionBudget lets `kubectl drain` evict at least one pod of what it guards:
/// `minAvailable` equal to the replica count (one replica, `minAvailable: 1`) blocks a drain
/// forever.
#[test]
fn disruption_budgets_let_a_drain_evict_a_pod() {
    use serde_json::Value;
    let mut docs = Vec::new();
    for f in yaml_files(&root().join("deploy/kubernetes")) {
        let text = std::fs::read_to_string(&f).unwrap();
        docs.extend(mayfly_inject::parse_documents(&text).unwrap());
    }
    let budgets: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "PodDisruptionBudget")
        .collect();
    assert!(!budgets.is_empty());
    for pdb in budgets {
        let name = pdb["metadata"]["name"].as_str().unwrap();
        let selector = &pdb["spec"]["selector"]["matchLabels"];
        let workload = docs
            .iter()
            .find(|d| {
                matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet"))
                    && &d["spec"]["selector"]["matchLabels"] == selector
            })
            .unwrap_or_else(|| panic!("PDB {name} guards no workload"));
        let replicas = workload["spec"]["replicas"].as_u64().unwrap_or(1);
        let spec = &pdb["spec"];
        let evictable = match (
            spec["minAvailable"].as_u64(),
            spec["maxUnavailable"].as_u64(),
        ) {
            (Some(min), None) => replicas.saturating_sub(min),
            (None, Some(max)) => max.min(replicas),
            other => panic!(
                "PDB {name}: set one of minAvailable, maxUnavailable (as numbers): {other:?}"
            ),
        };
        assert!(
            evictable >= 1,
            "PDB {name} with {replicas} replica(s) lets no pod be evicted: kubectl drain blocks"
        );
    }
}
