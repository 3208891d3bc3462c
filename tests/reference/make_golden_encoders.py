"""Golden fixtures of the VAE, the T5 encoder and wav2vec2 (model-spec §1.3–1.5, §6.4).

Tiny configurations of the real architectures (configs/models/tiny.toml), random weights saved
under the real checkpoint names and formats:
  tests/fixtures/vae_tiny/Wan2.1_VAE.pth                       torch.save state dict, f32
  tests/fixtures/vae_tiny/golden.pth                           inputs and outputs
  tests/fixtures/t5_tiny/models_t5_umt5-xxl-enc-bf16.pth       torch.save state dict, bf16
  tests/fixtures/t5_tiny/golden.pth
  tests/fixtures/wav2vec2_tiny/{config.json,model.safetensors} HF folder
  tests/fixtures/wav2vec2_tiny/golden.pth
Everything is computed in float32 on CPU. Usage: python3 make_golden_encoders.py [vae|t5|w2v]...
"""

from __future__ import annotations

import math
import re
import sys
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
TINY = tomllib.loads((ROOT / "configs" / "models" / "tiny.toml").read_text())


def save_pth(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Deterministic archive (fixed root name inside the zip).
    torch.save({k: v.contiguous().clone() for k, v in obj.items()}, path)


def random_init_(model: torch.nn.Module, gen: torch.Generator, round_to=torch.bfloat16) -> None:
    """Weights ~ N(0, 1/fan_in), biases ~ 0.1 N, norm gains ~ 1 + 0.1 N, rounded to `round_to`
    (bf16-representable, so a bf16 checkpoint holds exactly the f32 values)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma") or re.search(r"norm\d*\.weight$", name):
                v = 1.0 + 0.1 * n
            elif name.endswith("bias"):
                v = 0.1 * n
            elif p.dim() >= 2:
                v = n / math.sqrt(math.prod(p.shape[1:]))
            else:
                v = 0.5 * n
            p.copy_(v.to(round_to).float())


def make_vae() -> None:
    from vae_ref import StreamDecoder, VaeConfig, WanVAE

    v = TINY["vae"]
    cfg = VaeConfig(z_dim=v["z_dim"], base_dim=v["base_dim"], dim_mult=tuple(v["dim_mult"]),
                    num_res_blocks=v["num_res_blocks"],
                    temporal_downsample=tuple(v["temporal_downsample"]))
    gen = torch.Generator().manual_seed(1234)
    vae = WanVAE(cfg).eval()
    random_init_(vae, gen)
    out = FIX / "vae_tiny"
    save_pth(vae.state_dict(), out / "Wan2.1_VAE.pth")

    # Encode: 9 frames (first frame alone, then two 4-frame chunks) at 32×48.
    video = (torch.rand(1, 3, 9, 32, 48, generator=gen) * 2 - 1)
    with torch.no_grad():
        latents = vae.encode(video)
        # Streaming decode: 2 priming latents, then calls of 3 and 2 latents (one stream).
        z = torch.randn(1, cfg.z_dim, 7, 4, 6, generator=gen)
        dec = StreamDecoder(vae)
        calls = [dec.decode(z[:, :, a:b]) for a, b in ((0, 2), (2, 5), (5, 7))]
        # The bf16 dtype flow (autocast semantics) on the same stream.
        dec16 = StreamDecoder(vae, torch.bfloat16)
        calls16 = [dec16.decode(z[:, :, a:b]) for a, b in ((0, 2), (2, 5), (5, 7))]
    golden = {"video": video, "latents": latents, "z": z}
    for i, (c, c16) in enumerate(zip(calls, calls16)):
        golden[f"decode.{i}"] = c
        golden[f"decode_bf16.{i}"] = c16
    save_pth(golden, out / "golden.pth")
    print("vae:", {k: tuple(t.shape) for k, t in golden.items()})


T5_FIXTURE_VOCAB = 1024  # the real 256384 would make a 16 MB embedding; the code is the same


def make_t5() -> None:
    from t5_ref import T5Config, T5Encoder

    t = TINY["t5"]
    cfg = T5Config(vocab=T5_FIXTURE_VOCAB, dim=t["dim"], ffn_dim=t["ffn_dim"],
                   num_heads=t["num_heads"], num_layers=t["num_layers"],
                   num_buckets=t["num_buckets"])
    gen = torch.Generator().manual_seed(5)
    model = T5Encoder(cfg).eval()
    random_init_(model, gen)
    with torch.no_grad():
        # Embeddings ~ N(0, 1) like the real table's scale, not 1/sqrt(dim).
        model.token_embedding.weight.copy_(
            torch.randn(model.token_embedding.weight.shape, generator=gen).bfloat16().float())
    out = FIX / "t5_tiny"
    save_pth({k: v.bfloat16() for k, v in model.state_dict().items()},
             out / "models_t5_umt5-xxl-enc-bf16.pth")
    # One prompt of 37 real tokens (the last is EOS = 1) padded with 0 to 48.
    length, real = 48, 37
    ids = torch.zeros(1, length, dtype=torch.long)
    ids[0, :real] = torch.randint(2, cfg.vocab, (real,), generator=gen)
    ids[0, real - 1] = 1
    mask = (torch.arange(length) < real).long()[None]
    with torch.no_grad():
        y = model(ids, mask)[:, :real]
    golden = {"ids": ids.float(), "mask": mask.float(), "output": y}  # f32: the .pth reader takes float storages
    save_pth(golden, out / "golden.pth")
    print("t5:", {k: tuple(t.shape) for k, t in golden.items()})


def make_w2v() -> None:
    import json

    from safetensors.torch import save_file

    from wav2vec2_ref import W2vConfig, Wav2Vec2

    w = TINY["wav2vec2"]
    cfg = W2vConfig(conv_dim=w["conv_dim"], conv_kernel=w["conv_kernel"],
                    conv_stride=w["conv_stride"], hidden=w["hidden"], num_layers=w["num_layers"],
                    num_heads=w["num_heads"], ffn_dim=w["ffn_dim"],
                    pos_conv_kernel=w["pos_conv_kernel"], pos_conv_groups=w["pos_conv_groups"])
    gen = torch.Generator().manual_seed(77)
    model = Wav2Vec2(cfg).eval()
    random_init_(model, gen)
    with torch.no_grad():
        # weight_g ~ |N| scale of a real weight-normed kernel (per-tap norms).
        g = model.encoder.pos_conv_embed.conv.weight_g
        g.copy_((0.5 + 0.5 * torch.rand(g.shape, generator=gen)).bfloat16().float())
    out = FIX / "wav2vec2_tiny"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.hf_config(), indent=2) + "\n")
    # As the CTC checkpoint: `wav2vec2.` prefix plus the (unused) CTC head and masked_spec_embed.
    sd = {f"wav2vec2.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["wav2vec2.masked_spec_embed"] = torch.rand(cfg.hidden, generator=gen)
    sd["lm_head.weight"] = torch.randn(32, cfg.hidden, generator=gen)
    sd["lm_head.bias"] = torch.zeros(32)
    save_file(sd, out / "model.safetensors")
    # The same weights as a pytorch_model.bin folder (the other layout HF folders have).
    bin_dir = FIX / "wav2vec2_tiny_bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "config.json").write_text((out / "config.json").read_text())
    save_pth(sd, bin_dir / "pytorch_model.bin")
    # 0.5 s of normalised noise-like audio: T50 = (8000 − 400) // 320 + 1 = 24 frames.
    wav = torch.randn(1, 8000, generator=gen)
    with torch.no_grad():
        states = model(wav)[:, 0]
    golden = {"input_values": wav, "hidden_states": states}
    try:  # optional cross-check with transformers' implementation of the same checkpoint
        from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

        hf = Wav2Vec2ForCTC(Wav2Vec2Config(**cfg.hf_config())).eval()
        missing = hf.load_state_dict({k: v for k, v in sd.items()}, strict=False)
        assert not missing.unexpected_keys, missing
        with torch.no_grad():
            hs = hf(wav, output_hidden_states=True).hidden_states
        d = max(((a[0] - b).norm() / b.norm()).item() for a, b in zip(hs, states))
        print(f"wav2vec2: transformers agrees, max rel L2 {d:.2e}")
        assert d < 1e-5
    except ImportError:
        print("wav2vec2: transformers not installed, cross-check skipped")
    save_pth(golden, out / "golden.pth")
    print("wav2vec2:", {k: tuple(t.shape) for k, t in golden.items()})


def make_pth() -> None:
    """Small archives for the .pth reader: dtypes, views, zip64, and what it must reject."""
    import zipfile

    def fixed_info(info):  # same name, fixed timestamp: reproducible archives
        return zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))

    out = FIX / "pth"
    out.mkdir(parents=True, exist_ok=True)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8
    # Views of one storage: a transpose (strided), a row slice (offset), a parameter.
    sd = {"f32": base, "bf16": (base - 1).bfloat16(), "f16": (base + 0.5).half(),
          "t": base.t(), "rows": base[1:3], "scalar": torch.tensor(2.5),
          "param": torch.nn.Parameter(base[:, 0:1].clone())}
    torch.save(sd, out / "views.pth")  # not save_pth: keep the views strided
    # The same archive rewritten with zip64 records everywhere (as checkpoints over 4 GiB have):
    # a zero ZIP64_LIMIT makes zipfile write zip64 extra fields and the zip64 end records.
    limit = zipfile.ZIP64_LIMIT
    zipfile.ZIP64_LIMIT = 0
    try:
        with zipfile.ZipFile(out / "views.pth") as src, \
                zipfile.ZipFile(out / "zip64.pth", "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                with dst.open(fixed_info(info), "w", force_zip64=True) as f:
                    f.write(src.read(info.filename))
    finally:
        zipfile.ZIP64_LIMIT = limit
    # Rejected: an int64 tensor, a non-tensor entry, a deflated archive.
    torch.save({"ids": torch.arange(3)}, out / "int64.pth")
    torch.save({"w": base, "step": 3}, out / "not_tensor.pth")
    with zipfile.ZipFile(out / "views.pth") as src, \
            zipfile.ZipFile(out / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            z = fixed_info(info)
            z.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(z, src.read(info.filename))
    print("pth:", sorted(p.name for p in out.iterdir()))


TOKENIZER_PROMPTS = [
    "A woman speaks to the camera, smiling.  Soft light.",
    "  Tom &amp; Jerry &lt;3 &amp;amp;lt;b&amp;gt; \t\n line two\r\nthree  ",
    "\u201cCurly\u201d \u2018quotes\u2019 and \ufb01ne ligatures, \uff26\uff35\uff2c\uff2c\u3000\uff54\uff45\uff58\uff54",
    "x\x00y\x1b[31mred\x1b[0m \x85 \u2028 done\u200b\ufeff",
    "a < b &amp; c &amp;amp; d",
    "&notit; &#x80; &#0; &#1114112; &#65 &AMP &ampx &#x1; &#xD800; &unknown; &#;",
    "e\u0301 combining, C1 \x93quoted\x94 \x81",
    " ".join(f"word{i % 7} and more" for i in range(30)),
    "",
    "\u4e00\u4e2a\u5973\u4eba\u5728\u8bf4\u8bdd, caf\u00e9 na\u00efve",
]


def reference_clean(text: str) -> str:
    """The prompt cleaning of §1.3: ftfy, html.unescape twice, strip, collapse whitespace."""
    import html
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def make_tokenizer() -> None:
    """A tiny tokenizer.json of the umT5 kind (Unigram, Metaspace, EOS template) and the ids
    the fast-tokenizer call of the reference gives (padding and truncation to text_len)."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["a", "an", "and", "the", "to", "wo", "man", "speak", "s", "camera", "smil", "ing",
             "soft", "light", "word", "more", "quote", "line", "two", "three", "red", "done"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       ".,;:!?&<>'\"-\u00e9\u00ef\u4e00\u4e2a\u5973\u4eba\u5728\u8bf4\u8bdd"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0 - 0.1 * i) for i, w in enumerate(words)]
    vocab += [(w, -4.0 - 0.1 * i) for i, w in enumerate(words)]
    vocab += [(c, -8.0) for c in chars] + [("\u2581" + c, -7.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    out = FIX / "t5_tiny" / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    text_len = 32
    tok.enable_truncation(max_length=text_len)
    tok.enable_padding(length=text_len, pad_id=0, pad_token="<pad>")
    cases = []
    for p in TOKENIZER_PROMPTS:
        clean = reference_clean(p)
        enc = tok.encode(clean)
        cases.append({"prompt": p, "clean": clean, "ids": enc.ids,
                      "real": sum(enc.attention_mask)})
    (FIX / "t5_tiny" / "tokenizer_golden.json").write_text(
        json.dumps({"text_len": text_len, "cases": cases}, indent=1, ensure_ascii=True) + "\n")
    print("tokenizer:", [c["real"] for c in cases])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    torch.manual_seed(0)
    which = sys.argv[1:] or ["vae", "t5", "w2v", "pth", "tok"]
    for w in which:
        {"vae": make_vae, "t5": make_t5, "w2v": make_w2v, "pth": make_pth, "tok": make_tokenizer}[w]()
