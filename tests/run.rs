//! `flotilla run`, `ps`, `logs`, `stop` and `rm` with real runc, as root: busybox-static images run natively and,
//! through qemu-user binfmt handlers this test registers, as arm64 and arm/v6.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::binfmt::Binfmt;
use common::registry::{OciLayoutBuilder, busybox_images};
use common::{Flotilla, output_text, require, wait_for};

const LONG_RUNNING: &str =
    "echo hello; echo oops >&2; trap 'echo bye; exit 0' TERM; while :; do busybox sleep 0.1; done";

struct Lab {
    _dir: tempfile::TempDir,
    state: PathBuf,
    image: String,
}

fn prerequisites() -> Option<()> {
    require(
        "root (runc needs it)",
        rustix::process::geteuid().is_root().then_some(()),
    )?;
    common::required_tool("runc")?;
    require("busybox-static fixtures (tests/setup)", busybox_images())?;
    Some(())
}

impl Lab {
    fn new() -> Option<Lab> {
        prerequisites()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        layout.write("v1", &busybox_images()?);
        let image = format!("oci:{}:v1", layout.dir().display());
        Some(Lab {
            state: dir.path().join("state"),
            _dir: dir,
            image,
        })
    }

    fn flotilla(&self, args: &[&str]) -> Output {
        Flotilla::new().state(&self.state).args(args).output()
    }

    fn ok(&self, args: &[&str]) -> String {
        Flotilla::new().state(&self.state).args(args).stdout()
    }

