//! Link settings for the bare-metal micro-VM build only: a host build (`cargo test --workspace`)
//! links the bin as an ordinary program.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=linker.ld");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    let dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    // The image is loaded at its link address with nothing to apply relocations: link a plain
    // static executable (x86_64-unknown-none defaults to a static PIE, whose RELATIVE relocations
    // nobody would process). Code stays position-independent, which a fixed-address link resolves.
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rustc-link-arg-bins=--no-pie");
    println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
    println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
}
