//! Route templates: any text parses or is refused without a panic; a parsed template
//! prints as text that parses back to the same template; matching never panics.
#![no_main]

use cxgate::config::route::PathTemplate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (template, path) = text.split_once('\n').unwrap_or((text, "/"));
    let Ok(parsed) = PathTemplate::parse(template) else {
        return;
    };
    let display = parsed.to_string();
    let again = PathTemplate::parse(&display).expect("a template's Display parses again");
    assert!(
        again == parsed,
        "{template:?} does not round-trip through {display:?}"
    );
    let _ = parsed.matches(path);
});
