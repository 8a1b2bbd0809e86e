//! A container's environment and command line, resolved the way the kubelet does it.
//!
//! Resolution is split into a pure part (this module: which objects are referenced, `$(VAR)` expansion,
//! field references, the final variable list) and the fetch of the referenced Secrets and ConfigMaps
//! (done by the caller through the API), so the rules are unit-tested without a cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};

use super::NodeError;

/// Expands `$(VAR)` references the way Kubernetes does for `command`, `args` and env `value`s:
/// `$(NAME)` becomes the value of `NAME` when `lookup` knows it and stays literally `$(NAME)` otherwise;
/// `$$` is an escaped `$` (so `$$(NAME)` gives the literal `$(NAME)`); any other `$` is kept.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.push_str(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest.as_bytes()[0] {
                b'$' => {
                    out.push('$');
                    1
                }
                b'(' => match rest.find(')') {
                    Some(close) => {
                        let name = &rest[1..close];
                        match lookup(name) {
                            Some(value) => out.push_str(&value),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        close + 1
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                _ => {
                    // A `$` that starts no reference: keep it and let the next character be copied as text.
                    out.push('$');
                    0
                }
            };
            cursor += advance + 1;
            checkpoint = cursor;
        } else {
            cursor += 1;
        }
    }
    out.push_str(&input[checkpoint..]);
    out
}

/// An ordered set of environment variables: a later definition replaces an earlier one in place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvVars {
    vars: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl EnvVars {
    /// Sets `name` (replacing an earlier value).
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        match self.index.get(&name) {
            Some(&i) => self.vars[i].1 = value,
            None => {
                self.index.insert(name.clone(), self.vars.len());
                self.vars.push((name, value));
            }
        }
    }

    /// Sets `name` only when it is not defined yet.
    pub fn set_default(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        if !self.index.contains_key(&name) {
            self.set(name, value);
        }
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.index.get(name).map(|&i| self.vars[i].1.as_str())
    }

    /// All variables in definition order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether no variable is set.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// `$(VAR)` expansion against these variables.
    pub fn expand(&self, input: &str) -> String {
        expand(input, |name| self.get(name).map(str::to_owned))
    }
}

/// Names of the Secrets and ConfigMaps a container's environment reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EnvReferences {
    pub secrets: BTreeSet<String>,
    pub config_maps: BTreeSet<String>,
}

/// Which Secrets and ConfigMaps `container`'s `env` and `envFrom` refer to.
pub fn references(container: &Container) -> EnvReferences {
    let mut refs = EnvReferences::default();
    for source in container.env_from.iter().flatten() {
        if let Some(s) = &source.secret_ref {
            refs.secrets.insert(s.name.clone());
        }
        if let Some(c) = &source.config_map_ref {
            refs.config_maps.insert(c.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(from) = &var.value_from {
            if let Some(s) = &from.secret_key_ref {
                refs.secrets.insert(s.name.clone());
            }
            if let Some(c) = &from.config_map_key_ref {
                refs.config_maps.insert(c.name.clone());
            }
        }
    }
    refs
}

/// The Secrets and ConfigMaps of a pod's namespace that were fetched for it; `None` = does not exist.
#[derive(Debug, Default)]
pub struct Fetched {
    pub secrets: BTreeMap<String, Option<Secret>>,
    pub config_maps: BTreeMap<String, Option<ConfigMap>>,
}

impl Fetched {
    fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.get(name).and_then(Option::as_ref)
    }

    fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps.get(name).and_then(Option::as_ref)
    }
}

