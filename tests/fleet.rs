//! The fleet end to end on one machine, as root, with real parts: flotilla-server with its SQLite, a loopback
//! docker-registry, runc, and three agents with their own state directories and platforms: a Pi Zero and a Pi
//! with a 32-bit OS on a 64-bit kernel (board evidence through `--evidence`, their variants run by qemu-user
//! through binfmt handlers this test registers), and this x86-64 host natively.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::binfmt::Binfmt;
use common::fleet::{Agent, Proxy, Server, Verdict, push};
use common::registry::{Registry, RegistryOptions, free_port};
use common::{output_text, require, wait_for};
use serde_json::Value;

/// binfmt registration and the fixed container name are machine-wide: one scenario at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn shared_board(name: &str) -> PathBuf {
    let root = match std::env::var_os("FLOTILLA_BOARDS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/boards"),
    };
    root.join(name)
}

fn prerequisites() -> Option<Binfmt> {
    common::fleet::agent_prerequisites()?;
    require(
        "board fixtures (../shared/fixtures/boards)",
        shared_board("rpi-zero-w").is_dir().then_some(()),
    )?;
    let binfmt = require("binfmt_misc and qemu-user-static", Binfmt::take())?;
    binfmt.register_all();
    Some(binfmt)
}

fn rollout_status(server: &Server, id: &str) -> Value {
    server.json(&["rollout", "status", id])
}

