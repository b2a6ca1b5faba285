//! The workspace's structure rules hold (issue 17): no import circle between sibling modules, no
//! non-test source file over 600 lines without a stated reason. `.ci/modcheck` checks them; these
//! tests run it on the real tree and show on small crates built here that it catches each fault.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn modcheck(args: &[&Path]) -> Output {
    Command::new("python3")
        .arg(workspace().join(".ci/modcheck"))
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("python3 runs .ci/modcheck")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes a crate `name` under `dir` with the given `src/` files.
fn small_crate(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let root = dir.join("c");
    for (path, body) in files {
        let p = root.join("src").join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    std::fs::write(root.join("Cargo.toml"), "[package]\nname = \"c\"\n").unwrap();
    root
}

#[test]
fn the_workspace_has_no_import_circle_and_no_unexplained_long_file() {
    let o = modcheck(&[]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_circle_between_two_sibling_modules_is_reported_with_both_references() {
    let dir = tempfile::tempdir().unwrap();
    let c = small_crate(
        dir.path(),
        &[
            ("lib.rs", "mod conn;\nmod tcp;\n"),
            ("conn.rs", "use crate::tcp::Splice;\npub struct Shared;\n"),
            (
                "tcp.rs",
                "use crate::{conn::Shared};\npub struct Splice(Shared);\n",
            ),
        ],
    );
    let o = modcheck(&[&c]);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("import circle between conn, tcp"), "{t}");
    assert!(t.contains("conn.rs -> tcp::Splice"), "{t}");
    assert!(t.contains("tcp.rs -> conn::Shared"), "{t}");
}

#[test]
fn a_circle_through_super_and_three_modules_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let c = small_crate(
        dir.path(),
        &[
            ("lib.rs", "mod server;\n"),
            ("server/mod.rs", "mod ca;\nmod http;\nmod audit;\n"),
            (
                "server/ca.rs",
                "use super::audit::Pending;\npub struct Ca;\n",
            ),
            (
                "server/audit.rs",
                "pub struct Pending(super::http::Conn);\n",
            ),
            (
                "server/http.rs",
                "pub struct Conn(crate::server::ca::Ca);\n",
            ),
        ],
    );
    let o = modcheck(&[&c]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("import circle between server::audit, server::ca, server::http"),
        "{t}"
    );
}

#[test]
fn a_parent_and_its_children_and_test_modules_are_not_circles() {
    let dir = tempfile::tempdir().unwrap();
    let c = small_crate(
        dir.path(),
        &[
            ("lib.rs", "mod http;\nmod policy;\n"),
            (
                "http/mod.rs",
                "mod inbound;\npub use inbound::serve;\npub struct Body;\n",
            ),
            (
                "http/inbound.rs",
                "use super::Body;\npub fn serve(_: Body) {}\n",
            ),
            (
                "policy.rs",
                "// crate::http::serve in a comment is no reference\npub fn decide() {}\n#[cfg(test)]\nmod tests {\n    use crate::http::serve;\n}\n",
            ),
        ],
    );
    let o = modcheck(&[&c]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_long_file_needs_a_reason_at_its_top() {
    let dir = tempfile::tempdir().unwrap();
    let body = "pub fn f() {}\n".repeat(601);
    let tests = format!(
        "#[cfg(test)]\nmod tests {{\n{}}}\n",
        "    fn t() {}\n".repeat(700)
    );
    let short_with_tests = format!("{}{}", "pub fn g() {}\n".repeat(500), tests);
    let c = small_crate(
        dir.path(),
        &[
            ("lib.rs", "mod long;\nmod tested;\n"),
            ("long.rs", &body),
            ("tested.rs", &short_with_tests),
        ],
    );
    let o = modcheck(&[&c]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("long.rs: 601 lines of non-test code"), "{t}");
    assert!(!t.contains("tested.rs"), "{t}");

    let explained = format!("// Long file: one state machine, read top to bottom.\n{body}");
    std::fs::write(c.join("src/long.rs"), explained).unwrap();
    let o = modcheck(&[&c]);
    assert!(o.status.success(), "{}", text(&o));
}
