//! The host facts safe Rust cannot read, and the one hand-over of a file descriptor it cannot make.
//!
//! Everything else about the host (uname, page size, AT_HWCAP, AT_HWCAP2, files under /proc) is read through
//! `rustix` and `std`, which are safe. What remains:
//! - `AT_PLATFORM`: the auxiliary vector holds a pointer to a C string in our own address space; `getauxval`
//!   returns that pointer, and only `CStr::from_ptr` turns it into bytes.
//! - CPUID leaf 0x8000_0001 (LAHF/SAHF in 64-bit mode, an x86-64-v2 requirement that
//!   `is_x86_feature_detected!` does not cover): `__cpuid` was an `unsafe fn` before Rust 1.87 (our MSRV is 1.85).
//! - Handing a supervisor the container's lock: std has no way to give a child one chosen descriptor (only stdio),
//!   so the parent places it with `dup2` between fork and exec (`pre_exec`, which is unsafe), and the child turns
//!   the number it is told into an `OwnedFd` (`from_raw_fd`, unsafe).
//! - glibc's malloc arenas: `mallopt` is a C call, and no safe crate wraps it.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The kernel's `AT_PLATFORM` string for this process (`v6l`, `v7l`, `aarch64`, `x86_64`), if it set one.
pub fn auxv_platform() -> Option<String> {
    // SAFETY: getauxval has no preconditions; it reads the auxiliary vector the kernel placed at process start.
    let ptr = unsafe { libc::getauxval(libc::AT_PLATFORM) } as *const libc::c_char;
    if ptr.is_null() {
        return None;
    }
    // SAFETY: a non-zero AT_PLATFORM is the address of a NUL-terminated string the kernel copied onto our initial
    // stack; that memory stays mapped and unchanged for the life of the process.
    let text = unsafe { CStr::from_ptr(ptr) };
    Some(text.to_string_lossy().into_owned())
}

/// Bounds glibc's malloc arenas to `n` for the process, as `MALLOC_ARENA_MAX` does (which, when set, wins). glibc
/// gives each thread that allocates while others do an arena of its own, up to 8 per core, and keeps what each
/// arena once held: the fleet server plans a 10,000-device rollout on whichever blocking thread is free, so every
/// arena grew to a plan's size and a replica held 786 MiB where 2 arenas held 276 MiB (`bench/fleet-load.sh`'s
/// wake-up run). Does nothing on another C library. Call it before the process starts threads.
pub fn limit_malloc_arenas(n: u16) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets one of the allocator's tunables under the allocator's own lock; it takes no pointer.
        // A refusal (0) leaves glibc's default, which is only more memory.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, libc::c_int::from(n));
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = n;
}

/// Whether the CPU has LAHF/SAHF in 64-bit mode (CPUID 0x8000_0001 ECX bit 0; cpuinfo's `lahf_lm`).
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
pub fn has_lahf_lm() -> bool {
    #[cfg(target_arch = "x86")]
    use std::arch::x86::{__cpuid, __get_cpuid_max};
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::{__cpuid, __get_cpuid_max};
    // SAFETY: CPUID exists on every x86-64 CPU and on every x86 CPU Rust supports; the extended leaf is only read
    // after the maximum extended leaf says it exists.
    #[allow(unused_unsafe)]
    unsafe {
        let (max_extended, _) = __get_cpuid_max(0x8000_0000);
        max_extended >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & 1 == 1
    }
}

/// Makes `fd` the spawned child's descriptor `target`, open across exec. Only that child gets it: the descriptor
/// stays close-on-exec in this process, so no other command started meanwhile (by another thread) inherits it.
pub fn hand_over_fd(cmd: &mut Command, fd: BorrowedFd<'_>, target: RawFd) {
    let source = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and fcntl, which are
    // async-signal-safe; it touches no memory of the parent's other threads.
    unsafe {
        cmd.pre_exec(move || {
            let placed = if source == target {
                // dup2 onto itself would keep close-on-exec set.
                libc::fcntl(target, libc::F_SETFD, 0)
            } else {
                libc::dup2(source, target)
            };
            if placed == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Takes the descriptor `fd` that this process was started with (see [`hand_over_fd`]), marking it close-on-exec
/// so the commands it runs do not inherit it. None when no such descriptor is open.
pub fn take_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // SAFETY: F_GETFD on any number is harmless; it fails with EBADF when nothing is open there.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return None;
    }
    // SAFETY: the descriptor is open (checked above) and was placed for us by our parent; it is taken once, at
    // start, before anything else in this process could have opened, closed or claimed that number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).ok()?;
    Some(owned)
}
