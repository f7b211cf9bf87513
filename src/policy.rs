//! The device owner's policy (`[policy]` in config.toml): what the fleet server may order this device to run.
//!
//! The agent checks every release the server sends against it before preparing it, so a refused release stops
//! nothing: the old one keeps running, and the report names the setting that refused it (failure cause
//! `policy`). The command line is not held to it: whoever runs `flotilla run` as root on the device is its owner.
//!
//! Paths are judged where they lead on the host, not as written: a bind of `/srv/data/link` whose link points at
//! `/etc` is a bind of `/etc`. Devices are judged as written (so `/dev/serial/by-id/*` can be allowed), and must
//! lead to a node under `/dev`.

use std::path::{Path, PathBuf};

use glob::{MatchOptions, Pattern};

use crate::app::{Network, RunSettings, SeccompMode, VolumeSource};
use crate::config::PolicyConfig;

/// A release the policy refuses: the `[policy]` key that refused it and what it refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "the device's [policy] {setting} does not allow {what}; only the device owner can allow it, in the \
         agent's config.toml"
    )]
    Refused { setting: &'static str, what: String },
    #[error(
        "the device's [policy] {setting} has the pattern {pattern:?}, which is not a glob: {reason}"
    )]
    Pattern {
        setting: &'static str,
        pattern: String,
        reason: String,
    },
}

impl PolicyError {
    /// The `[policy]` key involved, for the report.
    pub fn setting(&self) -> &'static str {
        match self {
            PolicyError::Refused { setting, .. } | PolicyError::Pattern { setting, .. } => setting,
        }
    }
}

/// Where host paths lead: the filesystem in the agent, a table in tests.
pub trait HostPaths {
    fn canonical(&self, path: &Path) -> std::io::Result<PathBuf>;
}

pub struct RealPaths;

impl HostPaths for RealPaths {
    fn canonical(&self, path: &Path) -> std::io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }
}

/// Whether the policy allows running `settings` from an image of `registry`. `volumes_dir` is flotilla's own
/// directory of named volumes, which binds may always use.
pub fn admit(
    policy: &PolicyConfig,
    registry: &str,
    settings: &RunSettings,
    volumes_dir: &Path,
    paths: &dyn HostPaths,
) -> Result<(), PolicyError> {
    // Separators are literal: `/dev/*` must not reach into `/dev/bus/usb/001`.
    let paths_only = MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    if !any_match(
        "registries",
        &policy.registries,
        registry,
        MatchOptions::new(),
    )? {
        return Err(refused(
            "registries",
            format!("images from the registry {registry}"),
        ));
    }
    if settings.network == Network::Host && !policy.host_network {
        return Err(refused(
            "host_network",
            "the host's network (network = host)".into(),
        ));
    }
    for cap in &settings.cap_add {
        if !any_match(
            "capabilities",
            &policy.capabilities,
            cap,
            MatchOptions::new(),
        )? {
            return Err(refused(
                "capabilities",
                format!("adding the capability {cap}"),
            ));
        }
    }
    if settings.seccomp == SeccompMode::Unconfined && !policy.seccomp_unconfined {
        return Err(refused(
            "seccomp_unconfined",
            "running without the seccomp profile".into(),
        ));
    }
    if settings.allow_new_privileges && !policy.new_privileges {
        return Err(refused(
            "new_privileges",
            "turning no_new_privileges off".into(),
        ));
    }
    for device in &settings.devices {
        let written = device.to_string_lossy();
        let leads_to_dev = paths
            .canonical(device)
            .is_ok_and(|c| c.starts_with("/dev/") && c != Path::new("/dev/"));
        if !leads_to_dev || !any_match("devices", &policy.devices, &written, paths_only)? {
            return Err(refused("devices", format!("the device {written}")));
        }
    }
    let volumes_dir = paths
        .canonical(volumes_dir)
        .unwrap_or_else(|_| volumes_dir.to_path_buf());
    for v in &settings.volumes {
        let VolumeSource::Bind(source) = &v.source else {
            continue;
        };
        let what = || format!("a bind mount of {}", source.display());
        // A source that does not exist cannot be judged by where it leads; runc would refuse it anyway.
        let host = paths
            .canonical(source)
            .map_err(|_| refused("bind_paths", what()))?;
        if host.starts_with(&volumes_dir) {
            continue;
        }
        let mut allowed = false;
        for dir in host.ancestors() {
            if any_match(
                "bind_paths",
                &policy.bind_paths,
                &dir.to_string_lossy(),
                paths_only,
            )? {
                allowed = true;
                break;
            }
        }
        if !allowed {
            let shown = if host == *source {
                what()
            } else {
                format!("{} (it leads to {})", what(), host.display())
            };
            return Err(refused("bind_paths", shown));
        }
    }
    Ok(())
}

fn refused(setting: &'static str, what: String) -> PolicyError {
    PolicyError::Refused { setting, what }
}

