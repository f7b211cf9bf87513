//! `.local` names through multicast DNS, end to end on loopback, as root: a real responder (python-zeroconf from
//! the virtualenv `tests/setup` makes in `target/test-venv`) answers `registry-test.local` with 127.0.0.1, and
//! flotilla pulls from a docker-registry by that name, and the fleet link reaches a server by it. A name nobody
//! answers fails with the mDNS error within the bound.
//!
//! Multicast must stay on this machine: each test routes 224.0.0.0/4, and ff02::fb for IPv6, to `lo` (turning its
//! multicast flag on), and puts back what it changed when it ends. Loopback does not deliver IPv6 multicast, so
//! the IPv6 query is routed to `lo` only to keep it off the real interfaces; the answers come over IPv4.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::registry::{HttpServer, Lab, Response, busybox_images};
use common::{Flotilla, output_text, require, required_tool};
use flotilla::agent::link::{Fetched, Link};
use flotilla::registry::dns::{LookupError, SystemResolver};
use flotilla::registry::mdns::{self, MdnsError, MdnsOptions};

const NAME: &str = "registry-test.local";

/// The routes, the flag on `lo` and UDP port 5353 are machine-wide: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The IPv6 route the test adds for mDNS and removes again: ff02::fb on `lo` only.
const V6_ROUTE: [&str; 6] = ["multicast", "ff02::fb/128", "dev", "lo", "table", "local"];

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?}: {}", output_text(&out));
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Multicast routed to `lo` for as long as it lives; undoes only what it did.
struct MulticastOnLo {
    set_flag: bool,
    added_v4: bool,
    added_v6: bool,
}

impl MulticastOnLo {
    fn setup() -> MulticastOnLo {
        let mut guard = MulticastOnLo {
            set_flag: false,
            added_v4: false,
            added_v6: false,
        };
        if !stdout(&ip(&["link", "show", "lo"])).contains("MULTICAST") {
            ip_ok(&["link", "set", "lo", "multicast", "on"]);
            guard.set_flag = true;
        }
        let v4 = stdout(&ip(&["-4", "route", "show", "exact", "224.0.0.0/4"]));
        if v4.is_empty() {
            ip_ok(&[
                "route",
                "add",
                "224.0.0.0/4",
                "dev",
                "lo",
                "src",
                "127.0.0.1",
            ]);
            guard.added_v4 = true;
        } else {
            assert!(
                v4.contains("dev lo"),
                "224.0.0.0/4 is already routed elsewhere ({v4}); refusing to send test multicast there"
            );
        }
        let v4_route = stdout(&ip(&["route", "get", "224.0.0.251"]));
        assert!(v4_route.contains("dev lo"), "224.0.0.251 goes {v4_route}");
        // No IPv6 at all (no /proc/net/if_inet6 lines) means the IPv6 query cannot go out anywhere.
        let has_v6 =
            std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty());
        if has_v6 {
            let v6 = stdout(&ip(&[
                "-6",
                "route",
                "show",
                "table",
                "local",
                "exact",
                "ff02::fb/128",
            ]));
            if v6.is_empty() {
                ip_ok(&[&["-6", "route", "add"][..], &V6_ROUTE, &["metric", "0"]].concat());
                guard.added_v6 = true;
            }
            let v6_route = stdout(&ip(&["-6", "route", "get", "ff02::fb"]));
            assert!(v6_route.contains("dev lo"), "ff02::fb goes {v6_route}");
        }
        guard
    }
}

impl Drop for MulticastOnLo {
    fn drop(&mut self) {
        if self.added_v6 {
            let _ = ip(&[&["-6", "route", "del"][..], &V6_ROUTE].concat());
        }
        if self.added_v4 {
            let _ = ip(&["route", "del", "224.0.0.0/4", "dev", "lo"]);
        }
        if self.set_flag {
            let _ = ip(&["link", "set", "lo", "multicast", "off"]);
        }
    }
}

fn venv_python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
}

/// Root, `ip`, and python-zeroconf in the test virtualenv; `None` skips (or fails under FLOTILLA_REQUIRE_ALL=1).
fn prerequisites() -> Option<()> {
    require(
        "root (the test routes multicast to lo)",
        rustix::process::geteuid().is_root().then_some(()),
    )?;
    required_tool("ip")?;
    let python = venv_python();
    let zeroconf = python.is_file()
        && Command::new(&python)
            .args(["-c", "import zeroconf"])
            .output()
            .is_ok_and(|o| o.status.success());
    require(
        "python-zeroconf in target/test-venv (run tests/setup)",
        zeroconf.then_some(()),
    )
}

/// python-zeroconf answering [`NAME`] → 127.0.0.1 on `lo`; stopped when dropped.
struct Responder {
    child: Child,
}

