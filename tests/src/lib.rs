//! End-to-end tests over real gRPC on loopback, driving the real `cloud-server` and
//! `edge-agent` binaries as separate processes (see `tests/`). This library holds the small
//! helpers those tests share.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace's debug binaries directory (where `cargo test --workspace` builds the
/// `cloud-server` and `edge-agent` binaries), found from the running test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary, with a clear message when it has not been built.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --bins` (or `cargo test --workspace`, which builds it)",
        p.display()
    );
    p
}

/// Runs a command to completion, failing the test with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out: Output = cmd
        .stdin(Stdio::null())
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value after `key` on the first line that contains it (e.g. `token:`).
pub fn field_after(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
}

/// Spawns `edge-agent` (RUST_LOG=info) with stdout and stderr into `<log>.out` /
/// `<log>.err`.
pub fn agent_spawn(args: &[String], log: &Path) -> Child {
    let out = std::fs::File::create(log.with_extension("out")).expect("log");
    let err = std::fs::File::create(log.with_extension("err")).expect("log");
    Command::new(binary("edge-agent"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn edge-agent")
}

/// What [`agent_spawn`] wrote to `<log>.<ext>` so far (`out` or `err`).
pub fn read_log(log: &Path, ext: &str) -> String {
    std::fs::read_to_string(log.with_extension(ext)).unwrap_or_default()
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A child process killed when dropped (a failing test leaves no server behind).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; a tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free TCP ports on 127.0.0.1, all bound at once and then released: two
/// [`free_port`] calls in a row can return the same port (the first is free again when the
/// second binds), and a server given it twice fails with "address already in use".
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("addr").port())
}

/// Writes a small learnable IDX data set in the Fashion-MNIST file layout (un-gzipped):
/// class `c` images carry a bright horizontal band at row `2c + 4`, plus seeded noise.
pub fn write_synthetic_idx(dir: &Path, train: usize, test: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut state = 0x9e37_79b9_u32;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 40) as u8
    };
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut img = Vec::with_capacity(16 + n * 784);
        img.extend_from_slice(&2051u32.to_be_bytes());
        img.extend_from_slice(&(n as u32).to_be_bytes());
        img.extend_from_slice(&28u32.to_be_bytes());
        img.extend_from_slice(&28u32.to_be_bytes());
        let mut lab = Vec::with_capacity(8 + n);
        lab.extend_from_slice(&2049u32.to_be_bytes());
        lab.extend_from_slice(&(n as u32).to_be_bytes());
        for i in 0..n {
            let c = (i % 10) as u8;
            for r in 0..28 {
                for _ in 0..28 {
                    let band = r == 2 * c as usize + 4 || r == 2 * c as usize + 5;
                    img.push(if band { 200 } else { 0 } + noise());
                }
            }
            lab.push(c);
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).expect("write");
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).expect("write");
    }
}

/// Writes an untrained ResNet supernet artifact (merge branches) of the given stage widths
/// into `dir`; wider stages give larger module blobs.
pub fn demo_artifact(
    dir: &Path,
    widths: [usize; 3],
    seed: u64,
) -> adaptivenet_core::artifact::Manifest {
    use adaptivenet_core::artifact::{write_artifact, InputSpec};
    use adaptivenet_core::model::{ArchDescriptor, Model};
    use adaptivenet_core::supernet::{branches::build_supernet, SupernetConfig};
    let arch = format!(
        r#"{{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],
            "widths":[{},{},{}],"in_channels":1,"num_classes":10}}"#,
        widths[0], widths[1], widths[2]
    );
    let arch = ArchDescriptor::from_json(arch.as_bytes()).expect("arch");
    let oracle = Model::init(&arch.spec, seed).expect("init");
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).expect("supernet");
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.2860],
        std: vec![0.3530],
        class_names: (0..10).map(|i| format!("class{i}")).collect(),
    };
    write_artifact(dir, &sn, input, &"0".repeat(64), vec![]).expect("write artifact")
}

/// Registers an artifact directory as a supernet of a cloud (its blobs into the blob store,
/// an oracle row, `App::register_supernet`): supernets normally come from elastification
/// jobs, which these tests do not need to wait for. Returns the supernet id.
pub async fn register_artifact(app: &adaptivenet_cloud::App, art: &Path) -> String {
    use adaptivenet_cloud::domain::Oracle;
    use adaptivenet_core::artifact::{blob_path, read_manifest};
    let m = read_manifest(art).expect("manifest");
    for (_, e) in m.modules() {
        let bytes = std::fs::read(blob_path(art, &e.sha256)).expect("blob");
        let r = app.blobs().put(&bytes).await.expect("put");
        assert_eq!(r.sha256, e.sha256);
    }
    let manifest = std::fs::read(art.join("manifest.json")).expect("manifest");
    let oracle = Oracle {
        id: uuid::Uuid::new_v4(),
        name: "oracle".into(),
        family: "adaptivenet.resnet_small".into(),
        weights_sha256: uuid::Uuid::new_v4().simple().to_string().repeat(2),
        size_bytes: 1,
        num_params: m.oracle_params,
        num_tensors: 1,
        arch_json: "{}".into(),
        created_ms: 0,
    };
    let (oracle, _) = app.store().insert_oracle(&oracle).await.expect("oracle");
    app.register_supernet("net", oracle.id, None, &manifest)
        .await
        .expect("register supernet")
        .id
        .to_string()
}

