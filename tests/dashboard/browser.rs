//! The dashboard in a real browser: Debian's chromium, headless, driven over W3C WebDriver by chromedriver
//! (`tests/setup` installs both). Each test gets its own chromedriver on a free loopback port and a fresh profile
//! directory, and saves a screenshot of each view it visits under `target/dashboard-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

/// chromium and chromedriver, or the reason the test is skipped (a failure under `FLOTILLA_REQUIRE_ALL=1`).
fn tools() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| {
        names.iter().find_map(|n| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(n))
                    .find(|p| p.is_file())
            })
        })
    };
    let found = find(&["chromium"]).zip(find(&["chromedriver"]));
    if found.is_none() {
        if std::env::var("FLOTILLA_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!(
                "missing test prerequisite: chromium and chromedriver (FLOTILLA_REQUIRE_ALL=1; tests/setup installs them)"
            );
        }
        eprintln!("skipping: chromium and chromedriver are missing (tests/setup installs them)");
    }
    found
}

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

impl Browser {
    /// A headless chromium session, or `None` when the browser is not installed (see [`tools`]).
    pub async fn start(test: &str) -> Option<Browser> {
        let (chromium, chromedriver) = tools()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let caps: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-dev-shm-usage", "--window-size=1280,1000",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            }))
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        // chromedriver answers within a second or two; a bounded wait, then the session.
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("chromedriver on {url} gave no session: {e}"),
            }
        };
        let shots = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/dashboard-screenshots")
            .join(test);
        std::fs::create_dir_all(&shots).unwrap();
        Some(Browser {
            client,
            driver,
            _profile: profile,
            shots,
        })
    }

    /// Saves what the browser shows as `<name>.png`.
    pub async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    pub async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Waits (bounded) until the element `css` holds `text`; the page as it was when it gave up.
    pub async fn wait_for_text(&self, css: &str, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if e.text().await.is_ok_and(|t| t.contains(text)) {
                    return;
                }
            }
            if Instant::now() > deadline {
                let page = self.client.source().await.unwrap_or_default();
                panic!("{css} did not come to say {text:?} within {within:?}:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// No alert, confirm or prompt is open: a script injected into the page would have shown one.
    pub async fn no_alert(&self) {
        assert!(
            self.client.get_alert_text().await.is_err(),
            "a dialog is open: injected script ran"
        );
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Signs in through the sign-in form, as an operator would.
pub async fn sign_in(b: &Browser, d: &crate::Dash) {
    b.client.goto(&format!("{}/", d.base)).await.unwrap();
    let form = b
        .client
        .form(Locator::Css("form[action='/signin']"))
        .await
        .expect("the sign-in form");
    form.set_by_name("token", &d.admin).await.unwrap();
    form.submit().await.unwrap();
    b.wait_for_text("h1", "Overview", Duration::from_secs(10))
        .await;
}

/// A page on another origin (another loopback port) whose script posts a form to the dashboard at once.
async fn attacker(target: &str, fields: &[(&str, &str)]) -> String {
    let inputs: String = fields
        .iter()
        .map(|(k, v)| format!("<input type=hidden name=\"{k}\" value=\"{v}\">"))
        .collect();
    let page = format!(
        "<!doctype html><form method=post action=\"{target}\">{inputs}</form>\
         <script>document.forms[0].submit()</script>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn signing_in_and_the_overview_in_chromium() {
    let Some(b) = Browser::start("overview").await else {
        return;
    };
    let d = crate::Dash::start().await;
    d.enroll("pi-zero", &["linux/arm/v6"], "Raspberry Pi Zero W Rev 1.1")
        .await;
    d.enroll(
        "pi-4",
        &["linux/arm64", "linux/arm/v7", "linux/arm/v6"],
        "Raspberry Pi 4 Model B",
    )
    .await;
    d.enroll("evil", &["linux/amd64"], "<img src=x onerror=alert(1)>")
        .await;
    b.client.goto(&format!("{}/", d.base)).await.unwrap();
    b.wait_for_text("h1", "Sign in", Duration::from_secs(10))
        .await;
    b.shot("signin").await;
    sign_in(&b, &d).await;
    let platforms = b.text("#platforms").await;
    for p in ["linux/arm/v6", "linux/arm64", "linux/amd64"] {
        assert!(platforms.contains(p), "{platforms}");
    }
    assert!(b.text("#counts").await.contains('3'));
    b.no_alert().await;
    b.shot("overview").await;
    b.close().await;
}

#[tokio::test]
async fn a_cross_site_form_post_is_refused_in_chromium() {
    let Some(b) = Browser::start("cross-site").await else {
        return;
    };
    let d = crate::Dash::start().await;
    sign_in(&b, &d).await;
    let evil = attacker(&format!("{}/signout", d.base), &[("csrf", "guessed")]).await;
    b.client.goto(&evil).await.unwrap();
    b.wait_for_text(
        "main",
        "a request from another site was refused",
        Duration::from_secs(10),
    )
    .await;
    b.shot("refused").await;
    b.client.goto(&format!("{}/", d.base)).await.unwrap();
    b.wait_for_text("h1", "Overview", Duration::from_secs(10))
        .await;
    b.close().await;
}

fn update(report: flotilla::update::Report) -> Vec<flotilla::fleet::EventBody> {
    vec![flotilla::fleet::EventBody::Update {
        app: "sensor".into(),
        report,
    }]
}

/// Clicks the button of the form posting to `action`, and waits for the page it leads to.
async fn press(b: &Browser, action: &str, then: &str) {
    b.client
        .find(Locator::Css(&format!(
            "form[method='post'][action='{action}'] button"
        )))
        .await
        .unwrap_or_else(|e| panic!("no button posting to {action}: {e}"))
        .click()
        .await
        .unwrap();
    b.wait_for_text("main", then, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_rollout_started_in_chromium_moves_its_bars_and_shows_a_crash_under_its_cause() {
    use flotilla::update::Report;
    let Some(b) = Browser::start("rollout").await else {
        return;
    };
    let d = crate::Dash::start().await;
    let mut devices = std::collections::BTreeMap::new();
    for (name, platforms) in [
        ("pi-zero", &["linux/arm/v6"][..]),
        ("pi-4", &["linux/arm64", "linux/arm/v7", "linux/arm/v6"][..]),
        ("nuc", &["linux/amd64"][..]),
        ("visionfive", &["linux/riscv64"][..]),
    ] {
        devices.insert(name, d.enroll(name, platforms, name).await);
    }
    d.api(
        "POST",
        "/v1/apps",
        Some(serde_json::json!({"name": "sensor"})),
        201,
    )
    .await;
    let release = d
        .api(
            "POST",
            "/v1/releases",
            Some(serde_json::json!({"app": "sensor", "image": "registry.local/sensor:2"})),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    sign_in(&b, &d).await;

    b.client
        .goto(&format!("{}/releases/{release}", d.base))
        .await
        .unwrap();
    b.wait_for_text("#covered", "3 of 4 devices", Duration::from_secs(10))
        .await;
    assert!(b.text("#cannot").await.contains("visionfive"));
    b.shot("release").await;

    // The rollout, from the release's form: a preview first, then the start.
    b.client
        .goto(&format!("{}/releases/{release}/rollout", d.base))
        .await
        .unwrap();
    let form = b.client.form(Locator::Css("form.stack")).await.unwrap();
    form.set_by_name("waves", "1,3").await.unwrap();
    form.set_by_name("max_failures", "2").await.unwrap();
    b.client
        .find(Locator::Css("button[name='preview']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for_text("#preview", "pi-", Duration::from_secs(10))
        .await;
    b.shot("preview").await;
    press(&b, &format!("/releases/{release}/rollout"), "Rollout #1").await;
    b.shot("rollout-started").await;

    // Reports reach the server while the page stays open: its bars move without a reload (the marker set in the
    // page survives only if the document is never loaded again).
    b.client
        .execute("window.flotillaMarker = 1; return 1;", vec![])
        .await
        .unwrap();
    let rollout = d.api("GET", "/v1/rollouts/1", None, 200).await;
    let first = rollout["waves"][0]["devices"][0]
        .as_str()
        .unwrap()
        .to_string();
    d.report(
        &devices[first.as_str()],
        update(Report::Committed {
            release: release.clone(),
        }),
    )
    .await;
    b.wait_for_text("#wave-1", "1 healthy", Duration::from_secs(20))
        .await;
    // The second wave is ordered once the first has settled; one of its devices crashes.
    let rollout = d.api("GET", "/v1/rollouts/1", None, 200).await;
    let crashed = rollout["waves"][1]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .find(|n| *n != first)
        .unwrap();
    d.report(
        &devices[crashed.as_str()],
        update(Report::RolledBack {
            release: release.clone(),
            to: None,
            reason: "exit code 139 <img src=x onerror=alert(1)>".into(),
            wrong_variant: false,
        }),
    )
    .await;
    b.wait_for_text("#cause-crash", &crashed, Duration::from_secs(20))
        .await;
    assert!(
        b.text("#cause-crash")
            .await
            .contains("<img src=x onerror=alert(1)>"),
        "the reason is shown as text"
    );
    let marker = b
        .client
        .execute("return window.flotillaMarker === 1;", vec![])
        .await
        .unwrap();
    assert_eq!(marker, serde_json::json!(true), "the page was reloaded");
    b.no_alert().await;
    b.shot("rollout").await;
    d.report(
        &devices[first.as_str()],
        vec![flotilla::fleet::EventBody::App(
            flotilla::fleet::AppStatus {
                app: "sensor".into(),
                release: Some(release.clone()),
                manifest: None,
                platform: None,
                state: "running".into(),
                restarts: 0,
                health: Some("healthy".into()),
                wrong_variant: None,
            },
        )],
    )
    .await;
    b.client.goto(&format!("{}/", d.base)).await.unwrap();
    b.wait_for_text("#active", "sensor", Duration::from_secs(10))
        .await;
    b.shot("overview-during-rollout").await;
    b.client
        .goto(&format!("{}/rollouts/1", d.base))
        .await
        .unwrap();

    press(&b, "/rollouts/1/pause", "paused").await;
    b.shot("rollout-paused").await;
    press(&b, "/rollouts/1/abort", "aborted").await;
    // The remaining views, for their screenshots.
    for (path, name, says) in [
        ("/releases", "releases", "sensor-1"),
        ("/rollouts", "rollouts", "aborted"),
        ("/tokens", "tokens", "New token"),
    ] {
        b.client.goto(&format!("{}{path}", d.base)).await.unwrap();
        b.wait_for_text("main", says, Duration::from_secs(10)).await;
        b.shot(name).await;
    }
    let state = d.api("GET", "/v1/rollouts/1", None, 200).await;
    assert_eq!(state["status"]["state"], "aborted", "{state}");
    b.close().await;
}

#[tokio::test]
async fn a_device_page_shows_hostile_text_inert_and_revokes_in_chromium() {
    let Some(b) = Browser::start("device").await else {
        return;
    };
    let d = crate::Dash::start().await;
    d.enroll("pi-zero", &["linux/arm/v6"], "Raspberry Pi Zero W Rev 1.1")
        .await;
    let evil = d
        .enroll("evil", &["linux/amd64"], "<img src=x onerror=alert(1)>")
        .await;
    // Heartbeats five minutes apart, each flushed (every 100 ms here) before the clock moves: samples to chart.
    for (i, cpu) in [12.5f32, 40.0, 22.0, 65.0].into_iter().enumerate() {
        if i > 0 {
            d.clock.step(301);
        }
        d.report(
            &evil,
            vec![flotilla::fleet::EventBody::Heartbeat(
                flotilla::fleet::Metrics {
                    cpu_percent: Some(cpu),
                    memory_used: Some((200 + 40 * i as u64) << 20),
                    memory_total: Some(512 << 20),
                    temperature_celsius: Some(48.0 + i as f32),
                    ..Default::default()
                },
            )],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    sign_in(&b, &d).await;
    b.client.goto(&format!("{}/devices", d.base)).await.unwrap();
    b.wait_for_text("main", "pi-zero", Duration::from_secs(10))
        .await;
    b.shot("devices").await;
    b.client
        .find(Locator::LinkText("evil"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for_text(
        "main",
        "<img src=x onerror=alert(1)>",
        Duration::from_secs(10),
    )
    .await;
    b.no_alert().await;
    let images = b.client.find_all(Locator::Css("main img")).await.unwrap();
    assert!(images.is_empty(), "the device's text made an element");
    let charts = b
        .client
        .find_all(Locator::Css("svg.spark polyline"))
        .await
        .unwrap();
    assert!(!charts.is_empty(), "metrics are charted");
    b.shot("device").await;

    press(&b, "/devices/evil/revoke", "Revoke evil?").await;
    press(&b, "/devices/evil/revoke", "revoked").await;
    let devices = d.api("GET", "/v1/devices", None, 200).await;
    let revoked = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "evil")
        .map(|v| v["revoked"].clone());
    assert_eq!(revoked, Some(serde_json::json!(true)), "{devices}");
    b.close().await;
}
