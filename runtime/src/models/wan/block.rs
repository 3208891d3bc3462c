//! `WanAttentionBlock` (model-spec §3.3.1) with the reference's eager dtype flow: bf16 between
//! blocks, an f32 residual inside, norm1 output rounded to the activation dtype before the
//! modulation, norm2 on the f32 residual without rounding.
//!
//! The block is built from the `parallel` layer types: `TpAttention` for self- and
//! cross-attention, `ColumnParallel` ffn.0, `RowParallel` ffn.2. At tp = 1 they are the
//! unsharded layers; under tp they hold this rank's heads / hidden units (docs/parallelism.md).
//! The tokens it sees are this rank's (all of them, or a Ulysses chunk); [`FrameRuns`] says
//! which latent frame's modulation each token uses.

use super::super::VarBuilder;
use super::attention::sdpa;
use super::config::WanConfig;
use crate::parallel::{ColumnParallel, RowParallel, SharedComm, TpAttention};
use crate::{DType, Error, ResNormMod, Result, Tensor};

/// Where the self-attention keys and values come from and go to: the prefill stores the sink,
/// a streaming call writes its block into the ring and attends to ring + sink.
pub trait SelfAttnKv {
    /// q, k, v: RMS-normed heads `[1, L, H, d]` (not yet rotated) of layer `layer`; returns
    /// the attention output heads `[1, L, H, d]`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;

    /// Self-attention of `a` through `attn`'s projections: by default the q/k norms, then
    /// [`SelfAttnKv::attend`]; a streaming cache fuses the norms with its rotation.
    fn attend_proj(&mut self, layer: usize, attn: &TpAttention, a: &Tensor) -> Result<Tensor> {
        let q = attn.query(a)?;
        let (k, v) = attn.key_value(a)?;
        self.attend(layer, &q, &k, &v)
    }
}

/// The tokens of one rank as runs of consecutive tokens, each run with the index of the
/// per-frame vector (modulation, audio) it uses. One rank holding the whole sequence has G
/// equal runs 0..G; a Ulysses chunk need not align with latent frames (model-spec §3.3.1
/// vectors are per frame), so its runs are cut at frame borders, and its padding rows (if
/// any) form a last run that reuses the last frame's vector (their output is dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRuns {
    /// (row, tokens) in token order.
    runs: Vec<(usize, usize)>,
}

impl FrameRuns {
    /// `groups` equal groups of `group_len` tokens, rows 0..groups.
    pub fn uniform(groups: usize, group_len: usize) -> Self {
        Self {
            runs: (0..groups).map(|g| (g, group_len)).collect(),
        }
    }

    /// The chunk `[offset, offset + local)` of a sequence of `groups · group_len` tokens
    /// padded past its end.
    pub fn chunk(offset: usize, local: usize, groups: usize, group_len: usize) -> Result<Self> {
        let len = groups * group_len;
        if group_len == 0 || groups == 0 {
            return Err(Error::invalid("FrameRuns", "empty groups"));
        }
        let mut runs = Vec::new();
        let (mut pos, end) = (offset, offset + local);
        while pos < end.min(len) {
            let g = pos / group_len;
            let stop = ((g + 1) * group_len).min(end);
            runs.push((g, stop - pos));
            pos = stop;
        }
        if end > pos {
            runs.push((groups - 1, end - pos));
        }
        Ok(Self { runs })
    }

    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (first row, runs, tokens per run) when the runs are equal and use consecutive rows.
    fn regular(&self) -> Option<(usize, usize, usize)> {
        let (r0, l) = *self.runs.first()?;
        let ok = self
            .runs
            .iter()
            .enumerate()
            .all(|(i, &(r, n))| r == r0 + i && n == l);
        ok.then_some((r0, self.runs.len(), l))
    }

