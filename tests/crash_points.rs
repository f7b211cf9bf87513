//! Power cuts at every durable write of the agent (feature `crash-points`, src/crash_points.rs): a counting run
//! lists the writes of the whole scenario, and then one run per write aborts the agent right after it and starts
//! it again. Each run enrolls a device, rolls a release out to it and then a release that crashes. Every
//! run must end with the first rollout done and the second paused, each final report on the server exactly once,
//! nothing left in the outbox, and the app running the first release.
//!
//! `cargo test --features server,crash-points --test crash_points`

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::{Server, push};
use common::registry::{Registry, RegistryOptions};
use serde_json::Value;

/// Runs at once: they mostly wait (probation, polls), so four share two cores.
const PARALLEL: usize = 4;

struct Run<'a> {
    n: u64,
    server: &'a Server,
    dir: PathBuf,
    app: String,
    device: String,
    child: Option<Child>,
    /// The point this run's agent aborted at, as its log names it.
    crashed_at: Option<String>,
}

impl<'a> Run<'a> {
    fn new(root: &Path, server: &'a Server, n: u64) -> Run<'a> {
        let dir = root.join(format!("run-{n}"));
        std::fs::create_dir_all(&dir).expect("run dir");
        // Its own token, which gives the run's tag: the agent deletes the file once enrolled, and tags are the
        // token's to give.
        let token = dir.join("enroll-token");
        let secret = server.ok(&["token", "create", "--tag", &format!("run=r{n}")]);
        std::fs::write(&token, secret).expect("token file");
        let app = format!("app-{n}");
        let device = format!("dev-{n}");
        let config = format!(
            "[fleet]\nserver = \"{}\"\ntoken_file = \"{}\"\nname = \"{device}\"\ntags = {{ run = \"r{n}\" }}\n\
             poll_interval = \"2s\"\nprobation = \"1s\"\nheartbeat_interval = \"2s\"\n\
             [[registry]]\nhost = \"{}\"\ninsecure = true\n",
            server.url(),
            token.display(),
            server.registry
        );
        std::fs::write(dir.join("config.toml"), config).expect("agent config");
        server.create_app(&app);
        for tag in ["v1", "v2"] {
            server.ok(&[
                "release",
                "create",
                &app,
                &format!("{}/demo:{tag}", server.registry),
            ]);
        }
        Run {
            n,
            server,
            dir,
            app,
            device,
            child: None,
            crashed_at: None,
        }
    }

    fn flotilla(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        c.arg("--config")
            .arg(self.dir.join("config.toml"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .env_remove("JOURNAL_STREAM");
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn start(&mut self, crash_at: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let mut c = self.flotilla();
        c.arg("agent")
            .env("FLOTILLA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        match crash_at {
            Some(at) => c.env("FLOTILLA_CRASH_AT", at),
            None => c.env_remove("FLOTILLA_CRASH_AT"),
        };
        self.child = Some(c.spawn().expect("start flotilla agent"));
    }

    /// Waits for `done`, starting the agent again (without a crash point) once if it aborted.
    fn until(&mut self, what: &str, done: impl Fn(&Run<'_>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if done(self) {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("agent status"));
            if let Some(status) = exited {
                let log = self.log();
                assert!(
                    self.crashed_at.is_none(),
                    "run {}: the agent exited again ({status}) waiting for {what}:\n{log}",
                    self.n
                );
                let point = log
                    .lines()
                    .find(|l| l.ends_with(": aborting"))
                    .unwrap_or_else(|| {
                        panic!(
                            "run {}: the agent exited ({status}) without a crash point:\n{log}",
                            self.n
                        )
                    });
                let mark = format!("{}: ", point.trim_end_matches(": aborting"));
                let label = log
                    .lines()
                    .find(|l| l.starts_with(&mark) && !l.ends_with(": aborting"))
                    .unwrap_or(point)
                    .to_string();
                self.crashed_at = Some(label);
                self.start(None);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "run {}: timed out waiting for {what}; agent log:\n{}\nserver log:\n{}",
            self.n,
            self.log(),
            self.server.log()
        );
    }

    fn device_view(&self) -> Value {
        self.server.device(&self.device)
    }

    fn app_view(&self) -> Value {
        self.device_view()["apps"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["app"] == self.app.as_str()).cloned())
            .unwrap_or(Value::Null)
    }

    fn rollout(&self, release: &str) -> String {
        self.server.ok(&[
            "rollout",
            "start",
            release,
            "--select",
            &format!("run=r{}", self.n),
            "--waves",
            "100",
            "--max-failures",
            "1",
        ])
    }

    fn rollout_state(&self, id: &str) -> Value {
        self.server.json(&["rollout", "status", id])["status"]["state"].clone()
    }

    /// Update events of this device on the server whose report is `event` for `release`.
    fn reports_on_server(&self, release: &str, event: &str) -> usize {
        let db = rusqlite::Connection::open_with_flags(
            self.server_db(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("server.db");
        let id = self.device_view()["id"].as_str().unwrap_or("").to_string();
        let mut st = db
            .prepare("SELECT body FROM events WHERE device = ?1")
            .expect("events query");
        st.query_map([id], |r| r.get::<_, String>(0))
            .expect("events")
            .filter_map(Result::ok)
            .filter_map(|b| serde_json::from_str::<Value>(&b).ok())
            .filter(|b| {
                let r = &b["data"]["report"];
                b["kind"] == "update" && r["release"] == release && r["event"] == event
            })
            .count()
    }

    fn server_db(&self) -> PathBuf {
        self.dir.parent().expect("the runs' root").join("server.db")
    }

    fn outbox(&self) -> usize {
        let Ok(db) = rusqlite::Connection::open(self.dir.join("state/agent.db")) else {
            return usize::MAX;
        };
        db.query_row("SELECT COUNT(*) FROM outbox WHERE heartbeat = 0", [], |r| {
            r.get(0)
        })
        .unwrap_or(usize::MAX)
    }

    /// The whole scenario; the crash point this run hit, if its agent reached N writes.
    fn scenario(mut self, crash_at: &str) -> Option<String> {
        self.start(Some(crash_at));
        self.until("the enrollment", |r| r.device_view()["id"].is_string());
        let first = format!("{}-1", self.app);
        let second = format!("{}-2", self.app);
        let id = self.rollout(&first);
        self.until(&format!("{first} done"), |r| r.rollout_state(&id) == "done");
        let id = self.rollout(&second);
        self.until(&format!("{second} paused"), |r| {
            r.rollout_state(&id) == "paused"
        });
        self.until(&format!("{first} running again"), |r| {
            let a = r.app_view();
            a["status"]["release"] == first.as_str() && a["status"]["state"] == "running"
        });
        self.until("an empty outbox", |r| r.outbox() == 0);
        assert_eq!(
            self.reports_on_server(&first, "committed"),
            1,
            "run {}: {first} committed, exactly once",
            self.n
        );
        assert_eq!(
            self.reports_on_server(&second, "rolled-back"),
            1,
            "run {}: {second} rolled back, exactly once",
            self.n
        );
        let out = self
            .flotilla()
            .args(["ps", "-a", "--json"])
            .output()
            .expect("flotilla ps");
        let containers: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let running: Vec<&Value> = containers
            .as_array()
            .map(|cs| cs.iter().filter(|c| c["state"] == "running").collect())
            .unwrap_or_default();
        assert_eq!(running.len(), 1, "run {}: {containers}", self.n);
        self.crashed_at.take()
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The apps' supervisors outlive their agent by design.
        let _ = self.flotilla().args(["rm", "--force", &self.app]).output();
    }
}

#[test]
fn an_agent_aborted_at_every_durable_write_converges_and_reports_exactly_once() {
    if common::fleet::agent_prerequisites().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    push(root, &registry, "v1", false);
    push(root, &registry, "v2", true);
    let server = Server::start(root, &registry.host());

    // A run that only counts: the durable writes of the whole scenario, each as NAME#K (its Kth write of NAME).
    let counting = Run::new(root, &server, 0);
    let dir = counting.dir.clone();
    assert_eq!(counting.scenario("0"), None);
    let log = std::fs::read_to_string(dir.join("agent.log")).expect("agent log");
    let points: Vec<String> = log
        .lines()
        .filter_map(|l| l.strip_prefix("crash point "))
        .filter_map(|l| l.split_once(": ").map(|(_, at)| at.to_string()))
        .collect();
    assert!(points.len() > 10, "too few crash points:\n{log}");

    let mut covered: Vec<String> = Vec::new();
    let mut missed: Vec<String> = Vec::new();
    let numbered: Vec<(u64, &String)> = (1..).zip(&points).collect();
    for chunk in numbered.chunks(PARALLEL) {
        let results: Vec<(String, Option<String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&(n, at)| {
                    let server = &server;
                    s.spawn(move || {
                        let hit = Run::new(root, server, n).scenario(at);
                        (at.clone(), hit)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        for (at, hit) in results {
            match hit {
                Some(_) => covered.push(at),
                None => missed.push(at),
            }
        }
    }
    eprintln!(
        "crash points covered: {} of the {} durable writes of the scenario; not reached: {missed:?}",
        covered.len(),
        points.len()
    );
    // Acknowledgements, app status events and release records follow the timing of polls and of the container's
    // start, and so does how often the probation state is written again as its checks pass: a run may make fewer
    // of them than the counting run did. The first write of every state, the identity and the files recur in
    // every run, and each was cut.
    let timed = |m: &str| {
        ["acknowledge#", "event app ", "release#"]
            .iter()
            .any(|t| m.starts_with(t))
            || (m.starts_with("state ") && !m.ends_with("#1"))
    };
    assert!(
        missed.iter().all(|m| timed(m)),
        "writes of the counting run that a run never made: {missed:?}"
    );
    for must in [
        "identity enrollment_id#1",
        "identity device_id#1",
        "state preparing#1",
        "state switching#1",
        "state probation#1",
        "state steady#1",
        "state rolling-back#1",
        "acknowledge#1",
        "file status.json#1",
    ] {
        assert!(
            covered.iter().any(|c| c == must),
            "no run aborted at {must:?}: {covered:?}"
        );
    }
}
