//! Reading a file: the ELF headers, the few sections that matter (`.ARM.attributes`, `.go.buildinfo`) and `#!`
//! lines, into [`BinaryRequirements`].

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, SectionTable, Sym};
use object::{Endianness, ReadCache, ReadRef};
use serde::{Serialize, Serializer};

use super::arm_attributes::{self, ArmAttributes, AttributeError, VfpArgs};
use super::arm_code::{self, CodeRegion, CodeScan, Mapping};
use super::arm_reach::{Program, Root};
use super::go::{self, GoBuildInfo, GoBuildInfoError};
use super::requirements::{Evidence, required_platform};
use crate::platform::Platform;

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
    /// Which evidence set the platform's variant, where one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<Evidence>,
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

    pub(super) fn can_execute(self) -> bool {
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
    /// What the executable code itself needs (little-endian 32-bit ARM only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeScan>,
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
        let mut info = arm_info(e_flags, attributes, interpreter.as_ref());
        if class == 32 && byte_order == ByteOrder::Little {
            info.code = Some(scan_arm_code(header, endian, data, &sections, &loads)?);
        }
        Some(info)
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
        decided_by: None,
        reasons: Vec::new(),
    };
    let (platform, decided_by, reasons) = required_platform(&requirements, os_abi);
    requirements.platform = platform;
    requirements.decided_by = decided_by;
    requirements.reasons = reasons;
    Ok(requirements)
}

