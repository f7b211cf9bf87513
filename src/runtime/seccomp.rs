//! The seccomp filter every container gets unless its app opts out: the profile in `seccomp/default.json`, made
//! into the runtime configuration's `linux.seccomp` for the container's capabilities and the host kernel's
//! architectures.
//!
//! The profile is data, beside this file, so that it is reviewed as a list; this module reads it and keeps the rules
//! that apply to the container. runc resolves each name on each of the filter's architectures and leaves out those
//! an architecture lacks, so one list serves x86-64, arm64 and 32-bit ARM.

use std::collections::HashSet;

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompBuilder,
    LinuxSyscall, LinuxSyscallBuilder,
};
use serde::Deserialize;
use serde::de::IgnoredAny;

const PROFILE: &str = include_str!("seccomp/default.json");

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the built-in seccomp profile does not read ({0}): this build of flotilla is broken")]
    Profile(#[from] serde_json::Error),
    #[error("building the seccomp configuration: {0}")]
    Spec(#[from] OciSpecError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    #[serde(rename = "about")]
    _about: IgnoredAny,
    default_errno: u32,
    rules: Vec<Rule>,
}

/// One rule of the profile: `oci_spec`'s syscall entry, a reason, and the capabilities it depends on.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    /// Required, so that no rule goes in without one; read by people only.
    #[serde(rename = "why")]
    _why: IgnoredAny,
    action: LinuxSeccompAction,
    #[serde(default, rename = "errnoRet")]
    errno_ret: Option<u32>,
    names: Vec<String>,
    #[serde(default)]
    args: Vec<LinuxSeccompArg>,
    /// Added only when the container has one of these.
    #[serde(default)]
    caps: Vec<Capability>,
    /// Added only when the container has none of these.
    #[serde(default)]
    unless_caps: Vec<Capability>,
}

impl Rule {
    fn applies(&self, caps: &HashSet<Capability>) -> bool {
        (self.caps.is_empty() || self.caps.iter().any(|c| caps.contains(c)))
            && !self.unless_caps.iter().any(|c| caps.contains(c))
    }

    fn syscall(&self) -> Result<LinuxSyscall, OciSpecError> {
        let mut s = LinuxSyscallBuilder::default()
            .names(self.names.clone())
            .action(self.action);
        if let Some(errno) = self.errno_ret {
            s = s.errno_ret(errno);
        }
        if !self.args.is_empty() {
            s = s.args(self.args.clone());
        }
        s.build()
    }
}

/// The seccomp architectures of a host kernel: its own and the 32-bit ones it runs (a 64-bit ARM kernel runs
/// armhf and armel programs; an x86-64 one i386 and x32). A syscall made through an architecture the filter does
/// not list kills the process, so the list follows the kernel, not the image: an emulated image's syscalls are
/// made by qemu-user, a host program.
pub fn architectures(kernel_machine: &str) -> Option<Vec<Arch>> {
    match kernel_machine {
        "x86_64" => Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ]),
        "aarch64" | "arm64" | "aarch64_be" => Some(vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]),
        "i386" | "i486" | "i586" | "i686" => Some(vec![Arch::ScmpArchX86]),
        m if m.starts_with("arm") => Some(vec![Arch::ScmpArchArm]),
        // Another architecture: runc's native one (libseccomp's), which is the kernel's unless runc is a 32-bit
        // build on a 64-bit kernel.
        _ => None,
    }
}

