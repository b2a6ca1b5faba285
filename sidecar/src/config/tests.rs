use super::*;

const GOOD: &str = r#"
spiffe_id = "spiffe://mayfly.local/orders"
[control_plane]
address = "127.0.0.1:8443"
token_file = "token"
[inbound]
listen = "10.0.0.5:15443"
app = "127.0.0.1:8080"
[[outbound]]
name = "db"
listen = "127.0.0.1:15001"
remote = "127.0.0.1:16443"
spiffe_id = "spiffe://mayfly.local/db"
[policy]
file = "policy.toml"
"#;

#[test]
fn a_good_config_parses_with_defaults() {
    let c = Config::parse(GOOD, "s.toml", Path::new("/etc/mayfly")).unwrap();
    assert_eq!(c.spiffe_id.to_string(), "spiffe://mayfly.local/orders");
    assert_eq!(c.admin.to_string(), "127.0.0.1:15000");
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.policy_file.unwrap(), Path::new("/etc/mayfly/policy.toml"));
    assert!(
        matches!(c.control_plane.token, TokenSource::File(p) if p == Path::new("/etc/mayfly/token"))
    );
    assert_eq!(c.worker_threads, 1);
    assert_eq!(
        c.limits.underscore_identity_headers,
        UnderscoreHeaders::Drop
    );
}

#[test]
fn several_inbound_listeners_parse_and_one_inbound_table_still_does() {
    let one = Config::parse(GOOD, "s.toml", Path::new(".")).unwrap();
    assert_eq!(one.inbound.len(), 1);
    assert_eq!(one.inbound[0].app.to_string(), "127.0.0.1:8080");
    let head = "spiffe_id = \"spiffe://mayfly.local/orders\"\n[control_plane]\naddress = \"127.0.0.1:8443\"\ntoken_file = \"token\"\n";
    let two = format!(
        "{head}[[inbound]]\nlisten = \"10.0.0.5:15443\"\napp = \"127.0.0.1:8080\"\n[[inbound]]\nlisten = \"10.0.0.5:15444\"\napp = \"127.0.0.1:9090\"\nprotocol = \"http\"\n"
    );
    let c = Config::parse(&two, "s.toml", Path::new(".")).unwrap();
    let got: Vec<(String, String, Protocol)> = c
        .inbound
        .iter()
        .map(|i| (i.listen.to_string(), i.app.to_string(), i.protocol))
        .collect();
    assert_eq!(
        got,
        [
            (
                "10.0.0.5:15443".into(),
                "127.0.0.1:8080".into(),
                Protocol::Tcp
            ),
            (
                "10.0.0.5:15444".into(),
                "127.0.0.1:9090".into(),
                Protocol::Http
            ),
        ]
    );
    // Errors name the listener.
    let e = err(&two.replace("15444", "15443"));
    assert!(
        e.contains("`inbound[1].listen`") && e.contains("another"),
        "{e}"
    );
    let e = err(&two.replace("app = \"127.0.0.1:9090\"", "ap = \"127.0.0.1:9090\""));
    assert!(e.contains("`inbound[1]`") && e.contains("ap"), "{e}");
    let e = err(&two.replace("127.0.0.1:9090", "nowhere"));
    assert!(
        e.contains("`inbound[1].app`") && e.contains("nowhere"),
        "{e}"
    );
    let e = err(&format!("inbound = 3\n{head}"));
    assert!(e.contains("`inbound`") && e.contains("[[inbound]]"), "{e}");
}

