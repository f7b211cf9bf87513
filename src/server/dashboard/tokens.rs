//! Enrollment tokens: the list (never a secret: the server keeps only hashes), a form to make one, whose secret is
//! shown once on the answer, and revocation. Checked as the API's `POST /v1/tokens` is, by the same function.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};
use serde::Deserialize;

use super::session::Session;
use super::{Nav, Operator, PageError, Posted, Shared, csrf_field, encode, html_response, layout};
use crate::server::views::{TokenCreated, TokenRequest, TokenView};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/tokens", get(page).post(create))
        .route("/tokens/{id}/revoke", post(revoke))
}

/// The create form's fields as the operator typed them, kept when they are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenForm {
    uses: String,
    expires: String,
    tags: String,
    device_tags: bool,
}

impl Default for TokenForm {
    /// The API's defaults: one device, one day.
    fn default() -> TokenForm {
        TokenForm {
            uses: "1".into(),
            expires: "24h".into(),
            tags: String::new(),
            device_tags: false,
        }
    }
}

impl TokenForm {
    fn from_posted(p: &Posted) -> TokenForm {
        TokenForm {
            uses: p.get("uses").unwrap_or("").trim().to_string(),
            expires: p.get("expires").unwrap_or("").trim().to_string(),
            tags: p.get("tags").unwrap_or("").to_string(),
            device_tags: p.get("device_tags").is_some(),
        }
    }

    /// The request the API would have been sent; what does not read says which field and how to write it.
    fn request(&self) -> Result<TokenRequest, String> {
        let uses = match self.uses.as_str() {
            "unlimited" => None,
            s => Some(s.parse::<u32>().map_err(|_| {
                format!("Uses: {s:?} is neither a number of devices (1, 10) nor \"unlimited\".")
            })?),
        };
        let expires_in = match self.expires.as_str() {
            "never" => None,
            s => Some(parse_expiry(s).ok_or_else(|| {
                format!("Expires: {s:?} is not a duration (30m, 24h, 7d) nor \"never\".")
            })?),
        };
        let mut tags = BTreeMap::new();
        for (i, line) in self.tags.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(format!("Tags, line {}: {line:?} is not TAG=VALUE.", i + 1));
            };
            if tags
                .insert(k.trim().to_string(), v.trim().to_string())
                .is_some()
            {
                return Err(format!(
                    "Tags, line {}: the tag {:?} is given twice.",
                    i + 1,
                    k.trim()
                ));
            }
        }
        Ok(TokenRequest {
            expires_in,
            uses,
            tags,
            device_tags: self.device_tags,
        })
    }
}

/// Seconds: `30m`, `24h`, `7d`, as the command line's `--expires` reads them.
fn parse_expiry(s: &str) -> Option<u64> {
    crate::app::parse_duration("expires", s)
        .ok()
        .map(|d: Duration| d.as_secs())
}

#[derive(Deserialize)]
struct ListQuery {
    revoked: Option<String>,
}

async fn page(
    State(s): State<Shared>,
    Operator(session): Operator,
    Query(q): Query<ListQuery>,
) -> Result<Response, PageError> {
    let notice = q.revoked.map(|id| {
        format!("The token {id} is revoked: it enrolls nobody from now on. Devices it enrolled stay enrolled.")
    });
    list_page(
        &s,
        &session,
        StatusCode::OK,
        &TokenForm::default(),
        None,
        notice,
    )
    .await
}

async fn list_page(
    s: &Shared,
    session: &Session,
    status: StatusCode,
    form: &TokenForm,
    error: Option<&str>,
    notice: Option<String>,
) -> Result<Response, PageError> {
    let tokens = s.with_db(|db| db.tokens()).await?;
    let now = s.now();
    let body = html! {
        @if let Some(n) = &notice { p.notice { (n) } }
        h2 { "New token" }
        (create_form(session, form, error))
        h2 { "Tokens" }
        @if tokens.is_empty() {
            p.muted { "None yet." }
        } @else {
            (token_table(session, &tokens, now))
        }
    };
    Ok(html_response(
        status,
        layout("Tokens", Nav::Tokens, Some(session), body),
    ))
}

