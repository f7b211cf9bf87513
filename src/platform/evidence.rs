//! Host evidence: every signal detection weighs, read once into plain data.
//!
//! Two readers fill [`Evidence`]: [`Evidence::read_dir`] reads a snapshot in the board-fixture format (files
//! `cpuinfo`, `uname-m`, optional `getconf-long-bit`, `page-size`, `auxv`, `aarch32-el0`), and
//! [`Evidence::from_probe`] asks a [`HostProbe`] (the live host through [`LinuxHost`]). [`Evidence::write_dir`]
//! writes the same format back, so a device's evidence can be attached to a bug report and replayed with
//! `flotilla platform --evidence DIR`.
//!
//! Snapshot files come from users: each is size-capped, must be text, and must hold the kind of value its name
//! promises; anything else is an [`EvidenceError`] naming the file.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Largest cpuinfo accepted: a 256-thread x86 server prints about 400 KiB.
pub const CPUINFO_LIMIT: u64 = 4 << 20;
/// Largest auxv text accepted.
pub const AUXV_LIMIT: u64 = 64 << 10;
/// Largest one-value file accepted (`uname-m`, `page-size`, ...).
pub const SMALL_LIMIT: u64 = 4 << 10;

/// The userland bitness probe reads the ELF class of the OS's own binaries, in this order: `/bin/sh` exists on
/// every Linux userland, `/sbin/init` on systems without a shell, `/usr/bin/env` as a last resort.
pub const USERLAND_PROBES: [&str; 3] = ["/bin/sh", "/sbin/init", "/usr/bin/env"];

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("cannot read evidence file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "evidence file {path} is larger than {limit} bytes: it cannot be what its name says; capture it again"
    )]
    TooLarge { path: PathBuf, limit: u64 },
    #[error(
        "evidence file {path} is not text (binary data or invalid UTF-8): capture it again with the command in the boards README"
    )]
    NotText { path: PathBuf },
    #[error("evidence file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{dir} holds no evidence: expected at least one of the files cpuinfo, uname-m, auxv (see `flotilla platform --dump`)"
    )]
    Empty { dir: PathBuf },
    #[error("cannot write evidence to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("evidence file {path} is not valid: {source}")]
    Auxv { path: PathBuf, source: AuxvError },
}

/// Why an auxiliary vector, as text or as `/proc/<pid>/auxv`, could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuxvError {
    #[error(
        "line {line}: {text:?} is not `AT_NAME: value`, as `LD_SHOW_AUXV=1 /bin/true` prints it"
    )]
    NotEntry { line: usize, text: String },
    #[error("line {line}: {key:?} is not an auxv entry name (those start with AT_)")]
    NotName { line: usize, key: String },
    #[error("line {line}: {key} value {value:?} is not {expected}")]
    BadValue {
        line: usize,
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("no `AT_NAME: value` lines: capture it with `LD_SHOW_AUXV=1 /bin/true`")]
    NoEntries,
    #[error("word size {0} is neither 4 nor 8")]
    WordSize(usize),
    #[error(
        "{len} bytes is not a whole number of {entry}-byte entries: the copy was cut short; read it again"
    )]
    Partial { len: usize, entry: usize },
    #[error("no AT_NULL entry at the end: the copy was cut short; read it again")]
    NoEnd,
}

/// One auxiliary-vector value as glibc's `LD_SHOW_AUXV=1` prints it: a number, or (for AT_HWCAP on ARM) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuxValue {
    Bits(u64),
    Names(BTreeSet<String>),
}

/// The auxiliary-vector entries detection reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auxv {
    pub hwcap: Option<AuxValue>,
    pub hwcap2: Option<AuxValue>,
    /// AT_PLATFORM: `v6l`, `v7l`, `aarch64`, `x86_64`.
    pub platform: Option<String>,
    pub page_size: Option<u64>,
}

const AT_PAGESZ: u64 = 6;
const AT_HWCAP: u64 = 16;
const AT_HWCAP2: u64 = 26;

impl Auxv {
    pub fn is_empty(&self) -> bool {
        self == &Auxv::default()
    }