#[test]
fn underscored_identity_headers_can_be_refused_instead_of_dropped() {
    let c = Config::parse(
        &format!("{GOOD}\n[limits]\nunderscore_identity_headers = \"reject\"\n"),
        "s.toml",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(
        c.limits.underscore_identity_headers,
        UnderscoreHeaders::Reject
    );
    let e = err(&format!(
        "{GOOD}\n[limits]\nunderscore_identity_headers = \"allow\"\n"
    ));
    assert!(
        e.contains("underscore_identity_headers") || e.contains("drop"),
        "{e}"
    );
}

#[test]
fn audit_durability_is_batched_unless_strict_is_asked_for() {
    let c = Config::parse(GOOD, "s.toml", Path::new(".")).unwrap();
    assert_eq!(c.audit.durability, Durability::Batched);
    let c = Config::parse(
        &format!("{GOOD}\n[audit]\ndurability = \"strict\"\n"),
        "s.toml",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.audit.durability, Durability::Strict);
    let e = err(&format!("{GOOD}\n[audit]\ndurability = \"fsync\"\n"));
    assert!(e.contains("durability") || e.contains("strict"), "{e}");
}

fn err(text: &str) -> String {
    Config::parse(text, "s.toml", Path::new("."))
        .unwrap_err()
        .to_string()
}

#[test]
fn errors_name_the_key_and_the_reason() {
    assert!(
        err(&GOOD.replace("orders\"\n[control", "Orders!\"\n[control")).contains("`spiffe_id`")
    );
    let e = err(&GOOD.replace("10.0.0.5:15443", "nowhere"));
    assert!(
        e.contains("`inbound.listen`") && e.contains("nowhere"),
        "{e}"
    );
    let e = err(&GOOD.replace("127.0.0.1:15001", "0.0.0.0:15001"));
    assert!(
        e.contains("`outbound[0].listen`") && e.contains("loopback"),
        "{e}"
    );
    let e = err(&GOOD.replace("token_file = \"token\"", ""));
    assert!(e.contains("token_file"), "{e}");
    let e = err(&GOOD.replace("[policy]", "typo = 1\n[policy]"));
    assert!(e.contains("typo") && e.contains("line"), "{e}");
    let e = err(&format!("{GOOD}\n[limits]\nidle_timeout = \"5\"\n"));
    assert!(e.contains("`limits.idle_timeout`"), "{e}");
    let e = err(&format!("{GOOD}\n[runtime]\nworker_threads = 0\n"));
    assert!(e.contains("worker_threads"), "{e}");
    let e = err(&GOOD.replace("spiffe://mayfly.local/db", "spiffe://Mayfly.local/db"));
    assert!(
        e.contains("outbound[0].spiffe_id") && e.contains("lowercase"),
        "{e}"
    );
}

#[test]
fn a_k8s_token_file_needs_a_ca_pin_and_excludes_join_tokens() {
    let k8s = GOOD.replace(
        "token_file = \"token\"",
        &format!(
            "k8s_token_file = \"/var/run/secrets/mayfly/token\"\nca_pin = \"{}\"",
            "AB".repeat(32)
        ),
    );
    let c = Config::parse(&k8s, "s.toml", Path::new("/etc/mayfly")).unwrap();
    assert!(
        matches!(c.control_plane.token, TokenSource::K8s(p) if p == Path::new("/var/run/secrets/mayfly/token"))
    );
    assert_eq!(c.control_plane.ca_pin.unwrap(), "ab".repeat(32));
    let e = err(&k8s.replace(&"AB".repeat(32), "abc"));
    assert!(
        e.contains("`control_plane.ca_pin`") && e.contains("64 hex"),
        "{e}"
    );
    let e = err(&k8s.replace("ca_pin", "#ca_pin"));
    assert!(
        e.contains("`control_plane.ca_pin`") && e.contains("required"),
        "{e}"
    );
    let e = err(&k8s.replace("k8s_token_file", "token_file"));
    assert!(e.contains("only used with k8s_token_file"), "{e}");
    let e = err(&k8s.replace("[control_plane]", "[control_plane]\ntoken_env = \"T\""));
    assert!(e.contains("exactly one"), "{e}");
}

#[test]
fn a_missing_or_unreadable_policy_file_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::parse(GOOD, "s.toml", dir.path()).unwrap();
    let e = c.check_policy_file("s.toml").unwrap_err().to_string();
    assert!(
        e.contains("`policy.file`") && e.contains("policy.toml") && e.contains("No such file"),
        "{e}"
    );
    std::fs::create_dir(dir.path().join("policy.toml")).unwrap();
    let e = c.check_policy_file("s.toml").unwrap_err().to_string();
    assert!(e.contains("is not a file"), "{e}");
    std::fs::remove_dir(dir.path().join("policy.toml")).unwrap();
    std::fs::write(dir.path().join("policy.toml"), "version = 1\n").unwrap();
    c.check_policy_file("s.toml").unwrap();
    let no_policy = GOOD.replace("[policy]\nfile = \"policy.toml\"\n", "");
    let c = Config::parse(&no_policy, "s.toml", dir.path()).unwrap();
    assert!(c.policy_file.is_none());
    c.check_policy_file("s.toml").unwrap();
}

