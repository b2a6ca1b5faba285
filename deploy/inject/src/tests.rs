use std::path::Path;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use mayfly_sidecar::config::{Config, TokenSource};

const PIN: &str = "3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f";

/// The sidecar's own configuration parser, as `mayfly-sidecar inject` passes it.
pub(crate) fn check_config(text: &str) -> Result<(), ConfigRejected> {
    Config::parse(text, CONFIG_ENV, Path::new("/"))
        .map(drop)
        .map_err(|e| ConfigRejected(e.to_string()))
}

fn opts() -> InjectOptions {
    InjectOptions::new(PIN, check_config)
}

const EXAMPLES: [(&str, &str); 5] = [
    ("web", include_str!("../../../examples/kubernetes/web.yaml")),
    (
        "orders",
        include_str!("../../../examples/kubernetes/orders.yaml"),
    ),
    ("db", include_str!("../../../examples/kubernetes/db.yaml")),
    (
        "namespace",
        include_str!("../../../examples/kubernetes/namespace.yaml"),
    ),
    (
        "policy",
        include_str!("../../../examples/kubernetes/policy.yaml"),
    ),
];

fn example(name: &str) -> &'static str {
    EXAMPLES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .unwrap()
}

fn docs(text: &str) -> Vec<Value> {
    parse_documents(text).unwrap()
}

fn workload(text: &str) -> Value {
    docs(text)
        .into_iter()
        .find(|d| {
            template_paths(
                d["apiVersion"].as_str().unwrap(),
                d["kind"].as_str().unwrap(),
            )
            .is_some()
        })
        .unwrap()
}

fn sidecar_config(container: &Value) -> Config {
    assert_eq!(container["env"][0]["name"], CONFIG_ENV);
    let toml = container["env"][0]["value"].as_str().unwrap();
    Config::parse(toml, "env", Path::new("/")).unwrap()
}

#[test]
fn a_deployment_gets_a_native_sidecar_that_attests_with_its_service_account() {
    let out = inject_yaml(example("orders"), &opts()).unwrap();
    let d = workload(&out);
    let pod = &d["spec"]["template"];
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann[ANNOTATION_INJECTED], "true");
    assert_eq!(
        ann[ANNOTATION_SPIFFE_ID],
        "spiffe://mayfly.local/ns/shop/sa/orders"
    );
    assert_eq!(ann["kubectl.kubernetes.io/default-container"], "orders");
    let c = &pod["spec"]["initContainers"][0];
    assert_eq!(c["name"], CONTAINER_NAME);
    assert_eq!(c["restartPolicy"], "Always");
    assert_eq!(c["image"], DEFAULT_IMAGE);
    assert_eq!(
        c["args"],
        json!(["run", "--config-env", CONFIG_ENV, "--log-format", "json"])
    );
    assert_eq!(
        c["startupProbe"]["httpGet"],
        json!({"path": "/readyz", "port": 15000})
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        c["resources"],
        json!({"requests": {"cpu": "50m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}})
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    // The generated configuration is one the sidecar accepts, with the pod's identity.
    let cfg = sidecar_config(c);
    assert_eq!(
        cfg.spiffe_id.to_string(),
        "spiffe://mayfly.local/ns/shop/sa/orders"
    );
    assert_eq!(cfg.control_plane.address, DEFAULT_CONTROL_PLANE);
    assert!(
        matches!(&cfg.control_plane.token, TokenSource::K8s(p) if p == Path::new("/var/run/secrets/mayfly/token"))
    );
    assert_eq!(cfg.control_plane.ca_pin.as_deref(), Some(PIN));
    let [inbound] = cfg.inbound.as_slice() else {
        panic!("one inbound listener: {:?}", cfg.inbound)
    };
    assert_eq!(inbound.listen.to_string(), "0.0.0.0:15443");
    assert_eq!(inbound.app.to_string(), "127.0.0.1:8080");
    // Registered with the control plane at the pod's IP, from the downward API.
    assert_eq!(inbound.advertise.as_deref(), Some("${MAYFLY_POD_IP}:15443"));
    let bound = "0.0.0.0:15443".parse().unwrap();
    let ip = |k: &str| (k == POD_IP_ENV).then(|| "10.244.1.7".to_owned());
    assert_eq!(
        inbound.advertised(bound, ip).unwrap().as_deref(),
        Some("10.244.1.7:15443")
    );
    let env = c["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == POD_IP_ENV
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"),
        "{env:?}"
    );
    assert_eq!(cfg.outbound.len(), 1);
    assert_eq!(cfg.outbound[0].listen.to_string(), "127.0.0.1:15002");
    assert_eq!(cfg.outbound[0].remote.as_deref(), Some("db.shop.svc:15443"));
    assert_eq!(cfg.admin.to_string(), "0.0.0.0:15000");
    assert_eq!(
        cfg.policy_file.unwrap(),
        Path::new("/etc/mayfly/policy/policy.toml")
    );
    // The token volume: audience mayfly, 600 s, mounted where the config says.
    let vols = pod["spec"]["volumes"].as_array().unwrap();
    let token = vols.iter().find(|v| v["name"] == "mayfly-token").unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "mayfly", "expirationSeconds": 600, "path": "token"})
    );
    let policy = vols.iter().find(|v| v["name"] == "mayfly-policy").unwrap();
    assert_eq!(policy["configMap"]["name"], "mayfly-policy");
    // The app container is untouched.
    let original = workload(example("orders"));
    assert_eq!(
        pod["spec"]["containers"],
        original["spec"]["template"]["spec"]["containers"]
    );
}

