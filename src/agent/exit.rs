//! The exit codes of `azp-autoscaler agent`, and how one is chosen.
//!
//! The table is part of the public contract: the Kubernetes Job's status, alerts and `podFailurePolicy`
//! rules read these numbers. Never renumber a variant; add new ones.

use std::fmt;

/// What the entrypoint tells Kubernetes when it exits.
///
/// | code | variant | meaning |
/// |---:|---|---|
/// | 0 | [`Exit::Success`] | the agent ran its job (or was told to stop, or was removed by the controller, before taking one) and is gone from the pool |
/// | 10 | [`Exit::Config`] | a setting is missing or malformed (the message lists every one), or the CA bundle of `SSL_CERT_FILE` / `SSL_CERT_DIR` is unusable; nothing was registered |
/// | 11 | [`Exit::Token`] | no Entra token / PAT for Azure DevOps (workload identity not set up, token file unreadable, federated credential rejected, identity not in the organization) |
/// | 12 | [`Exit::Registration`] | `config.sh` could not register the agent (pool missing, no pool permission, `config.sh` exit 1, or exit 2 until the retry budget ran out) |
/// | 13 | [`Exit::Agent`] | the listener could not start, crashed, or stopped with a non-zero code on its own |
/// | 14 | [`Exit::Interrupted`] | SIGTERM/SIGINT arrived while a job ran: the job was cancelled |
/// | 15 | [`Exit::Deregistration`] | the run itself was fine but the agent could not be removed from the pool (the controller's cleanup removes it later) |
/// | 20 | [`Exit::JobFailed`] | only with `--exit-with-job-result`: the pipeline job's result was `Failed` |
/// | 21 | [`Exit::JobCanceled`] | only with `--exit-with-job-result`: the pipeline job's result was `Canceled` |
/// | 22 | [`Exit::JobOther`] | only with `--exit-with-job-result`: the job ran but its result is `Abandoned`, `Skipped`, or unknown |
///
/// When several apply, the first in this order wins: 10, 11, 12 (nothing ran), then 13, 14, 15, then the
/// job result. A left-behind agent (15) therefore always shows, even when the pipeline job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exit {
    /// 0: done, and the agent is gone from the pool.
    Success,
    /// 10: settings missing or malformed.
    Config,
    /// 11: no token for Azure DevOps.
    Token,
    /// 12: registration failed.
    Registration,
    /// 13: the agent (listener) failed.
    Agent,
    /// 14: terminated while a job ran; the job was cancelled.
    Interrupted,
    /// 15: the agent could not be deregistered.
    Deregistration,
    /// 20: pipeline job result `Failed` (opt-in).
    JobFailed,
    /// 21: pipeline job result `Canceled` (opt-in).
    JobCanceled,
    /// 22: pipeline job result other or unknown (opt-in).
    JobOther,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Config => 10,
            Exit::Token => 11,
            Exit::Registration => 12,
            Exit::Agent => 13,
            Exit::Interrupted => 14,
            Exit::Deregistration => 15,
            Exit::JobFailed => 20,
            Exit::JobCanceled => 21,
            Exit::JobOther => 22,
        }
    }

    /// A stable, low-cardinality label (logs, metrics).
    pub fn label(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Config => "config",
            Exit::Token => "token",
            Exit::Registration => "registration",
            Exit::Agent => "agent",
            Exit::Interrupted => "interrupted",
            Exit::Deregistration => "deregistration",
            Exit::JobFailed => "job_failed",
            Exit::JobCanceled => "job_canceled",
            Exit::JobOther => "job_other",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.label())
    }
}

/// The pipeline job's result as the listener prints it (`… Job <name> completed with result: <Result>`):
/// the names of the agent's `TaskResult` enum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// `Succeeded`.
    Succeeded,
    /// `SucceededWithIssues` (counts as success).
    SucceededWithIssues,
    /// `Failed`.
    Failed,
    /// `Canceled`.
    Canceled,
    /// `Skipped`.
    Skipped,
    /// `Abandoned`.
    Abandoned,
    /// Anything else, verbatim.
    Other(String),
}

impl JobResult {
    /// Parses the listener's spelling (case-insensitive).
    pub fn parse(s: &str) -> JobResult {
        match s.trim().to_ascii_lowercase().as_str() {
            "succeeded" => JobResult::Succeeded,
            "succeededwithissues" => JobResult::SucceededWithIssues,
            "failed" => JobResult::Failed,
            "canceled" | "cancelled" => JobResult::Canceled,
            "skipped" => JobResult::Skipped,
            "abandoned" => JobResult::Abandoned,
            _ => JobResult::Other(s.trim().to_owned()),
        }
    }
}

