//! Checkpoint loading errors and shard reads on copies of the tiny fixture checkpoint: a
//! missing shard, a truncated file, a wrong shape, a missing or extra tensor, a config.json
//! of another model and a LoRA for another model each give one clear error naming the file
//! or tensor (and both shapes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use runtime::models::wan::{CausalWanModelS2V, WanConfig};
use runtime::weights::{Checkpoint, INDEX_NAME, Lora, LoraConfig, SafetensorsFile, ShardHint};
use runtime::{DType, Device, Error, Result};

const SHARD1: &str = "diffusion_pytorch_model-00001-of-00002.safetensors";
const SHARD2: &str = "diffusion_pytorch_model-00002-of-00002.safetensors";
const TINY_LORA: LoraConfig = LoraConfig {
    rank: 4,
    alpha: 2.0,
};

fn fixture_ckpt() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dit_tiny/checkpoint")
}

/// A private copy of the fixture checkpoint folder.
fn copy_ckpt(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lava-weights-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture_ckpt()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

type Entry = (String, String, Vec<usize>, Vec<u8>);

fn read_entries(path: &Path) -> Vec<Entry> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .map(|n| {
            let i = f.info(n).unwrap();
            let dt = match i.dtype {
                runtime::weights::StDType::Float(DType::BF16) => "BF16",
                runtime::weights::StDType::Float(DType::F32) => "F32",
                other => panic!("{other:?}"),
            };
            (
                n.to_string(),
                dt.to_string(),
                i.shape.clone(),
                f.bytes(n).unwrap().to_vec(),
            )
        })
        .collect()
}

fn write_safetensors(path: &Path, entries: &[Entry]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (n, dt, shape, bytes) in entries {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + bytes.len()]}),
        );
        off += bytes.len();
    }
    let h = serde_json::Value::Object(header).to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, _, _, b) in entries {
        out.extend(b);
    }
    std::fs::write(path, out).unwrap();
}

/// Rewrite shard 1 with `f` applied to its entries, keeping the index consistent.
fn edit_shard1(dir: &Path, f: impl FnOnce(&mut Vec<Entry>)) {
    let mut e = read_entries(&dir.join(SHARD1));
    let before: Vec<String> = e.iter().map(|x| x.0.clone()).collect();
    f(&mut e);
    write_safetensors(&dir.join(SHARD1), &e);
    let idx_path = dir.join(INDEX_NAME);
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    let map = idx["weight_map"].as_object_mut().unwrap();
    for n in before {
        map.remove(&n);
    }
    for (n, ..) in &e {
        map.insert(n.clone(), SHARD1.into());
    }
    std::fs::write(&idx_path, idx.to_string()).unwrap();
}

fn cfg() -> WanConfig {
    WanConfig::from(&planner::ModelSpec::builtin("tiny").unwrap())
}

fn load(dir: &Path, lora: Option<&Path>) -> Result<CausalWanModelS2V> {
    let ckpt = Checkpoint::open(dir)?;
    let lora = lora.map(|p| Lora::open(p, TINY_LORA)).transpose()?;
    CausalWanModelS2V::from_checkpoint(&cfg(), &ckpt, lora.as_ref(), DType::BF16, Device::Cpu)
}

fn message(r: Result<CausalWanModelS2V>) -> String {
    match r {
        Err(e @ Error::Checkpoint { .. }) => {
            eprintln!("{e}");
            e.to_string()
        }
        Err(e) => panic!("not a checkpoint error: {e}"),
        Ok(_) => panic!("loading succeeded"),
    }
}

#[test]
fn fixture_checkpoint_loads() {
    let m = load(&fixture_ckpt(), None).unwrap();
    assert_eq!(m.blocks.len(), cfg().num_layers);
    let ckpt = Checkpoint::open(fixture_ckpt()).unwrap();
    assert_eq!(ckpt.names().count(), cfg().expected_tensors().len());
}

#[test]
fn missing_shard() {
    let dir = copy_ckpt("missing-shard");
    std::fs::remove_file(dir.join(SHARD2)).unwrap();
    let msg = message(load(&dir, None));
    assert!(
        msg.contains(SHARD2) && msg.contains("does not exist"),
        "{msg}"
    );
}

#[test]
fn truncated_shard() {
    let dir = copy_ckpt("truncated");
    let p = dir.join(SHARD2);
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 1000).unwrap();
    let msg = message(load(&dir, None));
    assert!(msg.contains("truncated") && msg.contains(SHARD2), "{msg}");
    assert!(
        msg.contains(&format!("the file has {}", len - 1000)),
        "{msg}"
    );
}

#[test]
fn wrong_shape() {
    let dir = copy_ckpt("wrong-shape");
    let mut victim = String::new();
    let d = cfg().dim;
    edit_shard1(&dir, |e| {
        let x = e.iter_mut().find(|x| x.2 == [d]).unwrap();
        victim = x.0.clone();
        x.2 = vec![x.2[0] / 2];
        x.3.truncate(x.3.len() / 2);
    });
    let msg = message(load(&dir, None));
    assert!(msg.contains(&victim), "{msg}");
    assert!(
        msg.contains(&format!("checkpoint shape [{}]", d / 2)),
        "{msg}"
    );
    assert!(msg.contains(&format!("model expects [{d}]")), "{msg}");
}

