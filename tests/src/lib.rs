//! End-to-end tests over real gRPC on loopback, driving the real `cloud-server` and
//! `edge-agent` binaries as separate processes (see `tests/`). This library holds the small
//! helpers those tests share.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

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
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
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