#[test]
fn the_sidecar_spools_its_audit_records_on_an_empty_dir_of_its_own() {
    let out = inject_yaml(example("orders"), &opts()).unwrap();
    let pod = &workload(&out)["spec"]["template"];
    // The sidecar's root filesystem is read-only: the spool needs a writable volume.
    let c = &pod["spec"]["initContainers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let vols = pod["spec"]["volumes"].as_array().unwrap();
    let audit = vols.iter().find(|v| v["name"] == "mayfly-audit").unwrap();
    assert_eq!(audit["emptyDir"], json!({}));
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount = mounts.iter().find(|m| m["name"] == "mayfly-audit").unwrap();
    assert_eq!(mount["mountPath"], AUDIT_DIR);
    assert_ne!(mount["readOnly"], true);
    // The generated configuration spools there, in a directory of the sidecar's own.
    let cfg = sidecar_config(c);
    assert_eq!(cfg.audit.spool_dir, Path::new(AUDIT_SPOOL_DIR));
    assert!(cfg.audit.spool_dir.starts_with(AUDIT_DIR));
    // Mounted into the sidecar only: the app containers are not given it.
    for app in pod["spec"]["containers"].as_array().unwrap() {
        assert!(
            app["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|m| m["name"] != "mayfly-audit"),
            "{app}"
        );
    }
    // A pod that already has a volume of that name is refused, not given a second one.
    let mut p = workload(example("orders"));
    p["spec"]["template"]["spec"]["volumes"] = json!([{"name": "mayfly-audit", "emptyDir": {}}]);
    let e = inject_object(&mut p, &opts(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mayfly-audit"), "{e}");
}

#[test]
fn injection_is_idempotent_and_leaves_other_documents_byte_for_byte() {
    for (name, text) in EXAMPLES {
        let once = inject_yaml(text, &opts()).unwrap();
        let twice = inject_yaml(&once, &opts()).unwrap();
        assert_eq!(once, twice, "{name}");
    }
    // The ServiceAccount and the Service of web.yaml (with their comments) are unchanged.
    let web = example("web");
    let out = inject_yaml(web, &opts()).unwrap();
    assert!(out.starts_with("# web: the front end."), "{out}");
    assert!(out.contains(
        "---\n# Peers reach web's sidecar (mTLS) on 15443; the app port itself is not exposed.\napiVersion: v1\nkind: Service\n"
    ));
    let (a, b) = (docs(web), docs(&out));
    assert_eq!(a.len(), b.len());
    assert_eq!(a[0], b[0]);
    assert_eq!(a[2], b[2]);
    // Namespaces, ConfigMaps, CRDs and unknown kinds pass through verbatim.
    for other in [
        example("namespace"),
        example("policy"),
        "apiVersion: example.com/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {template: {spec: {containers: [{name: a}]}}}\n",
        "# only a comment\n",
        "",
        "---\n---\n",
    ] {
        assert_eq!(inject_yaml(other, &opts()).unwrap(), other);
    }
}

#[test]
fn every_workload_kind_is_injected_at_its_pod_template() {
    let pod_spec = json!({"serviceAccountName": "batch", "containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 9000}]}]});
    let template = json!({"metadata": {"labels": {"a": "b"}}, "spec": pod_spec});
    let cases = [
        (
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n1"}, "spec": pod_spec}),
            "/spec",
        ),
        (
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s", "namespace": "n1"}, "spec": {"template": template}}),
            "/spec/template/spec",
        ),
        (
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "d", "namespace": "n1"}, "spec": {"template": template}}),
            "/spec/template/spec",
        ),
        (
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "n1"}, "spec": {"template": template}}),
            "/spec/template/spec",
        ),
        (
            json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c", "namespace": "n1"}, "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}}),
            "/spec/jobTemplate/spec/template/spec",
        ),
    ];
    for (mut obj, spec_path) in cases {
        assert_eq!(
            inject_object(&mut obj, &opts(), None).unwrap(),
            Outcome::Injected
        );
        let spec = obj.pointer(spec_path).unwrap();
        let c = &spec["initContainers"][0];
        let cfg = sidecar_config(c);
        assert_eq!(
            cfg.spiffe_id.to_string(),
            "spiffe://mayfly.local/ns/n1/sa/batch",
            "{spec_path}"
        );
        assert_eq!(cfg.inbound[0].app.to_string(), "127.0.0.1:9000");
        assert_eq!(
            inject_object(&mut obj, &opts(), None).unwrap(),
            Outcome::AlreadyInjected
        );
    }
    // A List is injected item by item; defaults: namespace "default", service account "default".
    let mut list = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}},
    ]});
    assert_eq!(
        inject_object(&mut list, &opts(), None).unwrap(),
        Outcome::Injected
    );
    assert_eq!(
        list["items"][0]["metadata"]["annotations"][ANNOTATION_SPIFFE_ID],
        "spiffe://mayfly.local/ns/default/sa/default"
    );
    assert_eq!(
        list["items"][1],
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}})
    );
}

