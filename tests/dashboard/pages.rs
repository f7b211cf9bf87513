//! Sign-in, the layout's protections, the overview and unknown pages.

use crate::Dash;

#[tokio::test]
async fn pages_need_a_session_and_sign_in_gives_one() {
    let mut d = Dash::start().await;
    let a = d.get("/?state=failed").await;
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), "/signin?next=%2F%3Fstate%3Dfailed");
    let form = d.page("/signin?next=%2Fdevices").await;
    form.says("Operator token");
    assert!(form.body.contains("name=\"next\" value=\"/devices\""));

    let wrong = d
        .raw_post("/signin", &[("token", "not-a-token"), ("next", "/")], &[])
        .await;
    assert_eq!(wrong.status, 401);
    wrong.says("That is not an operator token of this server.");

    let ok = d
        .raw_post(
            "/signin",
            &[("token", d.admin.as_str()), ("next", "//evil.example/")],
            &[],
        )
        .await;
    assert_eq!(ok.status, 303);
    assert_eq!(ok.header("location"), "/", "no open redirect");
    let cookie = ok.header("set-cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP on loopback");
    d.sign_in().await;
    let home = d.page("/").await;
    home.says("Overview").says("Sign out");

    // Sign-out ends the session on the server, not only in this browser.
    let cookie = d.cookie.clone();
    let out = d.form("/", "/signout", &[]).await;
    assert_eq!(out.status, 303);
    d.cookie = cookie;
    assert_eq!(d.get("/").await.status, 303, "the old cookie is dead");
}

#[tokio::test]
async fn every_answer_carries_a_strict_content_security_policy() {
    let d = Dash::signed_in().await;
    for path in ["/", "/signin", "/no/such/page"] {
        let a = d.get(path).await;
        let csp = a.header("content-security-policy");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(a.header("x-frame-options"), "DENY");
        assert!(!a.body.contains("<script>"), "{path} has an inline script");
        assert!(!a.body.contains(" style=\""), "{path} has an inline style");
    }
    let js = d.page("/static/app.js").await;
    assert!(js.header("content-type").starts_with("text/javascript"));
}

#[tokio::test]
async fn unknown_pages_get_a_real_404_page_and_unknown_api_paths_json() {
    let d = Dash::signed_in().await;
    let a = d.get("/no/such/page").await;
    assert_eq!(a.status, 404);
    assert!(a.header("content-type").starts_with("text/html"));
    a.says("There is no page at /no/such/page.");
    let api = d.get("/v1/no-such-route").await;
    assert_eq!(api.status, 404);
    assert!(api.body.starts_with("{\"error\":"), "{}", api.body);
}

#[tokio::test]
async fn cross_site_posts_are_refused_and_forms_need_the_csrf_token() {
    let d = Dash::signed_in().await;
    let csrf = d.page("/").await.csrf();
    let cross = d
        .raw_post(
            "/signout",
            &[("csrf", csrf.as_str())],
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(cross.status, 403);
    cross.says("a request from another site was refused");
    let other_origin = d
        .raw_post(
            "/signout",
            &[("csrf", csrf.as_str())],
            &[("origin", "http://evil.example")],
        )
        .await;
    assert_eq!(other_origin.status, 403);
    let no_token = d
        .raw_post("/signout", &[], &[("sec-fetch-site", "same-origin")])
        .await;
    assert_eq!(no_token.status, 403);
    no_token.says("CSRF token");
    assert_eq!(d.get("/").await.status, 200, "still signed in");
}

#[tokio::test]
async fn an_expired_session_keeps_the_form_it_was_sending() {
    let d = Dash::signed_in().await;
    let csrf = d.page("/").await.csrf();
    d.clock.step(13 * 3600);
    let a = d
        .raw_post(
            "/signout",
            &[("csrf", csrf.as_str()), ("set", "site=<b>roof</b>")],
            &[("sec-fetch-site", "same-origin")],
        )
        .await;
    assert_eq!(a.status, 401);
    a.says("Your session ended before the form you sent was taken");
    assert!(
        a.body
            .contains("name=\"kept.set\" value=\"site=&lt;b&gt;roof&lt;/b&gt;\""),
        "{}",
        a.body
    );
    assert!(a.body.contains("name=\"next\" value=\"/signout\""));
    assert!(!a.body.contains(&csrf), "the stale CSRF token is not kept");
    let admin = d.admin.clone();
    let again = d
        .raw_post(
            "/signin",
            &[
                ("token", admin.as_str()),
                ("next", "/signout"),
                ("kept.set", "site=<b>roof</b>"),
            ],
            &[],
        )
        .await;
    assert_eq!(again.status, 200);
    again
        .says("This is what you were sending to")
        .says("site=<b>roof</b>");
    assert!(again.body.contains("action=\"/signout\""));
    assert!(again.header("set-cookie").starts_with("flotilla_session="));
}

#[tokio::test]
async fn the_overview_counts_devices_by_state_platform_and_release() {
    let d = Dash::signed_in().await;
    let empty = d.page("/").await;
    empty.says("No device has enrolled yet.");
    let zero = d.enroll("pi-zero", &["linux/arm/v6"], "Pi Zero W").await;
    d.enroll(
        "pi-4",
        &["linux/arm64", "linux/arm/v7", "linux/arm/v6"],
        "Pi 4",
    )
    .await;
    d.enroll("nuc", &["linux/amd64"], "<img src=x onerror=alert(1)>")
        .await;
    d.report(
        &zero,
        vec![flotilla::fleet::EventBody::App(
            flotilla::fleet::AppStatus {
                app: "demo".into(),
                release: Some("demo-1".into()),
                manifest: None,
                platform: Some("linux/arm/v6".into()),
                state: "running".into(),
                restarts: 0,
                health: None,
                wrong_variant: None,
            },
        )],
    )
    .await;
    let o = d.page("/").await;
    o.says("linux/arm/v6")
        .says("linux/arm64")
        .says("linux/amd64")
        .says("demo-1");
    assert!(o.body.contains("<div class=\"n\">3</div>"), "{}", o.body);
    assert!(
        o.body
            .contains("href=\"/devices?platform=linux%2Farm%2Fv6\"")
    );
    // The clock moves on without a word from any device: all three are offline.
    d.clock.step(600);
    let later = d.page("/").await;
    assert!(
        later
            .body
            .contains("<div class=\"n\">3</div><span class=\"state state-offline\">"),
        "{}",
        later.body
    );
}
