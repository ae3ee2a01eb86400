//! The operator's admin identity is the only one that may read status or stop the run, and
//! it cannot act as a site.

use std::process::Command;
use std::time::Duration;

use aln_e2e::*;
use aln_proto as pb;
use aln_proto::admin_client::AdminClient;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_reads_status_and_stops_the_run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = provision(dir.path(), &["site-a", "site-b"])?;
    tiny_model(0.25).save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
    let metrics_port = free_port();
    let cfg = write_coordinator_config(&pki, &["site-a", "site-b"], &format!("rounds = 2\nmin_sites = 2\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"))?;
    let mut coord = CoordinatorProc::start(&cfg)?;
    let kit = pki.join("admin");

    // The admin CLI reads the run's state.
    let out = run_ok(Command::new(bin("coordinator")).args(["status", "--addr", &coord.addr, "--kit"]).arg(&kit))?;
    let status: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(status["experiments"][0], "main");
    assert!(status["progress"].as_str().unwrap().contains("round 1/2"), "{status}");

    // Prometheus metrics (plain HTTP on the management address).
    let metrics = {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", metrics_port))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        text
    };
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("aln_round_in_progress 1") && metrics.contains("aln_site_joined{site=\"site-a\"}"), "{metrics}");

    // A site may not use the admin service...
    let site = ClientIdentity::site(&pki, "site-a");
    let e = AdminClient::new(channel(&coord.addr, &site)?).status(pb::StatusRequest {}).await.expect_err("site read admin status");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = AdminClient::new(channel(&coord.addr, &site)?).stop(pb::StopRequest { reason: "x".into() }).await.expect_err("site stopped the run");
    assert_eq!(e.code(), Code::PermissionDenied);
    // ...and the admin is not a site.
    let admin = ClientIdentity { ca: kit.join("ca.pem"), cert_key: Some((kit.join("admin.pem"), kit.join("admin.key"))) };
    let e = connect(&coord.addr, &admin).await?.next_task(pb::TaskRequest {}).await.expect_err("admin acted as a site");
    assert_eq!(e.code(), Code::PermissionDenied);

    // The admin stops the run; the coordinator exits cleanly and a restart resumes it.
    run_ok(Command::new(bin("coordinator")).args(["stop", "--reason", "maintenance", "--addr", &coord.addr, "--kit"]).arg(&kit))?;
    assert!(coord.wait(Duration::from_secs(30))?.success());
    let audit = std::fs::read_to_string(coord.state_dir.join("audit.jsonl"))?;
    assert!(audit.contains("admin_stop") && audit.contains("maintenance"));
    let again = CoordinatorProc::start(&cfg)?;
    assert!(again.log_text().contains("resuming run"));
    Ok(())
}
