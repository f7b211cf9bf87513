//! The devices list (filters, pagination, search) and a device's page (platform evidence, metrics charts, apps,
//! update history with causes, revoke, tags).

use flotilla::fleet::{AppStatus, Enrolled, EventBody, Metrics};
use flotilla::update::Report;
use serde_json::{Value, json};

use crate::Dash;

const XSS: &str = "<img src=x onerror=alert(1)>";

fn app(name: &str, release: &str, state: &str) -> EventBody {
    EventBody::App(AppStatus {
        app: name.into(),
        release: Some(release.into()),
        manifest: Some("sha256:feed".into()),
        platform: Some("linux/arm/v6".into()),
        state: state.into(),
        restarts: 3,
        health: Some("healthy".into()),
        wrong_variant: None,
    })
}

fn heartbeat(cpu: f32) -> EventBody {
    EventBody::Heartbeat(Metrics {
        cpu_percent: Some(cpu),
        memory_used: Some(256 << 20),
        memory_total: Some(512 << 20),
        temperature_celsius: Some(48.5),
        ..Metrics::default()
    })
}

/// The names of the devices a list page shows, in order.
fn listed(body: &str) -> Vec<String> {
    body.split("<a href=\"/devices/")
        .skip(1)
        .filter_map(|rest| {
            let start = rest.find('>')? + 1;
            let end = rest.find("</a>")?;
            Some(rest[start..end].to_string())
        })
        .collect()
}

async fn device_api(d: &Dash, name: &str) -> Value {
    d.api("GET", "/v1/devices", None, 200)
        .await
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no device {name}"))
}

/// Three devices: pi-zero (arm/v6, site=roof, runs demo-1, failed sensor-1 with SIGILL), pi-4 (arm64, running
/// demo-2), nuc (amd64, no app).
async fn fleet(d: &Dash) -> (Enrolled, Enrolled, Enrolled) {
    let zero = d.enroll("pi-zero", &["linux/arm/v6"], "Pi Zero W").await;
    let four = d
        .enroll(
            "pi-4",
            &["linux/arm64", "linux/arm/v7", "linux/arm/v6"],
            "Pi 4",
        )
        .await;
    let nuc = d.enroll("nuc", &["linux/amd64"], "NUC").await;
    d.api(
        "POST",
        "/v1/devices/pi-zero/tags",
        Some(json!({"set": {"site": "roof"}})),
        200,
    )
    .await;
    d.report(&zero, vec![app("demo", "demo-1", "running")])
        .await;
    d.report(&four, vec![app("demo", "demo-2", "running")])
        .await;
    d.api("POST", "/v1/apps", Some(json!({"name": "sensor"})), 201)
        .await;
    d.api(
        "POST",
        "/v1/releases",
        Some(json!({"app": "sensor", "image": "registry.example/sensor:1"})),
        201,
    )
    .await;
    d.api(
        "POST",
        "/v1/rollouts",
        Some(json!({"release": "sensor-1", "select": {"site": "roof"}, "waves": ["100%"], "max_failures": "5"})),
        201,
    )
    .await;
    d.report(
        &zero,
        vec![EventBody::Update {
            app: "sensor".into(),
            report: Report::RolledBack {
                release: "sensor-1".into(),
                to: None,
                reason: format!("wrong architecture variant: SIGILL {XSS}"),
                wrong_variant: true,
            },
        }],
    )
    .await;
    (zero, four, nuc)
}

