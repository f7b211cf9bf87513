//! The image configuration: the platform it was built for, what to run, and the layers' uncompressed digests.

use serde::Deserialize;

use crate::digest::Digest;

/// The parts of an image configuration that flotilla reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<ExecConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    /// The program the container starts: the entrypoint's first word, else the command's.
    pub fn program(&self) -> Option<&str> {
        let exec = self.config.as_ref()?;
        exec.entrypoint
            .as_ref()
            .and_then(|v| v.first())
            .or_else(|| exec.cmd.as_ref().and_then(|v| v.first()))
            .map(String::as_str)
    }

    /// The value of `name` in the configuration's environment.
    pub fn env(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}=");
        self.config
            .as_ref()?
            .env
            .as_ref()?
            .iter()
            .find_map(|e| e.strip_prefix(&prefix))
    }
}
