//! Running containers with an existing OCI runtime: the run settings, the runtime bundle, and the runtime itself.

pub mod settings;
