//! The two host facts safe Rust cannot read.
//!
//! Everything else about the host (uname, page size, AT_HWCAP, AT_HWCAP2, files under /proc) is read through
//! `rustix` and `std`, which are safe. What remains:
//! - `AT_PLATFORM`: the auxiliary vector holds a pointer to a C string in our own address space; `getauxval`
//!   returns that pointer, and only `CStr::from_ptr` turns it into bytes.
//! - CPUID leaf 0x8000_0001 (LAHF/SAHF in 64-bit mode, an x86-64-v2 requirement that
//!   `is_x86_feature_detected!` does not cover): `__cpuid` was an `unsafe fn` before Rust 1.87 (our MSRV is 1.85).
#![allow(unsafe_code)]

use std::ffi::CStr;

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
