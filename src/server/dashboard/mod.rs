//! The operator's web dashboard at `/`, on the API's listener.
//!
//! Pages are rendered on the server with maud: templates are Rust, checked when the crate compiles, and every
//! interpolated value is HTML-escaped, so text a device sent (its platform description, a failure reason) is shown
//! and never runs. Every page works with JavaScript off; `static/app.js` (a few lines, served from the binary: no
//! CDN, fleets are often offline) only refreshes in place the parts a page marks `data-refresh`.
//!
//! Signing in with an operator (admin) token gives a session cookie (HttpOnly, SameSite=Strict, Secure under TLS,
//! twelve hours). A state-changing form is taken only when the request is not cross-site (`Sec-Fetch-Site`, else
//! `Origin`) and carries the session's CSRF token; the Content-Security-Policy allows no inline script or style.

pub mod cause;
pub mod device;
pub mod devices;
pub mod overview;
pub mod releases;
pub mod rollouts;
pub mod session;
mod tokens;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::api::{ApiError, Server};
use session::Session;

type Shared = Arc<Server>;

/// A form is a few fields; a tag list or a preserved form a few more.
const MAX_FORM_BYTES: usize = 64 * 1024;

pub fn router(server: Shared) -> Router {
    Router::new()
        .route("/", get(overview::page))
        .route("/signin", get(signin_page).post(signin))
        .route("/signout", post(signout))
        .route("/static/app.js", get(app_js))
        .route("/static/style.css", get(style_css))
        .merge(releases::routes())
        .merge(rollouts::routes())
        .merge(tokens::routes())
        .merge(devices::routes())
        .merge(device::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            protect,
        ))
        .with_state(server)
}

/// The headers every dashboard answer carries, and the request timeout the API's own guard gives its routes.
async fn protect(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let limit = s.limits().request_timeout;
    let mut resp = match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => error_page(
            StatusCode::REQUEST_TIMEOUT,
            "The request took too long. Send it again.",
        ),
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// The sections in the header's navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Devices,
    Releases,
    Rollouts,
    Tokens,
    None,
}

const NAV: [(Nav, &str, &str); 5] = [
    (Nav::Overview, "/", "Overview"),
    (Nav::Devices, "/devices", "Devices"),
    (Nav::Releases, "/releases", "Releases"),
    (Nav::Rollouts, "/rollouts", "Rollouts"),
    (Nav::Tokens, "/tokens", "Tokens"),
];

/// A whole page: the header with the navigation (and sign-out when signed in) around `body`.
pub fn layout(title: &str, nav: Nav, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · flotilla" }
                link rel="stylesheet" href="/static/style.css";
                script src="/static/app.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "flotilla" }
                    @if session.is_some() {
                        @for (item, href, label) in NAV {
                            a href=(href) class=[(item == nav).then_some("active")] { (label) }
                        }
                    }
                    @if let Some(s) = session {
                        form.inline method="post" action="/signout" {
                            (csrf_field(s))
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The hidden field every state-changing form carries.
pub fn csrf_field(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

pub fn html_response(status: StatusCode, page: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page.into_string(),
    )
        .into_response()
}

/// A page saying what went wrong, with a way back.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    html_response(
        status,
        layout(
            title,
            Nav::None,
            None,
            html! {
                p.error { (message) }
                p { a href="/" { "Back to the overview" } }
            },
        ),
    )
}

/// What a page handler returns when the database or the request says no: the page for it.
pub struct PageError(pub StatusCode, pub String);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> PageError {
        PageError(e.status(), e.message().to_string())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        error_page(self.0, &self.1)
    }
}

/// Unknown pages get a page saying so; unknown API paths the API's own JSON refusal.
async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/v1/") {
        return ApiError::new(StatusCode::NOT_FOUND, "no such route in the fleet API")
            .into_response();
    }
    error_page(
        StatusCode::NOT_FOUND,
        &format!("There is no page at {}.", uri.path()),
    )
}

async fn app_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/style.css"))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            // Not immutable: they change with the server's version and are small.
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// A signed-in operator; a page that takes one sends everybody else to sign in, and back here afterwards.
pub struct Operator(pub Session);

impl FromRequestParts<Shared> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &Shared) -> Result<Operator, Response> {
        match current_session(&parts.headers, s).await {
            Ok(Some(session)) => Ok(Operator(session)),
            Ok(None) => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                Err(Redirect::to(&format!("/signin?next={}", encode(&next))).into_response())
            }
            Err(e) => Err(PageError::from(e).into_response()),
        }
    }
}

