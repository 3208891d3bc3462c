//! Who talks to whom in one generation, read from the Init's layout (every rank's role, as
//! `proto::plan::rank_roles` built it from the planner's mesh: stage → pp → sp → tp, then a
//! dedicated VAE rank).
//!
//! ```text
//! decoder:  ref, motion ─▶ every DiT rank
//! stage s:  every rank of the stage holds the whole latents after its steps (tp / Ulysses /
//!           pp inside the stage are the model's business); rank i of stage s sends them to
//!           rank i of stage s+1
//! final:    one rank of the last stage (last pp sub-stage, sp 0, tp 0) hands each block to the
//!           decoder: a dedicated VAE rank, or its own co-located VAE
//! clip 1:   the final rank sends clip 0's first latent to every DiT rank of the other stages
//!           (the last stage's ranks have it already) (§6.3)
//! ```

use std::ops::Range;

use proto::worker::v1::{self as pb, rank_role::Role};
use runtime::parallel::{Coord, Mesh};

/// This rank's DiT part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePart {
    /// TPP stage, 0-based.
    pub stage: usize,
    /// Denoising steps of the stage.
    pub steps: Range<usize>,
    /// The rank whose latents this rank continues (none on the first stage).
    pub prev: Option<usize>,
    /// The rank this rank's latents go to (none on the last stage).
    pub next: Option<usize>,
}

/// The ranks of one generation, seen from one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    /// `None` on the dedicated VAE rank.
    pub stage: Option<StagePart>,
    /// Number of TPP stages.
    pub stages: usize,
    /// The DiT ranks: TPP stages × pp × Ulysses × tp.
    pub mesh: Mesh,
    /// FSDP over each Ulysses group.
    pub fsdp: bool,
    /// DiT ranks outside the last stage (they receive the clip-1 sink).
    pub sink_receivers: Vec<usize>,
    /// The rank producing each block's final latents for the decoder.
    pub final_rank: usize,
    /// The rank that encodes the reference, decodes the blocks and streams the frames: the
    /// dedicated VAE rank, or the final rank when the VAE is co-located.
    pub decoder_rank: usize,
    /// Every DiT rank (they receive the reference and motion latents).
    pub dit_ranks: Vec<usize>,
    /// Denoising steps of the schedule.
    pub sample_steps: usize,
}

fn dit_role(e: &pb::RankEntry) -> Option<&pb::DitRole> {
    match e.role.as_ref().and_then(|r| r.role.as_ref()) {
        Some(Role::Dit(d)) => Some(d),
        _ => None,
    }
}

