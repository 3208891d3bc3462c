//! [`NcclComm`] collectives on device buffers: raw bytes (`CudaSlice<u8>` or views of
//! one, as the CUDA tensor storage keeps them) plus the dtype. Lengths are checked
//! before anything is queued.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use cudarc::nccl::sys;

use super::{NcclComm, nccl_dtype, nccl_op};
use crate::comm::{CommErrorKind, ReduceOp};
use crate::{DType, Result};

impl NcclComm {
    fn need(&self, op: &'static str, what: &str, have: usize, want: usize) -> Result<()> {
        if have < want {
            return Err(self.err(
                op,
                CommErrorKind::InvalidArgument(format!(
                    "{what} buffer has {have} bytes, needs {want}"
                )),
            ));
        }
        Ok(())
    }

    /// `count` elements of `dtype` reduced over all ranks: `recv = op(send of every rank)`.
    pub fn all_reduce_bytes(
        &self,
        send: &impl DevicePtr<u8>,
        recv: &mut impl DevicePtrMut<u8>,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let bytes = count * dtype.size_in_bytes();
        self.need("all_reduce", "send", send.len(), bytes)?;
        self.need("all_reduce", "recv", recv.len(), bytes)?;
        let (s, _rs) = send.device_ptr(&self.stream);
        let (r, _rr) = recv.device_ptr_mut(&self.stream);
        self.run("all_reduce", |comm, st| {
            // SAFETY: both pointers address at least `bytes` bytes on this stream's
            // device (checked above) and stay alive until the guards drop, after the
            // enqueue; the stream orders later uses after the collective.
            unsafe {
                sys::ncclAllReduce(
                    s as _,
                    r as _,
                    count,
                    nccl_dtype(dtype),
                    nccl_op(op),
                    comm,
                    st,
                )
            }
        })
    }

    /// Every rank's `count` elements, concatenated in rank order into `recv`.
    pub fn all_gather_bytes(
        &self,
        send: &impl DevicePtr<u8>,
        recv: &mut impl DevicePtrMut<u8>,
        count: usize,
        dtype: DType,
    ) -> Result<()> {
        let bytes = count * dtype.size_in_bytes();
        self.need("all_gather", "send", send.len(), bytes)?;
        self.need("all_gather", "recv", recv.len(), bytes * self.world)?;
        let (s, _rs) = send.device_ptr(&self.stream);
        let (r, _rr) = recv.device_ptr_mut(&self.stream);
        self.run("all_gather", |comm, st| {
            // SAFETY: sizes checked above (recv holds world × count elements); pointers
            // live on this device until after the enqueue.
            unsafe { sys::ncclAllGather(s as _, r as _, count, nccl_dtype(dtype), comm, st) }
        })
    }

    /// `send` holds world × `count` elements; `recv` gets this rank's reduced chunk.
    pub fn reduce_scatter_bytes(
        &self,
        send: &impl DevicePtr<u8>,
        recv: &mut impl DevicePtrMut<u8>,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let bytes = count * dtype.size_in_bytes();
        self.need("reduce_scatter", "send", send.len(), bytes * self.world)?;
        self.need("reduce_scatter", "recv", recv.len(), bytes)?;
        let (s, _rs) = send.device_ptr(&self.stream);
        let (r, _rr) = recv.device_ptr_mut(&self.stream);
        self.run("reduce_scatter", |comm, st| {
            // SAFETY: sizes checked above; pointers live until after the enqueue.
            unsafe {
                sys::ncclReduceScatter(
                    s as _,
                    r as _,
                    count,
                    nccl_dtype(dtype),
                    nccl_op(op),
                    comm,
                    st,
                )
            }
        })
    }

    /// `send` holds world chunks of `count` elements; chunk j goes to rank j, and
    /// chunk i of `recv` comes from rank i. A group of send/recv pairs.
    pub fn all_to_all_bytes(
        &self,
        send: &impl DevicePtr<u8>,
        recv: &mut impl DevicePtrMut<u8>,
        count: usize,
        dtype: DType,
    ) -> Result<()> {
        let chunk = count * dtype.size_in_bytes();
        self.need("all_to_all", "send", send.len(), chunk * self.world)?;
        self.need("all_to_all", "recv", recv.len(), chunk * self.world)?;
        let (s, _rs) = send.device_ptr(&self.stream);
        let (r, _rr) = recv.device_ptr_mut(&self.stream);
        let world = self.world;
        self.run("all_to_all", |comm, st| {
            grouped(|| {
                for peer in 0..world {
                    let off = (peer * chunk) as CUdeviceptr;
                    // SAFETY: chunk `peer` lies inside both buffers (sizes checked above);
                    // the calls are inside ncclGroupStart/End, so they progress together.
                    let a = unsafe {
                        sys::ncclSend(
                            (s + off) as _,
                            count,
                            nccl_dtype(dtype),
                            peer as i32,
                            comm,
                            st,
                        )
                    };
                    if a != sys::ncclResult_t::ncclSuccess {
                        return a;
                    }
                    // SAFETY: as above, for the receive side.
                    let b = unsafe {
                        sys::ncclRecv(
                            (r + off) as _,
                            count,
                            nccl_dtype(dtype),
                            peer as i32,
                            comm,
                            st,
                        )
                    };
                    if b != sys::ncclResult_t::ncclSuccess {
                        return b;
                    }
                }
                sys::ncclResult_t::ncclSuccess
            })
        })
    }

