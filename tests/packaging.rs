//! The Debian package and the configuration it ships: the default configuration must be accepted by the schema
//! and name every key, and `packaging/deb` must produce a package that dpkg installs with the right files, modes,
//! owners and a conffile that survives an upgrade after a local edit.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use flotilla::config::{
    Config, FleetConfig, PolicyConfig, PullConfig, RegistryConfig, RunConfig, SignaturePolicyConfig,
};

mod common;

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn shipped_config() -> String {
    let path = crate_root().join("packaging/config.toml");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A missing tool or privilege fails the test under `FLOTILLA_REQUIRE_ALL=1` (CI) and skips it otherwise.
/// Skips, or fails under `FLOTILLA_REQUIRE_ALL=1`, naming what is missing.
fn unavailable(what: &str) {
    common::require::<()>(what, None);
}

fn have_tool(tool: &str) -> bool {
    common::tool(tool).is_some()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn shipped_config_changes_no_default() {
    let config = Config::parse(&shipped_config(), Path::new("packaging/config.toml")).unwrap();
    assert_eq!(config, Config::default());
}

/// Enabling every example setting (`# key = ...` lines; `##` lines are prose) must give a configuration the schema
/// accepts with every key set, so the shipped file documents exactly the keys `src/config.rs` knows.
#[test]
fn shipped_config_examples_name_every_key() {
    let enabled: String = shipped_config()
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting) => setting,
            None => line,
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let config = Config::parse(
        &enabled,
        Path::new("packaging/config.toml (examples enabled)"),
    )
    .unwrap_or_else(|e| panic!("{}", flotilla::error_chain(&e)));

    // Destructured without `..`: a field added to the schema breaks this test until the shipped file names it.
    let Config {
        state_dir,
        platform,
        ca_bundle,
        docker_config,
        pull,
        run,
        fleet,
        policy,
        registries,
        signature_policies,
    } = config;
    let PolicyConfig {
        devices,
        bind_paths,
        host_network: _,
        registries: allowed_registries,
        capabilities,
        seccomp_unconfined: _,
        new_privileges: _,
    } = policy;
    assert!(!devices.is_empty() && !bind_paths.is_empty() && !allowed_registries.is_empty());
    assert!(!capabilities.is_empty());
    for key in ["host_network", "seccomp_unconfined", "new_privileges"] {
        assert!(enabled.contains(&format!("\n{key} =")), "{key}");
    }
    let FleetConfig {
        server,
        insecure,
        token_file: _,
        name,
        tags,
        poll_interval: _,
        probation: _,
        heartbeat_interval: _,
    } = fleet;
    assert!(server.is_some() && insecure && name.is_some() && !tags.is_empty());
    for key in [
        "token_file",
        "poll_interval",
        "probation",
        "heartbeat_interval",
    ] {
        assert!(enabled.contains(&format!("\n{key} =")), "{key}");
    }
    let RunConfig {
        runtime: _,
        allow_emulation: _,
    } = run;
    assert!(enabled.contains("\nruntime =") && enabled.contains("\nallow_emulation ="));
    assert!(
        state_dir.is_some() && platform.is_some() && ca_bundle.is_some() && docker_config.is_some()
    );
    let PullConfig {
        parallel_layers: _,
        retries: _,
        max_bytes_per_second,
    } = pull;
    assert!(max_bytes_per_second.is_some());
    assert!(enabled.contains("\nparallel_layers =") && enabled.contains("\nretries ="));

    let [registry] = registries.as_slice() else {
        panic!("expected one [[registry]] example, got {registries:?}");
    };
    let RegistryConfig {
        host,
        insecure: _,
        mirrors,
        ca_bundle,
        username,
        password,
        password_file,
    } = registry;
    assert!(!host.is_empty() && !mirrors.is_empty());
    assert!(
        ca_bundle.is_some() && username.is_some() && password.is_some() && password_file.is_some()
    );
    assert!(enabled.contains("\ninsecure ="));

    let [policy] = signature_policies.as_slice() else {
        panic!("expected one [[signature_policy]] example, got {signature_policies:?}");
    };
    let SignaturePolicyConfig {
        scope,
        mode: _,
        public_keys,
    } = policy;
    assert!(!scope.is_empty() && !public_keys.is_empty());
    assert!(enabled.contains("\nmode ="));
}

/// The Debian architecture of this machine, whose own debug binary stands in for the release build: the test is
/// about the package, and a release build takes minutes.
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
    let deb = out.join(format!("flotilla_{version}_{arch}.deb"));
    assert!(deb.is_file(), "{} was not made", deb.display());
    deb
}

fn dpkg_install(root: &Path, deb: &Path) {
    // runc is not in the scratch root; the dependency itself is checked through dpkg-query below. The scratch root
    // has no shell to chroot into for the maintainer scripts: they run here, with DPKG_ROOT naming the root.
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--log=/dev/null",
            "--force-depends",
            "--force-script-chrootless",
        ])
        .arg("--install")
        .arg(deb));
}

