//! Harness for the end-to-end tests: finds the built binaries, provisions a consortium in a
//! temp dir, starts the real coordinator on 127.0.0.1:0 and talks to it over real mTLS.
//!
//! The binaries must be built first (`make test` does `cargo build --workspace` before
//! `cargo test`); they are looked up next to the test executable's `deps/` folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aln_common::ids::{ModelHash, Round};
use aln_common::model_state::ModelState;
use aln_common::wire::{ChunkEncoder, PayloadMeta};
use aln_proto::federation_client::FederationClient;
use anyhow::{Context, Result, bail};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Path of a workspace binary (`coordinator`, `site-node`) built in the same profile.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let p = dir.join(name);
    assert!(p.exists(), "{} not built; run `cargo build --workspace` first (make test does)", p.display());
    p
}

/// Runs a command to completion, failing with its stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `coordinator provision` into `dir/pki`.
pub fn provision(dir: &Path, sites: &[&str]) -> Result<PathBuf> {
    let pki = dir.join("pki");
    run_ok(Command::new(bin("coordinator")).args(["provision", "--sites", &sites.join(","), "--out"]).arg(&pki))?;
    Ok(pki)
}

/// A tiny model (two tensors) for tests that exercise the coordinator without libtorch.
pub fn tiny_model(seed: f32) -> ModelState {
    ModelState::from_named(vec![
        ("head.fc1.bias".into(), vec![3], vec![seed, -seed, 0.5]),
        ("head.fc1.weight".into(), vec![3, 4], (0..12).map(|i| seed + i as f32 * 0.01).collect()),
    ])
    .unwrap()
}

/// A loopback port that was free a moment ago (for a coordinator that must restart on it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Writes a coordinator config next to the provisioned coordinator kit (listening on
/// 127.0.0.1:0 unless `body` sets `listen`).
pub fn write_coordinator_config(pki: &Path, sites: &[&str], body: &str) -> Result<PathBuf> {
    let list: Vec<String> = sites.iter().map(|s| format!("\"{s}\"")).collect();
    let path = pki.join("coordinator").join("test.toml");
    std::fs::write(
        &path,
        format!(
            "[federation]\n{}sites = [{}]\n{body}\n\n[paths]\nstate_dir = \"state\"\ninitial_model = \"initial_model.safetensors\"\n\n[tls]\nca = \"ca.pem\"\ncert = \"coordinator.pem\"\nkey = \"coordinator.key\"\n",
            if body.contains("listen =") { "" } else { "listen = \"127.0.0.1:0\"\n" },
            list.join(", ")
        ),
    )?;
    Ok(path)
}

/// A running coordinator process, killed on drop.
pub struct CoordinatorProc {
    pub child: Child,
    pub addr: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl CoordinatorProc {
    pub fn start(config: &Path) -> Result<Self> {
        let dir = config.parent().unwrap().to_path_buf();
        let addr_file = dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = dir.join("coordinator.log");
        let child = Command::new(bin("coordinator"))
            .args(["run", "--config"])
            .arg(config)
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(Stdio::from(std::fs::File::create(dir.join("coordinator.out"))?))
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()?;
        let mut me = Self { child, addr: String::new(), state_dir: dir.join("state"), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                me.addr = a;
                return Ok(me);
            }
            if let Some(status) = me.child.try_wait()? {
                bail!("coordinator exited early ({status}):\n{}", std::fs::read_to_string(&me.log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("coordinator did not start listening")
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        wait_child(&mut self.child, limit, "coordinator")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a child with a generous bound so a broken run fails instead of hanging CI.
pub fn wait_child(child: &mut Child, limit: Duration, what: &str) -> Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{what} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// TLS material for a test client.
pub struct ClientIdentity {
    pub ca: PathBuf,
    pub cert_key: Option<(PathBuf, PathBuf)>,
}

impl ClientIdentity {
    /// The identity in a provisioned site kit.
    pub fn site(pki: &Path, site: &str) -> Self {
        let d = pki.join("sites").join(site);
        Self { ca: d.join("ca.pem"), cert_key: Some((d.join("site.pem"), d.join("site.key"))) }
    }
}

/// A lazily connected mTLS channel (TLS without a client certificate when `cert_key` is None).
pub fn channel(addr: &str, id: &ClientIdentity) -> Result<Channel> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&id.ca)?)).domain_name("coordinator");
    if let Some((c, k)) = &id.cert_key {
        tls = tls.identity(Identity::from_pem(std::fs::read(c)?, std::fs::read(k)?));
    }
    Ok(Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect_lazy())
}

/// A Federation client over mTLS.
pub async fn connect(addr: &str, id: &ClientIdentity) -> Result<FederationClient<Channel>> {
    Ok(FederationClient::new(channel(addr, id)?).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
}

/// Starts `site-node run` for `site` of a provisioned consortium, with its synthetic manifest
/// under `root/cohort/<site>/`, its work dir under `root/work/<site>/`, stderr to `root/<log>`.
pub fn start_site(root: &Path, pki: &Path, url: &str, site: &str, log: &str) -> Result<Child> {
    let log = std::fs::File::create(root.join(log))?;
    Ok(Command::new(bin("site-node"))
        .args(["run", "--threads", "1", "--device", "cpu", "--coordinator", url, "--config"])
        .arg(pki.join(format!("sites/{site}/site.toml")))
        .arg("--manifest")
        .arg(root.join(format!("cohort/{site}/manifest.csv")))
        .arg("--work-dir")
        .arg(root.join(format!("work/{site}")))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()?)
}

/// The chunk stream of a site's update (`delta` trained from `base`) for `round`.
pub fn update_chunks(delta: ModelState, base: &ModelHash, round: u32, samples: u64) -> Vec<aln_proto::ModelChunk> {
    let meta = PayloadMeta::delta(Round(round), base.clone(), samples);
    ChunkEncoder::new(std::sync::Arc::new(delta), meta, 0).collect()
}

/// Writes a synthetic cohort, provisions a consortium for it and an initial model with a
/// small head: the set-up of every test that runs real site-nodes. Returns the pki folder.
pub fn synthetic_consortium(root: &Path, sites: &[&str], patients: usize, seed: u64) -> Result<PathBuf> {
    run_ok(
        Command::new(bin("site-node"))
            .args(["synth", "--sites", &sites.len().to_string(), "--patients", &patients.to_string(), "--image-px", "64", "--seed", &seed.to_string(), "--out"])
            .arg(root.join("cohort")),
    )?;
    let pki = provision(root, sites)?;
    run_ok(Command::new(bin("site-node")).args(["init-model", "--hidden-dim", "32", "--feature-dim", "8", "--out"]).arg(pki.join("coordinator/initial_model.safetensors")))?;
    Ok(pki)
}