    /// `f` on each run: `xs` are `[1, tokens, ·]` cut into runs `[n, l, ·]`, `rows` are
    /// per-frame tensors `[G, ..]` cut to the runs' rows `[n, ..]`; `f` returns `[n, l, ·]`,
    /// put back in token order as `[1, tokens, ·]`. Regular runs are one call on a reshaped
    /// view (the unsharded model's grouping); others one call per run.
    pub fn map(
        &self,
        xs: &[&Tensor],
        rows: &[&Tensor],
        f: impl Fn(&[Tensor], &[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let last = |t: &Tensor| t.dims().last().copied().unwrap_or(1);
        if let Some((r0, n, l)) = self.regular() {
            let xs: Vec<Tensor> = xs
                .iter()
                .map(|x| x.reshape((n, l, last(x))))
                .collect::<Result<_>>()?;
            let rows: Vec<Tensor> = rows
                .iter()
                .map(|m| m.narrow(0, r0, n))
                .collect::<Result<_>>()?;
            let y = f(&xs, &rows)?;
            return y.reshape((1, n * l, last(&y)));
        }
        let mut parts = Vec::with_capacity(self.runs.len());
        let mut start = 0;
        for &(row, l) in &self.runs {
            let xs: Vec<Tensor> = xs
                .iter()
                .map(|x| x.reshape((1, self.len(), last(x)))?.narrow(1, start, l))
                .collect::<Result<_>>()?;
            let rows: Vec<Tensor> = rows
                .iter()
                .map(|m| m.narrow(0, row, 1))
                .collect::<Result<_>>()?;
            parts.push(f(&xs, &rows)?);
            start += l;
        }
        let y = Tensor::cat(&parts.iter().collect::<Vec<_>>(), 1)?;
        y.reshape((1, self.len(), last(&y)))
    }
}

/// One of the `blocks.{i}`, this rank's part of it.
#[derive(Debug, Clone)]
pub struct WanAttentionBlock {
    pub modulation: Tensor,
    pub self_attn: TpAttention,
    pub cross_attn: TpAttention,
    pub norm3_weight: Tensor,
    pub norm3_bias: Tensor,
    pub ffn_0: ColumnParallel,
    pub ffn_2: RowParallel,
    pub eps: f32,
}

impl WanAttentionBlock {
    /// This rank's part over the tp group `tp` (reads only its bytes).
    pub fn load(vb: &VarBuilder, c: &WanConfig, tp: &SharedComm) -> Result<Self> {
        let (d, h, eps) = (c.dim, c.num_heads, c.eps);
        let (r, n) = (tp.rank(), tp.world());
        Ok(Self {
            modulation: vb.get_as("modulation", &[1, 6, d], DType::F32)?,
            self_attn: TpAttention::load(&vb.pp("self_attn"), d, h, eps, tp.clone())?,
            cross_attn: TpAttention::load(&vb.pp("cross_attn"), d, h, eps, tp.clone())?,
            norm3_weight: vb.pp("norm3").get("weight", &[d])?,
            norm3_bias: vb.pp("norm3").get("bias", &[d])?,
            ffn_0: ColumnParallel::load(&vb.pp("ffn").pp("0"), c.ffn_dim, d, r, n)?,
            ffn_2: RowParallel::load(&vb.pp("ffn").pp("2"), d, c.ffn_dim, tp.clone())?,
            eps,
        })
    }

    /// FP8 for the six linears (§8.1).
    pub fn quantize_fp8(&mut self) -> Result<()> {
        self.self_attn.quantize_fp8()?;
        self.cross_attn.quantize_fp8()?;
        self.ffn_0.quantize_fp8()?;
        self.ffn_2.quantize_fp8()
    }

    /// Text K/V of this block's cross-attention for this rank's heads (constant for a
    /// generation).
    pub fn text_kv(&self, text: &Tensor) -> Result<(Tensor, Tensor)> {
        self.cross_attn.key_value(text)
    }

    /// x `[1, t, dim]` (this rank's tokens) in the activation dtype; e0 `[G, 6, dim]` f32 per
    /// latent frame; `runs` maps tokens to frames; `text_kv` from
    /// [`WanAttentionBlock::text_kv`].
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        e0: &Tensor,
        runs: &FrameRuns,
        kv: &mut dyn SelfAttnKv,
        text_kv: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let act = x.dtype();
        // Chunks 0..5: shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn.
        let m = self.modulation.add(e0)?;
        let c = |m: &Tensor, j: usize| m.narrow(1, j, 1);
        let gated = |x: &Tensor, y: &Tensor, j: usize, out: DType| {
            runs.map(&[x, y], &[&m], |x, m| {
                x[0].gated_residual(&x[1], &c(&m[0], j)?, out)
            })
        };

        // norm1 + modulate in one pass (same rounding points as layer_norm then modulate).
        let eps = self.eps;
        let norm_mod = |x: &Tensor, ln_in: DType, norm: DType, j: usize| {
            runs.map(&[x], &[&m], |x, m| {
                let (sc, sh) = (c(&m[0], j + 1)?, c(&m[0], j)?);
                let o = ResNormMod {
                    add: None,
                    gate: None,
                    keep_residual: None,
                    ln_in,
                    weight: None,
                    bias: None,
                    eps,
                    norm,
                    modulate: Some((&sc, &sh)),
                    out: act,
                };
                Ok(x[0].res_norm_mod(&o)?.1)
            })
        };
        let a = norm_mod(x, act, act, 0)?;
        let y = self
            .self_attn
            .out(&kv.attend_proj(layer, &self.self_attn, &a)?)?;
        let x1 = gated(x, &y, 2, DType::F32)?;

        // norm3 of bf16(x1), cast and norm in one pass.
        let norm3 = ResNormMod {
            add: None,
            gate: None,
            keep_residual: None,
            ln_in: act,
            weight: Some(&self.norm3_weight),
            bias: Some(&self.norm3_bias),
            eps,
            norm: act,
            modulate: None,
            out: act,
        };
        let u = x1.res_norm_mod(&norm3)?.1;
        let q = self.cross_attn.query(&u)?;
        let o = self.cross_attn.out(&sdpa(&q, &text_kv.0, &text_kv.1)?)?;
        let x2 = x1.binary_to(&o, crate::device::BinaryOp::Add, DType::F32)?;

        let b = norm_mod(&x2, DType::F32, DType::F32, 3)?;
        let w0 = &self.ffn_0.weight;
        let h = if w0.dtype() == DType::F8E4M3 {
            self.ffn_0.forward(&b)?.gelu_tanh()?
        } else {
            // GELU as the GEMM epilogue: on the f32 accumulator (no bf16 rounding before it).
            b.to_dtype(w0.dtype())?.linear_ex(
                w0,
                self.ffn_0.bias.as_ref(),
                crate::device::Epilogue::GeluTanh,
                w0.dtype(),
            )?
        };
        let y2 = self.ffn_2.forward(&h)?;
        // x3 in f32 rounded once to the activation dtype (= f32 result, then cast).
        gated(&x2, &y2, 5, act)
    }
}
