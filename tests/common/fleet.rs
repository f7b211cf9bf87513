//! The fleet's host side, shared by the fleet tests and the ARM machine tests: flotilla-server on loopback with its
//! operator CLI, and the lab's multi-arch busybox images pushed to a loopback registry.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::registry::{LayoutImage, OciLayoutBuilder, Registry, free_port, skopeo_copy};
use super::{output_text, wait_for};

pub struct Server {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    pub registry: String,
    /// The fleet's PostgreSQL, when the tests run on it; its SQLite file in `dir` otherwise.
    pub postgres: Option<super::postgres::Cluster>,
}

/// Whether the fleet tests run their server on PostgreSQL (`FLOTILLA_TEST_DB=postgres`, as CI runs them a second
/// time) rather than SQLite.
pub fn on_postgres() -> bool {
    std::env::var("FLOTILLA_TEST_DB").as_deref() == Ok("postgres")
}

impl Server {
    pub fn start(dir: &Path, registry: &str) -> Server {
        let postgres = if on_postgres() {
            let cluster = super::postgres::Cluster::start();
            Some(
                cluster
                    .expect("FLOTILLA_TEST_DB=postgres needs PostgreSQL (tests/setup installs it)"),
            )
        } else {
            None
        };
        let mut s = Server {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            registry: registry.to_string(),
            postgres,
        };
        s.resume();
        s
    }

    /// What `--db` names.
    pub fn db(&self) -> std::ffi::OsString {
        match &self.postgres {
            Some(c) => c.url().into(),
            None => self.dir.join("server.db").into(),
        }
    }

