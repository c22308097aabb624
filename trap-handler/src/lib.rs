//! Virtual machine introspection (VMI) for Vigil.
//!
//! Owns: bounded access to hostile guest memory, kernel discovery with no System.map, hooks and the
//! attribution of socket operations to guest processes. Must not depend on a particular VMM: it works
//! against any implementation of its guest-memory trait, a memory image in tests included.
