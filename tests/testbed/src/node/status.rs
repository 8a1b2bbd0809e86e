//! Pod and Node status documents as the kubelet writes them (strategic-merge patches for `/status`).

use jiff::Timestamp;
use serde_json::{Value, json};

/// RFC 3339 with whole seconds, as `metav1.Time` is written.
pub fn time(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// RFC 3339 with microseconds, as `metav1.MicroTime` is written.
pub fn micro_time(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// What the main container is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    /// Not started: `reason` is e.g. `ContainerCreating` or `CreateContainerConfigError`.
    Waiting { reason: String, message: String },
    /// Running since `started_at`.
    Running { started_at: Timestamp },
    /// Finished.
    Terminated(Termination),
}

/// How the main container ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `OOMKilled`, `StartError`, `DeadlineExceeded`, ...
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
}

impl Termination {
    /// The usual reason for an exit code: `Completed` for 0, `Error` otherwise.
    pub fn reason_for(exit_code: i32) -> &'static str {
        if exit_code == 0 { "Completed" } else { "Error" }
    }
}

/// Everything needed to write the status of a pod whose main container is `container`.
#[derive(Clone, Debug)]
pub struct PodStatusInput<'a> {
    pub container: &'a str,
    pub image: &'a str,
    /// Names of the pod's other containers (reported as not run by the harness).
    pub other_containers: Vec<&'a str>,
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
    pub start_time: Timestamp,
    pub now: Timestamp,
    pub pid: Option<i32>,
    pub restart_count: i32,
    pub last_termination: Option<&'a Termination>,
    pub state: &'a ContainerState,
    /// Phase once the container terminated for good (`Succeeded`/`Failed`); `None` while it may restart.
    pub terminal_phase: Option<&'a str>,
    /// Pod-level reason and message (e.g. `DeadlineExceeded`), for terminal phases.
    pub pod_reason: Option<&'a str>,
}

fn condition(kind: &str, ok: bool, now: &str, reason: Option<&str>) -> Value {
    let mut c = json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastTransitionTime": now, "lastProbeTime": null});
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    c
}

fn state_json(state: &ContainerState) -> Value {
    match state {
        ContainerState::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        ContainerState::Running { started_at } => {
            json!({"running": {"startedAt": time(*started_at)}})
        }
        ContainerState::Terminated(t) => {
            let mut v = json!({
                "exitCode": t.exit_code,
                "reason": t.reason,
                "finishedAt": time(t.finished_at),
            });
            if let Some(s) = t.started_at {
                v["startedAt"] = json!(time(s));
            }
            if let Some(sig) = t.signal {
                v["signal"] = json!(sig);
            }
            if let Some(m) = &t.message {
                v["message"] = json!(m);
            }
            json!({"terminated": v})
        }
    }
}

/// The pod's `status` (a strategic-merge patch body for the `/status` subresource).
pub fn pod_status(input: &PodStatusInput<'_>) -> Value {
    let now = time(input.now);
    let running = matches!(input.state, ContainerState::Running { .. });
    let phase = match (input.terminal_phase, input.state) {
        (Some(p), _) => p,
        (None, ContainerState::Running { .. }) => "Running",
        (None, ContainerState::Terminated(_)) => "Running",
        (None, ContainerState::Waiting { .. }) => "Pending",
    };
    let ready_reason = if input.terminal_phase.is_some() {
        Some("PodCompleted")
    } else if running {
        None
    } else {
        Some("ContainersNotReady")
    };
    let sandbox = input.terminal_phase.is_none();
    let mut main = json!({
        "name": input.container,
        "image": input.image,
        "imageID": format!("testbed://{}", input.image),
        "ready": running,
        "started": running,
        "restartCount": input.restart_count,
        "state": state_json(input.state),
    });
    if let Some(pid) = input.pid {
        main["containerID"] = json!(format!("testbed://{pid}"));
    }
    if let Some(t) = input.last_termination {
        main["lastState"] = state_json(&ContainerState::Terminated(t.clone()));
    }
    let mut statuses = vec![main];
    for other in &input.other_containers {
        statuses.push(json!({
            "name": other,
            "image": "",
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": 0,
            "state": {"waiting": {"reason": "NotRunByNodeHarness", "message": "the node harness runs only the main container"}},
        }));
    }
    let mut status = json!({
        "phase": phase,
        "startTime": time(input.start_time),
        "hostIP": input.host_ip,
        "hostIPs": [{"ip": input.host_ip}],
        "podIP": input.pod_ip,
        "podIPs": [{"ip": input.pod_ip}],
        "conditions": [
            condition("PodReadyToStartContainers", sandbox, &now, None),
            condition("Initialized", true, &now, None),
            condition("ContainersReady", running, &now, ready_reason),
            condition("Ready", running, &now, ready_reason),
        ],
        "containerStatuses": statuses,
    });
    if let Some(r) = input.pod_reason {
        status["reason"] = json!(r);
    }
    json!({ "status": status })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(state: &'a ContainerState, phase: Option<&'a str>) -> PodStatusInput<'a> {
        PodStatusInput {
            container: "main",
            image: "img:1",
            other_containers: vec![],
            pod_ip: "127.0.0.1",
            host_ip: "127.0.0.1",
            start_time: Timestamp::UNIX_EPOCH,
            now: Timestamp::UNIX_EPOCH,
            pid: Some(42),
            restart_count: 0,
            last_termination: None,
            state,
            terminal_phase: phase,
            pod_reason: None,
        }
    }

    #[test]
    fn running_pod_is_ready_with_a_running_container() {
        let state = ContainerState::Running {
            started_at: Timestamp::UNIX_EPOCH,
        };
        let v = pod_status(&input(&state, None));
        assert_eq!(v["status"]["phase"], "Running");
        assert_eq!(v["status"]["startTime"], "1970-01-01T00:00:00Z");
        assert_eq!(v["status"]["containerStatuses"][0]["ready"], true);
        assert_eq!(
            v["status"]["containerStatuses"][0]["containerID"],
            "testbed://42"
        );
        assert!(v["status"]["containerStatuses"][0]["state"]["running"]["startedAt"].is_string());
        let ready = v["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
        assert_eq!(ready.map(|c| c["status"].clone()), Some(json!("True")));
    }

    #[test]
    fn terminated_pod_carries_exit_code_and_reason() {
        let state = ContainerState::Terminated(Termination {
            exit_code: 137,
            signal: Some(9),
            reason: "OOMKilled".into(),
            message: None,
            started_at: Some(Timestamp::UNIX_EPOCH),
            finished_at: Timestamp::UNIX_EPOCH,
        });
        let v = pod_status(&input(&state, Some("Failed")));
        assert_eq!(v["status"]["phase"], "Failed");
        let t = &v["status"]["containerStatuses"][0]["state"]["terminated"];
        assert_eq!(t["exitCode"], 137);
        assert_eq!(t["reason"], "OOMKilled");
        assert_eq!(t["signal"], 9);
        let ready = v["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
        assert_eq!(ready.map(|c| c["status"].clone()), Some(json!("False")));
    }

    #[test]
    fn micro_time_has_six_digits() {
        assert_eq!(
            micro_time(Timestamp::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
    }
}
