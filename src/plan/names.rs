//! Deterministic agent Job names.
//!
//! The same snapshot always yields the same names, so a second controller (or a restarted one)
//! planning the same thing creates the same Job and gets `409 AlreadyExists` instead of a
//! duplicate. Names are DNS labels of at most [`MAX_JOB_NAME_LEN`] characters, so the Job's pods
//! (the Job controller appends `-xxxxx`) stay within the 63-character label limit:
//!
//! - for a request: `<agentpool>-<requestId>-<attempt>`, e.g. `linux-4711-1`;
//! - for a standby (`minIdle`) agent: `<agentpool>-standby-<n>`, `n` the smallest number no Job in
//!   the snapshot uses yet.
//!
//! `<agentpool>` is the AgentPool's name with anything that is not `[a-z0-9-]` replaced by `-`.
//! When it does not fit it is cut and followed by 8 hex digits of a fixed hash (FNV-1a, 32 bit) of
//! the full name, so two long names sharing a prefix still differ. Both forms parse back
//! unambiguously from the end, so a request Job can never carry a standby's name or another
//! request's.

/// Longest Job name we generate (63 − the 6 characters `-xxxxx` the Job controller adds to pods,
/// − 5 spare for controllers that add longer suffixes).
pub const MAX_JOB_NAME_LEN: usize = 52;

/// The Job name for the `attempt`-th agent created for request `request_id` in an AgentPool.
pub fn request_job_name(agent_pool_name: &str, request_id: i64, attempt: u32) -> String {
    // ADO ids are positive; should one ever not be, its sign becomes an `n` (a DNS label has no `-`
    // at either end, and `--` would read as two separators).
    let id = if request_id < 0 {
        format!("n{}", request_id.unsigned_abs())
    } else {
        request_id.to_string()
    };
    with_prefix(agent_pool_name, &format!("-{id}-{attempt}"))
}

/// The Job name of standby agent number `n` of an AgentPool.
pub fn standby_job_name(agent_pool_name: &str, n: u32) -> String {
    with_prefix(agent_pool_name, &format!("-standby-{n}"))
}

fn with_prefix(agent_pool_name: &str, suffix: &str) -> String {
    let clean = sanitize(agent_pool_name);
    let budget = MAX_JOB_NAME_LEN.saturating_sub(suffix.len());
    let prefix = if clean.len() <= budget {
        clean
    } else {
        let hash = format!("{:08x}", fnv1a32(agent_pool_name.as_bytes()));
        let keep = budget.saturating_sub(hash.len() + 1);
        let head = clean[..keep].trim_end_matches('-');
        if head.is_empty() {
            hash
        } else {
            format!("{head}-{hash}")
        }
    };
    format!("{prefix}{suffix}")
}

/// Lower-case `[a-z0-9-]`, no leading or trailing `-`, never empty.
fn sanitize(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() {
        "agent".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// FNV-1a, 32 bit: tiny, stable across Rust versions and platforms (unlike `DefaultHasher`).
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_dns_label(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    }

    #[test]
    fn short_names_are_readable() {
        assert_eq!(request_job_name("linux", 4711, 1), "linux-4711-1");
        assert_eq!(request_job_name("linux", 4711, 2), "linux-4711-2");
        assert_eq!(standby_job_name("linux", 0), "linux-standby-0");
        assert_eq!(
            request_job_name("Build.Agents_x64", 7, 1),
            "build-agents-x64-7-1"
        );
    }

    #[test]
    fn names_fit_and_stay_distinct_when_long() {
        let long_a = format!("{}-a", "x".repeat(250));
        let long_b = format!("{}-b", "x".repeat(250));
        for (pool, id, attempt) in [
            (long_a.as_str(), i64::MAX, u32::MAX),
            (long_a.as_str(), 1, 1),
            (long_b.as_str(), 1, 1),
            ("...", 1, 1),
            ("-", 42, 3),
        ] {
            let name = request_job_name(pool, id, attempt);
            assert!(name.len() <= MAX_JOB_NAME_LEN, "{name} is too long");
            assert!(is_dns_label(&name), "{name} is not a DNS label");
            assert!(name.ends_with(&format!("-{id}-{attempt}")), "{name}");
            assert_ne!(
                name,
                request_job_name(pool, -id, attempt),
                "the sign is kept"
            );
            let standby = standby_job_name(pool, attempt);
            assert!(
                standby.len() <= MAX_JOB_NAME_LEN && is_dns_label(&standby),
                "{standby}"
            );
        }
        assert_ne!(
            request_job_name(&long_a, 1, 1),
            request_job_name(&long_b, 1, 1)
        );
    }

    #[test]
    fn names_are_stable() {
        // Pinned: changing the scheme would let a new controller version duplicate the Jobs of
        // the previous one during an upgrade.
        let long = "a".repeat(60);
        assert_eq!(
            request_job_name(&long, 123, 1),
            format!("{}-{:08x}-123-1", "a".repeat(37), fnv1a32(long.as_bytes()))
        );
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
    }

    #[test]
    fn request_and_standby_names_never_collide() {
        // An AgentPool named like another's standby prefix still gets different names.
        assert_ne!(
            request_job_name("a-standby", 5, 1),
            standby_job_name("a", 5)
        );
        assert_ne!(request_job_name("a", 1, 2), request_job_name("a-1", 2, 1));
    }
}
