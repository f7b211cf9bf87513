//! The systemd units (`systemd/`) and the Debian maintainer scripts around the agent's (`packaging/debian/`).
//!
//! `systemd-analyze verify` must print nothing about either unit; the agent's unit must keep what the agent and its
//! containers rely on (notify, the watchdog, `KillMode=process`, `Delegate=`, ordering after time-sync) and must not
//! gain a sandboxing option that breaks runc or the containers, nor narrow what `src/runtime/bundle.rs` grants a
//! container; the server's unit must stay sandboxed. The package must ship the unit and the scripts, pass lintian,
//! enable the unit, and on purge leave no state, no enablement and no mount behind. The prerm's parsing of
//! `flotilla ps -a --json` runs against a stand-in `flotilla`.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn unit_text(name: &str) -> String {
    read(&crate_root().join("systemd").join(name))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        common::output_text(&out)
    );
    out
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A unit file's assignments in order, as (section, key, value): comments dropped, continuation lines joined.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut settings = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(rest) = line.strip_suffix('\\') {
            pending.push_str(rest);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, value)) = line.split_once('=') {
            settings.push((
                section.clone(),
                key.trim().to_string(),
                value.trim().to_string(),
            ));
        } else {
            panic!("not an assignment in [{section}]: {line:?}");
        }
    }
    settings
}

struct Unit {
    name: &'static str,
    settings: Vec<(String, String, String)>,
}

impl Unit {
    fn load(name: &'static str) -> Unit {
        Unit {
            name,
            settings: parse_unit(&unit_text(name)),
        }
    }

    /// Every value assigned to `key` in `section`, in order.
    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.settings
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The one value of `key` in `section`.
    fn get(&self, section: &str, key: &str) -> Option<&str> {
        let all = self.all(section, key);
        assert!(
            all.len() <= 1,
            "{}: [{section}] {key}= is set {} times",
            self.name,
            all.len()
        );
        all.first().copied()
    }

    fn expect(&self, section: &str, key: &str, value: &str) {
        assert_eq!(
            self.get(section, key),
            Some(value),
            "{}: [{section}] {key}= must be {value}",
            self.name
        );
    }

    /// The space-separated words of every `key=` in `section`.
    fn words(&self, section: &str, key: &str) -> BTreeSet<String> {
        self.all(section, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_string)
            .collect()
    }

    fn is_set(&self, key: &str) -> bool {
        self.settings.iter().any(|(_, k, _)| k == key)
    }
}

/// Options that would break the agent, runc or the containers; systemd/flotilla.service says why for each.
const AGENT_MUST_NOT_SET: [&str; 32] = [
    // A mount namespace of the agent's own: container roots would be mounted where neither `flotilla rm` from a
    // shell nor the next agent after a restart sees them.
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    // Inherited by every container, or otherwise in runc's way.
    "ProtectClock",
    "ProtectHostname",
    "DevicePolicy",
    "DeviceAllow",
    "PrivateNetwork",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "SystemCallArchitectures",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "RestrictSUIDSGID",
    "UMask",
    "User",
    "DynamicUser",
];

#[test]
fn agent_unit_keeps_what_the_agent_relies_on() {
    let unit = Unit::load("flotilla.service");
    unit.expect("Service", "ExecStart", "/usr/bin/flotilla agent");
    unit.expect("Service", "Type", "notify");
    unit.expect("Service", "NotifyAccess", "main");
    assert!(
        unit.get("Service", "WatchdogSec").is_some(),
        "WatchdogSec= is gone: the agent's reconcile loop sends WATCHDOG=1"
    );
    unit.expect("Service", "Restart", "always");
    assert!(unit.get("Service", "RestartSec").is_some());
    // Stopping or restarting the agent must not kill the containers' supervisors.
    unit.expect("Service", "KillMode", "process");
    unit.expect("Service", "Delegate", "yes");
    unit.expect("Service", "StateDirectory", "flotilla");
    unit.expect("Service", "ConfigurationDirectory", "flotilla");
    unit.expect("Install", "WantedBy", "multi-user.target");

    let after = unit.words("Unit", "After");
    for target in ["time-sync.target", "network-online.target"] {
        assert!(after.contains(target), "After= lacks {target}: {after:?}");
    }
    assert!(
        unit.words("Unit", "Wants")
            .contains("network-online.target")
    );

    // The agent runs local-only without a fleet server, and with defaults without a configuration file.
    for (section, key, value) in &unit.settings {
        assert!(
            !key.starts_with("Condition") && !key.starts_with("Assert"),
            "[{section}] {key}={value}: the agent must start whatever /etc/flotilla holds"
        );
    }
    for key in AGENT_MUST_NOT_SET {
        assert!(
            !unit.is_set(key),
            "{key}= breaks the agent or its containers: see the comment in systemd/flotilla.service"
        );
    }
}

