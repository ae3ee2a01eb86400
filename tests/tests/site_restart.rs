//! A hospital's node crashes (`kill -9`) in the middle of local training and is restarted
//! with the same command: it rejoins, trains the still-open round from the current global
//! model, and the run completes. A site stopped with SIGTERM exits cleanly.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use aln_e2e::*;

const SITES: [&str; 2] = ["site-a", "site-b"];

fn wait_for_log(path: &std::path::Path, needle: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{} never said {needle:?}", path.display())
}

#[test]
fn a_site_killed_mid_training_rejoins_and_the_run_completes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let pki = synthetic_consortium(root, &SITES, 80, 5)?;
    let cfg = write_coordinator_config(
        &pki,
        &SITES,
        "rounds = 2\nmin_sites = 2\n\n[training]\nlocal_steps = 6\nbatch_size = 4\nlearning_rate = 1e-4\nimage_size = 32\nseed = 3\n",
    )?;
    let mut coord = CoordinatorProc::start(&cfg)?;
    let mut b = start_site(root, &pki, &coord.url(), "site-b", "site-b.log")?;
    let mut a = start_site(root, &pki, &coord.url(), "site-a", "site-a.log")?;
    // Kill site-a with SIGKILL once it is inside round 1's local training.
    wait_for_log(&root.join("site-a.log"), "local step", Duration::from_secs(120))?;
    a.kill()?;
    a.wait()?;
    assert!(!root.join("work/site-a/updates/main/local_r0001.safetensors").exists(), "killed before it could send");
    // Restart with the same command.
    let mut a = start_site(root, &pki, &coord.url(), "site-a", "site-a.restarted.log")?;
    let status = coord.wait(Duration::from_secs(600))?;
    assert!(status.success(), "coordinator failed:\n{}", coord.log_text());
    for (name, child) in [("site-a", &mut a), ("site-b", &mut b)] {
        assert!(wait_child(child, Duration::from_secs(60), name)?.success(), "{name} failed");
    }
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(coord.state_dir.join("round_state.json"))?)?;
    let round1: Vec<&str> = state["history"][0]["contributors"].as_array().unwrap().iter().map(|c| c["site"].as_str().unwrap()).collect();
    assert!(round1.contains(&"site-a") && round1.contains(&"site-b"), "{round1:?}");
    assert!(root.join("work/site-a/updates/main/local_r0002.safetensors").exists());
    assert!(coord.state_dir.join("report.json").exists());
    Ok(())
}

#[test]
fn sites_ride_out_a_coordinator_crash_and_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let pki = synthetic_consortium(root, &SITES, 60, 8)?;
    let port = free_port();
    let cfg = write_coordinator_config(
        &pki,
        &SITES,
        &format!("listen = \"127.0.0.1:{port}\"\nrounds = 3\nmin_sites = 2\n\n[training]\nlocal_steps = 4\nbatch_size = 4\nlearning_rate = 1e-4\nimage_size = 32\nseed = 4\n"),
    )?;
    let mut coord = CoordinatorProc::start(&cfg)?;
    let mut sites: Vec<Child> = SITES.iter().map(|s| start_site(root, &pki, &coord.url(), s, &format!("{s}.log"))).collect::<anyhow::Result<_>>()?;
    // Crash the coordinator (SIGKILL) once round 1 is on disk, i.e. during round 2.
    let state_file = coord.state_dir.join("round_state.json");
    let deadline = Instant::now() + Duration::from_secs(300);
    // round_state.json names round 1 only once its model is durable.
    while !std::fs::read_to_string(&state_file).is_ok_and(|s| s.contains("\"completed_rounds\": 1") || s.contains("\"completed_rounds\":1")) {
        anyhow::ensure!(Instant::now() < deadline, "round 1 never completed");
        std::thread::sleep(Duration::from_millis(50));
    }
    coord.child.kill()?;
    coord.child.wait()?;
    std::thread::sleep(Duration::from_secs(2));
    // Same port, same state directory: the sites find it again on their own.
    let mut coord = CoordinatorProc::start(&cfg)?;
    let status = coord.wait(Duration::from_secs(600))?;
    assert!(status.success(), "coordinator failed after restart:\n{}", coord.log_text());
    for (s, child) in SITES.iter().zip(&mut sites) {
        assert!(wait_child(child, Duration::from_secs(60), s)?.success(), "{s} gave up:\n{}", std::fs::read_to_string(root.join(format!("{s}.log")))?);
    }
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(coord.state_dir.join("round_state.json"))?)?;
    let rounds: Vec<u64> = state["history"].as_array().unwrap().iter().map(|h| h["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, vec![1, 2, 3]);
    assert!(coord.state_dir.join("report.json").exists());
    let logs = SITES.iter().map(|s| std::fs::read_to_string(root.join(format!("{s}.log"))).unwrap()).collect::<String>();
    // Depending on what each site was doing at the crash (waiting, downloading, uploading),
    // it notices the outage with one of these.
    let noticed = ["coordinator unreachable", "broke off", "model download failed", "interrupted by a coordinator outage"];
    assert!(noticed.iter().any(|m| logs.contains(m)), "the sites never noticed the outage:\n{logs}");
    Ok(())
}

#[test]
fn sigterm_stops_a_site_node_cleanly_mid_training() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let pki = synthetic_consortium(root, &SITES, 40, 6)?;
    let cfg = write_coordinator_config(&pki, &SITES, "rounds = 1\nmin_sites = 2\n\n[training]\nlocal_steps = 50\nbatch_size = 4\nlearning_rate = 1e-4\nimage_size = 32\nseed = 3\n")?;
    let coord = CoordinatorProc::start(&cfg)?;
    let mut a = start_site(root, &pki, &coord.url(), "site-a", "site-a.log")?;
    wait_for_log(&root.join("site-a.log"), "local step", Duration::from_secs(120))?;
    run_ok(Command::new("kill").args(["-TERM", &a.id().to_string()]))?;
    let status = wait_child(&mut a, Duration::from_secs(60), "site-a")?;
    assert!(status.success(), "SIGTERM should end a site-node cleanly");
    assert!(std::fs::read_to_string(root.join("site-a.log"))?.contains("stopping on signal"));
    Ok(())
}

#[test]
fn sigterm_stops_a_coordinator_cleanly_and_it_resumes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = provision(dir.path(), &SITES)?;
    tiny_model(1.5).save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
    let cfg = write_coordinator_config(&pki, &SITES, "rounds = 2\nmin_sites = 2\n")?;
    let mut coord = CoordinatorProc::start(&cfg)?;
    run_ok(Command::new("kill").args(["-TERM", &coord.child.id().to_string()]))?;
    let status = coord.wait(Duration::from_secs(30))?;
    assert!(status.success(), "SIGTERM should stop the coordinator cleanly:\n{}", coord.log_text());
    assert!(coord.log_text().contains("shutdown signal"));
    let again = CoordinatorProc::start(&cfg)?;
    assert!(again.log_text().contains("resuming run"), "{}", again.log_text());
    Ok(())
}
