//! `/metrics`: the admin token, the fleet's gauges counted from the database, the latency histogram's route
//! templates, and the outbox lag devices report.

use flotilla::fleet::{EventBody, Metrics};
use flotilla::update::Report;
use serde_json::json;

use crate::Dash;

/// The scrape, with `token` as the bearer (none: no Authorization); its status and text.
async fn scrape(d: &Dash, token: Option<&str>) -> (u16, String, String) {
    let mut req = reqwest::Client::new().get(format!("{}/metrics", d.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, kind, resp.text().await.unwrap())
}

/// Every line is a comment or `name[{labels}] value`, and the text ends with `# EOF`: what a scraper parses.
#[track_caller]
fn check_syntax(text: &str) {
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "not a value in {line:?}");
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.starts_with("flotilla_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "not a metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line:?}");
            // Inside the braces, every quote that is not escaped opens or closes a value: an even count.
            let labels = &series[name_end + 1..series.len() - 1];
            let unescaped = labels
                .replace("\\\\", "")
                .replace("\\\"", "")
                .matches('"')
                .count();
            assert_eq!(unescaped % 2, 0, "a label value broke out in {line:?}");
        }
    }
}

#[track_caller]
fn has(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "the scrape lacks the line {line:?}:\n{text}"
    );
}

