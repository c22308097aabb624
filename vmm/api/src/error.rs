//! The API's errors and the one place where an error becomes an HTTP status.
//!
//! Owns: [`ApiError`] (a request failed: in the host, or before it reached the host) and
//! [`status_of`]. Must not: change an error's message (the caller sees it as is).

use vmm_host::HostError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The host refused or failed the action.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The request's parameters (query or body) are not what the endpoint takes.
    #[error("{0}")]
    BadRequest(String),
    /// No endpoint at this path.
    #[error("{0}")]
    NoEndpoint(String),
    /// The endpoint takes another method.
    #[error("{0}")]
    WrongMethod(String),
    /// The response could not be made.
    #[error("{0}")]
    Internal(String),
}

/// The HTTP status a caller sees for `error`.
pub fn status_of(error: &ApiError) -> u16 {
    match error {
        ApiError::BadRequest(_) => 400,
        ApiError::NoEndpoint(_) => 404,
        ApiError::WrongMethod(_) => 405,
        ApiError::Internal(_) => 500,
        ApiError::Host(e) => match e {
            HostError::InvalidSpec(_)
            | HostError::InvalidPolicy(_)
            | HostError::InvalidImage(_)
            | HostError::InvalidUrl { .. }
            | HostError::Path { .. }
            | HostError::InvalidSnapshot { .. }
            | HostError::TargetUnreachable { .. } => 400,
            HostError::NotFound { .. } => 404,
            HostError::WrongState { .. }
            | HostError::IdTaken { .. }
            | HostError::AddressTaken { .. } => 409,
            HostError::MigrationFailed { .. } | HostError::Vm(_) | HostError::Internal { .. } => {
                500
            }
            HostError::NoFreePort { .. }
            | HostError::ShuttingDown
            | HostError::SwitchRefused(_)
            | HostError::SwitchTimeout { .. } => 503,
        },
    }
}

/// The response for `error`: its status and `{"error": message}`.
pub fn error_response(error: &ApiError) -> crate::http::Response {
    crate::http::Response::error(status_of(error), &error.to_string())
}