#[test]
fn rollouts_reach_each_device_with_its_variant_in_waves_roll_back_and_survive_an_outage() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_binfmt) = prerequisites() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    let v1 = push(root, &registry, "v1", false);
    let mut server = Server::start(root, &registry.host());

    let token_file = server.token_file(&["--uses", "3", "--expires", "1h", "--tag", "site=lab"]);
    // The images' entrypoint is busybox sh: the command is its arguments.
    server.create_app("demo");

    let mut agents = vec![
        Agent::new(
            root,
            "pi-zero",
            Some(shared_board("rpi-zero-w")),
            &server,
            &token_file,
        ),
        Agent::new(
            root,
            "pi-32os",
            Some(shared_board("rpi-3b-32os-64kernel")),
            &server,
            &token_file,
        ),
        Agent::new(root, "x86", None, &server, &token_file),
    ];
    for a in &mut agents {
        a.start();
    }
    wait_for("three enrolled devices", Duration::from_secs(60), || {
        server.json(&["devices"]).as_array().map(Vec::len) == Some(3)
    });
    let expected = [
        ("pi-zero", "linux/arm/v6"),
        ("pi-32os", "linux/arm64/v8"),
        ("x86", "linux/amd64"),
    ];
    for (name, platform) in expected {
        let d = server.device(name);
        let candidates = d["platform"]["candidates"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(candidates.iter().any(|c| c == platform), "{d}");
    }
    assert_eq!(
        server.device("pi-zero")["platform"]["candidates"][0],
        "linux/arm/v6"
    );
    assert_eq!(
        server.device("pi-32os")["platform"]["candidates"][0],
        "linux/arm64/v8"
    );

    // v1 everywhere: each device runs, and reports, the variant the index pins for its platform.
    let r1 = server.ok(&[
        "release",
        "create",
        "demo",
        &format!("{}/demo:v1", registry.host()),
    ]);
    assert_eq!(r1, "demo-1");
    let release = server.json(&["release", "list"]);
    assert!(
        release[0]["pinned"].as_str().unwrap().ends_with(&v1.index),
        "{release}"
    );
    let id1 = server.ok(&[
        "rollout",
        "start",
        "demo-1",
        "--select",
        "site=lab",
        "--waves",
        "100",
        "--max-failures",
        "1",
    ]);
    wait_for("rollout 1 to finish", Duration::from_secs(240), || {
        let s = rollout_status(&server, &id1);
        assert_ne!(s["status"]["state"], "paused", "{s}");
        s["status"]["state"] == "done"
    });
    for (name, platform) in expected {
        let want = &v1
            .manifests
            .iter()
            .find(|(p, _)| p == platform)
            .expect("platform pushed")
            .1;
        wait_for(
            &format!("{name} to report demo-1"),
            Duration::from_secs(30),
            || {
                let a = server.app(name);
                a["status"]["release"] == "demo-1" && a["status"]["state"] == "running"
            },
        );
        let a = server.app(name);
        assert_eq!(
            a["status"]["manifest"].as_str(),
            Some(want.as_str()),
            "{name}: {a}"
        );
        let c = &agents.iter().find(|g| g.name == name).unwrap().containers()[0];
        assert_eq!(c["platform"], platform, "{c}");
    }
    let table = server.ok(&["devices"]);
    assert!(
        table.contains("pi-zero") && table.contains("linux/arm/v6") && table.contains("demo-1"),
        "{table}"
    );

    // v2 in two waves: one device, then the rest, after a soak.
    push(root, &registry, "v2", false);
    server.ok(&[
        "release",
        "create",
        "demo",
        &format!("{}/demo:v2", registry.host()),
    ]);
    let soak = 4;
    let id2 = server.ok(&[
        "rollout",
        "start",
        "demo-2",
        "--counts",
        "--waves",
        "1,3",
        "--max-failures",
        "1",
        "--soak",
        &format!("{soak}s"),
    ]);
    let mut first_healthy: Option<Instant> = None;
    let mut second_ordered: Option<Instant> = None;
    wait_for("rollout 2 to finish", Duration::from_secs(240), || {
        let s = rollout_status(&server, &id2);
        if first_healthy.is_none() && s["waves"][0]["healthy"] == 1 {
            first_healthy = Some(Instant::now());
        }
        if second_ordered.is_none() && s["waves_started"] == 2 {
            second_ordered = Some(Instant::now());
            assert!(
                first_healthy.is_some(),
                "the second wave started before the first was healthy: {s}"
            );
        }
        s["status"]["state"] == "done"
    });
    let waited = second_ordered
        .unwrap()
        .duration_since(first_healthy.unwrap());
    assert!(
        waited >= Duration::from_secs(soak - 1),
        "the soak was not kept: {waited:?}"
    );
    for (name, _) in expected {
        wait_for(
            &format!("{name} on demo-2"),
            Duration::from_secs(30),
            || server.app(name)["status"]["release"] == "demo-2",
        );
    }

    // v3 crashes on start: the first wave rolls back to v2, the rollout pauses at the threshold and says why.
    push(root, &registry, "v3", true);
    server.ok(&[
        "release",
        "create",
        "demo",
        &format!("{}/demo:v3", registry.host()),
    ]);
    let id3 = server.ok(&[
        "rollout",
        "start",
        "demo-3",
        "--counts",
        "--waves",
        "1,3",
        "--max-failures",
        "1",
    ]);
    wait_for("rollout 3 to pause", Duration::from_secs(240), || {
        rollout_status(&server, &id3)["status"]["state"] == "paused"
    });
    let s3 = rollout_status(&server, &id3);
    assert!(
        s3["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("1 of 1 devices failed"),
        "{s3}"
    );
    assert_eq!(s3["waves_started"], 1, "{s3}");
    let failed = s3["waves"][0]["devices"][0].as_str().unwrap().to_string();
    wait_for(
        "the failed device back on demo-2",
        Duration::from_secs(60),
        || {
            let a = server.app(&failed);
            a["status"]["release"] == "demo-2" && a["status"]["state"] == "running"
        },
    );
    let a = server.app(&failed);
    assert_eq!(a["update"]["event"], "rolled-back", "{a}");
    assert_eq!(a["update"]["release"], "demo-3", "{a}");
    assert!(
        a["update"]["reason"]
            .as_str()
            .unwrap()
            .contains("exit code 3"),
        "{a}"
    );
    assert!(
        s3["devices"][&failed]
            .as_str()
            .unwrap()
            .starts_with("failed"),
        "{s3}"
    );
    for (name, _) in expected.iter().filter(|(n, _)| *n != failed) {
        assert_eq!(
            server.app(name)["status"]["release"],
            "demo-2",
            "{name} was never ordered demo-3"
        );
    }

    // The server goes away: apps keep running, events queue, and all arrive exactly once when it returns.
    server.stop();
    let victim = &agents[2];
    let out = victim
        .flotilla()
        .args(["stop", "demo"])
        .output()
        .expect("flotilla stop");
    assert!(out.status.success(), "{}", output_text(&out));
    // An offline reboot, as far as a test can make one: the agent dies and its container is gone with it. Started
    // again with no server to ask, the agent brings the committed release back from its own state.
    let rebooted = &mut agents[1];
    rebooted.kill();
    let out = rebooted
        .flotilla()
        .args(["rm", "--force", "demo"])
        .output()
        .expect("flotilla rm");
    assert!(out.status.success(), "{}", output_text(&out));
    rebooted.start();
    wait_for(
        "the committed app back without the server",
        Duration::from_secs(60),
        || {
            rebooted
                .containers()
                .first()
                .is_some_and(|c| c["state"] == "running")
        },
    );
    std::thread::sleep(Duration::from_secs(6));
    for a in &agents[..2] {
        let c = &a.containers()[0];
        assert_eq!(c["state"], "running", "{}: {c}", a.name);
    }
    let queued: Vec<(String, Vec<String>)> = agents
        .iter()
        .map(|a| (a.name.clone(), a.outbox_ids()))
        .collect();
    assert!(
        !queued[2].1.is_empty(),
        "the stopped app's status waits in the outbox"
    );
    server.resume();
    for (a, (_, ids)) in agents.iter().zip(&queued) {
        wait_for(
            &format!("{}'s queued events to be delivered", a.name),
            Duration::from_secs(60),
            || {
                let left = a.outbox_ids();
                ids.iter().all(|id| !left.contains(id))
            },
        );
    }
    for (name, ids) in &queued {
        for id in ids {
            let n = server.count(&format!(
                "SELECT COUNT(*) FROM events e JOIN devices d ON d.id = e.device WHERE d.name = '{name}' AND e.id = '{id}'"
            ));
            assert_eq!(n, 1, "{name}'s event {id} is on the server once");
        }
    }
    assert_eq!(server.app("x86")["status"]["state"], "stopped");
    drop(agents);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// The agent is killed (SIGKILL) right after it wrote each update state, before that state's actions ran. Started
/// again, it converges: the release is committed, or rolled back when it crashes, and the app runs.
#[test]
fn an_agent_killed_at_every_update_state_converges_after_its_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_binfmt) = prerequisites() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    let server = Server::start(root, &registry.host());
    let token_file = server.token_file(&["--uses", "unlimited", "--tag", "site=lab"]);
    server.create_app("demo");
    let mut agent = Agent::new(root, "x86", None, &server, &token_file);
    agent.start();

    let rounds = [
        (None, false, "committed"),
        (Some("preparing"), false, "committed"),
        (Some("switching"), false, "committed"),
        (Some("probation"), false, "committed"),
        (Some("rolling-back"), true, "rolled-back"),
    ];
    let mut running = String::new();
    for (n, (halt, crash, outcome)) in rounds.into_iter().enumerate() {
        let tag = format!("v{}", n + 1);
        push(root, &registry, &tag, crash);
        let release = server.ok(&[
            "release",
            "create",
            "demo",
            &format!("{}/demo:{tag}", registry.host()),
        ]);
        if let Some(state) = halt {
            agent.kill();
            agent.start_with(Some(state));
        }
        server.ok(&["rollout", "start", &release]);
        if let Some(state) = halt {
            let mark = format!("halted after writing {state}");
            wait_for(
                &format!("the agent to halt at {state}"),
                Duration::from_secs(120),
                || agent.log().matches(&mark).count() > 0,
            );
            agent.kill();
            // Cleared so that the next round's wait sees only its own halt.
            std::fs::write(agent.dir.join("agent.log"), "").expect("truncate log");
            agent.start();
        }
        wait_for(
            &format!("{release} to end {outcome} after a halt at {halt:?}"),
            Duration::from_secs(120),
            || {
                let a = server.app("x86");
                a["update"]["release"] == release.as_str() && a["update"]["event"] == outcome
            },
        );
        if outcome == "committed" {
            running = release.clone();
        }
        wait_for(
            "the app to run the expected release",
            Duration::from_secs(60),
            || {
                let a = server.app("x86");
                a["status"]["release"] == running.as_str() && a["status"]["state"] == "running"
            },
        );
        let containers = agent.containers();
        assert_eq!(containers.len(), 1, "one container per app: {containers:?}");
        assert_eq!(containers[0]["state"], "running", "{:?}", containers);
    }
}

