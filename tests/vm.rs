//! The Debian package on emulated ARM Debian machines with systemd as PID 1: the proof that the package, the
//! unit, systemd, runc and the kernel features flotilla needs work together on an ARM system, not only that the
//! code runs on ARM CPUs (tests/emulated.rs does that under qemu-user).
//!
//! For arm64 (`-M virt -cpu cortex-a72`) and armhf (`-cpu cortex-a15`): `tests/vm/build-image` builds, or reuses,
//! a Debian 12 guest; qemu-system boots it with its disk in snapshot mode, the .deb shared read-only over 9p,
//! and a network that reaches nothing but two host loopback ports (`restrict=on` and `guestfwd`): the fleet
//! server and the registry. The test types commands on the serial console, where root is logged in, and drives
//! the fleet from the host: install → READY → enrollment → a rollout reaches the guest, which pulls its own
//! variant → `systemctl restart` leaves the app alone → an offline reboot brings the committed app back →
//! remove and purge.
//!
//! The guest reaches the registry as a mirror: releases name the registry as the host sees it
//! (`127.0.0.1:PORT/demo`, which the server resolves and pins), and the agent's configuration gives
//! `10.0.2.101:5000`, the guest's way to the same registry, as that registry's mirror.
//!
//! Every step's console output goes to `target/tmp/vm/<arch>/console.log`; when a step fails, the guest's journal
//! is saved beside it. The timings of each step are in `timings.txt` there.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fleet::{Server, push};
use common::registry::{Registry, RegistryOptions};
use common::{output_text, require, wait_for};
use serde_json::Value;

/// The guest's addresses for the host's loopback services (slirp's guestfwd; nothing else is reachable).
const GUEST_SERVER: &str = "10.0.2.100:8470";
const GUEST_REGISTRY: &str = "10.0.2.101:5000";

/// The app the rollout brings: busybox prints the image's version and idles; healthy while /VERSION is there.
const APP_CMD: &str = "busybox cat /VERSION; while :; do busybox sleep 1; done";

/// `FLOTILLA_VM_PARALLEL=0` runs the guests one after the other. Both at once (each `-smp 2` on this 2-core
/// machine) took 172 s against 261 s one after the other, with the same images and packages: the guests spend
/// much of their time waiting (on the fleet's polls, the app's grace period, the reboot), which the other fills.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Arch {
    /// Debian's architecture name: the package's and `tests/vm/build-image`'s.
    deb: &'static str,
    qemu: &'static str,
    cpu: &'static str,
    /// What `flotilla platform` must find first.
    platform: &'static str,
}

const ARM64: Arch = Arch {
    deb: "arm64",
    qemu: "qemu-system-aarch64",
    cpu: "cortex-a72",
    platform: "linux/arm64/v8",
};

const ARMHF: Arch = Arch {
    deb: "armhf",
    qemu: "qemu-system-arm",
    cpu: "cortex-a15",
    platform: "linux/arm/v7",
};

#[test]
fn arm64_debian_machine_installs_the_package_joins_the_fleet_and_survives_reboots() {
    machine_scenario(&ARM64);
}

#[test]
fn armhf_debian_machine_installs_the_package_joins_the_fleet_and_survives_reboots() {
    machine_scenario(&ARMHF);
}

/// The guest's kernel, initrd and disk, as `tests/vm/build-image` leaves them.
struct Image {
    dir: PathBuf,
}

fn prerequisites(arch: &Arch) -> Option<(Image, PathBuf)> {
    // A first run builds the guest images (about 10 minutes), so a plain `cargo test` asks for them: FLOTILLA_VM=1,
    // or FLOTILLA_REQUIRE_ALL=1 as `.ci/run` sets. FLOTILLA_VM=0 skips them even then.
    let wanted = match std::env::var("FLOTILLA_VM").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => std::env::var("FLOTILLA_REQUIRE_ALL").as_deref() == Ok("1"),
    };
    if !wanted {
        eprintln!(
            "skipping: the emulated ARM machines run with FLOTILLA_VM=1 or FLOTILLA_REQUIRE_ALL=1 (tests/vm/README.md)"
        );
        return None;
    }
    require(
        "root (the guest images are built with debootstrap)",
        rustix::process::geteuid().is_root().then_some(()),
    )?;
    common::required_tool(arch.qemu)?;
    // The host end of each guestfwd connection.
    common::required_tool("busybox")?;
    common::registry::registry_prerequisites()?;
    let dist = require(
        "FLOTILLA_ARM_DIST (the dist/ directory with packaging/deb's packages)",
        std::env::var_os("FLOTILLA_ARM_DIST").map(PathBuf::from),
    )?;
    let deb = std::fs::read_dir(&dist).ok().and_then(|entries| {
        entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("flotilla_") && n.ends_with(&format!("_{}.deb", arch.deb))
            })
        })
    });
    let deb = require(
        &format!(
            "flotilla_*_{}.deb in {} (packaging/deb {})",
            arch.deb,
            dist.display(),
            arch.deb
        ),
        deb,
    )?;
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/build-image");
    let out = Command::new(&build)
        .arg(arch.deb)
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/vm/build-image");
    assert!(
        out.status.success(),
        "tests/vm/build-image {}: {}",
        arch.deb,
        output_text(&out)
    );
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from)
        .expect("build-image prints the image directory");
    Some((Image { dir }, deb))
}

