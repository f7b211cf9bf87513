//! May an image for platform P run on this device: natively, through a registered binfmt_misc handler (qemu-user),
//! or not at all?
//!
//! The handler is recognised by what the kernel matches, its magic and mask against an ELF header of P's
//! architecture, not by its file name (`qemu-aarch64`, `qemu-aarch64-static`, `aarch64` and `arm64` are all in use).
//! A handler must also have the `F` flag: without it the kernel opens the interpreter by path at each exec,
//! inside the container's root, where there is no qemu.
//!
//! [`Binfmt::read`] takes the snapshot (the only I/O); [`decide`] is pure.

use std::io;
use std::path::{Path, PathBuf};

use crate::platform::Platform;
use crate::platform::host::Host;

#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    #[error(
        "{platform} does not run natively on this device (it runs {host}); to run it through a binfmt_misc \
         emulator, pass --allow-emulation (or set allow_emulation), or pull the image's {host_best} variant"
    )]
    NotAllowed {
        platform: Platform,
        host: String,
        host_best: String,
    },
    #[error(
        "{platform} does not run natively on this device (it runs {host}), and no usable binfmt_misc handler \
         for {architecture} is registered ({reasons}): install one with apt install qemu-user-static \
         binfmt-support, or register one with the F flag through /usr/lib/binfmt.d/"
    )]
    NoHandler {
        platform: String,
        host: String,
        architecture: String,
        reasons: String,
    },
    #[error("{platform} cannot run here: flotilla runs Linux images of a known architecture only")]
    Unsupported { platform: Platform },
    #[error("reading the binfmt_misc handler {path}")]
    Read { path: PathBuf, source: io::Error },
}

/// How the image will run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Native,
    Emulated {
        /// The handler's name under `/proc/sys/fs/binfmt_misc`.
        handler: String,
        interpreter: PathBuf,
    },
}

/// The binfmt_misc registrations, as read from `/proc/sys/fs/binfmt_misc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binfmt {
    /// binfmt_misc is mounted and its `status` says `enabled`.
    pub enabled: bool,
    pub handlers: Vec<Handler>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    pub name: String,
    pub enabled: bool,
    pub interpreter: PathBuf,
    pub flags: String,
    pub offset: usize,
    /// Empty for a handler matching by file extension.
    pub magic: Vec<u8>,
    pub mask: Option<Vec<u8>>,
}

impl Handler {
    /// One entry file's text (`enabled`, `interpreter …`, `flags: …`, `offset …`, `magic …`, `mask …`); `None`
    /// when it has no interpreter line, which is not a handler.
    pub fn parse(name: &str, text: &str) -> Option<Handler> {
        let mut h = Handler {
            name: name.to_string(),
            enabled: false,
            interpreter: PathBuf::new(),
            flags: String::new(),
            offset: 0,
            magic: Vec::new(),
            mask: None,
        };
        let mut has_interpreter = false;
        for line in text.lines() {
            let line = line.trim();
            if line == "enabled" {
                h.enabled = true;
            } else if let Some(v) = line.strip_prefix("interpreter ") {
                h.interpreter = PathBuf::from(v.trim());
                has_interpreter = true;
            } else if let Some(v) = line.strip_prefix("flags:") {
                h.flags = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("offset ") {
                h.offset = v.trim().parse().ok()?;
            } else if let Some(v) = line.strip_prefix("magic ") {
                h.magic = hex(v.trim())?;
            } else if let Some(v) = line.strip_prefix("mask ") {
                h.mask = Some(hex(v.trim())?);
            }
        }
        has_interpreter.then_some(h)
    }

    /// Whether the kernel would hand `header` to this handler: `header[offset..] & mask == magic`.
    fn matches(&self, header: &[u8]) -> bool {
        if self.magic.is_empty() {
            return false;
        }
        self.magic.iter().enumerate().all(|(i, &m)| {
            let mask = self
                .mask
                .as_ref()
                .and_then(|k| k.get(i))
                .copied()
                .unwrap_or(0xff);
            header
                .get(self.offset + i)
                .is_some_and(|&b| b & mask == m & mask)
        })
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Binfmt {
    pub const DIR: &'static str = "/proc/sys/fs/binfmt_misc";

    /// The registrations under `dir`; an unmounted binfmt_misc reads as none, disabled.
    pub fn read(dir: &Path) -> Result<Binfmt, EmulationError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| EmulationError::Read { path, source }
        };
        let status = match std::fs::read_to_string(dir.join("status")) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Binfmt::default()),
            Err(e) => return Err(err(&dir.join("status"))(e)),
        };
        let mut handlers = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(err(dir))? {
            let entry = entry.map_err(err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "status" || name == "register" {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).map_err(err(&entry.path()))?;
            handlers.extend(Handler::parse(&name, &text));
        }
        handlers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Binfmt {
            enabled: status.trim() == "enabled",
            handlers,
        })
    }
}

