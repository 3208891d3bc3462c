//! `lava generate --ckpt_dir` on CPU ranks with a checkpoint folder of the tiny configuration
//! (configs/models/tiny.toml) assembled at test time from the committed fixtures in the
//! Wan2.2-S2V layout: DiT config.json + index + 2 shards, `Wan2.1_VAE.pth`, umT5 `.pth` with
//! the `google/umt5-xxl` tokenizer folder, the wav2vec2 folder, and the LoRA via
//! `--lora_path_dmd`. The run writes an MP4 (ffprobe-checked); a missing shard, a truncated
//! shard, a mis-shaped tensor and a LoRA for another model each end the job with the
//! load-failure exit code (4) and a message naming the file or tensor; a folder without an
//! index is refused by the launcher (bad input, 2) before any rank starts. With
//! `--weights_from_rank0` only rank 0 reads the folder, the VAE rank receives its files over
//! the communicator and the latents are the local read's; a broken folder then fails the
//! receiving rank too, with rank 0's message.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lava_tests::bin_dir;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn data(name: &str) -> String {
    format!("{}/../media/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

use lava_tests::ckpt_folder::{SHARDS, tiny_checkpoint_folder};

const SHARD1: &str = SHARDS[0];
const SHARD2: &str = SHARDS[1];

/// A fresh folder `name` under the temp dir with the tiny checkpoint, and the LoRA beside it.
fn tiny_folder(name: &str) -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("lava-ckpt-{}-{name}", std::process::id()));
    tiny_checkpoint_folder(&fixtures(), &root).unwrap()
}