impl Topology {
    /// The topology of `rank` in `layout`.
    pub fn new(layout: &[pb::RankEntry], rank: usize) -> Result<Self, String> {
        let first = layout
            .iter()
            .find_map(dit_role)
            .ok_or("the layout has no DiT rank")?;
        let u = |v: u32| v as usize;
        let mesh = Mesh::new(
            u(first.tpp_size),
            u(first.pp_size),
            u(first.sp_size),
            u(first.tp_size),
        )
        .map_err(|e| e.to_string())?;
        let fsdp = first.fsdp_size > 1;
        let mut stage_steps: Vec<Option<Range<usize>>> = vec![None; mesh.stages];
        let mut decoders = Vec::new();
        for (i, e) in layout.iter().enumerate() {
            match e.role.as_ref().and_then(|r| r.role.as_ref()) {
                Some(Role::Dit(d)) => {
                    let sizes = (d.tpp_size, d.pp_size, d.sp_size, d.tp_size, d.fsdp_size > 1);
                    let want = (
                        first.tpp_size,
                        first.pp_size,
                        first.sp_size,
                        first.tp_size,
                        fsdp,
                    );
                    if sizes != want {
                        return Err(format!("rank {i}: degrees {sizes:?} differ from {want:?}"));
                    }
                    let c = Coord {
                        stage: u(d.tpp_stage),
                        pp: u(d.pp_stage),
                        sp: u(d.sp_rank),
                        tp: u(d.tp_rank),
                    };
                    if c.stage >= mesh.stages
                        || c.pp >= mesh.pp
                        || c.sp >= mesh.sp
                        || c.tp >= mesh.tp
                        || mesh.rank(c) != i
                    {
                        return Err(format!("rank {i}: {c:?} is not its place in {mesh:?}"));
                    }
                    let steps = contiguous(&d.steps)
                        .ok_or_else(|| format!("rank {i}: steps {:?} are not a range", d.steps))?;
                    match &stage_steps[c.stage] {
                        Some(s) if *s != steps => {
                            return Err(format!("rank {i}: steps {steps:?}, its stage runs {s:?}"));
                        }
                        _ => stage_steps[c.stage] = Some(steps),
                    }
                    if d.hosts_vae {
                        decoders.push(i);
                    }
                }
                Some(Role::Vae(_)) => {
                    if i != mesh.world() {
                        return Err(format!("the VAE rank is {i}, not {}", mesh.world()));
                    }
                    decoders.push(i);
                }
                None => return Err(format!("rank {i} has no role")),
            }
        }
        let dit_world = mesh.world();
        if layout.len() < dit_world {
            return Err(format!(
                "{} ranks for a DiT mesh of {dit_world}",
                layout.len()
            ));
        }
        let mut next_step = 0;
        for (s, steps) in stage_steps.iter().enumerate() {
            match steps {
                Some(st) if st.start == next_step => next_step = st.end,
                _ => {
                    return Err(format!(
                        "stage {s} ({steps:?}) does not continue at step {next_step}"
                    ));
                }
            }
        }
        let [decoder_rank] = decoders[..] else {
            return Err(format!(
                "the layout has {} decoding ranks (VAE rank or DiT rank hosting the VAE), not one",
                decoders.len()
            ));
        };
        let final_rank = mesh.rank(Coord {
            stage: mesh.stages - 1,
            pp: mesh.pp - 1,
            sp: 0,
            tp: 0,
        });
        if decoder_rank < dit_world && decoder_rank != final_rank {
            return Err(format!(
                "rank {decoder_rank} hosts the VAE but the final latents come from rank {final_rank}"
            ));
        }
        if rank >= layout.len() {
            return Err(format!(
                "rank {rank} outside a {}-rank layout",
                layout.len()
            ));
        }
        let per_stage = dit_world / mesh.stages;
        let stage = (rank < dit_world).then(|| {
            let (s, idx) = (rank / per_stage, rank % per_stage);
            StagePart {
                stage: s,
                steps: stage_steps[s].clone().unwrap_or_default(),
                prev: s.checked_sub(1).map(|p| p * per_stage + idx),
                next: (s + 1 < mesh.stages).then(|| (s + 1) * per_stage + idx),
            }
        });
        Ok(Topology {
            rank,
            stage,
            stages: mesh.stages,
            mesh,
            fsdp,
            sink_receivers: (0..dit_world - per_stage).collect(),
            final_rank,
            decoder_rank,
            dit_ranks: (0..dit_world).collect(),
            sample_steps: next_step,
        })
    }

    /// Whether this rank decodes and streams frames.
    pub fn decodes(&self) -> bool {
        self.rank == self.decoder_rank
    }

    /// Whether a stage is split over several ranks (tp, Ulysses or pp).
    pub fn split_stages(&self) -> bool {
        self.mesh.world() != self.mesh.stages
    }
}

