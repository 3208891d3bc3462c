//! FSDP-style parameter sharding (model-spec §7.3): the tensors of one unit (a transformer
//! block, or the root unit of everything else) are laid end to end in one flat buffer,
//! zero-padded to a multiple of the group size, and each rank keeps one equal contiguous
//! chunk, ⌈unit/N⌉ elements. Before the unit runs, [`ShardedUnit::gather`] all-gathers the
//! buffer and cuts it back into named tensors; dropping the [`Gathered`] frees them. The
//! root unit is gathered once per forward and kept for all of it (its audio injectors run
//! between blocks); each block is gathered just before it runs.

use std::collections::BTreeMap;
use std::ops::Range;

use super::SharedComm;
use crate::memory::{Category, scope};
use crate::{DType, Error, Result, Tensor};

/// The flat layout of one unit: tensors in the given order, each at an element offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    entries: Vec<(String, Vec<usize>, usize)>,
    numel: usize,
    world: usize,
}

/// A run of elements of one tensor that falls into one rank's chunk: elements `src` of the
/// (row-major, flattened) tensor `name` go to offset `dst` of the rank's shard. A loader reads
/// exactly these byte ranges from the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub name: String,
    pub src: Range<usize>,
    pub dst: usize,
}

impl FlatLayout {
    /// `tensors`: (name, shape) in flattening order; `world`: ranks sharing the unit.
    pub fn new(tensors: &[(String, Vec<usize>)], world: usize) -> Result<Self> {
        if world == 0 {
            return Err(Error::invalid("FlatLayout", "world size 0"));
        }
        let mut entries = Vec::with_capacity(tensors.len());
        let mut numel = 0usize;
        for (name, shape) in tensors {
            if entries.iter().any(|(n, _, _)| n == name) {
                return Err(Error::invalid("FlatLayout", format!("{name} listed twice")));
            }
            entries.push((name.clone(), shape.clone(), numel));
            numel += shape.iter().product::<usize>();
        }
        Ok(Self {
            entries,
            numel,
            world,
        })
    }

    /// Elements of the unit, padding excluded.
    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Elements each rank keeps: ⌈numel / world⌉.
    pub fn shard_len(&self) -> usize {
        self.numel.div_ceil(self.world)
    }

    /// Names and shapes in flattening order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries
            .iter()
            .map(|(n, s, _)| (n.as_str(), s.as_slice()))
    }

    /// The flat element range `rank` keeps (may extend into the padding).
    pub fn range(&self, rank: usize) -> Range<usize> {
        let n = self.shard_len();
        rank * n..(rank + 1) * n
    }

    /// What a loader reads for `rank`, in shard order; shard elements not covered are
    /// padding (zero).
    pub fn pieces(&self, rank: usize) -> Vec<Piece> {
        let r = self.range(rank);
        self.entries
            .iter()
            .filter_map(|(name, shape, off)| {
                let len = shape.iter().product::<usize>();
                let (lo, hi) = ((*off).max(r.start), (off + len).min(r.end));
                (lo < hi).then(|| Piece {
                    name: name.clone(),
                    src: lo - off..hi - off,
                    dst: lo - r.start,
                })
            })
            .collect()
    }
}

/// This rank's chunk of one unit's flat parameter buffer.
#[derive(Debug, Clone)]
pub struct ShardedUnit {
    layout: FlatLayout,
    shard: Tensor,
    comm: SharedComm,
}

impl ShardedUnit {
    /// `shard`: `[layout.shard_len()]`, filled by a loader from [`FlatLayout::pieces`].
    pub fn new(layout: FlatLayout, shard: Tensor, comm: SharedComm) -> Result<Self> {
        if layout.world() != comm.world() || shard.dims() != [layout.shard_len()] {
            return Err(Error::invalid(
                "ShardedUnit",
                format!(
                    "shard {:?} of a {}-rank layout on a {}-rank group, expected [{}]",
                    shard.shape(),
                    layout.world(),
                    comm.world(),
                    layout.shard_len()
                ),
            ));
        }
        Ok(Self {
            layout,
            shard,
            comm,
        })
    }

    /// Keeps this rank's chunk of full tensors held in memory (weights read once and
    /// scattered; tests). All tensors must share one dtype.
    pub fn from_full(tensors: &[(String, Tensor)], comm: SharedComm) -> Result<Self> {
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid("ShardedUnit", "empty unit"))?;
        let (dtype, dev) = (first.1.dtype(), first.1.device());
        if let Some((n, t)) = tensors.iter().find(|(_, t)| t.dtype() != dtype) {
            return Err(Error::invalid(
                "ShardedUnit",
                format!("{n} is {:?}, the unit is {dtype:?}", t.dtype()),
            ));
        }
        let shapes: Vec<_> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        let layout = FlatLayout::new(&shapes, comm.world())?;
        let by_name: BTreeMap<&str, &Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let _g = scope(Category::Weights);
        let shard = Tensor::zeros(layout.shard_len(), dtype, &dev)?;
        for p in layout.pieces(comm.rank()) {
            let t = by_name[p.name.as_str()];
            let flat = t.reshape(t.elem_count())?;
            shard.slice_set(&flat.narrow(0, p.src.start, p.src.len())?, 0, p.dst)?;
        }
        Self::new(layout, shard, comm)
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// This rank's resident chunk.
    pub fn shard(&self) -> &Tensor {
        &self.shard
    }

    pub fn dtype(&self) -> DType {
        self.shard.dtype()
    }

    /// Collective over the unit's group: all-gathers the flat buffer and cuts it into the
    /// unit's tensors (charged to the weights category while alive).
    pub fn gather(&self) -> Result<Gathered> {
        let _g = scope(Category::Weights);
        let flat = self.comm.all_gather(&self.shard, 0)?;
        let tensors = self
            .layout
            .entries
            .iter()
            .map(|(name, shape, off)| {
                let len = shape.iter().product::<usize>();
                Ok((
                    name.clone(),
                    flat.narrow(0, *off, len)?.reshape(shape.clone())?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Gathered { tensors })
    }
}

/// A unit's full tensors, alive until dropped.
#[derive(Debug)]
pub struct Gathered {
    tensors: BTreeMap<String, Tensor>,
}

impl Gathered {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::invalid("Gathered", format!("no tensor {name} in this unit")))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// All of them by name (e.g. for `VarBuilder::from_parts`).
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }
}
