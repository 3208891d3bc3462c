//! [`Comm`] for [`NcclComm`]: CUDA tensors of the communicator's device in, CUDA
//! tensors out. Outputs are queued on the device's one stream, like every other op,
//! so they are ordered without events; [`Comm::synchronize`] waits with the timeout.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::CudaStream;

use super::NcclComm;
use crate::comm::{Comm, CommErrorKind, NcclId, ReduceOp};
use crate::device::{CudaStorage, Storage};
use crate::tensor::Tensor;
use crate::{DType, Device, Result, Shape};

impl NcclComm {
    /// [`NcclComm::init`] on the stream that the CUDA backend uses for `ordinal`, so that
    /// collectives and compute are ordered on one stream.
    pub fn init_on_device(
        id: &NcclId,
        rank: usize,
        world: usize,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let stream: Arc<CudaStream> = crate::device::cuda::stream(ordinal)?;
        Self::init(id, rank, world, stream, timeout)
    }

    fn device(&self) -> Device {
        Device::Cuda(self.stream.context().ordinal())
    }

    fn on_device(&self, op: &'static str, x: &Tensor) -> Result<()> {
        if x.device() != self.device() {
            return Err(self.err(
                op,
                CommErrorKind::Unsupported(format!(
                    "this NCCL communicator moves tensors on {:?}, got one on {:?}",
                    self.device(),
                    x.device()
                )),
            ));
        }
        Ok(())
    }

    /// Runs `f` on the CUDA storages of `x` and a new `shape` output.
    fn with_out(
        &self,
        op: &'static str,
        x: &Tensor,
        shape: Shape,
        f: impl FnOnce(&CudaStorage, &mut CudaStorage) -> Result<()>,
    ) -> Result<Tensor> {
        self.on_device(op, x)?;
        let out = Tensor::uninit(shape, x.dtype(), &self.device())?;
        {
            let xs = x.storage()?;
            let mut os = out.storage_mut()?;
            match (&*xs, &mut *os) {
                (Storage::Cuda(a), Storage::Cuda(b)) => f(a, b)?,
                _ => {
                    return Err(self.err(op, CommErrorKind::Unsupported("non-CUDA storage".into())));
                }
            }
        }
        Ok(out)
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        NcclComm::rank(self)
    }
    fn world(&self) -> usize {
        NcclComm::world(self)
    }
    fn timeout(&self) -> Duration {
        NcclComm::timeout(self)
    }
    fn set_timeout(&self, timeout: Duration) {
        NcclComm::set_timeout(self, timeout)
    }
    fn abort(&self) {
        NcclComm::abort(self)
    }
    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Comm>> {
        Ok(Box::new(NcclComm::split(self, color, key)?))
    }
    fn synchronize(&self) -> Result<()> {
        NcclComm::synchronize(self)
    }

    fn all_reduce_raw(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let n = x.elem_count();
        self.with_out("all_reduce", x, x.shape().clone(), |a, b| {
            self.all_reduce_bytes(a.raw_buf(), b.raw_buf_mut(), n, x.dtype(), op)
        })
    }

    fn all_gather_raw(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        let mut shape = vec![self.world];
        shape.extend_from_slice(x.dims());
        self.with_out("all_gather", x, shape.into(), |a, b| {
            self.all_gather_bytes(a.raw_buf(), b.raw_buf_mut(), n, x.dtype())
        })
    }

    fn reduce_scatter_raw(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let shard = Shape::from(&x.dims()[1..]);
        let m = shard.elem_count();
        self.with_out("reduce_scatter", x, shard, |a, b| {
            self.reduce_scatter_bytes(a.raw_buf(), b.raw_buf_mut(), m, x.dtype(), op)
        })
    }

    fn all_to_all_raw(&self, x: &Tensor) -> Result<Tensor> {
        let chunk = x.elem_count() / self.world;
        self.with_out("all_to_all", x, x.shape().clone(), |a, b| {
            self.all_to_all_bytes(a.raw_buf(), b.raw_buf_mut(), chunk, x.dtype())
        })
    }

    fn broadcast_raw(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let n = x.elem_count();
        self.with_out("broadcast", x, x.shape().clone(), |a, b| {
            self.broadcast_bytes(a.raw_buf(), b.raw_buf_mut(), n, x.dtype(), root)
        })
    }

    fn send_raw(&self, x: &Tensor, peer: usize) -> Result<()> {
        self.on_device("send", x)?;
        let xs = x.storage()?;
        match &*xs {
            Storage::Cuda(a) => self.send_bytes(a.raw_buf(), x.elem_count(), x.dtype(), peer),
            Storage::Cpu(_) => {
                Err(self.err("send", CommErrorKind::Unsupported("CPU storage".into())))
            }
        }
    }

    fn recv_raw(&self, shape: &Shape, dtype: DType, peer: usize) -> Result<Tensor> {
        let out = Tensor::uninit(shape.clone(), dtype, &self.device())?;
        {
            let mut os = out.storage_mut()?;
            match &mut *os {
                Storage::Cuda(b) => {
                    self.recv_bytes(b.raw_buf_mut(), shape.elem_count(), dtype, peer)?
                }
                Storage::Cpu(_) => {
                    return Err(self.err("recv", CommErrorKind::Unsupported("CPU storage".into())));
                }
            }
        }
        Ok(out)
    }

    fn barrier_raw(&self) -> Result<()> {
        NcclComm::barrier(self)
    }
}
