//! One request, done right: authentication (a 401 challenge answered with a bearer token or Basic credentials),
//! redirects that never carry credentials to another host or downgrade HTTPS, and every failure sorted into
//! "retry" or "give up" with the error a user can act on.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use url::Url;

use super::auth::{self, Challenge};
use super::client::{Endpoint, RegistryClient};
use super::credentials::Credentials;
use super::retry::{self, Outcome};
use super::{At, RegistryError};

/// A failed attempt and whether trying again may help (with the server's `Retry-After`).
pub(super) struct Fault {
    pub(super) error: RegistryError,
    pub(super) retry: Option<Option<Duration>>,
}

impl Fault {
    pub(super) fn fatal(error: RegistryError) -> Fault {
        Fault { error, retry: None }
    }
    pub(super) fn retry(error: RegistryError, after: Option<Duration>) -> Fault {
        Fault {
            error,
            retry: Some(after),
        }
    }
}

pub(super) fn outcome<T>(r: Result<T, Fault>) -> Outcome<T, RegistryError> {
    match r {
        Ok(v) => Outcome::Done(v),
        Err(Fault {
            error,
            retry: Some(after),
        }) => Outcome::Retry(error, after),
        Err(Fault { error, retry: None }) => Outcome::Fail(error),
    }
}

impl RegistryClient {
    /// The Authorization header this endpoint gets for `scope`, if any is known yet.
    pub(super) fn auth_header(&self, ep: &Endpoint, scope: &str) -> Option<HeaderValue> {
        if let Some(token) = self
            .inner
            .tokens
            .get(&ep.host, scope, self.inner.clock.instant())
        {
            return sensitive(&format!("Bearer {token}"));
        }
        let basic = self
            .inner
            .basic_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ep.host);
        match (&ep.credentials, basic) {
            (Some(c), true) => basic_header(c),
            _ => None,
        }
    }

    /// One request with authentication (answering one 401 challenge) and redirects handled here.
    pub(super) async fn send(
        &self,
        ep: &Endpoint,
        at: &At,
        url: Url,
        headers: HeaderMap,
        small: bool,
    ) -> Result<reqwest::Response, Fault> {
        let scope = format!("repository:{}:pull", at.repository);
        let mut answered = false;
        loop {
            let auth = self.auth_header(ep, &scope);
            let had_auth = auth.is_some();
            let resp = self
                .follow(ep, at, url.clone(), &headers, auth, small)
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if had_auth {
                self.inner.tokens.forget(&ep.host, &scope);
            }
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(auth::parse_challenge);
            let unauthorized = || {
                Fault::fatal(RegistryError::Unauthorized {
                    at: Box::new(at.clone()),
                })
            };
            if answered {
                return Err(unauthorized());
            }
            answered = true;
            match challenge {
                Some(Challenge::Bearer { realm, service, .. }) => {
                    let token = self
                        .fetch_token(ep, at, &realm, service.as_deref(), &scope)
                        .await?;
                    self.inner
                        .tokens
                        .put(&ep.host, &scope, &token, self.inner.clock.instant());
                }
                Some(Challenge::Basic) if ep.credentials.is_some() => {
                    self.inner
                        .basic_hosts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(ep.host.clone());
                }
                _ => return Err(unauthorized()),
            }
        }
    }

    pub(super) async fn fetch_token(
        &self,
        ep: &Endpoint,
        at: &At,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<auth::Token, Fault> {
        let token_err = |reason: String| RegistryError::Token {
            at: Box::new(at.clone()),
            realm: realm.to_string(),
            reason,
        };
        let mut url = Url::parse(realm)
            .map_err(|e| Fault::fatal(token_err(format!("the realm is not a URL: {e}"))))?;
        if url.scheme() != "https" && !(url.scheme() == "http" && ep.base.scheme() == "http") {
            return Err(Fault::fatal(token_err(
                "the registry sent its clients to a token endpoint that is not HTTPS; credentials are not sent there".into(),
            )));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let endpoint = url.origin().ascii_serialization();
        let mut req = ep.http.get(url).timeout(self.inner.options.request_timeout);
        if let Some(c) = &ep.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| self.net_fault(at, &format!("token endpoint {endpoint}"), e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Fault::fatal(RegistryError::Unauthorized {
                at: Box::new(at.clone()),
            }));
        }
        if !status.is_success() {
            let e = token_err(format!("HTTP {status}"));
            return Err(
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    Fault::retry(e, retry_after(&resp, self.inner.clock.now()))
                } else {
                    Fault::fatal(e)
                },
            );
        }
        let body = read_capped(
            &mut resp,
            at,
            &ep.base,
            1024 * 1024,
            self.inner.options.read_timeout,
        )
        .await?;
        auth::parse_token(&body).map_err(|e| Fault::fatal(token_err(e.to_string())))
    }

    /// GET `url`, following up to `max_redirects` redirects; Authorization goes only to the endpoint itself.
    pub(super) async fn follow(
        &self,
        ep: &Endpoint,
        at: &At,
        url: Url,
        headers: &HeaderMap,
        auth: Option<HeaderValue>,
        small: bool,
    ) -> Result<reqwest::Response, Fault> {
        let limit = self.inner.options.max_redirects;
        let mut current = url;
        for _ in 0..=limit {
            let mut req = ep.http.get(current.clone()).headers(headers.clone());
            if let Some(a) = &auth {
                if current.origin() == ep.base.origin() {
                    req = req.header(header::AUTHORIZATION, a.clone());
                }
            }
            if small {
                req = req.timeout(self.inner.options.request_timeout);
            }
            let host = current.host_str().unwrap_or_default().to_string();
            let resp = req.send().await.map_err(|e| self.net_fault(at, &host, e))?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Fault::fatal(RegistryError::Malformed {
                        at: Box::new(at.clone()),
                        reason: format!("HTTP {} without a Location", resp.status()),
                    })
                })?;
            let bad = |reason: &str| {
                Fault::fatal(RegistryError::BadRedirect {
                    at: Box::new(at.clone()),
                    location: location.to_string(),
                    reason: reason.to_string(),
                })
            };
            let next = current.join(location).map_err(|_| bad("not a URL"))?;
            match (current.scheme(), next.scheme()) {
                ("https", "https") | ("http", "http") | ("http", "https") => {}
                ("https", "http") => {
                    let h = host_port(&next);
                    if !self.is_insecure(&h) {
                        return Err(bad("it would downgrade HTTPS to plain HTTP"));
                    }
                }
                _ => return Err(bad("only http and https are followed")),
            }
            current = next;
        }
        Err(Fault::fatal(RegistryError::TooManyRedirects {
            at: Box::new(at.clone()),
            limit,
            last: current.to_string(),
        }))
    }

    pub(super) fn net_fault(&self, at: &At, endpoint: &str, e: reqwest::Error) -> Fault {
        let at = Box::new(at.clone());
        if e.is_timeout() {
            let secs = self
                .inner
                .options
                .read_timeout
                .min(self.inner.options.request_timeout)
                .as_secs();
            Fault::retry(
                RegistryError::Timeout {
                    at,
                    endpoint: endpoint.to_string(),
                    secs,
                },
                None,
            )
        } else {
            Fault::retry(
                RegistryError::Connect {
                    at,
                    endpoint: endpoint.to_string(),
                    reason: crate::error_chain(&e).replace('\n', " "),
                },
                None,
            )
        }
    }
}