    /// Root's `count` elements of `send` into `recv` on every rank (`send` is read on
    /// the root only).
    pub fn broadcast_bytes(
        &self,
        send: &impl DevicePtr<u8>,
        recv: &mut impl DevicePtrMut<u8>,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        let bytes = count * dtype.size_in_bytes();
        self.need("broadcast", "send", send.len(), bytes)?;
        self.need("broadcast", "recv", recv.len(), bytes)?;
        if root >= self.world {
            return Err(self.err(
                "broadcast",
                CommErrorKind::InvalidArgument(format!("root {root} ≥ world")),
            ));
        }
        let (s, _rs) = send.device_ptr(&self.stream);
        let (r, _rr) = recv.device_ptr_mut(&self.stream);
        self.run("broadcast", |comm, st| {
            // SAFETY: sizes checked above; pointers live until after the enqueue.
            unsafe {
                sys::ncclBroadcast(
                    s as _,
                    r as _,
                    count,
                    nccl_dtype(dtype),
                    root as i32,
                    comm,
                    st,
                )
            }
        })
    }

    pub fn send_bytes(
        &self,
        send: &impl DevicePtr<u8>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<()> {
        self.need("send", "send", send.len(), count * dtype.size_in_bytes())?;
        self.check_peer("send", peer)?;
        let (s, _rs) = send.device_ptr(&self.stream);
        self.run("send", |comm, st| {
            // SAFETY: size checked above; the pointer lives until after the enqueue.
            unsafe { sys::ncclSend(s as _, count, nccl_dtype(dtype), peer as i32, comm, st) }
        })
    }

    pub fn recv_bytes(
        &self,
        recv: &mut impl DevicePtrMut<u8>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<()> {
        self.need("recv", "recv", recv.len(), count * dtype.size_in_bytes())?;
        self.check_peer("recv", peer)?;
        let (r, _rr) = recv.device_ptr_mut(&self.stream);
        self.run("recv", |comm, st| {
            // SAFETY: size checked above; the pointer lives until after the enqueue.
            unsafe { sys::ncclRecv(r as _, count, nccl_dtype(dtype), peer as i32, comm, st) }
        })
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(self.err(
                op,
                CommErrorKind::InvalidArgument(format!("peer {peer} is not another rank")),
            ));
        }
        Ok(())
    }

    /// NCCL has no barrier: a one-element all-reduce, then [`Self::synchronize`].
    pub fn barrier(&self) -> Result<()> {
        let mut flag = self
            .stream
            .alloc_zeros::<u8>(4)
            .map_err(|e| self.err("barrier", CommErrorKind::Backend(e.to_string())))?;
        let (p, _g) = flag.device_ptr_mut(&self.stream);
        self.run("barrier", |comm, st| {
            // SAFETY: in-place all-reduce of one f32 in a live 4-byte buffer.
            unsafe {
                sys::ncclAllReduce(
                    p as _,
                    p as _,
                    1,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    st,
                )
            }
        })?;
        self.synchronize()
    }
}

/// `ncclGroupStart`, the calls, `ncclGroupEnd` (which may say "in progress").
fn grouped(calls: impl FnOnce() -> sys::ncclResult_t) -> sys::ncclResult_t {
    // SAFETY: group start/end only update NCCL's thread-local group state.
    let r = unsafe { sys::ncclGroupStart() };
    if r != sys::ncclResult_t::ncclSuccess {
        return r;
    }
    let inner = calls();
    // SAFETY: matches the ncclGroupStart above; must run even after a failed call.
    let end = unsafe { sys::ncclGroupEnd() };
    if inner != sys::ncclResult_t::ncclSuccess {
        inner
    } else {
        end
    }
}