/// systemd would set 0755 on /var/lib/flotilla at every start unless the unit says what the package makes.
#[test]
fn agent_state_directory_mode_is_the_packages() {
    let unit = Unit::load("flotilla.service");
    let deb = read(&crate_root().join("packaging/deb"));
    let mode = unit.get("Service", "StateDirectoryMode").expect(
        "StateDirectoryMode= is unset: systemd's default 0755 would open the state to every user",
    );
    assert!(
        deb.contains(&format!("install -d -m {mode} \"$pkg/var/lib/flotilla\"")),
        "packaging/deb does not make /var/lib/flotilla with mode {mode}, as StateDirectoryMode= says"
    );
}

/// The hardening the agent's unit has is inherited by every container; it must take nothing away that the
/// runtime configuration (`src/runtime/bundle.rs`, snapshotted in `tests/fixtures/bundle/`) gives a container.
#[test]
fn agent_hardening_narrows_nothing_a_container_is_given() {
    let unit = Unit::load("flotilla.service");
    let mut dropped = BTreeSet::new();
    for value in unit.all("Service", "CapabilityBoundingSet") {
        let Some(caps) = value.strip_prefix('~') else {
            panic!(
                "CapabilityBoundingSet={value}: keep it a deny list (~...), runc needs nearly every capability"
            );
        };
        dropped.extend(caps.split_whitespace().map(str::to_string));
    }
    let nnp = unit.get("Service", "NoNewPrivileges") == Some("yes");
    let no_realtime = unit.get("Service", "RestrictRealtime") == Some("yes");

    let dir = crate_root().join("tests/fixtures/bundle");
    let mut checked = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let spec: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
        let process = &spec["process"];
        if nnp {
            assert_eq!(
                process["noNewPrivileges"],
                serde_json::Value::Bool(true),
                "{}: a container without no_new_privileges, but the unit sets NoNewPrivileges=yes for all",
                path.display()
            );
        }
        let caps: BTreeSet<&str> = process["capabilities"]
            .as_object()
            .into_iter()
            .flat_map(|sets| sets.values())
            .filter_map(|set| set.as_array())
            .flatten()
            .filter_map(|c| c.as_str())
            .collect();
        for cap in &caps {
            assert!(
                !dropped.contains(*cap),
                "{}: a container is given {cap}, which the unit drops from the bounding set",
                path.display()
            );
        }
        if no_realtime {
            assert!(!caps.contains("CAP_SYS_NICE"), "{}", path.display());
            let rlimits = process["rlimits"].as_array().cloned().unwrap_or_default();
            assert!(
                rlimits.iter().all(|r| r["type"] != "RLIMIT_RTPRIO"),
                "{}: a container may use real-time scheduling, but the unit sets RestrictRealtime=yes",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no bundle fixtures in {}", dir.display());
}

#[test]
fn server_unit_runs_unprivileged_on_its_own_state() {
    let unit = Unit::load("flotilla-server.service");
    unit.expect(
        "Service",
        "ExecStart",
        "/usr/bin/flotilla-server serve --db %S/flotilla-server/server.db",
    );
    unit.expect("Service", "DynamicUser", "yes");
    unit.expect("Service", "StateDirectory", "flotilla-server");
    unit.expect("Service", "ProtectSystem", "strict");
    unit.expect("Service", "CapabilityBoundingSet", "");
    unit.expect("Install", "WantedBy", "multi-user.target");
}

fn systemd_analyze() -> Option<PathBuf> {
    common::require(
        "systemd-analyze (the systemd package; tests/setup installs it)",
        common::tool("systemd-analyze"),
    )
}

/// Overall exposure of `unit` by `systemd-analyze security`, in its own words; `limit` in tenths (20 = 2.0).
fn security(analyze: &Path, unit: &str, limit: u32) -> (bool, String) {
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", &format!("--threshold={limit}")])
        .arg(crate_root().join("systemd").join(unit))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let overall = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure: {}", common::output_text(&out)))
        .to_string();
    (out.status.success(), overall)
}

#[test]
fn server_unit_exposure_is_at_most_2() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let (ok, overall) = security(&analyze, "flotilla-server.service", 20);
    eprintln!("{overall}");
    assert!(ok, "over 2.0: {overall}");
    // The agent's exposure is high by necessity (root, CAP_SYS_ADMIN, the host's mount namespace); printed only.
    let (_, overall) = security(&analyze, "flotilla.service", 100);
    eprintln!("{overall}");
}

/// A root for `systemd-analyze verify --root`: the host's units (the targets the ours are ordered against), ours
/// in `/etc/systemd/system`, and stand-ins for the binaries.
///
/// verify only checks that ExecStart='s binary is an executable file, so a two-line script stands in for both:
/// the units are verified as they are, without rewriting ExecStart=. That also covers flotilla-server, which is
/// built only with the `server` cargo feature and may not exist in this target directory.
fn verify_root(units: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .expect("no /usr/lib/systemd/system on a machine with systemd-analyze");
    fs::create_dir_all(root.path().join("usr/lib/systemd")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(host_units)
        .arg(root.path().join("usr/lib/systemd/")));
    let etc = root.path().join("etc/systemd/system");
    fs::create_dir_all(&etc).unwrap();
    for (name, text) in units {
        fs::write(etc.join(name), text).unwrap();
    }
    let bin = root.path().join("usr/bin");
    fs::create_dir_all(&bin).unwrap();
    for exe in ["flotilla", "flotilla-server"] {
        fs::write(bin.join(exe), "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(bin.join(exe), fs::Permissions::from_mode(0o755)).unwrap();
    }
    root
}

/// What `systemd-analyze verify` prints about `units`; it exits 0 after warnings, so the output is the verdict.
fn verify(analyze: &Path, units: &[(&str, &str)]) -> String {
    let root = verify_root(units);
    let out = Command::new(analyze)
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.path().display()))
        .args(units.iter().map(|(name, _)| name))
        .env_remove("SYSTEMD_LOG_LEVEL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        text
    } else {
        format!("exit status {}\n{text}", out.status)
    }
}

