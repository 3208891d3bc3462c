//! `lava generate` end to end on CPU ranks with the built-in tiny model: the launcher plans,
//! spawns a DiT rank and a VAE rank as separate `lava-worker` processes, and writes an MP4
//! whose video (size from `lava plan`, 25 fps, 48·N − 3 frames) and audio ffprobe confirms.
//! An infeasible plan starts nothing. Needs ffmpeg/ffprobe on PATH (.ci/run installs them).
//! TPP layouts (4 stages × 1 step + a VAE rank; 2 stages × 2 steps with the VAE co-located on
//! the last stage) produce the single-rank run's latents (`--save_latents`) over two clips, so
//! the KV ring wraps and clip 1 re-prefills with the sink the last stage sends; so do stages
//! split over tp / Ulysses / pp / FSDP ranks, alone and under TPP. SIGKILL of a rank (the DiT
//! rank of a 2-rank job; a middle stage or the VAE rank of TPP 4 + VAE) ends the whole job.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lava_tests::bin_dir;

fn data(name: &str) -> String {
    format!("{}/../media/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The flags of a tiny run on `gpus` (e.g. "2x24GB"): `dit` DiT ranks (one TPP stage each) and
/// a VAE rank.
fn tiny_flags(gpus: &str, dit: &str, size: &str) -> Vec<String> {
    [
        "--gpus",
        gpus,
        "--model",
        "tiny",
        "--num_gpus_dit",
        dit,
        "--enable_vae_parallel",
        "--size",
        size,
        "--image",
        &data("boy.jpg"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn generate_writes_an_mp4_with_the_planned_size_and_audio() {
    let flags = tiny_flags("2x24GB", "1", "128*64");
    let plan = Command::new(bin_dir().join("lava"))
        .arg("plan")
        .args(&flags)
        .arg("--json")
        .output()
        .unwrap();
    assert!(plan.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let res = &plan["plan"]["resolution"];
    let (w, h) = (
        res["width"].as_u64().unwrap(),
        res["height"].as_u64().unwrap(),
    );

    let out = std::env::temp_dir().join(format!("lava-generate-{}.mp4", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let run = Command::new(bin_dir().join("lava"))
        .arg("generate")
        .args(&flags)
        .args([
            "--audio",
            &data("speech_44k.mp3"),
            "--prompt",
            "a boy talking",
        ])
        .args(["--num_clip", "1", "--save_file"])
        .arg(&out)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{log}");
    assert!(
        log.contains("lava: block 3 (clip 0): frames 45/45"),
        "{log}"
    );

    // One clip: 48 frames less the 3 dropped at the start (model-spec §6.4).
    assert_eq!(
        probe(&out),
        (w, h, "25/1".to_string(), "45".to_string(), true)
    );
    let _ = std::fs::remove_file(&out);
}

#[test]
fn infeasible_plan_starts_nothing() {
    let lava = bin_dir().join("lava");
    let t0 = Instant::now();
    let run = Command::new(lava)
        .arg("generate")
        .args(tiny_flags("2x1GB", "1", "1920*1088"))
        .args([
            "--audio",
            &data("speech_44k.mp3"),
            "--save_file",
            "/nonexistent/x.mp4",
        ])
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(run.status.code(), Some(3), "{log}");
    assert!(!log.contains("registered"), "{log}");
    assert!(log.contains("nothing was started"), "{log}");
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// SIGKILL of the DiT rank of a 2-rank job (DiT + VAE rank) mid-generation ends the whole job
/// within 10 s with the peer-lost exit code and an error naming the rank; the VAE rank does
/// not outlive it.
#[test]
fn killing_a_rank_mid_generation_ends_the_job() {
    let flags = tiny_flags("2x24GB", "1", "128*64");
    kill_mid_generation("killed", &flags, 2, 0);
}

/// The same in a larger job, TPP 4 stages + a VAE rank (5 processes), for a middle DiT stage
/// (rank 2).
#[test]
fn killing_a_middle_stage_of_a_tpp_job_ends_it() {
    kill_mid_generation("killed-stage", &tiny_flags("5x24GB", "4", SMALL), 5, 2);
}

/// The same for the VAE rank (rank 4) of TPP 4 stages + a VAE rank: the DiT stages waiting on
/// it see the lost connection too, but the error must name the rank that died.
#[test]
fn killing_the_vae_rank_of_a_tpp_job_ends_it() {
    kill_mid_generation("killed-vae", &tiny_flags("5x24GB", "4", SMALL), 5, 4);
}

/// Runs `lava generate` with `flags` (one clip, a job of `world` ranks), SIGKILLs rank `victim`
/// mid-generation, and checks that the launcher exits within 10 s with peer-lost
/// (`proto::exit::PEER_LOST`) and an error naming the rank and the signal, and that no worker
/// (by the pids the launcher printed at registration) outlives it.
fn kill_mid_generation(name: &str, flags: &[String], world: usize, victim: u32) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;

    let out = std::env::temp_dir().join(format!("lava-{name}-{}.mp4", std::process::id()));
    let mut child = Command::new(bin_dir().join("lava"))
        .arg("generate")
        .args(flags)
        .args(["--audio", &data("speech_44k.mp3"), "--save_file"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|r| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        })
    })
    .collect();
    drop(tx);
    // "lava: rank 3 registered: dit, pid 5678, 127.0.0.1:41234 on host"
    let pid_of = |line: &str| -> Option<(u32, i32)> {
        let (rank, rest) = line
            .strip_prefix("lava: rank ")?
            .split_once(" registered: ")?;
        let pid = rest.split("pid ").nth(1)?.split(',').next()?.parse().ok()?;
        Some((rank.parse().ok()?, pid))
    };
    let mut pids = std::collections::BTreeMap::new();
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let line = line.unwrap_or_else(|_| panic!("{name}: the ranks never loaded:\n{log}"));
        pids.extend(pid_of(&line));
        log.push_str(&line);
        log.push('\n');
        // Every rank loaded: the launcher sends Generate to all of them next.
        if line.starts_with("lava: ") && line.contains(" ranks loaded ") {
            break;
        }
    }
    assert_eq!(pids.len(), world, "{name}: {pids:?}\n{log}");
    // Mid-generation: every rank is in its Generate call (the DiT stages wait there for the
    // decoding rank's reference latents, which take the VAE encoder tens of seconds on CPU).
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on a pid this test's child started.
    assert_eq!(unsafe { libc::kill(pids[&victim], libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("{name}: job still running 10 s after the kill:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        r.join().unwrap();
    }
    log.extend(rx.try_iter().map(|l| l + "\n"));
    let lost = i32::from(proto::exit::PEER_LOST);
    assert_eq!(status.code(), Some(lost), "{name}:\n{log}");
    let named = format!("lava: error: rank {victim}: peer-lost: ");
    assert!(log.contains(&named), "{name}:\n{log}");
    let died = log.lines().any(|l| {
        l.starts_with(&format!("lava: rank {victim} (")) && l.contains("died: killed by signal 9")
    });
    assert!(died, "{name}:\n{log}");
    for (rank, pid) in &pids {
        // SAFETY: signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(*pid, 0) } == 0;
        assert!(
            !alive,
            "{name}: rank {rank} (pid {pid}) outlived the job:\n{log}"
        );
    }
    let _ = std::fs::remove_file(&out);
}

/// ffprobe's video and audio streams of `mp4`: (width, height, frame rate, frames, has audio).
fn probe(mp4: &std::path::Path) -> (u64, u64, String, String, bool) {
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-of",
            "json",
            "-show_entries",
        ])
        .arg("stream=codec_type,width,height,r_frame_rate,nb_read_frames")
        .arg(mp4)
        .output()
        .expect("ffprobe on PATH");
    assert!(probe.status.success());
    let probe: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    let streams = probe["streams"].as_array().unwrap();
    let video = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    (
        video["width"].as_u64().unwrap(),
        video["height"].as_u64().unwrap(),
        video["r_frame_rate"].as_str().unwrap().to_string(),
        video["nb_read_frames"].as_str().unwrap().to_string(),
        streams.iter().any(|s| s["codec_type"] == "audio"),
    )
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (d / n).sqrt()
}

/// The bundled speech twice over (5.3 s): two clips (93 frames + the 3 the audio skips, 3.84 s)
/// need more audio than the 2.6 s clip has.
fn long_speech() -> &'static PathBuf {
    static WAV: OnceLock<PathBuf> = OnceLock::new();
    WAV.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("lava-speech-x2-{}.wav", std::process::id()));
        let ok = Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-stream_loop", "1", "-i"])
            .arg(data("speech_44k.mp3"))
            .arg(&out)
            .status()
            .expect("ffmpeg on PATH");
        assert!(ok.success());
        out
    })
}

/// The smallest size the tiny model takes for boy.jpg (latents of 8 × 8).
const SMALL: &str = "64*64";

/// Runs `lava generate` for 2 clips with `layout` flags; returns (final latents, mp4, log).
fn generate_two_clips(name: &str, layout: &[&str]) -> (Vec<f32>, PathBuf, String) {
    generate_clips(name, layout, 2)
}

/// Runs `lava generate` for `clips` clips with `layout` flags: (final latents, mp4, log).
fn generate_clips(name: &str, layout: &[&str], clips: u32) -> (Vec<f32>, PathBuf, String) {
    let tmp = std::env::temp_dir();
    let pid = std::process::id();
    let mp4 = tmp.join(format!("lava-{name}-{pid}.mp4"));
    let lat = tmp.join(format!("lava-{name}-{pid}.f32"));
    let run = Command::new(bin_dir().join("lava"))
        .arg("generate")
        .args([
            "--model",
            "tiny",
            "--size",
            SMALL,
            "--image",
            &data("boy.jpg"),
        ])
        .args(layout)
        .arg("--audio")
        .arg(long_speech())
        .args(["--prompt", "a boy"])
        .arg("--num_clip")
        .arg(clips.to_string())
        .arg("--save_file")
        .arg(&mp4)
        .arg("--save_latents")
        .arg(&lat)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{name}:\n{log}");
    let bytes = std::fs::read(&lat).unwrap();
    let _ = std::fs::remove_file(&lat);
    let latents = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (latents, mp4, log)
}

/// TPP = 4 stages + a VAE rank, and TPP = 2 stages (2 steps each) with the VAE co-located on
/// the last stage, as separate processes: their final latents equal the single-rank run's
/// (one DiT rank + VAE rank) within f32 rel L2 1e-6, their MP4s pass ffprobe (2 clips =
/// 93 frames at 25 fps with audio), and the summary reports every stage and rank.
#[test]
fn tpp_layouts_equal_the_single_rank_run() {
    let (want, (w, h)) = single_rank();
    let (w, h) = (*w, *h);
    for (name, layout, stages, ranks) in [
        (
            "tpp4",
            &[
                "--gpus",
                "5x24GB",
                "--num_gpus_dit",
                "4",
                "--enable_vae_parallel",
            ][..],
            4,
            5,
        ),
        (
            "tpp2",
            &[
                "--gpus",
                "2x24GB",
                "--num_gpus_dit",
                "2",
                "--enable_vae_parallel",
                "false",
            ][..],
            2,
            2,
        ),
    ] {
        let (got, mp4, log) = generate_two_clips(name, layout);
        let err = rel_l2(&got, want);
        assert!(err <= 1e-6, "{name}: rel L2 {err}\n{log}");
        assert_eq!(
            probe(&mp4),
            (w, h, "25/1".to_string(), "93".to_string(), true),
            "{name}"
        );
        let _ = std::fs::remove_file(&mp4);
        assert!(
            log.contains("lava: block 7 (clip 1): frames 93/93"),
            "{log}"
        );
        assert!(log.contains(&format!("stage {}:", stages - 1)), "{log}");
        assert!(!log.contains(&format!("stage {stages}:")), "{log}");
        assert!(log.contains("slowest stage: stage"), "{log}");
        for r in 0..ranks {
            assert!(log.contains(&format!("lava:     rank {r} (")), "{log}");
        }
        assert!(log.contains("first frame after"), "{log}");
    }
}

/// The single-rank run (one DiT rank + VAE rank, 2 clips): (final latents, (width, height)),
/// made once for every test of this file that compares with it.
fn single_rank() -> &'static (Vec<f32>, (u64, u64)) {
    static REF: OnceLock<(Vec<f32>, (u64, u64))> = OnceLock::new();
    REF.get_or_init(|| {
        let (want, mp4, _) = generate_two_clips(
            "tpp1",
            &[
                "--gpus",
                "2x24GB",
                "--num_gpus_dit",
                "1",
                "--enable_vae_parallel",
            ],
        );
        let (w, h, ..) = probe(&mp4);
        let _ = std::fs::remove_file(&mp4);
        assert!(want.iter().any(|v| *v != 0.0));
        (want, (w, h))
    })
}

/// Stages split over ranks (the model's tp / Ulysses / layer-pipeline / FSDP layouts, runtime
/// parallel types) as separate processes: TP = 2, Ulysses = 2, PP = 2, FSDP = 2 (over a
/// Ulysses group of 2) with a VAE rank, and TPP (2 stages, the VAE co-located) composed with
/// them over 4 DiT ranks: TPP × TP and TPP × Ulysses for two clips (the clip-1 sink goes from
/// the last stage's ranks to the first's), TPP × FSDP for one (its sink travels as TPP ×
/// Ulysses's does; a clip costs ~20 s of CPU VAE decode). The plan is the one asked for, the
/// final latents equal the single-rank run's (f32 rel L2 ≤ 1e-6) and the MP4 passes ffprobe.
#[test]
fn split_stage_layouts_equal_the_single_rank_run() {
    let (want, (w, h)) = single_rank();
    let dit2 = [
        "--gpus",
        "3x24GB",
        "--num_gpus_dit",
        "2",
        "--enable_vae_parallel",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        dit2.iter().chain(extra).copied().collect()
    };
    // 2 TPP stages over 4 DiT ranks, the VAE co-located on the last stage's first rank.
    let tpp2 = |extra: &[&'static str]| -> Vec<&'static str> {
        [
            "--gpus",
            "4x24GB",
            "--num_gpus_dit",
            "4",
            "--enable_vae_parallel",
            "false",
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect()
    };
    for (name, layout, clips, plan) in [
        (
            "tp2",
            with(&["--tp", "2"]),
            1,
            "1 TPP stage × tp 2, + VAE rank",
        ),
        (
            "sp2",
            with(&["--ulysses_size", "2"]),
            1,
            "1 TPP stage × ulysses 2, + VAE rank",
        ),
        (
            "pp2",
            with(&["--pp", "2"]),
            1,
            "1 TPP stage × pp 2, + VAE rank",
        ),
        (
            "fsdp2",
            with(&["--ulysses_size", "2", "--fsdp"]),
            1,
            "1 TPP stage × ulysses 2 (FSDP), + VAE rank",
        ),
        (
            "tpp2xtp2",
            tpp2(&["--tp", "2"]),
            2,
            "2 TPP stages × tp 2, VAE co-located",
        ),
        (
            "tpp2xsp2",
            tpp2(&["--ulysses_size", "2"]),
            2,
            "2 TPP stages × ulysses 2, VAE co-located",
        ),
        (
            "tpp2xfsdp2",
            tpp2(&["--ulysses_size", "2", "--fsdp"]),
            1,
            "2 TPP stages × ulysses 2 (FSDP), VAE co-located",
        ),
    ] {
        let (got, mp4, log) = generate_clips(name, &layout, clips);
        assert!(
            log.contains(&format!("layout  {plan}")),
            "{name}: {plan}\n{log}"
        );
        let err = rel_l2(&got, &want[..got.len()]);
        assert!(err <= 1e-6, "{name}: rel L2 {err}\n{log}");
        let frames = (48 * clips - 3).to_string();
        assert_eq!(
            probe(&mp4),
            (*w, *h, "25/1".to_string(), frames, true),
            "{name}"
        );
        let _ = std::fs::remove_file(&mp4);
    }
}
