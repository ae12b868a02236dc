#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Offline validation of the chart and the plain manifests with real tools:
//! `helm lint --strict`, `helm template`, and `kubernetes-validate --strict` against the
//! Kubernetes version that kubernetes-validate ships as its default (1.37).
//!
//! The tools are installed by `scripts/test.d/30-helm.sh`, which exports `KVROUTE_HELM` and
//! `KVROUTE_KUBE_VALIDATE`; without them these tests fail and say so (run `scripts/test.sh`).
//! Each tool is also shown a deliberately broken input that it must reject, so a tool that
//! accepts everything (or is not really run) fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn chart() -> PathBuf {
    root().join("charts/kvroute")
}

fn tool(var: &str, cached: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    // The same place scripts/test.d/30-helm.sh installs to, for `cargo test` run by hand.
    let cache = std::env::var_os("KVROUTE_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("kvroute"))
        });
    let p = cache.map(|c| c.join(cached));
    match p {
        Some(p) if p.exists() => p,
        _ => panic!("{var} is not set and {cached} is not in the kvroute cache: run scripts/test.sh (its step 30-helm.sh installs it)"),
    }
}

fn helm() -> PathBuf {
    tool("KVROUTE_HELM", "helm/helm")
}

fn kube_validate() -> PathBuf {
    tool(
        "KVROUTE_KUBE_VALIDATE",
        "venv-kubernetes-validate/bin/kubernetes-validate",
    )
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn template(args: &[&str]) -> String {
    let out = run(Command::new(helm())
        .args(["template", "kvroute"])
        .arg(chart())
        .args(["--namespace", "kvroute"])
        .args(args));
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs kubernetes-validate --strict on `yaml` (written to a temp file); returns (ok, output).
fn validate(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("manifests.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = run(Command::new(kube_validate()).arg("--strict").arg(&f));
    (out.status.success(), text(&out))
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn kind_of(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

/// The Deployment called `name` in a render.
fn deployment(yaml: &str, name: &str) -> Value {
    docs(yaml)
        .into_iter()
        .find(|d| kind_of(d) == "Deployment" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Deployment {name}"))
}

/// The args of a Deployment's first container.
fn container_args(d: &Value) -> Vec<String> {
    d["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn helm_lint_passes_and_catches_a_broken_chart() {
    let out = run(Command::new(helm()).args(["lint", "--strict"]).arg(chart()));
    assert!(out.status.success(), "helm lint: {}", text(&out));

    // A copy of the chart with an unclosed action must fail lint.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("kvroute");
    copy_dir(&chart(), &copy);
    let gw = copy.join("templates/gateway.yaml");
    let broken = std::fs::read_to_string(&gw).unwrap().replacen(
        "{{ .Values.gateway.port }}",
        "{{ .Values.gateway.port ",
        1,
    );
    std::fs::write(&gw, broken).unwrap();
    let out = run(Command::new(helm()).args(["lint", "--strict"]).arg(&copy));
    assert!(
        !out.status.success(),
        "helm lint accepted a broken template: {}",
        text(&out)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn rendered_chart_validates_strictly_in_every_configuration() {
    let variants: [&[&str]; 8] = [
        &[],
        &[
            "--set",
            "ingress.enabled=true",
            "--set",
            "gateway.service.type=LoadBalancer",
        ],
        &["--set", "operator.watchNamespace=models"],
        &["--set", "gateway.apiKeys.secretName=kvroute-keys"],
        &[
            "--set",
            "gateway.enabled=false",
            "--set",
            "operator.leaderElection=false",
        ],
        &[
            "--set",
            "gateway.service.type=NodePort",
            "--set",
            "operator.replicas=1",
        ],
        &[
            "--set",
            "gateway.adminPort=9090",
            "--set",
            "gateway.isolateTenantCaches=true",
        ],
        &[
            "--set",
            "operator.allowedImagePrefixes={registry.example/kvroute/,mirror.example/}",
            "--set",
            "operator.allowedHostPaths={/models}",
            "--set",
            "agentToken.secretName=kvroute-agent-token",
            "--set",
            "gateway.apiKeys.secretName=kvroute-keys",
        ],
    ];
    for args in variants {
        let yaml = template(args);
        let (ok, out) = validate(&yaml);
        assert!(
            ok,
            "kubernetes-validate --strict rejected helm template {args:?}:\n{out}"
        );
        assert!(
            out.contains("passed for resource deployment/kvroute-operator"),
            "{out}"
        );
    }
    // The admin address and tenant cache isolation reach the gateway's flags and ports.
    let gateway_of = |args: &[&str]| {
        docs(&template(args))
            .into_iter()
            .find(|d| kind_of(d) == "Deployment" && d["metadata"]["name"] == "kvroute-gateway")
            .unwrap()
    };
    let g = gateway_of(&[
        "--set",
        "gateway.adminPort=9090",
        "--set",
        "gateway.isolateTenantCaches=true",
    ]);
    let c = &g["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args.contains(&"--admin-listen=0.0.0.0:9090"), "{args:?}");
    assert!(args.contains(&"--isolate-tenant-caches"), "{args:?}");
    assert!(c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "admin" && p["containerPort"] == 9090));
    let plain = gateway_of(&[]);
    let plain_args = format!(
        "{:?}",
        plain["spec"]["template"]["spec"]["containers"][0]["args"]
    );
    assert!(
        !plain_args.contains("admin-listen") && !plain_args.contains("isolate"),
        "{plain_args}"
    );
    let ingress = template(&["--set", "ingress.enabled=true"]);
    assert!(docs(&ingress).iter().any(|d| kind_of(d) == "Ingress"));
    assert!(
        !docs(&template(&[])).iter().any(|d| kind_of(d) == "Ingress"),
        "ingress is off by default"
    );
    let ns = docs(&template(&["--set", "operator.watchNamespace=models"]));
    assert!(ns
        .iter()
        .any(|d| kind_of(d) == "Role" && d["metadata"]["namespace"] == "models"));
    assert!(
        !ns.iter().any(|d| kind_of(d) == "ClusterRole"),
        "namespaced install needs no ClusterRole"
    );
}

#[test]
fn kubernetes_validate_rejects_a_broken_manifest() {
    let broken = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replica: 2\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: c, image: i}]\n";
    let (ok, out) = validate(broken);
    assert!(!ok, "kubernetes-validate accepted an unknown field: {out}");
    assert!(out.contains("replica"), "{out}");
}

#[test]
fn crd_validates_and_a_broken_crd_does_not() {
    let crd = std::fs::read_to_string(root().join("deploy/crd.yaml")).unwrap();
    let (ok, out) = validate(&crd);
    assert!(
        ok && out.contains("customresourcedefinition/modeldeployments.kvroute.dev"),
        "{out}"
    );
    let broken = crd.replacen(
        "  scope: Namespaced\n",
        "  scope: Namespaced\n  scopes: Namespaced\n",
        1,
    );
    assert_ne!(broken, crd);
    let (ok, out) = validate(&broken);
    assert!(!ok, "a CRD with an unknown field passed: {out}");
}

#[test]
fn every_container_is_locked_down() {
    for d in docs(&template(&[])) {
        if !matches!(kind_of(&d), "Deployment" | "DaemonSet") {
            continue;
        }
        let pod = &d["spec"]["template"]["spec"];
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"],
            Value::Bool(true),
            "{name}"
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for c in pod["containers"].as_sequence().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], Value::Bool(true), "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true), "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false), "{name}");
            assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{name}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
            assert!(
                c["resources"]["requests"].is_mapping(),
                "{name} has resource requests"
            );
        }
    }
}

/// (apiGroup, resource) → verbs granted by the rendered RBAC to one component.
fn grants(
    yaml: &str,
    component: &str,
) -> std::collections::BTreeMap<(String, String), Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    for d in docs(yaml) {
        if !matches!(kind_of(&d), "Role" | "ClusterRole")
            || d["metadata"]["labels"]["app.kubernetes.io/component"] != component
        {
            continue;
        }
        for rule in d["rules"].as_sequence().unwrap() {
            for g in rule["apiGroups"].as_sequence().unwrap() {
                for r in rule["resources"].as_sequence().unwrap() {
                    let verbs: Vec<String> = rule["verbs"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string())
                        .collect();
                    out.insert(
                        (
                            g.as_str().unwrap().to_string(),
                            r.as_str().unwrap().to_string(),
                        ),
                        verbs,
                    );
                }
            }
        }
    }
    out
}

#[test]
fn the_operators_allow_lists_become_its_flags() {
    let yaml = template(&[
        "--set",
        "operator.allowedImagePrefixes={registry.example/kvroute/,mirror.example/}",
        "--set",
        "operator.allowedHostPaths={/models}",
    ]);
    let args = container_args(&deployment(&yaml, "kvroute-operator"));
    for want in [
        "--allowed-image-prefix=registry.example/kvroute/",
        "--allowed-image-prefix=mirror.example/",
        "--allowed-host-path=/models",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
    }
    // None by default (any image, any path, as before).
    assert!(!template(&[]).contains("--allowed-"));
}

#[test]
fn rbac_is_least_privilege() {
    let yaml = template(&[]);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let k = |g: &str, r: &str| (g.to_string(), r.to_string());
    let operator = grants(&yaml, "operator");
    let expected = std::collections::BTreeMap::from([
        (
            k("kvroute.dev", "modeldeployments"),
            s(&["get", "list", "watch"]),
        ),
        (k("kvroute.dev", "modeldeployments/status"), s(&["patch"])),
        (k("kvroute.dev", "modeldeployments/scale"), s(&["patch"])),
        (
            k("apps", "deployments"),
            s(&["get", "list", "watch", "create", "patch", "delete"]),
        ),
        (
            k("apps", "daemonsets"),
            s(&["get", "list", "watch", "create", "patch", "delete"]),
        ),
        (
            k("", "services"),
            s(&["get", "list", "watch", "create", "patch"]),
        ),
        (k("", "pods"), s(&["list"])),
        (k("policy", "poddisruptionbudgets"), s(&["create", "patch"])),
        (k("events.k8s.io", "events"), s(&["create", "patch"])),
        (
            k("coordination.k8s.io", "leases"),
            s(&["get", "create", "update"]),
        ),
    ]);
    assert_eq!(operator, expected);
    let gateway = grants(&yaml, "gateway");
    let expected = std::collections::BTreeMap::from([
        (k("kvroute.dev", "modeldeployments"), s(&["list", "watch"])),
        (
            k("discovery.k8s.io", "endpointslices"),
            s(&["list", "watch"]),
        ),
    ]);
    assert_eq!(gateway, expected);
    assert!(!yaml.contains("\"*\""), "no wildcard grants");
}

const PLAIN_HEADER: &str = "# Generated by `helm template kvroute charts/kvroute --namespace kvroute`; do not edit by hand.\n";

#[test]
fn plain_manifests_equal_the_rendered_chart() {
    let committed = std::fs::read_to_string(root().join("deploy/kvroute.yaml")).unwrap();
    let rendered = format!("{PLAIN_HEADER}{}", template(&[]));
    assert!(
        committed == rendered,
        "deploy/kvroute.yaml drifted from the chart; regenerate it with scripts/render-manifests.sh"
    );
}

#[test]
fn notes_show_a_sample_and_how_to_call_the_gateway() {
    let out = run(Command::new(helm())
        .args([
            "install",
            "kvroute",
            "--dry-run=client",
            "--namespace",
            "kvroute",
        ])
        .arg(chart()));
    assert!(out.status.success(), "{}", text(&out));
    let notes = text(&out);
    assert!(notes.contains("kind: ModelDeployment"), "{notes}");
    assert!(
        notes.contains("kubectl -n kvroute port-forward svc/kvroute-gateway"),
        "{notes}"
    );
    assert!(notes.contains("/v1/chat/completions"), "{notes}");
}

fn hadolint() -> PathBuf {
    tool("KVROUTE_HADOLINT", "venv-kubernetes-validate/bin/hadolint")
}

#[test]
fn dockerfiles_pass_hadolint_and_a_bad_one_does_not() {
    for f in ["deploy/Dockerfile.kvroute", "deploy/Dockerfile.agent"] {
        let out = run(Command::new(hadolint())
            .arg("--no-color")
            .arg(root().join(f)));
        assert!(out.status.success(), "hadolint {f}: {}", text(&out));
    }
    let agent = std::fs::read_to_string(root().join("deploy/Dockerfile.agent")).unwrap();
    assert!(
        agent.contains("--features cuda"),
        "the agent image builds the CUDA backend"
    );
    let kvroute = std::fs::read_to_string(root().join("deploy/Dockerfile.kvroute")).unwrap();
    assert!(
        kvroute.contains("USER 65532:65532") && agent.contains("USER 65532:65532"),
        "images run as non-root"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(
        &bad,
        "FROM debian:latest\nRUN cd /tmp && apt-get install curl\n",
    )
    .unwrap();
    let out = run(Command::new(hadolint()).arg("--no-color").arg(&bad));
    assert!(
        !out.status.success(),
        "hadolint accepted a bad Dockerfile: {}",
        text(&out)
    );
}

#[test]
fn objects_the_operator_creates_validate_strictly() {
    use kvroute_crd::ModelDeployment;
    use kvroute_operator::controller::desired::{desired, AgentDefaults, Workload};
    let mut yaml = String::new();
    let mut kinds = Vec::new();
    let samples = std::fs::read_dir(root().join("deploy/samples")).unwrap();
    for f in samples {
        let f = f.unwrap().path();
        let mut md: ModelDeployment =
            serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        md.metadata.uid = Some("0b6d3f0e-1111-4222-8333-444455556666".into());
        // With the agent token, so that its Secret volume is checked too.
        let defaults = AgentDefaults {
            agent_token: Some(("kvroute-agent-token".into(), "token".into())),
            ..AgentDefaults::default()
        };
        let d = desired(&md, &defaults).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        match &d.workload {
            Workload::Deployment(w) => {
                kinds.push("Deployment");
                yaml.push_str(&serde_yaml::to_string(w.as_ref()).unwrap());
            }
            Workload::DaemonSet(w) => {
                kinds.push("DaemonSet");
                yaml.push_str(&serde_yaml::to_string(w.as_ref()).unwrap());
            }
        }
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(&d.service).unwrap());
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(&d.disruption_budget).unwrap());
        yaml.push_str("---\n");
    }
    assert!(
        kinds.contains(&"Deployment") && kinds.contains(&"DaemonSet"),
        "samples cover both workload kinds"
    );
    let (ok, out) = validate(&yaml);
    assert!(
        ok,
        "kubernetes-validate --strict rejected the operator's objects:\n{out}\n{yaml}"
    );
    assert!(
        out.contains("passed for resource daemonset/per-node-agent"),
        "{out}"
    );
    assert!(
        out.contains("passed for resource service/smollm2-agents"),
        "{out}"
    );
    assert!(
        out.contains("passed for resource poddisruptionbudget/smollm2-agent"),
        "{out}"
    );
}

#[test]
fn the_agent_token_secret_reaches_the_gateways_and_the_operator() {
    let yaml = template(&["--set", "agentToken.secretName=kvroute-agent-token"]);
    let gw = deployment(&yaml, "kvroute-gateway");
    assert!(container_args(&gw)
        .contains(&"--agent-token-file=/etc/kvroute/agent-token/token".to_string()));
    let pod = &gw["spec"]["template"]["spec"];
    let vol = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "agent-token")
        .unwrap();
    assert_eq!(vol["secret"]["secretName"], "kvroute-agent-token");
    assert_eq!(vol["secret"]["items"][0]["path"], "token");
    assert!(pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "agent-token" && m["mountPath"] == "/etc/kvroute/agent-token"));
    let op = container_args(&deployment(&yaml, "kvroute-operator"));
    assert!(op.contains(&"--agent-token-secret=kvroute-agent-token".to_string()));
    assert!(op.contains(&"--agent-token-key=token".to_string()));
    // Off by default.
    assert!(!template(&[]).contains("agent-token"));
}