/// The default profile for a container with the capabilities `caps`, on a kernel whose `uname -m` is
/// `kernel_machine`. Pure.
pub fn default_profile(
    caps: &HashSet<Capability>,
    kernel_machine: &str,
) -> Result<LinuxSeccomp, SeccompError> {
    let profile: Profile = serde_json::from_str(PROFILE)?;
    let syscalls = profile
        .rules
        .iter()
        .filter(|r| r.applies(caps))
        .map(Rule::syscall)
        .collect::<Result<Vec<_>, _>>()?;
    let mut seccomp = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(profile.default_errno)
        .syscalls(syscalls);
    if let Some(arches) = architectures(kernel_machine) {
        seccomp = seccomp.architectures(arches);
    }
    Ok(seccomp.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_caps() -> HashSet<Capability> {
        super::super::bundle::CAPABILITIES.into_iter().collect()
    }

    fn allowed(s: &LinuxSeccomp) -> Vec<&str> {
        s.syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow)
            .flat_map(|r| r.names().iter().map(String::as_str))
            .collect()
    }

    #[test]
    fn the_profile_reads_and_each_rule_is_sorted_and_without_duplicates() {
        let profile: Profile = serde_json::from_str(PROFILE).unwrap();
        assert_eq!(profile.default_errno, 1, "EPERM, as Docker");
        for r in &profile.rules {
            let mut sorted = r.names.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(r.names, sorted, "names out of order or repeated");
        }
        // An unconditional allow that a capability rule also names would make that rule meaningless.
        let always: HashSet<&str> = profile
            .rules
            .iter()
            .filter(|r| r.caps.is_empty() && r.unless_caps.is_empty() && r.args.is_empty())
            .flat_map(|r| r.names.iter().map(String::as_str))
            .collect();
        for r in profile.rules.iter().filter(|r| !r.caps.is_empty()) {
            for n in &r.names {
                assert!(
                    !always.contains(n.as_str()),
                    "{n} is gated and also always allowed"
                );
            }
        }
    }

    #[test]
    fn what_is_refused_by_default_and_what_capabilities_open() {
        let s = default_profile(&default_caps(), "x86_64").unwrap();
        assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(s.default_errno_ret(), Some(1));
        let allow = allowed(&s);
        for refused in [
            "keyctl",
            "add_key",
            "request_key",
            "unshare",
            "setns",
            "mount",
            "umount2",
            "bpf",
            "perf_event_open",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "ptrace",
            "process_vm_readv",
            "io_uring_setup",
            "userfaultfd",
            "pivot_root",
            "swapon",
            "reboot",
        ] {
            assert!(!allow.contains(&refused), "{refused} is allowed by default");
        }
        // What 32-bit ARM needs, and what every program needs.
        for needed in [
            "_llseek",
            "mmap2",
            "fcntl64",
            "stat64",
            "fstatat64",
            "clock_gettime64",
            "futex_time64",
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "cacheflush",
            "set_tls",
            "breakpoint",
            "ugetrlimit",
            "send",
            "recv",
            "sigreturn",
            "getuid32",
            "setresuid32",
            "read",
            "execve",
            "chroot",
        ] {
            assert!(allow.contains(&needed), "{needed} is not allowed");
        }
        // clone only without namespace flags; clone3 says ENOSYS so libc falls back to clone.
        let rules = s.syscalls().as_deref().unwrap();
        let clone = rules.iter().find(|r| r.names() == &["clone"]).unwrap();
        assert!(
            clone
                .args()
                .as_ref()
                .is_some_and(|a| a[0].value() == 0x7E02_0000)
        );
        let clone3 = rules.iter().find(|r| r.names() == &["clone3"]).unwrap();
        assert_eq!(clone3.errno_ret(), Some(38));

        let mut caps = default_caps();
        caps.insert(Capability::SysPtrace);
        caps.insert(Capability::SysAdmin);
        let s = default_profile(&caps, "x86_64").unwrap();
        let allow = allowed(&s);
        for opened in [
            "ptrace",
            "process_vm_readv",
            "unshare",
            "setns",
            "mount",
            "clone3",
        ] {
            assert!(allow.contains(&opened), "{opened} stays refused");
        }
        for still in ["keyctl", "kexec_load", "init_module", "reboot"] {
            assert!(
                !allow.contains(&still),
                "{still} came with SYS_ADMIN/SYS_PTRACE"
            );
        }
        // With SYS_ADMIN, clone is allowed whole, and the conditional rules are gone.
        let rules = s.syscalls().as_deref().unwrap();
        assert!(rules.iter().all(|r| r.names() != &["clone"]));
        assert!(!rules.iter().any(|r| r.names() == &["clone3"]));

        let mut caps = default_caps();
        caps.remove(&Capability::SysChroot);
        let s = default_profile(&caps, "x86_64").unwrap();
        assert!(!allowed(&s).contains(&"chroot"));
    }

    #[test]
    fn architectures_follow_the_kernel() {
        use Arch::*;
        let rows: &[(&str, Option<&[Arch]>)] = &[
            ("x86_64", Some(&[ScmpArchX86_64, ScmpArchX86, ScmpArchX32])),
            ("aarch64", Some(&[ScmpArchAarch64, ScmpArchArm])),
            ("armv7l", Some(&[ScmpArchArm])),
            ("armv6l", Some(&[ScmpArchArm])),
            ("i686", Some(&[ScmpArchX86])),
            ("riscv64", None),
        ];
        for (machine, want) in rows {
            assert_eq!(architectures(machine).as_deref(), *want, "{machine}");
        }
    }
}