pub(super) async fn outcome_fut<T>(
    f: impl std::future::Future<Output = Result<T, Fault>>,
) -> Outcome<T, RegistryError> {
    outcome(f.await)
}

pub(super) fn sensitive(s: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(s).ok()?;
    v.set_sensitive(true);
    Some(v)
}

pub(super) fn basic_header(c: &Credentials) -> Option<HeaderValue> {
    use base64::Engine as _;
    let raw = format!("{}:{}", c.username, c.password);
    sensitive(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
}

pub(super) fn host_port(u: &Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

pub(super) fn media_type_of(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
}

pub(super) fn retry_after(
    resp: &reqwest::Response,
    now: std::time::SystemTime,
) -> Option<Duration> {
    resp.headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, now))
}

/// Turns an unwanted status into the error users can act on; 429 and 5xx are worth retrying.
pub(super) fn check_status(
    at: &At,
    resp: &reqwest::Response,
    now: std::time::SystemTime,
) -> Result<(), Fault> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let at = Box::new(at.clone());
    Err(match status {
        StatusCode::NOT_FOUND => Fault::fatal(RegistryError::NotFound { at }),
        StatusCode::UNAUTHORIZED => Fault::fatal(RegistryError::Unauthorized { at }),
        StatusCode::FORBIDDEN => Fault::fatal(RegistryError::Denied { at }),
        s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
            let after = retry_after(resp, now);
            Fault::retry(
                RegistryError::Status {
                    at,
                    status: s.as_u16(),
                    detail: if s == StatusCode::TOO_MANY_REQUESTS {
                        " (too many requests) after every retry; try again later".into()
                    } else {
                        " (server error) after every retry; the registry is failing".into()
                    },
                },
                after,
            )
        }
        s => Fault::fatal(RegistryError::Status {
            at,
            status: s.as_u16(),
            detail: String::new(),
        }),
    })
}

pub(super) async fn next_chunk(
    resp: &mut reqwest::Response,
    at: &At,
    base: &Url,
    read_timeout: Duration,
) -> Result<Option<bytes::Bytes>, Fault> {
    resp.chunk().await.map_err(|e| {
        let at = Box::new(at.clone());
        let endpoint = host_port(base);
        if e.is_timeout() {
            Fault::retry(
                RegistryError::Timeout {
                    at,
                    endpoint,
                    secs: read_timeout.as_secs(),
                },
                None,
            )
        } else {
            Fault::retry(
                RegistryError::Connect {
                    at,
                    endpoint,
                    reason: format!(
                        "the connection broke mid-transfer: {}",
                        crate::error_chain(&e).replace('\n', " ")
                    ),
                },
                None,
            )
        }
    })
}

/// Reads a whole body, refusing it as soon as it passes `limit` (Content-Length is not trusted for this).
pub(super) async fn read_capped(
    resp: &mut reqwest::Response,
    at: &At,
    base: &Url,
    limit: u64,
    read_timeout: Duration,
) -> Result<Vec<u8>, Fault> {
    let too_large = || {
        Fault::fatal(RegistryError::ManifestTooLarge {
            at: Box::new(at.clone()),
            limit,
        })
    };
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    while let Some(chunk) = next_chunk(resp, at, base, read_timeout).await? {
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
