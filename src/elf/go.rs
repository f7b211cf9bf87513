//! Go build information: the toolchain version and build settings (`GOARM`, `GOAMD64`, `GOARM64`) that the Go
//! linker embeds in every binary since Go 1.13, with settings since 1.18.
//!
//! The format follows Go's `debug/buildinfo`: a 16-byte aligned, 32-byte header starting with
//! `"\xff Go buildinf:"`, then a pointer size byte and a flags byte. With flag bit 1 set (Go 1.18 and later) the
//! version and the module information follow the header inline, each a varint length and the bytes. Older
//! binaries instead store two pointers to Go string headers, which must be resolved through the loaded segments.
//! The module information is framed by two 16-byte sentinels and holds tab-separated lines such as
//! `build\tGOARM=7`.
//!
//! Go binaries matter here because Go's own linker does not write `.ARM.attributes`: for a 32-bit ARM Go binary,
//! `GOARM` is the only record of the architecture version it needs.

use serde::Serialize;

/// The magic that starts the build information header.
pub const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
const HEADER_SIZE: u64 = 32;
const ALIGN: u64 = 16;
const FLAG_BIG_ENDIAN: u8 = 0x1;
const FLAG_VERSION_INLINE: u8 = 0x2;
/// The longest varint Go writes (a 64-bit value).
const MAX_VARINT_LEN: u64 = 10;
/// Module information grows with the dependency list; a few thousand modules stay far below this. A longer
/// length field is corruption, and refusing it keeps allocation bounded.
const MAX_STRING_LEN: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoBuildInfoError {
    #[error("the Go build information at address {address:#x} is cut short: {what} is missing")]
    Truncated { address: u64, what: &'static str },
    #[error("the Go build information declares a {size}-byte pointer size (only 4 and 8 exist)")]
    BadPointerSize { size: u8 },
    #[error("the Go build information declares a {length}-byte {what}, longer than any real one")]
    TooLong { what: &'static str, length: u64 },
    #[error("the Go build information has a malformed length for the {what}")]
    BadVarint { what: &'static str },
    #[error("the Go build information has an empty toolchain version")]
    EmptyVersion,
}

/// What a Go binary records about how it was built; only the parts that decide where it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GoBuildInfo {
    /// The toolchain version, e.g. `go1.22.4`.
    pub version: String,
    /// The main package path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goos: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goarch: Option<String>,
    /// `5`, `6` or `7`, since Go 1.22 possibly followed by `,softfloat` or `,hardfloat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goarm: Option<String>,
    /// `v1` .. `v4`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goamd64: Option<String>,
    /// `v8.0` .. `v9.5`, possibly followed by `,lse` and `,crypto`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goarm64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgo_enabled: Option<bool>,
}

/// Where the first 16-byte aligned magic lies in `data`, which is mapped at virtual address `base`.
pub fn find_magic(data: &[u8], base: u64) -> Option<u64> {
    let first = (ALIGN - base % ALIGN) % ALIGN;
    let mut offset = usize::try_from(first).ok()?;
    let step = usize::try_from(ALIGN).ok()?;
    while let Some(window) = data.get(offset..offset.checked_add(MAGIC.len())?) {
        if window == MAGIC {
            return base.checked_add(u64::try_from(offset).ok()?);
        }
        offset = offset.checked_add(step)?;
    }
    None
}

/// Decodes the build information whose header sits at virtual address `address`.
///
/// `read(addr, len)` returns up to `len` bytes mapped from the file at `addr` (fewer where the mapping ends),
/// or `None` when nothing is mapped there.
pub fn decode<'data>(
    address: u64,
    read: &dyn Fn(u64, u64) -> Option<&'data [u8]>,
) -> Result<GoBuildInfo, GoBuildInfoError> {
    let header = read(address, HEADER_SIZE)
        .filter(|h| h.len() as u64 == HEADER_SIZE)
        .ok_or(GoBuildInfoError::Truncated {
            address,
            what: "the 32-byte header",
        })?;
    let ptr_size = header.get(14).copied().unwrap_or_default();
    let flags = header.get(15).copied().unwrap_or_default();
    let (version, modinfo) = if flags & FLAG_VERSION_INLINE != 0 {
        let (version, next) = inline_string(
            address.saturating_add(HEADER_SIZE),
            "toolchain version",
            read,
        )?;
        let (modinfo, _) = inline_string(next, "module information", read)?;
        (version, modinfo)
    } else {
        let big_endian = flags & FLAG_BIG_ENDIAN != 0;
        let size = match ptr_size {
            4 | 8 => usize::from(ptr_size),
            size => return Err(GoBuildInfoError::BadPointerSize { size }),
        };
        let pointer = |bytes: &[u8]| read_uint(bytes, size, big_endian);
        let version_ptr = header.get(16..).and_then(pointer);
        let mod_ptr = header.get(16 + size..).and_then(pointer);
        let version = version_ptr
            .and_then(|p| go_string(p, size, big_endian, read))
            .unwrap_or_default();
        let modinfo = mod_ptr
            .and_then(|p| go_string(p, size, big_endian, read))
            .unwrap_or_default();
        (version, modinfo)
    };
    if version.is_empty() {
        return Err(GoBuildInfoError::EmptyVersion);
    }
    let mut info = parse_modinfo(strip_sentinels(modinfo));
    info.version = String::from_utf8_lossy(version).into_owned();
    Ok(info)
}

/// A varint-prefixed string at `address`; returns it and the address after it.
fn inline_string<'data>(
    address: u64,
    what: &'static str,
    read: &dyn Fn(u64, u64) -> Option<&'data [u8]>,
) -> Result<(&'data [u8], u64), GoBuildInfoError> {
    let prefix =
        read(address, MAX_VARINT_LEN).ok_or(GoBuildInfoError::Truncated { address, what })?;
    let (length, used) = uvarint(prefix).ok_or(GoBuildInfoError::BadVarint { what })?;
    if length > MAX_STRING_LEN {
        return Err(GoBuildInfoError::TooLong { what, length });
    }
    // Addresses come from the file: saturate rather than wrap, so a hostile one reads nothing.
    let start = address.saturating_add(used);
    let bytes = read(start, length)
        .filter(|b| b.len() as u64 == length)
        .ok_or(GoBuildInfoError::Truncated {
            address: start,
            what,
        })?;
    Ok((bytes, start.saturating_add(length)))
}