fn edit_header(path: &Path, edit: impl Fn(&str, &mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for (k, v) in header.iter_mut() {
        if k != "__metadata__" {
            edit(k, v);
        }
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// One DiT rank and a VAE rank.
const DIT_AND_VAE: [&str; 5] = [
    "--gpus",
    "2x24GB",
    "--num_gpus_dit",
    "1",
    "--enable_vae_parallel",
];

/// `lava generate` on the tiny checkpoint with `args` (the layout and more).
fn generate_with(dir: &Path, lora: Option<&Path>, out: &Path, args: &[&str]) -> (Output, String) {
    let mut cmd = Command::new(bin_dir().join("lava"));
    cmd.arg("generate")
        .args(args)
        .args([
            "--model",
            "tiny",
            "--size",
            "128*64",
            "--image",
            &data("boy.jpg"),
            "--audio",
            &data("speech_44k.mp3"),
            "--prompt",
            "a boy talking",
            "--num_clip",
            "1",
            "--ckpt_dir",
        ])
        .arg(dir)
        .arg("--save_file")
        .arg(out);
    if let Some(l) = lora {
        cmd.arg("--lora_path_dmd").arg(l);
    }
    let run = cmd.output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    (run, log)
}

/// The run writes an MP4; run again with `--weights_from_rank0` (only rank 0 reads the folder
/// and the LoRA, the VAE rank receives the VAE, umT5, the tokenizer and wav2vec2 from it), it
/// gives the same final latents.
#[test]
fn generate_from_a_checkpoint_folder_writes_an_mp4() {
    let (dir, lora) = tiny_folder("ok");
    let root = dir.parent().unwrap().to_path_buf();
    let out = root.join("out.mp4");
    let with_latents = |tag: &str, extra: &[&str]| -> (Output, String, PathBuf) {
        let latents = root.join(format!("{tag}.f32"));
        let mut args: Vec<&str> = DIT_AND_VAE.to_vec();
        args.push("--save_latents");
        args.push(latents.to_str().unwrap());
        args.extend(extra);
        let (run, log) = generate_with(&dir, Some(&lora), &root.join(format!("{tag}.mp4")), &args);
        (run, log, latents)
    };
    let (run, log, local) = with_latents("out", &[]);
    assert!(run.status.success(), "{log}");
    assert!(!log.contains("received its weights"), "{log}");
    assert!(
        log.contains("lava: block 3 (clip 0): frames 45/45"),
        "{log}"
    );
    // The encoders ran once, on the VAE rank, and the DiT rank took their outputs.
    assert!(
        log.contains("[rank 1 vae] encoded the prompt (umT5) and the audio (wav2vec2, 48 frames) once, sent to ranks [0]"),
        "{log}"
    );
    assert!(
        log.contains("[rank 0 dit] received the text context and audio features from rank 1"),
        "{log}"
    );
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-of", "json"])
        .args([
            "-show_entries",
            "stream=codec_type,width,height,nb_read_frames",
        ])
        .arg(&out)
        .output()
        .expect("ffprobe on PATH");
    assert!(probe.status.success());
    let probe: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    let streams = probe["streams"].as_array().unwrap();
    let video = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    assert_eq!(video["nb_read_frames"], "45");
    assert!(video["width"].as_u64().unwrap() > 0);
    assert!(streams.iter().any(|s| s["codec_type"] == "audio"));
    let (run, log, received) = with_latents("rank0", &["--weights_from_rank0"]);
    assert!(run.status.success(), "{log}");
    assert!(
        log.contains("[rank 0 dit] sent rank 1 its weights"),
        "{log}"
    );
    assert!(
        log.contains("[rank 1 vae] received its weights from rank 0:"),
        "{log}"
    );
    let want = read_f32(&local);
    assert!(!want.is_empty() && want.iter().any(|v| *v != 0.0));
    assert_eq!(read_f32(&received), want);
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs a broken folder: exit `code`, the log names `what`, and no rank got to generating.
fn refused(name: &str, code: i32, what: &str, breaks: impl Fn(&Path, &Path)) {
    refused_with(name, &DIT_AND_VAE, code, what, breaks);
}

fn refused_with(name: &str, args: &[&str], code: i32, what: &str, breaks: impl Fn(&Path, &Path)) {
    let (dir, lora) = tiny_folder(name);
    breaks(&dir, &lora);
    let out = dir.parent().unwrap().join("out.mp4");
    let (run, log) = generate_with(&dir, Some(&lora), &out, args);
    assert_eq!(run.status.code(), Some(code), "{log}");
    assert!(log.contains(what), "expected {what:?} in:\n{log}");
    assert!(!log.contains("frames 3/"), "{log}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn missing_shard_is_a_load_failure() {
    refused("missing", 4, SHARD2, |dir, _| {
        std::fs::remove_file(dir.join(SHARD2)).unwrap();
    });
}

#[test]
fn truncated_shard_is_a_load_failure() {
    refused("truncated", 4, SHARD1, |dir, _| {
        let p = dir.join(SHARD1);
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len / 2).unwrap();
    });
}

#[test]
fn mis_shaped_tensor_is_a_load_failure() {
    // Same byte count, other shape: only the name/shape check can catch it.
    refused("shape", 4, "blocks.0.self_attn.q.weight", |dir, _| {
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("diffusion_pytorch_model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let file = index["weight_map"]["blocks.0.self_attn.q.weight"]
            .as_str()
            .unwrap();
        edit_header(&dir.join(file), |k, v| {
            if k == "blocks.0.self_attn.q.weight" {
                assert_eq!(v["shape"], serde_json::json!([64, 64]));
                v["shape"] = serde_json::json!([32, 128]);
            }
        });
    });
}

#[test]
fn lora_for_another_model_is_a_load_failure() {
    // Every adapter reshaped as if for a model of width 32 (rank 8): nothing fits.
    refused("lora", 4, "a LoRA for another model", |_, lora| {
        edit_header(lora, |k, v| {
            let s: Vec<u64> = serde_json::from_value(v["shape"].clone()).unwrap();
            let new = if k.contains("lora_A") {
                [s[0] * 2, s[1] / 2]
            } else {
                [s[0] / 2, s[1] * 2]
            };
            v["shape"] = serde_json::json!(new);
        });
    });
}

#[test]
fn folder_without_index_is_refused_by_the_launcher() {
    refused(
        "noindex",
        2,
        "diffusion_pytorch_model.safetensors.index.json",
        |dir, _| {
            std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors.index.json"))
                .unwrap();
        },
    );
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// With `--weights_from_rank0` a broken folder on rank 0 fails the receiving VAE rank too,
/// with rank 0's message (load failure, exit 4).
#[test]
fn weights_from_rank0_with_a_missing_shard_fails_every_rank() {
    let mut args = DIT_AND_VAE.to_vec();
    args.push("--weights_from_rank0");
    refused_with("rank0-missing", &args, 4, SHARD2, |dir, _| {
        std::fs::remove_file(dir.join(SHARD2)).unwrap();
    });
}
