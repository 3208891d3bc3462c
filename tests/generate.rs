//! `lava generate` end to end on CPU ranks with the built-in tiny model: the launcher plans,
//! spawns a DiT rank and a VAE rank as separate `lava-worker` processes, and writes an MP4
//! whose video (size from `lava plan`, 25 fps, 48·N − 3 frames) and audio ffprobe confirms.
//! An infeasible plan starts nothing. Needs ffmpeg/ffprobe on PATH (.ci/run installs them).
//! The latents' equality with a single-process run is tested in worker/src/role (same
//! socket-communicator path, two threads).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("LAVA_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "launcher", "-p", "worker", "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building lava failed");
        dir
    })
}

fn data(name: &str) -> String {
    format!("{}/../media/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The flags of the tiny run: one DiT rank, one VAE rank, planned as two generic 24 GB GPUs.
fn tiny_flags(gpus: &str, size: &str) -> Vec<String> {
    [
        "--gpus",
        gpus,
        "--model",
        "tiny",
        "--num_gpus_dit",
        "1",
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
    let flags = tiny_flags("2x24GB", "128*64");
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
        .arg(&out)
        .output()
        .expect("ffprobe on PATH");
    assert!(probe.status.success());
    let probe: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    let streams = probe["streams"].as_array().unwrap();
    let video = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    assert_eq!(video["width"].as_u64(), Some(w));
    assert_eq!(video["height"].as_u64(), Some(h));
    assert_eq!(video["r_frame_rate"], "25/1");
    // One clip: 48 frames less the 3 dropped at the start (model-spec §6.4).
    assert_eq!(video["nb_read_frames"], "45");
    assert!(streams.iter().any(|s| s["codec_type"] == "audio"));
    let _ = std::fs::remove_file(&out);
}

#[test]
fn infeasible_plan_starts_nothing() {
    let t0 = Instant::now();
    let run = Command::new(bin_dir().join("lava"))
        .arg("generate")
        .args(tiny_flags("2x1GB", "1920*1088"))
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

/// SIGKILL of the DiT rank mid-generation ends the whole job within 10 s with the peer-lost
/// exit code and an error naming the rank, and the VAE rank does not outlive it.
#[test]
fn killing_a_rank_mid_generation_ends_the_job() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;

    let out = std::env::temp_dir().join(format!("lava-killed-{}.mp4", std::process::id()));
    let mut child = Command::new(bin_dir().join("lava"))
        .arg("generate")
        .args(tiny_flags("2x24GB", "128*64"))
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
    let pid_of = |line: &str, rank: &str| -> Option<i32> {
        let rest = line.strip_prefix(&format!("lava: rank {rank} registered: "))?;
        rest.split("pid ").nth(1)?.split(',').next()?.parse().ok()
    };
    let (mut dit, mut vae, mut log) = (None, None, String::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let line = line.unwrap_or_else(|_| panic!("no generation started:\n{log}"));
        dit = dit.or_else(|| pid_of(&line, "0"));
        vae = vae.or_else(|| pid_of(&line, "1"));
        log.push_str(&line);
        log.push('\n');
        if line.contains("loaded the built-in tiny model") {
            break;
        }
    }
    let (dit, vae) = (dit.unwrap(), vae.unwrap());
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on a pid this test's child started.
    assert_eq!(unsafe { libc::kill(dit, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "job still running:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        r.join().unwrap();
    }
    log.extend(rx.try_iter().map(|l| l + "\n"));
    assert_eq!(status.code(), Some(5), "{log}");
    assert!(log.contains("rank 0"), "{log}");
    // SAFETY: signal 0 only checks whether the pid exists.
    let vae_alive = unsafe { libc::kill(vae, 0) } == 0;
    assert!(!vae_alive, "the VAE rank outlived the job:\n{log}");
    let _ = std::fs::remove_file(&out);
}