/// HTTPS from a certificate and key path; plain HTTP only on loopback unless asked for.
#[test]
fn the_server_speaks_tls_from_pem_files_and_refuses_plain_http_off_loopback() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ca = common::registry::TestCa::generate(dir);
    let port = free_port();
    let serve = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flotilla-server"));
        c.arg("serve")
            .arg("--db")
            .arg(dir.join("server.db"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let refused = serve(&["--listen", "0.0.0.0:0"])
        .output()
        .expect("run flotilla-server");
    assert_eq!(refused.status.code(), Some(1), "{}", output_text(&refused));
    assert!(
        output_text(&refused).contains("--tls-cert"),
        "{}",
        output_text(&refused)
    );

    let listen = format!("127.0.0.1:{port}");
    let mut child = serve(&["--listen", &listen, "--tls-cert"])
        .arg(&ca.cert_pem)
        .arg("--tls-key")
        .arg(&ca.key_pem)
        .spawn()
        .expect("start flotilla-server");
    wait_for("the TLS server to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let cli = |url: &str, ca_bundle: Option<&Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flotilla-server"));
        c.args(["--server", url, "--token-file"])
            .arg(dir.join("admin-token"));
        if let Some(ca) = ca_bundle {
            c.arg("--ca-bundle").arg(ca);
        }
        c.args(["token", "create"])
            .output()
            .expect("run flotilla-server")
    };
    let https = format!("https://127.0.0.1:{port}");
    let ok = cli(&https, Some(&ca.ca_pem));
    assert!(ok.status.success(), "{}", output_text(&ok));
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim().len(),
        43,
        "a 256-bit token"
    );
    let untrusted = cli(&https, None);
    assert_eq!(
        untrusted.status.code(),
        Some(1),
        "{}",
        output_text(&untrusted)
    );
    let plain = cli(&format!("http://127.0.0.1:{port}"), None);
    assert_eq!(
        plain.status.code(),
        Some(1),
        "plain HTTP to a TLS port: {}",
        output_text(&plain)
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The server's answer to an enrollment is lost on the way: the agent tries again with the same enrollment id and
/// gets its credential, although the token had one use. One device, enrolled once.
#[test]
fn an_enrollment_whose_reply_was_lost_is_retried_into_the_same_device() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    // No app is deployed: the registry is never asked.
    let server = Server::start(root, "127.0.0.1:9");
    let enrollments = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let proxy = Proxy::losing_first_enrollment(server.port, enrollments.clone());
    let token_file = server.token_file(&["--uses", "1", "--expires", "1h"]);
    let mut agent = Agent::new(root, "x86", None, &server, &token_file);
    let config = agent.dir.join("config.toml");
    let text = std::fs::read_to_string(&config).expect("agent config");
    std::fs::write(&config, text.replace(&server.url(), &proxy.url())).expect("agent config");
    agent.start();
    wait_for(
        "the device to enroll and use its credential",
        Duration::from_secs(60),
        || {
            let d = server.device("x86");
            d["last_seen"].as_u64() > d["enrolled"].as_u64()
        },
    );
    assert!(
        enrollments.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the agent never sent its enrollment again:\n{}",
        agent.log()
    );
    let devices = server.json(&["devices"]);
    assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");
    assert_eq!(
        agent.log().matches("enrolled").count(),
        1,
        "{}",
        agent.log()
    );
    // Once enrolled the token is of no more use here, and a copy left behind could enroll another device.
    assert!(
        !agent.dir.join("enroll-token").exists(),
        "the token file outlived the enrollment:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("deleted the enrollment token file"),
        "{}",
        agent.log()
    );
    // The token's one use is taken, by this device.
    let tokens = server.json(&["token", "list"]);
    assert_eq!(tokens[0]["uses_left"], 0, "{tokens}");
    assert_eq!(tokens[0]["enrolled"], 1, "{tokens}");
}