impl Responder {
    fn start() -> Responder {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mdns/responder.py");
        let mut child = Command::new(venv_python())
            .arg(script)
            .args([NAME, "127.0.0.1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the mDNS responder");
        let out = child.stdout.take().expect("responder stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        // zeroconf probes the name for about a second and a half before it answers for it.
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        // Made before the check, so a failed start is still killed when the assertion unwinds.
        let responder = Responder { child };
        assert_eq!(line.trim(), "ready", "the mDNS responder did not start");
        responder
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn pull_from_a_registry_named_by_mdns() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(()) = prerequisites() else { return };
    let Some(lab) = Lab::start() else { return };
    let images = busybox_images().expect("busybox images");
    let written = lab.push("multi", &images);
    let _routes = MulticastOnLo::setup();
    let _responder = Responder::start();

    let host = format!("{NAME}:{}", lab.registry.port);
    let report = Flotilla::new()
        .empty_config(lab.root.join("config.toml"))
        .state(lab.root.join("state"))
        .registry(&host)
        .args(["--platform", "linux/arm/v7"])
        .args(["pull", "--json", &format!("{host}/multi:v1")])
        .json();
    assert_eq!(report["platform"], "linux/arm/v7", "{report}");
    assert_eq!(report["index_digest"], written.index.to_string());
}

#[test]
fn the_fleet_link_reaches_a_server_named_by_mdns() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(()) = prerequisites() else { return };
    let _routes = MulticastOnLo::setup();
    let _responder = Responder::start();
    runtime().block_on(async {
        let server = HttpServer::start(|_| async {
            Response::new(200)
                .header("Content-Type", "application/json")
                .header("ETag", "\"e1\"")
                .body(r#"{"apps":[]}"#)
        })
        .await;
        let url = format!("http://{NAME}:{}", server.addr.port());
        let link = Link::new(&url, None, Duration::from_secs(1), true).expect("link");
        let fetched = link
            .desired("device-credential", None, Duration::from_secs(0))
            .await
            .unwrap_or_else(|e| panic!("the link could not reach {url}: {e}"));
        match fetched {
            Fetched::Changed { desired, etag } => {
                assert!(desired.apps.is_empty());
                assert_eq!(etag.as_deref(), Some("\"e1\""));
            }
            Fetched::Unchanged => panic!("expected a desired state"),
        }
        let requests = server.requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(
            requests[0].header("host"),
            Some(format!("{NAME}:{}", server.addr.port()).as_str())
        );
        assert_eq!(
            requests[0].header("authorization"),
            Some("Bearer device-credential")
        );
    });
}

#[test]
fn a_local_name_nobody_answers_fails_clearly_within_the_bound() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(()) = prerequisites() else { return };
    let _routes = MulticastOnLo::setup();
    // A responder for another name is on the link: its silence for this one is what is tested.
    let _responder = Responder::start();
    let nobody = "nobody-answers-this.local";
    runtime().block_on(async {
        let options = MdnsOptions::default();
        let started = Instant::now();
        let err = mdns::resolve(nobody, &options)
            .await
            .expect_err("nobody answers");
        let took = started.elapsed();
        assert!(matches!(err, MdnsError::NoAnswer { .. }), "{err}");
        assert!(
            took >= options.wait - Duration::from_millis(50)
                && took < options.wait + Duration::from_millis(500),
            "took {took:?} for a bound of {:?}",
            options.wait
        );

        // The resolver falls back to the name servers, and says both failed, mDNS first.
        let started = Instant::now();
        let err = SystemResolver::default()
            .lookup(nobody)
            .await
            .expect_err("nobody knows it");
        let took = started.elapsed();
        assert!(matches!(err, LookupError::Local { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("no mDNS answer for {nobody} within 1.5 s"))
                && text.contains("avahi-daemon"),
            "{text}"
        );
        // 1.5 s of mDNS, then the name servers' own bound (a local NXDOMAIN is quick; hickory's timeout is 5 s).
        assert!(took < Duration::from_secs(15), "took {took:?}");

        // The name the responder does answer resolves through the same resolver, to loopback only.
        let ips = SystemResolver::default()
            .lookup(NAME)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ips, vec![std::net::IpAddr::from([127, 0, 0, 1])]);
    });

    // And the CLI says it to the user, once, without retries in the way.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[pull]\nretries = 1\n").expect("config");
    let host = format!("{nobody}:5000");
    let started = Instant::now();
    let out = Flotilla::new()
        .config(&config)
        .state(dir.path().join("state"))
        .registry(&host)
        .arg("pull")
        .arg(format!("{host}/app:v1"))
        .output();
    let took = started.elapsed();
    assert!(!out.status.success(), "{}", output_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no mDNS answer for {nobody} within 1.5 s")),
        "{}",
        output_text(&out)
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}
