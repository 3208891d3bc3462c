//! 3-D RoPE of the Wan DiT (model-spec §3.4): 64 complex pairs split 22/21/21 over
//! (time, height, width), interleaved pair layout, angles in f64, rotation factors rounded to
//! fp16 (the reference stores them as complex-half), negative positions as conjugates.

use half::f16;

use super::config::{FRAMEPACK_TIMES_4X, StreamGeometry};
use crate::{Device, Error, Result, Tensor};

/// One token's (time, row, column) position.
pub type Pos = [i64; 3];

/// Integer truncation of linspace(0, end, n), exactly in integers.
pub fn trunc_linspace(end: usize, n: usize) -> Vec<i64> {
    if n == 1 {
        return vec![0];
    }
    (0..n).map(|k| ((k * end) / (n - 1)) as i64).collect()
}

fn grid(out: &mut Vec<Pos>, times: &[i64], rows: &[i64], cols: &[i64]) {
    for &t in times {
        for &r in rows {
            for &c in cols {
                out.push([t, r, c]);
            }
        }
    }
}

/// Noisy tokens of a block: frames cur..cur+frames, full grid, (frame, row, column) order.
pub fn noisy_positions(cur: i64, g: &StreamGeometry) -> Vec<Pos> {
    let rows: Vec<i64> = (0..g.hp() as i64).collect();
    let cols: Vec<i64> = (0..g.wp() as i64).collect();
    let times: Vec<i64> = (cur..cur + g.frames_per_block as i64).collect();
    let mut out = Vec::with_capacity(g.lq());
    grid(&mut out, &times, &rows, &cols);
    out
}

/// Sink tokens in sequence order: reference (at `ref_time`), frame-pack post (−1),
/// 2x (−3, truncated-linspace grid of h/4 × w/4), 4x (−19, −14, −9, −4; h/8 × w/8).
pub fn cond_positions(ref_time: i64, g: &StreamGeometry) -> Vec<Pos> {
    let (hp, wp) = (g.hp(), g.wp());
    let rows: Vec<i64> = (0..hp as i64).collect();
    let cols: Vec<i64> = (0..wp as i64).collect();
    let mut out = Vec::with_capacity(g.lc());
    grid(&mut out, &[ref_time], &rows, &cols);
    grid(&mut out, &[-1], &rows, &cols);
    grid(
        &mut out,
        &[-3],
        &trunc_linspace(hp - 1, g.lat_h / 4),
        &trunc_linspace(wp - 1, g.lat_w / 4),
    );
    grid(
        &mut out,
        &FRAMEPACK_TIMES_4X,
        &trunc_linspace(hp - 1, g.lat_h / 8),
        &trunc_linspace(wp - 1, g.lat_w / 8),
    );
    out
}

/// Per-token rotation factors for `positions`: cos and sin tables `[L, head_dim/2]` whose
/// values are fp16-rounded (stored as f32), ready for [`Tensor::rope_interleaved`].
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTable {
    pub fn new(
        positions: &[Pos],
        head_dim: usize,
        theta: f64,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = rope_factors(positions, head_dim, theta, max_positions)?;
        let shape = (positions.len(), head_dim / 2);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
        })
    }
}

/// The host computation behind [`RopeTable`]: pair k of an axis with n pairs has angle
/// |p|·(1/θ^(2k/2n)) in f64; cos and sin rounded to fp16; sin negated for negative p.
pub fn rope_factors(
    positions: &[Pos],
    head_dim: usize,
    theta: f64,
    max_positions: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let c = head_dim / 2;
    let sizes = [c - 2 * (c / 3), c / 3, c / 3];
    let inv: Vec<Vec<f64>> = sizes
        .iter()
        .map(|&n| {
            (0..n)
                .map(|k| 1.0 / theta.powf((2 * k) as f64 / (2 * n) as f64))
                .collect()
        })
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * c);
    let mut sin = Vec::with_capacity(positions.len() * c);
    for p in positions {
        for (axis, inv_axis) in inv.iter().enumerate() {
            let a = p[axis].unsigned_abs() as usize;
            if a >= max_positions {
                return Err(Error::invalid(
                    "rope",
                    format!("RoPE position {a} outside the {max_positions}-entry table (§4.7)"),
                ));
            }
            let sign = if p[axis] < 0 { -1.0 } else { 1.0 };
            for &f in inv_axis {
                let ang = a as f64 * f;
                cos.push(f16::from_f64(ang.cos()).to_f32());
                sin.push(f16::from_f64(ang.sin() * sign).to_f32());
            }
        }
    }
    Ok((cos, sin))
}

/// §4.5: the reference frame's temporal index for a call at latent frame `cur` with the
/// drawn `relative_dist`: 30 + max(0, cur − (30 − relative_dist)) = max(30, cur + relative_dist).
pub fn ref_time_for_call(cur: i64, relative_dist: u32) -> i64 {
    super::config::REF_TIME + (cur - (super::config::REF_TIME - relative_dist as i64)).max(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_spec() {
        assert_eq!(trunc_linspace(3, 2), vec![0, 3]);
        assert_eq!(
            trunc_linspace(43, 11),
            vec![0, 4, 8, 12, 17, 21, 25, 30, 34, 38, 43]
        );
        assert_eq!(trunc_linspace(23, 1), vec![0]);
        let g = StreamGeometry::new(48, 88, 3, 12).unwrap();
        let c = cond_positions(30, &g);
        assert_eq!(c.len(), g.lc());
        assert_eq!(c[0], [30, 0, 0]);
        assert_eq!(c[g.fsl()], [-1, 0, 0]);
        assert_eq!(*c.last().unwrap(), [-4, 23, 43]);
        let n = noisy_positions(15, &g);
        assert_eq!((n[0], *n.last().unwrap()), ([15, 0, 0], [17, 23, 43]));
        // §4.5: max(30, cur + relative_dist).
        assert_eq!(ref_time_for_call(0, 4), 30);
        assert_eq!(ref_time_for_call(27, 4), 31);
        assert_eq!(ref_time_for_call(100, 30), 130);
    }

    #[test]
    fn factors_are_fp16_rounded_and_conjugate_for_negative_positions() {
        let (c1, s1) = rope_factors(&[[5, 2, 7]], 128, 10000.0, 45_000).unwrap();
        let (c2, s2) = rope_factors(&[[-5, 2, 7]], 128, 10000.0, 45_000).unwrap();
        assert_eq!(c1, c2);
        assert_eq!(s1[..22].iter().map(|v| -v).collect::<Vec<_>>(), s2[..22]);
        assert_eq!(s1[22..], s2[22..]);
        for v in c1.iter().chain(&s1) {
            assert_eq!(f16::from_f32(*v).to_f32(), *v);
        }
        assert!((c1[1] as f64 - (5.0 * 10000f64.powf(-2.0 / 44.0)).cos()).abs() < 5e-4);
        assert!(rope_factors(&[[45_000, 0, 0]], 128, 10000.0, 45_000).is_err());
    }
}
