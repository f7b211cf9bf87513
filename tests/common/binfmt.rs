//! binfmt_misc registration for the tests that run foreign code through qemu-user. Registration is machine-wide:
//! a test that takes it owns it until the guard drops, and test binaries run one after another.

use std::path::Path;
use std::process::Command;

/// The qemu handlers this test needs, registered from Debian's `/usr/lib/binfmt.d/` files with the `F` flag (the
/// interpreter is opened at registration: a container's root has no qemu). What was registered before is put back.
pub struct Binfmt {
    mounted_here: bool,
    entries: Vec<(String, String, Option<bool>)>,
}

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";

impl Binfmt {
    pub fn take() -> Option<Binfmt> {
        let mut mounted_here = false;
        if !Path::new(BINFMT).join("register").exists() {
            let ok = Command::new("mount")
                .args(["-t", "binfmt_misc", "binfmt_misc", BINFMT])
                .status()
                .ok()?
                .success();
            if !ok {
                return None;
            }
            mounted_here = true;
        }
        let mut entries = Vec::new();
        for name in ["qemu-aarch64", "qemu-arm"] {
            let conf = std::fs::read_to_string(format!("/usr/lib/binfmt.d/{name}.conf")).ok()?;
            let line = conf.lines().find(|l| l.starts_with(':'))?.to_string();
            // Debian ships OPF; F is what matters here, and is there, but make sure.
            let line = if line.ends_with('F')
                || line.rsplit(':').next().is_some_and(|f| f.contains('F'))
            {
                line
            } else {
                format!("{line}F")
            };
            let before = std::fs::read_to_string(Path::new(BINFMT).join(name))
                .ok()
                .map(|s| s.starts_with("enabled"));
            entries.push((name.to_string(), line, before));
        }
        Some(Binfmt {
            mounted_here,
            entries,
        })
    }

    pub fn unregister_all(&self) {
        for (name, _, _) in &self.entries {
            let _ = std::fs::write(Path::new(BINFMT).join(name), "-1");
        }
    }

    pub fn register_all(&self) {
        for (name, line, _) in &self.entries {
            if !Path::new(BINFMT).join(name).exists() {
                std::fs::write(Path::new(BINFMT).join("register"), line)
                    .expect("register binfmt handler");
            }
        }
    }
}

impl Drop for Binfmt {
    fn drop(&mut self) {
        self.unregister_all();
        for (name, line, before) in &self.entries {
            if let Some(enabled) = before {
                let _ = std::fs::write(Path::new(BINFMT).join("register"), line);
                if !enabled {
                    let _ = std::fs::write(Path::new(BINFMT).join(name), "0");
                }
            }
        }
        if self.mounted_here {
            let _ = Command::new("umount").arg(BINFMT).status();
        }
    }
}