    /// Reads `LD_SHOW_AUXV=1` output. Hardware-capability values are hex with or without `0x`, or a list of
    /// names; AT_PAGESZ is decimal unless it carries `0x`. Entries detection does not use are skipped.
    pub fn parse_text(text: &str) -> Result<Auxv, AuxvError> {
        let mut auxv = Auxv::default();
        let mut entries = 0;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(AuxvError::NotEntry {
                    line: n + 1,
                    text: line.to_string(),
                });
            };
            let (key, value) = (key.trim(), value.trim());
            if !key.starts_with("AT_") {
                return Err(AuxvError::NotName {
                    line: n + 1,
                    key: key.to_string(),
                });
            }
            entries += 1;
            let bad = |expected: &'static str| AuxvError::BadValue {
                line: n + 1,
                key: key.to_string(),
                value: value.to_string(),
                expected,
            };
            match key {
                "AT_HWCAP" => {
                    auxv.hwcap = Some(parse_hwcap(value).ok_or_else(|| bad("hex or names"))?)
                }
                "AT_HWCAP2" => {
                    auxv.hwcap2 = Some(parse_hwcap(value).ok_or_else(|| bad("hex or names"))?)
                }
                "AT_PAGESZ" => {
                    auxv.page_size =
                        Some(parse_decimal_or_hex(value).ok_or_else(|| bad("a number"))?)
                }
                "AT_PLATFORM" => {
                    if !is_word(value) {
                        return Err(bad("a platform name like v7l"));
                    }
                    auxv.platform = Some(value.to_string());
                }
                _ => {}
            }
        }
        if entries == 0 {
            return Err(AuxvError::NoEntries);
        }
        Ok(auxv)
    }

    /// Reads the binary `/proc/<pid>/auxv` of a little-endian process whose words are `word_bytes` (4 or 8) long.
    /// AT_PLATFORM is a pointer into that process and cannot be resolved from here; it stays unknown.
    pub fn parse_raw(bytes: &[u8], word_bytes: usize) -> Result<Auxv, AuxvError> {
        if word_bytes != 4 && word_bytes != 8 {
            return Err(AuxvError::WordSize(word_bytes));
        }
        let word = |chunk: &[u8]| {
            chunk
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        };
        let mut auxv = Auxv::default();
        for pair in bytes.chunks(word_bytes * 2) {
            if pair.len() != word_bytes * 2 {
                return Err(AuxvError::Partial {
                    len: bytes.len(),
                    entry: word_bytes * 2,
                });
            }
            let (key, value) = pair.split_at(word_bytes);
            match word(key) {
                0 => return Ok(auxv),
                AT_HWCAP => auxv.hwcap = Some(AuxValue::Bits(word(value))),
                AT_HWCAP2 => auxv.hwcap2 = Some(AuxValue::Bits(word(value))),
                AT_PAGESZ => auxv.page_size = Some(word(value)),
                _ => {}
            }
        }
        Err(AuxvError::NoEnd)
    }

    /// The `LD_SHOW_AUXV=1` form [`Auxv::parse_text`] reads.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let value = |v: &AuxValue| match v {
            AuxValue::Bits(b) => format!("0x{b:x}"),
            AuxValue::Names(n) => n.iter().cloned().collect::<Vec<_>>().join(" "),
        };
        if let Some(v) = &self.hwcap {
            out.push_str(&format!("AT_HWCAP:    {}\n", value(v)));
        }
        if let Some(v) = &self.page_size {
            out.push_str(&format!("AT_PAGESZ:   {v}\n"));
        }
        if let Some(v) = &self.hwcap2 {
            out.push_str(&format!("AT_HWCAP2:   {}\n", value(v)));
        }
        if let Some(v) = &self.platform {
            out.push_str(&format!("AT_PLATFORM: {v}\n"));
        }
        out
    }
}

fn parse_hwcap(value: &str) -> Option<AuxValue> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        return u64::from_str_radix(hex, 16).ok().map(AuxValue::Bits);
    }
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return u64::from_str_radix(value, 16).ok().map(AuxValue::Bits);
    }
    let names: BTreeSet<String> = value.split_whitespace().map(str::to_string).collect();
    if names.iter().all(|n| is_word(n)) {
        Some(AuxValue::Names(names))
    } else {
        None
    }
}

