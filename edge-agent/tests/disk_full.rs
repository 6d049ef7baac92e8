//! A full disk under the agent's state directory (a 512 KiB tmpfs): every state write fails
//! with a clear error naming the file, the previous state stays intact (no torn file, no temp
//! file left), the agent goes on with the new plan in memory, and a later start uses the
//! stored state. Needs root for the mount; skips with a printed reason otherwise.
use std::path::{Path, PathBuf};
use std::process::Command;

use adaptivenet_core::artifact::{write_artifact, InputSpec};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{branches::build_supernet, Subnet, SupernetConfig};
use adaptivenet_edge::adapt::plan::{plan, PlanConfig};
use adaptivenet_edge::client::{identity_path, write_private};
use adaptivenet_edge::profile::LatencyTable;
use adaptivenet_edge::quality::QualityMode;
use adaptivenet_edge::search::SearchConfig;
use adaptivenet_edge::serve::ArtifactSource;
use adaptivenet_edge::state::{ActiveRecord, StateDir};

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn artifact(dir: &Path) -> ArtifactSource {
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,8],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap();
    let oracle = Model::init(&arch.spec, 5).unwrap();
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.5],
        std: vec![0.5],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    write_artifact(dir, &sn, input, &"0".repeat(64), vec![]).unwrap();
    ArtifactSource::open(dir).unwrap()
}

/// An ImageFolder tree of 3 random 28x28 grey images per class.
fn image_folder(dir: &Path) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for c in 0..10 {
        let d = dir.join(c.to_string());
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..3 {
            let img = image::GrayImage::from_fn(28, 28, |_, _| image::Luma([rng.random::<u8>()]));
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// Writes until the file system refuses (ENOSPC).
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0xa5u8; 4096];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_all()) {
            assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
            return;
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_full_disk_keeps_the_previous_state_and_the_agent_going() {
    let work = tempfile::tempdir().unwrap();
    let state_dir = work.path().join("state");
    let _mount = match Tmpfs::mount(&state_dir) {
        Ok(m) => m,
        Err(why) => {
            println!("skipped: cannot mount a 512k tmpfs for the state directory ({why})");
            return;
        }
    };
    let src = artifact(&work.path().join("artifact"));
    let data = work.path().join("data");
    image_folder(&data);
    let state = StateDir::new(&state_dir);
    let id = src.manifest.supernet_id.to_string();
    // A stored table (no profiling in this test).
    let mut table = LatencyTable::from_macs(&src.manifest.supernet_spec(), 0.01);
    table.supernet_id = Some(id.clone());
    state.save_table(&table).unwrap();
    let cfg = PlanConfig {
        threads: table.conditions.threads,
        batch: table.conditions.batch,
        rounds: 1,
        validate: 0,
        force_profile: false,
        search: SearchConfig {
            population: 6,
            generations: 1,
            ..SearchConfig::default()
        },
        reuse_from_profile: true,
        budgets: vec!["0.8".into()],
        data,
        images: 0,
        mode: QualityMode::Labelled,
        research: false,
        clamp_budgets: true,
    };
    let first = plan(&src, &state, &cfg, &mut |_, _, _| {}).unwrap();
    assert!(!first.reused_search);
    let active = ActiveRecord {
        subnet: first.record.result.front[0].subnet.clone(),
        budget_ms: first.budget_ms,
    };
    state.save_active(&id, &active).unwrap();
    write_private(&identity_path(&state_dir), br#"{"identity":"old"}"#).unwrap();
    let stored_search = std::fs::read(state.search_path()).unwrap();
    let stored_identity = std::fs::read(identity_path(&state_dir)).unwrap();

    fill(&state_dir);

    // A re-search on the full disk: the plan is made and returned (the agent serves it), the
    // stored search result is untouched.
    let again = plan(
        &src,
        &state,
        &PlanConfig {
            research: true,
            search: SearchConfig {
                seed: 1,
                ..cfg.search.clone()
            },
            ..cfg.clone()
        },
        &mut |_, _, _| {},
    )
    .expect("a failed state write must not stop the agent");
    assert!(!again.reused_search);
    assert_eq!(std::fs::read(state.search_path()).unwrap(), stored_search);

    // Each write fails with an error naming the file and the cause; the old file stays.
    let other = ActiveRecord {
        subnet: Subnet::original(src.manifest.supernet_spec().num_positions()),
        budget_ms: 99.0,
    };
    let err = state.save_active(&id, &other).unwrap_err().to_string();
    assert!(
        err.contains("active.json") && err.contains("No space left on device"),
        "{err}"
    );
    assert_eq!(state.load_active(&id).unwrap(), Some(active));
    let big = vec![b'x'; 64 << 10];
    let err = write_private(&identity_path(&state_dir), &big)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("identity.json") && err.contains("No space left on device"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(identity_path(&state_dir)).unwrap(),
        stored_identity
    );
    // No temp file left behind by any failed write.
    assert_eq!(
        names(&state_dir),
        vec![
            "active.json",
            "filler",
            "identity.json",
            "latency.json",
            "search.json"
        ]
    );

    // A restart with the original settings uses the stored result.
    let restarted = plan(&src, &state, &cfg, &mut |_, _, _| {}).unwrap();
    assert!(restarted.reused_search && restarted.reused_table);
    assert_eq!(restarted.record, first.record);
}
