//! Containers run for real: a busybox-static rootfs, a bundle from `runtime::bundle`, and runc driven through
//! `runtime::runc::Runc` with a temporary `--root`. Needs root and runc; without them each test skips with the
//! reason, or fails under `FLOTILLA_REQUIRE_ALL=1`.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::time::Duration;

use flotilla::app::{Network, RunSettings, SeccompMode};
use flotilla::oci::{ExecConfig, ImageConfig};
use flotilla::runtime::bundle::{self, Container};
use flotilla::runtime::runc::Runc;
use flotilla::runtime::{Io, Runtime, RuntimeError, Status};

const APPLETS: [&str; 14] = [
    "sh", "id", "echo", "cat", "sleep", "touch", "hostname", "true", "ls", "exec", "test", "grep",
    "ping", "unshare",
];

/// Debian's name for this machine's architecture, as the busybox fixtures are laid out.
fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "armhf",
        other => other,
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    runc: Runc,
    image: ImageConfig,
}

impl Fixture {
    fn new() -> Option<Fixture> {
        let root = rustix::process::geteuid().is_root().then_some(());
        common::require("root (runc needs it)", root)?;
        let binary = common::require(
            "runc (apt install runc)",
            common::tool(Runc::DEFAULT_BINARY).or_else(|| common::tool("runc")),
        )?;
        let busybox = common::required_busybox(native_arch())?;
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "etc", "probe", "tmp"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        fs::copy(&busybox, rootfs.join("bin/busybox")).unwrap();
        for applet in APPLETS {
            symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234::/tmp:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            rootfs.join("etc/group"),
            "root:x:0:\napp:x:1234:\nsensors:x:2000:app\n",
        )
        .unwrap();
        // /dev/kmsg's numbers (1:11) at a path outside the container's /dev: reachable only if the device cgroup
        // allows it.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            rootfs.join("probe/kmsg"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 11),
        )
        .unwrap();
        let runc = Runc::new(&binary, &dir.path().join("state")).unwrap();
        let image = ImageConfig {
            os: "linux".into(),
            architecture: native_arch().into(),
            config: Some(ExecConfig {
                entrypoint: Some(vec!["sh".into()]),
                env: Some(vec!["GREETING=hello".into()]),
                ..ExecConfig::default()
            }),
            ..ImageConfig::default()
        };
        Some(Fixture { dir, runc, image })
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Writes the bundle for `name`, creates the container with its output in `<name>.log`, and returns a guard
    /// that force-deletes it.
    fn create(&self, name: &str, settings: &RunSettings) -> Running<'_> {
        // Unique across test binaries running at once: the cgroup path is the host's.
        let id = format!("flotilla-test-{}-{name}", std::process::id());
        let rootfs = self.rootfs();
        let volumes = self.dir.path().join("volumes");
        let c = Container {
            name: &id,
            instance: "test",
            image: &self.image,
            settings,
            rootfs: &rootfs,
            volumes_dir: &volumes,
        };
        let resolved = bundle::prepare(&c).unwrap();
        let spec = bundle::spec(&c, &resolved).unwrap();
        let bundle_dir = self.dir.path().join(format!("bundle-{name}"));
        fs::create_dir_all(&bundle_dir).unwrap();
        bundle::write(&bundle_dir, &spec).unwrap();
        let log = self.dir.path().join(format!("{name}.log"));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let pid_file = self.dir.path().join(format!("{name}.pid"));
        let io = Io {
            stdout: out.try_clone().unwrap().into(),
            stderr: out.into(),
            pid_file: pid_file.clone(),
        };
        self.runc.create(&id, &bundle_dir, io).unwrap();
        Running {
            runc: &self.runc,
            id,
            log,
            pid_file,
        }
    }

    /// Runs `command` to its end and returns its output.
    fn run(&self, name: &str, mut settings: RunSettings, command: &str) -> String {
        settings.command = vec!["-c".into(), command.into()];
        let c = self.create(name, &settings);
        self.runc.start(&c.id).unwrap();
        c.wait_stopped();
        c.output()
    }
}

fn settings() -> RunSettings {
    RunSettings::new()
}

struct Running<'a> {
    runc: &'a Runc,
    id: String,
    log: PathBuf,
    pid_file: PathBuf,
}

impl Running<'_> {
    fn status(&self) -> Option<Status> {
        self.runc.state(&self.id).unwrap().map(|s| s.status)
    }

    fn wait_stopped(&self) {
        for _ in 0..1000 {
            if self.status() == Some(Status::Stopped) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not stop; output:\n{}", self.id, self.output());
    }

    /// The output, once it contains `text` (the process writes it after start, on its own schedule).
    fn wait_output(&self, text: &str) -> String {
        for _ in 0..1000 {
            let out = self.output();
            if out.contains(text) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} never printed {text:?}; output:\n{}",
            self.id,
            self.output()
        );
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // The test may have deleted it already; a leftover container would keep its cgroup.
        let _ = self.runc.delete(&self.id, true);
    }
}

