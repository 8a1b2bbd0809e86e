//! The Helm chart (`helm/azp-autoscaler`) from tests: find helm, render the chart with given values, pick
//! objects out of the manifest, install and uninstall it on the local API server, and the controller's RBAC
//! rules exactly as the chart grants them (so an end-to-end bed can run the controller under the chart's
//! RBAC and nothing else).
//!
//! helm comes from `tests/setup.sh` (into `.cache/tools/bin`); `AZP_HELM` overrides the path. A missing
//! helm is an error naming the fix, never a skipped test.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::rbac::v1::PolicyRule;

/// Errors of the chart helpers; each message says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error(
        "helm not found (looked at $AZP_HELM, {cached} and PATH): run tests/setup.sh, which installs it into .cache/tools/bin"
    )]
    HelmMissing { cached: String },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`helm {args}` failed ({status}):\n{stderr}")]
    Helm {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("the rendered chart is not YAML: {0}")]
    Yaml(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// The repository root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    repo_root().join("helm").join("azp-autoscaler")
}

/// The helm binary: `$AZP_HELM`, else `.cache/tools/bin/helm` (tests/setup.sh), else `helm` on PATH.
pub fn helm() -> Result<PathBuf, ChartError> {
    if let Some(p) = std::env::var_os("AZP_HELM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let cached = repo_root().join(".cache/tools/bin/helm");
    if cached.is_file() {
        return Ok(cached);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("helm"))
            .find(|p| p.is_file())
    });
    on_path.ok_or_else(|| ChartError::HelmMissing {
        cached: cached.display().to_string(),
    })
}

/// Runs helm with these arguments; stdout on success, the command and its stderr on failure.
pub fn run_helm<I, S>(args: I) -> Result<String, ChartError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let helm = helm()?;
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(&helm)
        .args(&args)
        .output()
        .map_err(|source| ChartError::Spawn {
            program: helm.display().to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ChartError::Helm {
            args: args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            status: out.status.to_string(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        })
    }
}

/// Renders the chart (`helm template`) as release `release` in `namespace` with these values files (in
/// order) and returns the manifest. `kube_version` pins `.Capabilities.KubeVersion` when given.
pub fn render(
    release: &str,
    namespace: &str,
    values_files: &[&Path],
    kube_version: Option<&str>,
) -> Result<String, ChartError> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "template".into(),
        release.into(),
        chart_dir().into(),
        "--namespace".into(),
        namespace.into(),
    ];
    if let Some(v) = kube_version {
        args.push("--kube-version".into());
        args.push(v.into());
    }
    for f in values_files {
        args.push("--values".into());
        args.push(f.as_os_str().to_owned());
    }
    run_helm(args)
}

/// Renders the chart with values given as YAML text.
pub fn render_values(
    release: &str,
    namespace: &str,
    values_yaml: &str,
) -> Result<String, ChartError> {
    let file = ValuesFile::new(values_yaml)?;
    render(release, namespace, &[file.path()], None)
}