/// Step timings, printed at the end and kept in `timings.txt`.
struct Timings {
    arch: &'static str,
    rows: Vec<(String, Duration)>,
    file: PathBuf,
}

impl Timings {
    fn record(&mut self, step: &str, took: Duration) {
        eprintln!("[vm {}] {step}: {:.1} s", self.arch, took.as_secs_f64());
        self.rows.push((step.to_string(), took));
        let text: String = self
            .rows
            .iter()
            .map(|(s, d)| format!("{}\t{s}\t{:.1}\n", self.arch, d.as_secs_f64()))
            .collect();
        let _ = std::fs::write(&self.file, text);
    }
}

fn machine_scenario(arch: &'static Arch) {
    let _one = (std::env::var("FLOTILLA_VM_PARALLEL").as_deref() == Ok("0"))
        .then(|| ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()));
    let build_started = Instant::now();
    let Some((image, deb)) = prerequisites(arch) else {
        return;
    };
    let artefacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("vm")
        .join(arch.deb);
    let _ = std::fs::remove_dir_all(&artefacts);
    std::fs::create_dir_all(&artefacts).expect("artefacts dir");
    let mut timings = Timings {
        arch: arch.deb,
        rows: Vec::new(),
        file: artefacts.join("timings.txt"),
    };
    timings.record("guest image (build, or reuse)", build_started.elapsed());

    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let registry = Registry::start(&root.join("registry"), RegistryOptions::default());
    let v1 = push(root, &registry, "v1", false);
    let mut server = Server::start(root, &registry.host());
    let device = format!("vm-{}", arch.deb);
    server.ok(&[
        "app",
        "create",
        "demo",
        "--restart",
        "always",
        "--health-cmd",
        "busybox test -e /VERSION",
        "--health-interval",
        "2s",
        "--",
        "-c",
        APP_CMD,
    ]);
    server.ok(&[
        "release",
        "create",
        "demo",
        &format!("{}/demo:v1", registry.host()),
    ]);

    // What the guest sees under /mnt/host: the package, the agent's configuration and its enrollment token.
    let share = root.join("share");
    std::fs::create_dir_all(&share).expect("share dir");
    let deb_name = deb.file_name().expect("deb name").to_owned();
    std::fs::copy(&deb, share.join(&deb_name)).expect("copy the package");
    let tag = format!("vm={}", arch.deb);
    let token = server.ok(&[
        "token",
        "create",
        "--uses",
        "1",
        "--expires",
        "1h",
        "--tag",
        &tag,
    ]);
    std::fs::write(share.join("enroll-token"), &token).expect("token");
    std::fs::write(
        share.join("config.toml"),
        format!(
            "[fleet]\nserver = \"http://{GUEST_SERVER}\"\ninsecure = true\nname = \"{device}\"\n\
             poll_interval = \"5s\"\nprobation = \"10s\"\nheartbeat_interval = \"5s\"\n\
             [[registry]]\nhost = \"{registry}\"\ninsecure = true\nmirrors = [\"{GUEST_REGISTRY}\"]\n\
             [[registry]]\nhost = \"{GUEST_REGISTRY}\"\ninsecure = true\n",
            registry = registry.host(),
        ),
    )
    .expect("agent config");

    let forwards = [
        (GUEST_SERVER, server.port),
        (GUEST_REGISTRY, registry.addr().port()),
    ];
    let mut vm = Machine::boot(arch, &image, &share, &forwards, &artefacts);
    let booted = Instant::now();
    vm.wait_for_shell(Duration::from_secs(300));
    timings.record("boot to a shell", booted.elapsed());

    vm.ok("mkdir -p /mnt/host && mount -t 9p -o trans=virtio,version=9p2000.L,ro host0 /mnt/host");
    let installed = Instant::now();
    vm.ok_within(
        &format!("dpkg -i /mnt/host/{}", deb_name.to_string_lossy()),
        Duration::from_secs(300),
    );
    // Type=notify: is-active says active only once the agent sent READY=1 (it starts with no server configured).
    vm.ok("systemctl is-enabled flotilla && systemctl is-active flotilla");
    timings.record("dpkg -i to READY", installed.elapsed());

    let platform = vm.ok("flotilla platform --json");
    let platform: Value = json_in(&platform).expect("flotilla platform --json");
    assert_eq!(
        platform["candidates"][0], arch.platform,
        "the guest's platform: {platform}"
    );

    let enrolled = Instant::now();
    vm.ok(
        "install -m 0644 /mnt/host/config.toml /etc/flotilla/config.toml && \
         install -m 0600 /mnt/host/enroll-token /etc/flotilla/enroll-token && systemctl restart flotilla",
    );
    wait_for("the guest to enroll", Duration::from_secs(120), || {
        !server.device(&device).is_null()
    });
    timings.record("configured to enrolled", enrolled.elapsed());
    let d = server.device(&device);
    assert_eq!(d["platform"]["candidates"][0], arch.platform, "{d}");

    let rolled = Instant::now();
    let rollout = server.ok(&[
        "rollout",
        "start",
        "demo-1",
        "--select",
        &format!("vm={}", arch.deb),
    ]);
    wait_for("the app to run healthy", Duration::from_secs(600), || {
        let a = server.app(&device);
        a["status"]["release"] == "demo-1"
            && a["status"]["state"] == "running"
            && a["status"]["health"] == "healthy"
    });
    timings.record("rollout to app healthy", rolled.elapsed());
    wait_for("the rollout to finish", Duration::from_secs(120), || {
        server.json(&["rollout", "status", &rollout])["status"]["state"] == "done"
    });
    let want = &v1
        .manifests
        .iter()
        .find(|(p, _)| p == arch.platform)
        .expect("the platform was pushed")
        .1;
    let app = vm.container("demo");
    assert_eq!(app["platform"], arch.platform, "{app}");
    assert_eq!(app["manifest"].as_str(), Some(want.as_str()), "{app}");
    let pid = app["pid"].as_i64().expect("the app's pid");
    // runc put the container's processes in its own cgroup, and systemd's unit for the agent is untouched by it.
    // The cgroup is under the state directory's instance id.
    vm.ok(&format!(
        "grep -qx {pid} /sys/fs/cgroup/flotilla/$(cat /var/lib/flotilla/instance)/demo/cgroup.procs"
    ));

    // KillMode=process: restarting the agent leaves the app and its supervisor alone; the new agent adopts them.
    let restarted = Instant::now();
    vm.ok("systemctl restart flotilla && systemctl is-active flotilla");
    timings.record("systemctl restart to READY", restarted.elapsed());
    let after = vm.container("demo");
    assert_eq!(after["pid"].as_i64(), Some(pid), "{after}");
    assert_eq!(after["restarts"], 0, "{after}");

    // A reboot with the server gone: the committed app comes back from the agent's own state.
    server.stop();
    let rebooted = Instant::now();
    let (down, up) = vm.reboot(Duration::from_secs(300));
    timings.record("reboot: shutdown", down);
    timings.record("reboot: boot to a shell", up);
    // The containers live outside the agent's unit: the agent itself stops them when the machine goes down, while
    // the system is whole, rather than leaving them to systemd-shutdown's last SIGTERM (src/agent/shutdown.rs).
    // By identifier as well as by unit: the agent's last line can reach journald after the agent has exited, and
    // then journald cannot tell its unit from /proc.
    let last = vm.ok(
        "journalctl -b -1 --no-pager -o short-monotonic \
         _SYSTEMD_UNIT=flotilla.service + UNIT=flotilla.service + SYSLOG_IDENTIFIER=flotilla | tail -n 40",
    );
    let _ = std::fs::write(artefacts.join("shutdown.txt"), last.replace('\r', ""));
    assert!(
        last.contains("stopped for the system shutdown: demo"),
        "the agent did not stop the app at shutdown; the unit's journal of that boot:\n{last}"
    );
    vm.ok("mkdir -p /mnt/host && mount -t 9p -o trans=virtio,version=9p2000.L,ro host0 /mnt/host");
    vm.poll(
        "the committed app to run after the reboot",
        Duration::from_secs(300),
        |vm| {
            let ps = vm.sh("flotilla ps --json", Duration::from_secs(60));
            json_in(&ps.output)
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["name"] == "demo"
                            && c["state"] == "running"
                            && c["pid"].as_i64() != Some(pid)
                    })
                })
        },
    );
    timings.record("offline reboot to app running", rebooted.elapsed());
    vm.ok("systemctl is-active flotilla");

    // Removal stops the unit and the app; purge leaves nothing behind.
    let removed = Instant::now();
    vm.ok_within("apt-get remove -y flotilla", Duration::from_secs(300));
    timings.record("apt-get remove", removed.elapsed());
    vm.ok("! systemctl is-active flotilla");
    vm.ok("! pgrep -f 'flotilla supervise'");
    vm.ok("! ls -d /sys/fs/cgroup/flotilla/*/demo");
    let purged = Instant::now();
    vm.ok_within("apt-get purge -y flotilla", Duration::from_secs(300));
    timings.record("apt-get purge", purged.elapsed());
    vm.ok("! test -e /var/lib/flotilla && ! test -e /etc/flotilla");
    vm.ok("! grep -q /var/lib/flotilla /proc/self/mountinfo");
    vm.ok("! dpkg-query -W -f '${Status}' flotilla 2>/dev/null | grep -q installed");
    timings.record("remove and purge", removed.elapsed());
    vm.poweroff();
}