#[tokio::test]
async fn each_filter_narrows_the_devices_list() {
    let mut d = Dash::signed_in().await;
    let (_zero, four, _nuc) = fleet(&d).await;
    let all = d.page("/devices").await;
    assert_eq!(listed(&all.body), ["nuc", "pi-4", "pi-zero"]);
    all.says("Devices 1–3 of")
        .says("site=roof")
        .says("demo-1")
        .says("linux/arm64");
    let cases: &[(&str, &[&str])] = &[
        ("platform=linux%2Farm64", &["pi-4"]),
        ("tag=site%3Droof", &["pi-zero"]),
        ("tag=site%3Dlab", &["nuc", "pi-4"]),
        ("app=demo", &["pi-4", "pi-zero"]),
        ("app=demo&release=demo-2", &["pi-4"]),
        ("release=demo-1", &["pi-zero"]),
        ("app=nothing", &[]),
        ("state=failed", &["pi-zero"]),
        ("state=running", &["nuc", "pi-4"]),
        ("q=pi-", &["pi-4", "pi-zero"]),
        ("q=ZERO", &["pi-zero"]),
        ("seen=1h", &["nuc", "pi-4", "pi-zero"]),
        ("seen=never-in-1d", &[]),
        ("platform=linux%2Farm64&state=failed", &[]),
    ];
    for (query, want) in cases {
        let a = d.page(&format!("/devices?{query}")).await;
        assert_eq!(listed(&a.body), *want, "/devices?{query}");
        if want.is_empty() {
            a.says("No device matches.");
        }
    }
    // The form shows the filter it applied.
    let f = d
        .page("/devices?state=failed&platform=linux%2Farm%2Fv6")
        .await;
    assert!(
        f.body.contains("<option value=\"failed\" selected>"),
        "{}",
        f.body
    );
    assert!(f.body.contains("<option value=\"linux/arm/v6\" selected>"));
    let bad = d.page("/devices?tag=nonsense").await;
    bad.says("The tag filter \"nonsense\" is not key=value");
    assert_eq!(listed(&bad.body).len(), 3, "a bad filter is left out");

    // Two days later only pi-4 has spoken: last seen and the offline state say so.
    d.clock.step(2 * 86_400);
    d.report(&four, vec![heartbeat(10.0)]).await;
    d.server.flush().await.unwrap();
    // The session did not last two days.
    d.sign_in().await;
    assert_eq!(listed(&d.page("/devices?seen=1h").await.body), ["pi-4"]);
    assert_eq!(
        listed(&d.page("/devices?seen=never-in-1d").await.body),
        ["nuc", "pi-zero"]
    );
    assert_eq!(
        listed(&d.page("/devices?state=offline").await.body),
        ["nuc", "pi-zero"]
    );
    d.page("/devices?seen=never-in-1d").await.says("2 days ago");
}

