//! Shared-memory single-producer/single-consumer verdict ring.