/// Finds the code that can run (see [`arm_reach`]) in the executable sections (the executable `PT_LOAD`
/// segments when there are no section headers) and judges it, with what the sections and symbols say about
/// where code starts, which bytes are ARM, Thumb or data, and what the functions are called.
fn scan_arm_code<'data, Elf, R>(
    header: &Elf,
    endian: Endianness,
    data: R,
    sections: &SectionTable<'data, Elf, R>,
    loads: &[Load],
) -> Result<CodeScan, ElfError>
where
    Elf: FileHeader<Endian = Endianness>,
    R: ReadRef<'data>,
{
    let mut program = Program::default();
    program
        .roots
        .push((header.e_entry(endian).into(), Root::Entry));
    if sections.is_empty() {
        for load in loads.iter().filter(|l| l.flags & elf::PF_X != 0) {
            let bytes = data
                .read_bytes_at(load.offset, load.filesz)
                .map_err(ElfError::unreadable("executable segment"))?;
            // The ELF header and program headers share the first segment with the code; they are no code.
            let skip = if load.offset == 0 {
                let phoff: u64 = header.e_phoff(endian).into();
                phoff + u64::from(header.e_phnum(endian)) * u64::from(header.e_phentsize(endian))
            } else {
                0
            };
            let skip = usize::try_from(skip).unwrap_or(usize::MAX).min(bytes.len());
            program.regions.push(CodeRegion {
                address: load.vaddr + skip as u64,
                bytes: bytes.get(skip..).unwrap_or_default(),
            });
        }
        return Ok(arm_code::judge(&program));
    }
    let words = |bytes: &[u8]| -> Vec<u64> {
        bytes
            .chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    };
    for section in sections.iter() {
        let kind = section.sh_type(endian);
        let flags: u64 = section.sh_flags(endian).into();
        let address: u64 = section.sh_addr(endian).into();
        let name = sections.section_name(endian, section).unwrap_or_default();
        if kind == elf::SHT_PROGBITS && flags & u64::from(elf::SHF_EXECINSTR) != 0 {
            let bytes = section
                .data(endian, data)
                .map_err(ElfError::malformed("executable section"))?;
            program.regions.push(CodeRegion { address, bytes });
            // PLT stubs are ARM code that only the calls through them reach; each word may start one.
            if name == b".plt" || name == b".iplt" {
                program
                    .roots
                    .extend((0..bytes.len() as u64 / 4).map(|i| (address + 4 * i, Root::Plt)));
            }
            continue;
        }
        let pointers = match kind {
            elf::SHT_INIT_ARRAY | elf::SHT_FINI_ARRAY | elf::SHT_PREINIT_ARRAY => {
                Some(Root::InitFini)
            }
            elf::SHT_PROGBITS if name.starts_with(b".data.rel.ro") => Some(Root::DataPointer),
            elf::SHT_PROGBITS if name == b".got" => Some(Root::Got),
            _ => None,
        };
        if let Some(root) = pointers {
            let bytes = section
                .data(endian, data)
                .map_err(ElfError::malformed("pointer section"))?;
            program
                .pointers
                .extend(words(bytes).into_iter().map(|w| (w, root)));
        }
        if kind == elf::SHT_DYNAMIC {
            let bytes = section
                .data(endian, data)
                .map_err(ElfError::malformed("dynamic section"))?;
            for pair in words(bytes).chunks_exact(2) {
                if let [tag, value] = *pair {
                    if tag == u64::from(elf::DT_INIT) || tag == u64::from(elf::DT_FINI) {
                        program.roots.push((value, Root::InitFini));
                    }
                }
            }
        }
        // R_ARM_IRELATIVE: the word it relocates holds the resolver's address (REL keeps addends in place).
        if kind == elf::SHT_REL || kind == elf::SHT_RELA {
            let bytes = section
                .data(endian, data)
                .map_err(ElfError::malformed("relocation section"))?;
            let entry = if kind == elf::SHT_REL { 2 } else { 3 };
            for reloc in words(bytes).chunks_exact(entry) {
                let (Some(&at), Some(&info)) = (reloc.first(), reloc.get(1)) else {
                    continue;
                };
                if info & 0xff != u64::from(elf::R_ARM_IRELATIVE) {
                    continue;
                }
                let resolver = match reloc.get(2) {
                    Some(&addend) => Some(addend),
                    None => read_vaddr(data, loads, at, 4)
                        .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                };
                program.resolvers.extend(resolver);
            }
        }
    }
    for table in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
        let symbols = sections
            .symbols(endian, data, table)
            .map_err(ElfError::malformed("symbol table"))?;
        for symbol in symbols.iter() {
            let kind = symbol.st_type();
            let value: u64 = symbol.st_value(endian).into();
            let defined = symbol.st_shndx(endian) != elf::SHN_UNDEF;
            // Mapping symbols are local and untyped; checking that first spares reading every name.
            let mapping = kind == elf::STT_NOTYPE && symbol.st_bind() == elf::STB_LOCAL;
            let function = kind == elf::STT_FUNC || kind == elf::STT_GNU_IFUNC;
            if !(defined && (mapping || function || kind == elf::STT_OBJECT)) {
                continue;
            }
            let name = symbols
                .symbol_name(endian, symbol)
                .map_err(ElfError::malformed("symbol name"))?;
            if mapping {
                if let Some(mapping) = Mapping::from_symbol_name(name) {
                    program.mappings.push((value, mapping));
                }
                continue;
            }
            if kind == elf::STT_OBJECT {
                if is_capability_word(name) {
                    program.capability_words.push(value);
                }
                continue;
            }
            if kind == elf::STT_GNU_IFUNC {
                program.resolvers.push(value);
            }
            if table == elf::SHT_DYNSYM {
                program.roots.push((value, Root::DynamicSymbol));
            }
            program
                .names
                .entry(value & !1)
                .or_insert_with(|| String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(arm_code::judge(&program))
}

/// The variables that hold the CPU's capabilities: ring's and OpenSSL's `OPENSSL_armcap_P` (ring prefixes it
/// with its version), glibc's copy of `AT_HWCAP`.
fn is_capability_word(name: &[u8]) -> bool {
    name.ends_with(b"OPENSSL_armcap_P") || name == b"_dl_hwcap" || name == b"_dl_hwcap2"
}

/// `len` bytes at virtual address `address`, from the file bytes of the `PT_LOAD` segment holding them.
fn read_vaddr<'data, R: ReadRef<'data>>(
    data: R,
    loads: &[Load],
    address: u64,
    len: u64,
) -> Option<&'data [u8]> {
    read_vaddr_upto(data, loads, address, len).filter(|b| b.len() as u64 == len)
}

/// Up to `len` bytes at virtual address `address`: fewer where the segment's file bytes end first.
fn read_vaddr_upto<'data, R: ReadRef<'data>>(
    data: R,
    loads: &[Load],
    address: u64,
    len: u64,
) -> Option<&'data [u8]> {
    let load = loads
        .iter()
        .find(|l| address >= l.vaddr && address - l.vaddr < l.filesz)?;
    let within = address - load.vaddr;
    let offset = load.offset.checked_add(within)?;
    data.read_bytes_at(offset, len.min(load.filesz - within))
        .ok()
}

fn read_go<'data, R: ReadRef<'data>>(
    magic: Option<u64>,
    loads: &[Load],
    data: R,
) -> Result<Option<GoBuildInfo>, ElfError> {
    let Some(address) = magic else {
        return Ok(None);
    };
    let read = |addr: u64, len: u64| read_vaddr_upto(data, loads, addr, len);
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
        code: None,
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
