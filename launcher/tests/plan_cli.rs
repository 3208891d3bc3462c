//! `lava plan` as a user runs it: exit codes, one-line errors, JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn lava(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lava"))
        .arg("plan")
        .args(args)
        .output()
        .unwrap()
}

const FITS: i32 = 0;
const BAD_INPUT: i32 = 2;
const INFEASIBLE: i32 = 3;

#[test]
fn liveavatar_layout_on_h800_with_fp8_fits() {
    let out = lava(&[
        "--gpus",
        "5xH800",
        "--size",
        "720*400",
        "--layout",
        "liveavatar",
        "--fp8",
    ]);
    assert_eq!(
        out.status.code(),
        Some(FITS),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("effective H×W = 384×704"), "{text}");
    assert!(text.contains("GB") && text.contains("GiB"));
}

#[test]
fn liveavatar_layout_on_24gb_cards_is_rejected_with_numbers_and_proposals() {
    let out = lava(&[
        "--gpus",
        "5x24GB",
        "--size",
        "704*384",
        "--layout",
        "liveavatar",
    ]);
    assert_eq!(out.status.code(), Some(INFEASIBLE));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DOES NOT FIT"), "{text}");
    assert!(text.contains("short by"), "{text}");
    assert!(text.contains("layouts that fit these GPUs"), "{text}");
}

#[test]
fn json_is_valid_with_per_rank_components() {
    for (gpus, code) in [("5xH800", FITS), ("5x24GB", INFEASIBLE)] {
        let out = lava(&[
            "--gpus",
            gpus,
            "--size",
            "704*384",
            "--layout",
            "liveavatar",
            "--fp8",
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(code), "{gpus}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ranks = v["plan"]["ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), 5);
        assert!(
            ranks[0]["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["component"] == "kv_noisy")
        );
        assert!(ranks[0]["peak_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn one_and_eight_gpus_plan() {
    for gpus in ["H200", "8xH100"] {
        let out = lava(&["--gpus", gpus, "--size", "704*384", "--json"]);
        assert_eq!(
            out.status.code(),
            Some(FITS),
            "{gpus}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["status"], "fits");
    }
}

#[test]
fn separators_give_the_same_plan() {
    let a = lava(&["--gpus", "H200", "--size", "704*384", "--json"]);
    let b = lava(&["--gpus", "H200", "--size", "704x384", "--json"]);
    let c = lava(&["--gpus", "H200", "--size", "704X384", "--json"]);
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(a.stdout, c.stdout);
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let cases: &[&[&str]] = &[
        &["--gpus", "5xH800", "--size", "704-384"],
        &["--gpus", "5xH800", "--size", "704 * 384"],
        &["--gpus", "5xH800", "--size", "abc"],
        &["--gpus", "5xH800", "--size", "0*384"],
        &["--gpus", "5xH800", "--size", "700x400", "--exact-size"],
        &["--gpus", "5xH900"],
        &["--gpus", "0xH100"],
        &[
            "--gpus",
            "5xH800",
            "--num_gpus_dit",
            "3",
            "--ulysses_size",
            "3",
        ],
        &[
            "--gpus",
            "5xH800",
            "--num_gpus_dit",
            "4",
            "--sample_steps",
            "3",
        ],
        &["--gpus", "5xH800", "--sample_steps", "0"],
        &["--gpus", "5xH800", "--num_clip", "0"],
        &["--gpus", "5xH800", "--num_clip", "-1"],
        &["--gpus", "5xH800", "--tp", "0"],
        &["--gpus", "5xH800", "--infer_frames", "80"],
        &["--gpus", "5xA100", "--fp8"],
        &["--gpus", "5xH800", "--image", "Cargo.toml"],
        &["--gpus", "5xH800", "--layout", "liveavatar", "--tp", "2"],
    ];
    for args in cases {
        let out = lava(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(BAD_INPUT), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn image_aspect_decides_the_size() {
    // A 720 wide × 400 high PNG, like LiveAvatar's example images.
    let dir = std::env::temp_dir().join(format!("lava-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("portrait.png");
    std::fs::write(&path, png_header(400, 720)).unwrap();
    let out = lava(&[
        "--gpus",
        "H200",
        "--size",
        "720*400",
        "--image",
        path.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("effective H×W = 704×384"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first bytes of a PNG: signature and IHDR, enough for a size probe.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut v = vec![
        0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R',
    ];
    v.extend_from_slice(&width.to_be_bytes());
    v.extend_from_slice(&height.to_be_bytes());
    v.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    v
}