#[test]
fn units_verify_without_a_word() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let agent = unit_text("flotilla.service");
    let server = unit_text("flotilla-server.service");
    let said = verify(
        &analyze,
        &[
            ("flotilla.service", &agent),
            ("flotilla-server.service", &server),
        ],
    );
    assert!(said.is_empty(), "systemd-analyze verify:\n{said}");

    // The check above is only as good as verify's willingness to speak: a misspelt key must be reported.
    let broken = agent.replace("KillMode=process", "KillMode=process\nKilMode=process");
    let said = verify(&analyze, &[("flotilla.service", &broken)]);
    assert!(
        said.contains("KilMode"),
        "systemd-analyze verify let a misspelt key pass: {said:?}"
    );
}

/// The Debian architecture of this machine, whose debug binary stands in for the release build.
fn host_deb_arch() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Some("amd64"),
        "aarch64" => Some("arm64"),
        _ => None,
    }
}

fn build_deb(out: &Path, arch: &str, version: &str) -> PathBuf {
    run(Command::new(crate_root().join("packaging/deb"))
        .args(["--version", version, "--compression", "none"])
        .args(["--binary", env!("CARGO_BIN_EXE_flotilla"), "--out"])
        .arg(out)
        .arg(arch));
    out.join(format!("flotilla_{version}_{arch}.deb"))
}

