//! The host's error type.

/// An API error: the HTTP status and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError {
    pub status: u16,
    pub message: String,
}

impl HostError {
    pub fn bad_request(message: impl Into<String>) -> HostError {
        HostError {
            status: 400,
            message: message.into(),
        }
    }
    pub fn not_found(id: &str) -> HostError {
        HostError {
            status: 404,
            message: format!("no VM with id {id:?} on this host (GET /api/v1/vm.list lists them)"),
        }
    }
    pub fn conflict(message: impl Into<String>) -> HostError {
        HostError {
            status: 409,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> HostError {
        HostError {
            status: 500,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> HostError {
        HostError {
            status: 503,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}
