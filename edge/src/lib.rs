//! The edge node: boots the fw-guest ELF in the edge role (not built yet; see the control-plane issue).
