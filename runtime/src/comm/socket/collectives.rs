//! [`SocketComm`] collectives on host buffers.

use std::time::Instant;

use super::SocketComm;
use crate::Result;
use crate::comm::host::{Reducible, chunk_range, reduce_in_rank_order};
use crate::comm::wire::WireOp;
use crate::comm::{CommErrorKind, ReduceOp};

impl SocketComm {
    /// Element-wise reduction over all ranks, in place. Every element is reduced once
    /// by the rank owning its chunk, in rank order with f32 accumulation, so all
    /// ranks end with identical bits.
    pub fn all_reduce_slice<T: Reducible>(&self, data: &mut [T], op: ReduceOp) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let (_g, deadline) = self.begin("all_reduce")?;
        let (n, w, me) = (data.len(), self.world, self.rank);
        let mine = chunk_range(n, w, me);
        // Phase 1: chunk j goes to rank j; our chunk arrives from everyone.
        let mut parts: Vec<Vec<T>> = (0..w)
            .map(|i| {
                if i == me {
                    Vec::new()
                } else {
                    vec![T::zeroed(); mine.len()]
                }
            })
            .collect();
        {
            let sends: Vec<(usize, &[u8])> = self
                .send_order()
                .map(|j| (j, bytemuck::cast_slice(&data[chunk_range(n, w, j)])))
                .collect();
            let mut slots: Vec<Option<&mut [u8]>> = parts
                .iter_mut()
                .map(|p| Some(bytemuck::cast_slice_mut(p.as_mut_slice())))
                .collect();
            let recvs = self
                .recv_order()
                .filter_map(|i| slots[i].take().map(|b| (i, b)))
                .collect();
            self.exchange(WireOp::AllReduce, &sends, recvs, deadline)?;
        }
        let mut reduced = vec![T::zeroed(); mine.len()];
        {
            let views: Vec<&[T]> = (0..w)
                .map(|i| {
                    if i == me {
                        &data[mine.clone()]
                    } else {
                        &parts[i][..]
                    }
                })
                .collect();
            reduce_in_rank_order(op, &views, &mut reduced);
        }
        // Phase 2: everyone gathers the reduced chunks.
        data[mine].copy_from_slice(&reduced);
        let sends: Vec<(usize, &[u8])> = self
            .send_order()
            .map(|j| (j, bytemuck::cast_slice(&reduced[..])))
            .collect();
        let sizes: Vec<usize> = (0..w).map(|i| chunk_range(n, w, i).len()).collect();
        let mut slots: Vec<Option<&mut [T]>> =
            split_sizes(data, &sizes).into_iter().map(Some).collect();
        slots[me] = None;
        let recvs = self
            .recv_order()
            .filter_map(|i| slots[i].take().map(|b| (i, bytemuck::cast_slice_mut(b))))
            .collect();
        self.exchange(WireOp::AllReduce, &sends, recvs, deadline)
    }

    /// Reduces `input` (world × m elements) over all ranks and returns this rank's
    /// m-element chunk, with the same determinism as [`Self::all_reduce_slice`].
    pub fn reduce_scatter_slice<T: Reducible>(&self, input: &[T], op: ReduceOp) -> Result<Vec<T>> {
        let w = self.world;
        if !input.len().is_multiple_of(w) {
            return Err(self.err(
                "reduce_scatter",
                CommErrorKind::InvalidArgument(format!(
                    "{} elements do not split into {w} chunks",
                    input.len()
                )),
            ));
        }
        let m = input.len() / w;
        let me = self.rank;
        if w == 1 {
            return Ok(input.to_vec());
        }
        let (_g, deadline) = self.begin("reduce_scatter")?;
        let mut parts: Vec<Vec<T>> = (0..w)
            .map(|i| {
                if i == me {
                    Vec::new()
                } else {
                    vec![T::zeroed(); m]
                }
            })
            .collect();
        {
            let sends: Vec<(usize, &[u8])> = self
                .send_order()
                .map(|j| (j, bytemuck::cast_slice(&input[j * m..(j + 1) * m])))
                .collect();
            let mut slots: Vec<Option<&mut [u8]>> = parts
                .iter_mut()
                .map(|p| Some(bytemuck::cast_slice_mut(p.as_mut_slice())))
                .collect();
            let recvs = self
                .recv_order()
                .filter_map(|i| slots[i].take().map(|b| (i, b)))
                .collect();
            self.exchange(WireOp::ReduceScatter, &sends, recvs, deadline)?;
        }
        let views: Vec<&[T]> = (0..w)
            .map(|i| {
                if i == me {
                    &input[me * m..(me + 1) * m]
                } else {
                    &parts[i][..]
                }
            })
            .collect();
        let mut out = vec![T::zeroed(); m];
        reduce_in_rank_order(op, &views, &mut out);
        Ok(out)
    }

    /// Concatenates every rank's `input` (all of equal length) in rank order.
    pub fn all_gather_bytes(&self, input: &[u8]) -> Result<Vec<u8>> {
        let n = input.len();
        let mut out = vec![0u8; n * self.world];
        out[self.rank * n..(self.rank + 1) * n].copy_from_slice(input);
        if self.world == 1 {
            return Ok(out);
        }
        let (_g, deadline) = self.begin("all_gather")?;
        let sends: Vec<(usize, &[u8])> = self.send_order().map(|j| (j, input)).collect();
        self.gather_into(WireOp::AllGather, &sends, &mut out, n, deadline)?;
        Ok(out)
    }

    /// `input` is world equal chunks; chunk j goes to rank j, and the result holds
    /// the chunks received from ranks 0, 1, … in order.
    pub fn all_to_all_bytes(&self, input: &[u8]) -> Result<Vec<u8>> {
        let w = self.world;
        if !input.len().is_multiple_of(w) {
            return Err(self.err(
                "all_to_all",
                CommErrorKind::InvalidArgument(format!(
                    "{} bytes do not split into {w} chunks",
                    input.len()
                )),
            ));
        }
        let c = input.len() / w;
        let me = self.rank;
        let mut out = vec![0u8; input.len()];
        out[me * c..(me + 1) * c].copy_from_slice(&input[me * c..(me + 1) * c]);
        if w == 1 {
            return Ok(out);
        }
        let (_g, deadline) = self.begin("all_to_all")?;
        let sends: Vec<(usize, &[u8])> = self
            .send_order()
            .map(|j| (j, &input[j * c..(j + 1) * c]))
            .collect();
        self.gather_into(WireOp::AllToAll, &sends, &mut out, c, deadline)?;
        Ok(out)
    }

    /// Receives chunk i (of `chunk` bytes) of `out` from every rank i ≠ self.
    pub(super) fn gather_into(
        &self,
        op: WireOp,
        sends: &[(usize, &[u8])],
        out: &mut [u8],
        chunk: usize,
        deadline: Instant,
    ) -> Result<()> {
        let sizes = vec![chunk; self.world];
        let mut slots: Vec<Option<&mut [u8]>> =
            split_sizes(out, &sizes).into_iter().map(Some).collect();
        slots[self.rank] = None;
        let recvs = self
            .recv_order()
            .filter_map(|i| slots[i].take().map(|b| (i, b)))
            .collect();
        self.exchange(op, sends, recvs, deadline)
    }

    /// Copies `root`'s `buf` into `buf` on every rank (all ranks pass equal lengths).
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(self.err(
                "broadcast",
                CommErrorKind::InvalidArgument(format!(
                    "root {root} outside a {}-rank group",
                    self.world
                )),
            ));
        }
        if self.world == 1 {
            return Ok(());
        }
        let (_g, deadline) = self.begin("broadcast")?;
        if self.rank == root {
            let sends: Vec<(usize, &[u8])> = self.send_order().map(|j| (j, &*buf)).collect();
            self.exchange(WireOp::Broadcast, &sends, Vec::new(), deadline)
        } else {
            self.exchange(WireOp::Broadcast, &[], vec![(root, buf)], deadline)
        }
    }

    /// Sends `data` to `peer`; returns once the bytes are handed to the kernel.
    pub fn send_bytes(&self, data: &[u8], peer: usize) -> Result<()> {
        self.check_peer("send", peer)?;
        let (_g, deadline) = self.begin("send")?;
        self.write_frame(WireOp::SendRecv, peer, data, deadline)
            .map_err(|k| {
                self.fail();
                self.err("send", k)
            })
    }

    /// Receives exactly `buf.len()` bytes sent by `peer` with [`Self::send_bytes`].
    pub fn recv_bytes(&self, buf: &mut [u8], peer: usize) -> Result<()> {
        self.check_peer("recv", peer)?;
        let (_g, deadline) = self.begin("recv")?;
        self.read_frame(WireOp::SendRecv, peer, buf, deadline)
            .map_err(|k| {
                self.fail();
                self.err("recv", k)
            })
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let (_g, deadline) = self.begin("barrier")?;
        let sends: Vec<(usize, &[u8])> = self.send_order().map(|j| (j, &[][..])).collect();
        let mut empty: Vec<[u8; 0]> = vec![[]; self.world];
        let recvs = self
            .recv_order()
            .zip(empty.iter_mut())
            .map(|(i, e)| (i, &mut e[..]))
            .collect();
        self.exchange(WireOp::Barrier, &sends, recvs, deadline)
    }
}

/// Splits `buf` into consecutive pieces of the given lengths.
fn split_sizes<'a, T>(mut buf: &'a mut [T], sizes: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(sizes.len());
    for &s in sizes {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(s);
        out.push(head);
        buf = tail;
    }
    out
}
