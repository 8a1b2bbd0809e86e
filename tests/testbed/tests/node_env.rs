//! Node harness on the real API server: a container's environment (values, `$(VAR)`, fieldRef, Secret and
//! ConfigMap keys, envFrom, the node's extra env), volumes mapped to local folders, a missing Secret
//! retried until it exists. Needs the local control plane (`tests/cluster/up.sh`).

use std::collections::BTreeMap;
use std::time::Duration;

use azp_testbed::node::testing::{
    TestNamespace, init_tracing, pod_phase, wait_for, wait_pod_phase,
};
use azp_testbed::node::{self, NodeConfig, NodeHarness};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);

fn env_file(harness: &NodeHarness, ns: &str, pod: &str) -> BTreeMap<String, String> {
    let layout = harness.pod_layout(ns, pod).expect("the node knows the pod");
    let text =
        std::fs::read_to_string(layout.dir.join("env.txt")).expect("env.txt written by the pod");
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn create_secret_and_config_map(ns: &TestNamespace) {
    let secrets: Api<Secret> = ns.api();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "stringData": {"password": "s3cret", "user": "builder"},
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let cms: Api<ConfigMap> = ns.api();
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
        "data": {"mode": "fast"},
    }))
    .expect("configmap");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create configmap");
}

#[tokio::test]
async fn env_field_refs_secrets_and_volumes_reach_the_process() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-env").await;
    let mut config = NodeConfig::for_namespace(ns.name());
    config.extra_env = vec![("SSL_CERT_FILE".into(), "/etc/test-ca.pem".into())];
    let harness = NodeHarness::start(client.clone(), config)
        .await
        .expect("node harness starts");
    create_secret_and_config_map(&ns).await;

    // The script proves each mapping: env to a file, a secret volume read through TESTBED_POD_ROOT, a
    // configMap file passed as an argument (rewritten to the local path), the working directory.
    let script = r#"env > "$TESTBED_POD_DIR/env.txt"
