//! Typed errors of the shared library. Binaries wrap them with `anyhow` context; the
//! coordinator maps them to gRPC `Status` codes in exactly one place (`coordinator::status`).

use std::path::PathBuf;

/// Everything that can go wrong in `aln-common`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid site id {0:?}: use 1-63 lowercase letters, digits or '-'")]
    InvalidSiteId(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid configuration: {message}")]
    Config { path: PathBuf, message: String },

    /// A model stream or model file is malformed (bad order, bad sizes, unknown tensor...).
    #[error("malformed model payload: {0}")]
    MalformedPayload(String),

    /// The payload's SHA-256 does not match its trailer.
    #[error("digest mismatch: payload hashes to {actual}, trailer says {expected}")]
    DigestMismatch { expected: String, actual: String },

    /// An update does not fit the global model (names, shapes, round, base hash, values).
    #[error("update rejected: {0}")]
    InvalidUpdate(String),

    #[error("safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },

    /// A manifest row or field is wrong; names the file, the 1-based data row and the field.
    #[error("{path}: row {row}, field `{field}`: {message}")]
    Manifest {
        path: PathBuf,
        row: usize,
        field: String,
        message: String,
    },

    #[error("feature row from site {site}, patient {patient}: {message}")]
    FeatureRow {
        site: String,
        patient: String,
        message: String,
    },

    #[error("statistics: {0}")]
    Stats(String),

    #[error("SVM fusion: {0}")]
    Fusion(String),

    #[error("TLS: {0}")]
    Tls(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