#[test]
fn annotations_opt_out_set_the_app_port_and_the_options_apply() {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"mayfly.io/inject": "false"}},
        "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]}});
    let before = p.clone();
    assert_eq!(
        inject_object(&mut p, &opts(), None).unwrap(),
        Outcome::OptedOut
    );
    assert_eq!(p, before);
    // An existing container named mayfly-sidecar counts as injected.
    let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a"}, {"name": "mayfly-sidecar"}]}});
    assert_eq!(
        inject_object(&mut p, &opts(), None).unwrap(),
        Outcome::AlreadyInjected
    );
    // app-port beats the first containerPort; UDP ports are skipped; options flow through.
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": {"mayfly.io/app-port": "9090", "mayfly.io/protocol": "http"}},
        "spec": {"serviceAccountName": "sa", "initContainers": [{"name": "migrate"}],
                 "containers": [{"name": "a", "ports": [{"containerPort": 53, "protocol": "UDP"}, {"containerPort": 80}]}]}});
    let o = InjectOptions {
        image: "registry.local/mayfly-sidecar:dev".into(),
        trust_domain: "prod.example".into(),
        control_plane: "ca.example:443".into(),
        ca_pin: PIN.to_uppercase(),
        policy_configmap: "shop-policy".into(),
        check_config,
    };
    assert_eq!(inject_object(&mut p, &o, None).unwrap(), Outcome::Injected);
    let inits = p["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    assert_eq!(inits[1]["name"], "migrate", "the sidecar goes first");
    assert_eq!(inits[0]["image"], "registry.local/mayfly-sidecar:dev");
    let cfg = sidecar_config(&inits[0]);
    assert_eq!(
        cfg.spiffe_id.to_string(),
        "spiffe://prod.example/ns/ns/sa/sa"
    );
    assert_eq!(cfg.control_plane.address, "ca.example:443");
    assert_eq!(cfg.control_plane.ca_pin.as_deref(), Some(PIN));
    let [inbound] = cfg.inbound.as_slice() else {
        panic!("one inbound listener: {:?}", cfg.inbound)
    };
    assert_eq!(inbound.app.to_string(), "127.0.0.1:9090");
    assert_eq!(inbound.protocol, mayfly_sidecar::config::Protocol::Http);
    assert_eq!(p["spec"]["volumes"][1]["configMap"]["name"], "shop-policy");
    // Without an annotation every TCP containerPort is meshed (here the one).
    let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 53, "protocol": "UDP"}, {"containerPort": 80}]}]}});
    inject_object(&mut p, &opts(), None).unwrap();
    let cfg = sidecar_config(&p["spec"]["initContainers"][0]);
    assert_eq!(cfg.inbound[0].app.to_string(), "127.0.0.1:80");
}

