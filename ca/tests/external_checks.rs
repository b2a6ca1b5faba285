//! Independent checkers agree with us: `openssl verify -x509_strict`, PyPI's pkilint, curl and
//! `openssl s_client` against the running control plane. Needs openssl, curl and
//! `lint_pkix_cert` on PATH (`.ci/run` installs them); outside CI a missing tool skips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{CaProc, cli, init_dir};

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required in CI (.ci/run installs it)"
        );
        eprintln!("skipping: {tool} not installed");
    }
    found
}

fn split_pem(pem: &str) -> Vec<String> {
    pem.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|s| s.contains("BEGIN CERTIFICATE"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn minted_svids_verify_with_openssl_strict_and_lint_clean_with_pkilint() {
    if !have("openssl") || !have("lint_pkix_cert") {
        return;
    }
    let (tmp, dir) = init_dir("mayfly.local");
    let out = tmp.path().join("out");
    let (ok, _, err) = cli(&[
        "svid",
        "mint",
        "--data-dir",
        dir.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://mayfly.local/ns/prod/sa/web",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let chain = split_pem(&std::fs::read_to_string(out.join("svid.pem")).unwrap());
    assert_eq!(chain.len(), 2, "leaf then intermediate");
    let inter = tmp.path().join("inter.pem");
    std::fs::write(&inter, &chain[1]).unwrap();
    let v = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(out.join("bundle.pem"))
        .arg("-untrusted")
        .arg(&inter)
        .arg(out.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // The key file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // pkilint: no ERROR or FATAL finding except the spiffe:// URI syntax it cannot know.
    let roots = split_pem(&std::fs::read_to_string(out.join("bundle.pem")).unwrap());
    for (name, pem) in [
        ("leaf", &chain[0]),
        ("intermediate", &chain[1]),
        ("root", &roots[0]),
    ] {
        let f = tmp.path().join(format!("{name}.pem"));
        std::fs::write(&f, pem).unwrap();
        let o = Command::new("lint_pkix_cert")
            .args(["lint", "-s", "ERROR"])
            .arg(&f)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&o.stdout).into_owned();
        let findings: Vec<&str> = report
            .lines()
            .filter(|l| l.contains("(ERROR)") || l.contains("(FATAL)"))
            .filter(|l| !l.contains("pkix.invalid_uri_syntax"))
            .collect();
        assert!(findings.is_empty(), "pkilint on the {name}: {report}");
    }
}

#[test]
fn curl_and_openssl_s_client_verify_the_control_plane_with_the_bundle() {
    if !have("openssl") || !have("curl") {
        return;
    }
    let (tmp, dir) = init_dir("mayfly.local");
    let ca = CaProc::start(&dir, &[]);
    let (_, pem, _) = cli(&[
        "bundle",
        "show",
        "--data-dir",
        dir.to_str().unwrap(),
        "--format",
        "pem",
    ]);
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(&bundle, pem).unwrap();
    let port = ca.addr.rsplit(':').next().unwrap().to_owned();
    let o = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&bundle)
        .arg(format!("https://localhost:{port}/v1/bundle"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(body["keys"][0]["use"], "x509-svid");
    // Without the bundle, curl refuses the server.
    let o = Command::new("curl")
        .args(["-sS", "--fail"])
        .arg(format!("https://localhost:{port}/v1/bundle"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let o = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-CAfile",
        ])
        .arg(&bundle)
        .args(["-verify_return_error", "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(all.contains("Verification: OK"), "{all}");
    assert!(all.contains("TLSv1.3"), "{all}");
}
