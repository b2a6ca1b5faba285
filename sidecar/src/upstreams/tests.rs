#![allow(clippy::unwrap_used)]
use super::endpoint::two_of;
use super::*;

fn outbounds(remote: &str) -> Vec<Outbound> {
    crate::config::Config::parse(
        &format!("spiffe_id = \"spiffe://mayfly.local/web\"\n[control_plane]\naddress = \"127.0.0.1:1\"\ntoken_file = \"t\"\n[[outbound]]\nname = \"orders\"\nlisten = \"127.0.0.1:0\"\n{remote}spiffe_id = \"spiffe://mayfly.local/orders\"\n"),
        "s.toml",
        std::path::Path::new("."),
    )
    .unwrap()
    .outbound
}

fn orders(remote: &str) -> Arc<Upstreams> {
    Upstreams::new(&outbounds(remote), Arc::new(Metrics::new()))
}

fn pushed(addrs: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    m.insert(
        "spiffe://mayfly.local/orders".to_owned(),
        addrs.iter().map(|a| (*a).to_owned()).collect(),
    );
    m
}

#[test]
fn only_the_endpoints_of_our_outbounds_ids_are_kept_and_shown() {
    let u = orders("");
    assert_eq!(u.ids(), ["spiffe://mayfly.local/orders"]);
    let mut p = pushed(&["10.0.0.5:1", "10.0.0.6:1"]);
    p.insert(
        "spiffe://mayfly.local/other".to_owned(),
        vec!["10.0.0.7:1".to_owned()],
    );
    u.install(&p);
    let v = u.json();
    assert_eq!(v["upstreams"][0]["name"], "orders");
    assert_eq!(
        v["upstreams"][0]["endpoints"],
        json!([
            {"address": "10.0.0.5:1", "state": "active", "outstanding": 0, "latency_ms": 30.0},
            {"address": "10.0.0.6:1", "state": "active", "outstanding": 0, "latency_ms": 30.0},
        ])
    );
    assert!(u.endpoints_of("spiffe://mayfly.local/other").is_empty());
    u.install(&BTreeMap::new());
    assert_eq!(u.json()["upstreams"][0]["endpoints"], json!([]));
}

#[test]
fn power_of_two_choices_never_takes_the_more_loaded_of_the_two_it_drew() {
    assert_eq!(p2c(&[] as &[usize], |l| *l, || 7), None);
    for r in 0..1000u64 {
        assert_eq!(p2c(&[9], |l| *l, || r), Some(0));
        for loads in [[0usize, 5, 2, 2, 7], [3, 3, 3, 3, 3], [9, 0, 4, 1, 6]] {
            let (i, j) = two_of(loads.len(), r);
            assert_ne!(i, j);
            let got = p2c(&loads, |l| *l, || r).unwrap();
            assert!(got == i || got == j);
            assert_eq!(loads[got], loads[i].min(loads[j]), "{loads:?} r={r}");
        }
    }
    // Every endpoint is drawn, and every pair of them.
    let mut pairs = std::collections::BTreeSet::new();
    for r in 0..1000u64 {
        pairs.insert(two_of(4, r));
    }
    assert_eq!(pairs.len(), 12);
}