/// The environment variables a binary's subcommand reads, from its own `--help` (clap prints
/// `[env: NAME=...]` for every flag that has one): derived from the code, not listed by hand.
fn env_vars_read(bin: &Path, subcommand: &str) -> std::collections::BTreeSet<String> {
    let out = run(Command::new(bin).args([subcommand, "--help"]));
    assert!(
        out.status.success(),
        "{} {subcommand} --help",
        bin.display()
    );
    let re = regex::Regex::new(r"\[env: ([A-Z0-9_]+)=").unwrap();
    let help = text(&out);
    let mut vars: std::collections::BTreeSet<String> =
        re.captures_iter(&help).map(|c| c[1].to_string()).collect();
    // Read by the logging set-up of every binary, not by a flag.
    vars.insert("RUST_LOG".into());
    assert!(vars.len() > 1, "no env vars found in --help:\n{help}");
    vars
}

/// `kvroute-agent`, built next to this test's binary (scripts/test.sh builds every binary
/// before the tests).
fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("kvroute-agent");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// Every env var a template or the operator sets on a kvroute container is one its binary
/// reads (a misspelt or wrong-binary variable is silently ignored otherwise: that is how the
/// gateway once got `KVROUTE_WATCH_NAMESPACE`, read only by the operator, and watched every
/// namespace), and a namespaced install tells the gateway its namespace.
#[test]
fn every_env_var_set_is_one_the_binary_reads() {
    use kvroute_crd::ModelDeployment;
    use kvroute_operator::controller::desired::{desired, AgentDefaults, Workload};
    let kvroute = PathBuf::from(env!("CARGO_BIN_EXE_kvroute"));
    let reads = |sub: &str| env_vars_read(&kvroute, sub);
    let (gateway, operator) = (reads("gateway"), reads("operator"));
    for args in [&[][..], &["--set", "operator.watchNamespace=models"][..]] {
        for d in docs(&template(args)) {
            if kind_of(&d) != "Deployment" {
                continue;
            }
            for c in d["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .unwrap()
            {
                let sub = c["args"][0].as_str().unwrap();
                let known = match sub {
                    "gateway" => &gateway,
                    "operator" => &operator,
                    other => panic!("unexpected subcommand {other}"),
                };
                for e in c["env"].as_sequence().into_iter().flatten() {
                    let name = e["name"].as_str().unwrap();
                    assert!(
                        known.contains(name),
                        "{args:?}: the {sub} container sets {name}, which `kvroute {sub}` does not read (it reads {known:?})"
                    );
                }
            }
        }
    }
    let ns = docs(&template(&["--set", "operator.watchNamespace=models"]));
    let gw = ns
        .iter()
        .find(|d| kind_of(d) == "Deployment" && d["metadata"]["name"] == "kvroute-gateway")
        .unwrap();
    let env = &gw["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "KVROUTE_NAMESPACE" && e["value"] == "models"),
        "a namespaced install scopes the gateway's discovery: {env:?}"
    );
    // Agent pods, as the operator creates them.
    let agent = env_vars_read(&agent_bin(), "serve");
    for f in std::fs::read_dir(root().join("deploy/samples")).unwrap() {
        let f = f.unwrap().path();
        let mut md: ModelDeployment =
            serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        md.metadata.uid = Some("0b6d3f0e-1111-4222-8333-444455556666".into());
        let d = desired(&md, &AgentDefaults::default()).unwrap();
        let spec = match &d.workload {
            Workload::Deployment(w) => w.spec.template.spec.clone(),
            Workload::DaemonSet(w) => w.spec.template.spec.clone(),
        }
        .unwrap();
        for c in &spec.containers {
            for e in c.env.iter().flatten() {
                // HOSTNAME is the pod name the agent falls back to for its id.
                assert!(
                    agent.contains(&e.name) || e.name == "HOSTNAME",
                    "{}: the operator sets {} on the agent, which `kvroute-agent serve` does not read",
                    f.display(),
                    e.name
                );
            }
        }
    }
}

#[test]
fn gateways_are_spread_budgeted_drained_and_agents_fenced() {
    let all = docs(&template(&[]));
    fn find<'a>(all: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        all.iter().filter(move |d| kind_of(d) == kind)
    }
    let gw = find(&all, "Deployment")
        .find(|d| d["metadata"]["name"] == "kvroute-gateway")
        .unwrap();
    assert_eq!(gw["spec"]["replicas"], 2);
    let pod = &gw["spec"]["template"]["spec"];
    assert!(!pod["affinity"]["podAntiAffinity"].is_null(), "{pod:?}");
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.contains(&"--drain-timeout=30s"), "{args:?}");
    assert_eq!(pod["terminationGracePeriodSeconds"], 45);
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/ready"
    );
    let pdb = find(&all, "PodDisruptionBudget")
        .next()
        .expect("a PDB for gateways");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let np = find(&all, "NetworkPolicy")
        .next()
        .expect("a NetworkPolicy for agents");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "agent"
    );
    // Keys: off (said in the notes) unless a Secret is named, then mounted whole.
    assert!(args.contains(&"--auth=off"), "{args:?}");
    let keyed = docs(&template(&[
        "--set",
        "gateway.apiKeys.secretName=kvroute-keys",
    ]));
    let kgw = keyed
        .iter()
        .find(|d| kind_of(d) == "Deployment" && d["metadata"]["name"] == "kvroute-gateway")
        .unwrap();
    let kpod = &kgw["spec"]["template"]["spec"];
    let kargs: Vec<&str> = kpod["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        kargs.contains(&"--api-keys=/etc/kvroute/api-keys/keys.yaml")
            && !kargs.contains(&"--auth=off"),
        "{kargs:?}"
    );
    assert_eq!(kpod["volumes"][0]["secret"]["secretName"], "kvroute-keys");
    assert!(kpod["containers"][0]["volumeMounts"][0]["subPath"].is_null());

    // One replica: no budget (it would block every drain of its node).
    let one = docs(&template(&["--set", "gateway.replicas=1"]));
    assert!(!one.iter().any(|d| kind_of(d) == "PodDisruptionBudget"));
    let off = docs(&template(&["--set", "networkPolicy.enabled=false"]));
    assert!(!off.iter().any(|d| kind_of(d) == "NetworkPolicy"));
    // Namespaced: the fence stands where the agents are.
    let ns = docs(&template(&["--set", "operator.watchNamespace=models"]));
    let np = ns.iter().find(|d| kind_of(d) == "NetworkPolicy").unwrap();
    assert_eq!(np["metadata"]["namespace"], "models");
}

