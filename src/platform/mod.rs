//! Platforms: what an image variant is built for and what a device can run.
//!
//! The string form follows containerd's `platforms` package (`os/arch[/variant]`), because that is what users
//! already type after `docker run --platform`. Two choices differ from containerd on purpose:
//! - `arm` without a variant stays unknown (`variant: None`) instead of silently becoming `v7`: an index label is a
//!   hint, and an unlabelled `arm` entry must be proven by its binaries before a v6 device takes it.
//! - the canonical form spells the baselines the way the board fixtures do: `linux/arm64/v8` (containerd prints
//!   `linux/arm64`) and `linux/amd64` (never `linux/amd64/v1`).

pub mod cpuinfo;
pub mod detect;
pub mod evidence;
pub mod host;
pub mod x86;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod select;

/// Errors from parsing a platform string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlatformError {
    #[error("empty platform string: give one like linux/arm64 or linux/arm/v6")]
    Empty,
    #[error("platform {0:?} has too many parts: the form is os/arch[/variant], e.g. linux/arm/v7")]
    TooManyParts(String),
    #[error("platform {0:?} has an empty part: the form is os/arch[/variant], e.g. linux/arm/v7")]
    EmptyPart(String),
    #[error(
        "platform {0:?} has characters outside [a-z0-9._-]: the form is os/arch[/variant], e.g. linux/arm/v7"
    )]
    BadCharacters(String),
}

/// One platform, normalised. In JSON it is the string users type (`"linux/arm/v7"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Serialize for Platform {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Platform {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Platform, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Platform {
    /// Builds a normalised platform from raw parts as they appear in an image index or on the command line.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        let os = normalize_os(os);
        let (architecture, variant) = normalize_arch(architecture, variant);
        Platform {
            os,
            architecture,
            variant,
        }
    }

    pub fn linux(architecture: &str, variant: Option<&str>) -> Platform {
        Platform::new("linux", architecture, variant)
    }

    /// The OCI descriptor form: `{"architecture": …, "os": …, "variant": …}`.
    pub fn to_oci_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"architecture": self.architecture, "os": self.os});
        if let Some(variant) = &self.variant {
            v["variant"] = variant.clone().into();
        }
        v
    }

    /// Reads the OCI descriptor form; `None` when it lacks `os` or `architecture`.
    pub fn from_oci_json(v: &serde_json::Value) -> Option<Platform> {
        Some(Platform::new(
            v.get("os")?.as_str()?,
            v.get("architecture")?.as_str()?,
            v.get("variant").and_then(|v| v.as_str()),
        ))
    }

    /// The ARM architecture version (5, 6, 7, 8) of a 32-bit `arm` platform with a known variant.
    pub fn arm_version(&self) -> Option<u8> {
        if self.architecture != "arm" {
            return None;
        }
        self.variant.as_deref().and_then(variant_number)
    }

    /// The x86-64 micro-architecture level (1..=4) of an `amd64` platform.
    pub fn amd64_level(&self) -> Option<u8> {
        if self.architecture != "amd64" {
            return None;
        }
        match self.variant.as_deref() {
            None => Some(1),
            Some(v) => variant_number(v),
        }
    }

    /// Reads one to three lowercased parts: `arm64`, `linux/arm64`, `arm/v7` or `linux/arm/v7`.
    fn parse_parts(parts: &[&str]) -> Platform {
        match parts {
            [single] => {
                if is_known_os(single) {
                    // `linux` alone: the architecture is filled in from the host by the caller, as containerd does.
                    Platform::new(single, "", None)
                } else {
                    Platform::new("linux", single, None)
                }
            }
            [a, b] => {
                if is_known_os(a) {
                    Platform::new(a, b, None)
                } else {
                    // `arm/v7`: containerd reads two parts without an OS as arch/variant.
                    Platform::new("linux", a, Some(b))
                }
            }
            [os, arch, variant] => Platform::new(os, arch, Some(variant)),
            _ => unreachable!("parse checks the number of parts"),
        }
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Platform, PlatformError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PlatformError::Empty);
        }
        let lowered = s.to_ascii_lowercase();
        let parts: Vec<&str> = lowered.split('/').collect();
        if parts.len() > 3 {
            return Err(PlatformError::TooManyParts(s.to_string()));
        }
        if parts.iter().any(|p| p.is_empty()) {
            return Err(PlatformError::EmptyPart(s.to_string()));
        }
        if !parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        }) {
            return Err(PlatformError::BadCharacters(s.to_string()));
        }
        let platform = Platform::parse_parts(&parts);
        if platform.architecture.is_empty() {
            return Err(PlatformError::EmptyPart(s.to_string()));
        }
        Ok(platform)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn is_known_os(s: &str) -> bool {
    matches!(
        s,
        "linux"
            | "windows"
            | "darwin"
            | "macos"
            | "freebsd"
            | "netbsd"
            | "openbsd"
            | "solaris"
            | "illumos"
            | "android"
            | "ios"
            | "aix"
            | "plan9"
            | "js"
            | "wasip1"
            | "unknown"
    )
}

