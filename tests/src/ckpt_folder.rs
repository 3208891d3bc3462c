//! The tiny checkpoint folder in the Wan2.2-S2V layout (DiT config.json + index + 2 shards,
//! `Wan2.1_VAE.pth`, umT5 `.pth` with the `google/umt5-xxl` tokenizer folder, the wav2vec2
//! folder) assembled from the committed fixtures, with the LoRA beside it. Used by the process
//! tests here and, through `#[path]`, by the worker's thread tests (the worker is a binary
//! crate, so neither side can link the other).

use std::path::{Path, PathBuf};

/// The two DiT shards of the tiny checkpoint.
pub const SHARDS: [&str; 2] = [
    "diffusion_pytorch_model-00001-of-00002.safetensors",
    "diffusion_pytorch_model-00002-of-00002.safetensors",
];

/// Copies the fixtures under `fixtures` into a fresh `root` (removed first): returns the
/// checkpoint folder `root/Wan2.2-S2V-14B` and the LoRA `root/liveavatar.safetensors`.
pub fn tiny_checkpoint_folder(fixtures: &Path, root: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let _ = std::fs::remove_dir_all(root);
    let dir = root.join("Wan2.2-S2V-14B");
    let (tok, w2v) = (
        dir.join("google/umt5-xxl"),
        dir.join("wav2vec2-large-xlsr-53-english"),
    );
    for d in [&tok, &w2v] {
        std::fs::create_dir_all(d)?;
    }
    let (f, dit) = (fixtures, fixtures.join("dit_tiny/checkpoint"));
    let index = "diffusion_pytorch_model.safetensors.index.json";
    let lora = root.join("liveavatar.safetensors");
    let copies = [
        (dit.join("config.json"), dir.join("config.json")),
        (dit.join(index), dir.join(index)),
        (dit.join(SHARDS[0]), dir.join(SHARDS[0])),
        (dit.join(SHARDS[1]), dir.join(SHARDS[1])),
        (
            f.join("vae_tiny/Wan2.1_VAE.pth"),
            dir.join("Wan2.1_VAE.pth"),
        ),
        (
            f.join("t5_tiny/models_t5_umt5-xxl-enc-bf16.pth"),
            dir.join("models_t5_umt5-xxl-enc-bf16.pth"),
        ),
        (
            f.join("t5_tiny/tokenizer/tokenizer.json"),
            tok.join("tokenizer.json"),
        ),
        (f.join("wav2vec2_tiny/config.json"), w2v.join("config.json")),
        (
            f.join("wav2vec2_tiny/model.safetensors"),
            w2v.join("model.safetensors"),
        ),
        (f.join("dit_tiny/lora/liveavatar.safetensors"), lora.clone()),
    ];
    for (from, to) in &copies {
        std::fs::copy(from, to)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", from.display())))?;
    }
    Ok((dir, lora))
}