fn pod_monitors(yaml: &str) -> std::collections::BTreeMap<String, Value> {
    docs(yaml)
        .into_iter()
        .filter(|d| kind_of(d) == "PodMonitor")
        .map(|d| (d["metadata"]["name"].as_str().unwrap().to_string(), d))
        .collect()
}

#[test]
fn pod_monitors_are_off_by_default_and_each_selects_its_part_on_its_metrics_port() {
    assert!(pod_monitors(&template(&[])).is_empty());
    let on = template(&[
        "--set",
        "monitoring.podMonitors.enabled=true",
        "--set",
        "monitoring.podMonitors.labels.release=prometheus",
    ]);
    let m = pod_monitors(&on);
    let names: Vec<&str> = m.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["kvroute-agents", "kvroute-gateway", "kvroute-operator"]
    );
    let port = |name: &str| m[name]["spec"]["podMetricsEndpoints"][0]["port"].clone();
    let selects = |name: &str, key: &str| {
        m[name]["spec"]["selector"]["matchLabels"][key]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(port("kvroute-gateway"), Value::from("http"));
    assert_eq!(port("kvroute-operator"), Value::from("metrics"));
    assert_eq!(port("kvroute-agents"), Value::from("http"));
    for (name, component) in [
        ("kvroute-gateway", "gateway"),
        ("kvroute-operator", "operator"),
        ("kvroute-agents", "agent"),
    ] {
        assert_eq!(selects(name, "app.kubernetes.io/component"), component);
        assert_eq!(m[name]["metadata"]["labels"]["release"], "prometheus");
        assert_eq!(
            m[name]["spec"]["podMetricsEndpoints"][0]["path"],
            "/metrics"
        );
    }
    // The agents' labels are the operator's (crd/src/names.rs), in any namespace it watches.
    assert_eq!(
        selects("kvroute-agents", "app.kubernetes.io/part-of"),
        kvroute_crd::names::PART_OF
    );
    assert_eq!(
        selects("kvroute-agents", "app.kubernetes.io/component"),
        kvroute_crd::names::COMPONENT_AGENT
    );
    assert_eq!(
        m["kvroute-agents"]["spec"]["namespaceSelector"]["any"],
        true
    );
    // Metrics on the admin port when the gateway has one; agents only where the operator looks.
    let scoped = template(&[
        "--set",
        "monitoring.podMonitors.enabled=true",
        "--set",
        "gateway.adminPort=9100",
        "--set",
        "operator.watchNamespace=models",
    ]);
    let m = pod_monitors(&scoped);
    assert_eq!(
        m["kvroute-gateway"]["spec"]["podMetricsEndpoints"][0]["port"],
        "admin"
    );
    assert_eq!(
        m["kvroute-agents"]["spec"]["namespaceSelector"]["matchNames"][0],
        "models"
    );
    // Everything else in that render is still valid Kubernetes (kubernetes-validate knows no
    // Prometheus Operator schema).
    let rest: Vec<Value> = docs(&scoped)
        .into_iter()
        .filter(|d| kind_of(d) != "PodMonitor")
        .collect();
    let rest = rest
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    let (ok, out) = validate(&rest);
    assert!(ok, "{out}");
}

