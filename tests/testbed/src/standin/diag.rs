//! A `_diag`-like record of what the stand-in did, one JSON object per line, for tests to assert on
//! (the real agent writes `_diag/Agent_*.log` text traces). Never holds tokens.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Path of the event log, relative to the agent root.
pub const DIAG_EVENTS_FILE: &str = "_diag/standin-events.jsonl";

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagEvent {
    /// Unix time in milliseconds.
    pub ts_ms: i64,
    pub pid: u32,
    /// E.g. `configured`, `session_created`, `job_received`, `job_finished`, `signal`, `exit`.
    pub event: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// Appends an event (best effort: a diagnostics failure never fails the agent) and prints a trace line.
pub fn event(root: &Path, event: &str, data: serde_json::Value) {
    let record = DiagEvent {
        ts_ms: jiff::Timestamp::now().as_millisecond(),
        pid: std::process::id(),
        event: event.to_string(),
        data,
    };
    let Ok(line) = serde_json::to_string(&record) else {
        return;
    };
    println!("[standin] {line}");
    let path = root.join(DIAG_EVENTS_FILE);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// All events recorded in the agent folder `root`, oldest first (empty when there are none).
pub fn read_events(root: &Path) -> Vec<DiagEvent> {
    std::fs::read_to_string(root.join(DIAG_EVENTS_FILE))
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}
