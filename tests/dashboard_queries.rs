//! The Grafana dashboard (`dashboards/azp-autoscaler.json`) and the chart's alerts: importable, every query
//! parses as PromQL (after substituting Grafana's variables) and names only metrics the controller exports;
//! and end to end, a real Prometheus (Debian's `prometheus`, 1 s scrapes, 127.0.0.1 only) scrapes the
//! controller of a bed while the simulator runs a workload with faults, and every panel query returns data
//! through Prometheus's HTTP API, while the chart's alert rules evaluate without error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use azp_autoscaler::metrics::{
    CallLabels, CleanupLabels, DelayLabels, ErrorLabels, HookLabels, Metrics, OrgLabels, Phase,
    PoolLabels, PoolStateLabels, TokenLabels,
};
use azp_testbed::bed::{Bed, BedOptions, ORG, eventually};
use azp_testbed::chart;
use azp_testbed::sim::{EndpointClass, Fault, FaultKind, RequestSpec};
use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};

fn dashboard_path() -> PathBuf {
    chart::repo_root().join("dashboards/azp-autoscaler.json")
}

fn dashboard() -> serde_json::Value {
    let path = dashboard_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// One query of one panel.
#[derive(Debug, Clone)]
struct PanelQuery {
    panel: String,
    ref_id: String,
    expr: String,
}

/// Every panel's queries (rows' nested panels included).
fn panel_queries(dashboard: &serde_json::Value) -> Vec<PanelQuery> {
    fn collect(panels: &serde_json::Value, out: &mut Vec<PanelQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            collect(&p["panels"], out);
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    panel: p["title"].as_str().unwrap_or("?").to_owned(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: t["expr"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
    }
    let mut out = Vec::new();
    collect(&dashboard["panels"], &mut out);
    out
}

/// Replaces Grafana's variables: the dashboard's own (`$name`, `${name}`, `[[name]]`) by `values` (default
/// `.*`, Grafana's "All" for these regex matchers) and the built-in intervals by `rate_interval`.
fn substitute(expr: &str, values: &BTreeMap<&str, String>, rate_interval: &str) -> String {
    let mut out = expr.to_owned();
    for builtin in [
        "$__rate_interval",
        "${__rate_interval}",
        "$__interval",
        "${__interval}",
        "$__range",
        "${__range}",
    ] {
        out = out.replace(builtin, rate_interval);
    }
    for var in ["namespace", "agentpool"] {
        let value = values.get(var).cloned().unwrap_or_else(|| ".*".to_owned());
        for form in [
            format!("${{{var}}}"),
            format!("[[{var}]]"),
            format!("${var}"),
        ] {
            out = out.replace(&form, &value);
        }
    }
    out
}

/// Metric names a parsed expression selects.
fn selected_metrics(expr: &Expr) -> BTreeSet<String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
            let vs = match expr {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(vs) = vs {
                if let Some(name) = &vs.name {
                    self.0.insert(name.clone());
                }
                for m in &vs.matchers.matchers {
                    if m.name == "__name__" {
                        self.0.insert(m.value.clone());
                    }
                }
            }
            Ok(true)
        }
    }
    let mut names = Names(BTreeSet::new());
    let _ = walk_expr(&mut names, expr);
    names.0
}

/// The sample names the controller exports: every metric of src/metrics.rs given one series, with the
/// suffixes of its type. A test below fails when src/metrics.rs registers one this list does not touch.
fn exported_metric_names() -> BTreeSet<String> {
    let text = touched_metrics().encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

fn touched_metrics() -> Metrics {
    let m = Metrics::new();
    let pool = PoolLabels {
        namespace: "ns".into(),
        agentpool: "ap".into(),
        ado_pool: "linux".into(),
    };
    let state = PoolStateLabels {
        namespace: "ns".into(),
        agentpool: "ap".into(),
        ado_pool: "linux".into(),
        state: "pending",
    };
    let org = OrgLabels {
        organization: "https://dev.azure.com/o".into(),
    };
    m.requests.get_or_create(&state).set(0);
    m.agents.get_or_create(&state).set(0);
    m.jobs_created.get_or_create(&pool).inc();
    m.cleanups
        .get_or_create(&CleanupLabels {
            namespace: "ns".into(),
            agentpool: "ap".into(),
            kind: "idle_agent_removed",
        })
        .inc();
    m.jobs_lost_to_eviction.get_or_create(&pool).inc();
    m.reconcile_errors
        .get_or_create(&ErrorLabels {
            namespace: "ns".into(),
            agentpool: "ap".into(),
            error: "x",
        })
        .inc();
    m.poll_duration.get_or_create(&org).observe(0.1);
    m.queue_wait.get_or_create(&pool).observe(1.0);
    m.observe_phase(&pool, Phase::job_created, Duration::from_secs(1));
    let call = CallLabels {
        organization: "https://dev.azure.com/o".into(),
        endpoint: "jobrequests",
        status: "200".into(),
    };
    m.ado_calls.get_or_create(&call).inc();
    m.ado_call_duration.get_or_create(&call).observe(0.1);
    m.ado_ratelimit_headroom.get_or_create(&org).set(1.0);
    let delay = DelayLabels {
        organization: "https://dev.azure.com/o".into(),
        reason: "retry_after",
    };
    m.ado_delays.get_or_create(&delay).inc();
    m.ado_delay_seconds.get_or_create(&delay).inc_by(1.0);
    m.token_events
        .get_or_create(&TokenLabels {
            source: "workload_identity",
            result: "refreshed",
        })
        .inc();
    m.leader.set(0);
    m.hook_requests
        .get_or_create(&HookLabels {
            outcome: "accepted",
        })
        .inc();
    m.hook_wakes.inc();
    m
}

#[test]
fn exported_names_cover_every_registered_metric() {
    let source = std::fs::read_to_string(chart::repo_root().join("src/metrics.rs"))
        .expect("read src/metrics.rs");
    let registered = source.matches("r.register(").count();
    let types = touched_metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .count();
    assert_eq!(
        types, registered,
        "src/metrics.rs registers {registered} metrics, touched_metrics() in this test gives {types} a series: add the new one there"
    );
}

#[test]
fn dashboard_is_importable_with_a_datasource_variable() {
    let d = dashboard();
    assert_eq!(d["uid"], "azp-autoscaler");
    assert!(d["title"].is_string());
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(
        d["id"].is_null(),
        "an importable dashboard has no database id"
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["namespace", "agentpool"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        assert_eq!(v["allValue"], ".*", "{name}: All must work in =~ matchers");
    }
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let grid = &p["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().expect("x"),
            grid["w"].as_u64().expect("w"),
        );
        assert!(x + w <= 24, "panel {} is wider than the grid", p["title"]);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {} must use the datasource variable",
            p["title"]
        );
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
        }
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "panel {} says what it shows",
            p["title"]
        );
    }
    // The panels users ask for are there.
    let titles: Vec<String> = d["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["title"].as_str().map(str::to_lowercase))
        .collect();
    for wanted in [
        "pending vs capped vs unservable vs running",
        "agents by state",
        "time to agent by phase",
        "queue wait percentiles",
        "agent jobs created",
        "cleanups",
        "ado calls",
        "ado errors",
        "rate-limit headroom",
        "token",
        "reconcile errors",
        "leader",
        "service hooks",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted:?}: {titles:?}"
        );
    }
    // The chart ships the same file.
    let shipped =
        std::fs::read_to_string(chart::chart_dir().join("files/dashboards/azp-autoscaler.json"))
            .expect("the chart's copy");
    assert!(
        shipped == std::fs::read_to_string(dashboard_path()).expect("dashboard"),
        "helm/azp-autoscaler/files/dashboards/azp-autoscaler.json differs from dashboards/azp-autoscaler.json: copy it"
    );
}

