//! The per-pod folder and how a container's volume mounts map onto it.
//!
//! A process cannot use a container's absolute mount paths, so every pod gets a folder
//! `<work_dir>/<namespace>/<pod>-<uid prefix>/` with:
//!
//! | path | what |
//! |---|---|
//! | `stdout.log`, `stderr.log` | the main container's output (appended across restarts) |
//! | `volumes/<volume>/` | each volume's content: emptyDir (empty folder), secret / configMap / projected / downwardAPI (files written like the kubelet's), hostPath (the host folder itself is used instead) |
//! | `root/` | the container's file system view: each `mountPath` is a symlink `root/<mountPath>` to its volume folder (or `subPath` in it) |
//! | `home/` | `$HOME` of the process |
//!
//! The process learns the mapping three ways: the env var `TESTBED_POD_ROOT` (= `root/`, so
//! `$TESTBED_POD_ROOT/var/run/secrets/...` reads a mount); `command`, `args`, `workingDir` and literal env
//! `value`s that equal a `mountPath` or start with `<mountPath>/` are rewritten to the local folder; and the
//! workload-identity variables point at local files directly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};

use super::NodeError;
use super::env::{Fetched, PodPlacement, config_map_entries, field_ref, secret_entries};

/// The folders of one pod on the local disk.
#[derive(Clone, Debug)]
pub struct PodLayout {
    /// `<work_dir>/<namespace>/<pod>-<uid prefix>`.
    pub dir: PathBuf,
    /// `dir/root`: the container's view, mount paths as symlinks.
    pub root: PathBuf,
    /// `dir/volumes`.
    pub volumes: PathBuf,
    /// `dir/home`.
    pub home: PathBuf,
    /// `dir/stdout.log`.
    pub stdout: PathBuf,
    /// `dir/stderr.log`.
    pub stderr: PathBuf,
}

impl PodLayout {
    /// The layout of pod `name` (uid `uid`) of `namespace` under `work_dir`.
    pub fn new(work_dir: &Path, namespace: &str, name: &str, uid: &str) -> Self {
        let short_uid: String = uid.chars().filter(|c| *c != '-').take(8).collect();
        let dir = work_dir.join(namespace).join(format!("{name}-{short_uid}"));
        Self {
            root: dir.join("root"),
            volumes: dir.join("volumes"),
            home: dir.join("home"),
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
            dir,
        }
    }

    /// The folder of volume `name`.
    pub fn volume(&self, name: &str) -> PathBuf {
        self.volumes.join(name)
    }

    /// Where the in-container absolute `path` lives in `root/`.
    pub fn in_root(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

/// In-container mount paths and the local folders (or files) they stand for.
#[derive(Clone, Debug, Default)]
pub struct MountTable {
    /// `(mountPath without trailing slash, local path)`, longest mount path first.
    entries: Vec<(String, PathBuf)>,
}

impl MountTable {
    /// Adds a mount.
    pub fn add(&mut self, mount_path: &str, local: PathBuf) {
        let mount_path = mount_path.trim_end_matches('/');
        let mount_path = if mount_path.is_empty() {
            "/"
        } else {
            mount_path
        };
        self.entries.retain(|(m, _)| m != mount_path);
        self.entries.push((mount_path.to_owned(), local));
        self.entries
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    }

    /// All mounts, longest mount path first.
    pub fn entries(&self) -> &[(String, PathBuf)] {
        &self.entries
    }

    /// The local path for in-container `path` when it is at or under a mount.
    pub fn map_path(&self, path: &str) -> Option<PathBuf> {
        self.entries.iter().find_map(|(mount, local)| {
            if path == mount {
                Some(local.clone())
            } else if mount == "/" {
                Some(local.join(path.trim_start_matches('/')))
            } else {
                path.strip_prefix(mount.as_str())
                    .and_then(|rest| rest.strip_prefix('/'))
                    .map(|rest| local.join(rest))
            }
        })
    }

    /// `value` with a leading mount path replaced by its local path (only when the whole value is a path at
    /// or under a mount); anything else unchanged.
    pub fn rewrite(&self, value: &str) -> String {
        if !value.starts_with('/') {
            return value.to_owned();
        }
        self.map_path(value)
            .map_or_else(|| value.to_owned(), |p| p.to_string_lossy().into_owned())
    }
}

/// A service-account token the node keeps fresh in a file (projected `serviceAccountToken` sources and the
/// workload-identity token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFile {
    pub service_account: String,
    /// Empty = the API server's own audiences.
    pub audiences: Vec<String>,
    pub expiration_seconds: i64,
    pub path: PathBuf,
    pub mode: u32,
}

/// One file to write into a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeFile {
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
}

