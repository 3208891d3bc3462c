//! Streaming KV state (model-spec §4.3, §4.4): one [`StepCache`] per denoising step, each
//! with a ring of `ring_frames·fsl` roped noisy keys/values per layer and the un-roped sink
//! keys/values of exactly Lc rows (sized from the geometry, no fixed 3000-row buffer).
//!
//! Layout, so that a call attends to contiguous buffers without concatenating the cache: per
//! layer the values are one buffer `[Lc + ring]` (sink rows first, then the ring; attention
//! reads its prefix `[0, Lc + window)`), and the keys of a call are the sink re-rotated with
//! this call's table followed by the ring window, written into one scratch buffer. Keys are
//! unmasked, so the order of keys (with their values) does not change the result.

use super::attention::sdpa;
use super::block::SelfAttnKv;
use super::config::{StreamGeometry, WanConfig};
use super::rope::RopeTable;
use crate::memory::{Category, scope};
use crate::parallel::TpAttention;
use crate::{DType, Device, Error, Result, Tensor};

/// The KV cache of one denoising step.
#[derive(Debug)]
pub struct StepCache {
    geom: StreamGeometry,
    /// Roped noisy keys per layer, `[ring_len, heads, head_dim]`.
    k: Vec<Tensor>,
    /// Values per layer: `[ring_len, heads, head_dim]` until the first prefill, then
    /// `[Lc + ring_len, heads, head_dim]` with the sink values in rows `[0, Lc)`.
    v: Vec<Tensor>,
    /// Un-roped (post-RMSNorm) sink keys per layer, `[Lc, heads, head_dim]`.
    cond_k: Vec<Option<Tensor>>,
}

impl StepCache {
    /// Allocate the rings (charged to the KV-cache category); the sink is filled by a prefill.
    pub fn new(
        cfg: &WanConfig,
        geom: StreamGeometry,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let _g = scope(Category::KvCache);
        let shape = (geom.ring_len(), cfg.num_heads, cfg.head_dim());
        let ring = || -> Result<Vec<Tensor>> {
            (0..cfg.num_layers)
                .map(|_| Tensor::zeros(shape, dtype, device))
                .collect()
        };
        Ok(Self {
            geom,
            k: ring()?,
            v: ring()?,
            cond_k: vec![None; cfg.num_layers],
        })
    }

    pub fn geometry(&self) -> &StreamGeometry {
        &self.geom
    }

    /// Whether every layer has its sink.
    pub fn is_prefilled(&self) -> bool {
        self.cond_k.iter().all(Option::is_some)
    }

    /// Sink keys (un-roped) and a copy of the sink values of `layer`, if prefilled.
    pub fn sink(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let k = self.cond_k.get(layer)?.as_ref()?;
        let lc = k.dims()[0];
        Some((k.clone(), self.v.get(layer)?.narrow(0, 0, lc).ok()?))
    }

    /// The sink rows of `layer` (0 before the prefill).
    fn sink_len(&self, layer: usize) -> usize {
        self.cond_k[layer].as_ref().map_or(0, |k| k.dims()[0])
    }

    /// Store the prefill's un-roped keys and values `[Lc, H, D]` of `layer` as its sink: the
    /// first prefill puts Lc sink rows in front of the (still empty) value ring, a later one
    /// (clip 1) overwrites the sink rows in place.
    fn set_sink(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let _g = scope(Category::KvCache);
        let lc = k.dims()[0];
        let ring = self.geom.ring_len();
        let old = self.sink_len(layer);
        if old == 0 {
            // Before the first prefill no call has written the ring (forward_stream refuses),
            // so it is still all zeros: free it first, then allocate [Lc + ring] zeros, and
            // the cache never holds more than ring + sink.
            let (_, h, d) = v.dims3()?;
            let (dt, dev) = (v.dtype(), v.device());
            self.v[layer] = Tensor::zeros((0, h, d), dt, &dev)?;
            self.v[layer] = Tensor::zeros((lc + ring, h, d), dt, &dev)?;
        } else if old != lc {
            return Err(Error::invalid(
                "StepCache",
                format!("sink of {lc} rows after one of {old}"),
            ));
        }
        self.v[layer].copy_rows_from(0, v, 0, lc)?;
        self.cond_k[layer] = Some(k.try_clone()?);
        Ok(())
    }

