//! The coordinator's errors and their one mapping onto gRPC `Status` codes.
//!
//! Handlers return [`CoordinatorError`]; `From<CoordinatorError> for Status` is the only
//! place that decides which code a site sees, so the same failure always reads the same.

use aln_common::Error as CommonError;
use aln_common::ids::{Round, SiteId};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("certificate of `{0}` is not admitted to this consortium")]
    NotAdmitted(String),
    #[error("{0}")]
    WrongPhase(String),
    #[error("site {site} already sent its update for round {round}")]
    AlreadySubmitted { site: SiteId, round: Round },
    #[error("model {0} is not the current global model; ask NextTask for the current one")]
    ModelNotFound(String),
    #[error("protocol version {got:?} is not supported (coordinator speaks {want})")]
    Version { got: String, want: &'static str },
    #[error("transfer broken: {0}")]
    Transport(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let code = match &e {
            CoordinatorError::Common(c) => match c {
                CommonError::MalformedPayload(_) | CommonError::InvalidUpdate(_) | CommonError::FeatureRow { .. } => {
                    Code::InvalidArgument
                }
                CommonError::DigestMismatch { .. } => Code::DataLoss,
                CommonError::InvalidSiteId(_) | CommonError::Tls(_) => Code::PermissionDenied,
                _ => Code::Internal,
            },
            CoordinatorError::NoCertificate => Code::Unauthenticated,
            CoordinatorError::NotAdmitted(_) => Code::PermissionDenied,
            CoordinatorError::WrongPhase(_) => Code::FailedPrecondition,
            CoordinatorError::AlreadySubmitted { .. } => Code::AlreadyExists,
            CoordinatorError::ModelNotFound(_) => Code::NotFound,
            CoordinatorError::Version { .. } => Code::FailedPrecondition,
            CoordinatorError::Transport(_) => Code::Aborted,
            CoordinatorError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

pub type CoordResult<T> = std::result::Result<T, CoordinatorError>;