fn parse_decimal_or_hex(value: &str) -> Option<u64> {
    match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

/// A machine or feature name: short, `[A-Za-z0-9_.-]`.
fn is_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Everything detection weighs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// Where the evidence came from, in words (`live host`, `snapshot /path`).
    pub origin: String,
    /// The snapshot's `SOURCE` text, if any.
    pub source: Option<String>,
    pub cpuinfo: Option<String>,
    /// `uname -m`.
    pub uname_machine: Option<String>,
    /// Userland bitness (`getconf LONG_BIT`), 32 or 64.
    pub long_bit: Option<u32>,
    /// How the bitness was found: `getconf-long-bit file`, `ELF class of /bin/sh`.
    pub long_bit_source: Option<String>,
    /// `getconf PAGESIZE` (the live host: sysconf).
    pub page_size: Option<u64>,
    pub auxv: Auxv,
    /// x86 level features from CPUID, in cpuinfo names (live x86 hosts only).
    pub cpuid_features: Option<BTreeSet<String>>,
    /// `/sys/devices/system/cpu/aarch32_el0`: the CPUs that run 32-bit code, on arm64 kernels that allow
    /// mismatched AArch32 support.
    pub aarch32_el0: Option<String>,
}

/// The live host, one call per fact. [`LinuxHost`] is the real one; tests give fixed answers.
pub trait HostProbe {
    /// `/proc/cpuinfo`, `None` if the file does not exist (some sandboxes hide it).
    fn cpuinfo(&self) -> Result<Option<String>, EvidenceError>;
    fn uname_machine(&self) -> String;
    /// Userland bitness and the binary it was read from.
    fn userland_bits(&self) -> Option<(u32, PathBuf)>;
    fn page_size(&self) -> u64;
    fn auxv(&self) -> Auxv;
    fn cpuid_features(&self) -> Option<BTreeSet<String>>;
    fn aarch32_el0(&self) -> Result<Option<String>, EvidenceError>;
}

/// The machine this process runs on.
pub struct LinuxHost;

const PROC_CPUINFO: &str = "/proc/cpuinfo";
const SYS_AARCH32_EL0: &str = "/sys/devices/system/cpu/aarch32_el0";

impl HostProbe for LinuxHost {
    fn cpuinfo(&self) -> Result<Option<String>, EvidenceError> {
        read_optional(Path::new(PROC_CPUINFO), CPUINFO_LIMIT)
    }

    fn uname_machine(&self) -> String {
        rustix::system::uname()
            .machine()
            .to_string_lossy()
            .into_owned()
    }

    fn userland_bits(&self) -> Option<(u32, PathBuf)> {
        USERLAND_PROBES.iter().find_map(|p| {
            let path = Path::new(p);
            elf_class_bits(path).map(|bits| (bits, path.to_path_buf()))
        })
    }

    fn page_size(&self) -> u64 {
        rustix::param::page_size() as u64
    }

    fn auxv(&self) -> Auxv {
        let (hwcap, hwcap2) = rustix::param::linux_hwcap();
        Auxv {
            hwcap: Some(AuxValue::Bits(hwcap as u64)),
            hwcap2: Some(AuxValue::Bits(hwcap2 as u64)),
            platform: crate::sys::auxv_platform(),
            page_size: Some(rustix::param::page_size() as u64),
        }
    }

    fn cpuid_features(&self) -> Option<BTreeSet<String>> {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            Some(super::x86::live_features())
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        {
            None
        }
    }

    fn aarch32_el0(&self) -> Result<Option<String>, EvidenceError> {
        read_optional(Path::new(SYS_AARCH32_EL0), SMALL_LIMIT)
            .map(|o| o.map(|s| s.trim().to_string()))
    }
}

