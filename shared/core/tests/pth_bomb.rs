//! Decompression bombs in a PyTorch zip checkpoint: an entry that claims (or inflates to)
//! far more than the archive's inflation budget (16x the archive + 16 MiB, at most 1 GiB) is
//! refused with a clear error, and the reader's memory stays within a stated bound while
//! doing so (peak RSS, `VmHWM` in /proc/self/status).
//!
//! Both attacks run in one test: the peak RSS is process-wide, so a parallel test would blur
//! the measurement.
use std::io::{Cursor, Read, Write};

use adaptivenet_core::weights::{inflate_budget, read_tensors_from_bytes, MAX_INFLATED_BYTES};
use zip::write::SimpleFileOptions;

/// Inflated size of the bomb's storage entry: 256 MiB of zeros, ~1000x its compressed size.
const BOMB_BYTES: u64 = 256 << 20;
/// What reading a bomb may add to the peak RSS: the budget of the archive (~16 MiB) plus
/// slack, far below the 256 MiB that inflating the entry would cost.
const RSS_BOUND_BYTES: u64 = 64 << 20;

fn fixture() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tiny_zip.pth"
    ))
    .expect("tiny_zip.pth fixture")
}

/// The fixture's entries under `bomb/`, with storage `0` replaced by `BOMB_BYTES` zeros
/// (deflated). Returns the archive and the fixture's honest size of storage `0`.
fn bomb() -> (Vec<u8>, u64) {
    let mut src = zip::ZipArchive::new(Cursor::new(fixture())).expect("fixture zip");
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(9));
    let mut honest = 0;
    for i in 0..src.len() {
        let mut f = src.by_index(i).expect("entry");
        let name = f.name().replacen("tiny_zip/", "bomb/", 1);
        if name == "bomb/data/0" {
            honest = f.size();
            out.start_file(name, deflated).expect("start");
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..BOMB_BYTES >> 20 {
                out.write_all(&zeros).expect("write");
            }
        } else {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).expect("read");
            out.start_file(name, stored).expect("start");
            out.write_all(&bytes).expect("write");
        }
    }
    (out.finish().expect("finish").into_inner(), honest)
}

/// Rewrites the uncompressed size of entry `name` in its local header and in the central
/// directory: an archive that lies about how much an entry inflates to.
fn claim_size(zip: &mut [u8], name: &str, size: u32) {
    let le16 = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let mut patched = 0;
    let mut i = 0;
    while i + 46 <= zip.len() {
        let (name_at, size_at) = match &zip[i..i + 4] {
            b"PK\x03\x04" => (i + 30, i + 22),
            b"PK\x01\x02" => (i + 46, i + 24),
            _ => {
                i += 1;
                continue;
            }
        };
        let len = le16(zip, if name_at == i + 30 { i + 26 } else { i + 28 });
        if zip.get(name_at..name_at + len) == Some(name.as_bytes()) {
            zip[size_at..size_at + 4].copy_from_slice(&size.to_le_bytes());
            patched += 1;
        }
        i += 4;
    }
    assert_eq!(
        patched, 2,
        "local header and central directory entry of {name}"
    );
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

#[test]
fn inflation_budget_is_proportional_to_the_archive_with_a_hard_cap() {
    assert_eq!(inflate_budget(0), 16 << 20);
    assert_eq!(inflate_budget(1 << 20), 32 << 20);
    assert_eq!(inflate_budget(usize::MAX), MAX_INFLATED_BYTES);
}

#[test]
fn decompression_bombs_are_refused_within_a_memory_bound() {
    let (archive, honest) = bomb();
    assert!(
        (archive.len() as u64) * 500 < BOMB_BYTES,
        "the bomb must be a bomb: {} bytes inflating to {BOMB_BYTES}",
        archive.len()
    );
    let budget = inflate_budget(archive.len());
    assert!(budget < BOMB_BYTES);

    // 1. The central directory tells the truth: refused before anything is inflated.
    let before = peak_rss_bytes();
    let err = read_tensors_from_bytes(&archive)
        .expect_err("a bomb must be refused")
        .to_string();
    let grown = peak_rss_bytes().saturating_sub(before);
    assert!(
        err.contains("decompression bomb") && err.contains(&budget.to_string()),
        "{err}"
    );
    assert!(
        grown < RSS_BOUND_BYTES,
        "reading the bomb raised the peak RSS by {grown} bytes (bound {RSS_BOUND_BYTES})"
    );

    // 2. The archive lies: storage 0 claims its honest size but inflates to 256 MiB. The
    // claim passes the directory check; inflating stops one byte past it.
    let mut lying = archive.clone();
    claim_size(&mut lying, "bomb/data/0", honest as u32);
    let before = peak_rss_bytes();
    let err = read_tensors_from_bytes(&lying)
        .expect_err("an entry inflating past its claim must be refused")
        .to_string();
    let grown = peak_rss_bytes().saturating_sub(before);
    assert!(
        err.contains("bomb/data/0") && err.contains("inflates beyond"),
        "{err}"
    );
    assert!(
        grown < RSS_BOUND_BYTES,
        "reading the lying bomb raised the peak RSS by {grown} bytes (bound {RSS_BOUND_BYTES})"
    );
    println!(
        "bomb: {} bytes inflating to {BOMB_BYTES}; budget {budget} bytes; refused twice with the \
         peak RSS below +{} MiB",
        archive.len(),
        RSS_BOUND_BYTES >> 20
    );

    // The untouched fixture still reads.
    assert!(!read_tensors_from_bytes(&fixture())
        .expect("fixture")
        .is_empty());
}
