//! Mutual TLS for the federation, in a few lines on top of tonic's rustls support.
//!
//! Every party holds a certificate signed by the consortium CA (see `coordinator provision`).
//! The coordinator requires a client certificate chained to that CA; the site id is the
//! certificate's Common Name ([`site_id_from_der`]), never a field the site types.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::{Error, Result};
use crate::ids::SiteId;

/// Paths of a party's CA certificate, own certificate chain and private key (PEM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Resolves relative paths against `base` (the folder of the config file).
    pub fn resolved(&self, base: &Path) -> Self {
        Self { ca: base.join(&self.ca), cert: base.join(&self.cert), key: base.join(&self.key) }
    }

    fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| Error::Tls(format!("cannot read {what} {}: {e}", path.display())))
    }

    /// Server side: present our identity, require clients signed by the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig> {
        let identity = Identity::from_pem(Self::read(&self.cert, "certificate")?, Self::read(&self.key, "private key")?);
        let ca = Certificate::from_pem(Self::read(&self.ca, "CA certificate")?);
        Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
    }

    /// Client side: trust only the CA, present our identity, expect `server_name`.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig> {
        let identity = Identity::from_pem(Self::read(&self.cert, "certificate")?, Self::read(&self.key, "private key")?);
        let ca = Certificate::from_pem(Self::read(&self.ca, "CA certificate")?);
        Ok(ClientTlsConfig::new().ca_certificate(ca).identity(identity).domain_name(server_name))
    }
}

/// `sha256:<hex>` fingerprint of a DER certificate, the form used in deny-lists.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Whether `s` has the form `sha256:<64 hex digits>`.
pub fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The first certificate of a PEM file, as DER.
pub fn first_pem_certificate(pem: &[u8]) -> Result<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| Error::Tls(format!("not a PEM certificate: {e}")))?;
    Ok(p.contents)
}

/// Common Name of a DER certificate.
pub fn common_name(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| Error::Tls(format!("unparsable client certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| Error::Tls("client certificate has no Common Name".into()))?;
    Ok(cn.to_string())
}

/// The site id a client certificate stands for.
pub fn site_id_from_der(der: &[u8]) -> Result<SiteId> {
    SiteId::new(common_name(der)?)
}
