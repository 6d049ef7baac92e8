//! The binary's error paths: clear message, non-zero exit, no panic.
use std::process::Command;

fn agent(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_inputs_exit_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (code, err) = agent(&[
        "profile",
        "--artifact",
        "/nonexistent",
        "--state",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("opening the artifact") && !err.contains("panicked"),
        "{err}"
    );

    let art = dir.path().join("art");
    let (code, err) = agent(&[
        "demo-artifact",
        "--out",
        art.to_str().unwrap(),
        "--widths",
        "4,8,16",
    ]);
    assert_eq!(code, 0, "{err}");
    let a = art.to_str().unwrap();
    let s = state.to_str().unwrap();
    let (code, err) = agent(&[
        "search",
        "--artifact",
        a,
        "--state",
        s,
        "--rounds",
        "2",
        "--validate",
        "0",
        "--data",
        "/nonexistent",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not a readable directory"), "{err}");

    // Corrupt table: a warning and a re-profile, then a budget below the cheapest subnet fails.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("latency.json"), b"not json").unwrap();
    let data = dir.path().join("data");
    for class in ["a", "b"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        let img = image::GrayImage::from_pixel(28, 28, image::Luma([128u8]));
        img.save(data.join(class).join("0.png")).unwrap();
    }
    let (code, err) = agent(&[
        "search",
        "--artifact",
        a,
        "--state",
        s,
        "--rounds",
        "2",
        "--validate",
        "0",
        "--data",
        data.to_str().unwrap(),
        "--budget",
        "0.01",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("unusable") && err.contains("below the cheapest subnet"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_recal_pick_values_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("state");
    let run = |extra: &[&str]| {
        let mut v = vec![
            "run",
            "--artifact",
            "/nonexistent",
            "--state",
            s.to_str().unwrap(),
            "--data",
            "/nonexistent",
        ];
        v.extend_from_slice(extra);
        agent(&v)
    };
    for bad in ["many", "-1", "2.5"] {
        let joined = format!("--recal-pick={bad}");
        for args in [vec![joined.as_str()], vec!["--recal-pick", bad]] {
            let mut a = vec!["--bn-recal", "branches"];
            a.extend(args);
            let (code, err) = run(&a);
            assert_eq!(code, 2, "{a:?}: {err}");
            assert!(
                err.contains(&format!("invalid value '{bad}' for '--recal-pick <K>'")),
                "{a:?}: {err}"
            );
        }
    }
    // Re-scoring with recalibrated statistics means nothing without recalibration.
    let (code, err) = run(&["--recal-pick", "3"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--recal-pick 3") && err.contains("needs --bn-recal"),
        "{err}"
    );
    assert!(!s.exists(), "nothing was started: {err}");
    // Accepted values get as far as the artifact.
    for ok in [
        &["--bn-recal", "auto", "--recal-pick", "0"][..],
        &["--bn-recal", "all"],
    ] {
        let (code, err) = run(ok);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("opening the artifact"), "{err}");
    }
}
