//! The runtime bundle's `config.json`: what containerd would give the image by default, plus the app's settings.
//!
//! Everything is built explicitly with oci-spec's builders. `Spec::default()` is runc's demo configuration (a
//! terminal, `sh`, a fixed hostname), and a field we forgot to set must show up as missing in the snapshot test
//! (`tests/fixtures/bundle/`) rather than as a demo value.
//!
//! [`spec`] is pure: it takes the image configuration, the settings and what [`prepare`] read from the host and the
//! image (the resolved user, the passed-through devices' numbers, the kernel's architecture). [`write`] puts the
//! result in the bundle.
//!
//! Hardening, each with a per-app opt-out: Docker's default capabilities less `NET_RAW` (`cap_add`), the seccomp
//! profile of [`super::seccomp`] (`seccomp = unconfined`), and `no_new_privileges` (`allow_new_privileges`).
//!
//! A private user namespace (`userns = auto`) is refused, for now. Measured on Linux 6.18 with runc 1.1.5:
//! - Over flotilla's root as it is (an overlay of layer snapshots owned by host root), a container root in its own
//!   user namespace sees every file as nobody's and cannot write (`touch /etc/x`: permission denied); runc cannot
//!   even make `/proc` in an image without one.
//! - runc 1.1 cannot idmap a mount (`runc features` lists no idmap; runc 1.2 can).
//! - Linux refuses to idmap the overlay mount itself (`mount_setattr` with `MOUNT_ATTR_IDMAP`: EINVAL), and an
//!   overlay whose upper directory sits on an idmapped mount comes up read-only.
//! - What works: every layer snapshot idmapped (host 0 to the container's range) as the overlay's lower layers,
//!   over a plain upper directory owned by the range's first id; the container's root then writes as root. That
//!   needs Linux 5.19 or newer (Raspberry Pi OS bullseye's 5.15 and Jetson's 5.10 lack it), idmapped mounts made
//!   and removed by flotilla itself on every start, adoption and `rm`, a range kept per app for its named
//!   volumes; and it still leaves passed-through devices and ports below 1024 on the host's network out of the
//!   container root's reach. That is the way to build it; until then the setting is refused, not half done.
//! - Shifting the owner of every file instead copies each one up (9 MiB Debian root: 1.3 s and 9.5 MiB, or 0.1 s
//!   and 2.3 MiB with overlayfs `metacopy=on`), and drops setuid bits and file capabilities.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDevice,
    LinuxDeviceBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use super::user::{self, EtcFiles, ResolvedUser, UserError};
use crate::app::{Network, RunSettings, SeccompMode, UsernsMode, VolumeSource};
use crate::oci::ImageConfig;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(
        "the image has neither an Entrypoint nor a Cmd: give the command to run after the image name"
    )]
    NoCommand,
    #[error("{0}")]
    User(#[from] UserError),
    #[error(
        "--device {path}: it is not a character or block device on this host; give the device node's path, \
         such as /dev/i2c-1"
    )]
    NotADevice { path: PathBuf },
    #[error("--device {path}: cannot read it on this host; check the path exists (ls -l {path})")]
    Device { path: PathBuf, source: io::Error },
    #[error("cannot make the volume directory {path}")]
    Volume { path: PathBuf, source: io::Error },
    #[error("building the runtime configuration: {0}")]
    Spec(#[from] OciSpecError),
    #[error("{0}")]
    Seccomp(#[from] super::seccomp::SeccompError),
    #[error(
        "--cap-add {0}: this build of flotilla does not know that capability; use one of `flotilla run --help`"
    )]
    Capability(String),
    #[error(
        "userns auto: a private user namespace is not available yet. The container's root belongs to host root, \
         which is nobody (and cannot write) inside one; runc 1.1 cannot idmap it, and flotilla does not yet idmap \
         each image layer itself (Linux 5.19 or newer). Run the app with userns host (the default): seccomp, the \
         reduced capabilities and no_new_privileges still hold"
    )]
    UserNamespace,
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        source: crate::durable::DurableError,
    },
}

