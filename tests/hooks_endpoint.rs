//! The service-hook endpoint over real HTTP: authentication, bounds, answers, and that an accepted hook
//! wakes the polls once (coalesced) while a refused one wakes nothing.

use std::io::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use azp_autoscaler::hooks::{self, CredentialSources, Credentials, Settings};
use azp_autoscaler::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

const SAMPLE: &str = include_str!("hooks_data/job-state-changed.json");
const TOKEN_HEADER: &str = "X-Hook-Token";

struct Endpoint {
    url: String,
    addr: SocketAddr,
    wakes: Arc<AtomicUsize>,
    metrics: Metrics,
    http: reqwest::Client,
}

impl Endpoint {
    async fn start(tune: impl FnOnce(&mut Settings)) -> Endpoint {
        let credentials = Credentials::load(&CredentialSources {
            username: Some("ado".into()),
            password: Some("s3cret".into()),
            token: Some("tok-123".into()),
            token_header: TOKEN_HEADER.into(),
            ..Default::default()
        })
        .unwrap();
        let mut settings = Settings::new(credentials);
        // Long enough that a second wake-up cannot happen during a test: any count > 1 is a coalescing bug.
        settings.min_wake_interval = Duration::from_secs(600);
        tune(&mut settings);
        let wake = Arc::new(Notify::new());
        let wakes = Arc::new(AtomicUsize::new(0));
        {
            let (wake, wakes) = (wake.clone(), wakes.clone());
            tokio::spawn(async move {
                loop {
                    wake.notified().await;
                    wakes.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let metrics = Metrics::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(hooks::serve(listener, settings, wake, metrics.clone()));
        Endpoint {
            url: format!("http://{addr}{}", hooks::PATH),
            addr,
            wakes,
            metrics,
            http: reqwest::Client::new(),
        }
    }

    fn post(&self) -> reqwest::RequestBuilder {
        self.http
            .post(&self.url)
            .basic_auth("ado", Some("s3cret"))
            .header(TOKEN_HEADER, "tok-123")
            .header("content-type", "application/json; charset=utf-8")
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, String) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Wake-ups seen once the coalescing task had time to run.
    async fn settled_wakes(&self) -> usize {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.wakes.load(Ordering::SeqCst)
    }

    fn metric(&self, outcome: &str) -> u64 {
        let text = self.metrics.encode();
        let needle = format!("azp_autoscaler_hook_requests_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

#[tokio::test]
async fn an_accepted_hook_wakes_the_polls_once() {
    let ep = Endpoint::start(|_| {}).await;
    let (status, body) = ep.send(ep.post().body(SAMPLE)).await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("woken"), "{body}");
    assert_eq!(ep.settled_wakes().await, 1);
    for _ in 0..20 {
        assert_eq!(ep.send(ep.post().body(SAMPLE)).await.0, 202);
    }
    // Twenty more hooks inside the wake interval: still one wake-up (plus at most one queued for later).
    assert_eq!(ep.settled_wakes().await, 1);
    assert_eq!(ep.metric("accepted"), 21);
    let text = ep.metrics.encode();
    assert!(text.contains("azp_autoscaler_hook_wakes_total 1"), "{text}");
}

#[tokio::test]
async fn hooks_after_the_wake_interval_wake_again() {
    let ep = Endpoint::start(|s| s.min_wake_interval = Duration::from_millis(100)).await;
    assert_eq!(ep.send(ep.post().body(SAMPLE)).await.0, 202);
    assert_eq!(ep.settled_wakes().await, 1);
    assert_eq!(ep.send(ep.post().body(SAMPLE)).await.0, 202);
    assert_eq!(ep.settled_wakes().await, 2);
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_401_and_wake_nothing() {
    let ep = Endpoint::start(|_| {}).await;
    let bare = || {
        ep.http
            .post(&ep.url)
            .header("content-type", "application/json")
            .body(SAMPLE)
    };
    let cases = [
        bare(),
        bare().header(TOKEN_HEADER, "tok-123"),
        bare().basic_auth("ado", Some("s3cret")),
        bare()
            .basic_auth("ado", Some("wrong"))
            .header(TOKEN_HEADER, "tok-123"),
        bare()
            .basic_auth("other", Some("s3cret"))
            .header(TOKEN_HEADER, "tok-123"),
        bare()
            .basic_auth("ado", Some("s3cret"))
            .header(TOKEN_HEADER, "tok-1234"),
        bare()
            .bearer_auth("tok-123")
            .header(TOKEN_HEADER, "tok-123"),
    ];
    for request in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401);
        assert_eq!(
            response.headers()["www-authenticate"],
            "Basic realm=\"azp-autoscaler\""
        );
        assert!(response.text().await.unwrap().contains("credentials"));
    }
    assert_eq!(ep.settled_wakes().await, 0);
    assert_eq!(ep.metric("unauthorized"), 7);
}

#[tokio::test]
async fn bad_payloads_get_a_clear_4xx_and_wake_nothing() {
    let ep = Endpoint::start(|s| s.max_body_bytes = 8 * 1024).await;
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            ep.post().body("{not json"),
            400,
            "not a service-hook JSON object",
        ),
        (
            ep.post().body("[1,2]"),
            400,
            "not a service-hook JSON object",
        ),
        (ep.post().body(""), 400, "not a service-hook JSON object"),
        (ep.post().body(r#"{"id":"x"}"#), 422, "no eventType"),
        (
            ep.post()
                .body(SAMPLE.replace("job-state-changed", "run-state-changed")),
            422,
            "ms.vss-pipelines.run-state-changed-event` is not handled",
        ),
        (
            ep.post()
                .body(SAMPLE.replace(r#""publisherId": "pipelines""#, r#""publisherId": "tfs""#)),
            422,
            "publisher `tfs`",
        ),
        (
            ep.http
                .post(&ep.url)
                .basic_auth("ado", Some("s3cret"))
                .header(TOKEN_HEADER, "tok-123")
                .header("content-type", "text/plain")
                .body(SAMPLE),
            415,
            "application/json",
        ),
        (
            ep.post()
                .header("content-type", "application/json")
                .body(SAMPLE),
            415,
            "one Content-Type",
        ),
        (
            ep.post().body(vec![b' '; 9 * 1024]),
            413,
            "exceeds 8192 bytes",
        ),
    ];
    for (request, status, needle) in cases {
        let (got, body) = ep.send(request).await;
        assert_eq!(got, status, "{body}");
        assert!(body.contains(needle), "{status}: {body}");
    }
    let (status, _) = ep.send(ep.http.get(&ep.url)).await;
    assert_eq!(status, 405);
    assert_eq!(ep.settled_wakes().await, 0);
    assert_eq!(ep.metric("malformed"), 3);
    assert_eq!(ep.metric("unknown_event"), 2);
    assert_eq!(ep.metric("too_large"), 1);
}

/// A chunked body has no Content-Length: the limit must hold while reading.
#[tokio::test]
async fn an_oversized_chunked_body_is_413() {
    let ep = Endpoint::start(|s| s.max_body_bytes = 1024).await;
    let mut stream = tokio::net::TcpStream::connect(ep.addr).await.unwrap();
    let mut request = Vec::new();
    write!(
        request,
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWRvOnMzY3JldA==\r\n{TOKEN_HEADER}: tok-123\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        hooks::PATH
    )
    .unwrap();
    for _ in 0..4 {
        write!(request, "200\r\n{}\r\n", " ".repeat(0x200)).unwrap();
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(ep.settled_wakes().await, 0);
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let ep = Endpoint::start(|s| {
        s.rate_per_second = NonZeroU32::MIN;
        s.burst = NonZeroU32::new(3).unwrap();
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = ep.post().body(SAMPLE).send().await.unwrap();
        if response.status().as_u16() == 429 {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        statuses.push(response.status().as_u16());
    }
    // The burst is admitted; what follows within the same second is refused, authenticated or not.
    assert_eq!(&statuses[..3], &[202, 202, 202]);
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    assert_eq!(
        ep.metric("rate_limited") as usize,
        statuses.iter().filter(|s| **s == 429).count()
    );
}

#[tokio::test]
async fn a_header_token_alone_is_enough_when_it_is_the_only_method() {
    let credentials = Credentials::load(&CredentialSources {
        token: Some("only-token".into()),
        token_header: hooks::DEFAULT_TOKEN_HEADER.into(),
        ..Default::default()
    })
    .unwrap();
    let wake = Arc::new(Notify::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{}", listener.local_addr().unwrap(), hooks::PATH);
    tokio::spawn(hooks::serve(
        listener,
        Settings::new(credentials),
        wake.clone(),
        Metrics::new(),
    ));
    let woken = wake.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    let http = reqwest::Client::new();
    let response = http
        .post(&url)
        .header(hooks::DEFAULT_TOKEN_HEADER, "only-token")
        .body(SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    tokio::time::timeout(Duration::from_secs(5), woken)
        .await
        .expect("an accepted hook wakes the polls");
    let response = http.post(&url).body(SAMPLE).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert!(!response.headers().contains_key("www-authenticate"));
}

/// A sender that stops mid-body is answered 408 instead of holding the connection.
#[tokio::test]
async fn a_stalled_body_is_408() {
    let ep = Endpoint::start(|s| s.body_timeout = Duration::from_millis(300)).await;
    let mut stream = tokio::net::TcpStream::connect(ep.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWRvOnMzY3JldA==\r\n{TOKEN_HEADER}: tok-123\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"a\":",
        hooks::PATH
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("answered while the body is still missing")
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert_eq!(ep.metric("timeout"), 1);
    assert_eq!(ep.settled_wakes().await, 0);
}
