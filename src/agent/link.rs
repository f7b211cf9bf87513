//! The agent's side of the fleet protocol: enroll once, long-poll the desired state with its ETag, and deliver
//! the outbox. Every call is bounded by a timeout; failures are the caller's to retry (the loop does, with jitter).

use std::time::Duration;

use reqwest::{StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::fleet::{Accepted, DesiredOrders, EnrollRequest, Enrolled, Event, ReportBatch};

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

#[derive(Clone)]
pub struct Link {
    http: reqwest::Client,
    base: String,
}

impl Link {
    /// `long_poll` bounds how long the server may hold a request; the timeout leaves room above it.
    /// `insecure` allows plain http to a host that is not loopback, with a warning at every start.
    pub fn new(
        server: &str,
        ca_bundle: Option<&std::path::Path>,
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
            http: crate::fleet::http_client(ca_bundle, long_poll + Duration::from_secs(30))?,
            base: server.trim_end_matches('/').to_string(),
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
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        if status == StatusCode::NOT_MODIFIED {
            return Ok((status, None, headers));
        }
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
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
}