#[test]
fn missing_and_extra_tensor() {
    let dir = copy_ckpt("missing-tensor");
    let mut victim = (String::new(), vec![]);
    edit_shard1(&dir, |e| {
        let x = e.remove(0);
        victim = (x.0, x.2);
    });
    let msg = message(load(&dir, None));
    assert!(
        msg.contains(&victim.0) && msg.contains("is missing"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{:?}", victim.1)), "{msg}");

    let dir = copy_ckpt("extra-tensor");
    edit_shard1(&dir, |e| {
        e.push((
            "blocks.99.ffn.0.bias".into(),
            "BF16".into(),
            vec![2],
            vec![0; 4],
        ));
    });
    let msg = message(load(&dir, None));
    assert!(
        msg.contains("unexpected tensor blocks.99.ffn.0.bias with shape [2]"),
        "{msg}"
    );
}

#[test]
fn config_of_another_model() {
    let dir = copy_ckpt("config");
    let p = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["dim"] = serde_json::json!(5120);
    std::fs::write(&p, c.to_string()).unwrap();
    let msg = message(load(&dir, None));
    assert!(
        msg.contains("config.json field dim: checkpoint has 5120"),
        "{msg}"
    );
}

#[test]
fn lora_for_another_model() {
    let dir = copy_ckpt("lora");
    let d = cfg().dim;
    // Rank-4 adapter of a model twice as wide.
    let lora = dir.join("foreign_lora.safetensors");
    write_safetensors(
        &lora,
        &[
            (
                "blocks.0.self_attn.q.lora_A.default.weight".into(),
                "BF16".into(),
                vec![4, 2 * d],
                vec![0; 4 * 2 * d * 2],
            ),
            (
                "blocks.0.self_attn.q.lora_B.default.weight".into(),
                "BF16".into(),
                vec![2 * d, 4],
                vec![0; 4 * 2 * d * 2],
            ),
        ],
    );
    let msg = message(load(&dir, Some(&lora)));
    assert!(msg.contains("blocks.0.self_attn.q"), "{msg}");
    assert!(
        msg.contains(&format!("A [4, {}]", 2 * d)) && msg.contains(&format!("weight [{d}, {d}]")),
        "{msg}"
    );

    // An adapter for a module this model does not have.
    write_safetensors(
        &lora,
        &[
            (
                "blocks.40.self_attn.q.lora_A.default.weight".into(),
                "BF16".into(),
                vec![4, d],
                vec![0; 4 * d * 2],
            ),
            (
                "blocks.40.self_attn.q.lora_B.default.weight".into(),
                "BF16".into(),
                vec![d, 4],
                vec![0; 4 * d * 2],
            ),
        ],
    );
    let msg = message(load(&dir, Some(&lora)));
    assert!(
        msg.contains("blocks.40.self_attn.q") && msg.contains("no such linear"),
        "{msg}"
    );
}

#[test]
fn shard_reads_equal_slices_of_the_full_tensor() {
    let ckpt = Checkpoint::open(fixture_ckpt()).unwrap();
    let name = "blocks.1.ffn.0.weight";
    let full = ckpt.tensor(name, &Device::Cpu).unwrap();
    let (rows, cols) = full.dims2().unwrap();
    for (dim, n) in [(0, rows), (1, cols)] {
        for rank in 0..4 {
            let hint = ShardHint {
                dim,
                rank,
                world: 4,
            };
            let part = ckpt.tensor_shard(name, hint, &Device::Cpu).unwrap();
            let want = full.narrow(dim, rank * n / 4, n / 4).unwrap();
            assert_eq!(
                part.to_bytes().unwrap(),
                want.to_bytes().unwrap(),
                "dim {dim} rank {rank}"
            );
        }
    }
    let bad = ckpt.tensor_shard(
        name,
        ShardHint {
            dim: 0,
            rank: 0,
            world: 3,
        },
        &Device::Cpu,
    );
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("does not split into 3")
    );
}

#[test]
fn sharded_loads_with_lora_equal_slices_of_the_merged_weight() {
    use runtime::models::VarBuilder;
    let ckpt = Checkpoint::open(fixture_ckpt()).unwrap();
    let lora_path = fixture_ckpt().join("../lora/liveavatar.safetensors");
    let lora = Lora::open(lora_path, TINY_LORA).unwrap();
    let vb = VarBuilder::new(&ckpt, Some(&lora), DType::BF16, Device::Cpu);
    let (d, f) = (cfg().dim, cfg().ffn_dim);
    for (name, shape) in [
        ("blocks.2.ffn.0", [f, d]),
        ("blocks.0.cross_attn.o", [d, d]),
    ] {
        let m = vb.pp(name);
        let full = m.get("weight", &shape).unwrap();
        let plain = ckpt
            .tensor(&format!("{name}.weight"), &Device::Cpu)
            .unwrap();
        assert_ne!(
            full.to_bytes().unwrap(),
            plain.to_bytes().unwrap(),
            "{name} not adapted"
        );
        for dim in 0..2 {
            let n = shape[dim];
            for rank in 0..2 {
                let hint = ShardHint {
                    dim,
                    rank,
                    world: 2,
                };
                let part = m.get_sharded("weight", &shape, hint).unwrap();
                let want = full.narrow(dim, rank * n / 2, n / 2).unwrap();
                assert_eq!(
                    part.to_bytes().unwrap(),
                    want.to_bytes().unwrap(),
                    "{name} {hint:?}"
                );
            }
        }
        let wrong = m.get_sharded(
            "weight",
            &[1, 2],
            ShardHint {
                dim: 0,
                rank: 0,
                world: 2,
            },
        );
        assert!(
            wrong
                .unwrap_err()
                .to_string()
                .contains("model expects [1, 2]")
        );
    }
}