/// What a pod's volumes need on disk.
#[derive(Clone, Debug, Default)]
pub struct VolumePlan {
    /// Folders to create (emptyDir and every volume folder).
    pub dirs: Vec<PathBuf>,
    /// Files with content known now (secret, configMap, downwardAPI).
    pub files: Vec<VolumeFile>,
    /// Token files to request and keep fresh.
    pub tokens: Vec<TokenFile>,
    /// Mount paths of the container and their local paths.
    pub mounts: MountTable,
}

/// Names of the Secrets and ConfigMaps the pod's volumes read (with whether each is optional).
pub fn references(pod: &Pod) -> (BTreeMap<String, bool>, BTreeMap<String, bool>) {
    let mut secrets = BTreeMap::new();
    let mut config_maps = BTreeMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        if let Some(s) = &v.secret
            && let Some(name) = &s.secret_name
        {
            secrets.insert(name.clone(), s.optional == Some(true));
        }
        if let Some(c) = &v.config_map {
            config_maps.insert(c.name.clone(), c.optional == Some(true));
        }
        for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(s) = &p.secret {
                secrets.insert(s.name.clone(), s.optional == Some(true));
            }
            if let Some(c) = &p.config_map {
                config_maps.insert(c.name.clone(), c.optional == Some(true));
            }
        }
    }
    (secrets, config_maps)
}

const DEFAULT_MODE: i32 = 0o644;
/// The kubelet's default `expirationSeconds` for projected tokens.
const DEFAULT_TOKEN_EXPIRATION: i64 = 3600;

fn mode_of(mode: Option<i32>, default: Option<i32>) -> u32 {
    u32::try_from(mode.or(default).unwrap_or(DEFAULT_MODE) & 0o777).unwrap_or(0o644)
}

fn key_files(
    dir: &Path,
    entries: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: Option<i32>,
    what: &str,
) -> Result<Vec<VolumeFile>, String> {
    let mut out = Vec::new();
    match items {
        None => {
            for (k, v) in entries {
                out.push(VolumeFile {
                    path: dir.join(k),
                    content: v.clone(),
                    mode: mode_of(None, default_mode),
                });
            }
        }
        Some(items) => {
            for item in items {
                let content = entries
                    .get(&item.key)
                    .ok_or_else(|| format!("{what}: key {:?} not found", item.key))?;
                out.push(VolumeFile {
                    path: dir.join(safe_relative(&item.path)?),
                    content: content.clone(),
                    mode: mode_of(item.mode, default_mode),
                });
            }
        }
    }
    Ok(out)
}

fn safe_relative(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!(
            "path {path:?} must be relative and must not contain '..'"
        ));
    }
    Ok(p.to_path_buf())
}

