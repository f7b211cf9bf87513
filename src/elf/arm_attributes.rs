//! The `.ARM.attributes` section: the EABI build attributes a 32-bit ARM toolchain records about the code it
//! produced (target architecture, FP and SIMD units, Thumb level, float calling convention).
//!
//! Hand-written on purpose: no well-kept crate parses the EABI build attributes (`object` exposes the section
//! bytes, not their meaning), and the format is small — a version byte, length-prefixed vendor subsections, and
//! inside the `aeabi` one a list of ULEB128 tags each followed by a ULEB128 number or a NUL-terminated string.
//! The layout follows "Addenda to, and Errata in, the ABI for the Arm Architecture" (build attributes chapter).
//!
//! The input is untrusted (it comes from image layers): every read is bounds-checked, every loop consumes input,
//! and nothing is allocated in proportion to a length field.

use std::fmt;

use serde::{Serialize, Serializer};

/// The only format version the ABI defines: the ASCII letter `A`.
const FORMAT_VERSION: u8 = b'A';
/// Attributes that apply to the whole file; `Tag_Section` (2) and `Tag_Symbol` (3) scope them to parts of it.
const TAG_FILE: u64 = 1;
const TAG_SECTION: u64 = 2;
const TAG_SYMBOL: u64 = 3;

const TAG_CPU_RAW_NAME: u64 = 4;
const TAG_CPU_NAME: u64 = 5;
const TAG_CPU_ARCH: u64 = 6;
const TAG_CPU_ARCH_PROFILE: u64 = 7;
const TAG_THUMB_ISA_USE: u64 = 9;
const TAG_FP_ARCH: u64 = 10;
const TAG_ADVANCED_SIMD_ARCH: u64 = 12;
const TAG_ABI_VFP_ARGS: u64 = 28;
/// Carries a ULEB128 flag followed by a string, the one exception to the parity rule below.
const TAG_COMPATIBILITY: u64 = 32;
const TAG_ALSO_COMPATIBLE_WITH: u64 = 65;
const TAG_CONFORMANCE: u64 = 67;

/// Why an attribute section could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributeError {
    #[error("the attribute section is empty")]
    Empty,
    #[error("attribute format version {0:#04x} is not the only known one (0x41, 'A')")]
    UnknownVersion(u8),
    #[error("truncated at byte {offset}: {what} runs past the end of the section")]
    Truncated { offset: usize, what: &'static str },
    #[error(
        "subsection at byte {offset} declares length {length}, which does not fit the {available} bytes left"
    )]
    BadLength {
        offset: usize,
        length: u64,
        available: usize,
    },
    #[error("a ULEB128 number at byte {offset} does not fit in 64 bits")]
    NumberTooLarge { offset: usize },
    #[error(
        "unknown attribute scope tag {tag} at byte {offset} (expected 1 file, 2 section or 3 symbol)"
    )]
    UnknownScope { offset: usize, tag: u64 },
}

/// The file-scope attributes that say what a CPU must have to run the code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArmAttributes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_arch: Option<CpuArch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_arch_profile: Option<CpuProfile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumb_isa_use: Option<ThumbIsa>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp_arch: Option<FpArch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advanced_simd_arch: Option<SimdArch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abi_vfp_args: Option<VfpArgs>,
}

/// Newtypes over the raw attribute numbers: values newer than this table still round-trip and print as numbers.
macro_rules! attribute_value {
    ($(#[$doc:meta])* $name:ident, $label:literal, { $($value:literal => $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The name binutils and the ABI use for this value, if it is one this code knows.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some($text),)*
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "unknown {} value {}", $label, self.0),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
    };
}

attribute_value!(
    /// `Tag_CPU_arch`: the architecture version the code was built for.
    CpuArch, "Tag_CPU_arch", {
        0 => "pre-v4", 1 => "v4", 2 => "v4T", 3 => "v5T", 4 => "v5TE", 5 => "v5TEJ", 6 => "v6", 7 => "v6KZ",
        8 => "v6T2", 9 => "v6K", 10 => "v7", 11 => "v6-M", 12 => "v6S-M", 13 => "v7E-M", 14 => "v8",
        15 => "v8-R", 16 => "v8-M.baseline", 17 => "v8-M.mainline", 18 => "v8.1-A", 19 => "v8.2-A",
        20 => "v8.3-A", 21 => "v8.1-M.mainline", 22 => "v9",
    }
);

