//! The agent's side of the fleet protocol: enroll once, long-poll the desired state with its ETag, and deliver
//! the outbox. Every call is bounded by a timeout; failures are the caller's to retry (the loop does, with jitter).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reqwest::{StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::fleet::{Accepted, DesiredOrders, EnrollRequest, Enrolled, Event, ReportBatch};
use crate::registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach the fleet server at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the fleet server refused {what} ({status}): {message}")]
    Refused {
        what: &'static str,
        status: u16,
        message: String,
    },
    #[error(
        "the fleet server asked this device to slow down ({what}); its next request waits {} s",
        .retry_after.as_secs_f64().ceil()
    )]
    RateLimited {
        what: &'static str,
        retry_after: Duration,
    },
    #[error(
        "the fleet server cannot serve {what} just now (503): {message}; this device keeps its reports and asks \
         again in {} s",
        .retry_after.as_secs_f64().ceil()
    )]
    Unavailable {
        what: &'static str,
        message: String,
        retry_after: Duration,
    },
    #[error("the fleet server's answer to {what} does not read: {message}")]
    Garbled { what: &'static str, message: String },
    #[error(transparent)]
    Client(#[from] crate::registry::RegistryError),
    #[error("the fleet server URL {url:?} does not read: {message}; write it as https://host:port")]
    BadUrl { url: String, message: String },
    #[error(
        "the fleet server {url} is plain http on a host that is not loopback: anyone on the network path could rewrite what this device runs; use https:// (with [fleet] ca_bundle or [tls] ca_bundle for a private CA), or set [fleet] insecure = true for a network you trust"
    )]
    PlainHttp { url: String },
}

impl LinkError {
    /// The server no longer knows this credential: enroll again.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, LinkError::Refused { status: 401, .. })
    }

    /// How long the server asked this device to wait before its next request.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LinkError::RateLimited { retry_after, .. }
            | LinkError::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The server read the request and refused what it carried (400, 413, 422): sending the same again fails
    /// again, unlike a refusal of the credential, a rate limit or an outage.
    pub fn is_refused_content(&self) -> bool {
        matches!(
            self,
            LinkError::Refused {
                status: 400 | 413 | 422,
                ..
            }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tls,
    /// http to loopback: nothing on a network path to tamper with.
    PlainHttpLoopback,
    /// http elsewhere, allowed by `[fleet] insecure = true`.
    PlainHttpByChoice,
}

/// Whether the fleet link may use `server`: the desired state decides what runs as root on the device, so it
/// travels over TLS unless it never leaves the host or the owner said otherwise.
fn transport(server: &str, insecure: bool) -> Result<Transport, LinkError> {
    let bad = |message: String| LinkError::BadUrl {
        url: server.to_string(),
        message,
    };
    let url = reqwest::Url::parse(server).map_err(|e| bad(e.to_string()))?;
    match url.scheme() {
        "https" => return Ok(Transport::Tls),
        "http" => {}
        other => {
            return Err(bad(format!(
                "the scheme {other}: is neither https: nor http:"
            )));
        }
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err(bad("it names no host".into())),
    };
    if loopback {
        Ok(Transport::PlainHttpLoopback)
    } else if insecure {
        Ok(Transport::PlainHttpByChoice)
    } else {
        Err(LinkError::PlainHttp {
            url: server.to_string(),
        })
    }
}

/// A fresh desired state, or none when it equals the one the agent holds.
#[derive(Debug)]
pub enum Fetched {
    Changed {
        desired: DesiredOrders,
        etag: Option<String>,
    },
    Unchanged,
}

/// A server's `Retry-After` is honoured up to this: a server asking for an hour should not silence a device.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The wait after a 429 or 503 that named none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The HTTP client that reaches the fleet server: rustls with the system roots plus `ca_bundle`, the same TLS setup
/// as registries, and the same resolver (`/etc/hosts`, mDNS for `.local`, the name servers): without it reqwest
/// would ask getaddrinfo, whose NSS modules a static binary cannot load. The operator CLI (`flotilla-server`)
/// reaches the server with it too: an operator's host resolves and trusts as a device does.
pub fn http_client(
    ca_bundle: Option<&Path>,
    timeout: Duration,
) -> Result<reqwest::Client, RegistryError> {
    let bundles: Vec<PathBuf> = ca_bundle.iter().map(|p| p.to_path_buf()).collect();
    let tls = crate::registry::tls::client_config(&crate::registry::tls::system_roots(), &bundles)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .dns_resolver(Arc::new(crate::registry::dns::SystemResolver::default()))
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| RegistryError::HttpClient(e.to_string()))
}

