//! tpp-bench's multi-process path on the CPU backend with the tiny model (no VAE, two clips so
//! that the clip-1 sink travels): 4 TPP stages and tensor parallel 2, each rank its own
//! process over the socket communicator, against the one-rank run. TPP chains the same
//! computation over ranks, so its latents are bit-identical; tensor parallel sums in another
//! order (f32, rel L2 ≤ 1e-5).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn bench(out: &Path, layout: &str) {
    let st = Command::new(env!("CARGO_BIN_EXE_tpp-bench"))
        .args(["--backend", "cpu", "--model", "tiny", "--size", "128*64"])
        .args([
            "--clips",
            "2",
            "--no-vae",
            "--timeout",
            "300",
            "--layout",
            layout,
        ])
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "{layout}: {st}");
}

fn compare(out: &Path, layout: &str, tol: &str) -> bool {
    Command::new(env!("CARGO_BIN_EXE_tpp-bench"))
        .arg("compare")
        .arg(out.join("single.latents.f32"))
        .arg(out.join(format!("{layout}.latents.f32")))
        .args(["--blocks", "8", "--tol", tol])
        .status()
        .unwrap()
        .success()
}

#[test]
fn tpp4_and_tp2_processes_match_one_rank() {
    let dir = std::env::temp_dir().join(format!("tpp-bench-cpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for layout in ["single", "tpp4", "tp2"] {
        bench(&dir, layout);
    }
    let single = std::fs::read(dir.join("single.latents.f32")).unwrap();
    // 8 blocks of [16, 3, 8, 16] f32.
    assert_eq!(single.len(), 8 * 16 * 3 * 8 * 16 * 4);
    assert_eq!(single, std::fs::read(dir.join("tpp4.latents.f32")).unwrap());
    assert!(compare(&dir, "tp2", "1e-5"));
    // The comparison can fail: one block's latents scaled by 1.02 are 2e-2 away.
    let mut v: Vec<f32> = single
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let n = v.len() / 8;
    v[3 * n..4 * n].iter_mut().for_each(|x| *x *= 1.02);
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join("scaled.latents.f32"), bytes).unwrap();
    assert!(!compare(&dir, "scaled", "1e-2"));
    assert!(compare(&dir, "scaled", "3e-2"));
    for r in 0..4 {
        let rep = std::fs::read_to_string(dir.join(format!("tpp4.rank{r}.txt"))).unwrap();
        assert!(
            rep.contains(&format!("role stage_{r}_steps_{r}..{}", r + 1)),
            "{rep}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