    fn container(&self, name: &str) -> serde_json::Value {
        let all: serde_json::Value =
            serde_json::from_str(&self.ok(&["ps", "-a", "--json"])).expect("ps json");
        all.as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    fn logs(&self, name: &str) -> String {
        let out = self.flotilla(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn container_dir(&self, name: &str) -> PathBuf {
        self.state.join("containers").join(name)
    }

    /// The pid of the container's supervisor, as its lock file names it.
    fn supervisor(&self, name: &str) -> i32 {
        let lock = self.container_dir(name).join("supervisor.lock");
        std::fs::read_to_string(&lock)
            .expect("the supervisor's lock file")
            .trim()
            .parse()
            .expect("a pid in the lock file")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Whatever a failed test left running goes: containers, supervisors, mounts.
        if let Ok(entries) = std::fs::read_dir(self.state.join("containers")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let _ = self.flotilla(&["rm", "--force", &name]);
            }
        }
    }
}

fn mounted(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .contains(&dir.display().to_string())
}

#[test]
fn runs_natively_logs_stops_gracefully_and_removes() {
    let Some(lab) = Lab::new() else { return };
    let name = lab.ok(&[
        "run",
        &lab.image,
        "--name",
        "web",
        "--detach",
        "--",
        "-c",
        LONG_RUNNING,
    ]);
    assert_eq!(name.trim(), "web");
    wait_for("the container's output", Duration::from_secs(30), || {
        let logs = lab.logs("web");
        logs.contains("hello") && logs.contains("oops")
    });
    let c = lab.container("web");
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["platform"], "linux/amd64", "{c}");
    assert_eq!(c["supervised"], true, "{c}");
    let out = lab.flotilla(&["logs", "web", "--tail", "1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oops")
            && !String::from_utf8_lossy(&out.stdout).contains("hello"),
        "stderr lines go to stderr, and --tail 1 keeps only the last: {}",
        output_text(&out)
    );

    lab.ok(&["stop", "web", "--time", "20"]);
    let c = lab.container("web");
    assert_eq!(c["state"], "stopped", "{c}");
    // The trap ran: the container ended on SIGTERM, within the grace period, not by SIGKILL after it.
    assert_eq!(c["exit"]["code"], 0, "{c}");
    assert!(lab.logs("web").contains("bye"));

    let dir = lab.container_dir("web");
    assert!(
        mounted(&dir) || c["rootfs"] == "copy",
        "the root is mounted until rm"
    );
    lab.ok(&["rm", "web"]);
    assert!(!dir.exists());
    assert!(!mounted(&dir), "rm unmounts the root");
    let out = lab.flotilla(&["logs", "web"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("no container named web"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn foreground_run_returns_the_exit_code_and_names_are_unique() {
    let Some(lab) = Lab::new() else { return };
    let out = lab.flotilla(&[
        "run",
        &lab.image,
        "--name",
        "fg",
        "--",
        "-c",
        "echo out; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("out"),
        "{}",
        output_text(&out)
    );
    let c = lab.container("fg");
    assert_eq!(c["state"], "exited", "{c}");
    assert_eq!(c["exit"]["code"], 7, "{c}");

    let again = lab.flotilla(&["run", &lab.image, "--name", "fg", "--", "-c", "true"]);
    assert_eq!(again.status.code(), Some(1), "{}", output_text(&again));
    assert!(
        output_text(&again).contains("flotilla rm fg"),
        "{}",
        output_text(&again)
    );
    let bad = lab.flotilla(&["run", &lab.image, "--name", "../x"]);
    assert_eq!(bad.status.code(), Some(2), "{}", output_text(&bad));
}

#[test]
fn the_restart_policy_restarts_a_crash_and_gives_up_after_its_limit() {
    let Some(lab) = Lab::new() else { return };
    lab.ok(&[
        "run",
        &lab.image,
        "--name",
        "crash",
        "--restart",
        "on-failure:2",
        "--detach",
        "--",
        "-c",
        "echo run; exit 3",
    ]);
    wait_for("the restarts to end", Duration::from_secs(60), || {
        lab.container("crash")["state"] == "exited"
    });
    let c = lab.container("crash");
    assert_eq!(c["restarts"], 2, "{c}");
    assert_eq!(c["exit"]["code"], 3, "{c}");
    assert_eq!(lab.logs("crash").matches("run").count(), 3);
}

#[test]
fn a_container_being_made_is_never_adopted_by_a_concurrent_ps() {
    let Some(lab) = Lab::new() else { return };
    // `ps` (as root) adopts containers whose supervisor is gone. One running in a loop must never take a container
    // that `run` is still making for such an orphan: that started a second supervisor racing the first.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looper = {
        let stop = stop.clone();
        let state = lab.state.clone();
        std::thread::spawn(move || {
            let mut said = String::new();
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && rounds < 100_000 {
                let out = Flotilla::new().state(&state).arg("ps").output();
                said.push_str(&String::from_utf8_lossy(&out.stderr));
                rounds += 1;
            }
            (said, rounds)
        })
    };
    let names = ["race0", "race1", "race2", "race3", "race4"];
    for name in names {
        lab.ok(&[
            "run",
            &lab.image,
            "--name",
            name,
            "--detach",
            "--",
            "-c",
            LONG_RUNNING,
        ]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (said, rounds) = looper.join().expect("the ps loop");
    assert!(rounds > 1, "ps ran alongside the runs");
    assert!(
        !said.contains("adopted"),
        "ps adopted a container being made: {said}"
    );
    for name in names {
        let c = lab.container(name);
        assert_eq!(c["state"], "running", "{c}");
        assert_eq!(c["restarts"], 0, "{c}");
        let supervisors = common::processes_with(&["supervise", name]);
        assert_eq!(
            supervisors.len(),
            1,
            "{name}: one supervisor, not {supervisors:?}"
        );
    }
}

#[test]
fn a_supervisor_that_does_not_answer_is_killed_and_the_stop_still_happens() {
    let Some(lab) = Lab::new() else { return };
    lab.ok(&[
        "run",
        &lab.image,
        "--name",
        "stuck",
        "--detach",
        "--",
        "-c",
        // Ignores SIGTERM, as a shell as PID 1 does: only SIGKILL ends it. The echo names this test, whose check
        // below looks for the script's processes: another test runs the same loop meanwhile.
        "trap '' TERM; echo hello from stuck; while :; do busybox sleep 0.1; done",
    ]);
    wait_for("the container's output", Duration::from_secs(30), || {
        lab.logs("stuck").contains("hello")
    });
    let supervisor = lab.supervisor("stuck");
    let pid = rustix::process::Pid::from_raw(supervisor).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let out = lab.flotilla(&["stop", "stuck", "--time", "1"]);
    // Whatever happened, the supervisor must not stay stopped behind a failed test.
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
    assert!(out.status.success(), "{}", output_text(&out));
    let alive = std::fs::read_to_string(format!("/proc/{supervisor}/stat"))
        .is_ok_and(|s| !s.contains(") Z "));
    assert!(!alive, "the supervisor that did not answer was killed");
    let c = lab.container("stuck");
    assert_eq!(c["state"], "stopped", "{c}");
    assert_eq!(c["supervised"], false, "{c}");
    assert!(
        common::processes_with(&["trap '' TERM", "hello from stuck"]).is_empty(),
        "the container's processes are gone"
    );
    lab.ok(&["rm", "stuck"]);
}

#[test]
fn two_state_directories_run_containers_of_one_name_apart() {
    let (Some(a), Some(b)) = (Lab::new(), Lab::new()) else {
        return;
    };
    // Ignores SIGTERM, so the stop ends in `runc kill --all`, which kills every process of the container's cgroup.
    let script = "trap '' TERM; echo hello; while :; do busybox sleep 0.1; done";
    for lab in [&a, &b] {
        lab.ok(&[
            "run", &lab.image, "--name", "same", "--detach", "--", "-c", script,
        ]);
        wait_for("the container's output", Duration::from_secs(30), || {
            lab.logs("same").contains("hello")
        });
    }
    let pid_b = b.container("same")["pid"].as_i64().expect("b's pid");
    a.ok(&["stop", "same", "--time", "1"]);
    assert_eq!(a.container("same")["state"], "stopped");
    let c = b.container("same");
    assert_eq!(
        c["state"], "running",
        "stopping a's container left b's alone: {c}"
    );
    assert_eq!(c["pid"].as_i64(), Some(pid_b), "{c}");
    assert!(
        Path::new(&format!("/proc/{pid_b}")).exists(),
        "b's container still runs"
    );
    // And b's log shows no restart: the container was never killed.
    assert_eq!(c["restarts"], 0, "{c}");
}

#[test]
fn a_killed_supervisor_is_replaced_and_the_container_adopted() {
    let Some(lab) = Lab::new() else { return };
    lab.ok(&[
        "run",
        &lab.image,
        "--name",
        "adopt",
        "--detach",
        "--",
        "-c",
        LONG_RUNNING,
    ]);
    wait_for("the container's output", Duration::from_secs(30), || {
        lab.logs("adopt").contains("hello")
    });
    let before = lab.container("adopt");
    let pid = before["pid"].as_i64().expect("pid");
    let supervisor = lab.supervisor("adopt");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(supervisor).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_for("the supervisor to die", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{supervisor}")).exists()
            || std::fs::read_to_string(format!("/proc/{supervisor}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });

    let out = lab.flotilla(&["ps"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("adopted"),
        "{}",
        output_text(&out)
    );
    let after = lab.container("adopt");
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(
        after["pid"].as_i64(),
        Some(pid),
        "adopted, not started again: {after}"
    );
    assert_eq!(after["restarts"], 0, "{after}");
    assert_eq!(after["supervised"], true, "{after}");
    // The new supervisor reads the same pipes: the output written at the stop still reaches the log.
    let stop = lab.flotilla(&["stop", "adopt", "--time", "20"]);
    assert!(stop.status.success(), "{}", output_text(&stop));
    let logs = lab.logs("adopt");
    assert!(
        logs.contains("bye"),
        "stop: {}\nlogs: {logs}\nsupervisor.log: {}",
        output_text(&stop),
        std::fs::read_to_string(lab.container_dir("adopt").join("supervisor.log"))
            .unwrap_or_default()
    );
    assert_eq!(lab.container("adopt")["state"], "stopped");
}

#[test]
fn a_sigill_exit_is_recorded_as_the_wrong_architecture_variant() {
    let Some(lab) = Lab::new() else { return };
    // A child shell dies of SIGILL (as an ARMv7 instruction on an ARMv6 CPU would make it); the container's init
    // exits with 128 + 4.
    let out = lab.flotilla(&[
        "run",
        &lab.image,
        "--name",
        "ill",
        "--restart",
        "always",
        "--",
        "-c",
        "busybox sh -c 'kill -ILL $$'; exit $?",
    ]);
    assert_eq!(out.status.code(), Some(132), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("wrong architecture variant"),
        "{}",
        output_text(&out)
    );
    let c = lab.container("ill");
    assert_eq!(c["state"], "exited", "never restarted: {c}");
    assert_eq!(c["restarts"], 0, "{c}");
    assert!(c["wrong_architecture"]["evidence"].is_string(), "{c}");
    assert!(c["wrong_architecture"]["host"].is_string(), "{c}");
    let table = lab.ok(&["ps", "-a"]);
    assert!(table.contains("wrong architecture variant"), "{table}");
}

/// binfmt_misc registration is machine-wide: this one test owns it, restores what it found, and runs the foreign
/// variants.
#[test]
fn foreign_variants_run_only_with_a_registered_handler_and_permission() {
    let Some(lab) = Lab::new() else { return };
    let Some(binfmt) = require("binfmt_misc and qemu-user-static", Binfmt::take()) else {
        return;
    };
    binfmt.unregister_all();
    let refused = lab.flotilla(&[
        "--platform",
        "linux/arm64",
        "run",
        &lab.image,
        "--name",
        "a64",
        "--allow-emulation",
        "--",
        "-c",
        "busybox uname -m",
    ]);
    assert!(!refused.status.success(), "{}", output_text(&refused));
    assert!(
        output_text(&refused).contains("binfmt"),
        "{}",
        output_text(&refused)
    );
    assert!(
        !lab.container_dir("a64").exists(),
        "a refused run leaves no container"
    );

    binfmt.register_all();
    let refused = lab.flotilla(&[
        "--platform",
        "linux/arm64",
        "run",
        &lab.image,
        "--name",
        "a64",
        "--",
        "-c",
        "busybox uname -m",
    ]);
    assert!(!refused.status.success(), "{}", output_text(&refused));
    assert!(
        output_text(&refused).contains("--allow-emulation"),
        "{}",
        output_text(&refused)
    );

    let out = lab.flotilla(&[
        "--platform",
        "linux/arm64",
        "run",
        &lab.image,
        "--name",
        "a64",
        "--allow-emulation",
        "--",
        "-c",
        "busybox uname -m",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("aarch64"),
        "{}",
        output_text(&out)
    );
    assert!(lab.ok(&["ps", "-a"]).contains("emulated"));

    let out = lab.flotilla(&[
        "--platform",
        "linux/arm/v6",
        "run",
        &lab.image,
        "--name",
        "v6",
        "--allow-emulation",
        "--",
        "-c",
        "busybox uname -m",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("armv"),
        "{}",
        output_text(&out)
    );

    // An image labelled arm/v7 whose shell is ARMv5 code (armel busybox) but which carries one armhf program, run on
    // a Pi Zero's CPU (qemu takes QEMU_CPU from the container's environment): the program's ARMv7 instructions kill
    // it with SIGILL, the shell exits 132, and the run is recorded as the wrong variant with the host's evidence.
    // (The armhf busybox cannot be the container's init here: qemu as PID 1 cannot deliver SIGILL to itself.)
    let mixed = OciLayoutBuilder::new(&lab.state.with_file_name("mixed"));
    let armel = busybox_images().expect("checked")[3].busybox.clone();
    let armhf = busybox_images().expect("checked")[2].busybox.clone();
    mixed.write_with_files(
        "v7",
        &[common::registry::LayoutImage {
            os: "linux",
            architecture: "arm",
            variant: Some("v7"),
            busybox: armel,
        }],
        &[vec![("bin/busybox-v7", armhf)]],
    );
    let image = format!("oci:{}:v7", mixed.dir().display());
    let out = lab.flotilla(&[
        "--platform",
        "linux/arm/v7",
        "run",
        &image,
        "--name",
        "v7-on-v6",
        "--allow-emulation",
        "--env",
        "QEMU_CPU=arm1176",
        "--",
        "-c",
        "busybox-v7 true; exit $?",
    ]);
    assert_eq!(out.status.code(), Some(132), "{}", output_text(&out));
    let c = lab.container("v7-on-v6");
    assert!(c["wrong_architecture"]["evidence"].is_string(), "{c}");
    drop(binfmt);
}

#[test]
fn gc_keeps_the_layers_of_existing_containers() {
    let Some(lab) = Lab::new() else { return };
    lab.ok(&[
        "run",
        &lab.image,
        "--name",
        "keep",
        "--detach",
        "--",
        "-c",
        LONG_RUNNING,
    ]);
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(lab.container_dir("keep").join("container.json")).unwrap(),
    )
    .unwrap();
    let diff_id = spec["diff_ids"][0].as_str().unwrap().to_string();
    let snapshot = lab
        .state
        .join("snapshots/sha256")
        .join(diff_id.trim_start_matches("sha256:"));
    assert!(snapshot.is_dir(), "{}", snapshot.display());
    // A new build pulled under the same name: the running container's layer is no longer any image's.
    let rebuilt = OciLayoutBuilder::new(&lab.state.with_file_name("rebuilt"));
    let images = busybox_images().expect("checked");
    let extra: Vec<Vec<(&str, PathBuf)>> = images
        .iter()
        .map(|_| vec![("etc/release", images[0].busybox.clone())])
        .collect();
    rebuilt.write_with_files("v1", &images, &extra);
    lab.ok(&[
        "pull",
        "--unpack",
        &format!("oci:{}:v1", rebuilt.dir().display()),
    ]);
    lab.ok(&["gc"]);
    assert!(
        snapshot.is_dir(),
        "gc removed the layer of a running container"
    );
    lab.ok(&["stop", "keep"]);
    lab.ok(&["rm", "keep"]);
    lab.ok(&["gc"]);
    assert!(!snapshot.exists(), "without the container, the layer goes");
}

#[test]
fn a_health_check_sees_the_app_become_healthy_then_unhealthy() {
    let Some(lab) = Lab::new() else { return };
    // The app is ready after a moment, then loses its readiness: the probe (a command in the container) follows.
    lab.ok(&[
        "run", &lab.image, "--name", "probed", "--detach", "--health-cmd", "busybox test -e /ready",
        "--health-interval", "200ms", "--health-retries", "2", "--", "-c",
        "busybox sleep 1; busybox touch /ready; busybox sleep 3; busybox rm /ready; busybox sleep 1000",
    ]);
    wait_for("healthy", Duration::from_secs(30), || {
        lab.container("probed")["health"] == "healthy"
    });
    wait_for("unhealthy", Duration::from_secs(30), || {
        lab.container("probed")["health"] == "unhealthy"
    });
    assert_eq!(
        lab.container("probed")["state"],
        "running",
        "unhealthy is reported, not restarted"
    );
    lab.ok(&["rm", "--force", "probed"]);
}

/// Issue 15: the hardening opt-outs reach the bundle from the command line, each changing what it names, and a
/// private user namespace is refused before anything runs, saying why.
#[test]
fn security_options_on_the_command_line_reach_the_container() {
    let Some(lab) = Lab::new() else { return };
    let probe = "busybox unshare -U true; echo unshare=$?";
    let config = |name: &str| -> serde_json::Value {
        let path = lab.container_dir(name).join("bundle/config.json");
        serde_json::from_str(&std::fs::read_to_string(path).expect("config.json")).expect("json")
    };
    let caps = |c: &serde_json::Value| c["process"]["capabilities"]["bounding"].to_string();

    let out = lab.flotilla(&["run", &lab.image, "--name", "hardened", "--", "-c", probe]);
    assert!(
        output_text(&out).contains("unshare=1"),
        "{}",
        output_text(&out)
    );
    let c = config("hardened");
    assert_eq!(c["process"]["noNewPrivileges"], true, "{c}");
    assert_eq!(c["linux"]["seccomp"]["defaultErrnoRet"], 1, "{c}");
    assert!(!caps(&c).contains("CAP_NET_RAW"), "{c}");

    let out = lab.flotilla(&[
        "run",
        &lab.image,
        "--name",
        "opted-out",
        "--cap-add",
        "NET_RAW",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "no-new-privileges=false",
        "--",
        "-c",
        probe,
    ]);
    assert!(
        output_text(&out).contains("unshare=0"),
        "{}",
        output_text(&out)
    );
    let c = config("opted-out");
    assert_eq!(c["process"]["noNewPrivileges"], false, "{c}");
    assert!(c["linux"].get("seccomp").is_none(), "{c}");
    assert!(caps(&c).contains("CAP_NET_RAW"), "{c}");

    let out = lab.flotilla(&[
        "run",
        &lab.image,
        "--name",
        "bad-cap",
        "--cap-add",
        "CAP_NET_RAW",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("without CAP_"),
        "{}",
        output_text(&out)
    );

    let out = lab.flotilla(&[
        "run", &lab.image, "--name", "userns", "--userns", "auto", "--", "-c", "true",
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("runc 1.1"),
        "{}",
        output_text(&out)
    );
    assert!(
        !lab.container_dir("userns").exists(),
        "a refused run leaves no container"
    );
}
