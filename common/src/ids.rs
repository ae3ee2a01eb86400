//! Domain identifiers, validated at construction.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A hospital's identity in the consortium; taken from its certificate's Common Name.
///
/// Lowercase ASCII letters, digits and `-`, 1 to 63 characters, so that it is also a valid
/// DNS label and a safe folder name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SiteId(String);

impl SiteId {
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 63
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !id.starts_with('-')
            && !id.ends_with('-');
        if ok {
            Ok(Self(id))
        } else {
            Err(Error::InvalidSiteId(id))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SiteId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl From<SiteId> for String {
    fn from(s: SiteId) -> String {
        s.0
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SiteId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// A federated round. Round `r` trains from global model `r - 1`... more precisely: the global
/// model after `r` completed rounds is version `r`; version 0 is the initial model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Round(pub u32);

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hex SHA-256 of a model's encoded weights; identifies one model version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelHash(pub String);

impl fmt::Display for ModelHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ModelHash {
    /// First 12 hex digits, for logs.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids_are_dns_labels() {
        assert!(SiteId::new("site-a").is_ok());
        assert!(SiteId::new("h42").is_ok());
        for bad in ["", "Site-A", "-a", "a-", "a b", "a/b", &"x".repeat(64)] {
            assert!(SiteId::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