#[test]
fn garbage_never_panics() {
    for t in ["", "[", "spiffe_id = 5", "\u{0}", "[[outbound]]\nname=1"] {
        assert!(Config::parse(t, "x", Path::new(".")).is_err());
    }
}

#[test]
fn the_default_spool_is_in_the_state_directory_when_there_is_one_and_spool_dir_wins() {
    let beside = Config::parse(GOOD, "s.toml", Path::new("/etc/mayfly")).unwrap();
    assert_eq!(
        beside.audit.spool_dir,
        Path::new("/etc/mayfly/mayfly-audit/orders")
    );
    let state = Path::new("/var/lib/mayfly-sidecar/orders");
    let c = Config::parse_in(GOOD, "s.toml", Path::new("/etc/mayfly"), Some(state)).unwrap();
    assert_eq!(
        c.audit.spool_dir,
        Path::new("/var/lib/mayfly-sidecar/orders/mayfly-audit/orders")
    );
    let explicit = format!("{GOOD}[audit]\nspool_dir = \"spool\"\n");
    let c = Config::parse_in(&explicit, "s.toml", Path::new("/etc/mayfly"), Some(state)).unwrap();
    assert_eq!(c.audit.spool_dir, Path::new("/etc/mayfly/spool"));
}

#[test]
fn a_spool_directory_that_cannot_be_created_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let text = format!("{GOOD}[audit]\nspool_dir = \"file/spool\"\n");
    let c = Config::parse(&text, "s.toml", dir.path()).unwrap();
    let e = c.audit.check_spool_dir("s.toml").unwrap_err().to_string();
    assert!(
        e.starts_with("s.toml: `audit.spool_dir`: cannot create"),
        "{e}"
    );
    let ok = Config::parse(GOOD, "s.toml", dir.path()).unwrap();
    ok.audit.check_spool_dir("s.toml").unwrap();
    let spool = dir.path().join("mayfly-audit/orders");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "the probe is removed"
    );
}

#[test]
fn the_advertised_address_is_advertise_or_a_specific_listen_address_and_never_a_wildcard() {
    let env = |k: &str| (k == "POD_IP").then(|| "10.1.2.3".to_owned());
    let specific = Config::parse(GOOD, "s.toml", Path::new(".")).unwrap();
    let bound: std::net::SocketAddr = "10.0.0.5:15443".parse().unwrap();
    assert_eq!(
        specific.inbound[0]
            .advertised(bound, env)
            .unwrap()
            .as_deref(),
        Some("10.0.0.5:15443")
    );
    // A wildcard listener must say what to advertise: `check` refuses it without.
    let wildcard = GOOD.replace("10.0.0.5:15443", "0.0.0.0:15443");
    let e = err(&wildcard);
    assert!(
        e.contains("`inbound.advertise`") && e.contains("required") && e.contains("wildcard"),
        "{e}"
    );
    let with = |a: &str| {
        wildcard.replace(
            "app = \"127.0.0.1:8080\"",
            &format!("app = \"127.0.0.1:8080\"\nadvertise = \"{a}\""),
        )
    };
    let c = Config::parse(&with("orders-0.orders.svc:15443"), "s.toml", Path::new(".")).unwrap();
    let wild: std::net::SocketAddr = "0.0.0.0:15443".parse().unwrap();
    assert_eq!(
        c.inbound[0].advertised(wild, env).unwrap().as_deref(),
        Some("orders-0.orders.svc:15443")
    );
    // `${NAME}` is read from the environment at start; `check` accepts it unset.
    let c = Config::parse(&with("${POD_IP}:15443"), "s.toml", Path::new(".")).unwrap();
    assert_eq!(
        c.inbound[0].advertised(wild, env).unwrap().as_deref(),
        Some("10.1.2.3:15443")
    );
    let unset = c.inbound[0].advertised(wild, |_| None).unwrap_err();
    assert!(unset.contains("POD_IP is not set"), "{unset}");
    let wild_var = c.inbound[0]
        .advertised(wild, |_| Some("0.0.0.0".into()))
        .unwrap_err();
    assert!(wild_var.contains("wildcard"), "{wild_var}");
    for bad in [
        "0.0.0.0:15443",
        "orders",
        "orders:0",
        "${POD_IP:15443",
        "${1X}:1",
        "${}:1",
    ] {
        let e = err(&with(bad));
        assert!(e.contains("`inbound.advertise`"), "{bad}: {e}");
    }
}