/// Plans `pod`'s volumes and `container`'s mounts on `layout`. Errors are the kubelet's mount failures
/// (missing Secret/ConfigMap/key that is not optional), retried by the caller.
pub fn plan(
    pod: &Pod,
    container: &Container,
    layout: &PodLayout,
    placement: &PodPlacement,
    fetched: &Fetched,
) -> Result<VolumePlan, NodeError> {
    let key = super::env::pod_key(pod);
    let err = |message: String| NodeError::ContainerConfig {
        pod: key.clone(),
        message,
    };
    let sa = super::env::service_account_name(pod);
    let mut plan = VolumePlan::default();
    let volumes: Vec<&Volume> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .collect();
    let mut local_of: BTreeMap<&str, PathBuf> = BTreeMap::new();
    for v in &volumes {
        let dir = layout.volume(&v.name);
        let what = |kind: &str| format!("volume {:?} ({kind})", v.name);
        if let Some(h) = &v.host_path {
            local_of.insert(&v.name, PathBuf::from(&h.path));
            continue;
        }
        plan.dirs.push(dir.clone());
        local_of.insert(&v.name, dir.clone());
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            match fetched.secrets.get(&name).and_then(Option::as_ref) {
                Some(secret) => plan.files.extend(
                    key_files(
                        &dir,
                        &secret_entries(secret),
                        s.items.as_ref(),
                        s.default_mode,
                        &what("secret"),
                    )
                    .map_err(err)?,
                ),
                None if s.optional == Some(true) => {}
                None => {
                    return Err(err(format!(
                        "{}: secret {name:?} not found",
                        what("secret")
                    )));
                }
            }
        } else if let Some(c) = &v.config_map {
            match fetched.config_maps.get(&c.name).and_then(Option::as_ref) {
                Some(cm) => plan.files.extend(
                    key_files(
                        &dir,
                        &config_map_entries(cm),
                        c.items.as_ref(),
                        c.default_mode,
                        &what("configMap"),
                    )
                    .map_err(err)?,
                ),
                None if c.optional == Some(true) => {}
                None => {
                    return Err(err(format!(
                        "{}: configmap {:?} not found",
                        what("configMap"),
                        c.name
                    )));
                }
            }
        } else if let Some(d) = &v.downward_api {
            for item in d.items.iter().flatten() {
                plan.files
                    .push(downward_file(pod, placement, &dir, item, d.default_mode).map_err(err)?);
            }
        } else if let Some(p) = &v.projected {
            for source in p.sources.iter().flatten() {
                if let Some(s) = &source.secret {
                    match fetched.secrets.get(&s.name).and_then(Option::as_ref) {
                        Some(secret) => plan.files.extend(
                            key_files(
                                &dir,
                                &secret_entries(secret),
                                s.items.as_ref(),
                                p.default_mode,
                                &what("projected"),
                            )
                            .map_err(err)?,
                        ),
                        None if s.optional == Some(true) => {}
                        None => {
                            return Err(err(format!(
                                "{}: secret {:?} not found",
                                what("projected"),
                                s.name
                            )));
                        }
                    }
                }
                if let Some(c) = &source.config_map {
                    match fetched.config_maps.get(&c.name).and_then(Option::as_ref) {
                        Some(cm) => plan.files.extend(
                            key_files(
                                &dir,
                                &config_map_entries(cm),
                                c.items.as_ref(),
                                p.default_mode,
                                &what("projected"),
                            )
                            .map_err(err)?,
                        ),
                        None if c.optional == Some(true) => {}
                        None => {
                            return Err(err(format!(
                                "{}: configmap {:?} not found",
                                what("projected"),
                                c.name
                            )));
                        }
                    }
                }
                if let Some(d) = &source.downward_api {
                    for item in d.items.iter().flatten() {
                        plan.files.push(
                            downward_file(pod, placement, &dir, item, p.default_mode)
                                .map_err(err)?,
                        );
                    }
                }
                if let Some(t) = &source.service_account_token {
                    plan.tokens.push(TokenFile {
                        service_account: sa.clone(),
                        audiences: t
                            .audience
                            .iter()
                            .filter(|a| !a.is_empty())
                            .cloned()
                            .collect(),
                        expiration_seconds: t
                            .expiration_seconds
                            .unwrap_or(DEFAULT_TOKEN_EXPIRATION),
                        path: dir.join(safe_relative(&t.path).map_err(err)?),
                        mode: mode_of(None, p.default_mode.or(Some(0o600))),
                    });
                }
            }
        }
    }
    for m in container.volume_mounts.iter().flatten() {
        let base = local_of.get(m.name.as_str()).ok_or_else(|| {
            err(format!(
                "volumeMount {:?} of container {:?} names no volume of the pod",
                m.name, container.name
            ))
        })?;
        let local = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => base.join(safe_relative(sub).map_err(err)?),
            None => base.clone(),
        };
        plan.mounts.add(&m.mount_path, local);
    }
    Ok(plan)
}

fn downward_file(
    pod: &Pod,
    placement: &PodPlacement,
    dir: &Path,
    item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    default_mode: Option<i32>,
) -> Result<VolumeFile, String> {
    let value = match &item.field_ref {
        Some(f) => field_ref(pod, placement, &f.field_path)?,
        None => {
            return Err(format!(
                "downwardAPI item {:?}: only fieldRef is supported",
                item.path
            ));
        }
    };
    Ok(VolumeFile {
        path: dir.join(safe_relative(&item.path)?),
        content: value.into_bytes(),
        mode: mode_of(item.mode, default_mode),
    })
}