/// Rollouts finish however the fleet changes under them, with four agents of this host:
/// - a failed wave goes back to each device's own last committed release: the canary to demo-2, the others to
///   demo-1, which is all they ever ran;
/// - a device revoked mid-wave drops out, one that enrolls mid-rollout joins the last wave, and a silent one
///   times out;
/// - a desired state that changes while a device is busy with an update is taken when the update ends.
#[test]
fn rollouts_finish_when_the_fleet_changes_and_roll_each_device_back_to_its_own_release() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if common::fleet::agent_prerequisites().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    let server = Server::start(root, &registry.host());
    let token_file = server.token_file(&["--uses", "unlimited", "--tag", "site=lab"]);
    server.create_app("demo");
    for (tag, crash) in [("v1", false), ("v2", false), ("v3", true), ("v4", false)] {
        push(root, &registry, tag, crash);
        server.ok(&[
            "release",
            "create",
            "demo",
            &format!("{}/demo:{tag}", registry.host()),
        ]);
    }
    let mut agents: Vec<Agent> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| Agent::new(root, n, None, &server, &token_file))
        .collect();
    for a in &mut agents {
        a.start();
    }
    wait_for("four enrolled devices", Duration::from_secs(60), || {
        server.json(&["devices"]).as_array().map(Vec::len) == Some(4)
    });
    let start = |args: &[&str]| -> String {
        let mut all = vec!["rollout", "start"];
        all.extend_from_slice(args);
        server.ok(&all)
    };
    let state = |id: &str| rollout_status(&server, id)["status"]["state"].clone();
    let runs = |name: &str, release: &str| {
        let a = server.app(name);
        a["status"]["release"] == release && a["status"]["state"] == "running"
    };

    let id1 = start(&["demo-1", "--waves", "100"]);
    wait_for("demo-1 everywhere", Duration::from_secs(180), || {
        state(&id1) == "done"
    });
    // demo-2 on one canary: the second wave would start after an hour's soak.
    let id2 = start(&["demo-2", "--counts", "--waves", "1,4", "--soak", "1h"]);
    wait_for(
        "the canary healthy on demo-2",
        Duration::from_secs(120),
        || rollout_status(&server, &id2)["waves"][0]["healthy"] == 1,
    );
    let canary = rollout_status(&server, &id2)["waves"][0]["devices"][0]
        .as_str()
        .expect("the canary's name")
        .to_string();
    let own = |name: &str| if name == canary { "demo-2" } else { "demo-1" };

    // demo-3 crashes, everywhere at once: the wave goes back, each device to what it ran.
    let id3 = start(&["demo-3", "--waves", "100", "--max-failures", "1"]);
    assert_eq!(state(&id2), "superseded");
    wait_for("rollout 3 to pause", Duration::from_secs(180), || {
        state(&id3) == "paused"
    });
    for name in ["a", "b", "c", "d"] {
        wait_for(
            &format!("{name} back on its own release, {}", own(name)),
            Duration::from_secs(120),
            || runs(name, own(name)) && server.app(name)["desired"] == own(name),
        );
    }

    // demo-4: d goes silent, b is revoked as its wave is ordered, and e enrolls mid-rollout.
    let d = agents.pop().expect("agent d");
    drop(d);
    let id4 = start(&[
        "demo-4",
        "--counts",
        "--waves",
        "2,4",
        "--max-failures",
        "1",
        "--device-timeout",
        "15s",
        "--skip-timed-out",
    ]);
    server.ok(&["revoke", "b"]);
    let mut e = Agent::new(root, "e", None, &server, &token_file);
    e.start();
    wait_for("rollout 4 to finish", Duration::from_secs(240), || {
        let s = rollout_status(&server, &id4);
        assert_ne!(s["status"]["state"], "paused", "{s}");
        s["status"]["state"] == "done"
    });
    let s4 = rollout_status(&server, &id4);
    assert_eq!(s4["late"], serde_json::json!(["e"]), "{s4}");
    assert_eq!(s4["devices"]["d"], "timed out", "{s4}");
    assert_eq!(s4["waves"][0]["devices"], serde_json::json!(["a"]), "{s4}");
    assert_eq!(s4["waves"][1]["timed_out"], 1, "{s4}");
    for name in ["a", "c", "e"] {
        wait_for(
            &format!("{name} on demo-4"),
            Duration::from_secs(60),
            || runs(name, "demo-4"),
        );
    }

    // A lost wake-up: a's desired state moves on while a is in a long probation.
    let a = &mut agents[0];
    a.kill();
    let config = a.dir.join("config.toml");
    let text = std::fs::read_to_string(&config).expect("agent config");
    std::fs::write(
        &config,
        text.replace("probation = \"2s\"", "probation = \"15s\""),
    )
    .expect("agent config");
    a.start();
    for tag in ["v5", "v6"] {
        push(root, &registry, tag, false);
        server.ok(&[
            "release",
            "create",
            "demo",
            &format!("{}/demo:{tag}", registry.host()),
        ]);
    }
    start(&["demo-5", "--select", "site=lab", "--waves", "100"]);
    wait_for("a in probation on demo-5", Duration::from_secs(120), || {
        let u = server.app("a")["update"].clone();
        u["release"] == "demo-5" && u["event"] == "probation"
    });
    // d, silent since rollout 4, is still a device of the fleet: it times out here too.
    let id6 = start(&[
        "demo-6",
        "--waves",
        "100",
        "--device-timeout",
        "10s",
        "--skip-timed-out",
    ]);
    wait_for(
        "a to take demo-6 after its probation of demo-5",
        Duration::from_secs(90),
        || runs("a", "demo-6"),
    );
    wait_for("rollout 6 to finish", Duration::from_secs(120), || {
        state(&id6) == "done"
    });
    drop(e);
    drop(agents);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// An event the server refuses on its own (a time beyond any, which SQLite cannot store) sits in the middle of the