const SCRIPTS: [&str; 3] = ["postinst", "prerm", "postrm"];

/// Lintian tags that only this test's package earns, from the debug binary and `--compression none` (a release
/// package is static, stripped and xz-compressed; CI's lintian run over those has none of them).
const DEBUG_BUILD_TAGS: &str = "missing-dependency-on-libc,unstripped-binary-or-object,\
uses-no-compression-for-control-tarball,uses-no-compression-for-data-tarball";

#[test]
fn deb_ships_the_unit_and_maintainer_scripts() {
    let Some(arch) = common::require(
        "a Debian package architecture for this host",
        host_deb_arch(),
    ) else {
        return;
    };
    for tool in ["dpkg-deb", "file", "md5sum", "tar"] {
        if common::required_tool(tool).is_none() {
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(tmp.path(), arch, "0.1.0-1");

    let info = String::from_utf8_lossy(&run(Command::new("dpkg-deb").arg("-I").arg(&deb)).stdout)
        .into_owned();
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    for script in SCRIPTS {
        assert!(
            info.lines()
                .any(|l| l.split_whitespace().any(|w| w == script)),
            "no {script} in the package:\n{info}"
        );
        let shipped = control.join(script);
        assert_eq!(
            fs::metadata(&shipped).unwrap().permissions().mode() & 0o777,
            0o755,
            "{script} is not executable"
        );
        assert_eq!(
            read(&shipped),
            read(&crate_root().join("packaging/debian").join(script))
        );
    }

    let contents =
        String::from_utf8_lossy(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout)
            .into_owned();
    let unit = contents
        .lines()
        .find(|l| l.ends_with(" ./usr/lib/systemd/system/flotilla.service"))
        .unwrap_or_else(|| panic!("no flotilla.service in the package:\n{contents}"));
    assert!(unit.starts_with("-rw-r--r-- root/root "), "{unit}");
    assert!(
        !contents.contains("flotilla-server"),
        "flotilla-server is not in this package:\n{contents}"
    );
    // ExecStart= names what the package installs.
    assert!(contents.contains(" ./usr/bin/flotilla\n"), "{contents}");
    let shipped = run(Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -xO ./usr/lib/systemd/system/flotilla.service")
        .arg("sh")
        .arg(&deb));
    assert_eq!(
        String::from_utf8_lossy(&shipped.stdout),
        unit_text("flotilla.service")
    );

    let Some(lintian) = common::required_tool("lintian") else {
        return;
    };
    let out = Command::new(lintian)
        .args([
            "--fail-on",
            "error,warning",
            "--suppress-tags",
            DEBUG_BUILD_TAGS,
        ])
        .arg(&deb)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lintian: {}",
        common::output_text(&out)
    );
}

/// dpkg into a scratch root. The maintainer scripts run on this machine with DPKG_ROOT naming the root
/// (`--force-script-chrootless`: the root has no shell to chroot into), which the scripts honour.
fn dpkg(root: &Path, args: &[&str]) {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--log=/dev/null",
            "--force-depends",
            "--force-script-chrootless",
        ])
        .args(args)
        // No stand-in for the host's own systemctl or flotilla can be reached from here.
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"));
}

fn scratch_root(root: &Path) {
    for dir in ["var/lib/dpkg/updates", "var/lib/dpkg/info"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    for file in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        fs::write(root.join(file), "").unwrap();
    }
}

fn link_target(path: &Path) -> Option<PathBuf> {
    fs::read_link(path).ok()
}

/// Unmounts a test's mount when the test ends, passed or not, so that its temporary directory can go.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mount_point(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn is_mount_point(path: &Path) -> bool {
    let wanted = path.to_str().unwrap();
    read(Path::new("/proc/self/mountinfo"))
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted))
}