    /// The first column of the first row of `sql` (a count), read from the fleet's database on either engine.
    pub fn count(&self, sql: &str) -> i64 {
        match &self.postgres {
            Some(c) => c
                .query(super::postgres::DATABASE, sql)
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{sql}: not a count: {e}")),
            None => rusqlite::Connection::open_with_flags(
                self.dir.join("server.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("server.db")
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("server log");
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--db")
            .arg(self.db())
            .arg("--token-file")
            .arg(self.dir.join("admin-token"))
            .args(["--insecure-registry", &self.registry, "--tick", "1s"])
            .env("FLOTILLA_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start flotilla-server");
        self.child = Some(child);
        wait_for("the server to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        operator(&self.url(), &self.dir.join("admin-token"), args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "flotilla-server {args:?}: {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("JSON from --json")
    }

    pub fn device(&self, name: &str) -> Value {
        device_in(&self.json(&["devices"]), name)
    }

    /// The status `name` last reported for the app.
    pub fn app(&self, name: &str) -> Value {
        demo_of(&self.device(name))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// An enrollment token made with `args` (`--uses 1`, …), written to `enroll-token` in the server's directory.
    pub fn token_file(&self, args: &[&str]) -> PathBuf {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let token = self.ok(&all);
        let path = self.dir.join("enroll-token");
        std::fs::write(&path, &token).expect("token file");
        path
    }

    /// An app `name` whose containers run [`APP_CMD`], restarted always and stopped within 2 s.
    pub fn create_app(&self, name: &str) {
        self.ok(&create_app(name));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
        }
    }
}

/// `app create NAME` for an app whose containers run [`APP_CMD`], restarted always and stopped within 2 s.
fn create_app(name: &str) -> [&str; 10] {
    [
        "app",
        "create",
        name,
        "--restart",
        "always",
        "--stop-timeout",
        "2s",
        "--",
        "-c",
        APP_CMD,
    ]
}

/// The device `name` in `flotilla-server --json devices`' answer, or null.
fn device_in(devices: &Value, name: &str) -> Value {
    devices
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// What a device last reported of the app `demo`, or null.
fn demo_of(device: &Value) -> Value {
    device["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["app"] == "demo").cloned())
        .unwrap_or(Value::Null)
}

/// An operator command (`flotilla-server --server URL --token-file PATH ARGS`) as it ran.
pub fn operator(url: &str, token_file: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
        .args(["--server", url, "--token-file"])
        .arg(token_file)
        .args(args)
        .output()
        .expect("run flotilla-server")
}

/// One of several flotilla-server replicas on one PostgreSQL: its own port and log (`NAME.log` in its directory),
/// and the fleet's admin token file, which it shares with the others (the first to start writes it).
pub struct Replica {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
    db: String,
    token_file: PathBuf,
    registry: String,
    tick: String,
    child: Option<Child>,
}

impl Replica {
    /// A replica not yet started, whose driver ticks every `tick` (`1h`: it acts only when a request asks).
    pub fn new(dir: &Path, name: &str, db: &str, registry: &str, tick: &str) -> Replica {
        Replica {
            name: name.to_string(),
            port: free_port(),
            dir: dir.to_path_buf(),
            db: db.to_string(),
            token_file: dir.join("admin-token"),
            registry: registry.to_string(),
            tick: tick.to_string(),
            child: None,
        }
    }

    /// [`Replica::new`], started and listening.
    pub fn start(dir: &Path, name: &str, db: &str, registry: &str, tick: &str) -> Replica {
        let mut r = Replica::new(dir, name, db, registry, tick);
        r.spawn();
        r.wait_listening();
        r
    }

    /// Starts the process and returns at once, so that several replicas can start at the same instant.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("replica log");
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--db", &self.db, "--tick", &self.tick])
            .args(["--insecure-registry", &self.registry])
            .env("FLOTILLA_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start flotilla-server");
        self.child = Some(child);
    }

    /// Waits until the replica accepts connections; panics with its log if it exited instead.
    pub fn wait_listening(&mut self) {
        let (port, log) = (self.port, self.log_path());
        let child = self.child.as_mut().expect("the replica was spawned");
        wait_for(
            &format!("replica {} to listen", self.name),
            Duration::from_secs(20),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "the replica exited ({status}) before it listened:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
        );
    }

    /// SIGKILL: the replica dies wherever it is, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = operator(&self.url(), &self.token_file, args);
        assert!(
            out.status.success(),
            "flotilla-server {args:?} on replica {}: {}",
            self.name,
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("JSON from --json")
    }

    /// As [`Server::create_app`].
    pub fn create_app(&self, name: &str) {
        self.ok(&create_app(name));
    }

    /// The status `name` last reported for the app `demo`, as this replica reads it.
    pub fn app(&self, name: &str) -> Value {
        demo_of(&device_in(&self.json(&["devices"]), name))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- replica {} log ---\n{}", self.name, self.log());
        }
    }
}

/// What the fleet tests' app runs: the image's version, then an exit with code 3 when the image has a /crash
/// marker, else a loop.
pub const APP_CMD: &str = "busybox cat /VERSION; if [ -e /crash ]; then echo crashing >&2; exit 3; fi; while :; do busybox sleep 1; done";

/// What a test that runs agents with containers needs: root (for runc), runc and a loopback registry.
pub fn agent_prerequisites() -> Option<()> {
    super::require(
        "root (runc needs it)",
        rustix::process::geteuid().is_root().then_some(()),
    )?;
    super::required_tool("runc")?;
    super::registry::registry_prerequisites()
}

/// The busybox images of the lab, each with a /VERSION file, and a /crash marker when `crash`.
pub fn images() -> Option<Vec<LayoutImage>> {
    super::registry::busybox_images()
}

pub struct Pushed {
    pub index: String,
    /// Platform → manifest digest.
    pub manifests: Vec<(String, String)>,
}

pub fn push(root: &Path, registry: &Registry, tag: &str, crash: bool) -> Pushed {
    push_to(root, registry, "demo", tag, crash)
}

/// [`push`] to the repository `repo`.
pub fn push_to(root: &Path, registry: &Registry, repo: &str, tag: &str, crash: bool) -> Pushed {
    let images = images().expect("busybox images");
    let version = root.join(format!("VERSION-{tag}"));
    std::fs::write(&version, format!("{tag}\n")).expect("version file");
    let marker = root.join("crash-marker");
    std::fs::write(&marker, "").expect("crash marker");
    let extra: Vec<Vec<(&str, PathBuf)>> = images
        .iter()
        .map(|_| {
            let mut files = vec![("VERSION", version.clone())];
            if crash {
                files.push(("crash", marker.clone()));
            }
            files
        })
        .collect();
    let layout = OciLayoutBuilder::new(&root.join(format!("layout-{repo}-{tag}")));
    let written = layout.write_with_files(tag, &images, &extra);
    skopeo_copy(layout.dir(), tag, &registry.host(), repo, tag, None, None);
    Pushed {
        index: written.index.to_string(),
        manifests: written
            .images
            .iter()
            .map(|i| (i.platform.clone(), i.manifest.to_string()))
            .collect(),
    }
}

/// One HTTP/1.1 message as the proxy framed it: the head (request or status line and headers) and the body.
pub struct Message {
    pub head: String,
    pub body: Vec<u8>,
}

impl Message {
    fn bytes(&self) -> Vec<u8> {
        let mut b = self.head.as_bytes().to_vec();
        b.extend_from_slice(&self.body);
        b
    }
}

/// What the proxy does with the server's answer to one request.
pub enum Verdict {
    Forward,
    /// The server has done the work; the client never hears of it, and its connection is closed.
    Lose,
    /// Forward the answer, then run the closure (to kill the server right after it acknowledged something).
    ForwardThen(Box<dyn FnOnce() + Send>),
}

type Judge = dyn Fn(&Message, &Message) -> Verdict + Send + Sync;

/// An HTTP/1.1 proxy in front of the server for the fleet link's failures: each request and its answer are framed
/// (Content-Length; the agent sends no chunked bodies and the server answers none), and a judge decides per answer.
pub struct Proxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(
        upstream: u16,
        judge: impl Fn(&Message, &Message) -> Verdict + Send + Sync + 'static,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let judge: Arc<Judge> = Arc::new(judge);
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let judge = judge.clone();
                        std::thread::spawn(move || proxy_connection(client, upstream, &*judge));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Proxy { port, stop }
    }

    /// Loses the answer to the first `POST /v1/enroll`; `enrollments` counts the enrollment requests.
    pub fn losing_first_enrollment(upstream: u16, enrollments: Arc<AtomicUsize>) -> Proxy {
        Proxy::start(upstream, move |req, _| {
            if req.head.starts_with("POST /v1/enroll ")
                && enrollments.fetch_add(1, Ordering::SeqCst) == 0
            {
                Verdict::Lose
            } else {
                Verdict::Forward
            }
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one message: the head up to the blank line, then Content-Length bytes. None at a clean end of stream.
fn read_message(r: &mut impl Read) -> Option<Message> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || r.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).ok()?;
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).ok()?;
    Some(Message { head, body })
}

fn proxy_connection(mut client: TcpStream, upstream: u16, judge: &Judge) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    // Bounded: a long poll is held at most 60 s by the server.
    let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = server.set_read_timeout(Some(Duration::from_secs(120)));
    while let Some(request) = read_message(&mut client) {
        if server.write_all(&request.bytes()).is_err() {
            return;
        }
        let Some(answer) = read_message(&mut server) else {
            return;
        };
        match judge(&request, &answer) {
            Verdict::Forward => {
                if client.write_all(&answer.bytes()).is_err() {
                    return;
                }
            }
            Verdict::Lose => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Verdict::ForwardThen(then) => {
                let _ = client.write_all(&answer.bytes());
                let _ = client.flush();
                then();
            }
        }
    }
}

/// A `flotilla agent` with its own configuration and state directory, enrolled with a copy of a token file. Its
/// supervised apps outlive it by design: dropping it removes the app `demo`.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    evidence: Option<PathBuf>,
    child: Option<Child>,
}

impl Agent {
    /// An agent of `server`, not started.
    pub fn new(
        root: &Path,
        name: &str,
        evidence: Option<PathBuf>,
        server: &Server,
        token: &Path,
    ) -> Agent {
        Agent::of(root, name, evidence, &server.url(), &server.registry, token)
    }

    /// An agent of the server at `url` (a replica, or a proxy in front of replicas), pulling from `registry`.
    pub fn of(
        root: &Path,
        name: &str,
        evidence: Option<PathBuf>,
        url: &str,
        registry: &str,
        token: &Path,
    ) -> Agent {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("agent dir");
        // Its own copy: the agent deletes its token file once it is enrolled.
        let own = dir.join("enroll-token");
        std::fs::copy(token, &own).expect("the agent's token file");
        let token = own.as_path();
        let config = format!(
            "[fleet]\nserver = \"{}\"\ntoken_file = \"{}\"\nname = \"{name}\"\ntags = {{ site = \"lab\" }}\n\
             poll_interval = \"3s\"\nprobation = \"2s\"\nheartbeat_interval = \"2s\"\n\
             [run]\nallow_emulation = true\n[[registry]]\nhost = \"{}\"\ninsecure = true\n",
            url,
            token.display(),
            registry
        );
        std::fs::write(dir.join("config.toml"), config).expect("agent config");
        Agent {
            name: name.to_string(),
            dir,
            evidence,
            child: None,
        }
    }

    pub fn flotilla(&self) -> Command {
        super::Flotilla::new()
            .config(self.dir.join("config.toml"))
            .state(self.dir.join("state"))
            .command()
    }

    pub fn start_with(&mut self, halt_at: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let mut c = self.flotilla();
        if let Some(e) = &self.evidence {
            c.arg("--evidence").arg(e);
        }
        c.arg("agent")
            .env("FLOTILLA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        match halt_at {
            Some(h) => c.env("FLOTILLA_TEST_HALT_AT", h),
            None => c.env_remove("FLOTILLA_TEST_HALT_AT"),
        };
        self.child = Some(c.spawn().expect("start flotilla agent"));
    }

    pub fn start(&mut self) {
        self.start_with(None);
    }

    /// Points the agent at another server URL from its next start, as an operator moving it behind a balancer.
    pub fn set_server(&self, url: &str) {
        let path = self.dir.join("config.toml");
        let config = std::fs::read_to_string(&path).expect("agent config");
        let line = config
            .lines()
            .find(|l| l.starts_with("server = "))
            .expect("a server line")
            .to_string();
        std::fs::write(&path, config.replace(&line, &format!("server = \"{url}\"")))
            .expect("agent config");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The agent's containers, as `flotilla ps -a --json` lists them.
    pub fn containers(&self) -> Vec<Value> {
        let out = self
            .flotilla()
            .args(["ps", "-a", "--json"])
            .output()
            .expect("flotilla ps");
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    pub fn outbox_ids(&self) -> Vec<String> {
        let db = rusqlite::Connection::open(self.dir.join("state/agent.db")).expect("agent.db");
        let mut st = db
            .prepare("SELECT id FROM outbox WHERE heartbeat = 0 ORDER BY seq")
            .expect("outbox query");
        st.query_map([], |r| r.get::<_, String>(0))
            .expect("outbox rows")
            .collect::<Result<Vec<_>, _>>()
            .expect("outbox ids")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- agent {} (last lines) ---", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        // The apps' supervisors outlive their agent by design; the test removes them.
        let _ = self.flotilla().args(["rm", "--force", "demo"]).output();
    }
}
