//! A container's main process: executable lookup, spawning, signals.
//!
//! Each main process starts a new session (`setsid`), which stands in for the container's cgroup: every
//! process it starts stays in that session even when it makes its own process group (as the agent
//! entrypoint does for the listener), so tearing the "container" down (SIGKILL) reaches all of them.
//! The stop signal (SIGTERM) goes, as with a real container runtime, to the main process only — unless
//! [`StopSignalTarget::ProcessGroup`] is configured.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::NodeError;
use super::volumes::MountTable;

/// Who gets the stop signal (SIGTERM) when a pod is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopSignalTarget {
    /// The main process only, as a container runtime signals a container's PID 1 (a wrapper script that
    /// does not forward SIGTERM keeps its children from seeing it — as in Kubernetes).
    #[default]
    MainProcess,
    /// The main process's whole process group.
    ProcessGroup,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

/// A running main process, leader of its own process group.
#[derive(Debug)]
pub struct Running {
    child: tokio::process::Child,
    pgid: Pid,
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the executable for `command` (a container's `command[0]`):
/// a name without `/` is searched in `path_prefix`, then in `env_path` (the container's `PATH`);
/// an absolute path under a volume mount is mapped to the pod folder; an absolute path that exists on this
/// machine is used as is; otherwise its file name is searched in `path_prefix` (an image's
/// `/usr/local/bin/azp-autoscaler` runs the one from the cargo target folder); a relative path with `/` is
/// relative to `cwd`.
pub fn resolve_program(
    command: &str,
    path_prefix: &[PathBuf],
    env_path: Option<&str>,
    mounts: &MountTable,
    cwd: &Path,
) -> Result<PathBuf, String> {
    let search = |name: &str| -> Option<PathBuf> {
        path_prefix
            .iter()
            .cloned()
            .chain(env_path.into_iter().flat_map(std::env::split_paths))
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    };
    if command.is_empty() {
        return Err(
            "the container has no command (and no image entrypoint is configured for its image)"
                .into(),
        );
    }
    if !command.contains('/') {
        return search(command).ok_or_else(|| {
            format!(
                "executable {command:?} not found in the node's PATH prefix {path_prefix:?} nor in the container's PATH"
            )
        });
    }
    if command.starts_with('/') {
        if let Some(local) = mounts.map_path(command)
            && is_executable(&local)
        {
            return Ok(local);
        }
        let p = PathBuf::from(command);
        if is_executable(&p) {
            return Ok(p);
        }
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let from_prefix = path_prefix
            .iter()
            .map(|d| d.join(&name))
            .find(|p| is_executable(p));
        return from_prefix.ok_or_else(|| {
            format!("executable {command:?} does not exist here and {name:?} is not in the node's PATH prefix {path_prefix:?}")
        });
    }
    let p = cwd.join(command);
    if is_executable(&p) {
        Ok(p)
    } else {
        Err(format!(
            "executable {command:?} not found relative to the working directory {}",
            cwd.display()
        ))
    }
}

impl Running {
    /// Starts `spec` in a new process group with exactly `spec.env`, stdin closed, output appended to the
    /// log files.
    pub fn spawn(spec: &ProcessSpec) -> Result<Self, NodeError> {
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| NodeError::Io {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let stdout = open(&spec.stdout)?;
        let stderr = open(&spec.stderr)?;
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        // SAFETY: `setsid` is async-signal-safe and touches no memory of the parent; it runs in the forked
        // child before exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|source| NodeError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| NodeError::Spawn {
            program: spec.program.clone(),
            source: std::io::Error::other("the process exited before its id was read"),
        })?;
        let pgid = Pid::from_raw(i32::try_from(pid).map_err(|_| NodeError::Spawn {
            program: spec.program.clone(),
            source: std::io::Error::other("process id out of range"),
        })?);
        Ok(Self { child, pgid })
    }

    /// The process id (also the process group id).
    pub fn pid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Sends `signal` to the whole process group (as the container runtime does to a container).
    /// A group that is already gone is not an error.
    pub fn signal(&self, signal: Signal) {
        signal_group(self.pgid.as_raw(), signal);
    }

    /// Sends the stop signal (SIGTERM) to `target`.
    pub fn stop(&self, target: StopSignalTarget) {
        match target {
            StopSignalTarget::MainProcess => {
                let _ = nix::sys::signal::kill(self.pgid, Signal::SIGTERM);
            }
            StopSignalTarget::ProcessGroup => self.signal(Signal::SIGTERM),
        }
    }

    /// SIGKILL to every process of the container (its session).
    pub fn kill_all(&self) {
        kill_session(self.pgid.as_raw());
    }

    /// Waits for the main process to exit; then kills what is left of the container (its session), as
    /// tearing the container down would.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.kill_all();
        status
    }
}

/// Sends `signal` to process group `pgid`, ignoring a group that no longer exists.
pub fn signal_group(pgid: i32, signal: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// The processes of session `sid` (from `/proc/<pid>/stat`).
pub fn session_members(sid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| session_of_stat(&stat))
                == Some(sid)
        })
        .collect()
}

/// The session id field of a `/proc/<pid>/stat` line (the command may contain spaces and parentheses).
fn session_of_stat(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // state ppid pgrp session ...
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// SIGKILL to every process of session `sid` (repeated while a process forks meanwhile).
pub fn kill_session(sid: i32) {
    if sid <= 1 {
        return;
    }
    signal_group(sid, Signal::SIGKILL);
    for _ in 0..5 {
        let members = session_members(sid);
        if members.is_empty() {
            return;
        }
        for pid in members {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A container-style exit code: the process's code, or 128 + the signal that ended it.
pub fn exit_code(status: &ExitStatus) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(sig)) => (128 + sig, Some(sig)),
        (None, None) => (255, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_searched_in_the_prefix_first() {
        let sh = resolve_program(
            "sh",
            &[],
            Some("/bin:/usr/bin"),
            &MountTable::default(),
            Path::new("/"),
        )
        .expect("sh is on every unix");
        assert!(sh.ends_with("sh"));
        let err = resolve_program(
            "no-such-binary-xyz",
            &[],
            Some("/bin"),
            &MountTable::default(),
            Path::new("/"),
        )
        .expect_err("missing");
        assert!(err.contains("no-such-binary-xyz"));
    }

    #[test]
    fn absolute_image_paths_fall_back_to_the_prefix_by_file_name() {
        let sh = resolve_program("/bin/sh", &[], None, &MountTable::default(), Path::new("/"))
            .expect("exists");
        assert_eq!(sh, PathBuf::from("/bin/sh"));
        let bin_dir = PathBuf::from("/bin");
        let found = resolve_program(
            "/image/only/sh",
            std::slice::from_ref(&bin_dir),
            None,
            &MountTable::default(),
            Path::new("/"),
        )
        .expect("found by file name");
        assert_eq!(found, bin_dir.join("sh"));
    }

    #[test]
    fn session_is_read_from_proc_stat() {
        assert_eq!(session_of_stat("42 (a b) c)) S 1 42 42 0 -1"), Some(42));
        assert_eq!(session_of_stat("garbage"), None);
    }

    #[test]
    fn empty_command_explains_the_fix() {
        let err = resolve_program("", &[], None, &MountTable::default(), Path::new("/"))
            .expect_err("empty");
        assert!(err.contains("entrypoint"));
    }
}