#[test]
fn deb_enables_the_unit_and_purge_leaves_nothing() {
    let Some(arch) = common::require(
        "a Debian package architecture for this host",
        host_deb_arch(),
    ) else {
        return;
    };
    for tool in ["dpkg", "dpkg-deb", "file", "md5sum", "mount"] {
        if common::required_tool(tool).is_none() {
            return;
        }
    }
    if common::require(
        "root (dpkg into a scratch root, a tmpfs mount)",
        is_root().then_some(()),
    )
    .is_none()
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let debs = tmp.path().join("debs");
    let root = tmp.path().join("root");
    scratch_root(&root);
    let wants = root.join("etc/systemd/system/multi-user.target.wants/flotilla.service");
    let mask = root.join("etc/systemd/system/flotilla.service");
    let unit_path = PathBuf::from("/usr/lib/systemd/system/flotilla.service");

    dpkg(
        &root,
        &[
            "--install",
            build_deb(&debs, arch, "0.1.0-1").to_str().unwrap(),
        ],
    );
    assert_eq!(link_target(&wants), Some(unit_path.clone()), "not enabled");
    dpkg(
        &root,
        &[
            "--install",
            build_deb(&debs, arch, "0.1.0-2").to_str().unwrap(),
        ],
    );
    assert_eq!(
        link_target(&wants),
        Some(unit_path),
        "upgrade lost the enablement"
    );

    // What a running agent leaves: state, a container root still mounted, a file of the administrator's.
    let rootfs = root.join("var/lib/flotilla/containers/app/rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    fs::write(root.join("var/lib/flotilla/agent.db"), "state").unwrap();
    fs::write(root.join("etc/flotilla/registry.password"), "secret").unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "flotilla-units-test"])
        .arg(&rootfs));
    let _unmount = Unmount(rootfs.clone());
    fs::write(rootfs.join("file"), "in the container").unwrap();

    dpkg(&root, &["--remove", "flotilla"]);
    assert!(!root.join("usr/bin/flotilla").exists());
    assert_eq!(
        link_target(&mask),
        Some(PathBuf::from("/dev/null")),
        "remove did not mask the unit as deb-systemd-helper does"
    );
    assert!(
        root.join("var/lib/flotilla/agent.db").exists(),
        "remove (not purge) took the state"
    );

    dpkg(&root, &["--purge", "flotilla"]);
    assert!(
        !is_mount_point(&rootfs),
        "purge left {} mounted",
        rootfs.display()
    );
    assert!(
        !root.join("var/lib/flotilla").exists(),
        "purge left the state"
    );
    assert!(
        !root.join("etc/flotilla").exists(),
        "purge left /etc/flotilla"
    );
    assert!(link_target(&wants).is_none(), "purge left the enablement");
    assert!(link_target(&mask).is_none(), "purge left the mask");
}

/// `flotilla ps -a --json` as src/cli/ps.rs prints it: an array of rows whose `status` is flattened in. The
/// second row's message holds text shaped like a name, which must not be taken for one.
const PS_JSON: &str = r#"[
  {
    "name": "sensor",
    "image": "registry.local:5000/sensor:1.4",
    "platform": "linux/arm/v6",
    "manifest": "sha256:aa",
    "state": "running",
    "supervised": true,
    "pid": 4242,
    "started_at": "2026-01-01T00:00:00Z",
    "finished_at": null,
    "exit": null,
    "restarts": 0,
    "health": "healthy",
    "wrong_architecture": null,
    "message": null,
    "rootfs": "overlay",
    "emulated_by": null
  },
  {
    "name": "web.v2-b_1",
    "image": "docker.io/library/busybox:latest",
    "platform": "linux/arm/v7",
    "manifest": "sha256:bb",
    "state": "exited",
    "supervised": false,
    "pid": null,
    "started_at": null,
    "finished_at": null,
    "exit": {
      "code": null,
      "signal": 4
    },
    "restarts": 3,
    "health": null,
    "wrong_architecture": {
      "evidence": "SIGILL",
      "host": "BCM2835"
    },
    "message": "oops, \"name\": \"victim\", {\"name\": \"victim\"}",
    "rootfs": "overlay",
    "emulated_by": null
  }
]
"#;