attribute_value!(
    /// `Tag_CPU_arch_profile`: stored as the ASCII letter of the profile.
    CpuProfile, "Tag_CPU_arch_profile", {
        0 => "none", 0x41 => "Application", 0x52 => "Realtime", 0x4d => "Microcontroller",
        0x53 => "Application or Realtime",
    }
);

attribute_value!(
    /// `Tag_THUMB_ISA_use`.
    ThumbIsa, "Tag_THUMB_ISA_use", {
        0 => "none", 1 => "Thumb-1", 2 => "Thumb-2", 3 => "Thumb (as the architecture allows)",
    }
);

attribute_value!(
    /// `Tag_FP_arch`: the floating-point unit the code uses.
    FpArch, "Tag_FP_arch", {
        0 => "none", 1 => "VFPv1", 2 => "VFPv2", 3 => "VFPv3", 4 => "VFPv3-D16", 5 => "VFPv4",
        6 => "VFPv4-D16", 7 => "FP-ARMv8", 8 => "FPv5/FP-D16 for ARMv8",
    }
);

attribute_value!(
    /// `Tag_Advanced_SIMD_arch`: NEON.
    SimdArch, "Tag_Advanced_SIMD_arch", {
        0 => "none", 1 => "NEONv1", 2 => "NEONv1 with fused MAC", 3 => "NEON for ARMv8",
        4 => "NEON for ARMv8.1",
    }
);

attribute_value!(
    /// `Tag_ABI_VFP_args`: which registers carry floating-point arguments.
    VfpArgs, "Tag_ABI_VFP_args", {
        0 => "core registers (soft-float)", 1 => "VFP registers (hard-float)", 2 => "toolchain-specific",
        3 => "compatible with both",
    }
);

/// Parses a `.ARM.attributes` section. `big_endian` is the byte order of the ELF file, which the 32-bit
/// length fields follow.
pub fn parse(data: &[u8], big_endian: bool) -> Result<ArmAttributes, AttributeError> {
    if data.is_empty() {
        return Err(AttributeError::Empty);
    }
    let mut cursor = Cursor {
        data,
        pos: 0,
        big_endian,
    };
    let version = cursor.byte("the format version")?;
    if version != FORMAT_VERSION {
        return Err(AttributeError::UnknownVersion(version));
    }
    let mut attributes = ArmAttributes::default();
    while !cursor.at_end() {
        let start = cursor.pos;
        let length = cursor.u32("a subsection length")?;
        let mut body = cursor.sub(start, length, 4)?;
        let vendor = body.string("a vendor name")?;
        // Other vendors (`gnu`, toolchain-private ones) describe nothing a CPU must have.
        if vendor == b"aeabi" {
            parse_aeabi(&mut body, &mut attributes)?;
        }
    }
    Ok(attributes)
}

fn parse_aeabi(body: &mut Cursor<'_>, out: &mut ArmAttributes) -> Result<(), AttributeError> {
    while !body.at_end() {
        let start = body.pos;
        let scope = body.uleb("a scope tag")?;
        let length = body.u32("a scope length")?;
        let header = body.pos - start;
        let mut scoped = body.sub(start, length, header)?;
        match scope {
            TAG_FILE => parse_file_attributes(&mut scoped, out)?,
            // Section- and symbol-scoped attributes refine parts of a relocatable object; executables carry
            // their requirements at file scope.
            TAG_SECTION | TAG_SYMBOL => {}
            tag => {
                return Err(AttributeError::UnknownScope { offset: start, tag });
            }
        }
    }
    Ok(())
}

