//! A hostile fleet server: a test server that speaks the real API with the fleet protocol's own types, and orders
//! what the real server refuses to store. The device owner's policy and the agent's own checks must hold against
//! it: every order is refused before anything stops, the report names the cause and the setting, the old release
//! keeps running, and the agent never restarts.
//!
//! As root, with runc and a loopback docker-registry; the agent runs natively on this host.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::fleet::{APP_CMD, Pushed, push_to};
use common::registry::{Registry, RegistryOptions};
use common::{Flotilla, wait_for};
use flotilla::fleet::{Accepted, Enrolled, EventBody, ReportBatch};
use flotilla::update::{FailureCause, Report};
use p256::ecdsa::SigningKey;
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{Value, json};

/// What the hostile server orders and what it heard.
#[derive(Default)]
struct Scenario {
    /// The desired state, as raw JSON: the server may send what no serde type of ours would write.
    desired: Value,
    version: u64,
    reports: Vec<Report>,
}

type Shared = Arc<Mutex<Scenario>>;

struct HostileServer {
    scenario: Shared,
    port: u16,
    _runtime: tokio::runtime::Runtime,
}

impl HostileServer {
    fn start() -> HostileServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let scenario: Shared = Arc::default();
        scenario.lock().unwrap().desired = json!({"apps": []});
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the hostile server");
        let port = listener.local_addr().expect("local addr").port();
        let app = Router::new()
            .route("/v1/enroll", post(enroll))
            .route("/v1/device/desired", get(desired))
            .route("/v1/device/reports", post(reports))
            .with_state(scenario.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        HostileServer {
            scenario,
            port,
            _runtime: runtime,
        }
    }

    fn order(&self, apps: Value) {
        let mut s = self.scenario.lock().unwrap();
        s.desired = json!({ "apps": apps });
        s.version += 1;
    }

    /// The device's last prepare-failed report for `release`, once it has come.
    fn refusal(&self, release: &str) -> Option<(String, Option<FailureCause>)> {
        let s = self.scenario.lock().unwrap();
        s.reports.iter().rev().find_map(|r| match r {
            Report::PrepareFailed {
                release: r,
                reason,
                cause,
            } if r == release => Some((reason.clone(), *cause)),
            _ => None,
        })
    }

    fn committed(&self, release: &str) -> bool {
        let s = self.scenario.lock().unwrap();
        s.reports
            .iter()
            .any(|r| matches!(r, Report::Committed { release: r } if r == release))
    }
}

async fn enroll() -> Response {
    let enrolled = Enrolled {
        device_id: "d-hostile".into(),
        credential: "c".repeat(43),
    };
    (StatusCode::CREATED, Json(enrolled)).into_response()
}

async fn desired(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let (body, etag) = {
        let s = s.lock().unwrap();
        (s.desired.clone(), format!("\"{}\"", s.version))
    };
    let seen = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if seen == Some(etag.as_str()) {
        // A short long poll: the test changes its orders often.
        tokio::time::sleep(Duration::from_millis(300)).await;
        return StatusCode::NOT_MODIFIED.into_response();
    }
    ([(header::ETAG, etag)], Json(body)).into_response()
}

async fn reports(State(s): State<Shared>, Json(batch): Json<ReportBatch>) -> Json<Accepted> {
    let mut s = s.lock().unwrap();
    let mut accepted = Vec::new();
    for e in batch.events {
        if let EventBody::Update { report, .. } = e.body {
            s.reports.push(report);
        }
        accepted.push(e.id);
    }
    Json(Accepted { accepted })
}

/// The agent, killed and its app removed when the test ends.
struct Agent {
    config: PathBuf,
    state: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Agent {
    fn flotilla(&self) -> std::process::Command {
        Flotilla::new()
            .config(&self.config)
            .state(&self.state)
            .command()
    }

    /// The app's container as `flotilla ps -a --json` shows it.
    fn container(&self) -> Value {
        let out = self
            .flotilla()
            .args(["ps", "-a", "--json"])
            .output()
            .expect("flotilla ps");
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
            .unwrap_or(Value::Null)
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("agent status").is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- agent log ---\n{log}");
        }
        let _ = self.flotilla().args(["rm", "--force", "demo"]).output();
    }
}

fn release(id: &str, registry: &str, repo: &str, pushed: &Pushed, settings: Value) -> Value {
    let manifests: BTreeMap<&str, &str> = pushed
        .manifests
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_str()))
        .collect();
    json!({
        "name": "demo",
        "release": id,
        "image": format!("{registry}/{repo}@{}", pushed.index),
        "manifests": manifests,
        "settings": settings,
    })
}

fn write_key(path: &Path) {
    let key = SigningKey::from_bytes(&[7u8; 32].into()).expect("signing key");
    let pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    std::fs::write(path, pem).expect("key file");
}

