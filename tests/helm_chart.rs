//! The Helm chart (`helm/azp-autoscaler`): lint, the CRD in sync with the code, every values file under
//! `helm/azp-autoscaler/ci/` rendered and validated (built-in kinds by `kubernetes-validate --strict`
//! against the pinned Kubernetes version, AgentPools and restricted Pod Security by server-side dry runs on
//! the real local API server, alerts by `promtool`), bad values files rejected with a clear message, the
//! chart's RBAC equal to what the e2e bed grants, and the chart installed on the real API server.
//!
//! Tools come from tests/setup.sh (helm, kubernetes-validate, promtool); a missing one fails the test with
//! the fix. The API server comes from tests/cluster/up.sh.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use azp_testbed::chart::{self, ChartError};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client};

/// The Kubernetes version rendered manifests are validated against (the local API server's minor).
const KUBE_VERSION: &str = "1.34.0";

fn ci_values() -> Vec<PathBuf> {
    let dir = chart::chart_dir().join("ci");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected several values files in {}",
        dir.display()
    );
    files
}

fn bad_values() -> Vec<(PathBuf, String)> {
    let dir = chart::repo_root().join("tests/helm/bad");
    let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            let expect = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# expect: "))
                .unwrap_or_else(|| {
                    panic!(
                        "{} must start with `# expect: <part of the error>`",
                        p.display()
                    )
                })
                .to_owned();
            (p, expect)
        })
        .collect();
    files.sort();
    files
}

fn unwrap<T>(r: Result<T, ChartError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn name_of(o: &serde_json::Value) -> String {
    format!(
        "{} {}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["namespace"].as_str().unwrap_or("-"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Kinds that are not built into Kubernetes: validated otherwise (dry run, promtool).
const CUSTOM_KINDS: [&str; 3] = ["AgentPool", "ServiceMonitor", "PrometheusRule"];

#[test]
fn chart_lints_strict_with_every_values_file() {
    let chart_dir = chart::chart_dir();
    // The defaults alone (no pools yet) are a valid chart too.
    let out = chart::run_helm(["lint".as_ref(), "--strict".as_ref(), chart_dir.as_os_str()]);
    let out = out.unwrap_or_else(|e| panic!("helm lint --strict with the defaults: {e}"));
    assert!(out.contains("0 chart(s) failed"), "{out}");
    for values in ci_values() {
        let out = chart::run_helm([
            "lint".as_ref(),
            "--strict".as_ref(),
            chart_dir.as_os_str(),
            "--values".as_ref(),
            values.as_os_str(),
        ]);
        let out =
            out.unwrap_or_else(|e| panic!("helm lint --strict with {}: {e}", values.display()));
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[test]
fn chart_crd_is_the_one_the_code_generates() {
    let binary = azp_testbed::bed::bin_dir().join("azp-autoscaler");
    let out = Command::new(&binary)
        .arg("crd")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} crd: {e} (run `cargo build --workspace --bins` first)",
                binary.display()
            )
        });
    assert!(out.status.success(), "azp-autoscaler crd failed: {out:?}");
    let generated = String::from_utf8(out.stdout).expect("utf-8");
    let shipped_path = chart::chart_dir().join("files/crd.yaml");
    let shipped = std::fs::read_to_string(&shipped_path).expect("read the chart's CRD");
    assert!(
        shipped == generated,
        "{} differs from `azp-autoscaler crd`: regenerate it with\n  target/debug/azp-autoscaler crd > helm/azp-autoscaler/files/crd.yaml",
        shipped_path.display()
    );

    // The chart renders that CRD unchanged, annotated to survive `helm uninstall`.
    let manifest = unwrap(chart::render(
        "azp",
        "azp-system",
        &[chart::chart_dir().join("ci/minimal-values.yaml").as_path()],
        None,
    ));
    let objects = unwrap(chart::objects(&manifest));
    let rendered = unwrap(chart::find(
        &objects,
        "CustomResourceDefinition",
        "agentpools.azp-autoscaler.dev",
    ));
    let code: serde_json::Value = serde_saphyr::from_str(&generated).expect("CRD YAML");
    if let Some(diff) = first_difference(&rendered["spec"], &code["spec"], "spec") {
        panic!("the rendered CRD differs from the code's at {diff}");
    }
    assert_eq!(
        rendered["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "the CRD must be kept on uninstall (deleting it deletes every AgentPool)"
    );

    // And a release that leaves the CRD to another one renders none.
    let manifest = unwrap(chart::render(
        "azp",
        "azp-system",
        &[chart::chart_dir()
            .join("ci/namespaced-values.yaml")
            .as_path()],
        None,
    ));
    let objects = unwrap(chart::objects(&manifest));
    assert!(chart::of_kind(&objects, "CustomResourceDefinition").is_empty());
}

/// Where two JSON documents first differ (numbers compared by value: YAML's `10000.0` is `10000`).
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            (x.as_f64() != y.as_f64()).then(|| format!("{path}: {x} != {y}"))
        }
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(l), Some(r)) => first_difference(l, r, &format!("{path}.{k}")),
                (l, r) => Some(format!(
                    "{path}.{k}: {} vs {}",
                    l.map_or("absent", |_| "present"),
                    r.map_or("absent", |_| "present")
                )),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (l, r))| first_difference(l, r, &format!("{path}[{i}]"))),
        _ => (a != b).then(|| format!("{path}: {a} != {b}")),
    }
}