/// The first 20 bytes of an executable for `architecture` (ET_EXEC, or ET_DYN with `pie`): what a handler's
/// magic is matched against. `None` for an architecture flotilla does not know.
fn elf_header(architecture: &str, pie: bool) -> Option<[u8; 20]> {
    // (ELF class: 1 = 32-bit, 2 = 64-bit; data: 1 = little-endian, 2 = big; e_machine)
    let (class, data, machine): (u8, u8, u16) = match architecture {
        "arm" => (1, 1, 0x28),
        "arm64" => (2, 1, 0xb7),
        "amd64" => (2, 1, 0x3e),
        "386" => (1, 1, 0x03),
        "riscv64" => (2, 1, 0xf3),
        "ppc64le" => (2, 1, 0x15),
        "s390x" => (2, 2, 0x16),
        "mips64le" => (2, 1, 0x08),
        _ => return None,
    };
    let e_type: u16 = if pie { 3 } else { 2 };
    let (t, m) = if data == 1 {
        (e_type.to_le_bytes(), machine.to_le_bytes())
    } else {
        (e_type.to_be_bytes(), machine.to_be_bytes())
    };
    let mut h = [0u8; 20];
    h[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', class, data, 1]);
    h[16..18].copy_from_slice(&t);
    h[18..20].copy_from_slice(&m);
    Some(h)
}

/// Native when `platform` is among the host's candidates; else emulated when allowed and a usable handler is
/// registered; else refused, saying why and what to do.
pub fn decide(
    platform: &Platform,
    host: &Host,
    allow_emulation: bool,
    binfmt: &Binfmt,
) -> Result<Decision, EmulationError> {
    if host.candidates.contains(platform) {
        return Ok(Decision::Native);
    }
    let (exec, pie) = match (
        elf_header(&platform.architecture, false),
        elf_header(&platform.architecture, true),
    ) {
        (Some(e), Some(p)) if platform.os == "linux" => (e, p),
        _ => {
            return Err(EmulationError::Unsupported {
                platform: platform.clone(),
            });
        }
    };
    let host_desc = host.describe();
    if !allow_emulation {
        return Err(EmulationError::NotAllowed {
            platform: platform.clone(),
            host: host_desc,
            host_best: host
                .candidates
                .first()
                .map(Platform::to_string)
                .unwrap_or_else(|| "native".to_string()),
        });
    }
    let mut reasons = Vec::new();
    if !binfmt.enabled {
        reasons.push("binfmt_misc is not mounted or is disabled".to_string());
    }
    for h in &binfmt.handlers {
        // Static and PIE executables differ in e_type; qemu's masks accept both, and a handler for one only would
        // fail half the images.
        if !(h.matches(&exec) && h.matches(&pie)) {
            continue;
        }
        if !h.enabled {
            reasons.push(format!("{} is disabled", h.name));
        } else if !h.flags.contains('F') {
            reasons.push(format!(
                "{} lacks the F flag, so {} would be looked up inside the container, where it is not",
                h.name,
                h.interpreter.display()
            ));
        } else if binfmt.enabled {
            return Ok(Decision::Emulated {
                handler: h.name.clone(),
                interpreter: h.interpreter.clone(),
            });
        }
    }
    if reasons.is_empty() {
        reasons.push(format!(
            "none of the {} registered handlers matches its ELF header",
            binfmt.handlers.len()
        ));
    }
    Err(EmulationError::NoHandler {
        platform: platform.to_string(),
        host: host_desc,
        architecture: platform.architecture.clone(),
        reasons: reasons.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Debian's qemu-user-static registers them (`/usr/lib/binfmt.d/qemu-*.conf`, flags F since Debian 12).
    const QEMU_AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\n\
        offset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";
    const QEMU_ARM: &str = "enabled\ninterpreter /usr/bin/qemu-arm-static\nflags: OC\noffset 0\n\
        magic 7f454c4601010100000000000000000002002800\nmask ffffffffffffff00fffffffffffffffffeffffff\n";
    const QEMU_X86_64: &str = "disabled\ninterpreter /usr/bin/qemu-x86_64-static\nflags: F\noffset 0\n\
        magic 7f454c4602010100000000000000000002003e00\nmask fffffffffffefe00fffffffffffffffffeffffff\n";
    const WINE: &str = "enabled\ninterpreter /usr/bin/wine\nflags: \nextension .exe\n";

    fn binfmt(entries: &[(&str, &str)]) -> Binfmt {
        Binfmt {
            enabled: true,
            handlers: entries
                .iter()
                .filter_map(|(n, t)| Handler::parse(n, t))
                .collect(),
        }
    }

    fn host(candidates: &[&str]) -> Host {
        Host {
            candidates: candidates.iter().map(|c| c.parse().unwrap()).collect(),
            page_size: Some(4096),
        }
    }

    #[test]
    fn decisions() {
        let all = binfmt(&[
            // Names that say nothing: matching is by magic.
            ("h1", QEMU_AARCH64),
            ("h2", QEMU_ARM),
            ("h3", QEMU_X86_64),
            ("wine", WINE),
        ]);
        let amd64 = &host(&[
            "linux/amd64/v3",
            "linux/amd64/v2",
            "linux/amd64",
            "linux/386",
        ]);
        let pi_zero = &host(&["linux/arm/v6", "linux/arm/v5"]);
        type Row<'a> = (&'a str, &'a Host, bool, Result<&'a str, &'a str>);
        let rows: &[Row] = &[
            ("linux/amd64", amd64, false, Ok("native")),
            ("linux/386", amd64, false, Ok("native")),
            ("linux/arm64", amd64, false, Err("--allow-emulation")),
            ("linux/arm64", amd64, true, Ok("h1")),
            ("linux/arm/v7", amd64, true, Err("h2 lacks the F flag")),
            ("linux/arm/v6", pi_zero, true, Ok("native")),
            ("linux/amd64", pi_zero, true, Err("h3 is disabled")),
            (
                "linux/riscv64",
                pi_zero,
                true,
                Err("none of the 4 registered handlers"),
            ),
            ("windows/amd64", pi_zero, true, Err("Linux images")),
            (
                "linux/arm/v7",
                pi_zero,
                false,
                Err("pull the image's linux/arm/v6 variant"),
            ),
        ];
        for (platform, host, allow, want) in rows {
            let p: Platform = platform.parse().unwrap();
            let got = decide(&p, host, *allow, &all);
            match (want, &got) {
                (Ok("native"), Ok(Decision::Native)) => {}
                (Ok(name), Ok(Decision::Emulated { handler, .. })) if handler == name => {}
                (Err(text), Err(e)) if e.to_string().contains(text) => {}
                _ => panic!("{platform} allow={allow}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn no_binfmt_misc_says_how_to_install_one() {
        let p: Platform = "linux/arm64".parse().unwrap();
        let e = decide(&p, &host(&["linux/amd64"]), true, &Binfmt::default()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("not mounted"), "{text}");
        assert!(
            text.contains("apt install qemu-user-static binfmt-support"),
            "{text}"
        );
    }

    #[test]
    fn reads_a_snapshot_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("status"), "enabled\n").unwrap();
        std::fs::write(dir.path().join("register"), "").unwrap();
        std::fs::write(dir.path().join("qemu-aarch64"), QEMU_AARCH64).unwrap();
        std::fs::write(dir.path().join("wine"), WINE).unwrap();
        let b = Binfmt::read(dir.path()).unwrap();
        assert!(b.enabled);
        assert_eq!(b.handlers.len(), 2);
        assert_eq!(b.handlers[0].flags, "POCF");
        assert_eq!(b.handlers[0].magic.len(), 20);
        assert_eq!(
            Binfmt::read(&dir.path().join("absent")).unwrap(),
            Binfmt::default()
        );
    }
}
