//! `Engine::decide` at 10, 1,000 and 10,000 generated rules: hit and miss.
//!
//! Rules look like a real mesh: many destinations (`ns/<n>/svc/<s>`), sources named exactly or
//! by namespace prefix, a third with HTTP methods/paths, one in ten a deny.

use divan::{Bencher, black_box};
use mayfly_policy::{Engine, HttpRequest, Policy, Request};
use time::macros::datetime;

fn main() {
    divan::main();
}

const SIZES: [usize; 3] = [10, 1_000, 10_000];

fn id(ns: usize, svc: usize) -> String {
    format!("spiffe://mayfly.local/ns/n{ns}/svc/s{svc}")
}

fn policy_src(rules: usize) -> String {
    let mut s = String::from("version = 1\n");
    for i in 0..rules {
        let dest = id(i % 97, i / 3);
        let from = match i % 4 {
            0 => format!("\"spiffe://mayfly.local/ns/n{}/*\"", (i + 1) % 97),
            _ => format!("\"{}\"", id((i + 1) % 97, i / 3 + 1)),
        };
        s.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nfrom = [{from}]\nto = [\"{dest}\"]\n"
        ));
        if i % 10 == 9 {
            s.push_str("action = \"deny\"\npaths = [\"/admin/**\"]\n");
        } else if i % 3 == 0 {
            s.push_str("ports = [8080]\nmethods = [\"GET\", \"HEAD\"]\npaths = [\"/api/**\", \"/items/*/detail\"]\n");
        }
    }
    s
}

fn engine(rules: usize) -> Engine {
    let src = policy_src(rules);
    match Policy::from_toml(&src, "bench.toml") {
        Ok(l) => l.policy.compile(),
        Err(e) => panic!("{e}"),
    }
}

/// Rule 0 (an HTTP rule from a namespace prefix) admits this request.
fn hit_ids(rules: usize) -> (String, String) {
    let _ = rules;
    (id(1, 7), id(0, 0))
}

fn decide(bencher: Bencher<'_, '_>, rules: usize, hit: bool) {
    let e = engine(rules);
    let (source, destination) = if hit {
        hit_ids(rules)
    } else {
        (id(50, 1), id(3, 999_999))
    };
    let headers = [("user-agent", "bench")];
    let req = Request {
        source: &source,
        destination: &destination,
        port: Some(8080),
        source_ip: None,
        http: Some(HttpRequest {
            method: "GET",
            path: "/api/v1/items",
            headers: &headers,
        }),
        now: datetime!(2026-03-02 10:00 UTC),
    };
    assert_eq!(e.decide(&req, &[]).allow, hit);
    bencher.bench_local(|| e.decide(black_box(&req), &[]));
}

#[divan::bench(args = SIZES)]
fn http_hit(bencher: Bencher<'_, '_>, rules: usize) {
    decide(bencher, rules, true);
}

#[divan::bench(args = SIZES)]
fn http_miss(bencher: Bencher<'_, '_>, rules: usize) {
    decide(bencher, rules, false);
}

#[divan::bench(args = SIZES)]
fn connection_hit(bencher: Bencher<'_, '_>, rules: usize) {
    let e = engine(rules);
    // Rule 1: exact source, no HTTP conditions.
    let (source, destination) = (id(2, 1), id(1, 0));
    let req = Request {
        source: &source,
        destination: &destination,
        port: Some(5432),
        source_ip: None,
        http: None,
        now: datetime!(2026-03-02 10:00 UTC),
    };
    assert!(e.decide(&req, &[]).allow);
    bencher.bench_local(|| e.decide(black_box(&req), &[]));
}

#[divan::bench(args = [1_000, 10_000])]
fn compile(bencher: Bencher<'_, '_>, rules: usize) {
    let src = policy_src(rules);
    let policy = match Policy::from_toml(&src, "bench.toml") {
        Ok(l) => l.policy,
        Err(e) => panic!("{e}"),
    };
    bencher.bench_local(|| policy.compile());
}