#[test]
fn lifecycle_output_exec_and_volumes() {
    let Some(f) = Fixture::new() else { return };
    let mut s = settings();
    s.volumes = vec!["data:/data".parse().unwrap()];
    s.command = vec![
        "-c".into(),
        "echo out $GREETING; echo err >&2; hostname; echo kept > /data/file; exec sleep 1000"
            .into(),
    ];
    let c = f.create("life", &s);

    let state = f.runc.state(&c.id).unwrap().unwrap();
    assert_eq!(state.status, Status::Created);
    assert!(state.pid > 0);
    let pid: u32 = fs::read_to_string(&c.pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, state.pid);

    f.runc.start(&c.id).unwrap();
    // The hostname, printed last, is the container's name.
    let out = c.wait_output(&c.id);
    assert!(out.contains("out hello"), "{out}");
    assert!(out.contains("err"), "{out}");
    assert_eq!(c.status(), Some(Status::Running));
    assert!(f.runc.list().unwrap().iter().any(|s| s.id == c.id));

    let t = Duration::from_secs(30);
    assert_eq!(f.runc.exec(&c.id, &["true".into()], t).unwrap(), 0);
    let code = f
        .runc
        .exec(&c.id, &["sh".into(), "-c".into(), "exit 3".into()], t)
        .unwrap();
    assert_eq!(code, 3);
    // The probe outlives its timeout and is killed; the error says so.
    let e = f
        .runc
        .exec(
            &c.id,
            // 1001: the container's own process is a `sleep 1000`.
            &["sleep".into(), "1001".into()],
            Duration::from_millis(200),
        )
        .unwrap_err();
    assert!(matches!(e, RuntimeError::ExecTimeout { .. }), "{e}");
    // Nothing of it is left: not the probe, not runc's helpers (a timeout on a slow CPU lands mid-setup).
    common::wait_for(
        "the timed-out probe and its runc processes to be gone",
        Duration::from_secs(10),
        || {
            common::processes_with(&["sleep", "1001"]).is_empty()
                && common::processes_with(&["runc", "exec", &c.id]).is_empty()
        },
    );
    // runc's own failure reaches the error through its JSON log.
    let e = f
        .runc
        .exec(&c.id, &["/no/such/probe".into()], t)
        .unwrap_err();
    assert!(e.to_string().contains("/no/such/probe"), "{e}");

    for _ in 0..1000 {
        if f.dir.path().join("volumes/data/file").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fs::read_to_string(f.dir.path().join("volumes/data/file")).unwrap(),
        "kept\n"
    );

    assert!(
        f.runc.delete(&c.id, false).is_err(),
        "a running container is not deleted without force"
    );
    f.runc.kill(&c.id, libc::SIGKILL, false).unwrap();
    c.wait_stopped();
    f.runc.delete(&c.id, false).unwrap();
    assert_eq!(f.runc.state(&c.id).unwrap(), None);
}

#[test]
fn a_user_named_in_the_image_s_passwd_takes_effect() {
    let Some(f) = Fixture::new() else { return };
    let mut s = settings();
    s.user = Some("app".into());
    let out = f.run("user", s.clone(), "echo uid=$(id -u) groups=$(id -G)");
    assert!(out.contains("uid=1234 groups=1234 2000"), "{out}");

    // exec runs as the container's user too.
    s.command = vec!["-c".into(), "exec sleep 1000".into()];
    let c = f.create("user-exec", &s);
    f.runc.start(&c.id).unwrap();
    let probe = ["sh".into(), "-c".into(), "test $(id -u) = 1234".into()];
    assert_eq!(
        f.runc.exec(&c.id, &probe, Duration::from_secs(30)).unwrap(),
        0
    );
}

#[test]
fn a_passed_through_device_is_usable_and_an_unlisted_one_is_denied() {
    let Some(f) = Fixture::new() else { return };
    // Opening /dev/kmsg write-only needs no capability, only the device cgroup's permission.
    let probe = "exec 3>/probe/kmsg && echo probe-open; exec 4>/dev/kmsg && echo dev-open; true";
    let out = f.run("unlisted", settings(), probe);
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(!out.contains("probe-open"), "{out}");

    let mut s = settings();
    s.devices = vec!["/dev/kmsg".into()];
    let out = f.run("listed", s, probe);
    assert!(out.contains("probe-open"), "{out}");
    assert!(out.contains("dev-open"), "{out}");
}

#[test]
fn a_read_only_root_refuses_writes_but_run_stays_writable() {
    let Some(f) = Fixture::new() else { return };
    let mut s = settings();
    s.read_only = true;
    let out = f.run(
        "ro",
        s,
        "touch /written 2>&1 || echo refused; touch /run/ok && echo run-writable",
    );
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("refused"), "{out}");
    assert!(out.contains("run-writable"), "{out}");
    assert!(!f.rootfs().join("written").exists());
}

#[test]
fn the_memory_limit_is_the_container_s_cgroup_limit() {
    let Some(f) = Fixture::new() else { return };
    let mut s = settings();
    s.memory = Some(32 << 20);
    s.pids = Some(64);
    // cgroup v2, then v1 (the cgroup namespace makes the container's own cgroup the root of the mount).
    let out = f.run(
        "mem",
        s,
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
    );
    assert!(out.contains(&(32u64 << 20).to_string()), "{out}");
}