#[test]
fn the_controller_binary_accepts_the_deployments_arguments() {
    // The flags the chart passes exist: the binary gets past argument parsing and stops only where it
    // needs a cluster (a usage error exits 2 and names the argument).
    let binary = azp_testbed::bed::bin_dir().join("azp-autoscaler");
    for values in ci_values() {
        let manifest = unwrap(chart::render(
            "azp",
            "azp-system",
            &[values.as_path()],
            None,
        ));
        let objects = unwrap(chart::objects(&manifest));
        let deployment = chart::of_kind(&objects, "Deployment")[0];
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let mut args: Vec<String> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg").to_owned())
            .collect();
        // Same flags, ports that are free here, the mounted Secret's files as local files.
        let secrets =
            std::env::temp_dir().join(format!("azp-hooks-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&secrets).expect("temp dir");
        let _cleanup = scopeguard(secrets.clone());
        for a in &mut args {
            if a.starts_with("--admin-addr=") {
                *a = "--admin-addr=127.0.0.1:0".to_owned();
            } else if a.starts_with("--hooks-addr=") {
                *a = "--hooks-addr=127.0.0.1:0".to_owned();
            } else if a == "--allow-list=/etc/azp-autoscaler/allow-list.yaml" {
                // The binary must parse the allow-list exactly as the chart renders it.
                let map = chart::of_kind(&objects, "ConfigMap")
                    .into_iter()
                    .find(|c| c["data"]["allow-list.yaml"].is_string())
                    .expect("the allow-list ConfigMap");
                let local = secrets.join("allow-list.yaml");
                std::fs::write(
                    &local,
                    map["data"]["allow-list.yaml"].as_str().unwrap_or_default(),
                )
                .expect("write");
                *a = format!("--allow-list={}", local.display());
            } else if let Some((flag, path)) = a.split_once("-file=/var/run/azp-hooks/") {
                let local = secrets.join(path);
                std::fs::write(&local, "s3cret-for-the-test").expect("write");
                *a = format!("{flag}-file={}", local.display());
            }
        }
        let out = Command::new(&binary)
            .args(&args)
            .env_clear()
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            // What the Deployment's downward API gives it.
            .env("POD_NAMESPACE", "azp-system")
            .env("POD_NAME", "azp-autoscaler-0")
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (run `cargo build --workspace --bins` first)",
                    binary.display()
                )
            });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() != Some(2) && stderr.contains("cannot reach the Kubernetes API"),
            "{}: `azp-autoscaler {}` does not accept the chart's arguments: {}\n{stderr}",
            values.display(),
            args.join(" "),
            out.status
        );
    }
}