#[test]
fn pods_that_cannot_be_injected_say_why() {
    let base = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
        "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]}});
    type Change<'a> = &'a dyn Fn(&mut Value);
    let cases: [(Change, &str); 9] = [
        (
            &|p| p["spec"]["containers"][0]["ports"] = json!([]),
            "nothing to proxy",
        ),
        (
            &|p| p["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(15443),
            "port 15443",
        ),
        (
            &|p| p["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(15000),
            "port 15000",
        ),
        (&|p| p["spec"]["hostNetwork"] = json!(true), "hostNetwork"),
        (
            &|p| p["metadata"]["annotations"] = json!({"mayfly.io/app-port": "http"}),
            "not a port",
        ),
        (
            &|p| p["metadata"]["annotations"] = json!({"mayfly.io/outbound": "db 15002 db:15443"}),
            "line 1",
        ),
        (
            &|p| {
                p["metadata"]["annotations"] =
                    json!({"mayfly.io/outbound": "db 15002 db:15443 spiffe://Bad.example/x"})
            },
            "lowercase",
        ),
        (
            &|p| p["spec"]["volumes"] = json!([{"name": "mayfly-token", "emptyDir": {}}]),
            "mayfly-token",
        ),
        (
            &|p| p["spec"]["serviceAccountName"] = json!("a/b"),
            "service account",
        ),
    ];
    for (change, want) in cases {
        let mut p = base.clone();
        change(&mut p);
        let e = inject_object(&mut p, &opts(), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Pod/n/p: "), "{e}");
        assert!(e.contains(want), "{want}: {e}");
    }
    // Bad options are refused before any object is read.
    for bad in [
        InjectOptions::new("abc", check_config),
        InjectOptions {
            trust_domain: "Mayfly.local".into(),
            ..opts()
        },
        InjectOptions {
            control_plane: "nohost".into(),
            ..opts()
        },
        InjectOptions {
            policy_configmap: "Bad_Name".into(),
            ..opts()
        },
        InjectOptions {
            image: "".into(),
            ..opts()
        },
    ] {
        assert!(matches!(
            inject_yaml("", &bad),
            Err(InjectError::Options(_))
        ));
    }
}

#[test]
fn yaml_is_read_as_kubernetes_reads_it_and_written_back_unambiguously() {
    let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  template:\n    metadata:\n      annotations:\n    spec:\n      containers:\n      - name: a\n        ports: [{containerPort: 80}]\n        env:\n        - {name: A, value: \"yes\"}\n        - {name: B, value: \"0644\"}\n        - {name: C, value: \"8080\"}\n      volumes:\n      - name: v\n        configMap: {name: c, defaultMode: 0644}\n";
    let out = inject_yaml(text, &opts()).unwrap();
    let d = &docs(&out)[0];
    let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(env[0]["value"], "yes");
    assert_eq!(env[1]["value"], "0644");
    assert_eq!(env[2]["value"], "8080");
    // YAML 1.1 octal, as the API machinery reads it: 0644 == 420.
    assert_eq!(
        d["spec"]["template"]["spec"]["volumes"][0]["configMap"]["defaultMode"],
        420
    );
    // `annotations:` with no value became a map.
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"][ANNOTATION_INJECTED],
        "true"
    );
    // Errors name the document.
    let e = inject_yaml("a: 1\n---\nb: [\n", &opts()).unwrap_err();
    assert!(matches!(e, InjectError::Yaml { doc: 2, .. }), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hostile_yaml_never_panics(s in "\\PC{0,400}") {
        let _ = inject_yaml(&s, &opts());
    }

    #[test]
    fn mangled_workloads_never_panic(cut in 0usize..2000, insert in "[-:\\[\\]{}&*!|>'\" \n#%@`a-z0-9]{0,12}") {
        let text = example("orders");
        let at = text.char_indices().map(|(i, _)| i).find(|i| *i >= cut % text.len()).unwrap_or(0);
        let mangled = format!("{}{}{}", &text[..at], insert, &text[at..]);
        if let Ok(out) = inject_yaml(&mangled, &opts()) {
            // Whatever was accepted injects to a fixed point.
            prop_assert_eq!(inject_yaml(&out, &opts()).unwrap(), out);
        }
    }

    #[test]
    fn random_json_objects_never_panic(v in arb_json()) {
        let mut a = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": v.clone()});
        let _ = inject_object(&mut a, &opts(), None);
        let mut b = json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": v}});
        let _ = inject_object(&mut b, &opts(), None);
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z0-9]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("containers".to_owned()),
                    Just("ports".to_owned()),
                    Just("containerPort".to_owned()),
                    Just("volumes".to_owned()),
                    Just("initContainers".to_owned()),
                    Just("name".to_owned()),
                    Just("metadata".to_owned()),
                    Just("spec".to_owned()),
                    Just("annotations".to_owned()),
                    "[a-z]{1,4}".prop_map(|s| s),
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn listeners(p: &Value) -> Vec<(String, String)> {
    sidecar_config(&p["spec"]["initContainers"][0])
        .inbound
        .iter()
        .map(|i| (i.listen.to_string(), i.app.to_string()))
        .collect()
}

fn pair(listen: &str, app: &str) -> (String, String) {
    (listen.to_owned(), app.to_owned())
}

#[test]
fn every_declared_port_is_meshed_on_its_own_mtls_port() {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [
            {"name": "a", "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}, {"containerPort": 9090}]},
            {"name": "b", "ports": [{"containerPort": 8081}, {"containerPort": 8080}]}]}});
    inject_object(&mut p, &opts(), None).unwrap();
    assert_eq!(
        listeners(&p),
        [
            pair("0.0.0.0:15443", "127.0.0.1:8080"),
            pair("0.0.0.0:15444", "127.0.0.1:9090"),
            pair("0.0.0.0:15445", "127.0.0.1:8081"),
        ]
    );
    let ports: Vec<(String, u64)> = p["spec"]["initContainers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("mayfly-mtls".to_owned(), 15443),
            ("mayfly-mtls-1".to_owned(), 15444),
            ("mayfly-mtls-2".to_owned(), 15445),
            ("mayfly-admin".to_owned(), 15000),
        ]
    );
    // The annotation picks the ports and their order.
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"mayfly.io/app-ports": "9090, 8081 7000"}},
        "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 8080}]}]}});
    inject_object(&mut p, &opts(), None).unwrap();
    assert_eq!(
        listeners(&p),
        [
            pair("0.0.0.0:15443", "127.0.0.1:9090"),
            pair("0.0.0.0:15444", "127.0.0.1:8081"),
            pair("0.0.0.0:15445", "127.0.0.1:7000"),
        ]
    );
}