#[test]
fn an_outbound_request_timeout_defaults_to_fifteen_seconds_and_must_be_a_positive_duration() {
    let c = Config::parse(GOOD, "s.toml", Path::new("/etc/mayfly")).unwrap();
    assert_eq!(c.outbound[0].request_timeout, Duration::from_secs(15));
    let with = |v: &str| {
        GOOD.replace(
            "spiffe_id = \"spiffe://mayfly.local/db\"",
            &format!("spiffe_id = \"spiffe://mayfly.local/db\"\nrequest_timeout = \"{v}\""),
        )
    };
    let c = Config::parse(&with("2m"), "s.toml", Path::new("/etc/mayfly")).unwrap();
    assert_eq!(c.outbound[0].request_timeout, Duration::from_secs(120));
    for bad in ["0", "soon"] {
        let e = Config::parse(&with(bad), "s.toml", Path::new("/etc/mayfly")).unwrap_err();
        assert!(e.to_string().contains("outbound[0].request_timeout"), "{e}");
    }
}

#[test]
fn remote_is_one_address_a_list_or_a_dns_name_and_anything_else_is_refused() {
    let with = |v: &str| GOOD.replace("remote = \"127.0.0.1:16443\"", &format!("remote = {v}"));
    let c = Config::parse(
        &with("[\"10.0.0.1:1\", \"db.shop.svc:15443\"]"),
        "s.toml",
        Path::new("/"),
    )
    .unwrap();
    assert_eq!(c.outbound[0].remotes, ["10.0.0.1:1", "db.shop.svc:15443"]);
    assert_eq!(
        c.outbound[0].remote.as_deref(),
        Some("10.0.0.1:1,db.shop.svc:15443")
    );
    let c = Config::parse(GOOD, "s.toml", Path::new("/")).unwrap();
    assert_eq!(c.outbound[0].remotes, ["127.0.0.1:16443"]);
    for bad in [
        "[]",
        "\"\"",
        "\"db\"",
        "\"db:http\"",
        "[\"10.0.0.1:1\", \" x:1\"]",
        "\":80\"",
    ] {
        let e = Config::parse(&with(bad), "s.toml", Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("outbound[0].remote"), "{bad}: {e}");
    }
}

