//! TAP devices (the host side of a tenant's network interface).