/// The container a bundle is for.
#[derive(Debug, Clone, Copy)]
pub struct Container<'a> {
    /// The container's name: its hostname unless the settings give one, and its cgroup's name.
    pub name: &'a str,
    /// The state directory's instance id (see [`crate::supervise::container::instance_id`]): the container's
    /// cgroup sits under it, so two state directories on one host never share a cgroup.
    pub instance: &'a str,
    pub image: &'a ImageConfig,
    pub settings: &'a RunSettings,
    pub rootfs: &'a Path,
    /// `<state_dir>/volumes`: the named volume `NAME` is the directory `NAME` in it.
    pub volumes_dir: &'a Path,
}

/// What [`spec`] needs from outside the settings, read by [`prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub user: ResolvedUser,
    /// In the order of `settings.devices`.
    pub devices: Vec<HostDevice>,
    /// The kernel's `uname -m` (`x86_64`, `aarch64`, `armv7l`): the seccomp filter's architectures follow it.
    pub kernel_machine: String,
}

/// A host device node, as the container gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    /// The path inside the container.
    pub path: PathBuf,
    pub kind: DeviceKind,
    pub major: i64,
    pub minor: i64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Char,
    Block,
}

/// Reads the device node at `path` on this host, for passing it through at the same path.
pub fn host_device(path: &Path) -> Result<HostDevice, BundleError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|source| BundleError::Device {
        path: path.to_path_buf(),
        source,
    })?;
    let kind = if meta.file_type().is_char_device() {
        DeviceKind::Char
    } else if meta.file_type().is_block_device() {
        DeviceKind::Block
    } else {
        return Err(BundleError::NotADevice {
            path: path.to_path_buf(),
        });
    };
    Ok(HostDevice {
        path: path.to_path_buf(),
        kind,
        major: i64::from(rustix::fs::major(meta.rdev())),
        minor: i64::from(rustix::fs::minor(meta.rdev())),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

/// The I/O before [`spec`]: resolves the user in the image's `/etc` files, reads the devices' numbers, and makes
/// the named volumes' directories.
pub fn prepare(c: &Container) -> Result<Resolved, BundleError> {
    // The settings' user wins over the image's USER, as `docker run --user` does.
    let image_user = c
        .image
        .config
        .as_ref()
        .and_then(|e| e.user.as_deref())
        .filter(|u| !u.is_empty());
    let user = match c.settings.user.as_deref().or(image_user) {
        Some(spec) => user::resolve(spec, &EtcFiles::read(c.rootfs)?)?,
        None => ResolvedUser::ROOT,
    };
    let devices = c
        .settings
        .devices
        .iter()
        .map(|p| host_device(p))
        .collect::<Result<_, _>>()?;
    for v in &c.settings.volumes {
        if let VolumeSource::Named(name) = &v.source {
            let path = c.volumes_dir.join(name);
            std::fs::create_dir_all(&path)
                .map_err(|source| BundleError::Volume { path, source })?;
        }
    }
    let kernel_machine = rustix::system::uname()
        .machine()
        .to_string_lossy()
        .into_owned();
    Ok(Resolved {
        user,
        devices,
        kernel_machine,
    })
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's and containerd's default capabilities, less `NET_RAW`: with the host's network (the default), a raw
/// socket sees and forges the host's traffic. Ping needs it unless the host's `net.ipv4.ping_group_range` lets
/// root use ping sockets; `cap_add = ["NET_RAW"]` gives it back.
pub(super) const CAPABILITIES: [Capability; 13] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// containerd's masked paths: kernel information a container should not read.
const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];

const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// containerd's default allowed character devices (major, minor; `None` is every minor): null, random, full, tty,
/// zero, urandom, console, the pts slaves, ptmx, tun.
const ALLOWED_CHAR_DEVICES: [(i64, Option<i64>); 10] = [
    (1, Some(3)),
    (1, Some(8)),
    (1, Some(7)),
    (5, Some(0)),
    (1, Some(5)),
    (1, Some(9)),
    (5, Some(1)),
    (136, None),
    (5, Some(2)),
    (10, Some(200)),
];

/// The container's cgroup, under one `flotilla` parent so the agent's containers are found (and limited) together,
/// and under its state directory's instance: names are unique only within one state directory, and a shared cgroup
/// let one instance's `runc kill --all` kill another's container of the same name.
pub fn cgroups_path(instance: &str, name: &str) -> String {
    format!("/flotilla/{instance}/{name}")
}

/// The runtime configuration for `c`. Pure: `r` carries everything read from the host and the image.
pub fn spec(c: &Container, r: &Resolved) -> Result<Spec, BundleError> {
    let s = c.settings;
    let exec = c.image.config.clone().unwrap_or_default();
    let mut args = exec.entrypoint.unwrap_or_default();
    if s.command.is_empty() {
        args.extend(exec.cmd.unwrap_or_default());
    } else {
        args.extend(s.command.iter().cloned());
    }
    if args.is_empty() {
        return Err(BundleError::NoCommand);
    }
    if s.userns == UsernsMode::Auto {
        return Err(BundleError::UserNamespace);
    }

    let mut caps: HashSet<Capability> = CAPABILITIES.into_iter().collect();
    for name in &s.cap_add {
        let cap = name
            .parse::<Capability>()
            .map_err(|_| BundleError::Capability(name.clone()))?;
        caps.insert(cap);
    }
    let seccomp = match s.seccomp {
        SeccompMode::Default => Some(super::seccomp::default_profile(&caps, &r.kernel_machine)?),
        SeccompMode::Unconfined => None,
    };
    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()?;
    // The builder fills unset sets from runc's demo defaults; Docker gives no inheritable or ambient capabilities.
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);
    let mut user = UserBuilder::default().uid(r.user.uid).gid(r.user.gid);
    if !r.user.additional_gids.is_empty() {
        user = user.additional_gids(r.user.additional_gids.clone());
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user.build()?)
        .args(args)
        .env(environment(exec.env.as_deref().unwrap_or_default(), &s.env))
        .cwd(
            exec.working_dir
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".to_string()),
        )
        .capabilities(capabilities)
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .hard(1024u64)
                .soft(1024u64)
                .build()?,
        ])
        .no_new_privileges(!s.allow_new_privileges)
        .build()?;

    let mut mounts = default_mounts()?;
    for v in &s.volumes {
        let source = match &v.source {
            VolumeSource::Named(name) => c.volumes_dir.join(name),
            VolumeSource::Bind(path) => path.clone(),
        };
        let mut options = vec!["rbind".to_string()];
        if v.read_only {
            options.push("ro".to_string());
        }
        mounts.push(
            MountBuilder::default()
                .destination(&v.target)
                .typ("bind")
                .source(source)
                .options(options)
                .build()?,
        );
    }

    let mut namespaces = vec![
        namespace(LinuxNamespaceType::Pid)?,
        namespace(LinuxNamespaceType::Ipc)?,
        // Also with the host's network: a private UTS namespace is what lets the hostname be set.
        namespace(LinuxNamespaceType::Uts)?,
        namespace(LinuxNamespaceType::Mount)?,
        namespace(LinuxNamespaceType::Cgroup)?,
    ];
    if s.network == Network::None {
        namespaces.push(namespace(LinuxNamespaceType::Network)?);
    }

    let mut device_rules = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()?,
    ];
    for (major, minor) in ALLOWED_CHAR_DEVICES {
        device_rules.push(device_rule(LinuxDeviceType::C, major, minor)?);
    }
    let mut devices: Vec<LinuxDevice> = Vec::new();
    for d in &r.devices {
        let typ = match d.kind {
            DeviceKind::Char => LinuxDeviceType::C,
            DeviceKind::Block => LinuxDeviceType::B,
        };
        devices.push(
            LinuxDeviceBuilder::default()
                .path(&d.path)
                .typ(typ)
                .major(d.major)
                .minor(d.minor)
                .file_mode(d.mode)
                .uid(d.uid)
                .gid(d.gid)
                .build()?,
        );
        device_rules.push(device_rule(typ, d.major, Some(d.minor))?);
    }

    let mut resources = LinuxResourcesBuilder::default().devices(device_rules);
    if let Some(bytes) = s.memory {
        // Settings refuse sizes over what a u64 of bytes holds; the kernel's own ceiling is lower than i64's.
        let limit = i64::try_from(bytes).unwrap_or(i64::MAX);
        resources = resources.memory(LinuxMemoryBuilder::default().limit(limit).build()?);
    }
    if let Some(cpus) = s.cpus {
        // The kernel refuses a quota under 1 ms.
        let quota = ((cpus * CPU_PERIOD as f64).round() as i64).max(1000);
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD)
                .build()?,
        );
    }
    if let Some(pids) = s.pids {
        resources = resources.pids(LinuxPidsBuilder::default().limit(pids).build()?);
    }

    let mut linux = LinuxBuilder::default()
        .resources(resources.build()?)
        .cgroups_path(cgroups_path(c.instance, c.name))
        .namespaces(namespaces)
        .masked_paths(MASKED_PATHS.map(String::from).to_vec())
        .readonly_paths(READONLY_PATHS.map(String::from).to_vec());
    if !devices.is_empty() {
        linux = linux.devices(devices);
    }
    if let Some(seccomp) = seccomp {
        linux = linux.seccomp(seccomp);
    }

    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(c.rootfs)
                .readonly(s.read_only)
                .build()?,
        )
        .process(process)
        .hostname(s.hostname.clone().unwrap_or_else(|| c.name.to_string()))
        .mounts(mounts)
        .linux(linux.build()?)
        .build()?;
    // As with the capabilities: unset means the demo default (an empty map here), so clear it.
    spec.set_annotations(None);
    Ok(spec)
}