fn query(root: &Path, field: &str) -> String {
    let out = run(Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["--show", &format!("--showformat=${{{field}}}"), "flotilla"]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_entry(root: &Path, path: &str, mode: u32, dir: bool) {
    let meta = fs::symlink_metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(meta.is_dir(), dir, "{path}: directory expected: {dir}");
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        mode,
        "{path}: mode {:o}",
        meta.mode()
    );
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path}: not root:root");
}

#[test]
fn deb_installs_and_keeps_an_edited_conffile_on_upgrade() {
    let Some(arch) = host_deb_arch() else {
        return unavailable("no Debian package architecture for this host");
    };
    for tool in ["dpkg", "dpkg-deb", "dpkg-query", "file", "md5sum"] {
        if !have_tool(tool) {
            return unavailable(&format!("{tool} not installed"));
        }
    }
    // dpkg can only give files to root:root when it runs as root.
    let uid = run(Command::new("id").arg("-u")).stdout;
    if String::from_utf8_lossy(&uid).trim() != "0" {
        return unavailable("installing into a scratch root needs root");
    }

    let tmp = tempfile::tempdir().unwrap();
    let debs = tmp.path().join("debs");
    let root = tmp.path().join("root");
    for dir in ["var/lib/dpkg/updates", "var/lib/dpkg/info"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    for file in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        fs::write(root.join(file), "").unwrap();
    }

    let first = build_deb(&debs, arch, "0.1.0-1");
    dpkg_install(&root, &first);

    assert_entry(&root, "usr/bin/flotilla", 0o755, false);
    assert_eq!(
        fs::read(root.join("usr/bin/flotilla")).unwrap(),
        fs::read(env!("CARGO_BIN_EXE_flotilla")).unwrap()
    );
    assert_entry(&root, "etc/flotilla/config.toml", 0o644, false);
    assert_eq!(
        fs::read_to_string(root.join("etc/flotilla/config.toml")).unwrap(),
        shipped_config()
    );
    assert_entry(&root, "var/lib/flotilla", 0o750, true);
    for doc in [
        "usr/share/doc/flotilla/copyright",
        "usr/share/doc/flotilla/changelog.Debian.gz",
        "usr/share/man/man1/flotilla.1.gz",
        "usr/share/lintian/overrides/flotilla",
    ] {
        assert_entry(&root, doc, 0o644, false);
    }
    assert_eq!(query(&root, "Depends"), "runc");
    assert_eq!(query(&root, "Architecture"), arch);
    let conffiles = query(&root, "Conffiles");
    assert!(
        conffiles
            .trim_start()
            .starts_with("/etc/flotilla/config.toml "),
        "config.toml is not a registered conffile: {conffiles:?}"
    );

    let edited = format!("{}\nstate_dir = \"/srv/flotilla\"\n", shipped_config());
    fs::write(root.join("etc/flotilla/config.toml"), &edited).unwrap();
    let second = build_deb(&debs, arch, "0.1.0-2");
    dpkg_install(&root, &second);
    assert_eq!(query(&root, "Version"), "0.1.0-2");
    assert_eq!(
        fs::read_to_string(root.join("etc/flotilla/config.toml")).unwrap(),
        edited,
        "the upgrade replaced the locally edited configuration"
    );
}

#[test]
fn deb_refuses_a_binary_of_another_architecture() {
    let Some(arch) = host_deb_arch() else {
        return unavailable("no Debian package architecture for this host");
    };
    if !have_tool("file") {
        return unavailable("file not installed");
    }
    let other = if arch == "amd64" { "arm64" } else { "amd64" };
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(crate_root().join("packaging/deb"))
        .args(["--binary", env!("CARGO_BIN_EXE_flotilla"), "--out"])
        .arg(tmp.path())
        .arg(other)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "packaged a host binary as {other}");
    assert!(
        stderr.contains(&format!("is not a {other} binary")),
        "{stderr}"
    );
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// `build.rs` names the commit and target; the commit must follow HEAD (its rerun-if-changed paths), or a device's
/// `--version` would name a stale commit.
#[test]
fn version_names_commit_and_target() {
    let out = run(Command::new(env!("CARGO_BIN_EXE_flotilla")).arg("--version"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let inner = stdout
        .trim_end()
        .strip_prefix(&format!("flotilla {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version output {stdout:?}"));
    let (commit, target) = inner
        .split_once(", ")
        .unwrap_or_else(|| panic!("no commit and target in {stdout:?}"));
    assert!(
        target.starts_with(&format!("{}-", std::env::consts::ARCH)) && target.contains("-linux-"),
        "target {target:?} is not this host's"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(crate_root())
        .output();
    match head {
        Ok(h) if h.status.success() && std::env::var_os("FLOTILLA_GIT_COMMIT").is_none() => {
            assert_eq!(commit, String::from_utf8_lossy(&h.stdout).trim());
        }
        _ => assert!(
            !commit.is_empty() && !commit.contains(' '),
            "commit {commit:?}"
        ),
    }
}