/// A directory with stand-ins for `flotilla` and `deb-systemd-invoke` that log their arguments, and `flotilla ps`
/// printing `ps`.
fn stand_ins(dir: &Path, ps: &str) -> PathBuf {
    let log = dir.join("calls");
    fs::write(dir.join("ps.json"), ps).unwrap();
    // `ps` fails when there is no ps.json.
    let flotilla = format!(
        "#!/bin/sh\necho \"flotilla $*\" >>'{log}'\n[ \"$1\" = ps ] && exec cat '{json}'\nexit 0\n",
        log = log.display(),
        json = dir.join("ps.json").display()
    );
    let invoke = format!(
        "#!/bin/sh\necho \"deb-systemd-invoke $*\" >>'{}'\n",
        log.display()
    );
    for (name, text) in [("flotilla", flotilla), ("deb-systemd-invoke", invoke)] {
        fs::write(dir.join(name), text).unwrap();
        fs::set_permissions(dir.join(name), fs::Permissions::from_mode(0o755)).unwrap();
    }
    log
}

/// Runs the prerm with `arg` and the stand-ins in `dir`: the calls they logged, and what the prerm said.
fn run_prerm(dir: &Path, arg: &str) -> (String, String) {
    let log = dir.join("calls");
    let _ = fs::remove_file(&log);
    let out = run(Command::new("sh")
        .arg(crate_root().join("packaging/debian/prerm"))
        .arg(arg)
        .env("PATH", format!("{}:/usr/bin:/bin", dir.display()))
        .env_remove("DPKG_ROOT"));
    (
        fs::read_to_string(&log).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn prerm_removes_every_container_on_removal_and_none_on_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    stand_ins(tmp.path(), PS_JSON);
    let (calls, _) = run_prerm(tmp.path(), "remove");
    let flotilla: Vec<&str> = calls
        .lines()
        .filter(|l| l.starts_with("flotilla "))
        .collect();
    assert_eq!(
        flotilla,
        [
            "flotilla ps -a --json",
            "flotilla stop sensor",
            "flotilla rm -f sensor",
            "flotilla stop web.v2-b_1",
            "flotilla rm -f web.v2-b_1",
        ],
        "{calls}"
    );
    // Stopped first, so the agent does not start them again; only where systemd runs.
    let stop = calls
        .lines()
        .position(|l| l.starts_with("deb-systemd-invoke"));
    if Path::new("/run/systemd/system").is_dir() {
        assert_eq!(stop, Some(0), "{calls}");
    }

    // The same rows printed compactly give the same names.
    let compact: serde_json::Value = serde_json::from_str(PS_JSON).unwrap();
    stand_ins(tmp.path(), &compact.to_string());
    let (calls, _) = run_prerm(tmp.path(), "remove");
    assert!(
        calls.contains("flotilla rm -f sensor\nflotilla stop web.v2-b_1\n"),
        "{calls}"
    );
    assert!(!calls.contains("victim"), "{calls}");

    // When flotilla cannot list them, removal goes on and says so.
    fs::remove_file(tmp.path().join("ps.json")).unwrap();
    let (calls, said) = run_prerm(tmp.path(), "remove");
    assert!(!calls.contains("flotilla rm"), "{calls}");
    assert!(said.contains("cannot list the containers"), "{said}");

    // Upgrades leave the agent to postinst and the containers running.
    for arg in ["upgrade", "deconfigure", "failed-upgrade"] {
        assert_eq!(run_prerm(tmp.path(), arg).0, "", "prerm {arg}");
    }
}

/// The real `flotilla ps -a --json` of an empty state directory is an array the prerm reads as no containers.
#[test]
fn ps_json_of_no_containers_is_an_empty_array() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .arg("--state-dir")
        .arg(tmp.path())
        .args(["ps", "-a", "--json"]));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows, serde_json::json!([]));
}