async fn current_session(headers: &HeaderMap, s: &Shared) -> Result<Option<Session>, ApiError> {
    let Some(cookie) = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::cookie_value)
        .map(str::to_string)
    else {
        return Ok(None);
    };
    let now = s.now();
    s.with_db(move |db| db.session(&cookie, now)).await
}

/// A state-changing form from a signed-in operator's own dashboard: not cross-site, with the session's CSRF
/// token. Its fields, in order, the CSRF token left out.
pub struct Posted {
    pub session: Session,
    pub fields: Vec<(String, String)>,
}

impl Posted {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a field that may repeat (check boxes).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl FromRequest<Shared> for Posted {
    type Rejection = Response;

    async fn from_request(req: Request, s: &Shared) -> Result<Posted, Response> {
        if let Err(why) = same_origin(req.headers()) {
            return Err(error_page(StatusCode::FORBIDDEN, why));
        }
        let action = req.uri().path().to_string();
        let session = current_session(req.headers(), s)
            .await
            .map_err(|e| PageError::from(e).into_response())?;
        let fields = read_form(req).await?;
        let Some(session) = session else {
            // Signed out meanwhile (the session expired): sign in again, with what was being sent kept.
            return Err(html_response(
                StatusCode::UNAUTHORIZED,
                signin_form(&action, &fields, None),
            ));
        };
        let csrf = fields
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_str());
        if !csrf.is_some_and(|c| session::same_secret(c, &session.csrf)) {
            return Err(error_page(
                StatusCode::FORBIDDEN,
                "This form did not come from this dashboard (its CSRF token is missing or stale). Reload the page and send it again.",
            ));
        }
        let fields = fields.into_iter().filter(|(k, _)| k != "csrf").collect();
        Ok(Posted { session, fields })
    }
}

async fn read_form(req: Request) -> Result<Vec<(String, String)>, Response> {
    let body = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            error_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "The form is larger than 64 KiB.",
            )
        })?;
    Ok(url::form_urlencoded::parse(&body).into_owned().collect())
}

/// Refuses a request a browser says comes from another site. Browsers send `Sec-Fetch-Site` (all current ones)
/// or at least `Origin` on a POST; a client sending neither is not a browser acting for a victim, and still needs
/// the CSRF token.
fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    const CROSS_SITE: &str = "This dashboard takes forms only from its own pages; a request from another site was refused.";
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.as_bytes() {
            b"same-origin" | b"none" => Ok(()),
            _ => Err(CROSS_SITE),
        };
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, rest)| rest);
        return match (origin_host, host) {
            (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
            _ => Err(CROSS_SITE),
        };
    }
    Ok(())
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Only paths of this site: anything else (`//evil`, `https://…`) would make sign-in an open redirect.
fn local_path(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.starts_with("/\\") {
        next
    } else {
        "/"
    }
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn signin_page(State(s): State<Shared>, headers: HeaderMap, q: Query<NextQuery>) -> Response {
    let next = local_path(q.next.as_deref().unwrap_or("/")).to_string();
    if let Ok(Some(_)) = current_session(&headers, &s).await {
        return Redirect::to(&next).into_response();
    }
    html_response(StatusCode::OK, signin_form(&next, &[], None))
}

/// The sign-in form. After a lost session, `next` is the form's action and `kept` what it was sending: shown,
/// and sent again only when the operator says so after signing in.
fn signin_form(next: &str, kept: &[(String, String)], error: Option<&str>) -> Markup {
    let kept: Vec<_> = kept.iter().filter(|(k, _)| k != "csrf").collect();
    layout(
        "Sign in",
        Nav::None,
        None,
        html! {
            @if let Some(e) = error { p.error { (e) } }
            @if !kept.is_empty() {
                p.notice { "Your session ended before the form you sent was taken. It is kept: sign in, then send it again." }
            }
            form.stack method="post" action="/signin" {
                label for="token" { "Operator token" }
                input #token type="password" name="token" autocomplete="current-password" required size="50";
                p.muted { "The admin token: " code { "flotilla-server serve" } " wrote it next to the database, in " code { "admin-token" } "." }
                input type="hidden" name="next" value=(next);
                @for (k, v) in &kept {
                    input type="hidden" name=(format!("kept.{k}")) value=(v);
                }
                button.primary type="submit" { "Sign in" }
            }
        },
    )
}

async fn signin(State(s): State<Shared>, req: Request) -> Response {
    if let Err(why) = same_origin(req.headers()) {
        return error_page(StatusCode::FORBIDDEN, why);
    }
    if let Err(wait) = s.throttle("dashboard sign-in") {
        return s.too_many(wait);
    }
    let secure = s.tls()
        || req
            .headers()
            .get("x-forwarded-proto")
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let fields = match read_form(req).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let next = local_path(field("next")).to_string();
    let kept: Vec<(String, String)> = fields
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("kept.")?.to_string(), v.clone())))
        .collect();
    let token = field("token").trim().to_string();
    let now = s.now();
    let opened = if token.is_empty() || token.len() > 256 {
        Ok(None)
    } else {
        s.with_db(move |db| db.sign_in(&token, now)).await
    };
    let (cookie, session) = match opened {
        Ok(Some(opened)) => opened,
        Ok(None) => {
            return html_response(
                StatusCode::UNAUTHORIZED,
                signin_form(
                    &next,
                    &kept,
                    Some("That is not an operator token of this server."),
                ),
            );
        }
        Err(e) => return PageError::from(e).into_response(),
    };
    let mut set = format!(
        "{}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        session::COOKIE,
        session::SESSION_SECS
    );
    if secure {
        set.push_str("; Secure");
    }
    let mut resp = if kept.is_empty() {
        Redirect::to(&next).into_response()
    } else {
        html_response(StatusCode::OK, resend_page(&session, &next, &kept))
    };
    if let Ok(v) = HeaderValue::from_str(&set) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// After signing in again: the kept form, to send (with the new session's CSRF token) or drop.