/// 32 or 64 from the ELF class byte of `path` (symlinks followed), `None` if it is not a readable ELF file.
fn elf_class_bits(path: &Path) -> Option<u32> {
    let mut header = [0u8; 5];
    fs::File::open(path).ok()?.read_exact(&mut header).ok()?;
    match header {
        [0x7f, b'E', b'L', b'F', 1] => Some(32),
        [0x7f, b'E', b'L', b'F', 2] => Some(64),
        _ => None,
    }
}

/// Reads a text file of at most `limit` bytes; `Ok(None)` if it does not exist.
fn read_optional(path: &Path, limit: u64) -> Result<Option<String>, EvidenceError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EvidenceError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut bytes = Vec::new();
    // /proc files report size 0, so the cap is enforced on what is read, not on metadata.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| EvidenceError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(EvidenceError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    if bytes.contains(&0) {
        return Err(EvidenceError::NotText {
            path: path.to_path_buf(),
        });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| EvidenceError::NotText {
            path: path.to_path_buf(),
        })
}

/// The first line of a one-value file, which must be a word.
fn read_word(path: &Path) -> Result<Option<String>, EvidenceError> {
    let Some(text) = read_optional(path, SMALL_LIMIT)? else {
        return Ok(None);
    };
    let value = text.lines().next().unwrap_or("").trim().to_string();
    if !is_word(&value) {
        return Err(EvidenceError::Invalid {
            path: path.to_path_buf(),
            reason: format!("{value:?} is not one word of [A-Za-z0-9_.-]"),
        });
    }
    Ok(Some(value))
}

fn read_number(
    path: &Path,
    valid: impl Fn(u64) -> bool,
    what: &str,
) -> Result<Option<u64>, EvidenceError> {
    let Some(word) = read_word(path)? else {
        return Ok(None);
    };
    match word.parse::<u64>() {
        Ok(n) if valid(n) => Ok(Some(n)),
        _ => Err(EvidenceError::Invalid {
            path: path.to_path_buf(),
            reason: format!("{word:?} is not {what}"),
        }),
    }
}

fn is_page_size(n: u64) -> bool {
    n.is_power_of_two() && (1024..=(1 << 30)).contains(&n)
}

