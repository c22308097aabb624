#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz_harness::target("kallsyms").expect("target").run)(data)
});