#[test]
fn the_workload_api_is_off_by_default_and_its_section_needs_allowed_callers() {
    let c = Config::parse(GOOD, "s.toml", Path::new("/etc/mayfly")).unwrap();
    assert_eq!(c.workload_api, None);
    let on = format!("{GOOD}\n[workload_api]\nsocket = \"wl.sock\"\nallowed_uids = [1000]\n");
    let w = Config::parse(&on, "s.toml", Path::new("/run/mayfly"))
        .unwrap()
        .workload_api
        .unwrap();
    assert_eq!(w.socket, Path::new("/run/mayfly/wl.sock"));
    assert_eq!(w.mode, 0o660);
    assert!(w.allows(1000, 5) && w.allows(1000, 1000) && !w.allows(1001, 1000));
    let by_group =
        format!("{GOOD}\n[workload_api]\nsocket = \"/s\"\nallowed_gids = [7]\nmode = \"0600\"\n");
    let w = Config::parse(&by_group, "s.toml", Path::new("."))
        .unwrap()
        .workload_api
        .unwrap();
    assert_eq!(w.mode, 0o600);
    assert!(w.allows(1, 7) && !w.allows(7, 1));
    let octal =
        format!("{GOOD}\n[workload_api]\nsocket = \"/s\"\nallowed_gids = [7]\nmode = 0o666\n");
    assert_eq!(
        Config::parse(&octal, "s.toml", Path::new("."))
            .unwrap()
            .workload_api
            .unwrap()
            .mode,
        0o666
    );
    let e = err(&format!("{GOOD}\n[workload_api]\nsocket = \"/s\"\n"));
    assert!(
        e.contains("`workload_api.allowed_uids`") && e.contains("allowed_gids"),
        "{e}"
    );
    let e = err(&format!(
        "{GOOD}\n[workload_api]\nsocket = \"/s\"\nallowed_uids = [0]\nmode = 660\n"
    ));
    assert!(
        e.contains("`workload_api.mode`") && e.contains("octal"),
        "{e}"
    );
    let e = err(&format!(
        "{GOOD}\n[workload_api]\nsocket = \"/s\"\nallowed_uids = [0]\nmode = \"rw\"\n"
    ));
    assert!(e.contains("`workload_api.mode`"), "{e}");
    let e = err(&format!(
        "{GOOD}\n[workload_api]\nsocket = \"/s\"\nallowed_uids = [-1]\n"
    ));
    assert!(e.contains("allowed_uids"), "{e}");
}

#[test]
fn the_control_plane_address_is_one_address_or_a_list_of_replicas() {
    let one = Config::parse(GOOD, "s.toml", Path::new(".")).unwrap();
    assert_eq!(one.control_plane.addresses(), ["127.0.0.1:8443"]);
    let list = GOOD.replace(
        "address = \"127.0.0.1:8443\"",
        "address = [\"127.0.0.1:8443\", \"ca-2.example:8443\", \"[::1]:9443\"]",
    );
    let c = Config::parse(&list, "s.toml", Path::new(".")).unwrap();
    assert_eq!(
        c.control_plane.addresses(),
        ["127.0.0.1:8443", "ca-2.example:8443", "[::1]:9443"]
    );
    let name = GOOD.replace("127.0.0.1:8443", "mayfly-ca.mayfly-system.svc:8443");
    let c = Config::parse(&name, "s.toml", Path::new(".")).unwrap();
    assert_eq!(
        c.control_plane.addresses(),
        ["mayfly-ca.mayfly-system.svc:8443"]
    );
}

#[test]
fn a_bad_control_plane_address_or_an_empty_list_is_refused_with_the_entry_named() {
    let with = |a: &str| GOOD.replace("address = \"127.0.0.1:8443\"", &format!("address = {a}"));
    let e = err(&with("[]"));
    assert!(
        e.contains("`control_plane.address`") && e.contains("empty"),
        "{e}"
    );
    let e = err(&with("\"\""));
    assert!(
        e.contains("`control_plane.address`") && e.contains("HOST:PORT"),
        "{e}"
    );
    let e = err(&with("[\"127.0.0.1:8443\", \"ca-2.example\"]"));
    assert!(
        e.contains("`control_plane.address[1]`") && e.contains("\"ca-2.example\""),
        "{e}"
    );
    let e = err(&with("[\"127.0.0.1:8443\", \"ca 2:8443\"]"));
    assert!(
        e.contains("`control_plane.address[1]`") && e.contains("host"),
        "{e}"
    );
    let e = err(&with("\"127.0.0.1:0\""));
    assert!(e.contains("port"), "{e}");
    let e = err(&with("[\"127.0.0.1:8443\", \"127.0.0.1:8443\"]"));
    assert!(e.contains("twice"), "{e}");
    let e = err(&with("\"127.0.0.1:8443,127.0.0.1:8444\""));
    assert!(e.contains("`control_plane.address`"), "{e}");
    let e = err(&with("[1]"));
    assert!(
        e.contains("address") && e.contains("expected a string"),
        "{e}"
    );
    let e = err(&with("8443"));
    assert!(e.contains("address") && e.contains("HOST:PORT"), "{e}");
}