fn parse_file_attributes(
    scoped: &mut Cursor<'_>,
    out: &mut ArmAttributes,
) -> Result<(), AttributeError> {
    while !scoped.at_end() {
        let tag = scoped.uleb("an attribute tag")?;
        match tag {
            TAG_CPU_NAME => {
                out.cpu_name = Some(String::from_utf8_lossy(scoped.string("Tag_CPU_name")?).into());
            }
            TAG_CPU_RAW_NAME | TAG_ALSO_COMPATIBLE_WITH | TAG_CONFORMANCE => {
                scoped.string("a string attribute")?;
            }
            TAG_COMPATIBILITY => {
                scoped.uleb("Tag_compatibility")?;
                scoped.string("Tag_compatibility")?;
            }
            TAG_CPU_ARCH => out.cpu_arch = Some(CpuArch(scoped.uleb("Tag_CPU_arch")?)),
            TAG_CPU_ARCH_PROFILE => {
                out.cpu_arch_profile = Some(CpuProfile(scoped.uleb("Tag_CPU_arch_profile")?));
            }
            TAG_THUMB_ISA_USE => {
                out.thumb_isa_use = Some(ThumbIsa(scoped.uleb("Tag_THUMB_ISA_use")?));
            }
            TAG_FP_ARCH => out.fp_arch = Some(FpArch(scoped.uleb("Tag_FP_arch")?)),
            TAG_ADVANCED_SIMD_ARCH => {
                out.advanced_simd_arch = Some(SimdArch(scoped.uleb("Tag_Advanced_SIMD_arch")?));
            }
            TAG_ABI_VFP_ARGS => out.abi_vfp_args = Some(VfpArgs(scoped.uleb("Tag_ABI_VFP_args")?)),
            // The ABI's rule for tags a reader does not know: below 32 they are numbers, from 32 on odd tags
            // are strings and even tags numbers. That lets newer sections parse without a newer table.
            t if t >= 32 && t % 2 == 1 => {
                scoped.string("a string attribute")?;
            }
            _ => {
                scoped.uleb("a numeric attribute")?;
            }
        }
    }
    Ok(())
}

/// A bounds-checked reader. A nested block keeps the section's start, so offsets in errors count from it.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    big_endian: bool,
}

