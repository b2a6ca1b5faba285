//! Every class of validation error, with its line:col (line 1 is `version = 1`).

mod common;

use common::errors;
use mayfly_policy::{Policy, Severity};
use time::macros::datetime;

const R: &str =
    "[[rule]]\nname = \"r\"\nfrom = [\"spiffe://td/web\"]\nto = [\"spiffe://td/api\"]\n";

/// Asserts that `body` (after the version line) fails with exactly these errors.
fn refused(body: &str, want: &[&str]) {
    let got = errors(body);
    let got: Vec<&str> = got.iter().map(String::as_str).collect();
    assert_eq!(got, want, "\n{body}");
}

#[test]
fn toml_syntax_errors_have_positions() {
    let got = errors("mode = \n");
    assert!(got[0].starts_with("2:"), "{got:?}");
}

#[test]
fn version_is_required_and_must_be_1() {
    let e = Policy::from_toml("mode = \"enforce\"\n", "p.toml").expect_err("refused");
    assert_eq!(
        e.to_string(),
        "p.toml:1:1: error: missing `version = 1` at the top of the policy"
    );
    let e = Policy::from_toml("version = 2\n", "p.toml").expect_err("refused");
    assert_eq!(e.diagnostics[0].col, 11);
}

#[test]
fn unknown_keys_are_refused_everywhere() {
    refused(
        "colour = 1\n[grants]\nttl = \"1h\"\n[[service]]\nid = \"spiffe://td/db\"\nprotocol = \"tcp\"\nport = 1\n[[rule]]\nname = \"r\"\nfrom = [\"spiffe://td/a\"]\nto = [\"spiffe://td/b\"]\npath = [\"/\"]\ntime = { hour = \"09:00-10:00\" }\n",
        &[
            "2:1: unknown key `colour`, expected one of version, mode, grants, service, rule, access",
            "4:1: unknown key `ttl` in [grants], expected one of max_ttl, approvals",
            "8:1: unknown key `port` in [[service]], expected one of id, protocol",
            "13:1: unknown key `path` in [[rule]], expected one of name, action, mode, from, to, ports, methods, paths, headers, source_cidrs, time, not_before, expires",
            "14:10: unknown field `hour`, expected one of `days`, `hours`, `tz`",
        ],
    );
}

#[test]
fn wrong_types_are_refused() {
    let got = errors(&format!("{R}ports = \"80\"\n"));
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("6:9: invalid type"), "{got:?}");
}

#[test]
fn rule_needs_name_from_and_to() {
    refused(
        "[[rule]]\naction = \"deny\"\n",
        &[
            "2:1: a [[rule]] needs a `name`",
            "2:1: a [[rule]] needs `from` (a list of SPIFFE IDs or patterns)",
            "2:1: a [[rule]] needs `to` (a list of SPIFFE IDs or patterns)",
        ],
    );
}

#[test]
fn empty_from_or_to_is_refused() {
    refused(
        "[[rule]]\nname = \"r\"\nfrom = []\nto = []\n",
        &[
            "4:8: `from` is empty, so the rule could never match",
            "5:6: `to` is empty, so the rule could never match",
        ],
    );
}

#[test]
fn duplicate_rule_names_are_refused() {
    refused(
        &format!("{R}{R}"),
        &["6:1: duplicate rule name `r` (first used on line 2)"],
    );
}

#[test]
fn bad_names_actions_and_modes_are_refused() {
    refused(
        "[[rule]]\nname = \"has space\"\naction = \"permit\"\nmode = \"audit\"\nfrom = [\"spiffe://td/a\"]\nto = [\"spiffe://td/b\"]\n",
        &[
            "3:8: rule names are 1 to 128 characters of a-z A-Z 0-9 . - _",
            "4:10: unknown action `permit`, expected \"allow\" or \"deny\"",
            "5:8: unknown mode `audit`, expected \"enforce\" or \"dry-run\"",
        ],
    );
}

#[test]
fn invalid_spiffe_ids_are_refused_each_with_its_position() {
    refused(
        "[[rule]]\nname = \"r\"\nfrom = [\"spiffe://Mayfly.local/web\", \"spiffe://td/a/\"]\nto = [\"http://td/b\", \"spiffe://td/a*\", \"spiffe://td\"]\n",
        &[
            "4:9: invalid SPIFFE ID: the trust domain must be lowercase (write `mayfly.local`)",
            "4:38: invalid SPIFFE ID: the path has an empty segment (`//` or a trailing `/`)",
            "5:7: invalid SPIFFE ID: a SPIFFE ID starts with `spiffe://`",
            "5:22: `*` is only allowed as a final `/*` segment (`spiffe://td/ns/*`, `spiffe://td/*`)",
            "5:40: `spiffe://td` is the trust domain's own ID, which no workload has; write `spiffe://td/*` for every workload in it",
        ],
    );
}