/// agent's outbox: the batch is split down to it, it is kept aside and counted in the next heartbeat, and the
/// events after it reach the server.
#[test]
fn a_poison_event_in_the_outbox_is_set_aside_and_the_rest_flows() {
    if require(
        "root (the agent needs it)",
        rustix::process::geteuid().is_root().then_some(()),
    )
    .is_none()
    {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let server = Server::start(root, "127.0.0.1:9");
    let token_file = server.token_file(&["--tag", "site=lab"]);
    let mut agent = Agent::new(root, "x86", None, &server, &token_file);
    agent.start();
    wait_for("the enrollment", Duration::from_secs(60), || {
        server.device("x86")["id"].is_string()
    });
    agent.kill();
    let status = |id: &str, at: u64| {
        serde_json::json!({
            "id": id,
            "at": at,
            "body": {"kind": "app", "data": {
                "app": "sensor", "release": null, "manifest": null, "platform": null, "state": "absent",
                "restarts": 0, "health": null, "wrong_variant": null
            }}
        })
        .to_string()
    };
    {
        let db = rusqlite::Connection::open(agent.dir.join("state/agent.db")).expect("agent.db");
        for (id, at) in [
            ("before-poison", 1_700_000_000),
            ("poison", u64::MAX),
            ("after-poison", 1_700_000_001),
        ] {
            db.execute(
                "INSERT INTO outbox (id, heartbeat, event) VALUES (?1, 0, ?2)",
                rusqlite::params![id, status(id, at)],
            )
            .expect("queue an event");
        }
    }
    agent.start();
    let on_server = |id: &str| -> bool {
        server.count(&format!("SELECT COUNT(*) FROM events WHERE id = '{id}'")) == 1
    };
    wait_for(
        "the events around the poison on the server",
        Duration::from_secs(60),
        || on_server("before-poison") && on_server("after-poison"),
    );
    assert!(!on_server("poison"));
    assert!(agent.outbox_ids().is_empty(), "{:?}", agent.outbox_ids());
    let db = rusqlite::Connection::open(agent.dir.join("state/agent.db")).expect("agent.db");
    let reason: String = db
        .query_row(
            "SELECT reason FROM dead_letter WHERE id = 'poison'",
            [],
            |r| r.get(0),
        )
        .expect("the poison kept aside");
    assert!(reason.contains("beyond any time"), "{reason}");
    wait_for(
        "the heartbeat to count the dead letter",
        Duration::from_secs(30),
        || server.device("x86")["metrics"]["dead_letters"] == 1,
    );
}

/// The server is killed with SIGKILL right after it acknowledged a batch of reports, before anything else: started
/// again, it holds every event of that batch, once, and the agent does not send them again.
#[test]
fn the_server_killed_right_after_an_acknowledgement_keeps_what_it_acknowledged() {
    if require(
        "root (the agent needs it)",
        rustix::process::geteuid().is_root().then_some(()),
    )
    .is_none()
    {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let mut server = Server::start(root, "127.0.0.1:9");
    let token_file = server.token_file(&["--tag", "site=lab"]);
    let pid = server.pid().expect("the server's pid");
    let acknowledged: std::sync::Arc<Mutex<Option<Vec<String>>>> = Default::default();
    let seen = acknowledged.clone();
    let proxy = Proxy::start(server.port, move |req, answer| {
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.is_some()
            || !req.head.starts_with("POST /v1/device/reports ")
            || !answer.head.starts_with("HTTP/1.1 200")
        {
            return Verdict::Forward;
        }
        let batch: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        // Heartbeats refresh the device's metrics and are not kept as events: wait for a batch with others.
        let ids: Vec<String> = batch["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["body"]["kind"] != "heartbeat")
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect();
        if ids.is_empty() {
            return Verdict::Forward;
        }
        *seen = Some(ids);
        Verdict::ForwardThen(Box::new(move || {
            let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }))
    });
    let mut agent = Agent::new(root, "x86", None, &server, &token_file);
    let config = agent.dir.join("config.toml");
    let text = std::fs::read_to_string(&config).expect("agent config");
    std::fs::write(&config, text.replace(&server.url(), &proxy.url())).expect("agent config");
    agent.start();
    wait_for("a batch acknowledged", Duration::from_secs(60), || {
        acknowledged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    });
    let ids = acknowledged
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default();
    server.stop();
    server.resume();
    for id in &ids {
        let n = server.count(&format!("SELECT COUNT(*) FROM events WHERE id = '{id}'"));
        assert_eq!(n, 1, "the acknowledged event {id} after the SIGKILL");
    }
    wait_for(
        "the agent's outbox to let the acknowledged events go",
        Duration::from_secs(30),
        || agent.outbox_ids().iter().all(|o| !ids.contains(o)),
    );
    drop(proxy);
}

/// Plain http to a fleet server that is not on loopback is refused at the start, with the fix named; the owner's
/// `insecure = true` allows it.
#[test]
fn the_agent_refuses_plain_http_to_a_server_off_loopback() {
    if require(
        "root (the agent needs it)",
        rustix::process::geteuid().is_root().then_some(()),
    )
    .is_none()
    {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config.toml");
    // 192.0.2.0/24 is TEST-NET-1: nothing answers there, and the agent must not even try.
    std::fs::write(&config, "[fleet]\nserver = \"http://192.0.2.1:8470\"\n").expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("agent")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start flotilla agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("agent status") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the agent kept running with a plain http fleet server off loopback");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("not loopback") && stderr.contains("insecure = true"),
        "{stderr}"
    );
}