/// Writes `content` to `path` atomically (temporary file + rename), so a reader never sees half a file and
/// a rewritten token is a new file.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), NodeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{file_name}.tmp-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(content).map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Creates the layout, the volume folders and files, and the `root/<mountPath>` symlinks.
pub fn materialize(layout: &PodLayout, plan: &VolumePlan) -> Result<(), NodeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NodeError::Io { path, source }
    };
    for d in [&layout.dir, &layout.root, &layout.volumes, &layout.home] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    for d in &plan.dirs {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    for f in &plan.files {
        write_atomic(&f.path, &f.content, f.mode)?;
    }
    for (mount, local) in plan.mounts.entries() {
        if mount == "/" {
            continue;
        }
        let link = layout.in_root(mount);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        match std::fs::symlink_metadata(&link) {
            Ok(_) => {}
            Err(_) => std::os::unix::fs::symlink(local, &link).map_err(io(&link))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{
        EmptyDirVolumeSource, PodSpec, ProjectedVolumeSource, Secret, SecretVolumeSource,
        ServiceAccountTokenProjection, VolumeMount, VolumeProjection,
    };
    use kube::api::ObjectMeta;

    fn layout() -> PodLayout {
        PodLayout::new(Path::new("/w"), "ns", "p", "0123-4567-89ab")
    }

    #[test]
    fn layout_is_per_namespace_and_pod() {
        let l = layout();
        assert_eq!(l.dir, PathBuf::from("/w/ns/p-01234567"));
        assert_eq!(
            l.in_root("/var/run/x"),
            PathBuf::from("/w/ns/p-01234567/root/var/run/x")
        );
    }

    #[test]
    fn rewrite_maps_only_paths_at_or_under_a_mount() {
        let mut t = MountTable::default();
        t.add("/azp", PathBuf::from("/l/azp"));
        t.add("/azp/_work/", PathBuf::from("/l/work"));
        assert_eq!(t.rewrite("/azp/_work/1"), "/l/work/1");
        assert_eq!(t.rewrite("/azp/_work"), "/l/work");
        assert_eq!(t.rewrite("/azp/config.sh"), "/l/azp/config.sh");
        assert_eq!(t.rewrite("/azpx"), "/azpx");
        assert_eq!(t.rewrite("relative/azp"), "relative/azp");
        assert_eq!(t.rewrite("--work=/azp"), "--work=/azp");
    }

    fn volume(name: &str) -> Volume {
        Volume {
            name: name.into(),
            ..Default::default()
        }
    }

    fn mount(name: &str, path: &str) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            ..Default::default()
        }
    }

    fn placement() -> PodPlacement {
        PodPlacement {
            node_name: "n".into(),
            pod_ip: "127.0.0.1".into(),
            host_ip: "127.0.0.1".into(),
        }
    }

    #[test]
    fn plan_maps_secrets_empty_dirs_and_projected_tokens() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some("agent".into()),
                volumes: Some(vec![
                    Volume {
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..volume("work")
                    },
                    Volume {
                        secret: Some(SecretVolumeSource {
                            secret_name: Some("creds".into()),
                            default_mode: Some(0o400),
                            ..Default::default()
                        }),
                        ..volume("creds")
                    },
                    Volume {
                        projected: Some(ProjectedVolumeSource {
                            sources: Some(vec![VolumeProjection {
                                service_account_token: Some(ServiceAccountTokenProjection {
                                    audience: Some("aud-x".into()),
                                    expiration_seconds: Some(700),
                                    path: "token".into(),
                                }),
                                ..Default::default()
                            }]),
                            default_mode: None,
                        }),
                        ..volume("tok")
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let container = Container {
            name: "main".into(),
            volume_mounts: Some(vec![
                mount("work", "/azp/_work"),
                mount("creds", "/etc/creds"),
                mount("tok", "/var/tok"),
            ]),
            ..Default::default()
        };
        let mut fetched = Fetched::default();
        fetched.secrets.insert(
            "creds".into(),
            Some(Secret {
                data: Some([("pw".to_owned(), ByteString(b"x".to_vec()))].into()),
                ..Default::default()
            }),
        );
        let l = layout();
        let plan = plan(&pod, &container, &l, &placement(), &fetched).expect("plan");
        assert_eq!(
            plan.files,
            vec![VolumeFile {
                path: l.volume("creds").join("pw"),
                content: b"x".to_vec(),
                mode: 0o400
            }]
        );
        assert_eq!(plan.tokens.len(), 1);
        assert_eq!(plan.tokens[0].service_account, "agent");
        assert_eq!(plan.tokens[0].audiences, vec!["aud-x".to_owned()]);
        assert_eq!(plan.tokens[0].expiration_seconds, 700);
        assert_eq!(plan.tokens[0].path, l.volume("tok").join("token"));
        assert_eq!(
            plan.mounts.map_path("/etc/creds/pw"),
            Some(l.volume("creds").join("pw"))
        );
        assert_eq!(
            plan.mounts.rewrite("/azp/_work"),
            l.volume("work").to_string_lossy()
        );
    }

    #[test]
    fn missing_secret_volume_is_an_error_unless_optional() {
        let mut pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                volumes: Some(vec![Volume {
                    secret: Some(SecretVolumeSource {
                        secret_name: Some("gone".into()),
                        ..Default::default()
                    }),
                    ..volume("s")
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let container = Container::default();
        let err = plan(
            &pod,
            &container,
            &layout(),
            &placement(),
            &Fetched::default(),
        )
        .expect_err("missing");
        assert!(err.to_string().contains("gone"), "{err}");
        if let Some(s) = pod
            .spec
            .as_mut()
            .and_then(|s| s.volumes.as_mut())
            .and_then(|v| v[0].secret.as_mut())
        {
            s.optional = Some(true);
        }
        plan(
            &pod,
            &container,
            &layout(),
            &placement(),
            &Fetched::default(),
        )
        .expect("optional secret may be absent");
    }

    #[test]
    fn item_paths_cannot_escape_the_volume() {
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert_eq!(safe_relative("a/b").ok(), Some(PathBuf::from("a/b")));
    }
}
