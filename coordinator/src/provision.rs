//! `coordinator provision`: the consortium's PKI and one startup kit per party.
//!
//! Creates a CA (rcgen), a server certificate for the coordinator and a client certificate
//! per site whose Common Name *is* the site id. Output layout:
//!
//! ```text
//! OUT/ca/ca.pem, ca.key                       keep ca.key offline
//! OUT/coordinator/ca.pem, coordinator.pem, coordinator.key, coordinator.toml
//! OUT/admin/ca.pem, admin.pem, admin.key       the operator's identity for status / stop
//! OUT/sites/<site>/ca.pem, site.pem, site.key, site.toml, README.txt
//! ```

use std::path::{Path, PathBuf};

use aln_common::atomic_file;
use aln_common::config;
use aln_common::constants::DEFAULT_PORT;
use aln_common::ids::SiteId;
use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// What `provision` needs to know.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    pub sites: Vec<SiteId>,
    pub out: PathBuf,
    /// DNS names / IPs the coordinator's certificate is valid for.
    pub coordinator_names: Vec<String>,
    /// URL the sites will dial.
    pub coordinator_url: String,
    pub valid_days: i64,
    pub consortium: String,
}

impl ProvisionRequest {
    pub fn new(sites: Vec<SiteId>, out: PathBuf) -> Self {
        Self {
            sites,
            out,
            coordinator_names: vec!["coordinator".into(), "localhost".into(), "127.0.0.1".into()],
            coordinator_url: format!("https://127.0.0.1:{DEFAULT_PORT}"),
            valid_days: 730,
            consortium: "ALN federation".into(),
        }
    }
}

fn params(cn: &str, org: &str, sans: Vec<String>, days: i64) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, org);
    p.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    // A negative validity (tests of expiry) yields a certificate that expired `-days` ago.
    p.not_before = if days > 0 { now - Duration::hours(1) } else { now - Duration::days(1 - days) };
    p.not_after = now + Duration::days(days);
    Ok(p)
}

fn write(path: &Path, text: &str) -> Result<()> {
    atomic_file::write(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Creates the CA, the coordinator's kit and one kit per site. Refuses to overwrite an
/// existing CA, so a consortium's identities are never replaced by accident.
pub fn provision(req: &ProvisionRequest) -> Result<()> {
    if req.sites.is_empty() {
        bail!("--sites lists no site");
    }
    let ca_dir = req.out.join("ca");
    if ca_dir.join("ca.pem").exists() {
        bail!("{} already holds a CA; choose another --out or remove it deliberately", ca_dir.display());
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = params(&format!("{} CA", req.consortium), &req.consortium, vec![], req.valid_days * 5)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);
    write(&ca_dir.join("ca.pem"), &ca_pem)?;
    write(&ca_dir.join("ca.key"), &issuer.key().serialize_pem())?;

    // Coordinator server certificate.
    let coord_dir = req.out.join("coordinator");
    let id = Identity { cn: "coordinator", consortium: &req.consortium, sans: req.coordinator_names.clone(), days: req.valid_days, server: true };
    write_identity(&coord_dir, "coordinator", &id, &issuer, &ca_pem)?;
    write(&coord_dir.join("coordinator.toml"), &config::coordinator_template(&req.sites))?;

    // The operator's admin identity (status, stop).
    let admin_dir = req.out.join("admin");
    let id = Identity { cn: "admin", consortium: &req.consortium, sans: vec![], days: req.valid_days, server: false };
    write_identity(&admin_dir, "admin", &id, &issuer, &ca_pem)?;

    for site in &req.sites {
        write_site_kit(&req.out, site, &req.consortium, req.valid_days, &req.coordinator_url, &issuer, &ca_pem)?;
    }
    Ok(())
}

/// Who a certificate is for.
struct Identity<'a> {
    cn: &'a str,
    consortium: &'a str,
    sans: Vec<String>,
    days: i64,
    /// Server (coordinator) or client (site, admin) certificate.
    server: bool,
}

/// Issues a key and certificate signed by the CA into `dir/<stem>.pem|.key`, with the CA beside them.
fn write_identity(dir: &Path, stem: &str, id: &Identity<'_>, issuer: &Issuer<'_, KeyPair>, ca_pem: &str) -> Result<()> {
    let key = KeyPair::generate()?;
    let mut p = params(id.cn, id.consortium, id.sans.clone(), id.days)?;
    p.extended_key_usages = vec![if id.server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = p.signed_by(&key, issuer)?;
    write(&dir.join("ca.pem"), ca_pem)?;
    write(&dir.join(format!("{stem}.pem")), &cert.pem())?;
    write(&dir.join(format!("{stem}.key")), &key.serialize_pem())
}

/// A hospital's startup kit: certificate and key, CA, config, README, start script.
fn write_site_kit(pki: &Path, site: &SiteId, consortium: &str, days: i64, url: &str, issuer: &Issuer<'_, KeyPair>, ca_pem: &str) -> Result<PathBuf> {
    let dir = pki.join("sites").join(site.as_str());
    let id = Identity { cn: site.as_str(), consortium, sans: vec![], days, server: false };
    write_identity(&dir, "site", &id, issuer, ca_pem)?;
    write(&dir.join("site.toml"), &config::site_template(url))?;
    write(&dir.join("README.txt"), &site_readme(site))?;
    write_start_script(&dir)?;
    Ok(dir)
}

/// `start.sh` in a site kit: checks the data, then joins the federation.
fn write_start_script(dir: &Path) -> Result<()> {
    let path = dir.join("start.sh");
    write(
        &path,
        "#!/usr/bin/env sh\n# Start this hospital's site-node: validate the local data, then join the federation.\n\
         set -e\ncd \"$(dirname \"$0\")\"\nsite-node check-data --manifest data/manifest.csv >/dev/null\nexec site-node run --config site.toml \"$@\"\n",
    )?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Issues one more site kit from an existing CA (a hospital joining later, a re-issued or
/// short-lived certificate). Reads `PKI/ca/ca.pem` and `PKI/ca/ca.key`; writes `PKI/sites/<site>/`.
pub fn issue_site(pki: &Path, site: &SiteId, valid_days: i64, coordinator_url: &str) -> Result<PathBuf> {
    let ca_pem = std::fs::read_to_string(pki.join("ca/ca.pem")).with_context(|| format!("reading {}", pki.join("ca/ca.pem").display()))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca/ca.key")).with_context(|| format!("reading {}", pki.join("ca/ca.key").display()))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    write_site_kit(pki, site, "ALN federation", valid_days, coordinator_url, &issuer, &ca_pem)
}

fn site_readme(site: &SiteId) -> String {
    format!(
        "Startup kit for site `{site}`.\n\n\
         site.pem / site.key identify this hospital to the coordinator: keep site.key private.\n\
         1. Put your manifest at data/manifest.csv (or edit site.toml).\n\
         2. Run: ./start.sh   (checks the data, then: site-node run --config site.toml)\n"
    )
}