fn contiguous(steps: &[u32]) -> Option<Range<usize>> {
    let first = *steps.first()? as usize;
    steps
        .iter()
        .enumerate()
        .all(|(i, &s)| s as usize == first + i)
        .then(|| first..first + steps.len())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use planner::layout::{Layout, LayoutKind, T5Placement, VaePlacement, mesh};

    /// The layout entries `lava generate` sends for `stages` TPP stages of one rank each.
    pub(crate) fn layout(stages: u64, vae: VaePlacement) -> Vec<pb::RankEntry> {
        layout_of(stages, (1, 1, 1, false), vae)
    }

    /// The layout entries for `stages` TPP stages of (tp, ulysses, pp, fsdp) ranks each.
    pub(crate) fn layout_of(
        stages: u64,
        (tp, ulysses, pp, fsdp): (u64, u64, u64, bool),
        vae: VaePlacement,
    ) -> Vec<pb::RankEntry> {
        let l = Layout {
            kind: LayoutKind::Lava,
            stages,
            tp,
            ulysses,
            pp,
            fsdp,
            vae,
            t5: T5Placement::One,
            fp8: false,
            offload: false,
        };
        proto::plan::rank_roles(&l, &mesh(&l, 40, 4))
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, role)| pb::RankEntry {
                rank: i as u32,
                role: Some(role),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn four_stages_and_a_vae_rank() {
        let l = layout(4, VaePlacement::Dedicated);
        let t = Topology::new(&l, 2).unwrap();
        assert_eq!(
            t.stage,
            Some(StagePart {
                stage: 2,
                steps: 2..3,
                prev: Some(1),
                next: Some(3)
            })
        );
        assert_eq!((t.final_rank, t.decoder_rank, t.stages), (3, 4, 4));
        assert_eq!(t.dit_ranks, [0, 1, 2, 3]);
        let v = Topology::new(&l, 4).unwrap();
        assert!(v.stage.is_none() && v.decodes());
        let first = Topology::new(&l, 0).unwrap().stage.unwrap();
        assert_eq!((first.prev, first.next, first.steps), (None, Some(1), 0..1));
    }

    #[test]
    fn two_stages_with_the_vae_on_the_last() {
        let l = layout(2, VaePlacement::Colocated);
        let t = Topology::new(&l, 1).unwrap();
        assert!(t.decodes());
        assert_eq!(t.stage.as_ref().unwrap().steps, 2..4);
        assert_eq!((t.final_rank, t.decoder_rank, t.sample_steps), (1, 1, 4));
        assert!(!Topology::new(&l, 0).unwrap().decodes());
    }

    #[test]
    fn two_stages_of_tp_2_pass_latents_rank_to_rank() {
        let l = layout_of(2, (2, 1, 1, false), VaePlacement::Dedicated);
        let t = Topology::new(&l, 1).unwrap();
        assert_eq!(
            t.stage,
            Some(StagePart {
                stage: 0,
                steps: 0..2,
                prev: None,
                next: Some(3)
            })
        );
        assert_eq!((t.final_rank, t.decoder_rank), (2, 4));
        assert_eq!(t.sink_receivers, [0, 1]);
        assert!(t.split_stages());
        let last = Topology::new(&l, 3).unwrap().stage.unwrap();
        assert_eq!((last.prev, last.next), (Some(1), None));
        // pp 2: the final latents come from the last sub-stage.
        let l = layout_of(1, (1, 1, 2, false), VaePlacement::Colocated);
        let t = Topology::new(&l, 0).unwrap();
        assert_eq!(
            (t.final_rank, t.decoder_rank, t.sink_receivers.len()),
            (1, 1, 0)
        );
        let l = layout_of(1, (1, 2, 1, true), VaePlacement::Dedicated);
        assert!(Topology::new(&l, 2).unwrap().fsdp);
    }

    #[test]
    fn broken_layouts_are_refused() {
        let mut l = layout(2, VaePlacement::Dedicated);
        if let Some(Role::Dit(d)) = l[0].role.as_mut().and_then(|r| r.role.as_mut()) {
            d.tp_size = 2;
        }
        assert!(Topology::new(&l, 0).unwrap_err().contains("differ"));
        let mut l = layout(2, VaePlacement::Dedicated);
        l.pop();
        assert!(
            Topology::new(&l, 0)
                .unwrap_err()
                .contains("0 decoding ranks")
        );
        let mut l = layout(2, VaePlacement::Colocated);
        if let Some(Role::Dit(d)) = l[1].role.as_mut().and_then(|r| r.role.as_mut()) {
            d.steps = vec![3];
        }
        assert!(Topology::new(&l, 0).is_err());
    }
}