#[test]
fn bad_values_fail_with_a_clear_message() {
    let bad = bad_values();
    assert!(bad.len() >= 10, "expected the bad values files");
    let mut failures = Vec::new();
    for (file, expect) in &bad {
        match chart::render("azp", "azp-system", &[file.as_path()], None) {
            Ok(_) => failures.push(format!("{}: rendered, expected an error", file.display())),
            Err(ChartError::Helm { stderr, .. }) => {
                if !stderr.contains(expect.as_str()) {
                    failures.push(format!(
                        "{}: the error does not say {expect:?}:\n{stderr}",
                        file.display()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", file.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn rule_set(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for r in rules {
        assert!(
            r.resource_names.is_none() && r.non_resource_urls.is_none(),
            "unexpected rule shape {r:?}"
        );
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    set.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    set
}

#[test]
fn chart_rbac_is_exactly_what_the_controller_runs_with_in_the_bed() {
    let bed = rule_set(&azp_testbed::bed::controller_role_rules());
    let role = rule_set(&unwrap(chart::controller_role_rules()));
    let cluster_role = rule_set(&unwrap(chart::controller_rules(None)));
    assert_eq!(
        role, bed,
        "the chart's namespaced Role and the bed's controller rules differ"
    );
    assert_eq!(
        cluster_role, bed,
        "the chart's ClusterRole and the bed's controller rules differ"
    );
    // Least privilege: nothing cluster-wide beyond that, and no wildcard anywhere.
    assert!(
        role.iter()
            .all(|(g, r, v)| g != "*" && r != "*" && v != "*"),
        "{role:?}"
    );

    // The only other grant: `get` on the kube-system namespace, and only without a configured cluster id.
    let with_id = unwrap(chart::render_values(
        "azp",
        "azp-system",
        &chart::rbac_values(None),
    ));
    let objects = unwrap(chart::objects(&with_id));
    let roles: Vec<String> = objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .map(name_of)
        .collect();
    assert_eq!(
        roles,
        vec!["ClusterRole -/azp-azp-autoscaler-azp-system-controller"],
        "clusterId set: the controller rules only"
    );
    let without_id = unwrap(chart::render_values(
        "azp",
        "azp-system",
        "controller:\n  workloadIdentity:\n    clientId: 00000000-0000-0000-0000-000000000001\n",
    ));
    let objects = unwrap(chart::objects(&without_id));
    let cluster_id = unwrap(chart::find(
        &objects,
        "ClusterRole",
        "azp-azp-autoscaler-azp-system-cluster-id",
    ));
    assert_eq!(
        cluster_id["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["namespaces"], "resourceNames": ["kube-system"], "verbs": ["get"]}])
    );
}

/// Validates built-in kinds with kubernetes-validate (strict: unknown fields fail).
fn kubernetes_validate(objects: &[&serde_json::Value], what: &str) {
    let dir = std::env::temp_dir().join(format!("azp-kv-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut files = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        let path = dir.join(format!("{i:02}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(o).expect("json")).expect("write");
        files.push(path);
    }
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "--kubernetes-version", KUBE_VERSION])
        .args(&files)
        .output();
    let _cleanup = scopeguard(dir);
    let out = out.unwrap_or_else(|e| {
        panic!("cannot run kubernetes-validate: {e} (run tests/setup.sh, which pip-installs it)")
    });
    assert!(
        out.status.success(),
        "kubernetes-validate --strict rejects the objects of {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct RemoveDir(PathBuf);
impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn scopeguard(dir: PathBuf) -> RemoveDir {
    RemoveDir(dir)
}

/// Checks the PrometheusRule's groups with promtool (PromQL parses, templates expand, durations valid).
fn promtool_check_rules(rule: &serde_json::Value, what: &str) {
    let dir = std::env::temp_dir().join(format!("azp-rules-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let _cleanup = scopeguard(dir.clone());
    let path = dir.join("rules.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({"groups": rule["spec"]["groups"]})).expect("json"),
    )
    .expect("write");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool: {e} (run tests/setup.sh, which installs Debian's prometheus)"
            )
        });
    assert!(
        out.status.success(),
        "promtool rejects the PrometheusRule of {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn client() -> Client {
    azp_testbed::install_crypto_provider();
    azp_testbed::node::try_client()
        .await
        .unwrap_or_else(|e| panic!("{e} (is the local control plane up? run tests/cluster/up.sh)"))
}

/// A fresh namespace on the API server, deleted on drop (best effort). `restricted` enforces the
/// restricted Pod Security Standard in it.
struct TestNamespace {
    client: Client,
    name: String,
}

impl TestNamespace {
    async fn create(client: &Client, prefix: &str, restricted: bool) -> TestNamespace {
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let mut labels =
            std::collections::BTreeMap::from([("azp-testbed".to_owned(), "helm".to_owned())]);
        if restricted {
            labels.insert(
                "pod-security.kubernetes.io/enforce".to_owned(),
                "restricted".to_owned(),
            );
            labels.insert(
                "pod-security.kubernetes.io/enforce-version".to_owned(),
                "latest".to_owned(),
            );
        }
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        TestNamespace {
            client: client.clone(),
            name,
        }
    }

    async fn delete(self) {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::background())
            .await;
    }
}

fn api_resource(o: &serde_json::Value) -> ApiResource {
    let api_version = o["apiVersion"].as_str().expect("apiVersion");
    let kind = o["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        "AgentPool" => "agentpools".to_owned(),
        "Pod" => "pods".to_owned(),
        other => format!("{}s", other.to_lowercase()),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural)
}

/// Server-side dry run of a create in `namespace`: the real API server's schema, CEL rules and admission
/// (Pod Security) judge the object; nothing is stored.
async fn dry_run_create(
    client: &Client,
    namespace: &str,
    o: &serde_json::Value,
) -> Result<(), String> {
    let mut o = o.clone();
    o["metadata"]["namespace"] = serde_json::Value::String(namespace.to_owned());
    let obj: DynamicObject = serde_json::from_value(o.clone()).map_err(|e| e.to_string())?;
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &api_resource(&o));
    api.create(
        &PostParams {
            dry_run: true,
            field_manager: None,
        },
        &obj,
    )
    .await
    .map(|_| ())
    .map_err(|e| match e {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    })
}

/// A Pod made from a pod template, to put it before Pod Security admission. Its ServiceAccount is the
/// namespace's default one (the chart's do not exist in the probe namespace; Pod Security ignores it).
fn pod_from_template(name: &str, template: &serde_json::Value) -> serde_json::Value {
    let mut spec = template["spec"].clone();
    if let Some(spec) = spec.as_object_mut() {
        spec.remove("serviceAccountName");
        spec.insert("restartPolicy".to_owned(), "Never".into());
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"].clone()},
        "spec": spec,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_values_file_renders_valid_objects() {
    let client = client().await;
    // The AgentPool CRD from the code, so that AgentPools can be judged by the server.
    azp_testbed::bed::install_crd(&client)
        .await
        .unwrap_or_else(|e| panic!("install the CRD: {e}"));
    let ns = TestNamespace::create(&client, "helm-render", true).await;
    // The probe works: a pod that breaks the restricted standard is refused in that namespace.
    let loose = pod_from_template(
        "loose-probe",
        &serde_json::json!({"metadata": {}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
    );
    let refused = dry_run_create(&client, &ns.name, &loose).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("violates PodSecurity")),
        "Pod Security admission must be on in the test API server: {refused:?}"
    );

    let mut problems = Vec::new();
    for values in ci_values() {
        let what = values.display().to_string();
        let manifest = unwrap(chart::render(
            "azp",
            "azp-system",
            &[values.as_path()],
            Some(KUBE_VERSION),
        ));
        let objects = unwrap(chart::objects(&manifest));
        let builtin: Vec<&serde_json::Value> = objects
            .iter()
            .filter(|o| !CUSTOM_KINDS.iter().any(|k| o["kind"] == *k))
            .collect();
        kubernetes_validate(&builtin, &what);

        // Standard labels on everything.
        for o in &objects {
            for label in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ] {
                if o["metadata"]["labels"][label].as_str().is_none() {
                    problems.push(format!("{what}: {} has no label {label}", name_of(o)));
                }
            }
        }

        // AgentPools: the real API server's schema and CEL rules accept them.
        for pool in chart::of_kind(&objects, "AgentPool") {
            if let Err(e) = dry_run_create(&client, &ns.name, pool).await {
                problems.push(format!(
                    "{what}: the API server rejects {}: {e}",
                    name_of(pool)
                ));
            }
            // Their agent pods pass the restricted Pod Security Standard.
            let pod = pod_from_template("agent-probe", &pool["spec"]["template"]);
            if let Err(e) = dry_run_create(&client, &ns.name, &pod).await {
                problems.push(format!(
                    "{what}: the agent pod of {} is rejected in a restricted namespace: {e}",
                    name_of(pool)
                ));
            }
        }

        // The controller: restricted Pod Security, probes on the admin port, workload identity.
        let deployment = chart::of_kind(&objects, "Deployment");
        assert_eq!(deployment.len(), 1, "{what}: one Deployment");
        let template = &deployment[0]["spec"]["template"];
        let pod = pod_from_template("controller-probe", template);
        if let Err(e) = dry_run_create(&client, &ns.name, &pod).await {
            problems.push(format!(
                "{what}: the controller pod is rejected in a restricted namespace: {e}"
            ));
        }
        let container = &template["spec"]["containers"][0];
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"], true,
            "{what}"
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{what}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{what}"
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"]["port"], "admin",
            "{what}"
        );
        assert!(
            container["resources"]["limits"]["memory"].is_string(),
            "{what}"
        );
        assert!(
            container["resources"]["requests"]["cpu"].is_string(),
            "{what}"
        );
        assert_eq!(
            template["metadata"]["labels"]["azure.workload.identity/use"], "true",
            "{what}"
        );
        let sa_name = template["spec"]["serviceAccountName"].as_str().expect("SA");
        let sa = unwrap(chart::find(&objects, "ServiceAccount", sa_name));
        assert!(
            sa["metadata"]["annotations"]["azure.workload.identity/client-id"].is_string(),
            "{what}: the controller's ServiceAccount names its managed identity"
        );

        // Every AgentPool's namespace has the agents' ServiceAccount, without an API token.
        for pool in chart::of_kind(&objects, "AgentPool") {
            let pool_ns = pool["metadata"]["namespace"].as_str().expect("namespace");
            let agent_sa = pool["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .expect("agent SA");
            let found = objects.iter().any(|o| {
                o["kind"] == "ServiceAccount"
                    && o["metadata"]["name"] == agent_sa
                    && o["metadata"]["namespace"] == pool_ns
                    && o["automountServiceAccountToken"] == false
                    && o["metadata"]["annotations"]["azure.workload.identity/client-id"].is_string()
            });
            if !found {
                problems.push(format!(
                    "{what}: no ServiceAccount {pool_ns}/{agent_sa} (workload identity, no token) for {}",
                    name_of(pool)
                ));
            }
        }

        // Alerts: promtool accepts them (tests/dashboard_queries.rs checks their metric names).
        for rule in chart::of_kind(&objects, "PrometheusRule") {
            promtool_check_rules(rule, &what);
        }
        for sm in chart::of_kind(&objects, "ServiceMonitor") {
            let endpoint = &sm["spec"]["endpoints"][0];
            assert_eq!(endpoint["port"], "http-metrics", "{what}");
            assert_eq!(
                endpoint["honorLabels"], true,
                "{what}: keep the metrics' namespace label"
            );
        }
        // The dashboard ConfigMap carries the dashboard unchanged.
        for cm in chart::of_kind(&objects, "ConfigMap")
            .into_iter()
            .filter(|cm| cm["data"].get("azp-autoscaler.json").is_some())
        {
            let shipped =
                std::fs::read_to_string(chart::repo_root().join("dashboards/azp-autoscaler.json"))
                    .expect("dashboard");
            assert_eq!(
                cm["data"]["azp-autoscaler.json"]
                    .as_str()
                    .map(str::trim_end),
                Some(shipped.trim_end()),
                "{what}: the dashboard ConfigMap"
            );
            assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1", "{what}");
        }
    }
    ns.delete().await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_agentpool_from_values_is_rejected_by_the_api_server_with_the_field() {
    // What the values schema lets through, the CRD's own rules catch at apply time.
    let client = client().await;
    azp_testbed::bed::install_crd(&client)
        .await
        .unwrap_or_else(|e| panic!("install the CRD: {e}"));
    let ns = TestNamespace::create(&client, "helm-bad-pool", false).await;
    let manifest = unwrap(chart::render_values(
        "azp",
        "azp-system",
        "organization: https://dev.azure.com/contoso\ncontroller:\n  workloadIdentity:\n    clientId: 00000000-0000-0000-0000-000000000001\npools:\n  - name: linux\n",
    ));
    let objects = unwrap(chart::objects(&manifest));
    let mut pool = (*chart::of_kind(&objects, "AgentPool")[0]).clone();
    pool["spec"]["organization"] = "http://dev.azure.com/contoso".into();
    let err = dry_run_create(&client, &ns.name, &pool)
        .await
        .expect_err("an http:// organization must be rejected");
    ns.delete().await;
    assert!(
        err.contains("spec.organization must be an https:// URL"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_on_the_real_api_server_and_uninstalls() {
    let client = client().await;
    let kubeconfig = azp_testbed::node::kubeconfig_path();
    // The release's namespace and one pool namespace (the chart creates neither: they exist in a cluster).
    let release_ns = TestNamespace::create(&client, "helm-install", true).await;
    let pools_ns = TestNamespace::create(&client, "helm-pools", true).await;
    let release = format!("azp-{}", &release_ns.name[release_ns.name.len() - 6..]);
    let values = unwrap(chart::ValuesFile::new(&format!(
        r#"# A local organization address that refuses connections: the controller run below calls nothing outside.
organization: https://127.0.0.1:1/contoso
controller:
  # Two replicas: leader election, and the Role for its Lease, are part of what is installed and used.
  replicas: 2
  workloadIdentity:
    clientId: 00000000-0000-0000-0000-00000000c0de
# Watch only the agents' namespace: the controller run below must not touch other tests' AgentPools.
watchNamespace: {pools}
pools:
  - name: linux
    namespace: {pools}
    maxAgents: 3
  - name: gpu
    namespace: {pools}
    capabilities:
      gpu: "true"
networkPolicy:
  enabled: true
dashboard:
  enabled: true
serviceHooks:
  enabled: true
  existingSecret: azp-hooks
# The organization is unreachable here, so nothing could drain: no uninstall hook (its command is tested
# against the simulator in tests/e2e_lifecycle.rs, its rendering below).
uninstall:
  drain:
    enabled: false
"#,
        pools = pools_ns.name
    )));
    // The CRD may already be there from the e2e beds (same code, same schema): take it over.
    let installed = chart::install(
        &release,
        &release_ns.name,
        values.path(),
        &kubeconfig,
        &["--take-ownership", "--timeout", "120s"],
    );
    let mut result = check_installed(
        &client,
        &release,
        &release_ns.name,
        &pools_ns.name,
        installed,
    )
    .await;
    if result.is_ok() {
        result = run_controller_under_the_charts_rbac(
            &client,
            &release,
            &release_ns.name,
            &pools_ns.name,
        )
        .await;
    }
    let uninstalled = chart::uninstall(&release, &release_ns.name, &kubeconfig);
    let after = check_uninstalled(&client, &release, &release_ns.name, &pools_ns.name).await;
    release_ns.delete().await;
    pools_ns.delete().await;
    result.unwrap_or_else(|e| panic!("{e}"));
    unwrap(uninstalled);
    after.unwrap_or_else(|e| panic!("{e}"));
}

/// Runs the controller binary as the chart's ServiceAccount (a token of it, so with exactly the RBAC the
/// release installed: the Role in the watched namespace, and `get` on kube-system for the cluster id)
/// until it is ready and has written the status of the release's AgentPools. A missing permission fails
/// here.
async fn run_controller_under_the_charts_rbac(
    client: &Client,
    release: &str,
    release_ns: &str,
    pools_ns: &str,
) -> Result<(), String> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let sa = format!("{release}-azp-autoscaler");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), release_ns)
        .create_subresource::<TokenRequest, TokenRequest>(
            "token",
            &sa,
            &PostParams::default(),
            &request,
        )
        .await
        .map_err(|e| format!("token for {release_ns}/{sa}: {e}"))?
        .status
        .map(|s| s.token)
        .ok_or("no token in the TokenRequest")?;
    let dir =
        std::env::temp_dir().join(format!("azp-chart-rbac-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = scopeguard(dir.clone());
    let kubeconfig = dir.join("kubeconfig");
    azp_testbed::bed::write_kubeconfig(&kubeconfig, &sa, &token, release_ns)
        .map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let log_path = dir.join("controller.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    // The Deployment's arguments, as installed (admin address made local).
    let manifest = std::process::Command::new(chart::helm().map_err(|e| e.to_string())?)
        .args([
            "get",
            "manifest",
            release,
            "--namespace",
            release_ns,
            "--kubeconfig",
        ])
        .arg(azp_testbed::node::kubeconfig_path())
        .output()
        .map_err(|e| e.to_string())?;
    let objects =
        chart::objects(&String::from_utf8_lossy(&manifest.stdout)).map_err(|e| e.to_string())?;
    let deployment = chart::of_kind(&objects, "Deployment");
    let args: Vec<String> = deployment
        .first()
        .and_then(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].as_array())
        .ok_or("no Deployment args in the release manifest")?
        .iter()
        .filter_map(|a| a.as_str())
        // The hook endpoint needs the mounted Secret's files; it is not what this run is about.
        .filter(|a| !a.starts_with("--hooks-"))
        .map(|a| {
            if a.starts_with("--admin-addr=") {
                format!("--admin-addr=127.0.0.1:{port}")
            } else {
                a.to_owned()
            }
        })
        .collect();
    let mut child =
        tokio::process::Command::new(azp_testbed::bed::bin_dir().join("azp-autoscaler"))
            .args(&args)
            .env_clear()
            .env("KUBECONFIG", &kubeconfig)
            // The downward API's values: with two replicas the controller takes the Lease in the release
            // namespace, under the chart's leader-election Role.
            .env("POD_NAMESPACE", release_ns)
            .env("POD_NAME", format!("{release}-0"))
            .env("RUST_LOG", "info")
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start the controller: {e}"))?;
    let logs = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ready = azp_testbed::bed::eventually(
        "the controller ready under the chart's RBAC",
        Duration::from_secs(60),
        || async {
            let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    let status = match ready {
        Ok(()) => {
            azp_testbed::bed::eventually(
                "AgentPool status written under the chart's RBAC",
                Duration::from_secs(60),
                || async {
                    let pool = get_dynamic(
                        client,
                        Some(pools_ns),
                        "azp-autoscaler.dev/v1alpha1",
                        "AgentPool",
                        "linux",
                    )
                    .await
                    .ok()??;
                    pool.data["status"]["conditions"]
                        .as_array()
                        .filter(|c| !c.is_empty())
                        .map(|_| ())
                },
            )
            .await
        }
        Err(e) => Err(e),
    };
    let exited = child.try_wait().ok().flatten();
    let _ = child.kill().await;
    let text = logs();
    status.map_err(|e| format!("{e} (exited: {exited:?})\ncontroller log:\n{text}"))?;
    // Kubernetes refusals read `… is forbidden: User … cannot …` (reason Forbidden, code 403); a bare "403"
    // would also match timestamps.
    if text.to_lowercase().contains("forbidden") || text.contains("code: 403") {
        return Err(format!(
            "the controller was refused something under the chart's RBAC:\n{text}"
        ));
    }
    Ok(())
}

async fn get_dynamic(
    client: &Client,
    namespace: Option<&str>,
    api_version: &str,
    kind: &str,
    name: &str,
) -> Result<Option<DynamicObject>, String> {
    let ar = api_resource(&serde_json::json!({"apiVersion": api_version, "kind": kind}));
    let ar = match kind {
        "NetworkPolicy" => ApiResource {
            plural: "networkpolicies".into(),
            ..ar
        },
        "PodDisruptionBudget" => ApiResource {
            plural: "poddisruptionbudgets".into(),
            ..ar
        },
        _ => ar,
    };
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.get_opt(name)
        .await
        .map_err(|e| format!("get {kind} {name}: {e}"))
}

fn expected_objects<'a>(
    release: &'a str,
    release_ns: &'a str,
    pools_ns: &'a str,
) -> Vec<(Option<String>, &'static str, &'static str, String)> {
    let full = format!("{release}-azp-autoscaler");
    vec![
        (
            Some(release_ns.to_owned()),
            "apps/v1",
            "Deployment",
            full.clone(),
        ),
        (Some(release_ns.to_owned()), "v1", "Service", full.clone()),
        (
            Some(release_ns.to_owned()),
            "v1",
            "Service",
            format!("{full}-hooks"),
        ),
        (
            Some(release_ns.to_owned()),
            "v1",
            "ServiceAccount",
            full.clone(),
        ),
        (
            Some(pools_ns.to_owned()),
            "v1",
            "ServiceAccount",
            "azp-agent".to_owned(),
        ),
        (
            Some(release_ns.to_owned()),
            "policy/v1",
            "PodDisruptionBudget",
            full.clone(),
        ),
        (
            Some(release_ns.to_owned()),
            "networking.k8s.io/v1",
            "NetworkPolicy",
            full.clone(),
        ),
        (
            Some(release_ns.to_owned()),
            "v1",
            "ConfigMap",
            format!("{full}-dashboard"),
        ),
        (
            Some(pools_ns.to_owned()),
            "rbac.authorization.k8s.io/v1",
            "Role",
            format!("{full}-controller"),
        ),
        (
            Some(pools_ns.to_owned()),
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            format!("{full}-controller"),
        ),
        (
            None,
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            format!("{full}-{release_ns}-cluster-id"),
        ),
        (
            None,
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            format!("{full}-{release_ns}-cluster-id"),
        ),
        (
            Some(pools_ns.to_owned()),
            "azp-autoscaler.dev/v1alpha1",
            "AgentPool",
            "linux".to_owned(),
        ),
        (
            Some(pools_ns.to_owned()),
            "azp-autoscaler.dev/v1alpha1",
            "AgentPool",
            "gpu".to_owned(),
        ),
    ]
}

async fn check_installed(
    client: &Client,
    release: &str,
    release_ns: &str,
    pools_ns: &str,
    installed: Result<String, ChartError>,
) -> Result<(), String> {
    let out = installed.map_err(|e| format!("helm install: {e}"))?;
    if !out.contains("STATUS: deployed") {
        return Err(format!("helm install did not deploy:\n{out}"));
    }
    if !out.contains("What to check next") {
        return Err(format!("helm install printed no NOTES:\n{out}"));
    }
    let mut missing = Vec::new();
    for (ns, api_version, kind, name) in expected_objects(release, release_ns, pools_ns) {
        if get_dynamic(client, ns.as_deref(), api_version, kind, &name)
            .await?
            .is_none()
        {
            missing.push(format!("{kind} {}/{name}", ns.as_deref().unwrap_or("-")));
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "missing after helm install: {}",
            missing.join(", ")
        ));
    }
    let crd = get_dynamic(
        client,
        None,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "agentpools.azp-autoscaler.dev",
    )
    .await?
    .ok_or("no AgentPool CRD after helm install")?;
    let owner = crd.metadata.annotations.unwrap_or_default();
    if owner.get("helm.sh/resource-policy").map(String::as_str) != Some("keep") {
        return Err(format!("the CRD lacks resource-policy keep: {owner:?}"));
    }
    // The AgentPool as stored: defaults applied by the server, the chart's values in place.
    let pool = get_dynamic(
        client,
        Some(pools_ns),
        "azp-autoscaler.dev/v1alpha1",
        "AgentPool",
        "gpu",
    )
    .await?
    .ok_or("no AgentPool gpu")?;
    let spec = &pool.data["spec"];
    if spec["capabilities"]["gpu"] != "true" || spec["maxAgents"] != 10 || spec["pool"] != "gpu" {
        return Err(format!("AgentPool gpu as stored: {spec}"));
    }
    Ok(())
}

async fn check_uninstalled(
    client: &Client,
    release: &str,
    release_ns: &str,
    pools_ns: &str,
) -> Result<(), String> {
    // helm uninstall --wait returned: the release's objects are gone (or going), the CRD stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        for (ns, api_version, kind, name) in expected_objects(release, release_ns, pools_ns) {
            let found = get_dynamic(client, ns.as_deref(), api_version, kind, &name).await?;
            if found.is_some_and(|o| o.metadata.deletion_timestamp.is_none()) {
                left.push(format!("{kind} {}/{name}", ns.as_deref().unwrap_or("-")));
            }
        }
        if left.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("left after helm uninstall: {}", left.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    get_dynamic(
        client,
        None,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "agentpools.azp-autoscaler.dev",
    )
    .await?
    .ok_or("helm uninstall deleted the AgentPool CRD (it must be kept)")?;
    Ok(())
}

#[test]
fn the_uninstall_hook_drains_every_pool_namespace_of_the_release_before_anything_is_deleted() {
    let values = |drain: bool| {
        format!(
            "{}organization: https://dev.azure.com/contoso\npools:\n  - name: linux\n    namespace: ci\n  - name: gpu\n    namespace: ml\nuninstall:\n  drain:\n    enabled: {drain}\n    timeoutSeconds: 400\n",
            chart::rbac_values(None)
        )
    };
    let objects = unwrap(chart::objects(&unwrap(chart::render_values(
        "rel",
        "azp-system",
        &values(true),
    ))));
    let hooks: Vec<&serde_json::Value> = objects
        .iter()
        .filter(|o| o["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete")
        .collect();
    let job = hooks
        .iter()
        .find(|o| o["kind"] == "Job")
        .expect("a pre-delete hook Job");
    let args: Vec<&str> = job["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(
        args,
        [
            "drain",
            "--selector=app.kubernetes.io/instance=rel",
            "--timeout-seconds=400",
            "--namespace=ci",
            "--namespace=ml",
        ]
    );
    // Its permissions exist before it runs (lower hook weight), in each pool namespace.
    let sa = job["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("SA");
    for ns in ["ci", "ml"] {
        let binding = hooks
            .iter()
            .find(|o| o["kind"] == "RoleBinding" && o["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no hook RoleBinding in {ns}"));
        assert_eq!(binding["subjects"][0]["name"], sa);
        assert_eq!(binding["subjects"][0]["namespace"], "azp-system");
        assert!(
            binding["metadata"]["annotations"]["helm.sh/hook-weight"]
                .as_str()
                .and_then(|w| w.parse::<i32>().ok())
                < job["metadata"]["annotations"]["helm.sh/hook-weight"]
                    .as_str()
                    .and_then(|w| w.parse::<i32>().ok()),
            "RBAC before the Job"
        );
    }
    // It selects no controller Service, PodDisruptionBudget or NetworkPolicy.
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
        "uninstall-drain"
    );
    kubernetes_validate(&hooks, "the uninstall hook");

    let without = unwrap(chart::objects(&unwrap(chart::render_values(
        "rel",
        "azp-system",
        &values(false),
    ))));
    assert!(
        !without
            .iter()
            .any(|o| o["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"),
        "uninstall.drain.enabled=false renders no hook"
    );
}
