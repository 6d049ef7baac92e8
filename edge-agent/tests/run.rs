//! `edge-agent run` as a process, offline: the local API comes up, the timeline is written,
//! a restart serves again from the stored plan without a new search, and corrupt state files
//! give a clear warning and a safe fallback.
use std::path::Path;
use std::process::Command;

use adaptivenet_edge::adapt::timeline::{Timeline, TIMELINE_FILE};

fn agent(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn image_folder(dir: &Path) {
    for c in 0..3 {
        let d = dir.join(c.to_string());
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..4u8 {
            let img = image::GrayImage::from_fn(28, 28, |x, y| {
                image::Luma([(x as u8).wrapping_mul(c * 40 + i).wrapping_add(y as u8)])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

fn serving_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("serving "))
        .unwrap_or_else(|| panic!("no serving line in {out}"))
        .to_string()
}

#[test]
fn run_serves_api_writes_timeline_and_restarts_without_a_new_search() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let (code, out) = agent(&[
        "demo-artifact",
        "--out",
        art.to_str().unwrap(),
        "--widths",
        "4,8,16",
    ]);
    assert_eq!(code, 0, "{out}");
    let data = dir.path().join("data");
    image_folder(&data);
    let state = dir.path().join("state");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "run",
            "--artifact",
            art.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--rounds",
            "2",
            "--validate",
            "0",
            "--images",
            "12",
            "--population",
            "8",
            "--generations",
            "1",
            "--duration",
            "2",
            "--interval-ms",
            "100",
            "--label-free",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        agent(&refs)
    };

    let (code, out) = run(&["--listen", "127.0.0.1:0", "--contention", "1:0.5:1"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("local inference API listening on 127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("contention: intensity 1"), "{out}");
    let first = serving_line(&out);
    let tl = Timeline::read(&state.join(TIMELINE_FILE)).unwrap();
    assert!(tl.len() >= 5, "{} windows: {out}", tl.len());
    assert!(tl.windows(2).all(|w| w[0].t_s < w[1].t_s));
    assert!(tl
        .iter()
        .all(|e| e.p50_ms > 0.0 && e.p95_ms >= e.p50_ms && e.budget_ms > 0.0));
    assert!(tl.iter().any(|e| e.contention > 0.0) && tl.iter().any(|e| e.contention == 0.0));
    // The raw lines carry exactly the documented keys for plots.
    let line = std::fs::read_to_string(state.join(TIMELINE_FILE)).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for k in ["t_s", "p50_ms", "p95_ms", "budget_ms", "subnet", "event"] {
        assert!(v.get(k).is_some(), "{k} missing in {v}");
    }

    // Restart: the stored table and search result are reused; the same subnet serves
    // (unless the controller moved, in which case the persisted one does).
    let active: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("active.json")).unwrap()).unwrap();
    let mtime = |f: &str| {
        std::fs::metadata(state.join(f))
            .unwrap()
            .modified()
            .unwrap()
    };
    let (table_t, search_t) = (mtime("latency.json"), mtime("search.json"));
    let (code, out) = run(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("using the stored latency table"), "{out}");
    assert!(out.contains("using the stored search result"), "{out}");
    assert_eq!(
        (mtime("latency.json"), mtime("search.json")),
        (table_t, search_t),
        "profiled or searched again: {out}"
    );
    assert_eq!(
        serving_line(&out).split_whitespace().nth(1),
        active["data"]["subnet"].as_str(),
        "{first} / {out}"
    );

    // Corrupt active subnet and search result: a clear warning naming the file, then a
    // safe fallback (initial subnet of a fresh search), never a panic.
    std::fs::write(state.join("active.json"), b"{\"format_version\":").unwrap();
    std::fs::write(state.join("search.json"), b"\x00garbage").unwrap();
    let (code, out) = run(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("active.json is unusable") && out.contains("search.json is unusable"),
        "{out}"
    );
    assert!(out.contains("serving "), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}