#[derive(Clone)]
pub struct Link {
    http: reqwest::Client,
    base: String,
    /// No request leaves before this, once the server answered 429 or 503: shared by every clone (the long
    /// poll's too).
    not_before: Arc<Mutex<Option<Instant>>>,
}

impl Link {
    /// `long_poll` bounds how long the server may hold a request; the timeout leaves room above it.
    /// `insecure` allows plain http to a host that is not loopback, with a warning at every start.
    pub fn new(
        server: &str,
        ca_bundle: Option<&Path>,
        long_poll: Duration,
        insecure: bool,
    ) -> Result<Link, LinkError> {
        if transport(server, insecure)? == Transport::PlainHttpByChoice {
            tracing::warn!(
                server,
                "the fleet link is plain http to a host that is not loopback ([fleet] insecure = true): anyone on the network path can rewrite what this device runs"
            );
        }
        Ok(Link {
            http: http_client(ca_bundle, long_poll + Duration::from_secs(30))?,
            base: server.trim_end_matches('/').to_string(),
            not_before: Arc::default(),
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        what: &'static str,
        req: reqwest::RequestBuilder,
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, Option<T>, header::HeaderMap), LinkError> {
        let req = match body {
            Some(b) => req.header(header::CONTENT_TYPE, "application/json").body(
                serde_json::to_vec(b).map_err(|e| LinkError::Garbled {
                    what,
                    message: e.to_string(),
                })?,
            ),
            None => req,
        };
        let unreachable = |e: reqwest::Error| LinkError::Unreachable {
            url: self.base.clone(),
            message: crate::error_chain(&e),
        };
        let now = Instant::now();
        let hold = *self.not_before.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = hold.filter(|u| *u > now) {
            return Err(LinkError::RateLimited {
                what,
                retry_after: until - now,
            });
        }
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        // A server out of breath (429) or cut off from its database (503) says when to come back; nothing is sent
        // before, the long poll included.
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            let retry_after = headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| crate::registry::retry::parse_retry_after(v, SystemTime::now()))
                .unwrap_or(DEFAULT_RETRY_AFTER)
                .min(MAX_RETRY_AFTER);
            let until = Instant::now() + retry_after;
            {
                let mut hold = self.not_before.lock().unwrap_or_else(|e| e.into_inner());
                *hold = Some(hold.map_or(until, |h| h.max(until)));
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(LinkError::RateLimited { what, retry_after });
            }
            let bytes = resp.bytes().await.map_err(unreachable)?;
            return Err(LinkError::Unavailable {
                what,
                message: error_message(&bytes),
                retry_after,
            });
        }
        if status == StatusCode::NOT_MODIFIED {
            return Ok((status, None, headers));
        }
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let message = error_message(&bytes);
            return Err(LinkError::Refused {
                what,
                status: status.as_u16(),
                message,
            });
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| LinkError::Garbled {
            what,
            message: e.to_string(),
        })?;
        Ok((status, Some(value), headers))
    }

    pub async fn enroll(&self, token: &str, req: &EnrollRequest) -> Result<Enrolled, LinkError> {
        let http = self
            .http
            .post(format!("{}/v1/enroll", self.base))
            .bearer_auth(token);
        match self.send("the enrollment", http, Some(req)).await? {
            (_, Some(e), _) => Ok(e),
            _ => Err(LinkError::Garbled {
                what: "the enrollment",
                message: "no body".into(),
            }),
        }
    }

    /// The desired state; with `etag`, the server holds the request up to `wait` while nothing changes.
    pub async fn desired(
        &self,
        credential: &str,
        etag: Option<&str>,
        wait: Duration,
    ) -> Result<Fetched, LinkError> {
        let mut http = self
            .http
            .get(format!(
                "{}/v1/device/desired?wait={}",
                self.base,
                wait.as_secs()
            ))
            .bearer_auth(credential);
        if let Some(e) = etag {
            http = http.header(header::IF_NONE_MATCH, e);
        }
        let (_, desired, headers) = self
            .send::<serde_json::Value>("the desired state", http, None::<&()>)
            .await?;
        Ok(match desired {
            Some(value) => Fetched::Changed {
                desired: DesiredOrders::from_value(value).map_err(|e| LinkError::Garbled {
                    what: "the desired state",
                    message: e.to_string(),
                })?,
                etag: headers
                    .get(header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            },
            None => Fetched::Unchanged,
        })
    }

    pub async fn report(
        &self,
        credential: &str,
        events: Vec<Event>,
    ) -> Result<Vec<String>, LinkError> {
        let http = self
            .http
            .post(format!("{}/v1/device/reports", self.base))
            .bearer_auth(credential);
        let batch = ReportBatch { events };
        match self
            .send::<Accepted>("the reports", http, Some(&batch))
            .await?
        {
            (_, Some(a), _) => Ok(a.accepted),
            _ => Err(LinkError::Garbled {
                what: "the reports",
                message: "no body".into(),
            }),
        }
    }
}