/// Polls `f` every 20 ms until it returns `Some`, failing the test after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a signal by name (`STOP`, `CONT`, ...) to a process with the system's `kill`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill -{sig} {pid} failed");
}

/// Waits (up to 5 s) until every thread of `pid` is stopped (`T`/`t`) or the process is gone:
/// `kill -STOP` only queues the signal, and a thread inside a `write` finishes it first.
pub fn wait_stopped(pid: u32) {
    let task = PathBuf::from(format!("/proc/{pid}/task"));
    wait_for(Duration::from_secs(5), "the process to stop", || {
        let Ok(threads) = std::fs::read_dir(&task) else {
            return Some(());
        };
        let stopped = threads.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                // The state follows the parenthesised command name, which may hold spaces.
                .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| rest.to_string()))
                .and_then(|rest| rest.chars().next())
                .is_none_or(|c| matches!(c, 'T' | 't' | 'Z' | 'X'))
        });
        stopped.then_some(())
    });
}

/// `GET path` from a plain-HTTP endpoint (the cloud's `/metrics`); `None` if unreachable.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // One write: `write!` on a bare socket sends each formatted piece as its own segment.
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The value of one Prometheus sample (`name{labels}` exactly as rendered), 0 if absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A `cloud-server serve` process on fixed loopback ports over a data directory, which can
/// be SIGKILLed and started again on the same address.
pub struct CloudProcess {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub port: u16,
    pub metrics_port: u16,
    pub log: PathBuf,
    child: Option<KillOnDrop>,
}

impl CloudProcess {
    pub fn new(data_dir: &Path, database_url: Option<String>) -> Self {
        let [port, metrics_port] = free_ports();
        CloudProcess {
            data_dir: data_dir.to_path_buf(),
            database_url,
            port,
            metrics_port,
            log: data_dir.join("cloud.log"),
            child: None,
        }
    }

    /// A `cloud-server` command on this data directory (and database).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(binary("cloud-server"));
        c.arg("--data-dir").arg(&self.data_dir);
        if let Some(u) = &self.database_url {
            c.args(["--database-url", u]);
        }
        c.args(args);
        c
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port)
    }

    /// Starts serving and waits until the gRPC port accepts connections.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// [`Self::start`] with extra `serve` flags (e.g. shrunk limits).
    pub fn start_with(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "already running");
        std::fs::create_dir_all(&self.data_dir).expect("mkdir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = self
            .cmd(&[
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--metrics-listen",
                &self.metrics_addr(),
                // Tests keep their data sets next to the data directory.
                "--dataset-root",
                self.data_dir
                    .parent()
                    .unwrap_or(&self.data_dir)
                    .to_str()
                    .expect("utf8 path"),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn cloud-server");
        self.child = Some(KillOnDrop(child));
        let port = self.port;
        let log = self.log.clone();
        wait_for(Duration::from_secs(60), "the cloud to listen", || {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.0.try_wait() {
                    panic!(
                        "cloud-server exited ({st}):\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }

    /// SIGKILL (no drain, no lease release), then reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.0.kill().expect("SIGKILL cloud");
            c.0.wait().expect("reap cloud");
            std::mem::forget(c);
        }
    }

    /// Current `/metrics` text (empty when not reachable).
    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr(), "/metrics").unwrap_or_default()
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...) in bytes.
pub fn proc_status_bytes(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb * 1024
}

/// A gRPC channel to `url` (connects lazily).
pub fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url.to_string())
        .expect("url")
        .connect_lazy()
}

/// A request carrying a bearer token.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

/// A fresh PostgreSQL database at 127.0.0.1:5432 (trust auth), dropped with this value.
/// `None` (after printing why) when PostgreSQL is unreachable, unless `ADAPTIVENET_REQUIRE_PG=1`,
/// which makes that a failure.
pub struct FreshPg {
    pub name: String,
    pub url: String,
}

impl FreshPg {
    pub fn create(prefix: &str) -> Option<Self> {
        let name = format!("an_{prefix}_{}", uuid::Uuid::new_v4().simple());
        let created = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .output();
        match created {
            Ok(o) if o.status.success() => Some(FreshPg {
                url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                name,
            }),
            other => {
                let reason = format!("PostgreSQL unreachable at 127.0.0.1:5432 ({other:?})");
                assert!(
                    std::env::var("ADAPTIVENET_REQUIRE_PG").as_deref() != Ok("1"),
                    "{reason}"
                );
                println!("skipping: {reason}");
                None
            }
        }
    }
}

impl Drop for FreshPg {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-c"])
            .arg(format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .output();
    }
}
