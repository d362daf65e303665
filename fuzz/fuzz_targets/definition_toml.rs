//! `FlowDefinition::from_toml` on arbitrary text, then `validate` and the
//! storage round trip (see common/mod.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        common::check(dcbflow::flow::FlowDefinition::from_toml(text));
    }
});
