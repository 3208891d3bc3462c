//! [`Comm`] for [`SocketComm`]: CPU tensors in, CPU tensors out, over the host
//! collectives of [`super::socket`].

use std::time::Duration;

use half::{bf16, f16};

use super::{Comm, CommErrorKind, ReduceOp, Reducible, SocketComm, comm_error};
use crate::{DType, Device, Result, Shape, Tensor, WithDType};

fn cpu_only(c: &SocketComm, op: &'static str, x: &Tensor) -> Result<()> {
    if x.device() != Device::Cpu {
        return Err(comm_error(
            c,
            op,
            CommErrorKind::Unsupported(format!(
                "SocketComm moves CPU tensors, got one on {:?}",
                x.device()
            )),
        ));
    }
    Ok(())
}

/// The raw bytes of a CPU tensor, borrowed for the duration of `f`.
fn with_bytes<R>(x: &Tensor, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
    x.with_cpu_storage(|s| f(s.as_bytes()))?
}

fn all_reduce_t<T: Reducible + WithDType>(
    c: &SocketComm,
    x: &Tensor,
    op: ReduceOp,
) -> Result<Tensor> {
    let mut v: Vec<T> = x.to_vec()?;
    c.all_reduce_slice(&mut v, op)?;
    Tensor::from_vec(v, x.shape().clone(), &Device::Cpu)
}

fn reduce_scatter_t<T: Reducible + WithDType>(
    c: &SocketComm,
    x: &Tensor,
    op: ReduceOp,
) -> Result<Tensor> {
    let v: Vec<T> = x.to_vec()?;
    let shard = c.reduce_scatter_slice(&v, op)?;
    Tensor::from_vec(shard, &x.dims()[1..], &Device::Cpu)
}

fn no_fp8(c: &SocketComm, op: &'static str) -> crate::Error {
    comm_error(
        c,
        op,
        CommErrorKind::Unsupported("reductions of fp8 tensors".into()),
    )
}

impl Comm for SocketComm {
    fn rank(&self) -> usize {
        SocketComm::rank(self)
    }
    fn world(&self) -> usize {
        SocketComm::world(self)
    }
    fn timeout(&self) -> Duration {
        SocketComm::timeout(self)
    }
    fn set_timeout(&self, timeout: Duration) {
        SocketComm::set_timeout(self, timeout)
    }
    fn abort(&self) {
        SocketComm::abort(self)
    }
    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Comm>> {
        Ok(Box::new(SocketComm::split(self, color, key)?))
    }

    fn all_reduce_raw(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        cpu_only(self, "all_reduce", x)?;
        match x.dtype() {
            DType::F32 => all_reduce_t::<f32>(self, x, op),
            DType::BF16 => all_reduce_t::<bf16>(self, x, op),
            DType::F16 => all_reduce_t::<f16>(self, x, op),
            DType::F8E4M3 => Err(no_fp8(self, "all_reduce")),
        }
    }

    fn all_gather_raw(&self, x: &Tensor) -> Result<Tensor> {
        cpu_only(self, "all_gather", x)?;
        let bytes = with_bytes(x, |b| self.all_gather_bytes(b))?;
        let mut shape = vec![SocketComm::world(self)];
        shape.extend_from_slice(x.dims());
        Tensor::from_bytes(&bytes, shape, x.dtype(), &Device::Cpu)
    }

    fn reduce_scatter_raw(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        cpu_only(self, "reduce_scatter", x)?;
        match x.dtype() {
            DType::F32 => reduce_scatter_t::<f32>(self, x, op),
            DType::BF16 => reduce_scatter_t::<bf16>(self, x, op),
            DType::F16 => reduce_scatter_t::<f16>(self, x, op),
            DType::F8E4M3 => Err(no_fp8(self, "reduce_scatter")),
        }
    }

    fn all_to_all_raw(&self, x: &Tensor) -> Result<Tensor> {
        cpu_only(self, "all_to_all", x)?;
        let bytes = with_bytes(x, |b| self.all_to_all_bytes(b))?;
        Tensor::from_bytes(&bytes, x.shape().clone(), x.dtype(), &Device::Cpu)
    }

    fn broadcast_raw(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        cpu_only(self, "broadcast", x)?;
        let mut bytes = x.to_bytes()?;
        self.broadcast_bytes(&mut bytes, root)?;
        Tensor::from_bytes(&bytes, x.shape().clone(), x.dtype(), &Device::Cpu)
    }

    fn send_raw(&self, x: &Tensor, peer: usize) -> Result<()> {
        cpu_only(self, "send", x)?;
        with_bytes(x, |b| self.send_bytes(b, peer))
    }

    fn recv_raw(&self, shape: &Shape, dtype: DType, peer: usize) -> Result<Tensor> {
        let mut bytes = vec![0u8; shape.elem_count() * dtype.size_in_bytes()];
        self.recv_bytes(&mut bytes, peer)?;
        Tensor::from_bytes(&bytes, shape.clone(), dtype, &Device::Cpu)
    }

    fn barrier_raw(&self) -> Result<()> {
        SocketComm::barrier(self)
    }
}