cat "$TESTBED_POD_ROOT/etc/creds/password" > "$TESTBED_POD_DIR/secret.txt"
cat "$1" > "$TESTBED_POD_DIR/mode.txt"
pwd > "$TESTBED_POD_DIR/pwd.txt"
echo made-here > in-workdir.txt"#;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "envy", "labels": {"app": "envy"}},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "default",
            "volumes": [
                {"name": "work", "emptyDir": {}},
                {"name": "creds", "secret": {"secretName": "creds"}},
                {"name": "settings", "configMap": {"name": "settings"}},
            ],
            "containers": [{
                "name": "main", "image": "testbed/shell",
                "command": ["sh", "-c", script, "sh", "/etc/settings/mode"],
                "workingDir": "/azp/_work",
                "volumeMounts": [
                    {"name": "work", "mountPath": "/azp/_work"},
                    {"name": "creds", "mountPath": "/etc/creds", "readOnly": true},
                    {"name": "settings", "mountPath": "/etc/settings"},
                ],
                "envFrom": [{"secretRef": {"name": "creds"}, "prefix": "CREDS_"}],
                "env": [
                    {"name": "GREETING", "value": "hello"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "MESSAGE", "value": "$(GREETING) from $(POD_NAME), not $$(POD_NAME)"},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "SA_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                    {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": true}}},
                    {"name": "WORK", "value": "/azp/_work"},
                ],
            }],
        },
    }))
    .expect("pod");
    let pods: Api<Pod> = ns.api();
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let done = wait_pod_phase(&pods, "envy", "Succeeded", TIMEOUT).await;
    assert_eq!(pod_phase(&done), Some("Succeeded"));

    let env = env_file(&harness, ns.name(), "envy");
    let get = |k: &str| env.get(k).map(String::as_str);
    assert_eq!(get("MESSAGE"), Some("hello from envy, not $(POD_NAME)"));
    assert_eq!(get("POD_NAMESPACE"), Some(ns.name()));
    assert_eq!(get("POD_UID"), created.metadata.uid.as_deref());
    assert_eq!(get("NODE_NAME"), Some(harness.node_name()));
    assert_eq!(get("SA_NAME"), Some("default"));
    assert_eq!(get("POD_IP"), Some("127.0.0.1"));
    assert_eq!(get("APP"), Some("envy"));
    assert_eq!(get("PASSWORD"), Some("s3cret"));
    assert_eq!(get("CREDS_user"), Some("builder"));
    assert_eq!(get("CREDS_password"), Some("s3cret"));
    assert_eq!(get("MODE"), Some("fast"));
    assert_eq!(
        get("MAYBE"),
        None,
        "an optional missing secret key is skipped"
    );
    assert_eq!(
        get("SSL_CERT_FILE"),
        Some("/etc/test-ca.pem"),
        "the node's extra env"
    );
    assert_eq!(get("HOSTNAME"), Some("envy"));
    assert!(
        get("AZURE_CLIENT_ID").is_none(),
        "no workload identity without the label"
    );

    let layout = harness.pod_layout(ns.name(), "envy").expect("known pod");
    let work = layout.volume("work");
    assert_eq!(
        get("WORK").map(std::path::PathBuf::from),
        Some(work.clone()),
        "mount paths in values are rewritten"
    );
    let read = |f: &str| {
        std::fs::read_to_string(layout.dir.join(f))
            .expect(f)
            .trim()
            .to_owned()
    };
    assert_eq!(read("secret.txt"), "s3cret");
    assert_eq!(read("mode.txt"), "fast");
    assert_eq!(
        std::fs::canonicalize(read("pwd.txt")).expect("pwd"),
        std::fs::canonicalize(&work).expect("work")
    );
    assert_eq!(
        std::fs::read_to_string(work.join("in-workdir.txt"))
            .expect("written in the emptyDir")
            .trim(),
        "made-here"
    );
    // The ServiceAccount admission plugin's API token volume is materialised too.
    let sa_token = layout.in_root("/var/run/secrets/kubernetes.io/serviceaccount/token");
    assert!(
        std::fs::read_to_string(&sa_token).is_ok_and(|t| t.split('.').count() == 3),
        "service-account token file"
    );

    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_missing_secret_holds_the_container_until_it_is_created() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-env-wait").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "waits"},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "main", "image": "testbed/shell",
            "command": ["sh", "-c", "test \"$PASSWORD\" = s3cret"],
            "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}],
        }]},
    }))
    .expect("pod");
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let waiting = wait_for(
        &pods,
        "waits",
        TIMEOUT,
        "CreateContainerConfigError",
        |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.waiting.as_ref())
                .is_some_and(|w| w.reason.as_deref() == Some("CreateContainerConfigError"))
        },
    )
    .await
    .expect("pod exists");
    assert_eq!(pod_phase(&waiting), Some("Pending"));
    let message = waiting
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("creds") && message.contains("PASSWORD"),
        "message names the secret and the variable: {message}"
    );

    create_secret_and_config_map(&ns).await;
    wait_pod_phase(&pods, "waits", "Succeeded", TIMEOUT).await;
    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn image_entrypoints_and_the_path_prefix_supply_the_command() {
    use std::os::unix::fs::PermissionsExt;
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-image").await;
    let mut config = NodeConfig::for_namespace(ns.name());
    // A tool "installed in the image" at /opt/tools/bin, found by file name in the PATH prefix.
    let tools = config.work_dir.join(format!("{}-tools", ns.name()));
    std::fs::create_dir_all(&tools).expect("tools folder");
    let tool = tools.join("hello-tool");
    std::fs::write(&tool, "#!/bin/sh\necho \"hello-tool $*\"\n").expect("write tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod tool");
    config.path_prefix.insert(0, tools.clone());
    config.images.insert(
        "testbed/echo:1".into(),
        node::ImageConfig {
            entrypoint: vec![
                "sh".into(),
                "-c".into(),
                "echo \"$0 $* in $PWD with $IMAGE_VAR\"".into(),
            ],
            cmd: vec!["default-cmd".into()],
            working_dir: Some("/srv/app".into()),
            env: vec![("IMAGE_VAR".into(), "from-image".into())],
        },
    );
    let harness = NodeHarness::start(client.clone(), config)
        .await
        .expect("node harness starts");
    let pod = |name: &str, container: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container]},
        }))
        .expect("pod")
    };
    let pods: Api<Pod> = ns.api();
    let pp = PostParams::default();
    pods.create(
        &pp,
        &pod("cmd", json!({"name": "main", "image": "testbed/echo:1"})),
    )
    .await
    .expect("create");
    pods.create(
        &pp,
        &pod(
            "args",
            json!({"name": "main", "image": "testbed/echo:1", "args": ["from-args", "x"]}),
        ),
    )
    .await
    .expect("create");
    pods.create(
        &pp,
        &pod("tool", json!({"name": "main", "image": "testbed/echo:1", "command": ["/opt/tools/bin/hello-tool", "a"]})),
    )
    .await
    .expect("create");
    pods.create(
        &pp,
        &pod("nothing", json!({"name": "main", "image": "unknown/image"})),
    )
    .await
    .expect("create");
    for name in ["cmd", "args", "tool"] {
        wait_pod_phase(&pods, name, "Succeeded", TIMEOUT).await;
    }
    let out = |name: &str| {
        let layout = harness.pod_layout(ns.name(), name).expect("known pod");
        (
            std::fs::read_to_string(&layout.stdout)
                .expect("stdout")
                .trim()
                .to_owned(),
            layout,
        )
    };
    let (cmd, layout) = out("cmd");
    assert_eq!(
        cmd,
        format!(
            "default-cmd  in {} with from-image",
            layout.in_root("/srv/app").display()
        )
    );
    let (args, _) = out("args");
    assert!(
        args.starts_with("from-args x in "),
        "args replace the image's CMD: {args}"
    );
    let (tool, _) = out("tool");
    assert_eq!(
        tool, "hello-tool a",
        "an absolute image path resolves by file name in the PATH prefix"
    );

    // No command and no known image: the pod fails with StartError, saying what to configure.
    let failed = wait_pod_phase(&pods, "nothing", "Failed", TIMEOUT).await;
    let t = failed
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.clone())
        .expect("terminated");
    assert_eq!(t.reason.as_deref(), Some("StartError"));
    assert!(t.message.unwrap_or_default().contains("NodeConfig::images"));
    harness.shutdown().await.expect("shutdown");
}
