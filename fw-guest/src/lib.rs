//! The firewall micro-VM's portable core (host-testable, no_std).
#![no_std]
