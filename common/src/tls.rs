//! Mutual TLS for the federation, in a few lines on top of tonic's rustls support.
//!
//! Every party holds a certificate signed by the consortium CA (see `coordinator provision`).
//! The coordinator accepts TLS 1.3 only and requires a client certificate chained to that CA
//! ([`TlsFiles::tls13_acceptor`]); the site id is the certificate's Common Name
//! ([`site_id_from_der`]), never a field the site types. Revoked certificates are named by
//! their [`fingerprint`] in the coordinator's deny-list.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

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

    /// Server side, as the coordinator uses it: **TLS 1.3 only**, a client certificate
    /// chained to the consortium CA required (rustls' WebPKI verifier also refuses expired
    /// certificates), HTTP/2 negotiated by ALPN.
    pub fn tls13_acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|it| it.collect::<std::result::Result<_, _>>())
            .map_err(|e| Error::Tls(format!("certificate {}: {e}", self.cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| Error::Tls(format!("private key {}: {e}", self.key.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&self.ca).map_err(|e| Error::Tls(format!("CA certificate {}: {e}", self.ca.display())))? {
            roots.add(ca.map_err(|e| Error::Tls(format!("CA certificate {}: {e}", self.ca.display())))?).map_err(|e| Error::Tls(e.to_string()))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| Error::Tls(format!("{}: {e}", self.cert.display())))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
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