impl Evidence {
    /// Reads a snapshot directory in the board-fixture format.
    pub fn read_dir(dir: &Path) -> Result<Evidence, EvidenceError> {
        let meta = fs::metadata(dir).map_err(|source| EvidenceError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(EvidenceError::Invalid {
                path: dir.to_path_buf(),
                reason: "not a directory: give the directory holding cpuinfo, uname-m, ..."
                    .to_string(),
            });
        }
        let cpuinfo = read_optional(&dir.join("cpuinfo"), CPUINFO_LIMIT)?;
        let uname_machine = read_word(&dir.join("uname-m"))?;
        let long_bit_path = dir.join("getconf-long-bit");
        let long_bit = read_number(&long_bit_path, |n| n == 32 || n == 64, "32 or 64")?;
        let page_size = read_number(&dir.join("page-size"), is_page_size, "a page size in bytes")?;
        let auxv_path = dir.join("auxv");
        let auxv = match read_optional(&auxv_path, AUXV_LIMIT)? {
            Some(text) => Auxv::parse_text(&text).map_err(|source| EvidenceError::Auxv {
                path: auxv_path.clone(),
                source,
            })?,
            None => Auxv::default(),
        };
        let aarch32_el0 =
            read_optional(&dir.join("aarch32-el0"), SMALL_LIMIT)?.map(|s| s.trim().to_string());
        let source = read_optional(&dir.join("SOURCE"), SMALL_LIMIT)?.map(|s| s.trim().to_string());
        if cpuinfo.is_none() && uname_machine.is_none() && auxv.is_empty() {
            return Err(EvidenceError::Empty {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Evidence {
            origin: format!("snapshot {}", dir.display()),
            source,
            cpuinfo,
            uname_machine,
            long_bit: long_bit.and_then(|n| u32::try_from(n).ok()),
            long_bit_source: long_bit.map(|_| "getconf-long-bit file".to_string()),
            page_size,
            auxv,
            cpuid_features: None,
            aarch32_el0,
        })
    }

    /// Reads the live host through `probe`.
    pub fn from_probe(probe: &dyn HostProbe) -> Result<Evidence, EvidenceError> {
        let userland = probe.userland_bits();
        Ok(Evidence {
            origin: "live host".to_string(),
            source: None,
            cpuinfo: probe.cpuinfo()?,
            uname_machine: Some(probe.uname_machine()),
            long_bit: userland.as_ref().map(|(bits, _)| *bits),
            long_bit_source: userland.map(|(_, path)| format!("ELF class of {}", path.display())),
            page_size: Some(probe.page_size()),
            auxv: probe.auxv(),
            cpuid_features: probe.cpuid_features(),
            aarch32_el0: probe.aarch32_el0()?,
        })
    }

    /// Writes this evidence as a snapshot directory (created if missing) that [`Evidence::read_dir`] reads back.
    /// `source` becomes the `SOURCE` file.
    pub fn write_dir(&self, dir: &Path, source: &str) -> Result<(), EvidenceError> {
        fs::create_dir_all(dir).map_err(|e| EvidenceError::Write {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut files: Vec<(&str, String)> = vec![("SOURCE", format!("{source}\n"))];
        if let Some(c) = &self.cpuinfo {
            files.push(("cpuinfo", c.clone()));
        }
        if let Some(m) = &self.uname_machine {
            files.push(("uname-m", format!("{m}\n")));
        }
        if let Some(b) = self.long_bit {
            files.push(("getconf-long-bit", format!("{b}\n")));
        }
        if let Some(p) = self.page_size {
            files.push(("page-size", format!("{p}\n")));
        }
        if !self.auxv.is_empty() {
            files.push(("auxv", self.auxv.to_text()));
        }
        if let Some(a) = &self.aarch32_el0 {
            files.push(("aarch32-el0", format!("{a}\n")));
        }
        for (name, content) in files {
            let path = dir.join(name);
            fs::write(&path, content).map_err(|source| EvidenceError::Write { path, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auxv_text_accepts_glibc_forms() {
        let auxv = Auxv::parse_text(
            "AT_SYSINFO_EHDR:      0x7ffd3e5f5000\nAT_HWCAP:             178bfbff\nAT_PAGESZ:            4096\n\
             AT_HWCAP2:            0x2\nAT_PLATFORM:          x86_64\nAT_EXECFN:            /bin/true\n",
        )
        .unwrap();
        assert_eq!(auxv.hwcap, Some(AuxValue::Bits(0x178bfbff)));
        assert_eq!(auxv.hwcap2, Some(AuxValue::Bits(2)));
        assert_eq!(auxv.page_size, Some(4096));
        assert_eq!(auxv.platform.as_deref(), Some("x86_64"));
    }

    #[test]
    fn auxv_text_accepts_arm_hwcap_names() {
        let auxv = Auxv::parse_text(
            "AT_HWCAP:  half thumb fastmult vfp edsp java tls\nAT_PLATFORM: v6l\n",
        )
        .unwrap();
        match auxv.hwcap {
            Some(AuxValue::Names(n)) => assert!(n.contains("java")),
            other => panic!("names expected, got {other:?}"),
        }
    }

    #[test]
    fn auxv_text_garbage_is_refused_with_the_line() {
        let err = Auxv::parse_text("hello world\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(
            Auxv::parse_text("AT_PAGESZ: lots\n")
                .unwrap_err()
                .to_string()
                .contains("AT_PAGESZ")
        );
        assert!(Auxv::parse_text("\n\n").is_err());
    }

    #[test]
    fn raw_auxv_reads_both_word_sizes_and_round_trips_as_text() {
        let words32: [u32; 8] = [16, 0x80d7, 6, 4096, 26, 0, 0, 0];
        let bytes: Vec<u8> = words32.iter().flat_map(|w| w.to_le_bytes()).collect();
        let auxv = Auxv::parse_raw(&bytes, 4).unwrap();
        assert_eq!(auxv.hwcap, Some(AuxValue::Bits(0x80d7)));
        assert_eq!(auxv.page_size, Some(4096));
        assert_eq!(Auxv::parse_text(&auxv.to_text()).unwrap(), auxv);

        let words64: [u64; 4] = [16, 0xecff_fffb, 0, 0];
        let bytes: Vec<u8> = words64.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(
            Auxv::parse_raw(&bytes, 8).unwrap().hwcap,
            Some(AuxValue::Bits(0xecff_fffb))
        );
        assert!(Auxv::parse_raw(&bytes[..12], 8).is_err());
        assert!(Auxv::parse_raw(&bytes[..16], 8).is_err());
    }

    struct FixedHost;

    impl HostProbe for FixedHost {
        fn cpuinfo(&self) -> Result<Option<String>, EvidenceError> {
            Ok(Some("processor\t: 0\nCPU part\t: 0xd03\n".to_string()))
        }
        fn uname_machine(&self) -> String {
            "aarch64".to_string()
        }
        fn userland_bits(&self) -> Option<(u32, PathBuf)> {
            Some((32, PathBuf::from("/bin/sh")))
        }
        fn page_size(&self) -> u64 {
            4096
        }
        fn auxv(&self) -> Auxv {
            Auxv {
                platform: Some("aarch64".to_string()),
                ..Auxv::default()
            }
        }
        fn cpuid_features(&self) -> Option<BTreeSet<String>> {
            None
        }
        fn aarch32_el0(&self) -> Result<Option<String>, EvidenceError> {
            Ok(Some("0-3".to_string()))
        }
    }

    #[test]
    fn a_probe_snapshot_survives_dump_and_read_back() {
        let live = Evidence::from_probe(&FixedHost).unwrap();
        assert_eq!(
            live.long_bit_source.as_deref(),
            Some("ELF class of /bin/sh")
        );
        let dir = tempfile::tempdir().unwrap();
        live.write_dir(dir.path(), "test host").unwrap();
        let back = Evidence::read_dir(dir.path()).unwrap();
        assert_eq!(back.cpuinfo, live.cpuinfo);
        assert_eq!(back.uname_machine, live.uname_machine);
        assert_eq!(back.long_bit, live.long_bit);
        assert_eq!(back.page_size, live.page_size);
        assert_eq!(back.auxv, live.auxv);
        assert_eq!(back.aarch32_el0, live.aarch32_el0);
        assert_eq!(back.source.as_deref(), Some("test host"));
    }

    #[test]
    fn bad_snapshot_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Evidence::read_dir(dir.path()),
            Err(EvidenceError::Empty { .. })
        ));

        fs::write(dir.path().join("cpuinfo"), b"\x7fELF\x00\x01binary").unwrap();
        match Evidence::read_dir(dir.path()) {
            Err(EvidenceError::NotText { path }) => assert!(path.ends_with("cpuinfo")),
            other => panic!("NotText expected, got {other:?}"),
        }

        fs::write(dir.path().join("cpuinfo"), "processor: 0\n").unwrap();
        fs::write(dir.path().join("uname-m"), "arm v7\n").unwrap();
        assert!(matches!(
            Evidence::read_dir(dir.path()),
            Err(EvidenceError::Invalid { .. })
        ));

        fs::write(dir.path().join("uname-m"), "armv7l\n").unwrap();
        fs::write(dir.path().join("page-size"), "4097\n").unwrap();
        assert!(matches!(
            Evidence::read_dir(dir.path()),
            Err(EvidenceError::Invalid { .. })
        ));

        fs::write(dir.path().join("page-size"), "4096\n").unwrap();
        fs::write(dir.path().join("getconf-long-bit"), "48\n").unwrap();
        assert!(matches!(
            Evidence::read_dir(dir.path()),
            Err(EvidenceError::Invalid { .. })
        ));

        fs::remove_file(dir.path().join("getconf-long-bit")).unwrap();
        let huge = "x".repeat(CPUINFO_LIMIT as usize + 1);
        fs::write(dir.path().join("cpuinfo"), huge).unwrap();
        assert!(matches!(
            Evidence::read_dir(dir.path()),
            Err(EvidenceError::TooLarge { .. })
        ));
    }
}