fn normalize_os(os: &str) -> String {
    match os.to_ascii_lowercase().as_str() {
        "macos" => "darwin".to_string(),
        other => other.to_string(),
    }
}

/// `v7`, `7` and `V7` all name ARM version 7; `v8.2` has no single number and is left alone.
fn variant_number(v: &str) -> Option<u8> {
    let digits = v.strip_prefix('v').unwrap_or(v);
    digits.parse().ok()
}

/// Folds the aliases that kernels, distributions and toolchains use onto the OCI names.
pub fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant
        .map(|v| v.to_ascii_lowercase())
        .filter(|v| !v.is_empty());
    let numbered = |v: &str| match variant_number(v) {
        Some(n) => format!("v{n}"),
        None => v.to_string(),
    };
    match arch.as_str() {
        "aarch64" | "arm64" | "arm64be" => {
            let v = match variant.as_deref() {
                None | Some("8") | Some("v8") => "v8".to_string(),
                Some(other) => numbered(other),
            };
            ("arm64".to_string(), Some(v))
        }
        "x86_64" | "x86-64" | "amd64" => {
            let v = match variant.as_deref() {
                None | Some("v1") | Some("1") => None,
                Some(other) => Some(numbered(other)),
            };
            ("amd64".to_string(), v)
        }
        "i386" | "i486" | "i586" | "i686" | "386" | "x86" => ("386".to_string(), variant),
        // Debian's port names: armhf is ARMv7 hard-float, armel is ARMv5TE soft-float (containerd maps armel to
        // v6, but Debian's armel binaries really are v5TE and run on v5 hosts).
        "armhf" => ("arm".to_string(), Some("v7".to_string())),
        "armel" => ("arm".to_string(), Some("v5".to_string())),
        // Kernel machine names (uname -m) as they appear when a user pastes them.
        "armv5l" | "armv5tel" | "armv5tejl" => ("arm".to_string(), Some("v5".to_string())),
        "armv6l" | "armv6" => ("arm".to_string(), Some("v6".to_string())),
        "armv7l" | "armv7" | "armv7a" => ("arm".to_string(), Some("v7".to_string())),
        "armv8l" => ("arm".to_string(), Some("v8".to_string())),
        "arm" => ("arm".to_string(), variant.map(|v| numbered(&v))),
        _ => (arch, variant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        s.parse::<Platform>().unwrap().to_string()
    }

    #[test]
    fn aliases_normalise_like_containerd() {
        assert_eq!(p("linux/aarch64"), "linux/arm64/v8");
        assert_eq!(p("arm64"), "linux/arm64/v8");
        assert_eq!(p("linux/arm64/8"), "linux/arm64/v8");
        assert_eq!(p("linux/x86_64"), "linux/amd64");
        assert_eq!(p("linux/amd64/v1"), "linux/amd64");
        assert_eq!(p("linux/amd64/v3"), "linux/amd64/v3");
        assert_eq!(p("armhf"), "linux/arm/v7");
        assert_eq!(p("armel"), "linux/arm/v5");
        assert_eq!(p("linux/arm/7"), "linux/arm/v7");
        assert_eq!(p("arm/v6"), "linux/arm/v6");
        assert_eq!(p("Linux/ARM/V6"), "linux/arm/v6");
        assert_eq!(p("i686"), "linux/386");
        assert_eq!(p("windows/amd64"), "windows/amd64");
    }

    #[test]
    fn unlabelled_arm_stays_unknown() {
        let arm: Platform = "linux/arm".parse().unwrap();
        assert_eq!(arm.variant, None);
        assert_eq!(arm.arm_version(), None);
        assert_eq!(arm.to_string(), "linux/arm");
    }

    #[test]
    fn levels_and_versions() {
        assert_eq!(
            "linux/arm/v6".parse::<Platform>().unwrap().arm_version(),
            Some(6)
        );
        assert_eq!(
            "linux/amd64".parse::<Platform>().unwrap().amd64_level(),
            Some(1)
        );
        assert_eq!(
            "linux/amd64/v4".parse::<Platform>().unwrap().amd64_level(),
            Some(4)
        );
        assert_eq!(
            "linux/arm64".parse::<Platform>().unwrap().arm_version(),
            None
        );
    }

    #[test]
    fn bad_strings_are_refused_with_a_reason() {
        assert_eq!("".parse::<Platform>(), Err(PlatformError::Empty));
        assert!(matches!(
            "linux/arm/v7/x".parse::<Platform>(),
            Err(PlatformError::TooManyParts(_))
        ));
        assert!(matches!(
            "linux//v7".parse::<Platform>(),
            Err(PlatformError::EmptyPart(_))
        ));
        assert!(matches!(
            "linux/arm;rm".parse::<Platform>(),
            Err(PlatformError::BadCharacters(_))
        ));
        assert!(matches!(
            "linux".parse::<Platform>(),
            Err(PlatformError::EmptyPart(_))
        ));
    }
}
