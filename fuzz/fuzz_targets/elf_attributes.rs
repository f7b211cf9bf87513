//! The `.ARM.attributes` parser reads bytes from image layers: it must return an error, never panic or
//! allocate in proportion to a length field, whatever the input. The first byte picks the byte order.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((order, section)) = data.split_first() {
        let _ = flotilla::elf::arm_attributes::parse(section, order & 1 == 1);
    }
});
