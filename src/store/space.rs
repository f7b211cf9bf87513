//! Free disk space, checked before a pull downloads anything: an edge device with a full disk is worse off than
//! one that refused an update.

use std::path::Path;

use super::StoreError;

/// Fixed part of the margin: room for `index.json` rewrites, logs and the filesystem's own needs.
pub const MARGIN_FIXED: u64 = 64 << 20;
/// Proportional part of the margin, in percent: filesystem block rounding and metadata on many small files.
pub const MARGIN_PERCENT: u64 = 10;

/// The OS boundary: bytes an unprivileged write could still use on the filesystem holding `path`.
pub trait FreeSpace {
    fn available_bytes(&self, path: &Path) -> std::io::Result<u64>;
}

/// The real filesystem, through `statvfs(3)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Statvfs;

impl FreeSpace for Statvfs {
    fn available_bytes(&self, path: &Path) -> std::io::Result<u64> {
        let s = rustix::fs::statvfs(path)?;
        // f_bavail, not f_bfree: the blocks reserved for root are not ours to fill even when running as root.
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }
}

/// Bytes that must be free for a pull of `download` new bytes that unpack to `unpacked` bytes.
pub fn space_needed(download: u64, unpacked: u64) -> u64 {
    let n = download.saturating_add(unpacked);
    n.saturating_add(n / 100 * MARGIN_PERCENT)
        .saturating_add(MARGIN_FIXED)
}

/// Refuses with the numbers when the filesystem holding `path` has less than [`space_needed`] free.
pub fn check_space(
    space: &dyn FreeSpace,
    path: &Path,
    download: u64,
    unpacked: u64,
) -> Result<(), StoreError> {
    let available = space
        .available_bytes(path)
        .map_err(super::io_err("measure free space on", path))?;
    let needed = space_needed(download, unpacked);
    if available < needed {
        return Err(StoreError::InsufficientSpace {
            path: path.to_path_buf(),
            needed,
            available,
            download,
            unpacked,
        });
    }
    Ok(())
}