/// Everything the exit code depends on, gathered along the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The failure that stopped the run before the listener started (10, 11 or 12).
    pub early: Option<Exit>,
    /// The listener failed on its own (could not start, crashed, non-zero exit not caused by us).
    pub agent_failed: bool,
    /// A termination signal arrived.
    pub terminated: bool,
    /// The listener said it started a job.
    pub job_started: bool,
    /// The job's result as the listener printed it.
    pub job_result: Option<JobResult>,
    /// Deregistration was needed and did not succeed.
    pub deregistration_failed: bool,
    /// `--exit-with-job-result` was given.
    pub exit_with_job_result: bool,
}

impl Outcome {
    /// The exit code, by the precedence documented on [`Exit`].
    pub fn exit(&self) -> Exit {
        if let Some(early) = self.early {
            return early;
        }
        if self.agent_failed {
            return Exit::Agent;
        }
        let job_finished = self.job_result.is_some();
        let cancelled_by_us = matches!(self.job_result, Some(JobResult::Canceled) | None);
        if self.terminated && self.job_started && (cancelled_by_us || !job_finished) {
            return Exit::Interrupted;
        }
        if self.deregistration_failed {
            return Exit::Deregistration;
        }
        if self.exit_with_job_result && self.job_started {
            return match &self.job_result {
                Some(JobResult::Succeeded | JobResult::SucceededWithIssues) => Exit::Success,
                Some(JobResult::Failed) => Exit::JobFailed,
                Some(JobResult::Canceled) => Exit::JobCanceled,
                _ => Exit::JobOther,
            };
        }
        Exit::Success
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(result: JobResult) -> Outcome {
        Outcome {
            job_started: true,
            job_result: Some(result),
            ..Outcome::default()
        }
    }

    #[test]
    fn codes_are_distinct_and_stable() {
        let all = [
            Exit::Success,
            Exit::Config,
            Exit::Token,
            Exit::Registration,
            Exit::Agent,
            Exit::Interrupted,
            Exit::Deregistration,
            Exit::JobFailed,
            Exit::JobCanceled,
            Exit::JobOther,
        ];
        let codes: Vec<u8> = all.iter().map(|e| e.code()).collect();
        assert_eq!(codes, vec![0, 10, 11, 12, 13, 14, 15, 20, 21, 22]);
        let labels: std::collections::HashSet<_> = all.iter().map(|e| e.label()).collect();
        assert_eq!(labels.len(), all.len());
    }

    #[test]
    fn job_result_is_ignored_without_the_flag() {
        assert_eq!(ran(JobResult::Failed).exit(), Exit::Success);
    }

    #[test]
    fn job_result_maps_with_the_flag() {
        let cases = [
            (JobResult::Succeeded, Exit::Success),
            (JobResult::SucceededWithIssues, Exit::Success),
            (JobResult::Failed, Exit::JobFailed),
            (JobResult::Canceled, Exit::JobCanceled),
            (JobResult::Abandoned, Exit::JobOther),
            (JobResult::Other("Weird".into()), Exit::JobOther),
        ];
        for (result, want) in cases {
            let outcome = Outcome {
                exit_with_job_result: true,
                ..ran(result.clone())
            };
            assert_eq!(outcome.exit(), want, "{result:?}");
        }
    }

    #[test]
    fn idle_termination_is_success_busy_termination_is_interrupted() {
        let idle = Outcome {
            terminated: true,
            ..Outcome::default()
        };
        assert_eq!(idle.exit(), Exit::Success);
        let busy = Outcome {
            terminated: true,
            job_started: true,
            ..Outcome::default()
        };
        assert_eq!(busy.exit(), Exit::Interrupted);
        let cancelled = Outcome {
            terminated: true,
            ..ran(JobResult::Canceled)
        };
        assert_eq!(cancelled.exit(), Exit::Interrupted);
        // The job had finished on its own just before the signal: not an interruption.
        let finished = Outcome {
            terminated: true,
            ..ran(JobResult::Succeeded)
        };
        assert_eq!(finished.exit(), Exit::Success);
    }

    #[test]
    fn precedence_early_then_agent_then_interrupt_then_deregistration_then_result() {
        let mut o = Outcome {
            early: Some(Exit::Registration),
            agent_failed: true,
            terminated: true,
            job_started: true,
            deregistration_failed: true,
            exit_with_job_result: true,
            job_result: Some(JobResult::Failed),
        };
        assert_eq!(o.exit(), Exit::Registration);
        o.early = None;
        assert_eq!(o.exit(), Exit::Agent);
        o.agent_failed = false;
        o.job_result = None;
        assert_eq!(o.exit(), Exit::Interrupted);
        o.terminated = false;
        assert_eq!(o.exit(), Exit::Deregistration);
        o.deregistration_failed = false;
        o.job_result = Some(JobResult::Failed);
        assert_eq!(o.exit(), Exit::JobFailed);
    }

    #[test]
    fn parses_listener_result_names() {
        assert_eq!(JobResult::parse("Succeeded"), JobResult::Succeeded);
        assert_eq!(JobResult::parse(" failed "), JobResult::Failed);
        assert_eq!(JobResult::parse("Canceled"), JobResult::Canceled);
        assert_eq!(JobResult::parse("X"), JobResult::Other("X".into()));
    }
}