/// The first JSON value in console output (the tty adds carriage returns and may echo a prompt before it).
fn json_in(text: &str) -> Option<Value> {
    let text = text.replace('\r', "");
    // Terminal escapes (`ESC [ ? 2004 l`) hold brackets too: take the first bracket that starts a JSON value.
    text.match_indices(['[', '{']).find_map(|(i, _)| {
        serde_json::Deserializer::from_str(&text[i..])
            .into_iter::<Value>()
            .next()?
            .ok()
    })
}

struct Ran {
    code: i32,
    output: String,
}

/// One emulated machine on its serial console.
struct Machine {
    child: Child,
    stdin: ChildStdin,
    console: Arc<Mutex<Vec<u8>>>,
    /// Where the next command's output starts in `console`.
    seen: usize,
    seq: u32,
    artefacts: PathBuf,
    arch: &'static str,
}

impl Machine {
    fn boot(
        arch: &'static Arch,
        image: &Image,
        share: &Path,
        forwards: &[(&str, u16)],
        artefacts: &Path,
    ) -> Machine {
        // restrict=on: the guest reaches nothing but the guestfwd addresses. Each guest connection runs its own
        // `busybox nc` to the host's loopback port (a chardev target would be one connection for the whole run);
        // its complaints go to /dev/null, not into the guest's connection (libslirp gives the command the connection
        // as stdin, stdout and stderr, and splits its words itself: the shell is asked for by name).
        let mut netdev = String::from("user,id=n0,restrict=on");
        for (addr, port) in forwards {
            netdev.push_str(&format!(
                ",guestfwd=tcp:{addr}-cmd:sh -c 'exec busybox nc 127.0.0.1 {port} 2>/dev/null'"
            ));
        }
        let mut child = Command::new(arch.qemu)
            .args(["-M", "virt", "-cpu", arch.cpu, "-m", "1024", "-smp", "2"])
            .args(["-nographic", "-kernel"])
            .arg(image.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.dir.join("initrd.gz"))
            .args(["-append", "root=/dev/vda rw console=ttyAMA0 quiet"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,snapshot=on",
                image.dir.join("disk.img").display()
            ))
            .args(["-netdev", &netdev])
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=host0,security_model=none,readonly=on",
                share.display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", arch.qemu));
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut log = std::fs::File::create(artefacts.join("console.log")).expect("console log");
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let console = Arc::clone(&console);
            let mut log = log.try_clone().expect("console log");
            std::thread::spawn(move || copy_console(stream, &console, &mut log));
        }
        let _ = writeln!(log, "# {} booted by tests/vm.rs", arch.deb);
        Machine {
            stdin: child.stdin.take().expect("stdin"),
            child,
            console,
            seen: 0,
            seq: 0,
            artefacts: artefacts.to_path_buf(),
            arch: arch.deb,
        }
    }

    fn text_since(&self, from: usize) -> String {
        let c = self.console.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&c[from.min(c.len())..]).into_owned()
    }

    fn len(&self) -> usize {
        self.console.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits for `needle` in what the console printed since `from`; the position after it.
    fn expect_since(&mut self, from: usize, needle: &str, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text_since(from);
            if let Some(i) = text.find(needle) {
                return from + i + needle.len();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "[vm {}] qemu ended ({status}) while waiting for {needle:?}",
                    self.arch
                );
            }
            assert!(
                Instant::now() < deadline,
                "[vm {}] no {needle:?} on the console after {limit:?}; console in {}",
                self.arch,
                self.artefacts.join("console.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn type_line(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.stdin.flush())
            .expect("type on the guest's console");
    }

    /// Waits for the autologin shell, then makes it quiet: no echo of what is typed (neither the tty's nor
    /// readline's; `sh` gives commands /dev/null as stdin, so stty is pointed at the tty on stderr), no pager,
    /// no colours.
    fn wait_for_shell(&mut self, limit: Duration) {
        let at = self.expect_since(self.seen, "(automatic login)", limit);
        self.seen = self.expect_since(at, "flotilla-vm:~#", Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(60);
        // The first line typed can race the shell's own setup of the tty: retry until it answers.
        loop {
            let ran = self.sh(
                "stty -echo 0<&2; set +o emacs +o vi; \
                 export SYSTEMD_PAGER= PAGER=cat SYSTEMD_COLORS=0 TERM=dumb",
                Duration::from_secs(10),
            );
            if ran.code == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "[vm {}] the guest's shell does not answer",
                self.arch
            );
        }
    }

    /// Runs `cmd` in the guest's shell. The end marker is computed by the shell, so the echo of the typed line
    /// (before `stty -echo`) cannot be taken for it. A command that outlives `limit` gives code -1.
    fn sh(&mut self, cmd: &str, limit: Duration) -> Ran {
        self.seq += 1;
        let n = self.seq;
        let start = self.len();
        // stdin from /dev/null: apt-get runs dpkg on a pty fed from its own stdin, and would eat the marker line
        // typed ahead.
        self.type_line(&format!(
            "{{ {cmd}\n}} </dev/null\necho \"@@$(({n}+100000))#$?@@\""
        ));
        let marker = format!("@@{}#", n + 100_000);
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text_since(start);
            if let Some(i) = text.find(&marker) {
                let rest = &text[i + marker.len()..];
                if let Some(end) = rest.find("@@") {
                    let code = rest[..end].trim().parse().unwrap_or(-1);
                    self.seen = start + i;
                    return Ran {
                        code,
                        output: text[..i].to_string(),
                    };
                }
            }
            if Instant::now() >= deadline {
                return Ran {
                    code: -1,
                    output: text,
                };
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("[vm {}] qemu ended ({status}) during {cmd:?}", self.arch);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ok_within(&mut self, cmd: &str, limit: Duration) -> String {
        let ran = self.sh(cmd, limit);
        assert!(
            ran.code == 0,
            "[vm {}] `{cmd}` gave {} (-1: no answer in {limit:?}):\n{}",
            self.arch,
            ran.code,
            ran.output
        );
        ran.output
    }

    fn ok(&mut self, cmd: &str) -> String {
        self.ok_within(cmd, Duration::from_secs(120))
    }

    fn poll(&mut self, what: &str, limit: Duration, mut f: impl FnMut(&mut Machine) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "[vm {}] timed out after {limit:?} waiting for {what}",
                self.arch
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// The container `name` as the guest's `flotilla ps -a --json` lists it.
    fn container(&mut self, name: &str) -> Value {
        let out = self.ok("flotilla ps -a --json");
        json_in(&out)
            .and_then(|v| v.as_array().cloned())
            .and_then(|cs| cs.into_iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("[vm {}] no container {name} in:\n{out}", self.arch))
    }

    /// Reboots and waits for the shell; how long the shutdown took (until the kernel restarts) and the boot.
    fn reboot(&mut self, limit: Duration) -> (Duration, Duration) {
        let from = self.len();
        let asked = Instant::now();
        self.type_line("systemctl reboot");
        self.seen = self.expect_since(from, "reboot: Restarting system", limit);
        let down = asked.elapsed();
        let restarted = Instant::now();
        self.wait_for_shell(limit);
        (down, restarted.elapsed())
    }

    fn poweroff(&mut self) {
        self.type_line("systemctl poweroff");
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("[vm {}] did not power off in 120 s", self.arch);
    }
}

fn copy_console(mut from: Box<dyn Read + Send>, to: &Mutex<Vec<u8>>, log: &mut std::fs::File) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                to.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
                // Unbuffered: a hung guest's last words must be in the log.
                let _ = log.write_all(&buf[..n]);
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.try_wait().ok().flatten().is_none() {
            let journal = self.sh(
                "journalctl --no-pager -o short-monotonic -n 600",
                Duration::from_secs(60),
            );
            let path = self.artefacts.join("journal.txt");
            let _ = std::fs::write(&path, journal.output.replace('\r', ""));
            eprintln!(
                "[vm {}] console: {}\n[vm {}] journal: {}",
                self.arch,
                self.artefacts.join("console.log").display(),
                self.arch,
                path.display()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