/// The CFS period the CPU quota is counted over, in microseconds (Docker's).
const CPU_PERIOD: u64 = 100_000;

/// The image's Env, each `NAME=VALUE` of the settings replacing the image's `NAME` in place or added after it,
/// and a default PATH when neither has one.
fn environment(image: &[String], settings: &[String]) -> Vec<String> {
    let name = |e: &str| e.split_once('=').map_or(e, |(n, _)| n).to_string();
    let mut env: Vec<String> = Vec::new();
    for e in image.iter().chain(settings) {
        match env.iter_mut().find(|x| name(x) == name(e)) {
            Some(slot) => *slot = e.clone(),
            None => env.push(e.clone()),
        }
    }
    if !env.iter().any(|e| name(e) == "PATH") {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    env
}

fn namespace(typ: LinuxNamespaceType) -> Result<LinuxNamespace, OciSpecError> {
    LinuxNamespaceBuilder::default().typ(typ).build()
}

fn device_rule(
    typ: LinuxDeviceType,
    major: i64,
    minor: Option<i64>,
) -> Result<LinuxDeviceCgroup, OciSpecError> {
    let rule = LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(typ)
        .major(major)
        .access("rwm");
    match minor {
        Some(minor) => rule.minor(minor).build(),
        None => rule.build(),
    }
}

/// containerd's default mounts.
fn default_mounts() -> Result<Vec<Mount>, OciSpecError> {
    let m = |destination: &str, typ: &str, source: &str, options: &[&str]| {
        MountBuilder::default()
            .destination(destination)
            .typ(typ)
            .source(source)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .build()
    };
    Ok(vec![
        m("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        m(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        m(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        m(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        m(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        m(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        m(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        m(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
    ])
}

/// `spec` as JSON with a stable order: object keys sorted, and the capability sets (hash sets in oci-spec) sorted,
/// so the same container always gets the same bytes and the snapshot test compares text.
pub fn to_json(spec: &Spec) -> Result<String, serde_json::Error> {
    let mut value = serde_json::to_value(spec)?;
    if let Some(caps) = value
        .pointer_mut("/process/capabilities")
        .and_then(|c| c.as_object_mut())
    {
        for set in caps.values_mut() {
            if let Some(list) = set.as_array_mut() {
                list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
        }
    }
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    Ok(text)
}

/// Writes `config.json` into `bundle_dir` atomically, so a crash never leaves runc half a configuration.
pub fn write(bundle_dir: &Path, spec: &Spec) -> Result<(), BundleError> {
    let path = bundle_dir.join("config.json");
    let text = to_json(spec).map_err(|e| BundleError::Spec(OciSpecError::SerDe(e)))?;
    crate::durable::write_atomic(bundle_dir, "config.json", text.as_bytes())
        .map_err(|source| BundleError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{Volume, parse_env};
    use crate::oci::ExecConfig;

    fn image() -> ImageConfig {
        ImageConfig {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: Some("v6".into()),
            config: Some(ExecConfig {
                entrypoint: Some(vec!["/usr/bin/sensor".into()]),
                cmd: Some(vec!["--interval".into(), "5".into()]),
                env: Some(vec![
                    "PATH=/usr/bin:/bin".into(),
                    "LOG_LEVEL=info".into(),
                    "TZ=UTC".into(),
                ]),
                working_dir: Some("/srv".into()),
                user: None,
            }),
            rootfs: None,
        }
    }

    const ROOTFS: &str = "/var/lib/flotilla/containers/sensor/rootfs";
    const VOLUMES: &str = "/var/lib/flotilla/volumes";

    fn container<'a>(image: &'a ImageConfig, settings: &'a RunSettings) -> Container<'a> {
        Container {
            name: "sensor",
            instance: "0123abcd",
            image,
            settings,
            rootfs: Path::new(ROOTFS),
            volumes_dir: Path::new(VOLUMES),
        }
    }

    fn edge_settings() -> RunSettings {
        let mut s = RunSettings::new();
        s.env = vec![
            parse_env("LOG_LEVEL=debug").unwrap(),
            "MQTT=broker.lan".into(),
        ];
        s.volumes = vec![
            "data:/var/lib/sensor".parse::<Volume>().unwrap(),
            "/etc/sensor:/etc/sensor:ro".parse().unwrap(),
        ];
        s.devices = vec!["/dev/i2c-1".into(), "/dev/mmcblk0".into()];
        s.read_only = true;
        s.memory = Some(64 << 20);
        s.cpus = Some(0.5);
        s.pids = Some(100);
        s.hostname = Some("greenhouse-3".into());
        s.network = Network::None;
        s.user = Some("sensor".into());
        s.command = vec!["--interval".into(), "1".into()];
        s
    }

    fn edge_resolved() -> Resolved {
        Resolved {
            user: ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![998],
            },
            kernel_machine: "aarch64".into(),
            devices: vec![
                HostDevice {
                    path: "/dev/i2c-1".into(),
                    kind: DeviceKind::Char,
                    major: 89,
                    minor: 1,
                    mode: 0o660,
                    uid: 0,
                    gid: 998,
                },
                HostDevice {
                    path: "/dev/mmcblk0".into(),
                    kind: DeviceKind::Block,
                    major: 179,
                    minor: 0,
                    mode: 0o660,
                    uid: 0,
                    gid: 6,
                },
            ],
        }
    }

    /// Compares `spec` with the checked-in `tests/fixtures/bundle/<name>.json`, or rewrites that file when
    /// `FLOTILLA_BLESS=1`. Only the rootfs path is normalised, so the fixture reads like a real config.json.
    fn snapshot(name: &str, spec: &Spec) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bundle")
            .join(format!("{name}.json"));
        let actual = to_json(spec).unwrap().replace(ROOTFS, "<rootfs>");
        if std::env::var("FLOTILLA_BLESS").as_deref() == Ok("1") {
            std::fs::write(&path, &actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with FLOTILLA_BLESS=1 to write it",
                path.display()
            )
        });
        if actual != expected {
            panic!(
                "{} differs from the generated config:\n{}\n\
                 If the change is intended, run with FLOTILLA_BLESS=1 and review the diff in git.",
                path.display(),
                first_difference(&expected, &actual)
            );
        }
    }

    /// The first differing line with the lines around it from both sides: enough to see an insertion, a removal
    /// or a changed value without a diff library.
    fn first_difference(expected: &str, actual: &str) -> String {
        let e: Vec<&str> = expected.lines().collect();
        let a: Vec<&str> = actual.lines().collect();
        let at = e
            .iter()
            .zip(&a)
            .position(|(x, y)| x != y)
            .unwrap_or(e.len().min(a.len()));
        let from = at.saturating_sub(3);
        let side = |lines: &[&str]| {
            lines
                .iter()
                .enumerate()
                .skip(from)
                .take(10)
                .map(|(i, l)| format!("{:>5}{} {l}", i + 1, if i == at { ">" } else { " " }))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "first difference at line {} ({} lines expected, {} generated)\n--- expected\n{}\n+++ generated\n{}",
            at + 1,
            e.len(),
            a.len(),
            side(&e),
            side(&a)
        )
    }

    #[test]
    fn default_bundle_matches_the_snapshot() {
        let image = image();
        let settings = RunSettings::new();
        let resolved = Resolved {
            user: ResolvedUser::ROOT,
            devices: Vec::new(),
            kernel_machine: "x86_64".into(),
        };
        snapshot(
            "default",
            &spec(&container(&image, &settings), &resolved).unwrap(),
        );
    }

    #[test]
    fn every_edge_setting_matches_the_snapshot() {
        let image = image();
        let settings = edge_settings();
        let spec = spec(&container(&image, &settings), &edge_resolved()).unwrap();
        snapshot("edge", &spec);
    }

    fn default_json(settings: &RunSettings) -> Result<serde_json::Value, BundleError> {
        let image = image();
        let resolved = Resolved {
            user: ResolvedUser::ROOT,
            devices: Vec::new(),
            kernel_machine: "armv7l".into(),
        };
        let spec = spec(&container(&image, settings), &resolved)?;
        Ok(serde_json::from_str(&to_json(&spec).unwrap()).unwrap())
    }

    /// The JSON pointers at which `a` and `b` differ: objects are compared key by key, anything else whole.
    fn differences(a: &serde_json::Value, b: &serde_json::Value, at: &str, out: &mut Vec<String>) {
        match (a.as_object(), b.as_object()) {
            (Some(x), Some(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let (l, r) = (x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null));
                    differences(l, r, &format!("{at}/{k}"), out);
                }
            }
            _ if a != b => out.push(at.to_string()),
            _ => {}
        }
    }

    #[test]
    fn hardened_by_default_and_each_opt_out_changes_only_what_it_names() {
        let base = default_json(&RunSettings::new()).unwrap();
        for set in ["bounding", "effective", "permitted"] {
            let caps = base["process"]["capabilities"][set].as_array().unwrap();
            assert_eq!(caps.len(), 13, "{set}");
            assert!(!caps.contains(&"CAP_NET_RAW".into()), "{set}");
        }
        assert_eq!(base["process"]["noNewPrivileges"], true);
        let seccomp = &base["linux"]["seccomp"];
        assert_eq!(seccomp["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(seccomp["defaultErrnoRet"], 1);
        assert_eq!(
            seccomp["architectures"],
            serde_json::json!(["SCMP_ARCH_ARM"])
        );
        let allowed = seccomp["syscalls"].to_string();
        assert!(allowed.contains("\"_llseek\"") && allowed.contains("\"set_tls\""));
        assert!(!allowed.contains("\"keyctl\"") && !allowed.contains("\"unshare\""));

        let changed = |edit: &dyn Fn(&mut RunSettings)| {
            let mut s = RunSettings::new();
            edit(&mut s);
            let mut out = Vec::new();
            differences(&base, &default_json(&s).unwrap(), "", &mut out);
            out
        };
        let caps = [
            "/process/capabilities/bounding",
            "/process/capabilities/effective",
            "/process/capabilities/permitted",
        ];
        assert_eq!(changed(&|s| s.cap_add = vec!["NET_RAW".into()]), caps);
        // A capability that gates syscalls opens them in the profile too.
        let mut with_filter = vec!["/linux/seccomp/syscalls"];
        with_filter.extend(caps);
        assert_eq!(
            changed(&|s| s.cap_add = vec!["SYS_PTRACE".into()]),
            with_filter
        );
        assert_eq!(
            changed(&|s| s.seccomp = SeccompMode::Unconfined),
            ["/linux/seccomp"]
        );
        assert_eq!(
            changed(&|s| s.allow_new_privileges = true),
            ["/process/noNewPrivileges"]
        );
        let mut s = RunSettings::new();
        s.userns = UsernsMode::Auto;
        assert!(matches!(default_json(&s), Err(BundleError::UserNamespace)));
    }

    #[test]
    fn every_capability_the_settings_take_is_one_the_runtime_knows() {
        for name in crate::app::CAPABILITIES {
            assert!(name.parse::<Capability>().is_ok(), "{name}");
        }
    }

    #[test]
    fn process_follows_the_image_and_the_settings() {
        let image = image();
        let settings = edge_settings();
        let spec = spec(&container(&image, &settings), &edge_resolved()).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_deref().unwrap(),
            ["/usr/bin/sensor", "--interval", "1"]
        );
        assert_eq!(
            p.env().as_deref().unwrap(),
            [
                "PATH=/usr/bin:/bin",
                "LOG_LEVEL=debug",
                "TZ=UTC",
                "MQTT=broker.lan"
            ]
        );
        assert_eq!(p.cwd(), Path::new("/srv"));
        assert_eq!(p.user().additional_gids().as_deref(), Some(&[998][..]));
        let json: serde_json::Value = serde_json::from_str(&to_json(&spec).unwrap()).unwrap();
        let rules = json["linux"]["resources"]["devices"].as_array().unwrap();
        assert_eq!(
            rules[0],
            serde_json::json!({"allow": false, "access": "rwm"})
        );
        assert!(rules.contains(&serde_json::json!(
            {"allow": true, "type": "b", "major": 179, "minor": 0, "access": "rwm"}
        )));
        assert_eq!(json["linux"]["resources"]["cpu"]["quota"], 50_000);
    }

    #[test]
    fn environment_defaults_and_overrides() {
        let rows: &[(&[&str], &[&str], &[&str])] = &[
            (&[], &[], &[DEFAULT_PATH]),
            (&["A=1"], &["A=2"], &[DEFAULT_PATH, "A=2"]),
            (&["PATH=/x", "A=1"], &["B=2"], &["PATH=/x", "A=1", "B=2"]),
            (&["A=1"], &["PATH=/y"], &["A=1", "PATH=/y"]),
        ];
        for (image, settings, want) in rows {
            let image: Vec<String> = image.iter().map(|s| s.to_string()).collect();
            let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                environment(&image, &settings),
                *want,
                "{image:?} {settings:?}"
            );
        }
    }

    #[test]
    fn an_image_without_a_command_needs_one() {
        let image = ImageConfig::default();
        let mut settings = RunSettings::new();
        let resolved = Resolved {
            user: ResolvedUser::ROOT,
            devices: Vec::new(),
            kernel_machine: "x86_64".into(),
        };
        let e = spec(&container(&image, &settings), &resolved).unwrap_err();
        assert!(matches!(e, BundleError::NoCommand), "{e}");
        settings.command = vec!["/bin/sh".into()];
        let s = spec(&container(&image, &settings), &resolved).unwrap();
        assert_eq!(s.process().as_ref().unwrap().cwd(), Path::new("/"));
    }

    #[test]
    fn host_devices_are_read_from_the_node() {
        let d = host_device(Path::new("/dev/null")).unwrap();
        assert_eq!((d.kind, d.major, d.minor), (DeviceKind::Char, 1, 3));
        assert!(matches!(
            host_device(Path::new("/etc/hostname")),
            Err(BundleError::NotADevice { .. }) | Err(BundleError::Device { .. })
        ));
    }

    #[test]
    fn the_image_s_user_applies_unless_the_settings_name_one() {
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir(rootfs.path().join("etc")).unwrap();
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        let volumes = tempfile::tempdir().unwrap();
        let mut img = image();
        if let Some(e) = img.config.as_mut() {
            e.user = Some("app".into());
        }
        let mut settings = RunSettings::new();
        let c = |settings: &RunSettings| -> Resolved {
            prepare(&Container {
                name: "sensor",
                instance: "0123abcd",
                image: &img,
                settings,
                rootfs: rootfs.path(),
                volumes_dir: volumes.path(),
            })
            .unwrap()
        };
        assert_eq!((c(&settings).user.uid, c(&settings).user.gid), (1000, 1000));
        settings.user = Some("0".into());
        assert_eq!(c(&settings).user.uid, 0);
    }
}
