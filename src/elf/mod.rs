//! What an executable needs from the machine that runs it, read from its ELF headers, its `.ARM.attributes`
//! and, for Go binaries, the build settings the Go linker records — and whether a host can give it that.
//!
//! An image's index label (`linux/arm/v7`) is a claim; the binaries are the evidence. Debian's armhf busybox
//! says `Tag_CPU_arch: v7` and dies with SIGILL on a Pi Zero's ARM1176, whatever the label said. Everything here
//! is pure over bytes except [`inspect_file`], which reads only the parts of a file it needs (image pulls call it
//! on every executable of every layer).

pub mod arm_attributes;
pub mod go;

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
use object::{Endianness, ReadCache, ReadRef};
use serde::{Serialize, Serializer};

use crate::platform::Platform;
use arm_attributes::{ArmAttributes, AttributeError, VfpArgs};
use go::{GoBuildInfo, GoBuildInfoError};

/// The kernel reads this much of a file to recognise its format and a `#!` line (`BINPRM_BUF_SIZE`).
const PROBE_LEN: u64 = 256;
/// The offset of the class byte (32- or 64-bit) in the identification bytes.
const EI_CLASS: usize = 4;
/// The kernel refuses a longer `PT_INTERP` (`PATH_MAX`).
const MAX_INTERPRETER_LEN: u64 = 4096;
/// Real attribute sections are tens of bytes; anything this large is corruption.
const MAX_ATTRIBUTES_LEN: u64 = 1 << 20;
/// Without section headers, the Go build information is found by scanning the data segment; the Go linker puts
/// it at the very start, so a bounded scan finds it without reading large data segments whole.
const GO_SEARCH_LIMIT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a regular file: give the path of an executable")]
    NotAFile { path: PathBuf },
    #[error("in {path}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ElfError>,
    },
    #[error("the file is empty: it is neither an ELF executable nor a #! script")]
    Empty,
    #[error("not an ELF executable or #! script (it starts with bytes {start})")]
    NotElf { start: String },
    #[error("a #! script without an interpreter path on its first line")]
    ScriptWithoutInterpreter,
    #[error("ELF class {0} is neither 1 (32-bit) nor 2 (64-bit): the file is corrupt")]
    BadClass(u8),
    #[error("malformed ELF file: {what}: {detail} (the file is truncated or corrupt)")]
    Malformed { what: &'static str, detail: String },
    #[error("the PT_INTERP segment is {0} bytes, longer than any path the kernel accepts")]
    InterpreterTooLong(u64),
    #[error(
        "the .ARM.attributes section is {0} bytes, far larger than any real one: the file is corrupt"
    )]
    AttributesTooLarge(u64),
    #[error("unreadable .ARM.attributes section")]
    ArmAttributes(#[from] AttributeError),
    #[error("unreadable Go build information")]
    GoBuildInfo(#[from] GoBuildInfoError),
}

impl ElfError {
    fn malformed(what: &'static str) -> impl FnOnce(object::read::Error) -> ElfError {
        move |e| ElfError::Malformed {
            what,
            detail: e.to_string(),
        }
    }

    /// For `ReadRef` reads, which fail without detail only when the range lies outside the file.
    fn unreadable(what: &'static str) -> impl FnOnce(()) -> ElfError {
        move |()| ElfError::Malformed {
            what,
            detail: "it lies beyond the end of the file or cannot be read".into(),
        }
    }
}

/// What a file needs to run: an ELF binary's requirements, or the interpreter a script names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BinaryRequirements {
    Elf(Box<ElfRequirements>),
    /// A `#!` script: it runs wherever its interpreter runs, so callers follow `interpreter`.
    Script(Script),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Script {
    pub interpreter: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argument: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ElfRequirements {
    /// The machine by its ELF name: `arm`, `aarch64`, `x86_64`, `i386`, `riscv`, ...
    pub machine: String,
    pub e_machine: u16,
    /// 32 or 64.
    pub class: u8,
    pub endianness: ByteOrder,
    pub os_abi: String,
    pub file_type: FileType,
    pub linking: Linking,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<Interpreter>,
    /// The smallest `p_align` of the `PT_LOAD` segments: the largest page size the kernel can map them with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_alignment: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arm: Option<ArmInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub go: Option<GoBuildInfo>,
    /// The lowest platform that can run it; `None` when the machine has no OCI platform name. A 32-bit ARM
    /// binary that records no architecture version has `variant: None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Why `platform` is what it is, one piece of evidence each, e.g. "Tag_CPU_arch v7 (from .ARM.attributes)".
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ByteOrder {
    Little,
    Big,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Executable,
    /// `ET_DYN`: a position-independent executable or a shared library.
    SharedObject,
    Relocatable,
    Core,
    Other(u16),
}

impl FileType {
    fn from_e_type(e_type: u16) -> FileType {
        match e_type {
            elf::ET_EXEC => FileType::Executable,
            elf::ET_DYN => FileType::SharedObject,
            elf::ET_REL => FileType::Relocatable,
            elf::ET_CORE => FileType::Core,
            other => FileType::Other(other),
        }
    }

    fn can_execute(self) -> bool {
        matches!(self, FileType::Executable | FileType::SharedObject)
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileType::Executable => f.write_str("executable"),
            FileType::SharedObject => {
                f.write_str("position-independent executable or shared library")
            }
            FileType::Relocatable => f.write_str("relocatable object"),
            FileType::Core => f.write_str("core dump"),
            FileType::Other(t) => write!(f, "ELF type {t:#x}"),
        }
    }
}

impl Serialize for FileType {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Linking {
    /// No interpreter: the kernel jumps straight into it.
    Static,
    /// No interpreter but a dynamic section: it relocates itself.
    StaticPie,
    /// Needs the dynamic loader named in `PT_INTERP`, and that loader's libraries, in the image.
    Dynamic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Libc {
    Glibc,
    Musl,
    Uclibc,
    Bionic,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interpreter {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libc: Option<Libc>,
    /// What the loader's name says about the ABI, e.g. "ARM hard-float (armhf)".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abi: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatAbi {
    Hard,
    Soft,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArmInfo {
    pub e_flags: u32,
    /// The EABI version from the top byte of `e_flags` (5 for every current toolchain, 0 for the old ABI).
    pub eabi_version: u8,
    pub float_abi: FloatAbi,
    /// Where `float_abi` came from: "e_flags", "Tag_ABI_VFP_args" or "interpreter".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub float_abi_source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<ArmAttributes>,
}

/// Reads what `data` (a whole file) needs to run.
pub fn inspect(data: &[u8]) -> Result<BinaryRequirements, ElfError> {
    inspect_ref(data)
}

/// Reads what the file at `path` needs to run, reading only the headers and the few sections that matter.
pub fn inspect_file(path: &Path) -> Result<BinaryRequirements, ElfError> {
    let io = |source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(io)?;
    if !metadata.is_file() {
        return Err(ElfError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(io)?;
    let cache = ReadCache::new(file);
    inspect_ref(&cache).map_err(|e| ElfError::InFile {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

fn inspect_ref<'data, R: ReadRef<'data>>(data: R) -> Result<BinaryRequirements, ElfError> {
    let len = data.len().map_err(ElfError::unreadable("file size"))?;
    if len == 0 {
        return Err(ElfError::Empty);
    }
    let probe = data
        .read_bytes_at(0, len.min(PROBE_LEN))
        .map_err(ElfError::unreadable("file start"))?;
    if probe.starts_with(b"#!") {
        return parse_script(probe).map(BinaryRequirements::Script);
    }
    if elf::ELFMAG.starts_with(probe) {
        return Err(ElfError::Malformed {
            what: "ELF header",
            detail: "the file ends inside the ELF magic".into(),
        });
    }
    if !probe.starts_with(&elf::ELFMAG) {
        let start = probe
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(ElfError::NotElf { start });
    }
    let requirements = match probe.get(EI_CLASS).copied() {
        Some(elf::ELFCLASS32) => inspect_elf::<elf::FileHeader32<Endianness>, R>(data)?,
        Some(elf::ELFCLASS64) => inspect_elf::<elf::FileHeader64<Endianness>, R>(data)?,
        Some(class) => return Err(ElfError::BadClass(class)),
        None => {
            return Err(ElfError::Malformed {
                what: "ELF header",
                detail: "the file ends inside the identification bytes".into(),
            });
        }
    };
    Ok(BinaryRequirements::Elf(Box::new(requirements)))
}

/// The kernel's reading of a `#!` line: the interpreter path, then at most one argument (the rest of the line).
fn parse_script(probe: &[u8]) -> Result<Script, ElfError> {
    let line = probe.get(2..).unwrap_or_default();
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let line = line.trim_matches(|c| c == ' ' || c == '\t' || c == '\r');
    let (interpreter, argument) = match line.split_once([' ', '\t']) {
        Some((i, a)) => (i, Some(a.trim_matches([' ', '\t']).to_string())),
        None => (line, None),
    };
    if interpreter.is_empty() {
        return Err(ElfError::ScriptWithoutInterpreter);
    }
    Ok(Script {
        interpreter: interpreter.to_string(),
        argument: argument.filter(|a| !a.is_empty()),
    })
}

/// One `PT_LOAD` segment, kept to resolve virtual addresses to file bytes.
struct Load {
    vaddr: u64,
    offset: u64,
    filesz: u64,
    flags: u32,
}

fn inspect_elf<'data, Elf, R>(data: R) -> Result<ElfRequirements, ElfError>
where
    Elf: FileHeader<Endian = Endianness>,
    R: ReadRef<'data>,
{
    let header = Elf::parse(data).map_err(ElfError::malformed("ELF header"))?;
    let endian = header
        .endian()
        .map_err(ElfError::malformed("ELF byte order"))?;
    let e_machine = header.e_machine(endian);
    let e_flags = header.e_flags(endian);
    let os_abi = header.e_ident().os_abi;
    let class = if header.is_class_64() { 64 } else { 32 };
    let file_type = FileType::from_e_type(header.e_type(endian));
    let byte_order = if header.is_big_endian() {
        ByteOrder::Big
    } else {
        ByteOrder::Little
    };

    let program_headers = header
        .program_headers(endian, data)
        .map_err(ElfError::malformed("program headers"))?;
    let mut loads = Vec::new();
    let mut load_alignment: Option<u64> = None;
    let mut interpreter = None;
    let mut has_dynamic = false;
    for ph in program_headers {
        match ph.p_type(endian) {
            elf::PT_LOAD => {
                let align = ph.p_align(endian).into().max(1);
                load_alignment = Some(load_alignment.map_or(align, |a| a.min(align)));
                loads.push(Load {
                    vaddr: ph.p_vaddr(endian).into(),
                    offset: ph.p_offset(endian).into(),
                    filesz: ph.p_filesz(endian).into(),
                    flags: ph.p_flags(endian),
                });
            }
            elf::PT_INTERP => {
                let size: u64 = ph.p_filesz(endian).into();
                if size > MAX_INTERPRETER_LEN {
                    return Err(ElfError::InterpreterTooLong(size));
                }
                let path = ph
                    .interpreter(endian, data)
                    .map_err(ElfError::malformed("PT_INTERP segment"))?
                    .unwrap_or_default();
                interpreter = Some(describe_interpreter(&String::from_utf8_lossy(path)));
            }
            elf::PT_DYNAMIC => has_dynamic = true,
            _ => {}
        }
    }
    let linking = match (&interpreter, has_dynamic) {
        (Some(_), _) => Linking::Dynamic,
        (None, true) if file_type == FileType::SharedObject => Linking::StaticPie,
        (None, _) => Linking::Static,
    };

    let sections = header
        .sections(endian, data)
        .map_err(ElfError::malformed("section headers"))?;

    let arm = if e_machine == elf::EM_ARM {
        let mut attributes = None;
        if let Some(section) = sections
            .iter()
            .find(|s| s.sh_type(endian) == elf::SHT_ARM_ATTRIBUTES)
        {
            let size: u64 = section.sh_size(endian).into();
            if size > MAX_ATTRIBUTES_LEN {
                return Err(ElfError::AttributesTooLarge(size));
            }
            let bytes = section
                .data(endian, data)
                .map_err(ElfError::malformed(".ARM.attributes section"))?;
            attributes = Some(arm_attributes::parse(bytes, header.is_big_endian())?);
        }
        Some(arm_info(e_flags, attributes, interpreter.as_ref()))
    } else {
        None
    };

    let go = if sections.is_empty() {
        match loads
            .iter()
            .find(|l| l.flags & (elf::PF_W | elf::PF_X) == elf::PF_W)
        {
            Some(load) => {
                let scanned = data
                    .read_bytes_at(load.offset, load.filesz.min(GO_SEARCH_LIMIT))
                    .map_err(ElfError::unreadable("data segment"))?;
                read_go(go::find_magic(scanned, load.vaddr), &loads, data)?
            }
            None => None,
        }
    } else {
        match sections.section_by_name(endian, b".go.buildinfo") {
            Some((_, section)) => {
                let bytes = section
                    .data(endian, data)
                    .map_err(ElfError::malformed(".go.buildinfo section"))?;
                let magic = go::find_magic(bytes, section.sh_addr(endian).into());
                read_go(magic, &loads, data)?
            }
            None => None,
        }
    };

    let mut requirements = ElfRequirements {
        machine: machine_name(e_machine),
        e_machine,
        class,
        endianness: byte_order,
        os_abi: os_abi_name(os_abi),
        file_type,
        linking,
        interpreter,
        load_alignment,
        arm,
        go,
        platform: None,
        reasons: Vec::new(),
    };
    let (platform, reasons) = required_platform(&requirements, os_abi);
    requirements.platform = platform;
    requirements.reasons = reasons;
    Ok(requirements)
}

fn read_go<'data, R: ReadRef<'data>>(
    magic: Option<u64>,
    loads: &[Load],
    data: R,
) -> Result<Option<GoBuildInfo>, ElfError> {
    let Some(address) = magic else {
        return Ok(None);
    };
    let read = |addr: u64, len: u64| -> Option<&'data [u8]> {
        let load = loads
            .iter()
            .find(|l| addr >= l.vaddr && addr - l.vaddr < l.filesz)?;
        let within = addr - load.vaddr;
        let offset = load.offset.checked_add(within)?;
        data.read_bytes_at(offset, len.min(load.filesz - within))
            .ok()
    };
    Ok(Some(go::decode(address, &read)?))
}

fn arm_info(
    e_flags: u32,
    attributes: Option<ArmAttributes>,
    interpreter: Option<&Interpreter>,
) -> ArmInfo {
    let from_attributes = attributes
        .as_ref()
        .and_then(|a| a.abi_vfp_args)
        .and_then(|args| match args {
            VfpArgs(1) => Some(FloatAbi::Hard),
            VfpArgs(0) => Some(FloatAbi::Soft),
            _ => None,
        });
    let from_interpreter = interpreter.and_then(|i| match i.abi.as_deref() {
        Some(abi) if abi.contains("hard-float") => Some(FloatAbi::Hard),
        Some(abi) if abi.contains("soft-float") => Some(FloatAbi::Soft),
        _ => None,
    });
    let (float_abi, source) = if e_flags & elf::EF_ARM_ABI_FLOAT_HARD != 0 {
        (FloatAbi::Hard, Some("e_flags"))
    } else if e_flags & elf::EF_ARM_ABI_FLOAT_SOFT != 0 {
        (FloatAbi::Soft, Some("e_flags"))
    } else if let Some(abi) = from_attributes {
        (abi, Some("Tag_ABI_VFP_args"))
    } else if let Some(abi) = from_interpreter {
        (abi, Some("interpreter"))
    } else {
        (FloatAbi::Unknown, None)
    };
    ArmInfo {
        e_flags,
        eabi_version: (e_flags >> 24) as u8,
        float_abi,
        float_abi_source: source,
        attributes,
    }
}

fn machine_name(e_machine: u16) -> String {
    match e_machine {
        elf::EM_386 => "i386".into(),
        elf::EM_X86_64 => "x86_64".into(),
        elf::EM_ARM => "arm".into(),
        elf::EM_AARCH64 => "aarch64".into(),
        elf::EM_RISCV => "riscv".into(),
        elf::EM_PPC => "powerpc".into(),
        elf::EM_PPC64 => "powerpc64".into(),
        elf::EM_S390 => "s390".into(),
        elf::EM_MIPS => "mips".into(),
        elf::EM_LOONGARCH => "loongarch".into(),
        other => format!("e_machine {other}"),
    }
}

fn os_abi_name(os_abi: u8) -> String {
    match os_abi {
        elf::ELFOSABI_SYSV => "System V".into(),
        elf::ELFOSABI_GNU => "GNU/Linux".into(),
        elf::ELFOSABI_NETBSD => "NetBSD".into(),
        elf::ELFOSABI_SOLARIS => "Solaris".into(),
        elf::ELFOSABI_FREEBSD => "FreeBSD".into(),
        elf::ELFOSABI_OPENBSD => "OpenBSD".into(),
        elf::ELFOSABI_ARM_AEABI => "ARM EABI".into(),
        elf::ELFOSABI_ARM => "ARM".into(),
        other => format!("OS ABI {other}"),
    }
}

/// The OCI operating system an OS ABI byte means. Linux binaries mostly say "System V" (0); ARM's old
/// toolchains wrote their own values.
fn os_name(os_abi: u8) -> &'static str {
    match os_abi {
        elf::ELFOSABI_SYSV | elf::ELFOSABI_GNU | elf::ELFOSABI_ARM_AEABI | elf::ELFOSABI_ARM => {
            "linux"
        }
        elf::ELFOSABI_NETBSD => "netbsd",
        elf::ELFOSABI_SOLARIS => "solaris",
        elf::ELFOSABI_FREEBSD => "freebsd",
        elf::ELFOSABI_OPENBSD => "openbsd",
        _ => "unknown",
    }
}

/// What a dynamic loader's file name says. Matched on the base name, since multiarch layouts move directories.
fn describe_interpreter(path: &str) -> Interpreter {
    let name = path.rsplit('/').next().unwrap_or(path);
    let glibc = |abi: &str| (Some(Libc::Glibc), Some(abi.to_string()));
    let (libc, abi) = match name {
        "ld-linux-armhf.so.3" => glibc("ARM hard-float (armhf)"),
        "ld-linux.so.3" => glibc("ARM soft-float (armel)"),
        "ld-linux-aarch64.so.1" => glibc("AArch64"),
        "ld-linux-aarch64_be.so.1" => glibc("AArch64 big-endian"),
        "ld-linux-x86-64.so.2" => glibc("x86-64"),
        "ld-linux-x32.so.2" => glibc("x32"),
        "ld-linux.so.2" => glibc("i386"),
        "ld-linux-riscv64-lp64d.so.1" => glibc("RISC-V 64 hard-float"),
        "ld-linux-riscv64-lp64.so.1" => glibc("RISC-V 64 soft-float"),
        "ld64.so.2" => glibc("64-bit POWER, ELFv2"),
        "ld64.so.1" => glibc("64-bit POWER ELFv1 or s390x"),
        "ld-linux-loongarch-lp64d.so.1" => glibc("LoongArch 64"),
        "linker" | "linker64" => (Some(Libc::Bionic), None),
        n if n.starts_with("ld-uClibc") => (Some(Libc::Uclibc), None),
        n if n.starts_with("ld-musl-") && n.ends_with(".so.1") => {
            let arch = n.trim_start_matches("ld-musl-").trim_end_matches(".so.1");
            let abi = match arch {
                "armhf" => "ARM hard-float".to_string(),
                "arm" => "ARM soft-float".to_string(),
                "armebhf" => "ARM big-endian hard-float".to_string(),
                "armeb" => "ARM big-endian soft-float".to_string(),
                other => other.to_string(),
            };
            (Some(Libc::Musl), Some(abi))
        }
        _ => (None, None),
    };
    Interpreter {
        path: path.to_string(),
        libc,
        abi,
    }
}

/// The platform the binary needs, with the evidence for it.
fn required_platform(req: &ElfRequirements, os_abi: u8) -> (Option<Platform>, Vec<String>) {
    let mut reasons = Vec::new();
    let os = os_name(os_abi);
    let little = req.endianness == ByteOrder::Little;
    let arch = match (req.e_machine, req.class, little) {
        (elf::EM_386, 32, true) => "386",
        (elf::EM_X86_64, 64, true) => "amd64",
        (elf::EM_ARM, 32, true) => "arm",
        (elf::EM_AARCH64, 64, true) => "arm64",
        (elf::EM_RISCV, 64, true) => "riscv64",
        (elf::EM_PPC64, 64, true) => "ppc64le",
        (elf::EM_PPC64, 64, false) => "ppc64",
        (elf::EM_S390, 64, false) => "s390x",
        (elf::EM_MIPS, 32, false) => "mips",
        (elf::EM_MIPS, 32, true) => "mipsle",
        (elf::EM_MIPS, 64, false) => "mips64",
        (elf::EM_MIPS, 64, true) => "mips64le",
        (elf::EM_LOONGARCH, 64, true) => "loong64",
        _ => {
            reasons.push(format!(
                "{} {}-bit {} has no OCI platform name",
                req.machine,
                req.class,
                if little {
                    "little-endian"
                } else {
                    "big-endian"
                }
            ));
            return (None, reasons);
        }
    };
    let variant = match arch {
        "arm" => arm_variant(req, &mut reasons),
        "amd64" => amd64_variant(req, &mut reasons),
        "arm64" => Some(arm64_variant(req, &mut reasons)),
        _ => {
            reasons.push(format!("e_machine {} ({}-bit)", req.machine, req.class));
            None
        }
    };
    (Some(Platform::new(os, arch, variant.as_deref())), reasons)
}

/// ARM: every piece of evidence sets a lowest version; the binary needs the highest of them.
fn arm_variant(req: &ElfRequirements, reasons: &mut Vec<String>) -> Option<String> {
    let mut evidence: Vec<(u8, String)> = Vec::new();
    let attributes = req.arm.as_ref().and_then(|a| a.attributes.as_ref());
    if let Some(a) = attributes {
        if let Some(arch) = a.cpu_arch {
            let (version, why) = match arch.0 {
                0..=2 => (
                    5,
                    ": older than ARMv5, and linux/arm/v5 is the lowest platform",
                ),
                3..=5 => (5, ""),
                6 | 7 | 9 => (6, ""),
                8 => (7, ": Thumb-2, which ARMv6 cores such as the ARM1176 lack"),
                10 => (7, ""),
                11..=13 => (
                    7,
                    ": M-profile code uses Thumb-2 instructions ARMv6 cores lack",
                ),
                14..=22 => (8, ""),
                _ => (8, ": newer than this table, so at least ARMv8"),
            };
            evidence.push((
                version,
                format!("Tag_CPU_arch {arch} (from .ARM.attributes){why}"),
            ));
        }
        if let Some(thumb) = a.thumb_isa_use.filter(|t| t.0 == 2) {
            evidence.push((
                7,
                format!(
                    "Tag_THUMB_ISA_use {thumb} (from .ARM.attributes): ARMv6 cores lack Thumb-2"
                ),
            ));
        }
        if let Some(fp) = a.fp_arch {
            let version = match fp.0 {
                0 => None,
                1 | 2 => Some(6),
                3..=6 => Some(7),
                _ => Some(8),
            };
            if let Some(v) = version {
                evidence.push((v, format!("Tag_FP_arch {fp} (from .ARM.attributes)")));
            }
        }
        if let Some(simd) = a.advanced_simd_arch {
            let version = match simd.0 {
                0 => None,
                1 | 2 => Some(7),
                _ => Some(8),
            };
            if let Some(v) = version {
                evidence.push((
                    v,
                    format!("Tag_Advanced_SIMD_arch {simd} (NEON, from .ARM.attributes)"),
                ));
            }
        }
        if a.cpu_arch_profile.is_some_and(|p| p.0 == 0x4d) {
            reasons.push("Tag_CPU_arch_profile Microcontroller: built for M-profile cores".into());
        }
    }
    if let Some(goarm) = req.go.as_ref().and_then(|g| g.goarm.as_deref()) {
        let level = goarm.split(',').next().unwrap_or_default();
        match level.parse::<u8>() {
            Ok(v @ 5..=7) => evidence.push((v, format!("GOARM={goarm} (from Go build info)"))),
            _ => reasons.push(format!(
                "GOARM={goarm} (from Go build info) is not 5, 6 or 7: ignored"
            )),
        }
    }
    // Go's calling convention never passes floats in VFP registers, so its e_flags say nothing about VFP.
    let hard_float = req.arm.as_ref().filter(|a| a.float_abi == FloatAbi::Hard);
    if let (None, Some(arm)) = (&req.go, hard_float) {
        evidence.push((
            6,
            format!(
                "hard-float ABI (from {}): needs a VFP unit, which linux/arm/v5 does not promise",
                arm.float_abi_source.unwrap_or("e_flags")
            ),
        ));
    }
    // The deciding evidence first: a verdict quotes the first reason.
    evidence.sort_by_key(|e| std::cmp::Reverse(e.0));
    let needed = evidence.first().map(|(v, _)| *v);
    let mut ordered: Vec<String> = evidence.into_iter().map(|(_, why)| why).collect();
    ordered.append(reasons);
    *reasons = ordered;
    match needed {
        Some(v) => Some(format!("v{v}")),
        None => {
            reasons.insert(
                0,
                "no ARM architecture version recorded (no .ARM.attributes CPU tags, no GOARM)"
                    .into(),
            );
            None
        }
    }
}

fn amd64_variant(req: &ElfRequirements, reasons: &mut Vec<String>) -> Option<String> {
    match req.go.as_ref().and_then(|g| g.goamd64.as_deref()) {
        Some(level @ ("v2" | "v3" | "v4")) => {
            reasons.push(format!("GOAMD64={level} (from Go build info)"));
            Some(level.to_string())
        }
        Some(level) => {
            reasons.push(format!(
                "GOAMD64={level} (from Go build info): the x86-64 baseline"
            ));
            None
        }
        None => {
            reasons.push(
                "e_machine x86_64: no micro-architecture level recorded, the x86-64 baseline"
                    .into(),
            );
            None
        }
    }
}

fn arm64_variant(req: &ElfRequirements, reasons: &mut Vec<String>) -> String {
    if let Some(goarm64) = req.go.as_ref().and_then(|g| g.goarm64.as_deref()) {
        let level = goarm64.split(',').next().unwrap_or_default();
        if let Some((major, minor)) = arm64_level(level) {
            reasons.push(format!("GOARM64={goarm64} (from Go build info)"));
            return if minor == 0 {
                format!("v{major}")
            } else {
                format!("v{major}.{minor}")
            };
        }
        reasons.push(format!(
            "GOARM64={goarm64} (from Go build info) is not a version: ignored"
        ));
    }
    reasons.push("e_machine aarch64: ARMv8-A baseline".into());
    "v8".into()
}

/// `v8`, `v8.2`, `v9.0` as (major, minor).
fn arm64_level(variant: &str) -> Option<(u8, u8)> {
    let digits = variant.strip_prefix('v').unwrap_or(variant);
    let (major, minor) = digits.split_once('.').unwrap_or((digits, "0"));
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether a host that runs `host` also runs code built for `need`: same OS and architecture, and a variant at
/// least as high.
fn satisfies(host: &Platform, need: &Platform) -> bool {
    if host.os != need.os || host.architecture != need.architecture {
        return false;
    }
    match need.architecture.as_str() {
        "arm" => matches!((host.arm_version(), need.arm_version()), (Some(h), Some(n)) if h >= n),
        "amd64" => matches!((host.amd64_level(), need.amd64_level()), (Some(h), Some(n)) if h >= n),
        "arm64" => {
            let level = |p: &Platform| arm64_level(p.variant.as_deref().unwrap_or("v8"));
            matches!((level(host), level(need)), (Some(h), Some(n)) if h >= n)
        }
        _ => need.variant.is_none() || host.variant == need.variant,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    CanRun,
    CannotRun,
    /// Nothing rules it out, but nothing proves it either (a 32-bit ARM binary that records no version).
    Unproven,
    /// A script: whether it runs is up to its interpreter, which the caller must check in turn.
    DependsOnInterpreter,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub outcome: Outcome,
    /// What the binary needs against what the host has, one line each.
    pub reasons: Vec<String>,
}

/// Whether a host that runs `host_candidates` (its platforms, best first) with pages of `host_page_size` bytes
/// can run a binary with these requirements.
pub fn can_run(
    req: &BinaryRequirements,
    host_candidates: &[Platform],
    host_page_size: Option<u64>,
) -> Verdict {
    let req = match req {
        BinaryRequirements::Script(script) => {
            return Verdict {
                outcome: Outcome::DependsOnInterpreter,
                reasons: vec![format!(
                    "a script: it runs if its interpreter {} runs",
                    script.interpreter
                )],
            };
        }
        BinaryRequirements::Elf(req) => req,
    };
    let host_list = if host_candidates.is_empty() {
        "no platform".to_string()
    } else {
        host_candidates
            .iter()
            .map(Platform::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let evidence = match req.reasons.as_slice() {
        [] => "no evidence recorded".to_string(),
        [only] => only.clone(),
        [first, rest @ ..] => format!("{first}, and {} more", rest.len()),
    };
    let mut fine = Vec::new();
    let mut blocking = Vec::new();
    let mut unproven = Vec::new();

    if !req.file_type.can_execute() {
        blocking.push(format!("it is a {}, not an executable", req.file_type));
    }
    match &req.platform {
        None => blocking.push(format!(
            "needs a machine flotilla has no platform for: {evidence}; this host runs {host_list}"
        )),
        Some(need) if need.architecture == "arm" && need.variant.is_none() => {
            if host_candidates
                .iter()
                .any(|h| h.os == need.os && h.architecture == need.architecture)
            {
                unproven.push(format!(
                    "needs {need} of an unknown version: {evidence}; this host runs {host_list}"
                ));
            } else {
                blocking.push(format!(
                    "needs {need}: {evidence}; this host runs {host_list}"
                ));
            }
        }
        Some(need) => match host_candidates.iter().find(|h| satisfies(h, need)) {
            Some(host) => fine.push(format!("needs {need}: {evidence}; this host runs {host}")),
            None => blocking.push(format!(
                "needs {need}: {evidence}; this host runs {host_list}"
            )),
        },
    }
    match (req.load_alignment, host_page_size) {
        (None, _) => blocking.push("it has no loadable segments".into()),
        (Some(align), Some(page)) if align < page => blocking.push(format!(
            "its segments are aligned to {align} bytes, less than this host's {page}-byte pages: the kernel \
             cannot map it"
        )),
        (Some(align), Some(page)) => fine.push(format!(
            "its segments are aligned to {align} bytes, enough for this host's {page}-byte pages"
        )),
        (Some(align), None) => fine.push(format!(
            "its segments are aligned to {align} bytes; the host page size is unknown, so not checked"
        )),
    }
    let outcome = if !blocking.is_empty() {
        Outcome::CannotRun
    } else if !unproven.is_empty() {
        Outcome::Unproven
    } else {
        Outcome::CanRun
    };
    let mut reasons = blocking;
    reasons.extend(unproven);
    reasons.extend(fine);
    Verdict { outcome, reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: u64 = 0x10000;

    /// A minimal ELF file: one read-write `PT_LOAD` covering the whole file, an optional `PT_INTERP`, and the
    /// given sections (each 16-byte aligned, mapped at `BASE` + offset).
    struct TestElf {
        class64: bool,
        machine: u16,
        flags: u32,
        os_abi: u8,
        align: u64,
        interp: Option<&'static str>,
        sections: Vec<(&'static str, u32, Vec<u8>)>,
        section_headers: bool,
    }

    impl TestElf {
        fn arm() -> TestElf {
            TestElf {
                class64: false,
                machine: elf::EM_ARM,
                flags: 0x0500_0000,
                os_abi: 0,
                align: 0x1000,
                interp: None,
                sections: Vec::new(),
                section_headers: true,
            }
        }

        fn build(&self) -> Vec<u8> {
            let (ehsize, phentsize, shentsize) = if self.class64 {
                (64, 56, 64)
            } else {
                (52, 32, 40)
            };
            let phnum = 1 + usize::from(self.interp.is_some());
            let mut body = vec![0u8; ehsize + phnum * phentsize];
            let place = |body: &mut Vec<u8>, bytes: &[u8]| {
                body.resize(body.len().next_multiple_of(16), 0);
                let at = body.len() as u64;
                body.extend_from_slice(bytes);
                at
            };
            let interp_at = self.interp.map(|i| {
                let mut bytes = i.as_bytes().to_vec();
                bytes.push(0);
                (place(&mut body, &bytes), bytes.len() as u64)
            });
            let mut shstrtab = vec![0u8];
            let mut placed = Vec::new();
            for (name, kind, data) in &self.sections {
                let name_at = shstrtab.len() as u32;
                shstrtab.extend_from_slice(name.as_bytes());
                shstrtab.push(0);
                placed.push((name_at, *kind, place(&mut body, data), data.len() as u64));
            }
            let shstr_name = shstrtab.len() as u32;
            shstrtab.extend_from_slice(b".shstrtab\0");
            let shstr_at = place(&mut body, &shstrtab);
            body.resize(body.len().next_multiple_of(8), 0);
            let shoff = body.len() as u64;
            let shnum = placed.len() + 2;
            let file_len = if self.section_headers {
                shoff + (shnum * shentsize) as u64
            } else {
                shoff
            };

            let mut out = Writer {
                out: Vec::new(),
                wide: self.class64,
            };
            out.bytes(&[
                0x7f,
                b'E',
                b'L',
                b'F',
                if self.class64 { 2 } else { 1 },
                1,
                1,
                self.os_abi,
            ]);
            out.bytes(&[0; 8]);
            out.u16(elf::ET_EXEC);
            out.u16(self.machine);
            out.u32(1);
            out.word(BASE);
            out.word(ehsize as u64);
            out.word(if self.section_headers { shoff } else { 0 });
            out.u32(self.flags);
            out.u16(ehsize as u16);
            out.u16(phentsize as u16);
            out.u16(phnum as u16);
            out.u16(shentsize as u16);
            out.u16(if self.section_headers {
                shnum as u16
            } else {
                0
            });
            out.u16(if self.section_headers {
                shnum as u16 - 1
            } else {
                0
            });
            out.phdr(elf::PT_LOAD, elf::PF_R | elf::PF_W, 0, file_len, self.align);
            if let Some((at, len)) = interp_at {
                out.phdr(elf::PT_INTERP, elf::PF_R, at, len, 1);
            }
            let mut bytes = out.out;
            bytes.extend_from_slice(body.get(bytes.len()..).unwrap());
            let mut out = Writer {
                out: bytes,
                wide: self.class64,
            };
            out.shdr(0, 0, 0, 0);
            for (name, kind, at, len) in placed {
                out.shdr(name, kind, at, len);
            }
            out.shdr(shstr_name, elf::SHT_STRTAB, shstr_at, shstrtab.len() as u64);
            if !self.section_headers {
                out.out.truncate(shoff as usize);
            }
            out.out
        }
    }

    struct Writer {
        out: Vec<u8>,
        wide: bool,
    }

    impl Writer {
        fn bytes(&mut self, b: &[u8]) {
            self.out.extend_from_slice(b);
        }
        fn u16(&mut self, v: u16) {
            self.bytes(&v.to_le_bytes());
        }
        fn u32(&mut self, v: u32) {
            self.bytes(&v.to_le_bytes());
        }
        fn word(&mut self, v: u64) {
            if self.wide {
                self.bytes(&v.to_le_bytes());
            } else {
                self.u32(v as u32);
            }
        }
        fn phdr(&mut self, kind: u32, flags: u32, offset: u64, size: u64, align: u64) {
            self.u32(kind);
            if self.wide {
                self.u32(flags);
            }
            self.word(offset);
            self.word(BASE + offset);
            self.word(BASE + offset);
            self.word(size);
            self.word(size);
            if !self.wide {
                self.u32(flags);
            }
            self.word(align);
        }
        fn shdr(&mut self, name: u32, kind: u32, offset: u64, size: u64) {
            self.u32(name);
            self.u32(kind);
            self.word(0);
            self.word(if kind == 0 { 0 } else { BASE + offset });
            self.word(offset);
            self.word(size);
            self.u32(0);
            self.u32(0);
            self.word(1);
            self.word(0);
        }
    }

    fn attributes(file_attrs: &[u8]) -> Vec<u8> {
        let mut scope = vec![1];
        scope.extend_from_slice(&(5 + file_attrs.len() as u32).to_le_bytes());
        scope.extend_from_slice(file_attrs);
        let mut out = vec![b'A'];
        out.extend_from_slice(&(10 + scope.len() as u32).to_le_bytes());
        out.extend_from_slice(b"aeabi\0");
        out.extend_from_slice(&scope);
        out
    }

    fn elf_req(data: &[u8]) -> ElfRequirements {
        match inspect(data).unwrap() {
            BinaryRequirements::Elf(req) => *req,
            other => panic!("expected ELF, got {other:?}"),
        }
    }

    fn platforms(list: &[&str]) -> Vec<Platform> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn arm_attributes_decide_the_version() {
        let mut v6 = TestElf::arm();
        v6.flags |= elf::EF_ARM_ABI_FLOAT_HARD;
        v6.interp = Some("/lib/ld-linux-armhf.so.3");
        v6.sections.push((
            ".ARM.attributes",
            elf::SHT_ARM_ATTRIBUTES,
            attributes(&[6, 6, 10, 2, 28, 1]),
        ));
        let req = elf_req(&v6.build());
        assert_eq!(req.platform, Some("linux/arm/v6".parse().unwrap()));
        assert_eq!(req.linking, Linking::Dynamic);
        let interp = req.interpreter.as_ref().unwrap();
        assert_eq!(interp.libc, Some(Libc::Glibc));
        assert_eq!(interp.abi.as_deref(), Some("ARM hard-float (armhf)"));
        assert_eq!(req.arm.as_ref().unwrap().float_abi, FloatAbi::Hard);
        assert!(
            req.reasons
                .iter()
                .any(|r| r == "Tag_CPU_arch v6 (from .ARM.attributes)")
        );
        assert_eq!(
            can_run(
                &BinaryRequirements::Elf(Box::new(req)),
                &platforms(&["linux/arm/v6"]),
                Some(4096)
            )
            .outcome,
            Outcome::CanRun
        );

        // v6T2 needs Thumb-2: v7 in platform terms.
        let mut t2 = TestElf::arm();
        t2.sections.push((
            ".ARM.attributes",
            elf::SHT_ARM_ATTRIBUTES,
            attributes(&[6, 8]),
        ));
        assert_eq!(
            elf_req(&t2.build()).platform,
            Some("linux/arm/v7".parse().unwrap())
        );

        // A v6 CPU tag with NEON still needs v7.
        let mut neon = TestElf::arm();
        neon.sections.push((
            ".ARM.attributes",
            elf::SHT_ARM_ATTRIBUTES,
            attributes(&[6, 6, 12, 1]),
        ));
        let req = elf_req(&neon.build());
        assert_eq!(req.platform, Some("linux/arm/v7".parse().unwrap()));
        assert!(req.reasons.iter().any(|r| r.contains("NEONv1")));
    }

    #[test]
    fn go_build_info_sets_goarm_with_and_without_sections() {
        let blob = go::inline_blob(
            "go1.22.4",
            "path\tex/app\nbuild\tGOARCH=arm\nbuild\tGOARM=6\n",
        );
        let mut with_sections = TestElf::arm();
        with_sections
            .sections
            .push((".go.buildinfo", elf::SHT_PROGBITS, blob.clone()));
        let mut stripped = TestElf::arm();
        stripped
            .sections
            .push((".go.buildinfo", elf::SHT_PROGBITS, blob));
        stripped.section_headers = false;
        for data in [with_sections.build(), stripped.build()] {
            let req = elf_req(&data);
            let go = req.go.as_ref().expect("Go build info found");
            assert_eq!(go.version, "go1.22.4");
            assert_eq!(go.goarm.as_deref(), Some("6"));
            assert_eq!(req.platform, Some("linux/arm/v6".parse().unwrap()));
            assert!(
                req.reasons
                    .iter()
                    .any(|r| r == "GOARM=6 (from Go build info)")
            );
        }
    }

    #[test]
    fn amd64_and_arm64_levels() {
        let blob = go::inline_blob("go1.23.0", "build\tGOAMD64=v3\n");
        let mut amd = TestElf::arm();
        amd.class64 = true;
        amd.machine = elf::EM_X86_64;
        amd.flags = 0;
        amd.sections
            .push((".go.buildinfo", elf::SHT_PROGBITS, blob));
        let req = BinaryRequirements::Elf(Box::new(elf_req(&amd.build())));
        let BinaryRequirements::Elf(r) = &req else {
            unreachable!()
        };
        assert_eq!(r.platform, Some("linux/amd64/v3".parse().unwrap()));
        assert_eq!(
            can_run(&req, &platforms(&["linux/amd64/v2"]), None).outcome,
            Outcome::CannotRun
        );
        assert_eq!(
            can_run(&req, &platforms(&["linux/amd64/v4"]), None).outcome,
            Outcome::CanRun
        );

        let mut arm64 = TestElf::arm();
        arm64.class64 = true;
        arm64.machine = elf::EM_AARCH64;
        arm64.flags = 0;
        arm64.align = 0x10000;
        let req = BinaryRequirements::Elf(Box::new(elf_req(&arm64.build())));
        let verdict = can_run(&req, &platforms(&["linux/arm64/v8"]), Some(16384));
        assert_eq!(verdict.outcome, Outcome::CanRun, "{verdict:?}");
    }

    #[test]
    fn page_size_and_missing_version() {
        let plain = TestElf::arm();
        let req = BinaryRequirements::Elf(Box::new(elf_req(&plain.build())));
        let BinaryRequirements::Elf(r) = &req else {
            unreachable!()
        };
        assert_eq!(r.platform, Some(Platform::linux("arm", None)));
        assert_eq!(r.load_alignment, Some(0x1000));
        let on_v7 = can_run(&req, &platforms(&["linux/arm/v7"]), Some(4096));
        assert_eq!(on_v7.outcome, Outcome::Unproven);
        let on_pi5 = can_run(
            &req,
            &platforms(&["linux/arm64/v8", "linux/arm/v7"]),
            Some(16384),
        );
        assert_eq!(on_pi5.outcome, Outcome::CannotRun);
        assert!(
            on_pi5
                .reasons
                .iter()
                .any(|r| r.contains("16384-byte pages")),
            "{on_pi5:?}"
        );
        let on_amd64 = can_run(&req, &platforms(&["linux/amd64"]), None);
        assert_eq!(on_amd64.outcome, Outcome::CannotRun);
    }

    #[test]
    fn scripts_report_their_interpreter() {
        let req = inspect(b"#! /bin/sh -e\necho hi\n").unwrap();
        assert_eq!(
            req,
            BinaryRequirements::Script(Script {
                interpreter: "/bin/sh".into(),
                argument: Some("-e".into())
            })
        );
        assert_eq!(
            can_run(&req, &[], None).outcome,
            Outcome::DependsOnInterpreter
        );
        let env = inspect(b"#!/usr/bin/env python3").unwrap();
        assert!(
            matches!(env, BinaryRequirements::Script(Script { ref interpreter, .. }) if interpreter == "/usr/bin/env")
        );
        assert!(matches!(
            inspect(b"#!\n"),
            Err(ElfError::ScriptWithoutInterpreter)
        ));
    }

    #[test]
    fn hostile_input_gives_typed_errors() {
        assert!(matches!(inspect(b""), Err(ElfError::Empty)));
        assert!(matches!(
            inspect(b"MZ\x90\x00"),
            Err(ElfError::NotElf { .. })
        ));
        assert!(matches!(
            inspect(b"\x7fELF\x07"),
            Err(ElfError::BadClass(7))
        ));
        assert!(matches!(
            inspect(b"\x7fELF"),
            Err(ElfError::Malformed { .. })
        ));
        let mut elf = TestElf::arm();
        elf.sections.push((
            ".ARM.attributes",
            elf::SHT_ARM_ATTRIBUTES,
            b"Agarbage".to_vec(),
        ));
        assert!(matches!(
            inspect(&elf.build()),
            Err(ElfError::ArmAttributes(_))
        ));
        let full = {
            let mut e = TestElf::arm();
            e.interp = Some("/lib/ld-linux.so.3");
            e.sections.push((
                ".ARM.attributes",
                elf::SHT_ARM_ATTRIBUTES,
                attributes(&[6, 4]),
            ));
            e.build()
        };
        for cut in 0..full.len() {
            assert!(
                inspect(full.get(..cut).unwrap()).is_err(),
                "cut at {cut} parsed"
            );
        }
    }

    fn rich_elf() -> Vec<u8> {
        let mut e = TestElf::arm();
        e.interp = Some("/lib/ld-musl-armhf.so.1");
        e.sections.push((
            ".ARM.attributes",
            elf::SHT_ARM_ATTRIBUTES,
            attributes(&[5, b'7', 0, 6, 10, 12, 1]),
        ));
        e.sections.push((
            ".go.buildinfo",
            elf::SHT_PROGBITS,
            go::inline_blob("go1.22.4", "build\tGOARM=7\n"),
        ));
        e.build()
    }

    #[test]
    fn file_reader_agrees_with_whole_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let mut stripped = TestElf::arm();
        stripped.sections.push((
            ".go.buildinfo",
            elf::SHT_PROGBITS,
            go::inline_blob("go1.21.0", "build\tGOARM=5\n"),
        ));
        stripped.section_headers = false;
        for (name, data) in [("rich", rich_elf()), ("stripped", stripped.build())] {
            let path = dir.path().join(name);
            std::fs::write(&path, &data).unwrap();
            assert_eq!(
                inspect_file(&path).unwrap(),
                inspect(&data).unwrap(),
                "{name}"
            );
        }
        assert!(matches!(
            inspect_file(dir.path()),
            Err(ElfError::NotAFile { .. })
        ));
        assert!(matches!(
            inspect_file(&dir.path().join("missing")),
            Err(ElfError::Io { .. })
        ));
    }

    proptest! {
        #[test]
        fn inspect_never_panics_on_mutated_elf(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut data = rich_elf();
            for (index, value) in edits {
                let i = index.index(data.len());
                if let Some(b) = data.get_mut(i) {
                    *b = value;
                }
            }
            if let Ok(req) = inspect(&data) {
                let _ = can_run(&req, &platforms(&["linux/arm/v7"]), Some(4096));
                let _ = serde_json::to_string(&req);
            }
            let keep = cut.index(data.len() + 1);
            let _ = inspect(data.get(..keep).unwrap_or_default());
        }
    }
}