fn any_match(
    setting: &'static str,
    patterns: &[String],
    text: &str,
    options: MatchOptions,
) -> Result<bool, PolicyError> {
    for p in patterns {
        let pattern = Pattern::new(p).map_err(|e| PolicyError::Pattern {
            setting,
            pattern: p.clone(),
            reason: e.msg.to_string(),
        })?;
        if pattern.matches_with(text, options) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A host where a few paths are links.
    struct Links(BTreeMap<&'static str, &'static str>);

    impl HostPaths for Links {
        fn canonical(&self, path: &Path) -> std::io::Result<PathBuf> {
            let p = path.to_string_lossy();
            match self.0.get(p.as_ref()) {
                Some(target) => Ok(PathBuf::from(target)),
                None if p.contains("missing") => Err(std::io::ErrorKind::NotFound.into()),
                None => Ok(path.to_path_buf()),
            }
        }
    }

    fn host() -> Links {
        Links(BTreeMap::from([
            ("/srv/data/link", "/etc"),
            ("/dev/serial/by-id/usb-FTDI", "/dev/ttyUSB0"),
            ("/dev/sneaky", "/etc/shadow"),
        ]))
    }

    const VOLUMES: &str = "/var/lib/flotilla/volumes";

    fn check(
        policy: &PolicyConfig,
        registry: &str,
        settings: &RunSettings,
    ) -> Result<(), &'static str> {
        admit(policy, registry, settings, Path::new(VOLUMES), &host()).map_err(|e| e.setting())
    }

    fn with(f: impl FnOnce(&mut RunSettings)) -> RunSettings {
        let mut s = RunSettings::new();
        f(&mut s);
        s
    }

    #[test]
    fn the_default_policy_allows_plain_apps_and_named_volumes_only() {
        let p = PolicyConfig::default();
        let plain = with(|s| s.volumes.push("data:/data".parse().unwrap()));
        assert_eq!(check(&p, "registry.local:5000", &plain), Ok(()));
        let own = with(|s| {
            s.volumes
                .push(format!("{VOLUMES}/shared:/shared").parse().unwrap())
        });
        assert_eq!(check(&p, "docker.io", &own), Ok(()));
        for (settings, key) in [
            (with(|s| s.devices.push("/dev/mem".into())), "devices"),
            (
                with(|s| s.volumes.push("/:/host".parse().unwrap())),
                "bind_paths",
            ),
            (
                with(|s| s.volumes.push("/etc:/etc:ro".parse().unwrap())),
                "bind_paths",
            ),
            (with(|s| s.cap_add.push("NET_RAW".into())), "capabilities"),
            (
                with(|s| s.seccomp = SeccompMode::Unconfined),
                "seccomp_unconfined",
            ),
            (with(|s| s.allow_new_privileges = true), "new_privileges"),
        ] {
            assert_eq!(check(&p, "docker.io", &settings), Err(key), "{settings:?}");
        }
    }

    #[test]
    fn globs_allow_what_they_name_and_paths_are_judged_where_they_lead() {
        let p = PolicyConfig {
            devices: vec![
                "/dev/i2c-*".into(),
                "/dev/serial/by-id/*".into(),
                "/dev/sneaky".into(),
            ],
            bind_paths: vec!["/srv/data".into(), "/run/dbus/system_bus_socket".into()],
            host_network: false,
            registries: vec!["registry.local:*".into(), "*.example.com".into()],
            capabilities: vec!["NET_RAW".into(), "SYS_TI*".into()],
            seccomp_unconfined: true,
            new_privileges: true,
        };
        let run = |f: fn(&mut RunSettings)| {
            with(|s| {
                s.network = Network::None;
                f(s)
            })
        };
        let ok = [
            run(|s| s.devices.push("/dev/i2c-1".into())),
            run(|s| s.devices.push("/dev/serial/by-id/usb-FTDI".into())),
            run(|s| s.volumes.push("/srv/data:/data".parse().unwrap())),
            run(|s| s.volumes.push("/srv/data/in/deep:/in".parse().unwrap())),
            run(|s| {
                s.volumes.push(
                    "/run/dbus/system_bus_socket:/run/dbus/system_bus_socket"
                        .parse()
                        .unwrap(),
                )
            }),
            run(|s| s.cap_add = vec!["NET_RAW".into(), "SYS_TIME".into()]),
            run(|s| s.seccomp = SeccompMode::Unconfined),
            run(|s| s.allow_new_privileges = true),
        ];
        for s in ok {
            assert_eq!(check(&p, "registry.local:5000", &s), Ok(()), "{s:?}");
        }
        let refused = [
            (
                run(|s| s.devices.push("/dev/i2c-1/../mem".into())),
                "devices",
            ),
            (run(|s| s.devices.push("/dev/sneaky".into())), "devices"),
            (
                run(|s| s.devices.push("/dev/bus/usb/001/002".into())),
                "devices",
            ),
            (
                run(|s| s.volumes.push("/srv/data/link:/x".parse().unwrap())),
                "bind_paths",
            ),
            (
                run(|s| s.volumes.push("/srv/database:/x".parse().unwrap())),
                "bind_paths",
            ),
            (
                run(|s| s.volumes.push("/srv/data/missing:/x".parse().unwrap())),
                "bind_paths",
            ),
            (with(|_| {}), "host_network"),
            (run(|s| s.cap_add.push("SYS_ADMIN".into())), "capabilities"),
        ];
        for (s, key) in refused {
            assert_eq!(check(&p, "registry.local:5000", &s), Err(key), "{s:?}");
        }
        let plain = run(|_| {});
        assert_eq!(check(&p, "cdn.example.com", &plain), Ok(()));
        assert_eq!(check(&p, "docker.io", &plain), Err("registries"));
        assert_eq!(check(&p, "registry.local", &plain), Err("registries"));
    }

    #[test]
    fn a_pattern_that_is_not_a_glob_refuses_rather_than_allows() {
        let p = PolicyConfig {
            registries: vec!["[".into()],
            ..PolicyConfig::default()
        };
        let err = admit(
            &p,
            "docker.io",
            &RunSettings::new(),
            Path::new(VOLUMES),
            &host(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::Pattern {
                    setting: "registries",
                    ..
                }
            ),
            "{err}"
        );
    }
}
