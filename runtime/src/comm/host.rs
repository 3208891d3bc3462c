//! Host-side pieces of the CPU communicator: element types with a fixed reduction
//! rule and the chunk partition.
//!
//! Reductions are deterministic: every element is reduced exactly once, by the rank
//! that owns its chunk, in rank order 0, 1, …, world-1, with f32 accumulation for
//! floating types and a single rounding at the end. All ranks then receive the same
//! bits, and the result does not depend on message arrival order.

use half::{bf16, f16};

use super::ReduceOp;

/// An element type the communicators can reduce.
pub trait Reducible: bytemuck::Pod + Send + Sync {
    /// Accumulator type: f32 for the float types, the type itself for integers.
    type Acc: Copy;
    const NAME: &'static str;
    fn load(self) -> Self::Acc;
    fn store(acc: Self::Acc) -> Self;
    fn combine(op: ReduceOp, a: Self::Acc, b: Self::Acc) -> Self::Acc;
}

fn combine_f32(op: ReduceOp, a: f32, b: f32) -> f32 {
    match op {
        ReduceOp::Sum => a + b,
        // NaN propagates (as torch.max does) instead of being skipped by f32::max.
        ReduceOp::Max => {
            if a.is_nan() || !(b.is_nan() || b > a) {
                a
            } else {
                b
            }
        }
        ReduceOp::Min => {
            if a.is_nan() || !(b.is_nan() || b < a) {
                a
            } else {
                b
            }
        }
    }
}

impl Reducible for f32 {
    type Acc = f32;
    const NAME: &'static str = "f32";
    fn load(self) -> f32 {
        self
    }
    fn store(acc: f32) -> Self {
        acc
    }
    fn combine(op: ReduceOp, a: f32, b: f32) -> f32 {
        combine_f32(op, a, b)
    }
}

impl Reducible for bf16 {
    type Acc = f32;
    const NAME: &'static str = "bf16";
    fn load(self) -> f32 {
        self.to_f32()
    }
    // half's from_f32 rounds to nearest even.
    fn store(acc: f32) -> Self {
        bf16::from_f32(acc)
    }
    fn combine(op: ReduceOp, a: f32, b: f32) -> f32 {
        combine_f32(op, a, b)
    }
}

impl Reducible for f16 {
    type Acc = f32;
    const NAME: &'static str = "f16";
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(acc: f32) -> Self {
        f16::from_f32(acc)
    }
    fn combine(op: ReduceOp, a: f32, b: f32) -> f32 {
        combine_f32(op, a, b)
    }
}

impl Reducible for u8 {
    type Acc = u8;
    const NAME: &'static str = "u8";
    fn load(self) -> u8 {
        self
    }
    fn store(acc: u8) -> Self {
        acc
    }
    // Wrapping, as NCCL's ncclUint8 sum.
    fn combine(op: ReduceOp, a: u8, b: u8) -> u8 {
        match op {
            ReduceOp::Sum => a.wrapping_add(b),
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        }
    }
}

/// Reduces `parts` (one slice per rank, in rank order) element-wise into `out`.
/// All slices must have `out.len()` elements.
pub fn reduce_in_rank_order<T: Reducible>(op: ReduceOp, parts: &[&[T]], out: &mut [T]) {
    for (i, o) in out.iter_mut().enumerate() {
        let mut acc = parts[0][i].load();
        for p in &parts[1..] {
            acc = T::combine(op, acc, p[i].load());
        }
        *o = T::store(acc);
    }
}

/// Element range of chunk `i` when `n` elements are cut into `world` nearly equal
/// chunks (the first `n % world` chunks get one more element).
pub fn chunk_range(n: usize, world: usize, i: usize) -> std::ops::Range<usize> {
    let base = n / world;
    let extra = n % world;
    let start = i * base + i.min(extra);
    let len = base + usize::from(i < extra);
    start..start + len
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ranges_cover_exactly() {
        for n in 0..20 {
            for w in 1..6 {
                let mut next = 0;
                for i in 0..w {
                    let r = chunk_range(n, w, i);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn bf16_sum_accumulates_in_f32_and_rounds_once() {
        // 1 + 2^-8 + 2^-8: bf16 spacing at 1 is 2^-7, so per-step rounding would
        // round each tie back to 1 (even); f32 accumulation keeps 1 + 2^-7.
        let one = [bf16::from_f32(1.0)];
        let eps = [bf16::from_f32(2f32.powi(-8))];
        let mut out = [bf16::ZERO];
        reduce_in_rank_order(ReduceOp::Sum, &[&one, &eps, &eps], &mut out);
        assert_eq!(out[0].to_f32(), 1.0 + 2f32.powi(-7));
    }

    #[test]
    fn max_and_min_propagate_nan() {
        let a = [1.0f32, f32::NAN, 3.0];
        let b = [f32::NAN, 2.0, -1.0];
        let mut out = [0.0f32; 3];
        reduce_in_rank_order(ReduceOp::Max, &[&a, &b], &mut out);
        assert!(out[0].is_nan() && out[1].is_nan());
        assert_eq!(out[2], 3.0);
        reduce_in_rank_order(ReduceOp::Min, &[&a, &b], &mut out);
        assert!(out[0].is_nan() && out[1].is_nan());
        assert_eq!(out[2], -1.0);
    }

    #[test]
    fn u8_sum_wraps() {
        let mut out = [0u8];
        reduce_in_rank_order(ReduceOp::Sum, &[&[200u8][..], &[100u8][..]], &mut out);
        assert_eq!(out[0], 44);
    }
}