#[test]
fn app_ports_that_cannot_be_meshed_say_why() {
    let base = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
        "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}, {"containerPort": 81}]}]}});
    let many: Vec<Value> = (1..=17).map(|n| json!({"containerPort": n})).collect();
    type Change<'a> = &'a dyn Fn(&mut Value);
    let cases: [(Change, &str); 7] = [
        (
            &|p| p["metadata"]["annotations"] = json!({"mayfly.io/app-ports": "80, 80"}),
            "listed twice",
        ),
        (
            &|p| p["metadata"]["annotations"] = json!({"mayfly.io/app-ports": "80, http"}),
            "not a port",
        ),
        (
            &|p| p["metadata"]["annotations"] = json!({"mayfly.io/app-ports": " , "}),
            "not a port",
        ),
        (
            &|p| {
                p["metadata"]["annotations"] =
                    json!({"mayfly.io/app-ports": "80", "mayfly.io/app-port": "80"})
            },
            "not both",
        ),
        (
            &|p| p["metadata"]["annotations"] = json!({"mayfly.io/app-port": "80 81"}),
            "not a port",
        ),
        // Two app ports take 15443 and 15444: a container may not use either.
        (
            &|p| p["spec"]["containers"][0]["ports"][1]["containerPort"] = json!(15444),
            "port 15444",
        ),
        (
            &|p| p["spec"]["containers"][0]["ports"] = json!(many),
            "at most 16",
        ),
    ];
    for (change, want) in cases {
        let mut p = base.clone();
        change(&mut p);
        let e = inject_object(&mut p, &opts(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn a_generated_configuration_the_sidecar_would_refuse_refuses_the_pod_with_its_reason() {
    fn refuse(text: &str) -> Result<(), ConfigRejected> {
        assert!(text.contains("spiffe_id = \"spiffe://mayfly.local/ns/shop/sa/web\""));
        Err(ConfigRejected("`admin.listen`: no".into()))
    }
    let mut p = workload(example("web"));
    let before = p.clone();
    let e = inject_object(&mut p, &InjectOptions::new(PIN, refuse), None).unwrap_err();
    assert!(
        e.to_string()
            .ends_with(": the sidecar configuration would be refused: `admin.listen`: no"),
        "{e}"
    );
    assert!(matches!(
        e,
        InjectError::Object {
            reason: Reason::ConfigRefused(_),
            ..
        }
    ));
    assert_eq!(p, before, "a refused pod is left as it was");
}

fn workload_api_pod(annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "p", "namespace": "n", "annotations": annotations},
    "spec": {
        "securityContext": {"runAsUser": 1000},
        "containers": [
            {"name": "app", "ports": [{"containerPort": 80}],
             "env": [{"name": "A", "value": "b"}]},
            {"name": "helper", "securityContext": {"runAsUser": 2000}},
        ]}})
}

#[test]
fn the_workload_api_annotation_serves_the_socket_where_the_app_containers_read_it_to_their_uids() {
    let mut p = workload_api_pod(json!({"mayfly.io/workload-api": "true"}));
    assert_eq!(inject_object(&mut p, &opts(), None), Ok(Outcome::Injected));
    let spec = &p["spec"];
    let sidecar = &spec["initContainers"][0];
    // The configuration the sidecar will parse, with its own parser.
    let w = sidecar_config(sidecar).workload_api.unwrap();
    assert_eq!(w.socket, Path::new(WORKLOAD_API_SOCKET));
    assert_eq!(w.mode, 0o666);
    assert_eq!(
        w.allowed_uids,
        [1000, 2000],
        "the pod's uid, then helper's own"
    );
    assert!(w.allowed_gids.is_empty());
    let dir = w.socket.parent().unwrap().to_str().unwrap();
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mayfly-workload-api")
        .unwrap();
    assert_eq!(volume["emptyDir"], json!({}));
    let mounted_at = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "mayfly-workload-api")
            .cloned()
            .unwrap_or_else(|| panic!("{c}"))
    };
    assert_eq!(mounted_at(sidecar)["mountPath"], dir);
    assert_eq!(mounted_at(sidecar).get("readOnly"), None);
    for c in spec["containers"].as_array().unwrap() {
        assert_eq!(mounted_at(c)["mountPath"], dir, "{c}");
        assert_eq!(mounted_at(c)["readOnly"], true, "{c}");
        let env = c["env"].as_array().unwrap();
        let endpoint = env
            .iter()
            .find(|e| e["name"] == "SPIFFE_ENDPOINT_SOCKET")
            .unwrap();
        assert_eq!(endpoint["value"], format!("unix://{}", w.socket.display()));
    }
    assert_eq!(
        spec["containers"][0]["env"][0]["name"], "A",
        "the app's env is kept"
    );

    // Listed uids win; an endpoint the app sets itself is left alone.
    let mut p = workload_api_pod(json!({"mayfly.io/workload-api": "true",
        "mayfly.io/workload-api-uids": "3000, 3001 3000"}));
    p["spec"]["containers"][0]["env"] =
        json!([{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///elsewhere"}]);
    inject_object(&mut p, &opts(), None).unwrap();
    let w = sidecar_config(&p["spec"]["initContainers"][0])
        .workload_api
        .unwrap();
    assert_eq!(w.allowed_uids, [3000, 3001]);
    assert_eq!(
        p["spec"]["containers"][0]["env"],
        json!([{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///elsewhere"}])
    );

    // Off unless asked for.
    for ann in [json!({}), json!({"mayfly.io/workload-api": "false"})] {
        let mut p = workload_api_pod(ann);
        inject_object(&mut p, &opts(), None).unwrap();
        assert!(
            sidecar_config(&p["spec"]["initContainers"][0])
                .workload_api
                .is_none()
        );
        let text = p.to_string();
        assert!(!text.contains("mayfly-workload-api") && !text.contains("SPIFFE_ENDPOINT_SOCKET"));
    }
}

#[test]
fn a_workload_api_pod_whose_callers_cannot_be_known_is_refused_with_the_reason() {
    type Change<'a> = &'a dyn Fn(&mut Value);
    let cases: [(Change, &str); 6] = [
        (
            &|p| p["spec"]["securityContext"] = json!({}),
            "container app has no securityContext.runAsUser, nor has the pod",
        ),
        (
            &|p| p["metadata"]["annotations"]["mayfly.io/workload-api"] = json!("yes"),
            "must be \"true\" or \"false\"",
        ),
        (
            &|p| p["metadata"]["annotations"]["mayfly.io/workload-api-uids"] = json!("root"),
            "not a list of uids",
        ),
        (
            &|p| p["metadata"]["annotations"]["mayfly.io/workload-api-uids"] = json!(" , "),
            "not a list of uids",
        ),
        (
            &|p| {
                p["spec"]["containers"][1]["volumeMounts"] =
                    json!([{"name": "x", "mountPath": "/run/spiffe/"}])
            },
            "container helper already mounts a volume at /run/spiffe",
        ),
        (
            &|p| p["spec"]["volumes"] = json!([{"name": "mayfly-workload-api", "emptyDir": {}}]),
            "already has a volume named mayfly-workload-api",
        ),
    ];
    for (change, want) in cases {
        let mut p = workload_api_pod(json!({"mayfly.io/workload-api": "true"}));
        change(&mut p);
        let before = p.clone();
        let e = inject_object(&mut p, &opts(), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Pod/n/p: "), "{e}");
        assert!(e.contains(want), "{want}: {e}");
        assert_eq!(p, before, "a refused pod is left as it was");
    }
    // Without a uid anywhere, listing the uids is enough.
    let mut p = workload_api_pod(json!({"mayfly.io/workload-api": "true",
        "mayfly.io/workload-api-uids": 1000}));
    p["spec"]["securityContext"] = json!({});
    inject_object(&mut p, &opts(), None).unwrap();
}
