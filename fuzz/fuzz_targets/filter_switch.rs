#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz_harness::target("filter_switch").expect("target").run)(data)
});