/// A values file in a temporary folder, removed on drop.
pub struct ValuesFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ValuesFile {
    /// Writes `yaml` to a fresh file.
    pub fn new(yaml: &str) -> Result<ValuesFile, ChartError> {
        let dir = std::env::temp_dir()
            .join("azp-chart")
            .join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("values.yaml");
        std::fs::write(&path, yaml)?;
        Ok(ValuesFile { dir, path })
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ValuesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The objects of a rendered manifest (empty documents dropped), as JSON values.
pub fn objects(manifest: &str) -> Result<Vec<serde_json::Value>, ChartError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(manifest).map_err(|e| ChartError::Yaml(e.to_string()))?;
    Ok(docs.into_iter().filter(|d| d.is_object()).collect())
}

/// The objects of this kind.
pub fn of_kind<'a>(objects: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The one object of this kind and name, or an error listing what the manifest has.
pub fn find<'a>(
    objects: &'a [serde_json::Value],
    kind: &str,
    name: &str,
) -> Result<&'a serde_json::Value, ChartError> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .ok_or_else(|| {
            ChartError::Other(format!(
                "the manifest has no {kind} {name}; it has: {}",
                objects
                    .iter()
                    .map(|o| format!(
                        "{} {}",
                        o["kind"].as_str().unwrap_or("?"),
                        o["metadata"]["name"].as_str().unwrap_or("?")
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Values with which the chart renders the controller's RBAC for one watched namespace (a Role) or, with
/// `None`, the whole cluster (a ClusterRole).
pub fn rbac_values(watch_namespace: Option<&str>) -> String {
    format!(
        "controller:\n  workloadIdentity:\n    clientId: 00000000-0000-0000-0000-000000000001\nclusterId: rbac-probe\nwatchNamespace: {:?}\n",
        watch_namespace.unwrap_or_default()
    )
}

/// The rules of the chart's controller Role (`watch_namespace` given) or ClusterRole (`None`), as rendered
/// by helm. The lead's e2e bed can bind exactly these to the controller's ServiceAccount.
pub fn controller_rules(watch_namespace: Option<&str>) -> Result<Vec<PolicyRule>, ChartError> {
    let namespace = "azp-system";
    let manifest = render_values("azp", namespace, &rbac_values(watch_namespace))?;
    let objects = objects(&manifest)?;
    let role = match watch_namespace {
        Some(_) => find(&objects, "Role", "azp-azp-autoscaler-controller")?,
        None => find(
            &objects,
            "ClusterRole",
            &format!("azp-azp-autoscaler-{namespace}-controller"),
        )?,
    };
    serde_json::from_value(role["rules"].clone())
        .map_err(|e| ChartError::Other(format!("the controller role's rules do not parse: {e}")))
}

/// The rules of the chart's controller Role for one watched namespace: what a bed grants the controller
/// in its namespace to run it under exactly the chart's RBAC.
pub fn controller_role_rules() -> Result<Vec<PolicyRule>, ChartError> {
    controller_rules(Some("azp-watched"))
}

/// The rules of the chart's uninstall hook (`azp-autoscaler drain`) in a pool namespace, as rendered.
pub fn drain_rules() -> Result<Vec<PolicyRule>, ChartError> {
    let values = format!(
        "{}organization: https://dev.azure.com/contoso\npools:\n  - name: linux\n    namespace: azp-pools\n",
        rbac_values(None)
    );
    let manifest = render_values("azp", "azp-system", &values)?;
    let objects = objects(&manifest)?;
    let role = objects
        .iter()
        .find(|o| {
            o["kind"] == "Role"
                && o["metadata"]["name"] == "azp-azp-autoscaler-drain"
                && o["metadata"]["namespace"] == "azp-pools"
        })
        .ok_or_else(|| ChartError::Other("no Role azp-pools/azp-azp-autoscaler-drain".into()))?;
    serde_json::from_value(role["rules"].clone())
        .map_err(|e| ChartError::Other(format!("the drain role's rules do not parse: {e}")))
}

/// `helm install` of the chart with the given values into `namespace` (created), waiting for nothing
/// (pods stay Pending on a bed without a node for them). `extra` are more helm arguments.
pub fn install(
    release: &str,
    namespace: &str,
    values: &Path,
    kubeconfig: &Path,
    extra: &[&str],
) -> Result<String, ChartError> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "install".into(),
        release.into(),
        chart_dir().into(),
        "--namespace".into(),
        namespace.into(),
        "--create-namespace".into(),
        "--kubeconfig".into(),
        kubeconfig.into(),
        "--values".into(),
        values.into(),
    ];
    args.extend(extra.iter().map(Into::into));
    run_helm(args)
}

/// `helm uninstall`, waiting until the release's objects are gone.
pub fn uninstall(release: &str, namespace: &str, kubeconfig: &Path) -> Result<String, ChartError> {
    run_helm([
        "uninstall",
        release,
        "--namespace",
        namespace,
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--wait",
        "--timeout",
        "120s",
    ])
}
