//! Mutation fuzzing of the service-hook payload parser (stable Rust; no cargo-fuzz). Starting from the
//! documented payload, it feeds byte-level and structural mutations to `hooks::parse` and to the endpoint,
//! and checks that nothing panics, every answer is 202 or a 4xx, and an accepted payload really is a
//! job-state-changed event.
//!
//! `AZP_HOOKS_FUZZ_ITERATIONS` (default 20000) and `AZP_HOOKS_FUZZ_SEED` (default: from the clock, printed
//! on failure) tune a run: `AZP_HOOKS_FUZZ_ITERATIONS=1000000 cargo test --test hooks_fuzz -- --nocapture`.

use std::sync::Arc;

use azp_autoscaler::hooks::{
    self, CredentialSources, Credentials, EVENT_TYPE, Rejection, Settings,
};
use azp_autoscaler::metrics::Metrics;
use serde_json::Value;
use tower::ServiceExt as _;

const SAMPLE: &str = include_str!("hooks_data/job-state-changed.json");

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-0",
    b"1e999",
    b"-1e-999",
    b"18446744073709551616",
    b"\\u0000",
    b"\\ud800",
    b"\\",
    b"\xff",
    b"\xc3",
    b"\"eventType\"",
    b"\"ms.vss-pipelines.job-state-changed-event\"",
    b"\"publisherId\"",
    b"\"resource\"",
    b"\"job\"",
    b"\"state\"",
    b"{\"a\":[",
    b" ",
    b"\n",
    b"\t",
    b"\x00",
];

fn mutate_bytes(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] = rng.next() as u8;
            }
            2 => {
                let token = rng.pick(TOKENS);
                out.splice(at..at, token.iter().copied());
            }
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 => out.truncate(at),
            5 if !out.is_empty() => {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(64)).min(out.len());
                let chunk = out[start..end].to_vec();
                let at = at.min(out.len());
                out.splice(at..at, chunk);
            }
            _ => {
                let i = at.min(out.len());
                out.insert(i, rng.next() as u8);
            }
        }
    }
    out
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => serde_json::json!(rng.next() as i64),
        3 => serde_json::json!(f64::from(rng.next() as u32) / 7.0),
        4 => Value::String(
            rng.pick(&[
                "",
                "waiting",
                "inProgress",
                EVENT_TYPE,
                "pipelines",
                "é\u{0}\u{10ffff}",
                "x",
            ])
            .repeat(1 + rng.below(3)),
        ),
        5 => Value::String("y".repeat(rng.below(5000))),
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|i| (format!("k{i}"), random_value(rng, depth + 1)))
                .collect(),
        ),
    }
}

/// Replaces, removes or adds one member somewhere in the document.
fn mutate_tree(rng: &mut Rng, value: &mut Value) {
    // Pick a node by walking down (JSON pointer), then mutate it.
    let mut pointer = String::new();
    let mut cursor = &*value;
    while rng.below(3) != 0 {
        let step = match cursor {
            Value::Object(map) if !map.is_empty() => map
                .iter()
                .nth(rng.below(map.len()))
                .map(|(k, v)| (k.replace('~', "~0").replace('/', "~1"), v)),
            Value::Array(items) if !items.is_empty() => {
                let i = rng.below(items.len());
                Some((i.to_string(), &items[i]))
            }
            _ => None,
        };
        match step {
            Some((segment, child)) => {
                pointer.push('/');
                pointer.push_str(&segment);
                cursor = child;
            }
            None => break,
        }
    }
    let Some(node) = value.pointer_mut(&pointer) else {
        return;
    };
    match node {
        Value::Object(map) if rng.below(2) == 0 && !map.is_empty() => {
            let key = map
                .keys()
                .nth(rng.below(map.len()))
                .cloned()
                .unwrap_or_default();
            if rng.below(2) == 0 {
                map.remove(&key);
            } else {
                map.insert(key, random_value(rng, 0));
            }
        }
        Value::Object(map) => {
            let key = (*rng.pick(&[
                "eventType",
                "publisherId",
                "resource",
                "job",
                "state",
                "run",
                "id",
                "notificationId",
                "x",
            ]))
            .to_owned();
            map.insert(key, random_value(rng, 0));
        }
        other => *other = random_value(rng, 0),
    }
}

