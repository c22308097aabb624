//! A short pass of the soak (see `vigil_tests::soak`; `scripts/soak` runs it longer): tenants
//! created, booted, migrated to a second host and back, deleted, in a loop, and nothing left
//! behind: file descriptors, threads, guest RAM mappings, switch ports, booked switch records,
//! active flows.
//!
//! Ignored by `cargo test` alone: it runs the Debian tenant kernel (early boot only, 3 cycles,
//! about 3 s here). `scripts/test` runs it with the other end-to-end files (`--ignored`).

#[test]
#[ignore = "runs the Debian tenant kernel; scripts/soak or --ignored"]
fn create_boot_migrate_delete_cycles_leak_nothing() {
    let report = vigil_tests::soak::soak(3).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report}");
    assert_eq!(report["leaked_fds"], 0, "{report}");
    assert_eq!(report["leaked_threads"], 0, "{report}");
    assert_eq!(report["guest_maps"][1], 0, "{report}");
}