#[tokio::test]
async fn metrics_need_the_admin_token_and_count_the_fleet_from_the_database() {
    let d = Dash::signed_in().await;
    let (status, _, body) = scrape(&d, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = scrape(&d, Some("not-the-admin-token")).await;
    assert_eq!(status, 401);
    // A device's credential is no operator's.
    let pi = d.enroll("pi-a", &["linux/arm/v6"], "Pi Zero W").await;
    let (status, _, _) = scrape(&d, Some(&pi.credential)).await;
    assert_eq!(status, 401);

    d.enroll("pi-b", &["linux/arm/v6", "linux/arm/v5"], "Pi 1")
        .await;
    d.enroll("rock", &["linux/arm64", "linux/arm/v7"], "Rock 5")
        .await;
    // A device's platform is its own text: it must not write lines of its own into the scrape.
    d.enroll(
        "odd",
        &["linux/x\"} 1\nflotilla_devices{state=\"running\"} 999\n"],
        "<img src=x onerror=alert(1)>",
    )
    .await;

    let (status, kind, text) = scrape(&d, Some(&d.admin)).await;
    assert_eq!(status, 200, "{text}");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    check_syntax(&text);
    has(&text, "flotilla_devices{state=\"running\"} 4");
    has(&text, "flotilla_devices{state=\"offline\"} 0");
    has(&text, "flotilla_devices{state=\"failed\"} 0");
    has(
        &text,
        "flotilla_devices_by_platform{platform=\"linux/arm/v6\"} 2",
    );
    has(
        &text,
        "flotilla_devices_by_platform{platform=\"linux/arm64\"} 1",
    );
    has(
        &text,
        "flotilla_devices_by_platform{platform=\"linux/x\\\"} 1\\nflotilla_devices{state=\\\"running\\\"} 999\\n\"} 1",
    );
    assert!(!text.contains("} 999\n"), "{text}");
    assert!(
        text.contains("aggregate with max, not sum"),
        "the fleet's gauges say how to aggregate them across replicas:\n{text}"
    );

    // Offline after five minutes without a word; revoked is a state of its own.
    d.clock.step(301);
    d.api("POST", "/v1/devices/odd/revoke", None, 200).await;
    let (_, _, text) = scrape(&d, Some(&d.admin)).await;
    has(&text, "flotilla_devices{state=\"offline\"} 3");
    has(&text, "flotilla_devices{state=\"revoked\"} 1");
    has(&text, "flotilla_devices{state=\"running\"} 0");
}

#[tokio::test]
async fn request_latency_is_labelled_by_route_template_and_status_class() {
    let d = Dash::signed_in().await;
    d.enroll("pi-a", &["linux/arm/v6"], "Pi Zero W").await;
    d.api("GET", "/v1/rollouts/12345", None, 404).await;
    d.api("GET", "/v1/tokens", None, 200).await;
    assert_eq!(d.get("/signin").await.status, 303, "signed in already");
    d.page("/").await;
    assert_eq!(d.get("/no/such/page").await.status, 404);
    scrape(&d, None).await;
    let (_, _, text) = scrape(&d, Some(&d.admin)).await;
    check_syntax(&text);
    for (route, status) in [
        ("/v1/enroll", "2xx"),
        ("/v1/tokens", "2xx"),
        ("/v1/rollouts/{id}", "4xx"),
        ("/signin", "3xx"),
        ("/", "2xx"),
        ("unmatched", "4xx"),
        ("/metrics", "4xx"),
    ] {
        let prefix = format!(
            "flotilla_http_request_duration_seconds_count{{route=\"{route}\",status=\"{status}\"}} "
        );
        assert!(
            text.lines().any(|l| l.starts_with(&prefix)),
            "no {prefix:?} in:\n{text}"
        );
    }
    has(
        &text,
        "flotilla_http_request_duration_seconds_count{route=\"/v1/enroll\",status=\"2xx\"} 1",
    );
    assert!(
        text.contains("flotilla_http_request_duration_seconds_bucket{le=\"0.0005\",route=\"/v1/tokens\",status=\"2xx\"}")
            || text.contains("flotilla_http_request_duration_seconds_bucket{route=\"/v1/tokens\",status=\"2xx\",le=\"0.0005\"}"),
        "{text}"
    );
    // One series per route, never per id or per unknown path.
    assert!(!text.contains("12345"), "{text}");
    assert!(!text.contains("/no/such/page"), "{text}");
    assert!(text.contains("this replica only"), "{text}");
}

#[tokio::test]
async fn the_devices_outbox_lag_reaches_the_scrape_as_a_histogram_over_devices() {
    let d = Dash::signed_in().await;
    let a = d.enroll("pi-a", &["linux/arm/v6"], "Pi Zero W").await;
    let b = d.enroll("pi-b", &["linux/arm/v6"], "Pi Zero W").await;
    d.enroll("silent", &["linux/arm64"], "no heartbeat yet")
        .await;
    let beat = |pending, age| {
        EventBody::Heartbeat(Metrics {
            outbox_pending: Some(pending),
            outbox_oldest_age_secs: Some(age),
            ..Metrics::default()
        })
    };
    d.report(&a, vec![beat(1, 0)]).await;
    d.report(&b, vec![beat(40, 3_600)]).await;
    d.server.flush().await.unwrap();
    let (_, _, text) = scrape(&d, Some(&d.admin)).await;
    check_syntax(&text);
    has(&text, "flotilla_device_outbox_pending_count 2");
    has(&text, "flotilla_device_outbox_pending_sum 41.0");
    has(&text, "flotilla_device_outbox_pending_bucket{le=\"1.0\"} 1");
    has(
        &text,
        "flotilla_device_outbox_pending_bucket{le=\"10.0\"} 1",
    );
    has(
        &text,
        "flotilla_device_outbox_pending_bucket{le=\"100.0\"} 2",
    );
    has(
        &text,
        "flotilla_device_outbox_pending_bucket{le=\"+Inf\"} 2",
    );
    has(
        &text,
        "flotilla_device_outbox_oldest_age_seconds_max 3600.0",
    );

    // The largest number a device may send does not break the scrape.
    d.report(&a, vec![beat(u64::MAX, u64::MAX)]).await;
    d.server.flush().await.unwrap();
    let (status, _, text) = scrape(&d, Some(&d.admin)).await;
    assert_eq!(status, 200, "{text}");
    check_syntax(&text);
    has(
        &text,
        "flotilla_device_outbox_pending_bucket{le=\"+Inf\"} 2",
    );
}

#[tokio::test]
async fn rollout_progress_is_exported_per_running_rollout() {
    let d = Dash::signed_in().await;
    let a = d.enroll("pi-a", &["linux/arm/v6"], "Pi Zero W").await;
    d.enroll("pi-b", &["linux/arm/v6"], "Pi Zero W").await;
    d.enroll("rock", &["linux/arm64"], "Rock 5").await;
    d.enroll("mips", &["linux/mips64le"], "a router").await;
    d.api("POST", "/v1/apps", Some(json!({"name": "sensor"})), 201)
        .await;
    let release = d
        .api(
            "POST",
            "/v1/releases",
            Some(json!({"app": "sensor", "image": "registry.local/sensor:2"})),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rollout = d
        .api(
            "POST",
            "/v1/rollouts",
            Some(json!({"release": release, "waves": ["1", "100%"], "max_failures": "1"})),
            201,
        )
        .await["id"]
        .as_u64()
        .unwrap();
    d.server.drive().await.unwrap();
    let (_, _, text) = scrape(&d, Some(&d.admin)).await;
    check_syntax(&text);
    let line = |state: &str, n: u64| {
        format!(
            "flotilla_rollout_devices{{rollout=\"{rollout}\",app=\"sensor\",state=\"{state}\"}} {n}"
        )
    };
    has(&text, &line("ordered", 1));
    has(&text, &line("waiting", 3));
    has(&text, &line("healthy", 0));
    has(&text, &line("incompatible", 1));
    has(
        &text,
        &format!("flotilla_rollout_wave{{rollout=\"{rollout}\",app=\"sensor\"}} 1"),
    );
    has(
        &text,
        &format!("flotilla_rollout_waves{{rollout=\"{rollout}\",app=\"sensor\"}} 2"),
    );
    has(
        &text,
        &format!("flotilla_rollout_paused{{rollout=\"{rollout}\",app=\"sensor\"}} 0"),
    );

    d.report(
        &a,
        vec![EventBody::Update {
            app: "sensor".into(),
            report: Report::Committed {
                release: release.clone(),
            },
        }],
    )
    .await;
    let (_, _, text) = scrape(&d, Some(&d.admin)).await;
    has(&text, &line("healthy", 1));
    has(
        &text,
        &format!("flotilla_rollout_wave{{rollout=\"{rollout}\",app=\"sensor\"}} 2"),
    );
    has(&text, &line("ordered", 3));

    // A rollout no longer under way is not exported: its series end.
    d.api("POST", &format!("/v1/rollouts/{rollout}/abort"), None, 200)
        .await;
    let (_, _, text) = scrape(&d, Some(&d.admin)).await;
    assert!(!text.contains("flotilla_rollout_devices{"), "{text}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn metrics_listen_serves_without_a_token_on_loopback_only() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-server"));
        c.arg("serve")
            .arg("--db")
            .arg(dir.path().join("server.db"))
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let refused = serve(&["--listen", "127.0.0.1:0", "--metrics-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains("not a loopback address"), "{said}");

    let (api, open) = (free_port(), free_port());
    let mut child = serve(&[
        "--listen",
        &format!("127.0.0.1:{api}"),
        "--metrics-listen",
        &format!("127.0.0.1:{open}"),
    ])
    .spawn()
    .unwrap();
    let http = reqwest::Client::new();
    let mut text = None;
    for _ in 0..300 {
        if let Ok(resp) = http
            .get(format!("http://127.0.0.1:{open}/metrics"))
            .send()
            .await
        {
            assert_eq!(resp.status().as_u16(), 200);
            text = Some(resp.text().await.unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let text = text.expect("the metrics listener answers");
    check_syntax(&text);
    has(&text, "flotilla_devices{state=\"running\"} 0");
    // The main listener's /metrics still takes the admin token.
    let main = http
        .get(format!("http://127.0.0.1:{api}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status().as_u16(), 401);
    // Only /metrics is served there: not the API, not the dashboard.
    let other = http
        .get(format!("http://127.0.0.1:{open}/v1/tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);
    child.kill().unwrap();
    child.wait().unwrap();
}
