//! Layer-pipeline stage boundaries: the plan gives each pp sub-stage a contiguous block range
//! (planner `layer_range`); between two ranges the activations, and the small side tensors
//! the next range needs (e.g. the time embedding e0, RoPE tables), go point to point.
//!
//! A message is a header (one f32 tensor: count, then per tensor its dtype code, rank and
//! dims) followed by the tensors themselves, so the receiver needs to know nothing in
//! advance. Dims are carried exactly up to 2²⁴.

use super::SharedComm;
use crate::{DType, Error, Result, Shape, Tensor};

const MAX_DIM: usize = 1 << 24;

/// One rank's links to the previous and next layer range, over its pp group (ranks ordered
/// by pp sub-stage, as [`super::Groups`] builds it).
#[derive(Debug, Clone)]
pub struct StageBoundary {
    comm: SharedComm,
}

impl StageBoundary {
    pub fn new(comm: SharedComm) -> Self {
        Self { comm }
    }

    /// This rank's pp sub-stage and the number of sub-stages.
    pub fn stage(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.world())
    }

    /// Whether this sub-stage receives the DiT's input from the embeddings (no predecessor).
    pub fn is_first(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Whether this sub-stage runs the head (no successor).
    pub fn is_last(&self) -> bool {
        self.comm.rank() + 1 == self.comm.world()
    }

    /// The last sub-stage's `x` on every sub-stage (collective over the pp group): the others
    /// pass `None` and the `shape` and `dtype` they expect.
    pub fn broadcast_from_last(
        &self,
        x: Option<&Tensor>,
        shape: &Shape,
        dtype: DType,
        device: &crate::Device,
    ) -> Result<Tensor> {
        let last = self.comm.world() - 1;
        let mine = match (self.is_last(), x) {
            (true, Some(t)) => t.clone(),
            (false, None) => Tensor::zeros(shape.clone(), dtype, device)?,
            _ => {
                return Err(Error::invalid(
                    "StageBoundary::broadcast_from_last",
                    "only the last sub-stage passes the tensor",
                ));
            }
        };
        self.comm.broadcast(&mine, last)
    }

    /// Sends `tensors` (activations first, then side tensors) to the next sub-stage.
    pub fn send(&self, tensors: &[&Tensor]) -> Result<()> {
        if self.is_last() {
            return Err(Error::invalid(
                "StageBoundary::send",
                "the last pp sub-stage has no successor",
            ));
        }
        let to = self.comm.rank() + 1;
        let header = encode_header(tensors)?;
        let dev = tensors[0].device();
        let n = header.len();
        self.comm
            .send(&Tensor::from_vec(vec![n as f32], 1, &dev)?, to)?;
        self.comm.send(&Tensor::from_vec(header, n, &dev)?, to)?;
        for t in tensors {
            self.comm.send(t, to)?;
        }
        Ok(())
    }

    /// Receives what the previous sub-stage sent, in its order.
    pub fn recv(&self) -> Result<Vec<Tensor>> {
        if self.is_first() {
            return Err(Error::invalid(
                "StageBoundary::recv",
                "the first pp sub-stage has no predecessor",
            ));
        }
        let from = self.comm.rank() - 1;
        let len = self.comm.recv(&Shape::from(1), DType::F32, from)?;
        let n = len_of(&len)?;
        let header = self
            .comm
            .recv(&Shape::from(n), DType::F32, from)?
            .to_vec_f32()?;
        decode_header(&header)?
            .into_iter()
            .map(|(shape, dtype)| self.comm.recv(&shape, dtype, from))
            .collect()
    }
}

fn len_of(t: &Tensor) -> Result<usize> {
    let v = t.to_vec_f32()?;
    match v.as_slice() {
        [n] if *n >= 1.0 && n.fract() == 0.0 => Ok(*n as usize),
        _ => Err(Error::invalid(
            "StageBoundary",
            format!("bad header length {v:?}"),
        )),
    }
}

fn dtype_code(d: DType) -> f32 {
    match d {
        DType::BF16 => 0.0,
        DType::F16 => 1.0,
        DType::F32 => 2.0,
        DType::F8E4M3 => 3.0,
    }
}

fn dtype_of(code: f32) -> Option<DType> {
    Some(match code as u32 {
        0 => DType::BF16,
        1 => DType::F16,
        2 => DType::F32,
        3 => DType::F8E4M3,
        _ => return None,
    })
}

fn encode_header(tensors: &[&Tensor]) -> Result<Vec<f32>> {
    if tensors.is_empty() {
        return Err(Error::invalid("StageBoundary::send", "nothing to send"));
    }
    let mut h = vec![tensors.len() as f32];
    for t in tensors {
        if let Some(d) = t.dims().iter().find(|&&d| d >= MAX_DIM) {
            return Err(Error::invalid(
                "StageBoundary::send",
                format!("dim {d} of {:?} does not fit the header", t.shape()),
            ));
        }
        h.push(dtype_code(t.dtype()));
        h.push(t.rank() as f32);
        h.extend(t.dims().iter().map(|&d| d as f32));
    }
    Ok(h)
}

fn decode_header(h: &[f32]) -> Result<Vec<(Shape, DType)>> {
    let bad = || Error::invalid("StageBoundary::recv", format!("malformed header {h:?}"));
    let mut it = h.iter().copied();
    let n = it.next().ok_or_else(bad)? as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let dtype = dtype_of(it.next().ok_or_else(bad)?).ok_or_else(bad)?;
        let rank = it.next().ok_or_else(bad)? as usize;
        let dims: Vec<usize> = (0..rank)
            .map(|_| it.next().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        out.push((Shape::from(dims), dtype));
    }
    if it.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}
