//! Two flotilla-server replicas on one PostgreSQL, end to end: a throwaway cluster, the real server binary twice,
//! the packaged HAProxy configuration in front of them, a loopback registry with the lab's busybox images, and
//! devices simulated over HTTP as the agent speaks to the server (enroll, long-poll the desired state, report).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::fleet::{Agent, Replica, push};
use common::postgres::{Cluster, DATABASE};
use common::registry::{Registry, RegistryOptions, free_port};
use common::{require, required_tool, wait_for};
use serde_json::{Value, json};

/// An HTTP answer: status, headers (names lower-cased) and body.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request on a connection of its own (`Connection: close`, so the answer ends with the stream).
fn http(
    port: u16,
    method: &str,
    path: &str,
    bearer: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    // Above the longest long poll the tests ask for.
    stream.set_read_timeout(Some(Duration::from_secs(90)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: flotilla\r\nConnection: close\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of the answer's head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        return Err(bad("a chunked answer; the server sends Content-Length"));
    }
    Ok(Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Enrolls a device named `name` with the enrollment token through `port`; its credential.
fn enroll(port: u16, token: &str, name: &str) -> String {
    let request = json!({
        "name": name,
        "tags": {"site": "lab"},
        "agent_version": "0.0.0-simulated",
        "platform": {"candidates": ["linux/amd64"], "page_size": 4096, "description": "simulated device"},
    });
    let a = http(port, "POST", "/v1/enroll", token, &[], Some(&request)).expect("enroll");
    assert_eq!(
        a.status,
        201,
        "enroll {name}: {}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()["credential"]
        .as_str()
        .expect("a credential")
        .to_string()
}

/// `GET /v1/device/desired?wait=SECS` with `If-None-Match: etag` when given.
fn desired(port: u16, credential: &str, etag: Option<&str>, wait: u64) -> std::io::Result<Answer> {
    let headers: Vec<(&str, &str)> = etag.map(|e| ("If-None-Match", e)).into_iter().collect();
    http(
        port,
        "GET",
        &format!("/v1/device/desired?wait={wait}"),
        credential,
        &headers,
        None,
    )
}

/// A device simulated on a thread of its own as the agent behaves: it long-polls its desired state, and reports
/// each release it is ordered as prepared, committed and running, sending a batch again until it is accepted.
struct Device {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Device {
    fn start(port: u16, credential: String, name: &str) -> Device {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            let mut etag: Option<String> = None;
            let mut running: Option<String> = None;
            let mut seq = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                // Short holds, so that the device notices the test's end; a failure (the replica behind the
                // proxy was killed) is retried as the agent does, after a pause.
                let a = match desired(port, &credential, etag.as_deref(), 5) {
                    Ok(a) if a.status == 200 || a.status == 304 => a,
                    _ => {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                etag = a.headers.get("etag").cloned();
                if a.status == 304 {
                    continue;
                }
                let order = a.json()["apps"]
                    .as_array()
                    .and_then(|apps| apps.iter().find(|app| app["name"] == "demo").cloned());
                let Some(release) = order.and_then(|o| o["release"].as_str().map(str::to_string))
                else {
                    continue;
                };
                if running.as_deref() == Some(release.as_str()) {
                    continue;
                }
                let mut event = |body: Value| {
                    seq += 1;
                    json!({"id": format!("{name}-{seq}"), "at": now(), "seq": seq, "body": body})
                };
                let update = |report: &str| json!({"kind": "update", "data": {"app": "demo", "report": {"event": report, "release": release}}});
                let batches = [
                    vec![event(update("preparing"))],
                    vec![
                        event(update("committed")),
                        event(json!({"kind": "app", "data": {
                            "app": "demo", "release": release, "manifest": null, "platform": "linux/amd64",
                            "state": "running", "restarts": 0, "health": null, "wrong_variant": null,
                        }})),
                    ],
                ];
                for events in batches {
                    let batch = json!({ "events": events });
                    while !stopped.load(Ordering::Relaxed) {
                        match http(
                            port,
                            "POST",
                            "/v1/device/reports",
                            &credential,
                            &[],
                            Some(&batch),
                        ) {
                            Ok(a) if a.status == 200 => break,
                            _ => std::thread::sleep(Duration::from_millis(200)),
                        }
                    }
                }
                running = Some(release);
            }
        });
        Device {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the tests need beyond PostgreSQL: the loopback registry and the lab's busybox images.
fn prerequisites() -> Option<()> {
    common::registry::registry_prerequisites()?;
    require("the lab's busybox images", common::fleet::images()).map(|_| ())
}

#[test]
fn an_order_written_through_one_replica_wakes_a_long_poll_on_the_other() {
    let Some(()) = prerequisites() else { return };
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    push(root, &registry, "v1", false);
    // A's driver never ticks: only B's writes, heard through NOTIFY, can change what A's long poll answers.
    let a = Replica::start(root, "a", &cluster.url(), &registry.host(), "1h");
    let b = Replica::start(root, "b", &cluster.url(), &registry.host(), "1s");

    let token = b.ok(&["token", "create", "--uses", "1", "--expires", "1h"]);
    let credential = enroll(a.port, &token, "sim-1");
    let first = desired(a.port, &credential, None, 0).expect("desired state");
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["apps"], json!([]));
    let etag = first.headers.get("etag").expect("an ETag").clone();

    let (port, held) = (a.port, credential.clone());
    let poll = std::thread::spawn(move || {
        let answer = desired(port, &held, Some(&etag), 30).expect("the long poll");
        (answer, Instant::now())
    });
    b.ok(&["app", "create", "demo", "--", "-c", "sleep 1000"]);
    b.ok(&[
        "release",
        "create",
        "demo",
        &format!("{}/demo:v1", registry.host()),
    ]);
    // The release's creation changed no device's desired state: A's long poll is still held.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !poll.is_finished(),
        "the long poll returned before any order"
    );

    let started = Instant::now();
    b.ok(&["rollout", "start", "demo-1", "--waves", "100"]);
    let (answer, returned) = poll.join().expect("the long poll's thread");
    let took = returned.duration_since(started);
    println!("the long poll on A returned {took:?} after the rollout started through B");
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(
        answer.json()["apps"][0]["release"],
        "demo-1",
        "{}",
        answer.json()
    );
    assert!(
        took < Duration::from_secs(2),
        "A's long poll took {took:?} to hear of an order written through B"
    );
    assert!(
        !a.log().contains("ordered the device"),
        "A wrote an order itself, so B's notification was not what woke it:\n{}",
        a.log()
    );
    assert!(
        b.log().contains("ordered the device to the release"),
        "{}",
        b.log()
    );
}

/// HAProxy running the packaged example configuration, its bind line and servers pointed at loopback.
struct Haproxy {
    port: u16,
    child: Child,
    log: std::path::PathBuf,
}

impl Haproxy {
    fn start(root: &Path, replicas: &[&Replica]) -> Haproxy {
        let packaged = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/haproxy.cfg"),
        )
        .expect("packaging/haproxy.cfg");
        let port = free_port();
        let (mut binds, mut servers) = (0, 0);
        let mut config = String::new();
        for line in packaged.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first() {
                Some(&"bind") => {
                    binds += 1;
                    config.push_str(&format!("    bind 127.0.0.1:{port}\n"));
                }
                // Two descriptors a connection: the example's figure may be above this machine's limit, which
                // HAProxy refuses to start with.
                Some(&"maxconn") => config.push_str("    maxconn 2000\n"),
                Some(&"server") => {
                    // The example's servers become the test's replicas, as many as the test has, with the
                    // example's options (its health check).
                    if servers == 0 {
                        let options = words.get(3..).unwrap_or_default().join(" ");
                        for r in replicas {
                            config.push_str(&format!(
                                "    server {} 127.0.0.1:{} {options}\n",
                                r.name, r.port
                            ));
                        }
                    }
                    servers += 1;
                }
                _ => {
                    config.push_str(line);
                    config.push('\n');
                }
            }
        }
        assert_eq!(binds, 1, "packaging/haproxy.cfg should have one bind line");
        assert!(
            servers >= 2,
            "packaging/haproxy.cfg should list its replicas as `server` lines"
        );
        let path = root.join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let check = Command::new("haproxy")
            .args(["-c", "-f"])
            .arg(&path)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy refuses the packaged configuration: {}",
            common::output_text(&check)
        );
        let log = root.join("haproxy.log");
        let out = std::fs::File::create(&log).expect("haproxy log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(out.try_clone().expect("haproxy log"))
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        let mut proxy = Haproxy { port, child, log };
        wait_for("HAProxy to listen", Duration::from_secs(10), || {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!(
                    "HAProxy exited ({status}):\n{}",
                    std::fs::read_to_string(&proxy.log).unwrap_or_default()
                );
            }
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        proxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- haproxy log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// How many "ordered the device to the release" lines each device has for `release` in `log`.
fn orders(log: &str, release: &str, counts: &mut BTreeMap<String, usize>) {
    for line in log.lines() {
        if !line.contains("ordered the device to the release")
            || !line.contains(&format!("release={release}"))
        {
            continue;
        }
        let device = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("device="))
            .unwrap_or_else(|| panic!("an order without its device: {line}"));
        *counts.entry(device.to_string()).or_default() += 1;
    }
}

/// Starts a rollout of `release` in two waves through A, which orders the first at once, kills A before the
/// first wave's soak is over, and waits up to `limit` for B to finish it.
fn killed_mid_wave(a: &mut Replica, b: &Replica, release: &str, limit: Duration) {
    let id = a.ok(&[
        "rollout",
        "start",
        release,
        "--select",
        "site=lab",
        "--counts",
        "--waves",
        "1,2",
        "--max-failures",
        "1",
        "--soak",
        "3s",
    ]);
    wait_for(
        "the first wave to be ordered",
        Duration::from_secs(10),
        || b.json(&["rollout", "status", &id])["waves_started"] == 1,
    );
    a.kill();
    let status = b.json(&["rollout", "status", &id]);
    assert_eq!(
        status["waves_started"], 1,
        "A died too late to matter: {status}"
    );
    assert_ne!(status["status"]["state"], "done", "{status}");
    wait_for("B to finish the rollout", limit, || {
        let s = b.json(&["rollout", "status", &id]);
        assert_ne!(s["status"]["state"], "paused", "{s}");
        s["status"]["state"] == "done"
    });
}

#[test]
fn a_replica_killed_mid_wave_leaves_the_rollout_to_the_other() {
    let Some(()) = prerequisites() else { return };
    let Some(_) = required_tool("haproxy") else {
        return;
    };
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    push(root, &registry, "v1", false);
    let mut a = Replica::start(root, "a", &cluster.url(), &registry.host(), "1s");
    let b = Replica::start(root, "b", &cluster.url(), &registry.host(), "1s");
    let proxy = Haproxy::start(root, &[&a, &b]);
    wait_for(
        "HAProxy's health checks to pass",
        Duration::from_secs(10),
        || http(proxy.port, "GET", "/signin", "", &[], None).is_ok_and(|a| a.status == 200),
    );

    let token = b.ok(&[
        "token",
        "create",
        "--uses",
        "2",
        "--expires",
        "1h",
        "--tag",
        "site=lab",
    ]);
    let names = ["sim-1", "sim-2"];
    let devices: Vec<Device> = names
        .iter()
        .map(|name| Device::start(proxy.port, enroll(proxy.port, &token, name), name))
        .collect();
    b.ok(&["app", "create", "demo", "--", "-c", "sleep 1000"]);
    b.ok(&[
        "release",
        "create",
        "demo",
        &format!("{}/demo:v1", registry.host()),
    ]);
    killed_mid_wave(&mut a, &b, "demo-1", Duration::from_secs(60));
    let fleet = b.json(&["devices"]);
    for name in names {
        let device = fleet
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["name"] == name))
            .unwrap_or_else(|| panic!("{name} is not in the fleet: {fleet}"));
        wait_for(
            &format!("{name} on demo-1"),
            Duration::from_secs(10),
            || {
                let d = b
                    .json(&["devices"])
                    .as_array()
                    .and_then(|ds| ds.iter().find(|d| d["name"] == name).cloned())
                    .unwrap_or(Value::Null);
                d["apps"][0]["status"]["release"] == "demo-1"
            },
        );
        assert!(device["id"].is_string(), "{device}");
    }
    drop(devices);

    let mut counts = BTreeMap::new();
    orders(&a.log(), "demo-1", &mut counts);
    let by_a = counts.values().sum::<usize>();
    orders(&b.log(), "demo-1", &mut counts);
    println!("orders for demo-1: {counts:?}, {by_a} of them by A");
    assert_eq!(counts.len(), 2, "each device ordered once: {counts:?}");
    assert!(
        counts.values().all(|n| *n == 1),
        "an order written twice: {counts:?}"
    );
    // Which replica ordered wave 1 is not fixed: A writes it as it creates the rollout unless B's tick holds the
    // rollout's lock at that instant, and then B does. Either way A died after wave 1 was ordered, and B went on.
    let log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
    assert!(
        log.contains(" replicas/a ") && log.contains(" replicas/b "),
        "HAProxy did not spread the devices' requests over both replicas:\n{log}"
    );
    assert!(log.contains("Server replicas/a is DOWN"), "{log}");
}

/// The same with two real agents (runc, this host's variant), the "two replicas, two agents": agent one
/// talks to A alone, whose driver never ticks, and runs a release ordered through B; then, both behind the packaged
/// HAProxy, a rollout in two waves started through A goes on through B after A's SIGKILL, and each agent runs the
/// release it was ordered once, whichever replica wrote the order.
#[test]
fn two_real_agents_follow_rollouts_across_replicas_and_past_a_killed_one() {
    let Some(()) = prerequisites() else { return };
    let Some(()) = common::fleet::agent_prerequisites() else {
        return;
    };
    let Some(_) = required_tool("haproxy") else {
        return;
    };
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    push(root, &registry, "v1", false);
    push(root, &registry, "v2", false);
    let mut a = Replica::start(root, "a", &cluster.url(), &registry.host(), "1h");
    let b = Replica::start(root, "b", &cluster.url(), &registry.host(), "1s");
    let proxy = Haproxy::start(root, &[&a, &b]);
    let balanced = format!("http://127.0.0.1:{}", proxy.port);

    let token = b.ok(&[
        "token",
        "create",
        "--uses",
        "2",
        "--expires",
        "1h",
        "--tag",
        "site=lab",
    ]);
    let token_file = root.join("enroll-token");
    std::fs::write(&token_file, &token).expect("token file");
    let mut one = Agent::of(root, "one", None, &a.url(), &registry.host(), &token_file);
    let mut two = Agent::of(root, "two", None, &balanced, &registry.host(), &token_file);
    one.start();
    two.start();
    wait_for("both agents to enroll", Duration::from_secs(30), || {
        b.json(&["devices"])
            .as_array()
            .is_some_and(|d| d.len() == 2)
    });
    b.create_app("demo");
    b.ok(&[
        "release",
        "create",
        "demo",
        &format!("{}/demo:v1", registry.host()),
    ]);
    b.ok(&[
        "rollout", "start", "demo-1", "--select", "site=lab", "--waves", "100",
    ]);
    for name in ["one", "two"] {
        wait_for(
            &format!("{name} to run demo-1"),
            Duration::from_secs(90),
            || {
                let app = b.app(name);
                app["status"]["release"] == "demo-1" && app["status"]["state"] == "running"
            },
        );
    }
    assert!(
        !a.log().contains("ordered the device"),
        "A ordered demo-1 itself, though its driver never ticks:\n{}",
        a.log()
    );

    // Agent one moves behind the balancer; a rollout in two waves starts through A, which dies after wave 1.
    one.kill();
    one.set_server(&balanced);
    one.start();
    a.ok(&[
        "release",
        "create",
        "demo",
        &format!("{}/demo:v2", registry.host()),
    ]);
    killed_mid_wave(&mut a, &b, "demo-2", Duration::from_secs(120));
    for (name, agent) in [("one", &one), ("two", &two)] {
        wait_for(
            &format!("{name} to run demo-2"),
            Duration::from_secs(60),
            || {
                let app = b.app(name);
                app["status"]["release"] == "demo-2" && app["status"]["state"] == "running"
            },
        );
        let c = agent.containers();
        assert_eq!(c.len(), 1, "{name}: {c:?}");
        assert_eq!(c[0]["state"], "running", "{name}: {c:?}");
    }
    let mut counts = BTreeMap::new();
    orders(&a.log(), "demo-2", &mut counts);
    orders(&b.log(), "demo-2", &mut counts);
    assert_eq!(counts.len(), 2, "each device ordered: {counts:?}");
    assert!(
        counts.values().all(|n| *n == 1),
        "an order written twice: {counts:?}"
    );
}

#[test]
fn both_replicas_restarted_at_once_migrate_once() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    // No release is made: the registry named is never reached.
    let registry = "127.0.0.1:9";
    let mut replicas = [
        Replica::new(root, "a", &cluster.url(), registry, "1s"),
        Replica::new(root, "b", &cluster.url(), registry, "1s"),
    ];
    let at_once = |replicas: &mut [Replica; 2]| {
        for r in replicas.iter_mut() {
            r.spawn();
        }
        for r in replicas.iter_mut() {
            r.wait_listening();
        }
    };
    let count = |sql: &str| -> i64 {
        cluster
            .query(DATABASE, sql)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{sql}: not a count: {e}"))
    };

    // On the empty database, both race to make the schema.
    at_once(&mut replicas);
    let version = count("SELECT version FROM schema_version");
    assert!(version >= 1, "schema version {version}");
    assert_eq!(count("SELECT count(*) FROM schema_version"), 1);
    assert_eq!(
        count("SELECT count(*) FROM admin_tokens"),
        1,
        "each replica made an admin token"
    );
    let [a, b] = &replicas;
    let token = a.ok(&["token", "create", "--uses", "1", "--expires", "1h"]);
    let credential = enroll(b.port, &token, "sim-1");
    a.ok(&["app", "create", "demo", "--", "-c", "sleep 1000"]);

    for r in replicas.iter_mut() {
        r.kill();
    }
    at_once(&mut replicas);
    assert_eq!(count("SELECT count(*) FROM schema_version"), 1);
    assert_eq!(count("SELECT version FROM schema_version"), version);
    for r in &replicas {
        let devices = r.json(&["devices"]);
        assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");
        assert_eq!(devices[0]["name"], "sim-1", "{devices}");
        let apps = r.json(&["app", "list"]);
        assert_eq!(apps[0]["name"], "demo", "{apps}");
        let d = desired(r.port, &credential, None, 0).expect("desired state");
        assert_eq!(d.status, 200, "the device's credential on {}", r.name);
    }
}

#[test]
fn a_long_poll_through_the_packaged_haproxy_is_held_its_whole_minute() {
    let Some(_) = required_tool("haproxy") else {
        return;
    };
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let a = Replica::start(root, "a", &cluster.url(), "127.0.0.1:9", "1s");
    let proxy = Haproxy::start(root, &[&a]);
    wait_for(
        "HAProxy's health check to pass",
        Duration::from_secs(10),
        || http(proxy.port, "GET", "/signin", "", &[], None).is_ok_and(|a| a.status == 200),
    );
    let token = a.ok(&["token", "create", "--uses", "1", "--expires", "1h"]);
    let credential = enroll(proxy.port, &token, "sim-1");
    let first = desired(proxy.port, &credential, None, 0).expect("desired state");
    assert_eq!(first.status, 200);
    let etag = first.headers.get("etag").expect("an ETag").clone();

    // The API's longest hold: a proxy timeout below it would answer 504 before the replica's 304.
    let started = Instant::now();
    let held = desired(proxy.port, &credential, Some(&etag), 60).expect("the long poll");
    let took = started.elapsed();
    println!(
        "a 60 s long poll through HAProxy answered {} after {took:?}",
        held.status
    );
    assert_eq!(held.status, 304, "{}", String::from_utf8_lossy(&held.body));
    assert!(took >= Duration::from_secs(59), "held only {took:?}");
}

/// PostgreSQL lost under a running replica: the devices' requests get 503 with `Retry-After` (which the agent
/// honours, keeping its outbox) rather than a 500 or a hang, and once the database is back the replica serves
/// again by itself, with no restart.
#[test]
fn a_replica_without_its_database_answers_503_and_recovers_by_itself() {
    let Some(mut cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let a = Replica::start(root, "a", &cluster.url(), "127.0.0.1:9", "1s");
    let token = a.ok(&["token", "create", "--uses", "1", "--expires", "1h"]);
    let credential = enroll(a.port, &token, "sim-1");
    assert_eq!(desired(a.port, &credential, None, 0).unwrap().status, 200);

    cluster.kill();
    let mut answer = None;
    wait_for(
        "a 503 while the database is away",
        Duration::from_secs(30),
        || {
            let a = desired(a.port, &credential, None, 0).expect("an answer");
            let away = a.status == 503;
            answer = Some(a);
            away
        },
    );
    let answer = answer.expect("an answer");
    assert_eq!(
        answer.headers.get("retry-after").map(String::as_str),
        Some("5"),
        "{:?}",
        answer.headers
    );
    let message = String::from_utf8_lossy(&answer.body).into_owned();
    assert!(message.contains("unreachable"), "{message}");
    assert!(
        !message.contains(common::postgres::PASSWORD) && !message.contains("127.0.0.1"),
        "the answer names the database: {message}"
    );

    cluster.resume();
    wait_for(
        "the replica to serve again without a restart",
        Duration::from_secs(60),
        || desired(a.port, &credential, None, 0).is_ok_and(|d| d.status == 200),
    );
    assert!(
        !a.log().contains("panicked"),
        "the replica's log:\n{}",
        a.log()
    );
}

/// What a restore must bring back: the device enrolled before the backup is known, the one enrolled after it is
/// not (its agent needs a new token, as the README says), and the operator's token and app are there.
fn restored_as_backed_up(r: &Replica, before: &str, after: &str) {
    assert_eq!(desired(r.port, before, None, 0).unwrap().status, 200);
    assert_eq!(desired(r.port, after, None, 0).unwrap().status, 401);
    let apps = r.json(&["app", "list"]);
    assert!(apps.to_string().contains("\"demo\""), "{apps}");
}

/// The README's SQLite backup, taken with Debian's `sqlite3` while the server writes, then restored as it says.
#[test]
fn the_readmes_sqlite_backup_taken_while_serving_restores_the_fleet() {
    let Some(sqlite3) = required_tool("sqlite3") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let db = root.join("server.db");
    let db_arg = db.to_str().expect("a UTF-8 path");
    let mut a = Replica::start(root, "a", db_arg, "127.0.0.1:9", "1s");
    a.ok(&["app", "create", "demo", "--", "-c", "sleep 1000"]);
    let token = a.ok(&["token", "create", "--uses", "2", "--expires", "1h"]);
    let before = enroll(a.port, &token, "sim-1");

    let backup = root.join("backup/server.db");
    std::fs::create_dir_all(root.join("backup")).expect("backup directory");
    let out = Command::new(&sqlite3)
        .arg(&db)
        .arg(format!(".backup {}", backup.display()))
        .output()
        .expect("run sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 .backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = enroll(a.port, &token, "sim-2");

    // Stopped as a crash would: the WAL beside the database holds sim-2, and the README's steps delete it.
    a.kill();
    std::fs::copy(&backup, &db).expect("put the copy in place");
    for stale in ["server.db-wal", "server.db-shm"] {
        let _ = std::fs::remove_file(root.join(stale));
    }
    let b = Replica::start(root, "b", db_arg, "127.0.0.1:9", "1s");
    restored_as_backed_up(&b, &before, &after);
}

/// The README's PostgreSQL backup, `pg_dump` while a replica serves, then restored with its `dropdb`, `createdb`
/// and `pg_restore`.
#[test]
fn the_readmes_pg_dump_taken_while_serving_restores_the_fleet() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let mut a = Replica::start(root, "a", &cluster.url(), "127.0.0.1:9", "1s");
    a.ok(&["app", "create", "demo", "--", "-c", "sleep 1000"]);
    let token = a.ok(&["token", "create", "--uses", "2", "--expires", "1h"]);
    let before = enroll(a.port, &token, "sim-1");

    cluster.client(
        "pg_dump",
        &["--format=custom", "--file=flotilla.dump", DATABASE],
    );
    assert!(cluster.dir().join("flotilla.dump").is_file());
    let after = enroll(a.port, &token, "sim-2");

    // "Stop every replica": dropdb refuses a database with sessions, and a killed replica's end a moment later.
    a.kill();
    wait_for(
        "the replica's sessions to end",
        Duration::from_secs(20),
        || {
            cluster
                .query(
                    "postgres",
                    &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{DATABASE}'"),
                )
                .trim()
                == "0"
        },
    );
    cluster.client("dropdb", &[DATABASE]);
    cluster.client("createdb", &["--owner", common::postgres::USER, DATABASE]);
    cluster.client(
        "pg_restore",
        &[
            &format!("--dbname={DATABASE}"),
            "--no-owner",
            &format!("--role={}", common::postgres::USER),
            "flotilla.dump",
        ],
    );
    let b = Replica::start(root, "b", &cluster.url(), "127.0.0.1:9", "1s");
    restored_as_backed_up(&b, &before, &after);
    assert!(!b.log().contains("panicked"), "{}", b.log());
}