fn create_form(session: &Session, form: &TokenForm, error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error { p.error #token-error { (e) } }
        form.stack #new-token method="post" action="/tokens" {
            (csrf_field(session))
            label for="uses" { "Uses" }
            input #uses name="uses" value=(form.uses) size="12" required;
            span.muted { " devices that may enroll with it, or " code { "unlimited" } }
            label for="expires" { "Expires after" }
            input #expires name="expires" value=(form.expires) size="12" required;
            span.muted { " 30m, 24h, 7d, or " code { "never" } }
            label for="tags" { "Tags every device enrolled with it gets" }
            textarea #tags name="tags" rows="3" cols="40" placeholder="site=north" { (form.tags) }
            label {
                input type="checkbox" name="device_tags" value="on" checked[form.device_tags];
                " Also take the tags a device asks for (the token's own win)"
            }
            p { button.primary type="submit" { "Create token" } }
        }
    }
}

fn date(secs: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

fn tags_text(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn token_table(session: &Session, tokens: &[TokenView], now: u64) -> Markup {
    html! {
        table #tokens {
            tr {
                th { "ID" } th { "Created" } th { "Expires" } th.num { "Uses left" } th.num { "Enrolled" }
                th { "Tags" } th { "Device tags" } th { "State" } th {}
            }
            @for t in tokens {
                @let state = t.state(now).slug();
                tr {
                    td { code { (t.id) } }
                    // Tokens made before the server kept a creation time.
                    td { @if t.created == 0 { span.muted { "-" } } @else { (date(t.created)) } }
                    td { @match t.expires { Some(e) => (date(e)), None => "never" } }
                    td.num { @match t.uses_left { Some(n) => (n), None => "unlimited" } }
                    td.num { (t.enrolled) }
                    td { @if t.tags.is_empty() { span.muted { "none" } } @else { code { (tags_text(&t.tags)) } } }
                    td { @if t.device_tags { "taken" } @else { span.muted { "ignored" } } }
                    td { (super::badge(state)) }
                    td {
                        @if !t.revoked {
                            form.inline method="post" action=(format!("/tokens/{}/revoke", encode(&t.id))) {
                                (csrf_field(session))
                                button.danger type="submit" { "Revoke" }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn create(State(s): State<Shared>, posted: Posted) -> Result<Response, PageError> {
    let form = TokenForm::from_posted(&posted);
    let refused = |message: String| {
        let s = s.clone();
        let session = posted.session.clone();
        let form = form.clone();
        async move {
            list_page(
                &s,
                &session,
                StatusCode::UNPROCESSABLE_ENTITY,
                &form,
                Some(&message),
                None,
            )
            .await
        }
    };
    let req = match form.request() {
        Ok(r) => r,
        Err(message) => return refused(message).await,
    };
    let created = match s.create_token(req).await {
        Ok(c) => c,
        Err(e) if e.status().is_client_error() => return refused(e.message().to_string()).await,
        Err(e) => return Err(e.into()),
    };
    Ok(html_response(
        StatusCode::CREATED,
        layout(
            "Token created",
            Nav::Tokens,
            Some(&posted.session),
            created_body(&created),
        ),
    ))
}

/// The one time the secret is shown: the server keeps only its hash.
fn created_body(t: &TokenCreated) -> Markup {
    let install = format!(
        "umask 077; echo '{}' > /etc/flotilla/enroll-token && systemctl restart flotilla",
        t.token
    );
    html! {
        p.notice { "Copy the secret now: it is shown this once, and the server keeps only its hash. Listed as "
                   code { (t.id) } "." }
        p { "Secret:" }
        pre #secret .mono { (t.token) }
        p {
            "On the device, as root, with " code { "[fleet] server" } " pointing at this server and "
            code { "token_file = \"/etc/flotilla/enroll-token\"" } " in " code { "/etc/flotilla/config.toml" }
            ": the agent enrolls at its next start and then deletes the file."
        }
        pre #install .mono { (install) }
        table {
            tr { th { "Uses" } td { @match t.uses { Some(n) => (n), None => "unlimited" } } }
            tr { th { "Expires" } td { @match t.expires { Some(e) => (date(e)), None => "never" } } }
            tr { th { "Tags" } td { @if t.tags.is_empty() { span.muted { "none" } } @else { code { (tags_text(&t.tags)) } } } }
            tr { th { "Device tags" } td { @if t.device_tags { "taken" } @else { "ignored" } } }
        }
        p { a href="/tokens" { "Back to the tokens" } }
    }
}

async fn revoke(
    State(s): State<Shared>,
    Path(id): Path<String>,
    _posted: Posted,
) -> Result<Response, PageError> {
    let revoked = id.clone();
    s.with_db(move |db| db.revoke_token(&revoked)).await?;
    Ok(Redirect::to(&format!("/tokens?revoked={}", encode(&id))).into_response())
}