/// Devices written straight into the database: enrolling 120 over HTTP would spend the admin token's rate.
fn insert_devices(d: &Dash, names: impl IntoIterator<Item = (String, &'static str)>) {
    let conn = rusqlite::Connection::open(&d.db).unwrap();
    for (name, platform) in names {
        conn.execute(
            "INSERT INTO devices (id, name, credential_hash, tags, platform, agent_version, enrolled, last_seen)
             VALUES (?1, ?1, ?1, '{}', ?2, '0.1.0', 0, 0)",
            rusqlite::params![
                name,
                json!({"candidates": [platform], "page_size": 4096, "description": "bulk"}).to_string()
            ],
        )
        .unwrap();
    }
}

#[tokio::test]
async fn the_list_is_paginated_by_the_server_and_the_pager_keeps_the_filters() {
    let d = Dash::signed_in().await;
    insert_devices(
        &d,
        (0..120).map(|i| {
            let p = if i % 2 == 0 {
                "linux/arm64"
            } else {
                "linux/arm/v6"
            };
            (format!("dev-{i:03}"), p)
        }),
    );
    let first = d.page("/devices").await;
    let names = listed(&first.body);
    assert_eq!(names.len(), 50);
    assert_eq!(names[0], "dev-000");
    assert_eq!(names[49], "dev-049");
    first.says("Devices 1–50 of").says("Page 1 of 3");
    assert!(
        first.body.contains("href=\"/devices?page=2\""),
        "{}",
        first.body
    );
    assert!(!first.body.contains("rel=\"prev\""));
    let last = d.page("/devices?page=3").await;
    assert_eq!(
        listed(&last.body),
        (100..120)
            .map(|i| format!("dev-{i:03}"))
            .collect::<Vec<_>>()
    );
    last.says("Devices 101–120 of");
    assert!(!last.body.contains("rel=\"next\""));
    assert!(last.body.contains("href=\"/devices?page=2\""));
    // Filtered: 60 arm64 devices, two pages; the links keep the platform.
    let arm = d.page("/devices?platform=linux%2Farm64").await;
    arm.says("Page 1 of 2");
    assert!(
        arm.body
            .contains("href=\"/devices?platform=linux%2Farm64&amp;page=2\""),
        "{}",
        arm.body
    );
    let arm2 = d.page("/devices?platform=linux%2Farm64&page=2").await;
    let names = listed(&arm2.body);
    assert_eq!(names.len(), 10);
    assert_eq!(names[0], "dev-100");
    let beyond = d.page("/devices?page=9").await;
    beyond.says("No device on page 9 of 3.");
    let absurd = d.page("/devices?page=18446744073709551615").await;
    absurd.says("No device on page 184467440737095516 of 3.");
    assert_eq!(listed(&d.page("/devices?page=-1").await.body).len(), 50);
}

#[tokio::test]
async fn a_name_search_takes_wildcards_literally() {
    let d = Dash::signed_in().await;
    insert_devices(
        &d,
        ["lab_1", "labx1", "lab-100"]
            .into_iter()
            .map(|n| (n.to_string(), "linux/arm64")),
    );
    assert_eq!(listed(&d.page("/devices?q=b_1").await.body), ["lab_1"]);
    assert_eq!(
        listed(&d.page("/devices?q=%25").await.body),
        Vec::<String>::new()
    );
    assert_eq!(
        listed(&d.page("/devices?q=lab").await.body),
        ["lab-100", "lab_1", "labx1"]
    );
}

#[tokio::test]
async fn a_device_page_shows_the_evidence_apps_and_history_with_causes_all_inert() {
    let d = Dash::signed_in().await;
    let (zero, _, _) = fleet(&d).await;
    d.report(
        &zero,
        vec![EventBody::Platform(flotilla::fleet::PlatformReport {
            candidates: vec!["linux/arm/v6".into(), "linux/386".into()],
            page_size: Some(4096),
            description: format!("BCM2835 ARM1176 {XSS}"),
        })],
    )
    .await;
    d.report(&zero, vec![app("web", XSS, XSS)]).await;
    let p = d.page("/devices/pi-zero").await;
    p.says("Candidates, best first")
        .says("linux/arm/v6")
        .says("linux/386")
        .says(&format!("BCM2835 ARM1176 {XSS}"))
        .says("4 KiB")
        .says("0.1.0")
        .says("site=roof".split('=').next().unwrap())
        .says("roof");
    // Best first: the order detection gave.
    let v6 = p.body.find("<code>linux/arm/v6</code>").unwrap();
    let i386 = p.body.find("<code>linux/386</code>").unwrap();
    assert!(v6 < i386);
    // The app as it runs and as the fleet wants it.
    p.says("demo-1")
        .says("sha256:feed")
        .says("healthy")
        .says("sensor-1");
    assert!(p.body.contains("<td class=\"num\">3</td>"), "restarts");
    // The history: the rollback's cause by what fixes it, and the device's reason as text.
    p.says("rolled back")
        .says("wrong variant (SIGILL, page size, ELF mismatch)")
        .says(&format!("wrong architecture variant: SIGILL {XSS}"));
    assert!(!p.body.contains("<img"), "device text rendered as markup");
    // On the list, the device's app text is as inert.
    let list = d.page("/devices").await;
    list.says(XSS);
    assert!(!list.body.contains("<img"));

    let missing = d.get("/devices/no-such-device").await;
    assert_eq!(missing.status, 404);
    missing.says("There is no device named no-such-device.");
}

fn samples(d: &Dash) -> u32 {
    rusqlite::Connection::open(&d.db)
        .unwrap()
        .query_row("SELECT count(*) FROM device_samples", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn metrics_are_sampled_every_five_minutes_and_charted() {
    let d = Dash::signed_in().await;
    let pi = d.enroll("pi-7", &["linux/arm/v6"], "Pi Zero").await;
    d.report(&pi, vec![heartbeat(20.0)]).await;
    d.server.flush().await.unwrap();
    let one = d.page("/devices/pi-7").await;
    one.says("20.0 %")
        .says("48.5 °C")
        .says("50.0 %")
        .says("a chart needs two samples");
    assert!(
        !one.body.contains("Disk"),
        "a metric never reported has no row"
    );
    // Heartbeats within five minutes cost no sample.
    for cpu in [30.0, 40.0] {
        d.clock.step(60);
        d.report(&pi, vec![heartbeat(cpu)]).await;
        d.server.flush().await.unwrap();
    }
    assert_eq!(samples(&d), 1);
    let stored: String = rusqlite::Connection::open(&d.db)
        .unwrap()
        .query_row("SELECT metrics FROM device_samples", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        stored,
        r#"{"cpu_percent":20.0,"memory_total":536870912,"memory_used":268435456,"temperature_celsius":48.5}"#,
        "a sample keeps what the charts read, no nulls"
    );
    d.clock.step(240);
    d.report(&pi, vec![heartbeat(80.0)]).await;
    d.server.flush().await.unwrap();
    assert_eq!(samples(&d), 2);
    let two = d.page("/devices/pi-7").await;
    two.says("80.0 %");
    assert!(two.body.contains("<svg class=\"spark\""), "{}", two.body);
    assert!(
        two.body
            .contains("<polyline points=\"0.0,29.0 100.0,1.0\">"),
        "{}",
        two.body
    );
    assert!(!two.body.contains(" style=\""));
    // Pruned with the week they are kept for.
    d.clock.step(8 * 86_400);
    d.server.prune_events().await.unwrap();
    assert_eq!(samples(&d), 0);
}

#[tokio::test]
async fn revoke_asks_first_then_revokes_as_the_api_does() {
    let d = Dash::signed_in().await;
    d.enroll("pi-7", &["linux/arm/v6"], "Pi Zero").await;
    let ask = d.form("/devices/pi-7", "/devices/pi-7/revoke", &[]).await;
    assert_eq!(ask.status, 200);
    assert!(
        ask.body.contains("Revoke <strong>pi-7</strong>?"),
        "{}",
        ask.body
    );
    assert!(ask.body.contains("name=\"confirm\" value=\"yes\""));
    assert_eq!(device_api(&d, "pi-7").await["revoked"], false);
    let done = d
        .form(
            "/devices/pi-7",
            "/devices/pi-7/revoke",
            &[("confirm", "yes")],
        )
        .await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(done.header("location"), "/devices/pi-7");
    assert_eq!(device_api(&d, "pi-7").await["revoked"], true);
    let page = d.page("/devices/pi-7").await;
    page.says("This device is revoked");
    assert!(
        !page.body.contains("/devices/pi-7/revoke"),
        "no second revoke"
    );
    assert_eq!(listed(&d.page("/devices").await.body), Vec::<String>::new());
    assert_eq!(
        listed(&d.page("/devices?state=revoked").await.body),
        ["pi-7"]
    );
}

#[tokio::test]
async fn tags_are_set_and_removed_and_a_bad_tag_keeps_the_form() {
    let d = Dash::signed_in().await;
    d.enroll("pi-7", &["linux/arm/v6"], "Pi Zero").await;
    let ok = d
        .form(
            "/devices/pi-7",
            "/devices/pi-7/tags",
            &[("set", "ring=canary\r\nfloor = 2\r\n"), ("remove", "site")],
        )
        .await;
    assert_eq!(ok.status, 303, "{}", ok.body);
    assert_eq!(
        device_api(&d, "pi-7").await["tags"],
        json!({"ring": "canary", "floor": "2"})
    );
    let bad = d
        .form(
            "/devices/pi-7",
            "/devices/pi-7/tags",
            &[
                ("set", "ring=stable\nbad tag=<b>x</b>"),
                ("remove", "floor"),
            ],
        )
        .await;
    assert_eq!(bad.status, 422);
    bad.says("the tag \"bad tag\" must be 1 to 63 letters");
    assert!(
        bad.body
            .contains("ring=stable\nbad tag=&lt;b&gt;x&lt;/b&gt;</textarea>"),
        "the form keeps what was typed: {}",
        bad.body
    );
    assert!(bad.body.contains("value=\"floor\" checked"), "{}", bad.body);
    let no_equals = d
        .form("/devices/pi-7", "/devices/pi-7/tags", &[("set", "canary")])
        .await;
    assert_eq!(no_equals.status, 422);
    no_equals.says("Line 1: \"canary\" is not key=value");
    assert_eq!(
        device_api(&d, "pi-7").await["tags"],
        json!({"ring": "canary", "floor": "2"}),
        "nothing changed"
    );
}

#[tokio::test]
async fn an_expired_session_keeps_the_tags_being_sent() {
    let d = Dash::signed_in().await;
    d.enroll("pi-7", &["linux/arm/v6"], "Pi Zero").await;
    let csrf = d.page("/devices/pi-7").await.csrf();
    d.clock.step(13 * 3600);
    let a = d
        .raw_post(
            "/devices/pi-7/tags",
            &[("csrf", csrf.as_str()), ("set", "ring=canary")],
            &[("sec-fetch-site", "same-origin")],
        )
        .await;
    assert_eq!(a.status, 401);
    a.says("Your session ended before the form you sent was taken");
    assert!(
        a.body.contains("name=\"kept.set\" value=\"ring=canary\""),
        "{}",
        a.body
    );
    assert!(
        a.body
            .contains("name=\"next\" value=\"/devices/pi-7/tags\"")
    );
    assert_eq!(device_api(&d, "pi-7").await["tags"], json!({"site": "lab"}));
}