fn resend_page(session: &Session, action: &str, kept: &[(String, String)]) -> Markup {
    layout(
        "Send your form again",
        Nav::None,
        Some(session),
        html! {
            p.notice { "You are signed in again. This is what you were sending to " code { (action) } ":" }
            table {
                @for (k, v) in kept { tr { th { (k) } td.mono { (v) } } }
            }
            form method="post" action=(action) {
                (csrf_field(session))
                @for (k, v) in kept { input type="hidden" name=(k) value=(v); }
                p { button.primary type="submit" { "Send it" } " " a href="/" { "Drop it" } }
            }
        },
    )
}

async fn signout(State(s): State<Shared>, posted: Posted) -> Response {
    let key = posted.session.key.clone();
    if let Err(e) = s.with_db(move |db| db.sign_out(&key)).await {
        return PageError::from(e).into_response();
    }
    let mut resp = Redirect::to("/signin").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("flotilla_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

/// "3 min ago", for last-seen columns.
pub fn ago(now: u64, then: u64) -> String {
    let d = now.saturating_sub(then);
    match d {
        0..60 => format!("{d} s ago"),
        60..3600 => format!("{} min ago", d / 60),
        3600..86400 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

/// The CSS class giving a bar segment `part / whole` of the width (the policy allows no inline style).
pub fn width_class(part: usize, whole: usize) -> &'static str {
    const CLASSES: [&str; 30] = [
        "w-0", "w-1", "w-2", "w-3", "w-4", "w-5", "w-6", "w-7", "w-8", "w-9", "w-10", "w-15",
        "w-20", "w-25", "w-30", "w-35", "w-40", "w-45", "w-50", "w-55", "w-60", "w-65", "w-70",
        "w-75", "w-80", "w-85", "w-90", "w-95", "w-100", "w-100",
    ];
    if whole == 0 || part == 0 {
        return "w-0";
    }
    let pct = (part.min(whole) * 100).div_ceil(whole);
    let i = if pct <= 10 { pct } else { 10 + (pct - 10) / 5 };
    CLASSES[i.min(28)]
}

/// A state as a coloured label.
pub fn badge(state: &str) -> Markup {
    html! { span class=(format!("state state-{state}")) { (state) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_round_up_so_a_failure_never_vanishes() {
        assert_eq!(width_class(0, 10), "w-0");
        assert_eq!(width_class(1, 1000), "w-1");
        assert_eq!(width_class(1, 2), "w-50");
        assert_eq!(width_class(7, 10), "w-70");
        assert_eq!(width_class(10, 10), "w-100");
        assert_eq!(width_class(11, 10), "w-100");
        assert_eq!(width_class(3, 0), "w-0");
    }

    #[test]
    fn sign_in_sends_only_to_this_site() {
        assert_eq!(local_path("/devices?page=2"), "/devices?page=2");
        assert_eq!(local_path("//evil.example/"), "/");
        assert_eq!(local_path("/\\evil.example/"), "/");
        assert_eq!(local_path("https://evil.example/"), "/");
    }

    #[test]
    fn cross_site_forms_are_refused() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h).is_ok());
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8443"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8443"),
        );
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(same_origin(&h).is_err());
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h).is_ok(), "Sec-Fetch-Site decides when sent");
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&h).is_err());
        h.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(
            same_origin(&h).is_err(),
            "a sibling subdomain is another app"
        );
    }
}
