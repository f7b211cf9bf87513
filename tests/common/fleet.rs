//! The fleet's host side, shared by the fleet tests and the ARM machine tests: flotilla-server on loopback with its
//! operator CLI, and the lab's multi-arch busybox images pushed to a loopback registry.

use std::io::Read;
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
}

impl Server {
    pub fn start(dir: &Path, registry: &str) -> Server {
        let mut s = Server {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            registry: registry.to_string(),
        };
        s.resume();
        s
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
            .arg(self.dir.join("server.db"))
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
        Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
            .args(["--server", &self.url(), "--token-file"])
            .arg(self.dir.join("admin-token"))
            .args(args)
            .output()
            .expect("run flotilla-server")
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
        self.json(&["devices"])
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["name"] == name).cloned())
            .unwrap_or(Value::Null)
    }

    /// The status `name` last reported for the app.
    pub fn app(&self, name: &str) -> Value {
        self.device(name)["apps"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["app"] == "demo").cloned())
            .unwrap_or(Value::Null)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
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
    let layout = OciLayoutBuilder::new(&root.join(format!("layout-{tag}")));
    let written = layout.write_with_files(tag, &images, &extra);
    skopeo_copy(layout.dir(), tag, &registry.host(), "demo", tag, None, None);
    Pushed {
        index: written.index.to_string(),
        manifests: written
            .images
            .iter()
            .map(|i| (i.platform.clone(), i.manifest.to_string()))
            .collect(),
    }
}

/// A TCP proxy in front of the server that forwards every connection, except that it swallows the answer to the
/// first `POST /v1/enroll`: the server enrolls the device, and the device never hears of it.
pub struct LosingProxy {
    pub port: u16,
    /// Connections whose first request was an enrollment.
    pub enrollments: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl LosingProxy {
    pub fn start(upstream: u16) -> LosingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let enrollments = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (enrollments.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let seen = seen.clone();
                        std::thread::spawn(move || proxy_connection(client, upstream, &seen));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        LosingProxy {
            port,
            enrollments,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for LosingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn proxy_connection(client: TcpStream, upstream: u16, enrollments: &AtomicUsize) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let mut head = [0u8; 15];
    // The request line may come in pieces; a bounded wait for its first bytes.
    let mut tries = 0;
    let enroll = loop {
        match client.peek(&mut head) {
            Ok(n) if n == head.len() => break &head == b"POST /v1/enroll",
            Ok(0) | Err(_) => return,
            Ok(_) if tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(_) => break false,
        }
    };
    let lose = enroll && enrollments.fetch_add(1, Ordering::SeqCst) == 0;
    let (Ok(mut from_client), Ok(mut to_server)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_server);
        let _ = to_server.shutdown(Shutdown::Write);
    });
    let (mut from_server, mut to_client) = (server, client);
    if lose {
        // The server has committed the enrollment once its answer starts: read that much, and hang up.
        let mut byte = [0u8; 1];
        let _ = from_server.read(&mut byte);
        let _ = to_client.shutdown(Shutdown::Both);
        let _ = from_server.shutdown(Shutdown::Both);
        return;
    }
    let _ = std::io::copy(&mut from_server, &mut to_client);
    let _ = to_client.shutdown(Shutdown::Both);
}