/// The server's `{"error": …}`, or the body as it came (a proxy's page).
fn error_message(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_link_is_tls_unless_it_stays_on_the_host_or_the_owner_says_so() {
        let cases: &[(&str, bool, Option<Transport>)] = &[
            ("https://fleet.example:8470", false, Some(Transport::Tls)),
            (
                "http://127.0.0.1:8470",
                false,
                Some(Transport::PlainHttpLoopback),
            ),
            (
                "http://127.9.9.9",
                false,
                Some(Transport::PlainHttpLoopback),
            ),
            (
                "http://[::1]:8470/",
                false,
                Some(Transport::PlainHttpLoopback),
            ),
            (
                "http://LocalHost:8470",
                false,
                Some(Transport::PlainHttpLoopback),
            ),
            ("http://10.0.2.100:8470", false, None),
            ("http://fleet.local:8470", false, None),
            ("http://localhost.evil.example", false, None),
            (
                "http://10.0.2.100:8470",
                true,
                Some(Transport::PlainHttpByChoice),
            ),
            ("ftp://fleet.example", true, None),
            ("fleet.example:8470", true, None),
        ];
        for (url, insecure, want) in cases {
            assert_eq!(
                transport(url, *insecure).ok(),
                *want,
                "{url} insecure={insecure}"
            );
        }
        let e = transport("http://10.0.2.100:8470", false).unwrap_err();
        assert!(e.to_string().contains("insecure = true"), "{e}");
    }

    /// A loopback HTTP server that answers its first request 429 with `Retry-After: 1`, the others 200 with an
    /// empty acceptance; it counts the requests it got.
    async fn server_that_limits() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        server_that_first_answers(
            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 11\r\n\r\n{\"error\":1}",
        )
        .await
    }

    /// A loopback HTTP server that answers its first request with `first`, the others 200 with an empty
    /// acceptance; it counts the requests it got.
    async fn server_that_first_answers(
        first: &'static str,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; length];
                let _ = conn.read_exact(&mut body).await;
                let answer = if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                    first
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 15\r\n\r\n{\"accepted\":[]}"
                };
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        (url, count)
    }

    #[tokio::test]
    async fn after_a_429_no_request_leaves_before_its_retry_after() {
        use std::sync::atomic::Ordering;
        let (url, count) = server_that_limits().await;
        let link = Link::new(&url, None, Duration::from_secs(1), false).unwrap();
        let e = link.report("cred", Vec::new()).await.unwrap_err();
        let wait = e.retry_after().expect("rate limited");
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::from_millis(900),
            "{wait:?}"
        );
        assert!(!e.is_refused_content() && !e.is_unauthorized());
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // Every clone (the long poll's) holds back too, and nothing reaches the server meanwhile.
        let e = link
            .clone()
            .desired("cred", None, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(e.retry_after().is_some_and(|w| w <= wait), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "sent during Retry-After");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            link.report("cred", Vec::new()).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_server_without_its_database_is_waited_for_as_it_asks() {
        use std::sync::atomic::Ordering;
        let body = r#"{"error":"the fleet database is unreachable just now"}"#;
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: application/json\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (url, count) = server_that_first_answers(answer.leak()).await;
        let link = Link::new(&url, None, Duration::from_secs(1), false).unwrap();
        let e = link.report("cred", Vec::new()).await.unwrap_err();
        // Not a refusal of the reports (they would be set aside) nor of the credential (it would be dropped).
        assert!(!e.is_refused_content() && !e.is_unauthorized(), "{e}");
        assert!(e.to_string().contains("database is unreachable"), "{e}");
        let wait = e.retry_after().expect("the server's Retry-After");
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::from_millis(900),
            "{wait:?}"
        );
        let e = link
            .clone()
            .desired("cred", None, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(e.retry_after().is_some(), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "sent during Retry-After");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            link.report("cred", Vec::new()).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