    /// Ring write offset and active window (tokens) of a call starting at token
    /// `current_start` (§4.4): clip 0 grows the window, later the whole ring is active.
    pub fn window(&self, current_start: usize) -> Result<(usize, usize)> {
        let (ring, lq) = (self.geom.ring_len(), self.geom.lq());
        if !current_start.is_multiple_of(lq) {
            return Err(Error::invalid(
                "StepCache",
                format!("current_start {current_start} is not a multiple of Lq {lq}"),
            ));
        }
        let write = current_start % ring;
        let window = if current_start < ring {
            current_start + lq
        } else {
            ring
        };
        Ok((write, window))
    }

    /// Keys attended per layer by a call at `current_start`: window + sink.
    pub fn key_len(&self, current_start: usize) -> Result<usize> {
        Ok(self.window(current_start)?.1 + self.sink_len(0))
    }
}

fn rows(t: &Tensor) -> Result<Tensor> {
    let (_, l, h, d) = t.dims4()?;
    t.reshape((l, h, d))
}

/// The prefill's self-attention: sink tokens attend to each other with the prefill's RoPE
/// table; the un-roped keys and the values are stored as the sink (§4.2 step 5).
#[derive(Debug)]
pub struct PrefillKv<'a> {
    pub cache: &'a mut StepCache,
    pub rope: &'a RopeTable,
}

impl SelfAttnKv for PrefillKv<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.cache.set_sink(layer, &rows(k)?, &rows(v)?)?;
        let act = q.dtype();
        let r = self.rope;
        let q = q.rope_interleaved(&r.cos, &r.sin, act)?;
        let k = k.rope_interleaved(&r.cos, &r.sin, act)?;
        sdpa(&q, &k, v)
    }
}

/// A streaming call's self-attention (§3.3.3): rotate q and k at the noisy positions, write
/// k/v into the ring, attend to the active window followed by the sink keys rotated with
/// this call's sink table.
#[derive(Debug)]
pub struct StreamKv<'a> {
    pub cache: &'a mut StepCache,
    pub noisy: &'a RopeTable,
    pub cond: &'a RopeTable,
    pub write: usize,
    pub window: usize,
}

impl SelfAttnKv for StreamKv<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let act = q.dtype();
        let q = q.rope_interleaved(&self.noisy.cos, &self.noisy.sin, act)?;
        let k = k.rope_interleaved(&self.noisy.cos, &self.noisy.sin, act)?;
        self.attend_roped(layer, &q, &k, v)
    }

    /// With unsharded q/k norms: RMSNorm and the noisy-position rotation in one pass each.
    fn attend_proj(&mut self, layer: usize, attn: &TpAttention, a: &Tensor) -> Result<Tensor> {
        let (nq, nk) = (&attn.norm_q, &attn.norm_k);
        if nq.weight.elem_count() != nq.full_dim || nk.weight.elem_count() != nk.full_dim {
            let q = attn.query(a)?;
            let (k, v) = attn.key_value(a)?;
            return self.attend(layer, &q, &k, &v);
        }
        let (cos, sin) = (&self.noisy.cos, &self.noisy.sin);
        let h = attn.local_heads;
        let ql = attn.q.forward(a)?;
        let act = ql.dtype().promote(nq.weight.dtype());
        let q = attn.heads(&ql.rms_norm_rope(&nq.weight, nq.eps, cos, sin, h, act)?)?;
        let kl = attn.k.forward(a)?;
        let k = attn.heads(&kl.rms_norm_rope(&nk.weight, nk.eps, cos, sin, h, act)?)?;
        let v = attn.heads(&attn.v.forward(a)?)?;
        self.attend_roped(layer, &q, &k, &v)
    }
}

impl StreamKv<'_> {
    /// q, k already rotated at the noisy positions.
    fn attend_roped(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let act = q.dtype();
        let c = &mut *self.cache;
        let lc = c.sink_len(layer);
        let Some(ck) = &c.cond_k[layer] else {
            return Err(Error::invalid(
                "StreamKv",
                "streaming call before the prefill",
            ));
        };
        c.k[layer].slice_set(&rows(k)?, 0, self.write)?;
        c.v[layer].slice_set(&rows(v)?, 0, lc + self.write)?;
        // Keys: [sink rotated with this call's table | ring window], one scratch buffer;
        // values: the prefix [sink | ring window] of the layer's value buffer.
        let ck = ck
            .unsqueeze(0)?
            .rope_interleaved(&self.cond.cos, &self.cond.sin, act)?;
        let (_, _, h, d) = ck.dims4()?;
        let keys = Tensor::uninit((lc + self.window, h, d), act, &q.device())?;
        keys.copy_rows_from(0, &rows(&ck)?, 0, lc)?;
        keys.copy_rows_from(lc, &c.k[layer], 0, self.window)?;
        q.attention_prefix(&keys, &c.v[layer], lc + self.window)
    }
}