impl<'a> Cursor<'a> {
    fn at_end(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn truncated(&self, what: &'static str) -> AttributeError {
        AttributeError::Truncated {
            offset: self.pos,
            what,
        }
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, AttributeError> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or_else(|| self.truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, AttributeError> {
        let bytes: [u8; 4] = self
            .data
            .get(self.pos..self.pos.saturating_add(4))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| self.truncated(what))?;
        self.pos += 4;
        Ok(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }

    fn uleb(&mut self, what: &'static str) -> Result<u64, AttributeError> {
        let start = self.pos;
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.byte(what)?;
            let low = u64::from(b & 0x7f);
            if shift >= 64 || (shift > 0 && low >> (64 - shift) != 0) {
                return Err(AttributeError::NumberTooLarge { offset: start });
            }
            value |= low << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// A NUL-terminated string, without its terminator.
    fn string(&mut self, what: &'static str) -> Result<&'a [u8], AttributeError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated(what))?;
        let s = rest.get(..len).unwrap_or_default();
        self.pos += len + 1;
        Ok(s)
    }

    /// Takes the block that started at `start` with total `length` (its header of `header` bytes already read)
    /// and returns a cursor over the rest of it.
    fn sub(
        &mut self,
        start: usize,
        length: u32,
        header: usize,
    ) -> Result<Cursor<'a>, AttributeError> {
        let available = self.data.len().saturating_sub(start);
        let length_usize = usize::try_from(length).unwrap_or(usize::MAX);
        if length_usize < header || length_usize > available {
            return Err(AttributeError::BadLength {
                offset: start,
                length: u64::from(length),
                available,
            });
        }
        let end = start + length_usize;
        let body = Cursor {
            data: self.data.get(..end).unwrap_or_default(),
            pos: self.pos,
            big_endian: self.big_endian,
        };
        self.pos = end;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The file-scope block of Debian armhf busybox, as `readelf -A` lists it.
    fn armhf_section() -> Vec<u8> {
        let mut attrs = vec![5];
        attrs.extend_from_slice(b"7-A\0");
        attrs.extend_from_slice(&[
            6, 10, 7, 0x41, 8, 1, 9, 2, 10, 3, 12, 1, 18, 4, 20, 1, 21, 1, 23, 3,
        ]);
        attrs.extend_from_slice(&[24, 1, 25, 1, 26, 2, 28, 1, 34, 1]);
        section(&attrs, false)
    }

    fn section(file_attrs: &[u8], big_endian: bool) -> Vec<u8> {
        let u32b = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut file_scope = vec![1];
        file_scope.extend_from_slice(&u32b(5 + file_attrs.len() as u32));
        file_scope.extend_from_slice(file_attrs);
        let mut sub = Vec::new();
        sub.extend_from_slice(&u32b(4 + 6 + file_scope.len() as u32));
        sub.extend_from_slice(b"aeabi\0");
        sub.extend_from_slice(&file_scope);
        let mut out = vec![b'A'];
        out.extend_from_slice(&sub);
        out
    }

    #[test]
    fn reads_debian_armhf_attributes() {
        let a = parse(&armhf_section(), false).unwrap();
        assert_eq!(a.cpu_name.as_deref(), Some("7-A"));
        assert_eq!(a.cpu_arch, Some(CpuArch(10)));
        assert_eq!(a.cpu_arch.unwrap().to_string(), "v7");
        assert_eq!(a.cpu_arch_profile.unwrap().to_string(), "Application");
        assert_eq!(a.thumb_isa_use.unwrap().to_string(), "Thumb-2");
        assert_eq!(a.fp_arch.unwrap().to_string(), "VFPv3");
        assert_eq!(a.advanced_simd_arch.unwrap().to_string(), "NEONv1");
        assert_eq!(a.abi_vfp_args, Some(VfpArgs(1)));
    }

    #[test]
    fn big_endian_lengths_and_unknown_tags() {
        // Tag 33 (odd, >= 32) is a string, tag 70 (even) a number, tag 32 a number then a string.
        let attrs = [
            6, 4, 33, b'x', 0, 70, 0x81, 0x01, 32, 0, b'g', b'n', b'u', 0, 9, 1,
        ];
        let a = parse(&section(&attrs, true), true).unwrap();
        assert_eq!(a.cpu_arch.unwrap().to_string(), "v5TE");
        assert_eq!(a.thumb_isa_use, Some(ThumbIsa(1)));
        assert_eq!(CpuArch(99).to_string(), "unknown Tag_CPU_arch value 99");
    }

    #[test]
    fn other_vendors_are_skipped() {
        let mut data = vec![b'A'];
        data.extend_from_slice(&12u32.to_le_bytes());
        data.extend_from_slice(b"gnu\0\x01\x02\x03\x04");
        data.extend_from_slice(armhf_section().get(1..).unwrap());
        assert_eq!(parse(&data, false).unwrap().cpu_arch, Some(CpuArch(10)));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert_eq!(parse(&[], false), Err(AttributeError::Empty));
        assert!(matches!(
            parse(b"B", false),
            Err(AttributeError::UnknownVersion(b'B'))
        ));
        assert!(matches!(
            parse(b"A\xff\xff\xff\xff", false),
            Err(AttributeError::BadLength { .. })
        ));
        assert!(matches!(
            parse(b"A\x02\x00\x00\x00", false),
            Err(AttributeError::BadLength { .. })
        ));
        assert!(matches!(
            parse(b"A\x01\x00", false),
            Err(AttributeError::Truncated { .. })
        ));
        // "A" alone is a valid, empty section; any cut inside the subsection is not.
        let full = armhf_section();
        for cut in 2..full.len() {
            assert!(
                parse(full.get(..cut).unwrap(), false).is_err(),
                "cut at {cut}"
            );
        }
        let huge = [
            6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ];
        assert!(matches!(
            parse(&section(&huge, false), false),
            Err(AttributeError::NumberTooLarge { .. })
        ));
        let bad_scope = {
            let mut s = section(&[6, 10], false);
            if let Some(b) = s.get_mut(11) {
                *b = 9;
            }
            s
        };
        assert!(matches!(
            parse(&bad_scope, false),
            Err(AttributeError::UnknownScope { tag: 9, .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512), be: bool) {
            let _ = parse(&data, be);
        }

        #[test]
        fn never_panics_on_mutated_sections(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut data = armhf_section();
            for (index, value) in edits {
                let i = index.index(data.len());
                if let Some(b) = data.get_mut(i) {
                    *b = value;
                }
            }
            let _ = parse(&data, false);
        }

        #[test]
        fn arbitrary_attribute_lists_parse_or_fail_cleanly(
            attrs in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = parse(&section(&attrs, false), false);
        }
    }
}
