//! The deployment files parse, describe what they claim, and call the binaries with flags
//! the binaries accept (no Docker daemon or cluster is needed to check that much).

use std::path::Path;
use std::process::Command;

use aln_e2e::*;
use yaml_rust2::{Yaml, YamlLoader};

fn deploy(p: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(p)).unwrap()
}

/// Every `--flag` in `args` appears in `binary subcommand --help`.
fn flags_accepted(binary: &str, args: &[&str]) {
    let sub = args[0];
    let help = run_ok(Command::new(bin(binary)).args([sub, "--help"])).unwrap();
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(a), "{binary} {sub} does not accept {a}");
    }
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn compose_kubernetes_systemd_and_docker_files_are_consistent() {
    let compose = &YamlLoader::load_from_str(&deploy("docker-compose.yml")).unwrap()[0];
    let services = compose["services"].as_hash().unwrap();
    for name in ["coordinator", "site-a", "site-b", "site-c"] {
        let s = &compose["services"][name];
        assert!(!s.is_badvalue(), "compose lacks {name}");
        assert!(s["build"]["dockerfile"].as_str().unwrap().starts_with("deploy/docker/"));
    }
    assert_eq!(services.len(), 4);

    let docs = YamlLoader::load_from_str(&deploy("k8s/coordinator.yaml")).unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["PersistentVolumeClaim", "Deployment", "Service"]);
    let deployment = &docs[1];
    assert_eq!(deployment["spec"]["replicas"], Yaml::Integer(1), "the run's state is one directory: one replica");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    flags_accepted("coordinator", &args);

    for (unit, binary) in [("systemd/aln-coordinator.service", "coordinator"), ("systemd/aln-site-node.service", "site-node")] {
        let text = deploy(unit);
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.contains(section), "{unit} lacks {section}");
        }
        let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
        let w = words(exec);
        assert!(w[0].ends_with(binary));
        flags_accepted(binary, &w[1..]);
    }

    for (file, binary) in [("docker/coordinator.Dockerfile", "coordinator"), ("docker/site-node.Dockerfile", "site-node")] {
        let text = deploy(file);
        assert!(text.contains("FROM ") && text.contains(&format!("ENTRYPOINT [\"{binary}\"]")), "{file}");
        let cmd = text.lines().find_map(|l| l.strip_prefix("CMD ")).unwrap();
        let args: Vec<String> = serde_json::from_str(cmd).unwrap();
        flags_accepted(binary, &args.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
