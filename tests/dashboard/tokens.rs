//! The tokens page: create (the secret once), list (never a secret), revoke; refused input keeps what was typed.

use serde_json::Value;

use crate::{Answer, Dash};

/// The text of the `<pre>` whose id is `id`.
fn pre(a: &Answer, id: &str) -> String {
    let at = a
        .body
        .find(&format!("<pre class=\"mono\" id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}:\n{}", a.body));
    let rest = &a.body[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest.find("</pre>").unwrap();
    rest[start..end].to_string()
}

async fn api_tokens(d: &Dash) -> Vec<Value> {
    d.api("GET", "/v1/tokens", None, 200)
        .await
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_token_made_on_the_page_shows_its_secret_once_enrolls_and_is_listed_without_it() {
    let d = Dash::signed_in().await;
    let empty = d.page("/tokens").await;
    empty.says("None yet.");
    assert!(
        empty.body.contains("name=\"uses\" value=\"1\""),
        "defaults: one use"
    );
    assert!(
        empty.body.contains("name=\"expires\" value=\"24h\""),
        "defaults: a day"
    );

    let made = d
        .form(
            "/tokens",
            "/tokens",
            &[
                ("uses", "3"),
                ("expires", "7d"),
                ("tags", "site=north\r\n\r\nrack = r2\r\n"),
                ("device_tags", "on"),
            ],
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let secret = pre(&made, "secret");
    assert!(secret.len() >= 32, "{secret:?}");
    made.says("shown this once");
    assert_eq!(
        made.header("cache-control"),
        "no-store",
        "no cache keeps the secret"
    );
    made.says(&format!(
        "umask 077; echo '{secret}' > /etc/flotilla/enroll-token && systemctl restart flotilla"
    ));

    // What the API lists: the limits and tags typed, the expiry seven days on, and no secret.
    let listed = api_tokens(&d).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let t = &listed[0];
    assert_eq!(t["uses_left"], 3);
    assert_eq!(
        t["expires"].as_u64().unwrap() - t["created"].as_u64().unwrap(),
        7 * 86_400
    );
    assert_eq!(t["tags"]["site"], "north");
    assert_eq!(t["tags"]["rack"], "r2");
    assert_eq!(t["device_tags"], true);
    let id = t["id"].as_str().unwrap().to_string();

    // The secret enrolls a device, which gets the token's tags.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/enroll", d.base))
        .bearer_auth(&secret)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({
                "name": "pi-north",
                "agent_version": "0.1.0",
                "platform": {"candidates": ["linux/arm/v6"], "page_size": 4096, "description": "Pi"},
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);

    let list = d.page("/tokens").await;
    assert!(!list.body.contains(&secret), "the list shows the secret");
    list.says(&id).says("rack=r2, site=north").says("taken");
    assert!(list.body.contains("<td class=\"num\">2</td>"), "uses left");
    assert!(
        list.body.contains("<td class=\"num\">1</td>"),
        "one enrolled"
    );
    // Nor does any other page afterwards.
    assert!(!d.page("/").await.body.contains(&secret));
}

#[tokio::test]
async fn unlimited_and_never_and_a_revoke_from_the_list() {
    let d = Dash::signed_in().await;
    let made = d
        .form(
            "/tokens",
            "/tokens",
            &[("uses", "unlimited"), ("expires", "never"), ("tags", "")],
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let t = &api_tokens(&d).await[0];
    assert_eq!(t["uses_left"], Value::Null);
    assert_eq!(t["expires"], Value::Null);
    assert_eq!(t["device_tags"], false);
    let id = t["id"].as_str().unwrap().to_string();
    let list = d.page("/tokens").await;
    list.says("unlimited").says("never").says("valid");
    assert!(
        list.body
            .contains(&format!("action=\"/tokens/{id}/revoke\""))
    );

    let revoked = d
        .form("/tokens", &format!("/tokens/{id}/revoke"), &[])
        .await;
    assert_eq!(revoked.status, 303, "{}", revoked.body);
    let after = d.page(revoked.header("location")).await;
    after.says(&format!("The token {id} is revoked"));
    assert!(
        !after
            .body
            .contains(&format!("action=\"/tokens/{id}/revoke\""))
    );
    assert_eq!(api_tokens(&d).await[0]["revoked"], true);

    // An empty form is refused, not taken for the defaults.
    let empty = d.form("/tokens", "/tokens", &[]).await;
    assert_eq!(empty.status, 422);
    // Without the form's CSRF token, nothing is revoked.
    d.form("/tokens", "/tokens", &[("uses", "1"), ("expires", "1h")])
        .await;
    let revoked_of = |tokens: &[Value], id: &str| {
        tokens.iter().find(|t| t["id"] == id).expect("listed")["revoked"].clone()
    };
    let tokens = api_tokens(&d).await;
    let id2 = tokens
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .find(|t| *t != id)
        .expect("the second token");
    let forged = d
        .raw_post(
            &format!("/tokens/{id2}/revoke"),
            &[],
            &[("sec-fetch-site", "same-origin")],
        )
        .await;
    assert_eq!(forged.status, 403);
    assert_eq!(revoked_of(&api_tokens(&d).await, &id2), false);
    let missing = d.form("/tokens", "/tokens/nosuchtoken/revoke", &[]).await;
    assert_eq!(missing.status, 404);
    missing.says("nosuchtoken");
}

#[tokio::test]
async fn refused_input_says_why_and_keeps_what_was_typed() {
    let d = Dash::signed_in().await;
    let cases: [(&str, &str, &str, &str); 5] = [
        ("0", "24h", "site=north", "0 uses enrolls nobody"),
        ("many", "24h", "site=north", "Uses: \"many\" is neither"),
        (
            "2",
            "tomorrow",
            "site=north",
            "Expires: \"tomorrow\" is not a duration",
        ),
        (
            "2",
            "24h",
            "site=north\njust-a-word",
            "Tags, line 2: \"just-a-word\" is not TAG=VALUE.",
        ),
        ("2", "24h", "<img src=x onerror=alert(1)>=x", "tags"),
    ];
    for (uses, expires, tags, why) in cases {
        let a = d
            .form(
                "/tokens",
                "/tokens",
                &[
                    ("uses", uses),
                    ("expires", expires),
                    ("tags", tags),
                    ("device_tags", "on"),
                ],
            )
            .await;
        assert_eq!(a.status, 422, "{uses} {expires} {tags}: {}", a.body);
        a.says(why);
        assert!(
            a.body.contains(&format!("name=\"uses\" value=\"{uses}\"")),
            "uses kept: {}",
            a.body
        );
        assert!(
            a.body
                .contains(&format!("name=\"expires\" value=\"{expires}\""))
        );
        a.says(tags);
        assert!(!a.body.contains("<img"), "device-free text still escaped");
        assert!(a.body.contains("name=\"device_tags\" value=\"on\" checked"));
    }
    assert!(api_tokens(&d).await.is_empty(), "nothing was made");
}
