//! Architecture support for the bare-metal build (target_os = "none"): entry, CPU tables, paging,
//! console and the ring-3 hand-off. Only x86_64 exists.

mod x86_64;

pub use self::x86_64::*;
