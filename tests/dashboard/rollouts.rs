//! Releases (digests, coverage), starting a rollout from one with a preview, a rollout's wave bars and failures by
//! cause, its actions, and retrying its failed devices through to the device's desired state.

use flotilla::fleet::{Enrolled, EventBody};
use flotilla::update::Report;
use serde_json::{Value, json};

use crate::{Answer, Dash};

/// The page's HTML holds `html` as it is (markup, not text).
#[track_caller]
fn has<'a>(a: &'a Answer, html: &str) -> &'a Answer {
    assert!(a.body.contains(html), "the page lacks {html}:\n{}", a.body);
    a
}

const ARM64: &[&str] = &["linux/arm64/v8", "linux/arm/v7"];

/// An app `sensor` with a release of `image`; the release's id.
async fn release(d: &Dash, image: &str) -> String {
    if d.api("GET", "/v1/apps", None, 200)
        .await
        .as_array()
        .unwrap()
        .is_empty()
    {
        d.api("POST", "/v1/apps", Some(json!({"name": "sensor"})), 201)
            .await;
    }
    d.api(
        "POST",
        "/v1/releases",
        Some(json!({"app": "sensor", "image": image})),
        201,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn rollout(d: &Dash, release: &str, waves: &[&str], max_failures: &str) -> u64 {
    d.api(
        "POST",
        "/v1/rollouts",
        Some(json!({"release": release, "waves": waves, "max_failures": max_failures, "rollback": true})),
        201,
    )
    .await["id"]
        .as_u64()
        .unwrap()
}

fn update(report: Report) -> Vec<EventBody> {
    vec![EventBody::Update {
        app: "sensor".into(),
        report,
    }]
}

fn rolled_back(release: &str, reason: &str, wrong_variant: bool) -> Vec<EventBody> {
    update(Report::RolledBack {
        release: release.into(),
        to: None,
        reason: reason.into(),
        wrong_variant,
    })
}

fn committed(release: &str) -> Vec<EventBody> {
    update(Report::Committed {
        release: release.into(),
    })
}

/// What the device reads as its desired state, with its own credential.
async fn desired(d: &Dash, device: &Enrolled) -> Value {
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/device/desired", d.base))
        .bearer_auth(&device.credential)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    serde_json::from_str(&resp.text().await.unwrap()).unwrap()
}

#[tokio::test]
async fn releases_show_their_digests_and_the_devices_they_cannot_serve() {
    let d = Dash::signed_in().await;
    d.enroll("pi4", ARM64, "Raspberry Pi 4").await;
    d.enroll("zero", &["linux/arm/v6"], "Pi Zero W").await;
    d.enroll("nuc", &["linux/amd64/v3", "linux/amd64"], "NUC")
        .await;
    let all = release(&d, "registry.local/sensor:1").await;
    let narrow = release(&d, "registry.local/sensor:arm64-only").await;

    let list = d.page("/releases").await;
    list.says("sensor")
        .says(&all)
        .says(&narrow)
        .says("linux/arm/v6")
        .says("registry.local/sensor@sha256:");
    assert!(
        list.body.find(&narrow).unwrap() < list.body.find(&format!(">{all}<")).unwrap(),
        "newest first"
    );

    let page = d.page(&format!("/releases/{narrow}")).await;
    page.says("1 of 3 devices can run this release; 2 cannot.");
    let cannot = &page.body[page
        .body
        .find("id=\"cannot\"")
        .expect("a list of devices it cannot serve")..];
    assert!(
        cannot.contains(">zero<") && cannot.contains(">nuc<"),
        "{cannot}"
    );
    assert!(
        !cannot.contains(">pi4<"),
        "linux/arm64 in the index serves a device that says linux/arm64/v8: {cannot}"
    );
    assert!(cannot.contains("linux/arm/v6"), "with its platforms");
    // The coverage is the planner's: a rollout of it lists the same devices as incompatible.
    let id = rollout(&d, &narrow, &["100%"], "1").await;
    let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
    let incompatible: Vec<&str> = r["incompatible"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["device"].as_str().unwrap())
        .collect();
    assert_eq!(incompatible, ["nuc", "zero"]);
    assert_eq!(r["waves"][0]["devices"], json!(["pi4"]));
    let page = d.page(&format!("/releases/{narrow}")).await;
    page.says("Rollouts of this release");
    has(&page, &format!("href=\"/rollouts/{id}\""));

    let full = d.page(&format!("/releases/{all}")).await;
    full.says("3 of 3 devices can run this release; 0 cannot.")
        .lacks("id=\"cannot\"");
    assert_eq!(d.get("/releases/no-such-release").await.status, 404);
}

#[tokio::test]
async fn a_rollout_starts_from_a_release_after_a_preview_of_its_waves() {
    let d = Dash::signed_in().await;
    for n in ["dev-d", "dev-b", "dev-a", "dev-c"] {
        d.enroll(n, ARM64, "Pi 4").await;
    }
    d.enroll("zero", &["linux/arm/v6"], "Pi Zero").await;
    let id = release(&d, "registry.local/sensor:arm64-only").await;
    let form = d.page(&format!("/releases/{id}/rollout")).await;
    form.says("10%,50%,100%").lacks("id=\"preview\"");

    let query = "select=site%3Dlab&waves=25%25%2C100%25&max_failures=1&soak_secs=0&device_timeout_secs=600&rollback=1&preview=1";
    let preview = d.page(&format!("/releases/{id}/rollout?{query}")).await;
    has(
        &preview,
        "<td>1</td><td class=\"num\">1</td><td><a href=\"/devices/dev-a\">dev-a</a></td>",
    );
    has(
        &preview,
        "<td>2</td><td class=\"num\">3</td><td><a href=\"/devices/dev-b\">dev-b</a>, \
             <a href=\"/devices/dev-c\">dev-c</a>, <a href=\"/devices/dev-d\">dev-d</a></td>",
    );
    let incompatible = &preview.body[preview.body.find("id=\"preview-incompatible\"").unwrap()..];
    assert!(incompatible.contains(">zero<"), "{incompatible}");
    assert_eq!(
        d.api("GET", "/v1/rollouts", None, 200).await,
        json!([]),
        "a preview starts nothing"
    );

    let started = d
        .form(
            &format!("/releases/{id}/rollout?{query}"),
            &format!("/releases/{id}/rollout"),
            &[
                ("select", "site=lab"),
                ("waves", "25%,100%"),
                ("max_failures", "1"),
                ("soak_secs", "0"),
                ("device_timeout_secs", "600"),
                ("rollback", "1"),
            ],
        )
        .await;
    assert_eq!(started.status, 303, "{}", started.body);
    assert_eq!(started.header("location"), "/rollouts/1");
    let r = d.api("GET", "/v1/rollouts/1", None, 200).await;
    assert_eq!(r["spec"]["waves"], json!(["25%", "100%"]));
    assert_eq!(r["spec"]["select"], json!({"site": "lab"}));
    assert_eq!(r["spec"]["device_timeout_secs"], 600);
    assert_eq!(r["spec"]["skip_timed_out"], false, "an unticked box is no");
    assert_eq!(r["waves_started"], 1);
    assert_eq!(r["waves"][0]["devices"], json!(["dev-a"]));
}

#[tokio::test]
async fn a_refused_rollout_form_keeps_the_operators_values_and_says_why() {
    let d = Dash::signed_in().await;
    d.enroll("pi4", ARM64, "Pi 4").await;
    let id = release(&d, "registry.local/sensor:1").await;
    let action = format!("/releases/{id}/rollout");
    let bad = d
        .form(
            &action,
            &action,
            &[
                ("select", "site=lab"),
                ("waves", "10%,lots"),
                ("max_failures", "2"),
                ("soak_secs", "30"),
                ("device_timeout_secs", "600"),
            ],
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    bad.says("waves[1]");
    for kept in ["value=\"10%,lots\"", "value=\"site=lab\"", "value=\"30\""] {
        has(&bad, kept);
    }
    assert!(
        !bad.body.contains("name=\"rollback\" value=\"1\" checked"),
        "the unticked box stays unticked"
    );
    let tags = d
        .form(
            &action,
            &action,
            &[
                ("select", "lab"),
                ("waves", "100%"),
                ("max_failures", "1"),
                ("soak_secs", "0"),
                ("device_timeout_secs", "0"),
            ],
        )
        .await;
    assert_eq!(tags.status, 422);
    tags.says("is not TAG=VALUE");
    let preview = d
        .get(&format!(
            "{action}?waves=0%25&max_failures=1&soak_secs=0&device_timeout_secs=0&preview=1"
        ))
        .await;
    assert_eq!(preview.status, 422);
    has(preview.says("waves[0]"), "value=\"0%\"");
    assert_eq!(d.api("GET", "/v1/rollouts", None, 200).await, json!([]));
}

#[tokio::test]
async fn wave_bars_count_and_failures_are_grouped_by_cause_with_the_reason_inert() {
    let d = Dash::signed_in().await;
    let ok = d.enroll("dev-ok", ARM64, "Pi 4").await;
    let sigill = d.enroll("dev-sigill", ARM64, "Pi 4").await;
    let crash = d.enroll("dev-crash", ARM64, "Pi 4").await;
    let _slow = d.enroll("dev-slow", ARM64, "Pi 4").await;
    d.enroll("zero", &["linux/arm/v6"], "Pi Zero").await;
    let rel = release(&d, "registry.local/sensor:arm64-only").await;
    let id = rollout(&d, &rel, &["100%"], "3").await;
    let page = d.page(&format!("/rollouts/{id}")).await;
    page.says("4 devices: 4 ordered · 0 updating · 0 healthy · 0 failed · 0 timed out")
        .says("1 incompatible (never ordered)")
        .says("No device failed the release.");
    assert!(page.body.contains("id=\"progress\" data-refresh=\"5\""));

    d.report(&ok, committed(&rel)).await;
    d.report(
        &sigill,
        rolled_back(
            &rel,
            "wrong architecture variant: SIGILL on linux/arm64/v8",
            true,
        ),
    )
    .await;
    let xss = "<img src=x onerror=alert(1)>";
    d.report(
        &crash,
        rolled_back(&rel, &format!("exit code 1: {xss}"), false),
    )
    .await;
    d.report(
        &_slow,
        update(Report::Preparing {
            release: rel.clone(),
        }),
    )
    .await;
    let page = d.page(&format!("/rollouts/{id}")).await;
    page.says("4 devices: 0 ordered · 1 updating · 1 healthy · 2 failed · 0 timed out");
    has(&page, "class=\"healthy w-25\"");
    has(&page, "class=\"failed w-50\"");
    let cause = |slug: &str| {
        let at = page
            .body
            .find(&format!("id=\"cause-{slug}\""))
            .unwrap_or_else(|| panic!("no cause {slug}: {}", page.body));
        let rest = &page.body[at..];
        rest[..rest[1..]
            .find("class=\"cause\"")
            .map_or(rest.len(), |e| e + 1)]
            .to_string()
    };
    let wrong = cause("wrong-variant");
    assert!(
        wrong.contains(">dev-sigill<") && !wrong.contains("dev-crash"),
        "{wrong}"
    );
    assert!(wrong.contains("SIGILL on linux/arm64/v8"));
    let crashed = cause("crash");
    assert!(
        crashed.contains(">dev-crash<") && !crashed.contains("dev-sigill"),
        "{crashed}"
    );
    page.says(&format!("exit code 1: {xss}")).lacks("<img");
    assert!(page.body.contains("href=\"/devices/dev-crash\""));
}

#[tokio::test]
async fn pause_resume_and_abort_change_the_rollouts_state() {
    let d = Dash::signed_in().await;
    d.enroll("pi4", ARM64, "Pi 4").await;
    let rel = release(&d, "registry.local/sensor:1").await;
    let id = rollout(&d, &rel, &["100%"], "1").await;
    let page = format!("/rollouts/{id}");
    // A device that enrolls while the rollout runs joins its last wave, and is listed as late.
    d.enroll("late-pi", ARM64, "Pi 4").await;
    let late = d.page(&page).await;
    late.says("Late (joined the last wave after the start)");
    has(
        &late,
        "<p id=\"late\"><a href=\"/devices/late-pi\">late-pi</a></p>",
    );
    let state = |v: Value| v["status"]["state"].as_str().unwrap().to_string();
    for (action, want) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("abort", "aborted"),
    ] {
        let a = d
            .form(&page, &format!("/rollouts/{id}/{action}"), &[])
            .await;
        assert_eq!(a.status, 303, "{action}: {}", a.body);
        assert_eq!(a.header("location"), page);
        let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
        assert_eq!(state(r), want, "after {action}");
    }
    let ended = d.page(&page).await;
    ended.lacks("/rollouts/1/pause").lacks("/rollouts/1/abort");
    let again = d
        .form("/rollouts", &format!("/rollouts/{id}/resume"), &[])
        .await;
    assert_eq!(again.status, 400, "an aborted rollout takes no action");
    again.says("has ended");
    d.page("/rollouts").await.says("aborted").says(&rel);
    for missing in ["/rollouts/99", "/rollouts/abc"] {
        assert_eq!(d.get(missing).await.status, 404, "{missing}");
    }
}

#[tokio::test]
async fn retry_orders_the_failed_device_again_at_a_new_attempt_and_the_rollout_runs_on() {
    let d = Dash::signed_in().await;
    let good = d.enroll("dev-good", ARM64, "Pi 4").await;
    let bad = d.enroll("dev-bad", ARM64, "Pi 4").await;
    let rel = release(&d, "registry.local/sensor:1").await;
    let id = rollout(&d, &rel, &["100%"], "1").await;
    d.report(&good, committed(&rel)).await;
    d.report(&bad, rolled_back(&rel, "exit code 1", false))
        .await;
    let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
    assert_eq!(r["status"]["state"], "paused", "at the threshold: {r}");
    // Rolled back, and dev-bad never committed anything: it is ordered to run nothing.
    assert_eq!(desired(&d, &bad).await["apps"], json!([]));
    let page = d.page(&format!("/rollouts/{id}")).await;
    page.says("Retry the failed devices");

    let retried = d
        .form(
            &format!("/rollouts/{id}"),
            &format!("/rollouts/{id}/retry"),
            &[],
        )
        .await;
    assert_eq!(retried.status, 303, "{}", retried.body);
    let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
    assert_eq!(r["status"]["state"], "running", "{r}");
    assert_eq!(r["devices"]["dev-bad"], "waiting");
    assert_eq!(r["waves"][0]["failed"], 0);
    let order = desired(&d, &bad).await;
    assert_eq!(order["apps"][0]["release"], rel.as_str(), "{order}");
    assert_eq!(order["apps"][0]["attempt"], 1, "{order}");
    let untouched = desired(&d, &good).await;
    assert!(
        untouched["apps"][0].get("attempt").is_none(),
        "attempt 0 is not sent: {untouched}"
    );
    d.page(&format!("/rollouts/{id}"))
        .await
        .says("No device failed the release.");

    // Failing again counts again; a second retry is the next attempt.
    d.report(&bad, rolled_back(&rel, "exit code 1 again", false))
        .await;
    let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
    assert_eq!(r["status"]["state"], "paused");
    let r = d
        .api("POST", &format!("/v1/rollouts/{id}/retry"), None, 200)
        .await;
    assert_eq!(r["status"]["state"], "running");
    assert_eq!(desired(&d, &bad).await["apps"][0]["attempt"], 2);
    d.report(&bad, committed(&rel)).await;
    let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
    assert_eq!(r["status"]["state"], "done", "{r}");

    // A rollout done with a failure below its threshold opens again for a retry, while it is the app's newest.
    let below = release(&d, "registry.local/sensor:3").await;
    let done = rollout(&d, &below, &["100%"], "5").await;
    d.report(&good, committed(&below)).await;
    d.report(&bad, rolled_back(&below, "exit code 3", false))
        .await;
    let r = d
        .api("GET", &format!("/v1/rollouts/{done}"), None, 200)
        .await;
    assert_eq!(r["status"]["state"], "done", "{r}");
    d.page(&format!("/rollouts/{done}"))
        .await
        .says("Retry the failed devices");
    let r = d
        .api("POST", &format!("/v1/rollouts/{done}/retry"), None, 200)
        .await;
    assert_eq!(r["status"]["state"], "running", "{r}");
    assert_eq!(desired(&d, &bad).await["apps"][0]["attempt"], 1);
    d.report(&bad, committed(&below)).await;
    let r = d
        .api("GET", &format!("/v1/rollouts/{done}"), None, 200)
        .await;
    assert_eq!(r["status"]["state"], "done", "{r}");

    // A pause by the operator is the operator's: a retry does not lift it.
    let other = release(&d, "registry.local/sensor:2").await;
    let id = rollout(&d, &other, &["100%"], "5").await;
    d.report(&bad, rolled_back(&other, "exit code 2", false))
        .await;
    d.api("POST", &format!("/v1/rollouts/{id}/pause"), None, 200)
        .await;
    let r = d
        .api("POST", &format!("/v1/rollouts/{id}/retry"), None, 200)
        .await;
    assert_eq!(r["status"]["state"], "paused");
    assert_eq!(r["devices"]["dev-bad"], "waiting");
    assert_eq!(desired(&d, &bad).await["apps"][0]["attempt"], 1);
    // An older rollout, done, is not opened again over the newer one.
    let refused = d
        .api("POST", &format!("/v1/rollouts/{done}/retry"), None, 400)
        .await;
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("the newer rollout 3"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_retried_timed_out_device_gets_a_new_timeout_from_the_retry() {
    let d = Dash::signed_in().await;
    let talks = d.enroll("dev-talks", ARM64, "Pi 4").await;
    d.enroll("dev-quiet", ARM64, "Pi 4").await;
    let rel = release(&d, "registry.local/sensor:1").await;
    let id = d
        .api(
            "POST",
            "/v1/rollouts",
            Some(json!({"release": rel, "waves": ["100%"], "max_failures": "1", "device_timeout_secs": 600})),
            201,
        )
        .await["id"]
        .as_u64()
        .unwrap();
    d.clock.step(700);
    d.report(&talks, committed(&rel)).await;
    d.server.drive().await.unwrap();
    let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
    assert_eq!(r["devices"]["dev-quiet"], "timed out", "{r}");
    assert_eq!(r["status"]["state"], "paused");
    let page = d.page(&format!("/rollouts/{id}")).await;
    page.says("1 timed out").says("Retry the failed devices");
    has(&page, "href=\"/devices/dev-quiet\"");

    let retried = d
        .form(
            &format!("/rollouts/{id}"),
            &format!("/rollouts/{id}/retry"),
            &[],
        )
        .await;
    assert_eq!(retried.status, 303, "{}", retried.body);
    let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
    assert_eq!(r["devices"]["dev-quiet"], "waiting", "a new window: {r}");
    assert_eq!(r["status"]["state"], "running");
    // Still silent a device timeout after the retry: timed out again.
    d.clock.step(600);
    d.server.drive().await.unwrap();
    let r = d.api("GET", &format!("/v1/rollouts/{id}"), None, 200).await;
    assert_eq!(r["devices"]["dev-quiet"], "timed out", "{r}");
}