#[test]
fn a_hostile_server_cannot_get_past_the_device_policy() {
    if common::fleet::agent_prerequisites().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    let host = registry.host();
    let good = push_to(root, &registry, "demo", "v1", false);
    let unsigned = push_to(root, &registry, "unsigned", "v1", false);
    let server = HostileServer::start();

    // The owner allows this registry only, and requires signatures for everything but the demo repository.
    let key = root.join("cosign.pub");
    write_key(&key);
    let token = root.join("enroll-token");
    std::fs::write(&token, "any").expect("token");
    let config = root.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[fleet]\nserver = \"http://127.0.0.1:{port}\"\ntoken_file = \"{token}\"\nname = \"owned\"\n\
             poll_interval = \"1s\"\nprobation = \"1s\"\nheartbeat_interval = \"2s\"\n\
             [policy]\nregistries = [\"{host}\"]\n\
             [[registry]]\nhost = \"{host}\"\ninsecure = true\n\
             [[signature_policy]]\nscope = \"*\"\nmode = \"require\"\npublic_keys = [\"{key}\"]\n\
             [[signature_policy]]\nscope = \"{host}/demo\"\nmode = \"off\"\n",
            port = server.port,
            token = token.display(),
            key = key.display(),
        ),
    )
    .expect("agent config");
    let state = root.join("state");
    let log = root.join("agent.log");
    let mut agent = Agent {
        child: Flotilla::new()
            .config(&config)
            .state(&state)
            .command()
            .arg("agent")
            .env("FLOTILLA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("start flotilla agent"),
        config,
        state,
        log,
    };

    let app = json!({"restart": {"policy": "always"}, "stop_grace": 2, "command": ["-c", APP_CMD]});
    server.order(json!([release(
        "demo-1",
        &host,
        "demo",
        &good,
        app.clone()
    )]));
    wait_for("demo-1 committed", Duration::from_secs(120), || {
        server.committed("demo-1")
    });
    let before = agent.container();
    assert_eq!(before["state"], "running", "{before}");

    let with = |extra: Value| {
        let mut s = app.clone();
        for (k, v) in extra.as_object().expect("object") {
            s[k] = v.clone();
        }
        s
    };
    let orders = [
        (
            release(
                "demo-2",
                &host,
                "demo",
                &good,
                with(json!({"devices": ["/dev/mem"]})),
            ),
            FailureCause::Policy,
            "[policy] devices",
        ),
        (
            release(
                "demo-3",
                &host,
                "demo",
                &good,
                with(json!({"volumes": [{"source": {"bind": "/"}, "target": "/host"}]})),
            ),
            FailureCause::Policy,
            "[policy] bind_paths",
        ),
        (
            release(
                "demo-4",
                &host,
                "demo",
                &good,
                with(json!({"volumes": [{"source": {"named": "../../etc"}, "target": "/etc"}]})),
            ),
            FailureCause::Invalid,
            "volumes[0].source.named",
        ),
        (
            release(
                "demo-5",
                &host,
                "demo",
                &good,
                with(json!({"stop_grace": 1e19})),
            ),
            FailureCause::Invalid,
            "stop_grace",
        ),
        (
            release("demo-6", "evil.example:5000", "demo", &good, app.clone()),
            FailureCause::Policy,
            "[policy] registries",
        ),
        (
            release("demo-7", &host, "unsigned", &unsigned, app.clone()),
            FailureCause::Policy,
            "signature policy for \"*\"",
        ),
        (
            release(
                "demo-9",
                &host,
                "demo",
                &good,
                with(json!({"cap_add": ["SYS_ADMIN"]})),
            ),
            FailureCause::Policy,
            "[policy] capabilities",
        ),
        (
            release(
                "demo-10",
                &host,
                "demo",
                &good,
                with(json!({"seccomp": "unconfined"})),
            ),
            FailureCause::Policy,
            "[policy] seccomp_unconfined",
        ),
        // Settings no device reads: refused by themselves, not taken for "no app" (which would stop it).
        (
            release(
                "demo-8",
                &host,
                "demo",
                &good,
                with(json!({"privileged": true})),
            ),
            FailureCause::Invalid,
            "privileged",
        ),
    ];
    for (order, cause, names) in orders {
        let id = order["release"].as_str().expect("release id").to_string();
        server.order(json!([order]));
        wait_for(
            &format!("the device to refuse {id}"),
            Duration::from_secs(60),
            || server.refusal(&id).is_some(),
        );
        let (reason, got) = server.refusal(&id).expect("refusal");
        assert_eq!(got, Some(cause), "{id}: {reason}");
        assert!(reason.contains(names), "{id}: {reason}");
        assert!(agent.alive(), "the agent exited after {id}");
        let now = agent.container();
        assert_eq!(now["state"], "running", "{id}: {now}");
        for same in ["pid", "started_at", "restarts"] {
            assert_eq!(now[same], before[same], "{id}: {now}");
        }
        assert_eq!(now["manifest"], before["manifest"], "{id}: {now}");
    }
    for id in ["demo-7", "demo-8"] {
        assert!(!server.committed(id), "{id}");
    }
}
