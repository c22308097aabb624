//! A short pass of the soak (see `vigil_tests::soak`; `scripts/soak` runs it longer): tenants
//! created, booted, migrated to a second host and back, deleted, in a loop, and nothing left
//! behind: file descriptors, threads, guest RAM mappings, switch ports, booked switch records,
//! active flows.
//!
//! Ignored by default: it runs the Debian tenant kernel (early boot only, 3 cycles, 15-60 s on
//! an idle host), and the project keeps new tenant boots out of `scripts/test`. Run it with
//! `cargo test --release -p vigil-tests --test soak -- --ignored`.

#[test]
#[ignore = "runs the Debian tenant kernel; scripts/soak or --ignored"]
fn create_boot_migrate_delete_cycles_leak_nothing() {
    let report = vigil_tests::soak::soak(3).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report}");
    assert_eq!(report["leaked_fds"], 0, "{report}");
    assert_eq!(report["leaked_threads"], 0, "{report}");
    assert_eq!(report["guest_maps"][1], 0, "{report}");
}