/// Metric names (histogram series reduced to their family) a Grafana dashboard queries that
/// neither the gateway nor the agent exposes.
fn unknown_metrics(dashboard: &serde_json::Value) -> Vec<String> {
    let exposed = ["gateway/src/metrics.rs", "node-agent/src/metrics.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(root().join(f)).unwrap())
        .collect::<String>();
    let re = regex::Regex::new(r"\b(kvroute_[a-z_]+|vllm:[a-z_:]+)").unwrap();
    let mut unknown = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for m in re.find_iter(expr) {
                let name = m.as_str();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                if !exposed.contains(&format!("\"{family}\"")) {
                    unknown.push(name.to_string());
                }
            }
        }
    }
    unknown
}

#[test]
fn the_grafana_dashboard_is_shipped_and_queries_only_metrics_kvroute_exposes() {
    assert!(!template(&[]).contains("kvroute.json"), "off by default");
    let yaml = template(&["--set", "monitoring.grafanaDashboard.enabled=true"]);
    let cm = docs(&yaml)
        .into_iter()
        .find(|d| kind_of(d) == "ConfigMap" && d["metadata"]["name"] == "kvroute-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let text = cm["data"]["kvroute.json"].as_str().unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(text).unwrap();
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/kvroute.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard, file, "the ConfigMap carries the file unchanged");
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["targets"][0]["expr"].as_str().unwrap())
        .collect();
    for wanted in [
        "kvroute_gateway_agent_free_blocks",
        "kvroute_gateway_queue_depth",
        "kvroute_time_to_first_token_seconds_bucket",
        "kvroute_time_per_output_token_seconds_bucket",
        "status=\"429\"",
        "kvroute_preemptions_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(wanted)),
            "no panel queries {wanted}"
        );
    }
    assert_eq!(unknown_metrics(&dashboard), Vec::<String>::new());
    // A panel on a metric nobody exposes is caught.
    let mut broken = dashboard.clone();
    broken["panels"][0]["targets"][0]["expr"] =
        "rate(kvroute_gateway_nonexistent_total[5m])".into();
    assert_eq!(
        unknown_metrics(&broken),
        ["kvroute_gateway_nonexistent_total"]
    );
}