#[test]
fn an_outbound_by_identity_counts_its_targets_and_prefers_the_idle_endpoint() {
    let u = orders("");
    let pool = u.pool("orders").unwrap();
    assert!(pool.target(&[]).is_none());
    u.install(&pushed(&["10.0.0.5:1", "10.0.0.6:1"]));
    let first = pool.target(&[]).unwrap();
    // With one endpoint busy, the two drawn are both endpoints: the idle one wins.
    for _ in 0..20 {
        let t = pool.target(&[]).unwrap();
        assert_ne!(t.address(), first.address());
    }
    let shown = u.json();
    let busy = shown["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == first.address())
        .unwrap()
        .clone();
    assert_eq!(busy["outstanding"], 1);
    // The count survives an update that keeps the endpoint, and ends with the target.
    u.install(&pushed(&["10.0.0.5:1", "10.0.0.6:1"]));
    assert_eq!(
        u.json()["upstreams"][0]["endpoints"][0]["outstanding"],
        shown["upstreams"][0]["endpoints"][0]["outstanding"]
    );
    drop(first);
    for e in u.json()["upstreams"][0]["endpoints"].as_array().unwrap() {
        assert_eq!(e["outstanding"], 0);
    }
    // A static remote is an endpoint like the others.
    let s = orders("remote = \"127.0.0.1:9\"\n");
    let t = s.pool("orders").unwrap().target(&[]).unwrap();
    assert_eq!(t.address(), "127.0.0.1:9");
}

#[test]
fn an_ejected_endpoint_is_skipped_until_its_backoff_ends_and_a_success_restores_it() {
    let list = vec![Endpoint::new("a:1".into()), Endpoint::new("b:1".into())];
    let now = Instant::now();
    let (n, d) = list[0].failed(now, 1.0);
    assert_eq!((n, d), (1, Duration::from_secs(1)));
    for r in 0..200u64 {
        let got = choose(&list, &[], now, || r).unwrap();
        assert_eq!(got.address(), "b:1");
    }
    // Its ejection over, it is a candidate again; a second failure ejects it for longer.
    let later = now + Duration::from_millis(1500);
    let seen: std::collections::BTreeSet<String> = (0..200u64)
        .map(|r| {
            choose(&list, &[], later, || r)
                .unwrap()
                .address()
                .to_owned()
        })
        .collect();
    assert!(seen.contains("a:1"), "{seen:?}");
    assert_eq!(list[0].failed(later, 1.0), (2, Duration::from_secs(2)));
    assert!(list[0].snapshot(later).ejected.is_some());
    list[0].succeeded(Duration::from_millis(5), later);
    assert_eq!(list[0].snapshot(later).ejected, None);
    assert_eq!(
        list[0].failed(later, 1.0).0,
        1,
        "a success starts the backoff over"
    );
}

#[test]
fn when_every_endpoint_is_ejected_the_one_whose_ejection_ends_first_is_tried() {
    let list = vec![
        Endpoint::new("a:1".into()),
        Endpoint::new("b:1".into()),
        Endpoint::new("c:1".into()),
    ];
    let now = Instant::now();
    for _ in 0..3 {
        list[0].failed(now, 1.0); // 4 s
    }
    list[1].failed(now, 1.0); // 1 s
    for _ in 0..2 {
        list[2].failed(now, 1.0); // 2 s
    }
    for r in 0..50u64 {
        assert_eq!(choose(&list, &[], now, || r).unwrap().address(), "b:1");
    }
    // A retry avoids what it tried while anything else is left, ejected or not.
    let tried = vec![list[1].clone()];
    assert_eq!(choose(&list, &tried, now, || 3).unwrap().address(), "c:1");
    let all = list.clone();
    assert_eq!(choose(&list, &all, now, || 3).unwrap().address(), "b:1");
    assert!(choose(&[], &[], now, || 3).is_none());
}

#[test]
fn peak_ewma_takes_a_peak_at_once_and_forgets_it_with_time() {
    let t0 = Instant::now();
    let mut e = PeakEwma::new(Duration::from_millis(30), t0);
    // A slower answer is the estimate at once.
    assert_eq!(e.observe(Duration::from_millis(200), t0), 200e6);
    // A faster one right after barely moves it; after one decay period it is mostly forgotten.
    let soon = e.observe(Duration::from_millis(10), t0 + Duration::from_millis(1));
    assert!(soon > 199e6, "{soon}");
    let later = e.observe(
        Duration::from_millis(10),
        t0 + Duration::from_millis(1) + DECAY_FOR_TEST,
    );
    let expected = soon * (-1.0f64).exp() + 10e6 * (1.0 - (-1.0f64).exp());
    assert!((later - expected).abs() < 1e3, "{later} vs {expected}");
    // Reading it decays it towards zero, never below.
    let read = e.estimate(t0 + DECAY_FOR_TEST * 10);
    assert!(read < later && read >= 0.0, "{read}");
}

const DECAY_FOR_TEST: Duration = endpoint::DECAY;

#[test]
fn the_choice_prefers_the_faster_of_two_idle_endpoints() {
    let list = vec![
        Endpoint::new("slow:1".into()),
        Endpoint::new("fast:1".into()),
    ];
    let now = Instant::now();
    list[0].succeeded(Duration::from_millis(500), now);
    list[1].succeeded(Duration::from_millis(1), now);
    for r in 0..50u64 {
        assert_eq!(choose(&list, &[], now, || r).unwrap().address(), "fast:1");
    }
}

#[test]
fn the_retry_budget_allows_a_fifth_of_requests_plus_the_floor_and_counts_refusals() {
    let metrics = Arc::new(Metrics::new());
    let u = Upstreams::new(&outbounds(""), metrics.clone());
    let pool = u.pool("orders").unwrap();
    for _ in 0..100 {
        pool.deposit();
    }
    // The floor (10/s over the 10 s window) plus 20 % of 100 requests, then nothing.
    let mut granted = 0;
    for _ in 0..1000 {
        if pool.may_retry(1) {
            granted += 1;
        }
    }
    let floor = (BUDGET_FLOOR_PER_SEC as u64 * BUDGET_WINDOW.as_secs()) as usize;
    assert_eq!(granted, floor + 20);
    // Never a third retry, whatever the budget.
    pool.deposit();
    assert!(!pool.may_retry(MAX_RETRIES + 1));
    let text = metrics.encode_as(crate::metrics::Format::Text);
    assert!(
        text.contains(&format!(
            "mayfly_sidecar_upstream_retries_total{{upstream=\"orders\"}} {granted}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "mayfly_sidecar_upstream_retry_budget_exhausted_total{{upstream=\"orders\"}} {}\n",
            1000 - granted
        )),
        "{text}"
    );
}

#[test]
fn the_series_of_a_departed_endpoint_are_dropped() {
    let metrics = Arc::new(Metrics::new());
    let u = Upstreams::new(&outbounds(""), metrics.clone());
    let pool = u.pool("orders").unwrap();
    u.install(&pushed(&["10.0.0.5:1", "10.0.0.6:1"]));
    for t in [pool.target(&[]).unwrap(), pool.target(&[]).unwrap()] {
        pool.answered(t.endpoint(), Some(200), Duration::from_millis(3));
        pool.failed(t.endpoint(), "reset");
    }
    let text = metrics.encode_as(crate::metrics::Format::Text);
    assert!(
        text.contains("mayfly_sidecar_upstream_endpoints{upstream=\"orders\"} 2\n"),
        "{text}"
    );
    assert!(text.contains("endpoint=\"10.0.0.5:1\""), "{text}");
    u.install(&pushed(&["10.0.0.6:1"]));
    let text = metrics.encode_as(crate::metrics::Format::Text);
    assert!(!text.contains("10.0.0.5:1"), "{text}");
    assert!(text.contains("endpoint=\"10.0.0.6:1\""), "{text}");
    assert!(
        text.contains("mayfly_sidecar_upstream_endpoints{upstream=\"orders\"} 1\n"),
        "{text}"
    );
}

#[test]
fn a_static_list_is_balanced_and_ejected_like_pushed_endpoints() {
    let u = orders("remote = [\"127.0.0.1:7\", \"127.0.0.1:8\"]\n");
    let pool = u.pool("orders").unwrap();
    assert_eq!(pool.addresses(), ["127.0.0.1:7", "127.0.0.1:8"]);
    // Not replaced by pushed endpoints of its SPIFFE ID.
    u.install(&pushed(&["10.0.0.5:1"]));
    assert_eq!(pool.addresses(), ["127.0.0.1:7", "127.0.0.1:8"]);
    let first = pool.target(&[]).unwrap();
    pool.failed(first.endpoint(), "refused");
    for _ in 0..20 {
        assert_ne!(pool.target(&[]).unwrap().address(), first.address());
    }
    assert_eq!(
        u.json()["upstreams"][0]["remote"],
        "127.0.0.1:7,127.0.0.1:8"
    );
}

#[tokio::test]
async fn a_remote_dns_name_is_resolved_into_endpoints_and_its_ip_entries_kept() {
    let u = orders("remote = [\"localhost:7\", \"127.0.0.9:8\"]\n");
    let pool = u.pool("orders").unwrap();
    // Before the first resolution only the IP entry is known.
    assert_eq!(pool.addresses(), ["127.0.0.9:8"]);
    let entries = pool.dns.clone().unwrap();
    pool.resolve_once(&entries).await;
    let got = pool.addresses();
    assert!(got.contains(&"127.0.0.1:7".to_owned()), "{got:?}");
    assert!(got.contains(&"127.0.0.9:8".to_owned()), "{got:?}");
    // A name that does not resolve keeps the last set.
    let before = pool.addresses();
    pool.resolve_once(&["no-such-host.invalid:7".to_owned()])
        .await;
    assert_eq!(pool.addresses(), before);
}

#[test]
fn sequential_choices_among_identical_endpoints_share_them_evenly() {
    // Every load equal (nothing outstanding, latencies under the floor): ties are broken by
    // recency, so the most recently chosen endpoint never wins one. A fair coin instead
    // strays beyond 80..=120 of 300 for some endpoint in about 3 % of runs.
    let now = Instant::now();
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..50 {
        let list: Vec<Arc<Endpoint>> = ["a:1", "b:1", "c:1"]
            .iter()
            .map(|a| Endpoint::new((*a).into()))
            .collect();
        let mut counts = BTreeMap::<String, usize>::new();
        let mut last = String::new();
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = Target::new(choose(&list, &[], now, || x).unwrap());
            assert_ne!(t.address(), last, "the endpoint chosen last lost no tie");
            last = t.address().to_owned();
            *counts.entry(last.clone()).or_default() += 1;
        }
        assert!(
            counts.values().all(|n| (85..=115).contains(n)),
            "{counts:?}"
        );
    }
}

#[test]
fn answers_are_counted_by_status_class_under_labels_built_once_per_endpoint() {
    let metrics = Arc::new(Metrics::new());
    let u = Upstreams::new(&outbounds(""), metrics.clone());
    let pool = u.pool("orders").unwrap();
    u.install(&pushed(&["10.0.0.5:1"]));
    let t = pool.target(&[]).unwrap();
    for status in [Some(200), Some(204), Some(503), None] {
        pool.answered(t.endpoint(), status, Duration::from_millis(3));
    }
    pool.timed_out(t.endpoint(), Duration::from_millis(40));
    let text = metrics.encode_as(crate::metrics::Format::Text);
    for (class, n) in [("2xx", 2), ("5xx", 1), ("error", 2)] {
        let line = format!(
            "mayfly_sidecar_upstream_requests_total{{upstream=\"orders\",endpoint=\"10.0.0.5:1\",class=\"{class}\"}} {n}\n"
        );
        assert!(text.contains(&line), "{line} in {text}");
    }
    // Only answers with a status are timed.
    assert!(
        text.contains("mayfly_sidecar_upstream_request_duration_seconds_count{upstream=\"orders\",endpoint=\"10.0.0.5:1\"} 3\n"),
        "{text}"
    );
}