#[test]
fn http_conditions_on_a_tcp_service_are_refused() {
    refused(
        "[[service]]\nid = \"spiffe://td/api\"\nprotocol = \"tcp\"\n[[rule]]\nname = \"r\"\nfrom = [\"spiffe://td/web\"]\nto = [\"spiffe://td/api\"]\nmethods = [\"GET\"]\n",
        &[
            "5:1: rule `r` has HTTP conditions (methods/paths/headers) but `to` names `spiffe://td/api`, declared protocol = \"tcp\"",
        ],
    );
}

#[test]
fn bad_services_are_refused() {
    refused(
        "[service]\nid = \"spiffe://td/a\"\nprotocol = \"tcp\"\n",
        &["2:1: `service` must be an array of tables: write `[[service]]`"],
    );
    refused(
        "[[service]]\nid = \"spiffe://td/*\"\nprotocol = \"udp\"\n[[service]]\nprotocol = \"tcp\"\n[[service]]\nid = \"spiffe://td/a\"\nprotocol = \"tcp\"\n[[service]]\nid = \"spiffe://td/a\"\nprotocol = \"http\"\n",
        &[
            "3:6: a service `id` is one exact SPIFFE ID, not a pattern",
            "4:12: unknown protocol `udp`, expected \"tcp\" or \"http\"",
            "5:1: a [[service]] needs an `id`",
            "10:1: service `spiffe://td/a` is already declared on line 7",
        ],
    );
}

#[test]
fn bad_ports_methods_paths_headers_and_cidrs_are_refused() {
    refused(
        &format!(
            "{R}ports = [0, 70000]\nmethods = [\"get\", \"G T\"]\npaths = [\"/a/./b\", \"/a/**/b\", \"/a*\", \"a\", \"/a?b\", \"/%2F\"]\nheaders = {{ \"bad name\" = \"x\", ok = \" padded\" }}\nsource_cidrs = [\"10.0.0.1/8\", \"10.0.0.0/33\"]\n"
        ),
        &[
            "6:10: port 0 is not in 1..=65535",
            "6:13: port 70000 is not in 1..=65535",
            "7:12: HTTP methods are case-sensitive: write `GET`",
            "7:19: `G T` is not an HTTP method",
            "8:10: path `/a/./b`: path is not in normal form; write `/a/b`",
            "8:20: path `/a/**/b`: `**` is only allowed as the final segment (`/orders/**`)",
            "8:31: path `/a*`: `*` must be a whole segment (`/orders/*/items`); partial wildcards are not supported",
            "8:38: path `a`: a path pattern starts with `/`",
            "8:43: path `/a?b`: a path pattern matches the path only: remove the `?query` / `#fragment`",
            "8:51: path `/%2F`: invalid path: encoded `/` (%2F) is refused",
            "9:13: `bad name` is not a valid header name",
            "9:36: header values may not hold control characters or leading/trailing spaces",
            "10:17: `10.0.0.1/8` has host bits set; write `10.0.0.0/8`",
            "10:31: `10.0.0.0/33` is not a CIDR like 10.0.0.0/8 or fd00::/8",
        ],
    );
}

#[test]
fn empty_condition_lists_are_refused() {
    refused(
        &format!("{R}ports = []\nmethods = []\npaths = []\nheaders = {{}}\nsource_cidrs = []\n"),
        &[
            "6:9: `ports` is empty; omit it to match any port",
            "7:11: `methods` is empty; omit it to match any value",
            "8:9: `paths` is empty; omit it to match any value",
            "9:11: `headers` is empty; omit it to match any headers",
            "10:16: `source_cidrs` is empty; omit it to match any value",
        ],
    );
}

#[test]
fn bad_time_windows_are_refused() {
    refused(
        &format!(
            "{R}time = {{ days = [\"mon\", \"mon\", \"funday\"], hours = \"9-17\", tz = \"Mars/Olympus\" }}\n[[rule]]\nname = \"r2\"\nfrom = [\"spiffe://td/web\"]\nto = [\"spiffe://td/api\"]\ntime = {{ hours = \"22:00-06:00\", tz = \"europe/paris\" }}\n[[rule]]\nname = \"r3\"\nfrom = [\"spiffe://td/web\"]\nto = [\"spiffe://td/api\"]\ntime = {{ tz = \"UTC\" }}\n"
        ),
        &[
            "6:25: day `mon` is listed twice",
            "6:32: unknown day `funday` (expected mon, tue, wed, thu, fri, sat, sun)",
            "6:51: expected hours like `09:00-17:00` (24-hour clock, end may be `24:00`)",
            "6:64: unknown time zone `Mars/Olympus` (use an IANA name like `Europe/Paris` or `UTC`)",
            "11:18: hours must end after they start; split a window across midnight into two rules",
            "11:38: write the time zone as `Europe/Paris`",
            "16:8: `time` needs `days`, `hours` or both",
        ],
    );
}

