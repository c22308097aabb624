#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz_harness::target("edge_channel").expect("target").run)(data)
});
