//! `cloud-server train-oracle` interrupted with Ctrl-C (SIGINT) on a tiny synthetic IDX data
//! set: it stops at the next step, keeps a checkpoint, says how to resume and exits with 130
//! (not an error report); the same command then resumes from that checkpoint.
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Writes raw (uncompressed) IDX image and label files of `n` 28x28 images.
fn write_idx(dir: &Path, prefix: &str, n: usize) {
    let mut img = Vec::new();
    img.extend_from_slice(&2051u32.to_be_bytes());
    for d in [n as u32, 28, 28] {
        img.extend_from_slice(&d.to_be_bytes());
    }
    let mut lab = Vec::new();
    lab.extend_from_slice(&2049u32.to_be_bytes());
    lab.extend_from_slice(&(n as u32).to_be_bytes());
    for i in 0..n {
        let class = (i % 10) as u8;
        // A class-dependent bright band, so the data is learnable but cheap to make.
        img.extend((0..28 * 28).map(|p| {
            if p / 28 == 2 * class as usize {
                250
            } else {
                10
            }
        }));
        lab.push(class);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

fn step_of(checkpoint: &Path) -> Option<u64> {
    let bytes = std::fs::read(checkpoint).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    meta.metadata().as_ref()?.get("step")?.parse().ok()
}

/// Runs `cmd` until its checkpoint is past `after` (so the Ctrl-C handler is installed and
/// training runs), sends SIGINT, and returns the exit code and stderr.
fn interrupt_after(mut cmd: Command, ck: &Path, after: u64) -> (Option<i32>, String) {
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while step_of(ck).is_none_or(|s| s <= after) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint past {after}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before the interrupt"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The shell's builtin `kill`: no dependency on a procps binary being installed.
    let st = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

#[test]
fn ctrl_c_keeps_a_checkpoint_exits_130_and_the_same_command_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", 64);
    write_idx(&data, "t10k", 20);
    let out = tmp.path().join("out");
    let ck = out.join("checkpoint").join("checkpoint.safetensors");
    let cmd = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cloud-server"));
        c.args(["train-oracle", "--batch", "4", "--checkpoint-every", "1"])
            .args(["--max-steps", "1000000"])
            .arg("--dataset-dir")
            .arg(&data)
            .arg("--out-dir")
            .arg(&out)
            .env("RUST_BACKTRACE", "1")
            .env("ADAPTIVENET_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let (code, err) = interrupt_after(cmd(), &ck, 2);
    assert_eq!(code, Some(130), "stderr: {err}");
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    assert!(
        !err.contains("backtrace"),
        "a requested stop is not an error: {err}"
    );
    let stopped = step_of(&ck).expect("a checkpoint with its step");

    // The same command resumes from that checkpoint (and can be interrupted again).
    let (code, err) = interrupt_after(cmd(), &ck, stopped);
    assert_eq!(code, Some(130), "stderr: {err}");
    assert!(err.contains("resumes from its checkpoint"), "{err}");
    assert!(!err.contains("backtrace"), "{err}");
}
