//! A dashboard under test, and a browser-less client for it: a cookie jar of one cookie, forms that carry the
//! CSRF token the page gave, and the fleet API beside it to make devices, apps and rollouts.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla::clock::{Clock, FakeClock};
use flotilla::fleet::{Enrolled, Event, EventBody, ReportBatch};
use flotilla::server::api;
use flotilla::server::resolve::{ResolveError, Resolved, Resolver};
use flotilla::server::store::ServerDb;
use serde_json::{Value, json};

/// Answers every image with three platforms, pinned to a digest of the image's name; an image whose name holds
/// `arm64-only` has only `linux/arm64`.
pub struct FixedResolver;

impl Resolver for FixedResolver {
    fn resolve<'a>(
        &'a self,
        image: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Resolved, ResolveError>> + Send + 'a>> {
        Box::pin(async move {
            let digest = |what: &str| {
                use sha2::Digest as _;
                format!("sha256:{:x}", sha2::Sha256::digest(what.as_bytes()))
            };
            let repo = image.split(':').next().unwrap_or(image);
            let platforms: &[&str] = if image.contains("arm64-only") {
                &["linux/arm64"]
            } else {
                &["linux/arm/v6", "linux/arm64", "linux/amd64"]
            };
            Ok(Resolved {
                pinned: format!("{repo}@{}", digest(image)),
                manifests: platforms
                    .iter()
                    .map(|p| (p.to_string(), digest(&format!("{image} {p}"))))
                    .collect(),
            })
        })
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts the page says `text` (HTML-escaped as the server escapes it).
    #[track_caller]
    pub fn says(&self, text: &str) -> &Answer {
        let escaped = text
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;");
        assert!(
            self.body.contains(&escaped),
            "the page does not say {text:?}:\n{}",
            self.body
        );
        self
    }

    #[track_caller]
    pub fn lacks(&self, text: &str) -> &Answer {
        assert!(
            !self.body.contains(text),
            "the page says {text:?}:\n{}",
            self.body
        );
        self
    }

    /// The CSRF token a page's forms carry.
    pub fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a form with a CSRF token");
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_string()
    }
}

pub struct Dash {
    _dir: tempfile::TempDir,
    pub db: PathBuf,
    pub base: String,
    pub admin: String,
    pub clock: Arc<FakeClock>,
    pub server: Arc<api::Server>,
    http: reqwest::Client,
    /// The session cookie's value, once signed in.
    pub cookie: Option<String>,
}

impl Dash {
    pub async fn start() -> Dash {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("server.db");
        let clock = FakeClock::new(0.0);
        let db = ServerDb::open(&db_path).unwrap();
        let admin = db
            .ensure_admin_token(clock.unix_seconds())
            .unwrap()
            .expect("a new admin token");
        let server = api::Server::with_limits(
            db,
            Box::new(FixedResolver),
            clock.clone(),
            api::Limits {
                flush_interval: Duration::from_millis(100),
                ..api::Limits::default()
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(api::serve(
            server.clone(),
            listener,
            Duration::from_secs(3600),
            std::future::pending(),
        ));
        Dash {
            _dir: dir,
            db: db_path,
            base,
            admin,
            clock,
            server,
            http: {
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap()
            },
            cookie: None,
        }
    }

    /// Started and signed in.
    pub async fn signed_in() -> Dash {
        let mut d = Dash::start().await;
        d.sign_in().await;
        d
    }

    pub async fn sign_in(&mut self) {
        let token = self.admin.clone();
        let a = self
            .raw_post("/signin", &[("token", token.as_str()), ("next", "/")], &[])
            .await;
        assert_eq!(a.status, 303, "{}", a.body);
        let set = a.header("set-cookie").to_string();
        let value = set
            .strip_prefix("flotilla_session=")
            .and_then(|v| v.split(';').next())
            .expect("a session cookie");
        self.cookie = Some(value.to_string());
    }

    fn with_cookie(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.cookie {
            Some(c) => req.header("cookie", format!("flotilla_session={c}")),
            None => req,
        }
    }

    async fn answer(req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.expect("an answer");
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.expect("a body"),
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        Dash::answer(self.with_cookie(self.http.get(format!("{}{path}", self.base)))).await
    }

    /// A page that must answer 200.
    #[track_caller]
    pub fn page(&self, path: &str) -> impl Future<Output = Answer> + '_ {
        let path = path.to_string();
        async move {
            let a = self.get(&path).await;
            assert_eq!(a.status, 200, "GET {path}: {}", a.body);
            a
        }
    }

    /// A form posted as the browser would from `from` (a page whose CSRF token it carries), same-origin.
    pub async fn form(&self, from: &str, action: &str, fields: &[(&str, &str)]) -> Answer {
        let csrf = self.page(from).await.csrf();
        let mut all: Vec<(&str, &str)> = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        self.raw_post(action, &all, &[("sec-fetch-site", "same-origin")])
            .await
    }

    /// A form post with exactly these fields and headers.
    pub async fn raw_post(
        &self,
        action: &str,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Answer {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let mut req = self
            .with_cookie(self.http.post(format!("{}{action}", self.base)))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Dash::answer(req).await
    }

    /// A call to the fleet API as the operator; its JSON answer, which must have `status`.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(got, status, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Enrolls a device with detection's `candidates` and `description`; its credential.
    pub async fn enroll(&self, name: &str, candidates: &[&str], description: &str) -> Enrolled {
        let token = self
            .api(
                "POST",
                "/v1/tokens",
                Some(json!({"device_tags": true})),
                201,
            )
            .await["token"]
            .as_str()
            .unwrap()
            .to_string();
        let resp = self
            .http
            .post(format!("{}/v1/enroll", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(json!({
                "name": name,
                "tags": {"site": "lab"},
                "agent_version": "0.1.0",
                "platform": {"candidates": candidates, "page_size": 4096, "description": description},
            }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    /// Sends a device's report batch as the agent does.
    pub async fn report(&self, device: &Enrolled, bodies: Vec<EventBody>) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let events = bodies
            .into_iter()
            .map(|body| {
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Event {
                    id: format!("e{n}"),
                    at: self.clock.unix_seconds(),
                    seq: Some(n),
                    body,
                }
            })
            .collect();
        let resp = self
            .http
            .post(format!("{}/v1/device/reports", self.base))
            .bearer_auth(&device.credential)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&ReportBatch { events }).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            200,
            "{}",
            resp.text().await.unwrap()
        );
    }
}