/// Issue 15: a raw socket on the host's network sees and forges the host's traffic, so `NET_RAW` is not a default
/// capability. busybox ping needs it, or a ping socket, which `net.ipv4.ping_group_range` grants. That sysctl is
/// per network namespace, and systemd opens it to every group on the host's; so the container gets a private
/// network (`--network none`), where it is the kernel's default that grants no group, and the capability is the
/// only way in, as on a host where nothing changed the sysctl.
#[test]
fn ping_needs_net_raw_which_only_cap_add_gives() {
    let Some(f) = Fixture::new() else { return };
    let probe = "cat /proc/sys/net/ipv4/ping_group_range; ping -c 1 -W 2 127.0.0.1; echo exit=$?";
    let mut s = settings();
    s.network = Network::None;
    let out = f.run("ping-default", s.clone(), probe);
    assert!(out.starts_with("1\t0"), "ping sockets open to root: {out}");
    assert!(out.contains("permission denied"), "{out}");
    assert!(out.contains("exit=1"), "{out}");

    s.cap_add = vec!["NET_RAW".into()];
    let out = f.run("ping-net-raw", s, probe);
    assert!(out.contains("1 packets received"), "{out}");
    assert!(out.contains("exit=0"), "{out}");
}

/// Issue 15: a syscall outside the seccomp profile fails with EPERM. `unshare(CLONE_NEWUSER)` needs no capability
/// on this kernel (and no sysctl allows it: upstream Linux has no `unprivileged_userns_clone`), so only the
/// filter stops it; without the filter the same command works.
#[test]
fn a_syscall_outside_the_profile_gets_eperm_unless_seccomp_is_unconfined() {
    let Some(f) = Fixture::new() else { return };
    let probe = "unshare -U true; echo exit=$?";
    let out = f.run("unshare-default", settings(), probe);
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.contains("exit=1"), "{out}");

    let mut s = settings();
    s.seccomp = SeccompMode::Unconfined;
    let out = f.run("unshare-unconfined", s, probe);
    assert!(out.contains("exit=0"), "{out}");
    assert!(!out.contains("not permitted"), "{out}");

    // A capability that gates the syscall opens it in the profile too, as in Docker.
    let mut s = settings();
    s.cap_add = vec!["SYS_ADMIN".into()];
    let out = f.run("unshare-sys-admin", s, probe);
    assert!(out.contains("exit=0"), "{out}");
}

/// runc hands each seccomp name to libseccomp and silently leaves out a name it does not know, so a misspelt name
/// in `src/runtime/seccomp/default.json` would allow nothing and no one would notice. runc's debug log names each
/// one it left out: with the capabilities added that bring in every rule of the profile, those may only
/// be the syscalls newer than this libseccomp, which runc's filter answers with ENOSYS.
#[test]
fn every_name_in_the_seccomp_profile_is_one_libseccomp_knows() {
    let Some(f) = Fixture::new() else { return };
    let binary = common::tool(Runc::DEFAULT_BINARY)
        .or_else(|| common::tool("runc"))
        .expect("checked by the fixture");
    let mut s = settings();
    // The capabilities the profile's rules depend on (not every one: this host's bounding set lacks SYS_RESOURCE,
    // and runc refuses a capability it cannot give).
    s.cap_add = [
        "BPF",
        "DAC_READ_SEARCH",
        "PERFMON",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_MODULE",
        "SYS_NICE",
        "SYS_PACCT",
        "SYS_PTRACE",
        "SYS_RAWIO",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "SYSLOG",
    ]
    .map(String::from)
    .to_vec();
    s.command = vec!["-c".into(), "true".into()];
    let id = format!("flotilla-test-{}-names", std::process::id());
    let rootfs = f.rootfs();
    let volumes = f.dir.path().join("volumes");
    let c = Container {
        name: &id,
        instance: "test",
        image: &f.image,
        settings: &s,
        rootfs: &rootfs,
        volumes_dir: &volumes,
    };
    let spec = bundle::spec(&c, &bundle::prepare(&c).unwrap()).unwrap();
    let bundle_dir = f.dir.path().join("bundle-names");
    fs::create_dir_all(&bundle_dir).unwrap();
    bundle::write(&bundle_dir, &spec).unwrap();
    let out = std::process::Command::new(binary)
        .arg("--debug")
        .arg("--root")
        .arg(f.dir.path().join("state-debug"))
        .args(["run", "--bundle"])
        .arg(&bundle_dir)
        .arg(&id)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // Added to Linux after libseccomp 2.5.4 (Debian 12's) was released.
    const NEWER: [&str; 7] = [
        "cachestat",
        "fchmodat2",
        "futex_requeue",
        "futex_wait",
        "futex_wake",
        "map_shadow_stack",
        "mseal",
    ];
    let ignored: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("unknown seccomp syscall \\\"").nth(1))
        .filter_map(|rest| rest.split("\\\"").next())
        .collect();
    for name in &ignored {
        assert!(
            NEWER.contains(name),
            "libseccomp does not know {name:?}: {log}"
        );
    }
}
