//! Keeping containers running: the restart and health decisions (`policy`), and the loop that applies them.
pub mod policy;
