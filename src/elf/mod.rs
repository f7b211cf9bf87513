//! What an executable needs from the machine that runs it, read from its ELF headers, its `.ARM.attributes`
//! and, for Go binaries, the build settings the Go linker records — and whether a host can give it that.
//!
//! An image's index label (`linux/arm/v7`) is a claim; the binaries are the evidence. Debian's armhf busybox
//! says `Tag_CPU_arch: v7` and dies with SIGILL on a Pi Zero's ARM1176, whatever the label said. Everything here
//! is pure over bytes except [`inspect_file`], which reads only the parts of a file it needs (image pulls call it
//! on every executable of every layer).

pub mod arm_attributes;
pub mod arm_code;
pub mod arm_reach;
pub mod go;
mod reading;
mod requirements;
mod verdict;

pub use reading::{
    ArmInfo, BinaryRequirements, ByteOrder, ElfError, ElfRequirements, FileType, FloatAbi,
    Interpreter, Libc, Linking, Script, inspect, inspect_file,
};
pub use requirements::Evidence;
pub use verdict::{Outcome, Verdict, can_run};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::Platform;
    use object::elf;
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
            let mut entry = BASE;
            for (name, kind, data) in &self.sections {
                let name_at = shstrtab.len() as u32;
                shstrtab.extend_from_slice(name.as_bytes());
                shstrtab.push(0);
                // `.text` is the one executable section, for the code scan.
                let flags = if *name == ".text" {
                    u64::from(elf::SHF_ALLOC | elf::SHF_EXECINSTR)
                } else {
                    0
                };
                let at = place(&mut body, data);
                // The walk of the code starts at the entry point: the start of `.text`.
                if *name == ".text" {
                    entry = BASE + at;
                }
                placed.push((name_at, *kind, flags, at, data.len() as u64));
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
            out.word(entry);
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
            out.shdr(0, 0, 0, 0, 0);
            for (name, kind, flags, at, len) in placed {
                out.shdr(name, kind, flags, at, len);
            }
            out.shdr(
                shstr_name,
                elf::SHT_STRTAB,
                0,
                shstr_at,
                shstrtab.len() as u64,
            );
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
        fn shdr(&mut self, name: u32, kind: u32, flags: u64, offset: u64, size: u64) {
            self.u32(name);
            self.u32(kind);
            self.word(flags);
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

    /// ring's case: attributes merged up to v7 by NEON objects, code without non-SIMD v7 encodings.
    #[test]
    fn the_code_overrules_a_merged_v7() {
        let words =
            |list: &[u32]| -> Vec<u8> { list.iter().flat_map(|w| w.to_le_bytes()).collect() };
        // mov r0, r1; vadd.i32 q0, q1, q2; vld1.8 {d0}, [r0]; bx lr
        let neon_only = words(&[0xe1a0_0001, 0xf222_0844, 0xf420_070f, 0xe12f_ff1e]);
        // ... and two of movw r0, #0x1234
        let with_movw = words(&[0xe1a0_0001, 0xe301_0234, 0xe301_0234, 0xe12f_ff1e]);
        // Tag_CPU_arch, Tag_THUMB_ISA_use Thumb-2, Tag_Advanced_SIMD_arch NEONv1: what ring's objects merge to.
        let merged = |cpu_arch: u8| attributes(&[6, cpu_arch, 9, 2, 12, 1]);
        let build = |attrs: Vec<u8>, code: &[u8]| {
            let mut e = TestElf::arm();
            e.sections
                .push((".ARM.attributes", elf::SHT_ARM_ATTRIBUTES, attrs));
            e.sections.push((".text", elf::SHT_PROGBITS, code.to_vec()));
            elf_req(&e.build())
        };

        let ring = build(merged(10), &neon_only);
        assert_eq!(ring.platform, Some("linux/arm/v6".parse().unwrap()));
        assert_eq!(ring.decided_by, Some(Evidence::ReachableCode));
        assert!(ring.reasons[0].starts_with("reachable code: no ARMv7 encodings"));
        assert!(
            ring.reasons
                .iter()
                .any(|r| r.contains("overruled by the reachable code"))
        );
        let code = ring.arm.as_ref().and_then(|a| a.code.as_ref()).unwrap();
        assert_eq!((code.mapped, code.simd, code.v7_total()), (false, 2, 0));

        let v7 = build(merged(10), &with_movw);
        assert_eq!(v7.platform, Some("linux/arm/v7".parse().unwrap()));
        assert_eq!(v7.decided_by, Some(Evidence::ReachableCode));
        assert!(v7.reasons[0].contains("MOVW ×2"));

        // Attributes that say v6 over v7 code: the code decides.
        let hidden = build(attributes(&[6, 6]), &with_movw);
        assert_eq!(hidden.platform, Some("linux/arm/v7".parse().unwrap()));
        assert_eq!(hidden.decided_by, Some(Evidence::ReachableCode));

        // v6 attributes and v6 code: the attributes decide, the scan is reported.
        let plain = build(attributes(&[6, 6]), &neon_only);
        assert_eq!(plain.platform, Some("linux/arm/v6".parse().unwrap()));
        assert_eq!(plain.decided_by, Some(Evidence::Attributes));
        assert!(
            plain
                .reasons
                .iter()
                .any(|r| r.starts_with("reachable code:"))
        );
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