#[test]
fn images_are_pulled_by_digest_when_one_is_given() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let yaml = template(&[
        "--set",
        &format!("image.digest={digest}"),
        "--set",
        &format!("agentImage.digest={digest}"),
        "--set",
        "image.tag=ignored",
    ]);
    let (ok, out) = validate(&yaml);
    assert!(ok, "{out}");
    let mut images = 0;
    for d in docs(&yaml) {
        if kind_of(&d) != "Deployment" {
            continue;
        }
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["image"].as_str().unwrap(),
            format!("kvroute@{digest}"),
            "{}",
            d["metadata"]["name"].as_str().unwrap()
        );
        images += 1;
        for a in c["args"].as_sequence().unwrap() {
            if let Some(agent) = a.as_str().unwrap().strip_prefix("--agent-image=") {
                assert_eq!(agent, format!("kvroute-agent@{digest}"));
            }
        }
    }
    assert_eq!(images, 2, "gateway and operator");
    // By tag otherwise.
    assert!(template(&[]).contains("image: \"kvroute:0.1.0\""));
}

#[test]
fn the_decision_log_value_is_passed_only_when_set() {
    let gateway_args =
        |args: &[&str]| container_args(&deployment(&template(args), "kvroute-gateway"));
    assert!(!gateway_args(&[])
        .iter()
        .any(|a| a.starts_with("--decision-log")));
    for n in ["0", "500"] {
        let args = gateway_args(&["--set", &format!("gateway.decisionLog={n}")]);
        assert!(
            args.contains(&format!("--decision-log={n}")),
            "{n}: {args:?}"
        );
    }
}