#[test]
fn every_panel_query_parses_and_uses_only_exported_metrics() {
    let d = dashboard();
    let exported = exported_metric_names();
    let queries = panel_queries(&d);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut problems = Vec::new();
    for q in &queries {
        let expr = substitute(&q.expr, &BTreeMap::new(), "1m");
        if expr.contains('$') {
            problems.push(format!(
                "{} {}: a variable is left: {expr}",
                q.panel, q.ref_id
            ));
            continue;
        }
        match parser::parse(&expr) {
            Err(e) => problems.push(format!(
                "{} {}: not PromQL ({e}): {expr}",
                q.panel, q.ref_id
            )),
            Ok(ast) => {
                let names = selected_metrics(&ast);
                if names.is_empty() {
                    problems.push(format!(
                        "{} {}: selects no metric: {expr}",
                        q.panel, q.ref_id
                    ));
                }
                for n in names.difference(&exported) {
                    problems.push(format!(
                        "{} {}: {n} is not exported by the controller (src/metrics.rs)",
                        q.panel, q.ref_id
                    ));
                }
            }
        }
    }
    // The variables' label_values(<selector>, <label>) queries select exported metrics too.
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let Some(query) = v["query"]["query"].as_str() else {
            continue;
        };
        let Some(inner) = query
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
        else {
            problems.push(format!(
                "variable {}: not a label_values query: {query}",
                v["name"]
            ));
            continue;
        };
        let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
        match parser::parse(&substitute(selector, &BTreeMap::new(), "1m")) {
            Ok(ast) => {
                for n in selected_metrics(&ast).difference(&exported) {
                    problems.push(format!("variable {}: {n} is not exported", v["name"]));
                }
            }
            Err(e) => problems.push(format!("variable {}: {e}", v["name"])),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn chart_alert_rules() -> Vec<serde_json::Value> {
    let manifest = chart::render_values(
        "azp",
        "azp-system",
        "organization: https://dev.azure.com/contoso\ncontroller:\n  workloadIdentity:\n    clientId: 00000000-0000-0000-0000-000000000001\nprometheusRule:\n  enabled: true\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let objects = chart::objects(&manifest).unwrap_or_else(|e| panic!("{e}"));
    let rule = chart::find(&objects, "PrometheusRule", "azp-azp-autoscaler")
        .unwrap_or_else(|e| panic!("{e}"));
    rule["spec"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn chart_alerts_parse_and_use_only_exported_metrics() {
    let exported = exported_metric_names();
    let groups = chart_alert_rules();
    let mut alerts = BTreeSet::new();
    for g in &groups {
        for r in g["rules"].as_array().into_iter().flatten() {
            let name = r["alert"].as_str().expect("alert name");
            alerts.insert(name.to_owned());
            let expr = r["expr"].as_str().expect("expr");
            let ast =
                parser::parse(expr).unwrap_or_else(|e| panic!("{name}: not PromQL ({e}): {expr}"));
            for n in selected_metrics(&ast) {
                assert!(
                    n == "up" || exported.contains(&n),
                    "{name}: {n} is not exported by the controller"
                );
            }
        }
    }
    for wanted in [
        "AzpAutoscalerDown",
        "AzpAutoscalerAdoErrors",
        "AzpAutoscalerAdoThrottled",
        "AzpAutoscalerTokenFailures",
        "AzpAutoscalerRequestsWaitingTooLong",
        "AzpAutoscalerUnservableRequests",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}: {alerts:?}");
    }
}

/// A Prometheus server on 127.0.0.1, killed on drop.
struct Prometheus {
    child: tokio::process::Child,
    url: String,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, with the chart's alert rules loaded. The scrape
    /// job looks like the ServiceMonitor's: job = the Service's name, the target's namespace, honorLabels.
    async fn start(target: &str, rules: &[serde_json::Value]) -> Prometheus {
        let binary = which("prometheus").unwrap_or_else(|| {
            panic!("prometheus not found on PATH: run tests/setup.sh (apt-get install prometheus)")
        });
        let dir =
            std::env::temp_dir().join(format!("azp-prometheus-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        std::fs::write(
            dir.join("rules.json"),
            serde_json::to_vec(&serde_json::json!({"groups": rules})).expect("rules"),
        )
        .expect("write rules");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: azp-azp-autoscaler\n    honor_labels: true\n    static_configs:\n      - targets: ['{target}']\n        labels:\n          namespace: azp-system\n",
            rules = dir.join("rules.json").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = tokio::process::Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let client = reqwest::Client::new();
        let ready = eventually("Prometheus ready", Duration::from_secs(60), || {
            let client = client.clone();
            let url = format!("{}/-/ready", p.url);
            async move {
                let r = client.get(url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        if let Err(e) = ready {
            panic!("{e}\n{}", p.logs());
        }
        p
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; the result vector (empty: no data).
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let body: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn get(&self, path: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("prometheus answers")
            .json()
            .await
            .expect("prometheus JSON")
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Metrics this test's workload does not make the controller record: their panels cannot have data.
/// Each entry names why. An entry excuses a panel only while the controller exposes no series of that
/// metric; remove it when the workload records it.
const NOT_YET_RECORDED: [(&str, &str); 1] = [(
    "azp_autoscaler_jobs_lost_to_eviction",
    "no busy agent pod is disrupted in this workload (tests/e2e_lifecycle.rs counts one after a node loss)",
)];

/// Time to agent and queue wait are taken from polls: a request is timed when a poll lists it received.
/// A job shorter than the poll interval can start and finish between two polls (on a loaded 2-core CI
/// machine it often does), so the workload's jobs run for several poll intervals.
const SEEN_RUNNING: Duration = Duration::from_secs(4);

async fn wait_finished(bed: &Bed, ids: &[u64]) {
    let r = eventually("requests finished", Duration::from_secs(180), || async {
        let reqs = bed.sim.requests(ORG, "linux").ok()?;
        let done: Vec<&str> = reqs
            .iter()
            .filter(|r| ids.contains(&r.request_id))
            .filter_map(|r| r.result.as_deref())
            .collect();
        (done.len() == ids.len()).then_some(done.iter().all(|r| *r == "succeeded"))
    })
    .await;
    if !matches!(r, Ok(true)) {
        panic!(
            "{r:?}: every request should succeed\nrequests: {:#?}\ncontroller logs:\n{}",
            bed.sim.requests(ORG, "linux"),
            bed.controller_logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_prometheus_scrapes_the_controller_and_every_panel_has_data() {
    let mut options = BedOptions::new("e2e-dash");
    options.ado_pools = vec!["linux".to_owned(), "other".to_owned()];
    // The service-hook endpoint on, with a header token from a file (as the chart mounts it).
    let hooks_dir =
        std::env::temp_dir().join(format!("azp-dash-hooks-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&hooks_dir).expect("hooks dir");
    let hook_token = uuid::Uuid::new_v4().simple().to_string();
    std::fs::write(hooks_dir.join("token"), &hook_token).expect("hook token");
    let hooks_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    options.controller_args.extend([
        format!("--hooks-addr=127.0.0.1:{hooks_port}"),
        format!("--hooks-token-file={}", hooks_dir.join("token").display()),
    ]);
    let bed = Bed::start(options).await.expect("bed");
    let prometheus = Prometheus::start(&bed.admin_addr, &chart_alert_rules()).await;

    // Two ADO pools of one organization: two poll loops share the organization's rate-limit state, so a
    // Retry-After that one of them receives holds the other's calls (a recorded delay).
    for (name, ado_pool) in [("linux", "linux"), ("other", "other")] {
        bed.apply_agentpool(bed.agentpool(name, ado_pool, 5))
            .await
            .expect("apply");
    }
    // Ready: the placeholder agents exist, so ADO keeps requests queued for the empty pools.
    for name in ["linux", "other"] {
        let ready = eventually(
            &format!("AgentPool {name} Ready"),
            Duration::from_secs(120),
            || async {
                let api: kube::Api<kube::core::DynamicObject> = kube::Api::namespaced_with(
                    bed.client.clone(),
                    &bed.namespace,
                    &azp_testbed::bed::agentpool_resource(),
                );
                let pool = api.get(name).await.ok()?;
                pool.data["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    .then_some(())
            },
        )
        .await;
        if let Err(e) = ready {
            panic!("{e}\ncontroller logs:\n{}", bed.controller_logs());
        }
    }

    // Workload: requests served by run-once agents, with faults in between.
    let first: Vec<u64> = (0..3)
        .map(|_| {
            bed.sim
                .queue(ORG, "linux", RequestSpec::new().duration(SEEN_RUNNING))
                .expect("queue")
        })
        .collect();
    wait_finished(&bed, &first).await;

    // ADO answers 503 twice and 429 with Retry-After once (longer than the poll interval, so the next
    // poll is held back): polls fail and recover.
    bed.sim.inject_fault(Fault::times(
        EndpointClass::JobRequests,
        FaultKind::ServerError { status: 503 },
        2,
    ));
    bed.sim.inject_fault(Fault::once(
        EndpointClass::JobRequests,
        FaultKind::RateLimited {
            retry_after_secs: 1,
        },
    ));
    // A build cancelled while its agent starts: the agent is left without work.
    let cancelled = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new().duration(Duration::from_secs(30)),
        )
        .expect("queue");
    eventually(
        "an agent Job for the build to cancel",
        Duration::from_secs(120),
        || async {
            let jobs = bed.jobs().await.ok()?;
            jobs.iter()
                .any(|j| {
                    j.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("azp-autoscaler.dev/request-id"))
                        .is_some_and(|r| *r == cancelled.to_string())
                })
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.controller_logs()));
    bed.sim.cancel(ORG, cancelled).expect("cancel");
    // Its agent registers, finds nothing to do and is removed as surplus (a counted cleanup). Queue the next
    // requests only then, or one of them would give the agent work again. No failure here: the panel check
    // below reports a missing cleanup.
    let metrics_url = format!("http://{}/metrics", bed.admin_addr);
    let _ = eventually(
        "the cancelled build's agent removed",
        Duration::from_secs(90),
        || {
            let url = metrics_url.clone();
            async move {
                let text = reqwest::get(url).await.ok()?.text().await.ok()?;
                text.contains("azp_autoscaler_cleanups_total{")
                    .then_some(())
            }
        },
    )
    .await;

    // ADO's service hook for a waiting job wakes the polls; a call without the token is refused.
    let hook_url = format!("http://127.0.0.1:{hooks_port}/hooks/ado");
    let event = serde_json::json!({
        "eventType": "ms.vss-pipelines.job-state-changed-event",
        "publisherId": "pipelines",
        "resource": {"job": {"state": "waiting"}},
    });
    let http = reqwest::Client::new();
    let accepted = http
        .post(&hook_url)
        .header(azp_autoscaler::hooks::DEFAULT_TOKEN_HEADER, &hook_token)
        .json(&event)
        .send()
        .await
        .expect("hook call");
    assert!(
        accepted.status().is_success(),
        "hook with the token: {}",
        accepted.status()
    );
    let refused = http
        .post(&hook_url)
        .json(&event)
        .send()
        .await
        .expect("hook call");
    assert_eq!(
        refused.status(),
        reqwest::StatusCode::UNAUTHORIZED,
        "hook without the token"
    );
    let _ = std::fs::remove_dir_all(&hooks_dir);

    let second: Vec<u64> = (0..2)
        .map(|_| {
            bed.sim
                .queue(ORG, "linux", RequestSpec::new().duration(SEEN_RUNNING))
                .expect("queue")
        })
        .collect();
    wait_finished(&bed, &second).await;

    // What the controller exposes is what the dashboard may use.
    let scrape = reqwest::get(format!("http://{}/metrics", bed.admin_addr))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    let exported = exported_metric_names();
    let live: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect();
    let unknown: Vec<&String> = live.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the controller exports metrics this test does not know: {unknown:?}"
    );

    // Every panel query returns data (the variables set to this bed's namespace and All).
    let values = BTreeMap::from([("namespace", bed.namespace.clone())]);
    let queries = panel_queries(&dashboard());
    // A panel is excused only while the controller has no series of its metric at all: once the metric
    // is recorded, its panels must have data like every other.
    let not_recorded = |q: &PanelQuery| {
        NOT_YET_RECORDED
            .iter()
            .find(|(metric, _)| {
                q.expr.contains(metric) && !live.iter().any(|n| n.starts_with(metric))
            })
            .map(|(_, why)| *why)
    };
    let without_data = |last: bool| {
        let prometheus = &prometheus;
        let queries = &queries;
        let values = &values;
        async move {
            let mut missing = Vec::new();
            for q in queries.iter().filter(|q| last || not_recorded(q).is_none()) {
                let expr = substitute(&q.expr, values, "1m");
                match prometheus.query(&expr).await {
                    Ok(result) if !result.is_empty() => {}
                    Ok(_) => missing.push((q.clone(), "no data".to_owned())),
                    Err(e) => missing.push((q.clone(), e)),
                }
            }
            missing
        }
    };
    let waited = eventually(
        "every panel query to return data",
        Duration::from_secs(120),
        || async { without_data(false).await.is_empty().then_some(()) },
    )
    .await;
    let missing = without_data(true).await;
    let mut problems = Vec::new();
    let mut noted = Vec::new();
    for (q, why) in &missing {
        match not_recorded(q) {
            Some(reason) => noted.push(format!("{} {}: {reason}", q.panel, q.ref_id)),
            None => problems.push(format!("{} {}: {why}: {}", q.panel, q.ref_id, q.expr)),
        }
    }
    for (metric, _) in NOT_YET_RECORDED {
        if live.iter().any(|n| n.starts_with(metric)) {
            eprintln!("{metric} is recorded now: remove it from NOT_YET_RECORDED");
        }
    }
    if !noted.is_empty() {
        eprintln!(
            "panels without data because the controller does not record their metric yet:\n{}",
            noted.join("\n")
        );
    }

    // The variables' values come from the data.
    let namespaces = prometheus
        .get("/api/v1/label/namespace/values?match[]=azp_autoscaler_requests")
        .await;
    if !namespaces["data"]
        .as_array()
        .is_some_and(|v| v.iter().any(|n| *n == bed.namespace.as_str()))
    {
        problems.push(format!(
            "label_values(azp_autoscaler_requests, namespace) lacks {}: {namespaces}",
            bed.namespace
        ));
    }

    // The chart's alert rules load and evaluate without error; the controller is seen up.
    let rules = prometheus.get("/api/v1/rules").await;
    let mut evaluated = 0;
    for g in rules["data"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            evaluated += 1;
            if r["health"] != "ok" && r["health"] != "unknown" {
                problems.push(format!(
                    "alert {} evaluates with {}: {}",
                    r["name"], r["health"], r["lastError"]
                ));
            }
            if r["name"] == "AzpAutoscalerDown" && r["state"] != "inactive" {
                problems.push(format!(
                    "AzpAutoscalerDown is {} while the controller is scraped",
                    r["state"]
                ));
            }
        }
    }
    if evaluated < 6 {
        problems.push(format!(
            "Prometheus loaded {evaluated} alert rules: {rules}"
        ));
    }

    let logs = if problems.is_empty() {
        String::new()
    } else {
        prometheus.logs()
    };
    prometheus.stop().await;
    let controller_logs = if problems.is_empty() {
        String::new()
    } else {
        bed.controller_logs()
    };
    bed.teardown().await;
    assert!(
        problems.is_empty(),
        "{}\n(wait: {waited:?})\nprometheus log:\n{logs}\ncontroller log:\n{controller_logs}",
        problems.join("\n")
    );
}