/// What the parser must agree with: an accepted body is a JSON object whose `eventType` is ours and
/// whose `publisherId`, if any, is `pipelines`.
fn check_verdict(body: &[u8], seed: u64) {
    let verdict = hooks::parse(body);
    let value: Result<Value, _> = serde_json::from_slice(body);
    match (&verdict, &value) {
        (Ok(_), Ok(v)) => {
            assert_eq!(
                v["eventType"],
                EVENT_TYPE,
                "seed {seed}: {}",
                String::from_utf8_lossy(body)
            );
            assert!(
                v.get("publisherId")
                    .is_none_or(|p| p.is_null() || p == "pipelines"),
                "seed {seed}: {}",
                String::from_utf8_lossy(body)
            );
        }
        (Ok(_), Err(e)) => panic!(
            "seed {seed}: accepted what is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        ),
        (Err(Rejection::Malformed(_)), _) => {}
        (Err(_), Err(e)) => {
            panic!("seed {seed}: not JSON ({e}) must be Malformed, got {verdict:?}")
        }
        (Err(_), Ok(_)) => {}
    }
}

fn settings() -> (u64, usize) {
    let seed = std::env::var("AZP_HOOKS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let iterations = std::env::var("AZP_HOOKS_FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    (seed, iterations)
}

#[test]
fn mutated_payloads_never_panic_and_only_real_events_pass() {
    let (seed, iterations) = settings();
    let mut rng = Rng(seed);
    let sample: Value = serde_json::from_str(SAMPLE).unwrap();
    let mut accepted = 0usize;
    for i in 0..iterations {
        let body = if i % 2 == 0 {
            mutate_bytes(&mut rng, SAMPLE.as_bytes())
        } else {
            let mut tree = sample.clone();
            for _ in 0..=rng.below(3) {
                mutate_tree(&mut rng, &mut tree);
            }
            serde_json::to_vec(&tree).unwrap()
        };
        check_verdict(&body, seed);
        accepted += usize::from(hooks::parse(&body).is_ok());
    }
    // Both sides are exercised: many mutations keep a valid event, many break it.
    println!("seed {seed}: {iterations} mutations, {accepted} accepted");
    assert!(
        accepted > 0 && accepted < iterations,
        "seed {seed}: {accepted}/{iterations}"
    );
}

#[test]
fn random_bytes_never_panic() {
    let (seed, iterations) = settings();
    let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
    for _ in 0..iterations {
        let len = rng.below(256);
        let body: Vec<u8> = (0..len)
            .map(|_| *rng.pick(TOKENS).first().unwrap_or(&b' '))
            .collect();
        check_verdict(&body, seed);
        let raw: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        check_verdict(&raw, seed);
    }
}

#[tokio::test]
async fn the_endpoint_answers_mutations_with_202_or_a_4xx() {
    let (seed, iterations) = settings();
    let mut rng = Rng(seed.rotate_left(17) | 1);
    let credentials = Credentials::load(&CredentialSources {
        token: Some("t".into()),
        token_header: hooks::DEFAULT_TOKEN_HEADER.into(),
        ..Default::default()
    })
    .unwrap();
    let mut s = Settings::new(credentials);
    s.max_body_bytes = 4096;
    s.rate_per_second = std::num::NonZeroU32::MAX;
    s.burst = std::num::NonZeroU32::MAX;
    let router = hooks::router(s, Arc::new(tokio::sync::Notify::new()), Metrics::new());
    for _ in 0..(iterations / 20).max(100) {
        let body = mutate_bytes(&mut rng, SAMPLE.as_bytes());
        let content_type = *rng.pick(&[
            "application/json",
            "application/json; charset=utf-8",
            "text/plain",
            "APPLICATION/JSON",
            "",
            "\u{7f}",
        ]);
        let mut request =
            axum::http::Request::post(hooks::PATH).header(hooks::DEFAULT_TOKEN_HEADER, "t");
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        let request = match request.body(axum::body::Body::from(body.clone())) {
            Ok(r) => r,
            Err(_) => continue,
        };
        let status = router
            .clone()
            .oneshot(request)
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(
            [202, 400, 413, 415, 422].contains(&status),
            "seed {seed}: {status} for {}",
            String::from_utf8_lossy(&body)
        );
        if status == 202 {
            assert!(hooks::parse(&body).is_ok(), "seed {seed}");
        }
    }
}