#[test]
fn bad_datetimes_are_refused() {
    refused(
        &format!(
            "{R}not_before = 2026-01-01T00:00:00\nexpires = 2026-01-01\n[[rule]]\nname = \"r2\"\nfrom = [\"spiffe://td/web\"]\nto = [\"spiffe://td/api\"]\nnot_before = \"tomorrow\"\nexpires = 3\n"
        ),
        &[
            "6:14: `not_before` needs a time zone offset: add `Z` (UTC) or `+01:00`",
            "7:11: `expires` needs a date and a time, like 2026-01-01T00:00:00Z",
            "12:14: `not_before`: `tomorrow` is not an RFC 3339 datetime like 2026-01-01T00:00:00Z",
            "13:11: `expires` must be a datetime like 2026-01-01T00:00:00Z, not a integer",
        ],
    );
}

#[test]
fn not_before_after_expires_is_refused() {
    refused(
        &format!("{R}not_before = 2026-06-01T00:00:00Z\nexpires = 2026-01-01T00:00:00Z\n"),
        &["6:14: `not_before` must be before `expires`"],
    );
}

#[test]
fn bad_grant_settings_are_refused() {
    refused(
        "[grants]\nmax_ttl = \"2d\"\napprovals = 2\n",
        &[
            "3:11: `max_ttl` is at most 1d (JIT grants are short-lived)",
            "4:13: `approvals` must be 0 or 1",
        ],
    );
    refused(
        "[grants]\nmax_ttl = \"1 hour\"\n",
        &[
            "3:11: `max_ttl`: expected a duration like `90s`, `15m`, `1h` or `1h30m` (units s, m, h, d)",
        ],
    );
}

#[test]
fn errors_display_with_file_line_and_column() {
    let e = Policy::from_toml(
        "version = 1\n[[rule]]\nname = \"r\"\nfrom = []\nto = [\"spiffe://td/a\"]\n",
        "prod.toml",
    )
    .expect_err("refused");
    assert_eq!(
        e.to_string(),
        "prod.toml:4:8: error: `from` is empty, so the rule could never match"
    );
}

#[test]
fn warnings_do_not_stop_loading() {
    let src = "version = 1\nmode = \"dry-run\"\n[[service]]\nid = \"spiffe://td/db\"\nprotocol = \"tcp\"\n[[rule]]\nname = \"r\"\nfrom = [\"spiffe://td/web\"]\nto = [\"spiffe://td/*\"]\nmethods = [\"GET\"]\nexpires = 2026-01-01T00:00:00Z\n";
    let loaded = Policy::from_toml(src, "p.toml").expect("loads");
    let w: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        w,
        [
            "p.toml:2:8: warning: the whole policy is dry-run: nothing is enforced and all traffic passes",
            "p.toml:6:1: warning: rule `r` has HTTP conditions, so it never applies to tcp service `spiffe://td/db` that `spiffe://td/*` covers",
        ]
    );
    assert!(
        loaded
            .warnings
            .iter()
            .all(|d| d.severity == Severity::Warning)
    );
    let at = Policy::from_toml_at(src, "p.toml", datetime!(2026-02-01 0:00 UTC)).expect("loads");
    assert!(at.warnings.iter().any(|w| w.to_string() == "p.toml:6:1: warning: rule `r` has expired and never matches"));
    assert!(
        loaded
            .policy
            .warnings_at(datetime!(2025-12-31 0:00 UTC))
            .is_empty()
    );
}

#[test]
fn version_hash_is_stable_and_content_based() {
    let a = Policy::from_toml("version = 1\n", "a")
        .expect("loads")
        .policy;
    let b = Policy::from_toml("version = 1\n", "b")
        .expect("loads")
        .policy;
    let c = Policy::from_toml("version = 1\n\n", "a")
        .expect("loads")
        .policy;
    assert_eq!(a.version(), b.version());
    assert_ne!(a.version(), c.version());
    assert!(a.version().chars().all(|c| c.is_ascii_hexdigit()));
}