/// A Go string header (data pointer, length) at `address`, resolved; `None` when anything is unmapped, as Go's
/// reader treats it.
fn go_string<'data>(
    address: u64,
    ptr_size: usize,
    big_endian: bool,
    read: &dyn Fn(u64, u64) -> Option<&'data [u8]>,
) -> Option<&'data [u8]> {
    let header = read(address, 2 * ptr_size as u64)?;
    let data = read_uint(header, ptr_size, big_endian)?;
    let len = read_uint(header.get(ptr_size..)?, ptr_size, big_endian)?;
    if len > MAX_STRING_LEN {
        return None;
    }
    read(data, len).filter(|b| b.len() as u64 == len)
}

fn read_uint(bytes: &[u8], size: usize, big_endian: bool) -> Option<u64> {
    let bytes = bytes.get(..size)?;
    let fold = |acc: u64, b: &u8| (acc << 8) | u64::from(*b);
    Some(if big_endian {
        bytes.iter().fold(0, fold)
    } else {
        bytes.iter().rev().fold(0, fold)
    })
}

/// Go's `encoding/binary.Uvarint`: the value and the number of bytes used, `None` if malformed or too long.
fn uvarint(bytes: &[u8]) -> Option<(u64, u64)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().take(MAX_VARINT_LEN as usize).enumerate() {
        let low = u64::from(b & 0x7f);
        let shift = 7 * i as u32;
        if i == 9 && *b > 1 {
            return None;
        }
        value |= low << shift;
        if b & 0x80 == 0 {
            return Some((value, i as u64 + 1));
        }
    }
    None
}

/// Drops the 16-byte sentinels `cmd/go` frames the module information with; anything unframed is not module
/// information (Go's reader returns nothing for it too).
fn strip_sentinels(modinfo: &[u8]) -> &[u8] {
    let len = modinfo.len();
    if len >= 33 && modinfo.get(len - 17) == Some(&b'\n') {
        modinfo.get(16..len - 16).unwrap_or_default()
    } else {
        &[]
    }
}

