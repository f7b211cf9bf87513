//! Arbitrary text as /proc/cpuinfo, parsed and then detected under each kernel family flotilla ranks: neither
//! step may panic. Run with `cargo +nightly fuzz run cpuinfo` from the crate root.
#![no_main]

use flotilla::platform::cpuinfo;
use flotilla::platform::detect::detect;
use flotilla::platform::evidence::Evidence;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let info = cpuinfo::parse(text);
    let _ = info.common_features();
    let _ = info.distinct_parts();
    for machine in [None, Some("armv6l"), Some("armv7l"), Some("aarch64"), Some("x86_64")] {
        let evidence = Evidence {
            cpuinfo: Some(text.to_string()),
            uname_machine: machine.map(str::to_string),
            ..Evidence::default()
        };
        let _ = detect(&evidence);
    }
});
