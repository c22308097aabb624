//! The REST API on a Unix socket.

pub mod http;