fn parse_modinfo(modinfo: &[u8]) -> GoBuildInfo {
    let text = String::from_utf8_lossy(modinfo);
    let mut info = GoBuildInfo::default();
    for line in text.lines() {
        let mut fields = line.splitn(2, '\t');
        match (fields.next(), fields.next()) {
            (Some("path"), Some(path)) => info.path = Some(path.to_string()),
            (Some("build"), Some(setting)) => {
                let Some((key, value)) = setting.split_once('=') else {
                    continue;
                };
                let value = Some(value.to_string());
                match key {
                    "GOOS" => info.goos = value,
                    "GOARCH" => info.goarch = value,
                    "GOARM" => info.goarm = value,
                    "GOAMD64" => info.goamd64 = value,
                    "GOARM64" => info.goarm64 = value,
                    "CGO_ENABLED" => info.cgo_enabled = Some(setting.ends_with("=1")),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    info
}

/// Builds a Go 1.18+ build information blob; used by tests here and in the ELF module.
#[cfg(test)]
pub(crate) fn inline_blob(version: &str, modinfo_lines: &str) -> Vec<u8> {
    let mut blob = MAGIC.to_vec();
    blob.push(8);
    blob.push(FLAG_VERSION_INLINE);
    blob.resize(HEADER_SIZE as usize, 0);
    let mut modinfo = vec![0x30; 16];
    modinfo.extend_from_slice(modinfo_lines.as_bytes());
    modinfo.extend_from_slice(&[0x31; 16]);
    for s in [version.as_bytes(), &modinfo] {
        let mut n = s.len();
        while n >= 0x80 {
            blob.push((n as u8) | 0x80);
            n >>= 7;
        }
        blob.push(n as u8);
        blob.extend_from_slice(s);
    }
    blob
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MODINFO: &str = "path\texample.com/app\nmod\texample.com/app\t(devel)\t\nbuild\t-compiler=gc\n\
                           build\tCGO_ENABLED=0\nbuild\tGOARCH=arm\nbuild\tGOOS=linux\nbuild\tGOARM=6\n";

    fn reader<'a>(base: u64, data: &'a [u8]) -> impl Fn(u64, u64) -> Option<&'a [u8]> {
        move |addr, len| {
            let start = usize::try_from(addr.checked_sub(base)?).ok()?;
            let rest = data.get(start..)?;
            rest.get(..usize::try_from(len).ok()?.min(rest.len()))
        }
    }

    #[test]
    fn reads_inline_build_info() {
        let blob = inline_blob("go1.22.4", MODINFO);
        let info = decode(0x1000, &reader(0x1000, &blob)).unwrap();
        assert_eq!(info.version, "go1.22.4");
        assert_eq!(info.path.as_deref(), Some("example.com/app"));
        assert_eq!(info.goarm.as_deref(), Some("6"));
        assert_eq!(info.goarch.as_deref(), Some("arm"));
        assert_eq!(info.cgo_enabled, Some(false));
        assert_eq!(info.goamd64, None);
    }

    #[test]
    fn reads_pre_1_18_pointer_format() {
        // Header at 0x100, version string header at 0x120, module string header at 0x128, bytes after.
        let mut data = vec![0u8; 0x200];
        let put = |data: &mut Vec<u8>, at: usize, bytes: &[u8]| {
            data.splice(at..at + bytes.len(), bytes.iter().copied());
        };
        put(&mut data, 0x100, MAGIC);
        put(&mut data, 0x10e, &[4, 0]);
        put(&mut data, 0x110, &0x120u32.to_le_bytes());
        put(&mut data, 0x114, &0x128u32.to_le_bytes());
        put(&mut data, 0x120, &0x140u32.to_le_bytes());
        put(&mut data, 0x124, &8u32.to_le_bytes());
        put(&mut data, 0x140, b"go1.16.2");
        let info = decode(0x100, &reader(0, &data)).unwrap();
        assert_eq!(info.version, "go1.16.2");
        assert_eq!(info.goarm, None);
    }

    #[test]
    fn addresses_at_the_top_of_memory_do_not_wrap() {
        let blob = inline_blob("go1.22.4", MODINFO);
        // Debug builds panic on overflow: before saturating, the module string's end wrapped here.
        let base = u64::MAX - 40;
        let _ = decode(base, &reader(base, &blob));
    }

    #[test]
    fn finds_only_aligned_magic() {
        let mut data = vec![0u8; 8];
        data.extend_from_slice(MAGIC);
        assert_eq!(find_magic(&data, 0x1000), None);
        assert_eq!(find_magic(&data, 0x1008), Some(0x1010));
        assert_eq!(find_magic(&[], 0), None);
    }

    #[test]
    fn corrupt_blobs_are_errors() {
        let blob = inline_blob("go1.22.4", MODINFO);
        for cut in 0..blob.len() {
            let short = blob.get(..cut).unwrap();
            assert!(decode(0, &reader(0, short)).is_err(), "cut at {cut}");
        }
        let mut huge = blob.get(..32).unwrap().to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(
            decode(0, &reader(0, &huge)),
            Err(GoBuildInfoError::TooLong { .. })
        ));
        let mut bad_ptr = blob.clone();
        bad_ptr[14] = 3;
        bad_ptr[15] = 0;
        assert_eq!(
            decode(0, &reader(0, &bad_ptr)),
            Err(GoBuildInfoError::BadPointerSize { size: 3 })
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_mutated_blobs(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut blob = inline_blob("go1.22.4", MODINFO);
            for (index, value) in edits {
                let i = index.index(blob.len());
                if let Some(b) = blob.get_mut(i) {
                    *b = value;
                }
            }
            let _ = decode(0, &reader(0, &blob));
            let _ = find_magic(&blob, 0);
        }
    }
}
