//! Who may talk to the coordinator: only clients with a certificate from the consortium CA
//! whose Common Name is a configured site.

use aln_e2e::*;
use aln_proto as pb;
use tonic::Code;

async fn join(client: &mut aln_proto::federation_client::FederationClient<tonic::transport::Channel>) -> Result<pb::JoinReply, tonic::Status> {
    client
        .join(pb::JoinRequest { proto_version: aln_proto::PROTO_VERSION.into(), software_version: "test".into(), train_patients: 1, total_patients: 1, codecs: vec![] })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_consortium_certificates_are_admitted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // site-x gets a valid certificate from the right CA but is not in the config.
    let pki = provision(dir.path(), &["site-a", "site-b", "site-x"])?;
    tiny_model(1.0).save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
    // site-b's certificate is revoked in the config; site-y's expired yesterday.
    let revoked = run_ok(std::process::Command::new(bin("coordinator")).args(["fingerprint", "--cert"]).arg(pki.join("sites/site-b/site.pem")))?;
    run_ok(std::process::Command::new(bin("coordinator")).args(["issue-site", "--site", "site-y", "--valid-days", "-1", "--pki"]).arg(&pki))?;
    // Control: a kit issued the same way but still valid is admitted.
    run_ok(std::process::Command::new(bin("coordinator")).args(["issue-site", "--site", "site-z", "--valid-days", "30", "--pki"]).arg(&pki))?;
    let cfg = write_coordinator_config(
        &pki,
        &["site-a", "site-b", "site-y", "site-z"],
        &format!("rounds = 1\nmin_sites = 2\ndenied_certificates = [\"{}\"]\n", revoked.trim()),
    )?;
    let coord = CoordinatorProc::start(&cfg)?;

    // A member is admitted, and its id comes from its certificate.
    let mut a = connect(&coord.addr, &ClientIdentity::site(&pki, "site-a")).await?;
    assert_eq!(join(&mut a).await?.site_id, "site-a");

    // No client certificate: the TLS handshake is refused.
    let ca = pki.join("coordinator/ca.pem");
    let mut anon = connect(&coord.addr, &ClientIdentity { ca: ca.clone(), cert_key: None }).await?;
    let e = join(&mut anon).await.expect_err("anonymous client admitted");
    assert!(matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Unauthenticated | Code::Cancelled), "{e:?}");

    // A certificate from another CA (trusting the real server CA so only the client side is wrong).
    let other = provision(&dir.path().join("other"), &["site-a"])?;
    let forged = ClientIdentity { ca, cert_key: Some((other.join("sites/site-a/site.pem"), other.join("sites/site-a/site.key"))) };
    let mut f = connect(&coord.addr, &forged).await?;
    let e = join(&mut f).await.expect_err("foreign-CA client admitted");
    assert!(matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Unauthenticated | Code::Cancelled), "{e:?}");

    // A valid certificate for a site that is not a member.
    let mut x = connect(&coord.addr, &ClientIdentity::site(&pki, "site-x")).await?;
    let e = join(&mut x).await.expect_err("non-member admitted");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("site-x"), "{e:?}");
    let e = x.next_task(pb::TaskRequest {}).await.expect_err("non-member got a task");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(coord.log_text().contains("refused a certificate"));

    // A revoked certificate of a member site.
    let mut b = connect(&coord.addr, &ClientIdentity::site(&pki, "site-b")).await?;
    let e = join(&mut b).await.expect_err("revoked certificate admitted");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");

    // An expired certificate from the right CA for a member site: refused in the handshake.
    let mut y = connect(&coord.addr, &ClientIdentity::site(&pki, "site-y")).await?;
    let e = join(&mut y).await.expect_err("expired certificate admitted");
    assert!(matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Unauthenticated | Code::Cancelled), "{e:?}");
    let mut z = connect(&coord.addr, &ClientIdentity::site(&pki, "site-z")).await?;
    assert_eq!(join(&mut z).await?.site_id, "site-z");

    // TLS 1.3 only: a valid member certificate over TLS 1.2 is refused; over 1.3 it connects.
    if let Ok(v) = std::process::Command::new("openssl").arg("version").output()
        && v.status.success() {
            let kit = pki.join("sites/site-a");
            let handshake = |version: &str| -> anyhow::Result<bool> {
                let out = std::process::Command::new("openssl")
                    .args(["s_client", "-connect", &coord.addr, version, "-alpn", "h2", "-servername", "coordinator", "-brief"])
                    .arg("-cert")
                    .arg(kit.join("site.pem"))
                    .arg("-key")
                    .arg(kit.join("site.key"))
                    .arg("-CAfile")
                    .arg(kit.join("ca.pem"))
                    .stdin(std::process::Stdio::null())
                    .output()?;
                let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                Ok(text.contains("Protocol version: TLSv1.3") || text.contains("CONNECTION ESTABLISHED"))
            };
            assert!(handshake("-tls1_3")?, "a TLS 1.3 handshake with a member certificate should succeed");
            assert!(!handshake("-tls1_2")?, "TLS 1.2 must be refused");
        }

    // Every refusal the coordinator saw is in the audit trail.
    let audit = std::fs::read_to_string(coord.state_dir.join("audit.jsonl"))?;
    let refused: Vec<serde_json::Value> =
        audit.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v["event"] == "identity_refused").collect();
    assert!(refused.iter().any(|v| v["who"] == "site-x"));
    assert!(refused.iter().any(|v| v["who"] == "site-b" && v["reason"].as_str().unwrap().contains("deny-listed")));
    assert!(audit.contains("\"event\":\"join\""));
    assert!(audit.contains("tls_refused"), "handshake refusals are audited");
    Ok(())
}
