//! Table-driven tests for every match field, one allow rule at a time.

mod common;

use std::net::IpAddr;

use common::*;
use mayfly_policy::{HttpRequest, Request};
use time::macros::datetime;

/// Asserts each (request, expected allow) against a policy with one allow rule.
fn check(extra: &str, cases: &[(Request<'_>, bool)]) {
    let e = engine(&rule("r", "allow", extra));
    for (i, (req, want)) in cases.iter().enumerate() {
        let d = e.decide(req, &[]);
        assert_eq!(
            d.allow,
            *want,
            "case {i} for `{extra}`: {}",
            e.explain(req, &[])
        );
    }
}

#[test]
fn from_forms_match_exact_prefix_and_trust_domain() {
    let cases = [
        (
            "spiffe://mayfly.local/web",
            "spiffe://mayfly.local/web",
            true,
        ),
        (
            "spiffe://mayfly.local/web",
            "spiffe://mayfly.local/web2",
            false,
        ),
        (
            "spiffe://mayfly.local/ns/prod/*",
            "spiffe://mayfly.local/ns/prod/web",
            true,
        ),
        (
            "spiffe://mayfly.local/ns/prod/*",
            "spiffe://mayfly.local/ns/prod/a/b",
            true,
        ),
        (
            "spiffe://mayfly.local/ns/prod/*",
            "spiffe://mayfly.local/ns/prod",
            false,
        ),
        (
            "spiffe://mayfly.local/ns/prod/*",
            "spiffe://mayfly.local/ns/prodx/web",
            false,
        ),
        (
            "spiffe://mayfly.local/*",
            "spiffe://mayfly.local/any/thing",
            true,
        ),
        ("spiffe://mayfly.local/*", "spiffe://other.local/web", false),
    ];
    for (from, source, want) in cases {
        let e = engine(&format!(
            "[[rule]]\nname = \"r\"\nfrom = [\"{from}\"]\nto = [\"{ORDERS}\"]\n"
        ));
        assert_eq!(
            e.decide(&conn(source, ORDERS), &[]).allow,
            want,
            "{from} / {source}"
        );
    }
}

#[test]
fn to_forms_match_exact_prefix_and_trust_domain() {
    let cases = [
        (
            "spiffe://mayfly.local/orders",
            "spiffe://mayfly.local/orders",
            true,
        ),
        (
            "spiffe://mayfly.local/orders",
            "spiffe://mayfly.local/orders/v2",
            false,
        ),
        (
            "spiffe://mayfly.local/ns/prod/*",
            "spiffe://mayfly.local/ns/prod/orders",
            true,
        ),
        (
            "spiffe://mayfly.local/ns/prod/*",
            "spiffe://mayfly.local/ns/dev/orders",
            false,
        ),
        (
            "spiffe://mayfly.local/*",
            "spiffe://mayfly.local/orders",
            true,
        ),
        (
            "spiffe://mayfly.local/*",
            "spiffe://mayfly.localx/orders",
            false,
        ),
    ];
    for (to, dest, want) in cases {
        let e = engine(&format!(
            "[[rule]]\nname = \"r\"\nfrom = [\"{WEB}\"]\nto = [\"{to}\"]\n"
        ));
        assert_eq!(e.decide(&conn(WEB, dest), &[]).allow, want, "{to} / {dest}");
    }
}

#[test]
fn several_from_and_to_entries_are_alternatives() {
    let e = engine(&format!(
        "[[rule]]\nname = \"r\"\nfrom = [\"{WEB}\", \"spiffe://mayfly.local/batch/*\"]\nto = [\"{ORDERS}\", \"{DB}\"]\n"
    ));
    assert!(e.decide(&conn(WEB, DB), &[]).allow);
    assert!(
        e.decide(&conn("spiffe://mayfly.local/batch/nightly", ORDERS), &[])
            .allow
    );
    assert!(
        !e.decide(&conn("spiffe://mayfly.local/batch", ORDERS), &[])
            .allow
    );
}

#[test]
fn ports_must_contain_the_destination_port() {
    let c = conn(WEB, ORDERS);
    check(
        "ports = [8080, 8443]",
        &[
            (
                Request {
                    port: Some(8080),
                    ..c
                },
                true,
            ),
            (
                Request {
                    port: Some(8443),
                    ..c
                },
                true,
            ),
            (
                Request {
                    port: Some(9090),
                    ..c
                },
                false,
            ),
            (Request { port: None, ..c }, false),
        ],
    );
}

#[test]
fn methods_are_exact_and_case_sensitive() {
    check(
        r#"methods = ["GET", "HEAD"]"#,
        &[
            (http(WEB, ORDERS, "GET", "/"), true),
            (http(WEB, ORDERS, "HEAD", "/"), true),
            (http(WEB, ORDERS, "POST", "/"), false),
            (http(WEB, ORDERS, "get", "/"), false),
            (conn(WEB, ORDERS), false),
        ],
    );
}

#[test]
fn paths_match_exact_prefix_and_glob() {
    check(
        r#"paths = ["/orders", "/orders/**", "/users/*/items"]"#,
        &[
            (http(WEB, ORDERS, "GET", "/orders"), true),
            (http(WEB, ORDERS, "GET", "/orders/"), true),
            (http(WEB, ORDERS, "GET", "/orders/42"), true),
            (http(WEB, ORDERS, "GET", "/orders/42/lines/1"), true),
            (http(WEB, ORDERS, "GET", "/ordersx"), false),
            (http(WEB, ORDERS, "GET", "/Orders"), false),
            (http(WEB, ORDERS, "GET", "/users/7/items"), true),
            (http(WEB, ORDERS, "GET", "/users/7/items/1"), false),
            (http(WEB, ORDERS, "GET", "/users/items"), false),
            (http(WEB, ORDERS, "GET", "/users//items"), false),
            (http(WEB, ORDERS, "GET", "/"), false),
        ],
    );
}

#[test]
fn glob_with_final_double_star_needs_one_more_segment() {
    check(
        r#"paths = ["/t/*/files/**"]"#,
        &[
            (http(WEB, ORDERS, "GET", "/t/a/files/x"), true),
            (http(WEB, ORDERS, "GET", "/t/a/files/"), true),
            (http(WEB, ORDERS, "GET", "/t/a/files"), false),
            (http(WEB, ORDERS, "GET", "/t/a/other/x"), false),
        ],
    );
}

#[test]
fn root_double_star_matches_every_path() {
    check(
        r#"paths = ["/**"]"#,
        &[
            (http(WEB, ORDERS, "GET", "/"), true),
            (http(WEB, ORDERS, "GET", "/a/b"), true),
        ],
    );
}

#[test]
fn headers_match_exact_values_with_case_insensitive_names() {
    let req = |headers| Request {
        http: Some(HttpRequest {
            method: "GET",
            path: "/",
            headers,
        }),
        ..conn(WEB, ORDERS)
    };
    check(
        r#"headers = { "X-Env" = "prod" }"#,
        &[
            (req(&[("x-env", "prod")]), true),
            (req(&[("X-ENV", "prod"), ("other", "1")]), true),
            (req(&[("x-env", "Prod")]), false),
            (req(&[("x-env", "prod "), ("a", "b")]), false),
            (req(&[]), false),
            // Duplicates: an allow needs every value to match (fail closed).
            (req(&[("x-env", "prod"), ("x-env", "dev")]), false),
        ],
    );
}

#[test]
fn source_cidrs_contain_the_peer_address() {
    let c = conn(WEB, ORDERS);
    let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
    check(
        r#"source_cidrs = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]"#,
        &[
            (
                Request {
                    source_ip: ip("10.1.2.3"),
                    ..c
                },
                true,
            ),
            (
                Request {
                    source_ip: ip("11.1.2.3"),
                    ..c
                },
                false,
            ),
            (
                Request {
                    source_ip: ip("fd12::1"),
                    ..c
                },
                true,
            ),
            (
                Request {
                    source_ip: ip("192.0.2.7"),
                    ..c
                },
                true,
            ),
            (
                Request {
                    source_ip: ip("192.0.2.8"),
                    ..c
                },
                false,
            ),
            // IPv4-mapped IPv6 is compared as IPv4.
            (
                Request {
                    source_ip: ip("::ffff:10.0.0.1"),
                    ..c
                },
                true,
            ),
            (
                Request {
                    source_ip: None,
                    ..c
                },
                false,
            ),
        ],
    );
}

#[test]
fn time_windows_use_days_hours_and_the_time_zone() {
    let c = conn(WEB, ORDERS);
    check(
        r#"time = { days = ["mon","tue","wed","thu","fri"], hours = "09:00-17:00", tz = "Europe/Paris" }"#,
        &[
            // Monday 10:00 UTC = 11:00 Paris (CET).
            (
                Request {
                    now: datetime!(2026-03-02 10:00 UTC),
                    ..c
                },
                true,
            ),
            // 08:30 UTC = 09:30 Paris: inside, though outside in UTC terms.
            (
                Request {
                    now: datetime!(2026-03-02 08:30 UTC),
                    ..c
                },
                true,
            ),
            // 16:30 UTC = 17:30 Paris: outside.
            (
                Request {
                    now: datetime!(2026-03-02 16:30 UTC),
                    ..c
                },
                false,
            ),
            // 15:59 UTC in summer = 17:59 CEST: outside; 14:59 = 16:59: inside.
            (
                Request {
                    now: datetime!(2026-07-06 15:59 UTC),
                    ..c
                },
                false,
            ),
            (
                Request {
                    now: datetime!(2026-07-06 14:59 UTC),
                    ..c
                },
                true,
            ),
            // Saturday.
            (
                Request {
                    now: datetime!(2026-03-07 10:00 UTC),
                    ..c
                },
                false,
            ),
            // Sunday 23:30 UTC = Monday 00:30 Paris: a Monday, but before 09:00.
            (
                Request {
                    now: datetime!(2026-03-08 23:30 UTC),
                    ..c
                },
                false,
            ),
            // Friday 23:30 UTC = Saturday in Paris.
            (
                Request {
                    now: datetime!(2026-03-06 23:30 UTC),
                    ..c
                },
                false,
            ),
        ],
    );
}

#[test]
fn time_window_end_is_exclusive_and_tz_defaults_to_utc() {
    let c = conn(WEB, ORDERS);
    check(
        r#"time = { hours = "09:00-17:00" }"#,
        &[
            (
                Request {
                    now: datetime!(2026-03-07 09:00 UTC),
                    ..c
                },
                true,
            ),
            (
                Request {
                    now: datetime!(2026-03-07 16:59:59 UTC),
                    ..c
                },
                true,
            ),
            (
                Request {
                    now: datetime!(2026-03-07 17:00 UTC),
                    ..c
                },
                false,
            ),
        ],
    );
    check(
        r#"time = { days = ["sat"] }"#,
        &[
            (
                Request {
                    now: datetime!(2026-03-07 23:59 UTC),
                    ..c
                },
                true,
            ),
            (
                Request {
                    now: datetime!(2026-03-08 00:00 UTC),
                    ..c
                },
                false,
            ),
        ],
    );
}

#[test]
fn not_before_is_inclusive_and_expires_exclusive() {
    let c = conn(WEB, ORDERS);
    check(
        "not_before = 2026-01-01T00:00:00Z\nexpires = \"2026-12-31T00:00:00+01:00\"",
        &[
            (
                Request {
                    now: datetime!(2025-12-31 23:59:59 UTC),
                    ..c
                },
                false,
            ),
            (
                Request {
                    now: datetime!(2026-01-01 00:00 UTC),
                    ..c
                },
                true,
            ),
            (
                Request {
                    now: datetime!(2026-12-30 22:59:59 UTC),
                    ..c
                },
                true,
            ),
            (
                Request {
                    now: datetime!(2026-12-30 23:00 UTC),
                    ..c
                },
                false,
            ),
        ],
    );
}

#[test]
fn conditions_combine_with_and() {
    check(
        r#"ports = [8080]
methods = ["GET"]
paths = ["/orders/**"]"#,
        &[
            (http(WEB, ORDERS, "GET", "/orders/1"), true),
            (http(WEB, ORDERS, "POST", "/orders/1"), false),
            (http(WEB, ORDERS, "GET", "/users/1"), false),
            (
                Request {
                    port: Some(1),
                    ..http(WEB, ORDERS, "GET", "/orders/1")
                },
                false,
            ),
        ],
    );
}
