//! Config parsing: any text is accepted or refused with at least one problem, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = cxgate::config::parse(text) {
        assert!(!e.lines().is_empty(), "a refusal without a problem");
    }
});