/// The string keys of a Secret (`data` decoded, plus `stringData` if a client left it there).
pub fn secret_entries(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// The keys of a ConfigMap (`data` and `binaryData`).
pub fn config_map_entries(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

/// Where the pod runs, as the downward API reports it.
#[derive(Clone, Debug)]
pub struct PodPlacement {
    pub node_name: String,
    pub pod_ip: String,
    pub host_ip: String,
}

/// The value of a downward-API `fieldPath` for `pod`.
pub fn field_ref(pod: &Pod, placement: &PodPlacement, field_path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_entry = |map: Option<&BTreeMap<String, String>>, prefix: &str| -> Option<String> {
        let key = field_path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    if let Some(v) = map_entry(meta.labels.as_ref(), "metadata.labels['") {
        return Ok(v);
    }
    if let Some(v) = map_entry(meta.annotations.as_ref(), "metadata.annotations['") {
        return Ok(v);
    }
    Ok(match field_path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => placement.node_name.clone(),
        "spec.serviceAccountName" => service_account_name(pod),
        "status.podIP" | "status.podIPs" => placement.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => placement.host_ip.clone(),
        _ => {
            let _ = spec;
            return Err(format!(
                "unsupported fieldRef.fieldPath {field_path:?} (supported: metadata.name, metadata.namespace, \
                 metadata.uid, metadata.labels['..'], metadata.annotations['..'], spec.nodeName, \
                 spec.serviceAccountName, status.podIP(s), status.hostIP(s))"
            ));
        }
    })
}

/// The pod's service account (`default` when unset, as the admission plugin would set it).
pub fn service_account_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

fn config_error(pod: &Pod, message: String) -> NodeError {
    NodeError::ContainerConfig {
        pod: pod_key(pod),
        message,
    }
}

pub(crate) fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Applies `container`'s `envFrom` and then `env` on top of `vars` (the image's environment), as the kubelet
/// does: `envFrom` first (keys with `=` are skipped), then each `env` entry in order, `value`s expanded
/// against what is defined so far and passed through `rewrite` (which maps in-container mount paths to
/// local folders). A missing Secret/ConfigMap/key that is not `optional` is an error (the kubelet's
/// `CreateContainerConfigError`, retried until it appears).
pub fn apply_container_env(
    vars: &mut EnvVars,
    pod: &Pod,
    container: &Container,
    placement: &PodPlacement,
    fetched: &Fetched,
    rewrite: &dyn Fn(&str) -> String,
) -> Result<(), NodeError> {
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or_default();
        let entries = if let Some(s) = &source.secret_ref {
            match fetched.secret(&s.name) {
                Some(secret) => secret_entries(secret),
                None if s.optional == Some(true) => continue,
                None => {
                    return Err(config_error(
                        pod,
                        format!("envFrom: secret {:?} not found", s.name),
                    ));
                }
            }
        } else if let Some(c) = &source.config_map_ref {
            match fetched.config_map(&c.name) {
                Some(cm) => config_map_entries(cm),
                None if c.optional == Some(true) => continue,
                None => {
                    return Err(config_error(
                        pod,
                        format!("envFrom: configmap {:?} not found", c.name),
                    ));
                }
            }
        } else {
            continue;
        };
        for (key, value) in entries {
            let name = format!("{prefix}{key}");
            if name.is_empty() || name.contains('=') {
                continue;
            }
            vars.set(name, String::from_utf8_lossy(&value).into_owned());
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => rewrite(&vars.expand(var.value.as_deref().unwrap_or_default())),
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    field_ref(pod, placement, &f.field_path)
                        .map_err(|m| config_error(pod, format!("env {}: {m}", var.name)))?
                } else if let Some(s) = &from.secret_key_ref {
                    let value = fetched
                        .secret(&s.name)
                        .and_then(|secret| secret_entries(secret).remove(&s.key));
                    match value {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None if s.optional == Some(true) => continue,
                        None => {
                            return Err(config_error(
                                pod,
                                format!(
                                    "env {}: key {:?} of secret {:?} not found",
                                    var.name, s.key, s.name
                                ),
                            ));
                        }
                    }
                } else if let Some(c) = &from.config_map_key_ref {
                    let value = fetched
                        .config_map(&c.name)
                        .and_then(|cm| config_map_entries(cm).remove(&c.key));
                    match value {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None if c.optional == Some(true) => continue,
                        None => {
                            return Err(config_error(
                                pod,
                                format!(
                                    "env {}: key {:?} of configmap {:?} not found",
                                    var.name, c.key, c.name
                                ),
                            ));
                        }
                    }
                } else if let Some(r) = &from.resource_field_ref {
                    return Err(config_error(
                        pod,
                        format!(
                            "env {}: resourceFieldRef {:?} is not supported by the node harness; use a value",
                            var.name, r.resource
                        ),
                    ));
                } else {
                    String::new()
                }
            }
        };
        vars.set(var.name.clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource,
        ObjectFieldSelector, PodSpec, SecretKeySelector,
    };
    use kube::api::ObjectMeta;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let cases = [
            ("$(A)", "alpha"),
            ("x-$(A)-y", "x-alpha-y"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$$(A)", "$(A)"),
            ("$$", "$"),
            ("$$$(A)", "$alpha"),
            ("$A", "$A"),
            ("$", "$"),
            ("a$", "a$"),
            ("$(A", "$(A"),
            ("$(EMPTY)z", "z"),
            ("$(A)$(A)", "alphaalpha"),
            ("no refs", "no refs"),
            ("ünï$(A)cødé", "ünïalphacødé"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, lookup), want, "input {input:?}");
        }
    }

    #[test]
    fn later_definitions_replace_earlier_in_place() {
        let mut vars = EnvVars::default();
        vars.set("A", "1");
        vars.set("B", "2");
        vars.set("A", "3");
        vars.set_default("B", "ignored");
        let all: Vec<_> = vars.iter().collect();
        assert_eq!(all, vec![("A", "3"), ("B", "2")]);
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p1".into()),
                namespace: Some("ns1".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_owned(), "web".to_owned())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some("builder".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn placement() -> PodPlacement {
        PodPlacement {
            node_name: "node-a".into(),
            pod_ip: "127.0.0.1".into(),
            host_ip: "127.0.0.1".into(),
        }
    }

    fn value(name: &str, v: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(v.into()),
            value_from: None,
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(source),
        }
    }

    fn field(path: &str) -> EnvVarSource {
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn env_resolves_values_fields_secrets_and_config_maps() {
        let container = Container {
            name: "main".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "settings".into(),
                    optional: None,
                }),
                prefix: Some("CM_".into()),
                secret_ref: None,
            }]),
            env: Some(vec![
                value("GREETING", "hello"),
                value("MSG", "$(GREETING) from $(POD_NAME)"),
                from("POD_NAME", field("metadata.name")),
                from("POD_NS", field("metadata.namespace")),
                from("POD_UID", field("metadata.uid")),
                from("NODE", field("spec.nodeName")),
                from("SA", field("spec.serviceAccountName")),
                from("IP", field("status.podIP")),
                from("APP", field("metadata.labels['app']")),
                value("MSG2", "$(GREETING) from $(POD_NAME)"),
                from(
                    "PASSWORD",
                    EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "creds".into(),
                            key: "password".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    },
                ),
                from(
                    "MODE",
                    EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "settings".into(),
                            key: "mode".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    },
                ),
                from(
                    "OPTIONAL",
                    EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "absent".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    },
                ),
                value("WORK", "/azp/_work/x"),
            ]),
            ..Default::default()
        };
        let refs = references(&container);
        assert_eq!(
            refs.secrets,
            ["absent".to_owned(), "creds".to_owned()].into()
        );
        assert_eq!(refs.config_maps, ["settings".to_owned()].into());

        let mut fetched = Fetched::default();
        fetched.secrets.insert(
            "creds".into(),
            Some(Secret {
                data: Some([("password".to_owned(), ByteString(b"s3cret".to_vec()))].into()),
                ..Default::default()
            }),
        );
        fetched.secrets.insert("absent".into(), None);
        fetched.config_maps.insert(
            "settings".into(),
            Some(ConfigMap {
                data: Some([("mode".to_owned(), "fast".to_owned())].into()),
                ..Default::default()
            }),
        );
        let mut vars = EnvVars::default();
        vars.set("PATH", "/bin");
        let rewrite = |s: &str| s.replace("/azp/_work", "/local/pod/volumes/work");
        apply_container_env(
            &mut vars,
            &pod(),
            &container,
            &placement(),
            &fetched,
            &rewrite,
        )
        .expect("env resolves");

        assert_eq!(vars.get("CM_mode"), Some("fast"));
        // $(POD_NAME) is defined only after MSG: it stays literal there, as in Kubernetes.
        assert_eq!(vars.get("MSG"), Some("hello from $(POD_NAME)"));
        assert_eq!(vars.get("MSG2"), Some("hello from p1"));
        assert_eq!(vars.get("POD_NS"), Some("ns1"));
        assert_eq!(vars.get("POD_UID"), Some("u-1"));
        assert_eq!(vars.get("NODE"), Some("node-a"));
        assert_eq!(vars.get("SA"), Some("builder"));
        assert_eq!(vars.get("IP"), Some("127.0.0.1"));
        assert_eq!(vars.get("APP"), Some("web"));
        assert_eq!(vars.get("PASSWORD"), Some("s3cret"));
        assert_eq!(vars.get("MODE"), Some("fast"));
        assert_eq!(vars.get("OPTIONAL"), None);
        assert_eq!(vars.get("WORK"), Some("/local/pod/volumes/work/x"));
    }

    #[test]
    fn missing_required_secret_names_the_variable_and_the_secret() {
        let container = Container {
            name: "main".into(),
            env: Some(vec![from(
                "TOKEN",
                EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "nope".into(),
                        key: "token".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
            )]),
            ..Default::default()
        };
        let mut fetched = Fetched::default();
        fetched.secrets.insert("nope".into(), None);
        let err = apply_container_env(
            &mut EnvVars::default(),
            &pod(),
            &container,
            &placement(),
            &fetched,
            &|s: &str| s.to_owned(),
        )
        .expect_err("a missing secret is an error");
        let msg = err.to_string();
        assert!(
            msg.contains("TOKEN") && msg.contains("nope") && msg.contains("ns1/p1"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_field_path_is_rejected() {
        let err = field_ref(&pod(), &placement(), "spec.bogus").expect_err("unknown field");
        assert!(err.contains("spec.bogus"));
    }
}
