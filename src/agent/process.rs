//! Child processes of the entrypoint: spawned with a clean environment in their own process group, their
//! output forwarded line by line (with known secrets masked) and optionally watched for the listener's
//! job markers; signals forwarded; stragglers killed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::exit::JobResult;

/// Secrets that must never be forwarded verbatim from a child's output.
#[derive(Clone, Default)]
pub struct Redactor(Arc<Mutex<Vec<String>>>);

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor(..)")
    }
}

impl Redactor {
    /// Adds a secret (ignored when shorter than 8 characters: masking those would mangle ordinary text).
    pub fn add(&self, secret: &str) {
        if secret.len() < 8 {
            return;
        }
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !all.iter().any(|s| s == secret) {
            all.push(secret.to_owned());
        }
    }

    /// `line` with every known secret replaced by `***`.
    pub fn mask(&self, line: &str) -> String {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = line.to_owned();
        for s in all.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

/// What the listener said about its job on its console (the official agent's `RunningJob` and
/// `JobCompleted` messages: `… Running job: <name>`, `… Job <name> completed with result: <Result>`).
#[derive(Debug, Default)]
pub struct JobWatch {
    state: Mutex<(bool, Option<JobResult>)>,
}

const RUNNING_MARKER: &str = "Running job: ";
const RESULT_MARKER: &str = " completed with result: ";

impl JobWatch {
    /// Looks at one line of the listener's standard output.
    pub fn observe(&self, line: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if line.contains(RUNNING_MARKER) {
            st.0 = true;
        }
        if let Some(idx) = line.find(RESULT_MARKER) {
            st.0 = true;
            st.1 = Some(JobResult::parse(&line[idx + RESULT_MARKER.len()..]));
        }
    }

    /// Whether a job started.
    pub fn job_started(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// The job's result, once printed.
    pub fn result(&self) -> Option<JobResult> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

/// A running child.
pub struct Running {
    child: Child,
    pid: Option<Pid>,
    pumps: Vec<JoinHandle<()>>,
}

/// Tail of a child's output kept for error messages (already masked).
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<Vec<String>>>);

impl Tail {
    const KEEP: usize = 20;

    fn push(&self, line: String) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() == Self::KEEP {
            v.remove(0);
        }
        v.push(line);
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How to run one child.
pub struct Spec<'a> {
    /// Program path.
    pub program: &'a Path,
    /// Arguments (never a secret).
    pub args: &'a [&'a str],
    /// The complete environment.
    pub env: &'a BTreeMap<OsString, OsString>,
    /// Working directory.
    pub cwd: &'a Path,
    /// Secrets to mask in forwarded output.
    pub redactor: &'a Redactor,
    /// Watches standard output for job markers.
    pub watch: Option<Arc<JobWatch>>,
    /// Keeps the last lines of output.
    pub tail: Tail,
}

fn pump<R, W>(
    reader: R,
    mut writer: W,
    redactor: Redactor,
    watch: Option<Arc<JobWatch>>,
    tail: Tail,
) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::with_capacity(256);
        loop {
            buf.clear();
            // Bytes, not `lines()`: a line that is not UTF-8 must not stop the reading (the child would
            // then block on a full pipe); it is forwarded lossily.
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let line = text.trim_end_matches(['\n', '\r']);
                    if let Some(w) = &watch {
                        w.observe(line);
                    }
                    let masked = redactor.mask(line);
                    // Output that cannot be written (closed pipe) is dropped; the child must not block on us.
                    let _ = writer.write_all(masked.as_bytes()).await;
                    let _ = writer.write_all(b"\n").await;
                    let _ = writer.flush().await;
                    tail.push(masked);
                }
                Err(_) => break,
            }
        }
    })
}

impl Running {
    /// Spawns `spec` in a new process group with exactly `spec.env`.
    pub fn spawn(spec: Spec<'_>) -> std::io::Result<Running> {
        let mut cmd = Command::new(spec.program);
        cmd.args(spec.args)
            .env_clear()
            .envs(spec.env)
            .current_dir(spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(
                out,
                tokio::io::stdout(),
                spec.redactor.clone(),
                spec.watch.clone(),
                spec.tail.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(
                err,
                tokio::io::stderr(),
                spec.redactor.clone(),
                None,
                spec.tail.clone(),
            ));
        }
        Ok(Running { child, pid, pumps })
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> Option<Pid> {
        self.pid
    }

    /// Sends `signal` to the child itself (not its group: the listener cancels its worker and steps).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid {
            let _ = kill(pid, signal);
        }
    }

    /// Waits for the child to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// After the child exited (or to give up on it): kills whatever is left of its process group, then
    /// waits briefly for the output to drain.
    pub async fn finish(mut self) -> Option<ExitStatus> {
        if let Some(pid) = self.pid {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        let status = self.child.wait().await.ok();
        for p in self.pumps.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
        }
        status
    }
}

/// "exit code 2" / "killed by signal 9", for messages.
pub fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "unknown status".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_forwarded_masked_and_watched_even_when_not_utf8() {
        let redactor = Redactor::default();
        redactor.add("secret-token-123");
        let watch = Arc::new(JobWatch::default());
        let tail = Tail::default();
        let input: &[u8] =
            b"bad \xff byte\nuses secret-token-123\r\n2026: Job Build completed with result: Succeeded";
        let (mut w, r) = tokio::io::duplex(1024);
        let (out_w, mut out_r) = tokio::io::duplex(1024);
        let pumping = pump(r, out_w, redactor, Some(watch.clone()), tail.clone());
        w.write_all(input).await.unwrap();
        drop(w);
        pumping.await.unwrap();
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut out_r, &mut out)
            .await
            .unwrap();
        assert_eq!(
            out,
            "bad \u{fffd} byte\nuses ***\n2026: Job Build completed with result: Succeeded\n"
        );
        assert_eq!(watch.result(), Some(JobResult::Succeeded));
        assert_eq!(tail.lines().len(), 3);
    }

    #[test]
    fn redactor_masks_known_secrets_only() {
        let r = Redactor::default();
        r.add("short");
        r.add("eyJhbGciOiJSUzI1NiJ9.payload.sig");
        assert_eq!(
            r.mask("token eyJhbGciOiJSUzI1NiJ9.payload.sig used; short stays"),
            "token *** used; short stays"
        );
    }

    #[test]
    fn job_watch_reads_the_listener_console() {
        let w = JobWatch::default();
        w.observe("2026-11-26 13:00:00Z: Listening for Jobs");
        assert!(!w.job_started());
        w.observe("2026-11-26 13:00:01Z: Running job: Build");
        assert!(w.job_started());
        assert_eq!(w.result(), None);
        w.observe("2026-11-26 13:00:09Z: Job Build completed with result: Failed");
        assert_eq!(w.result(), Some(JobResult::Failed));
    }
}
