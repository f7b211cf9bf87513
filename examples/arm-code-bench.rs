//! Times the judgement of a 32-bit ARM binary's code: the recursive-descent walk that `check-binary`, `lint` and
//! the pull use (inside `flotilla::elf::inspect`, with everything else it reads) against the linear scan it
//! replaced (`flotilla::elf::arm_code::scan` over every executable section). Run by `bench/arm-code.sh`.
//!
//! usage: arm-code-bench FILE [ITERATIONS]

use std::time::{Duration, Instant};

use flotilla::elf::arm_code::{self, CodeRegion, Mapping};
use flotilla::elf::{self, BinaryRequirements};
use object::read::elf::ElfFile32;
use object::{Endianness, Object, ObjectSection, ObjectSymbol, SectionKind};

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// The old path: the executable sections and mapping symbols, scanned byte by byte.
fn linear(data: &[u8]) -> Result<arm_code::CodeScan, object::read::Error> {
    let file = ElfFile32::<Endianness>::parse(data)?;
    let mut regions = Vec::new();
    for section in file.sections() {
        if section.kind() == SectionKind::Text {
            regions.push(CodeRegion {
                address: section.address(),
                bytes: section.data()?,
            });
        }
    }
    let mappings: Vec<(u64, Mapping)> = file
        .symbols()
        .filter_map(|s| {
            let name = s.name_bytes().ok()?;
            Some((s.address(), Mapping::from_symbol_name(name)?))
        })
        .collect();
    Ok(arm_code::scan(&regions, &mappings))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: arm-code-bench FILE [ITERATIONS]")?;
    let iterations: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(20);
    let data = std::fs::read(&path)?;

    let mut walk_times = Vec::new();
    let mut walked = None;
    for _ in 0..iterations {
        let start = Instant::now();
        let req = elf::inspect(&data)?;
        walk_times.push(start.elapsed());
        walked = Some(req);
    }
    let mut linear_times = Vec::new();
    let mut scanned = None;
    for _ in 0..iterations {
        let start = Instant::now();
        let scan = linear(&data)?;
        linear_times.push(start.elapsed());
        scanned = Some(scan);
    }
    let (walk, old) = (median(walk_times), median(linear_times));
    println!(
        "{path}: {} bytes, {iterations} iterations, medians",
        data.len()
    );
    if let Some(BinaryRequirements::Elf(req)) = &walked {
        let code = req.arm.as_ref().and_then(|a| a.code.as_ref());
        if let (Some(platform), Some(code)) = (&req.platform, code) {
            println!(
                "  walk (whole inspect):  {:>8.1} ms  needs {platform}: {} functions, {} bytes reached, v7 {}",
                walk.as_secs_f64() * 1e3,
                code.functions,
                code.code_bytes,
                code.v7_total()
            );
        }
    }
    if let Some(scan) = &scanned {
        println!(
            "  linear scan (old):     {:>8.1} ms  {} bytes scanned, v7 {}, needs v7 by the old rule: {}",
            old.as_secs_f64() * 1e3,
            scan.code_bytes,
            scan.v7_total(),
            scan.needs_v7()
        );
    }
    println!(
        "  ratio walk / linear:   {:.2}",
        walk.as_secs_f64() / old.as_secs_f64().max(1e-9)
    );
    Ok(())
}
