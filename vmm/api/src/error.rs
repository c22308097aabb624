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
            HostError::MigrationAuth { .. } => 403,
            HostError::NotFound { .. } => 404,
            HostError::WrongState { .. }
            | HostError::IdTaken { .. }
            | HostError::AddressTaken { .. }
            | HostError::TenantNumberTaken { .. } => 409,
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_host::VmState;

    /// The statuses and messages the API contract (and tests/tests/api.rs) rely on.
    #[test]
    fn host_errors_keep_their_status_and_message() {
        let cases: Vec<(HostError, u16, &str)> = vec![
            (
                HostError::NotFound { id: "web".into() },
                404,
                "no VM with id \"web\" on this host (GET /api/v1/vm.list lists them)",
            ),
            (
                HostError::WrongState {
                    id: "web".into(),
                    state: VmState::Created,
                    allowed: "only a running VM pauses".into(),
                },
                409,
                "VM \"web\" is Created; only a running VM pauses",
            ),
            (
                HostError::IdTaken { id: "web".into() },
                409,
                "a VM with id \"web\" exists (vm.delete it first)",
            ),
            (
                HostError::InvalidPolicy("bad".into()),
                400,
                "policy: bad",
            ),
            (
                HostError::InvalidUrl {
                    url: "x".into(),
                    form: "file:///absolute/path",
                },
                400,
                "\"x\" is not a file:///absolute/path URL",
            ),
            (
                HostError::NoFreePort { ports: 7 },
                503,
                "all 7 switch ports are taken (delete a VM, or start the host with more --tenant-ports)",
            ),
            (HostError::ShuttingDown, 503, "the host is shutting down"),
            (
                HostError::MigrationFailed {
                    id: "web".into(),
                    url: "tcp:10.0.0.9:7070".into(),
                    reason: "no answer".into(),
                },
                500,
                "migration of \"web\" to tcp:10.0.0.9:7070: no answer; the VM runs on here",
            ),
            (
                HostError::MigrationAuth {
                    id: "web".into(),
                    url: "tcp:10.0.0.9:7070".into(),
                    reason: "the peer refused: authentication failed".into(),
                },
                403,
                "migration of \"web\" to tcp:10.0.0.9:7070 refused: authentication: the peer \
                 refused: authentication failed; the VM runs on here",
            ),
        ];
        for (error, status, message) in cases {
            let error = ApiError::from(error);
            assert_eq!(
                (status_of(&error), error.to_string().as_str()),
                (status, message)
            );
        }
        assert_eq!(status_of(&ApiError::BadRequest("q".into())), 400);
        assert_eq!(status_of(&ApiError::NoEndpoint("q".into())), 404);
        assert_eq!(status_of(&ApiError::WrongMethod("q".into())), 405);
    }
}
