#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz_harness::target("filter_edge").expect("target").run)(data)
});
