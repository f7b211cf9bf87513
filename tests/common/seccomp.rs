//! An old kernel, as far as `openat2` goes: a seccomp filter that answers it with ENOSYS, as Linux before 5.6 does,
//! installed in a child between fork and exec (with `PR_SET_NO_NEW_PRIVS`, so no privilege is needed), and
//! inherited by everything that child starts.
//!
//! The library forbids unsafe code; the two `prctl` calls live here, in the tests.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `openat2`'s number: one of the syscalls added after the 5.1 renumbering, the same on x86-64, i386, arm and
/// aarch64.
const SYS_OPENAT2: u32 = 437;

/// The `AUDIT_ARCH_*` of this build: a syscall made through another ABI (i386 on x86-64) has other numbers, and
/// is let through rather than misread.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "arm")]
const AUDIT_ARCH: u32 = 0x4000_0028;
#[cfg(target_arch = "x86")]
const AUDIT_ARCH: u32 = 0x4000_0003;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump_if_equal(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// The filter over `struct seccomp_data` (the syscall number at offset 0, the audit arch at 4).
fn program() -> Vec<libc::sock_filter> {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    vec![
        stmt(load, 4),
        jump_if_equal(AUDIT_ARCH, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(load, 0),
        jump_if_equal(SYS_OPENAT2, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Makes `cmd`'s process (and its children) see `openat2` fail with ENOSYS.
pub fn without_openat2(cmd: &mut Command) -> &mut Command {
    // Built before the fork: the child may not allocate between fork and exec.
    let filter = program();
    // SAFETY: the closure only makes two prctl calls on memory owned by the closure, both async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}
