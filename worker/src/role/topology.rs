//! Who talks to whom in one generation, read from the Init's layout (every rank's role, as
//! `proto::plan::rank_roles` built it from the planner's mesh).
//!
//! ```text
//! dedicated VAE:  VAE ─ref, motion─▶ every DiT rank
//!                 stage 0 ─x─▶ stage 1 ─x─▶ … ─x─▶ last stage ─final x─▶ VAE ─frames─▶
//! co-located:     the last stage's rank encodes, decodes and streams the frames itself
//! clip 1:         the last stage sends clip 0's first latent to every other DiT rank (§6.3)
//! ```

use std::ops::Range;

use proto::worker::v1::{self as pb, rank_role::Role};

/// This rank's DiT part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePart {
    /// TPP stage, 0-based.
    pub stage: usize,
    /// Denoising steps of the stage.
    pub steps: Range<usize>,
    /// The rank whose latents this stage continues (none on the first stage).
    pub prev: Option<usize>,
    /// The rank this stage's latents go to (none on the last stage).
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
    /// Every DiT rank, in rank order.
    pub dit_ranks: Vec<usize>,
    /// The rank producing each block's final latents (the last stage).
    pub final_rank: usize,
    /// The rank that encodes the reference, decodes the blocks and streams the frames: the
    /// dedicated VAE rank, or the final rank when the VAE is co-located.
    pub decoder_rank: usize,
    /// Denoising steps of the schedule.
    pub sample_steps: usize,
}

impl Topology {
    /// The topology of `rank` in `layout`. Layouts that split a stage over several ranks
    /// (tp, Ulysses, layer pipeline) are refused: this build runs one rank per TPP stage.
    pub fn new(layout: &[pb::RankEntry], rank: usize) -> Result<Self, String> {
        let mut stages: Vec<(usize, Range<usize>, usize)> = Vec::new();
        let mut decoders = Vec::new();
        for (i, e) in layout.iter().enumerate() {
            match e.role.as_ref().and_then(|r| r.role.as_ref()) {
                Some(Role::Dit(d)) => {
                    if d.tp_size * d.sp_size * d.pp_size * d.fsdp_size.max(1) != 1 {
                        return Err(format!(
                            "rank {i}: tp {} × ulysses {} × pp {} × fsdp {} within a stage is not \
                             supported by this build (one rank per TPP stage)",
                            d.tp_size, d.sp_size, d.pp_size, d.fsdp_size
                        ));
                    }
                    let steps = contiguous(&d.steps)
                        .ok_or_else(|| format!("rank {i}: steps {:?} are not a range", d.steps))?;
                    stages.push((d.tpp_stage as usize, steps, i));
                    if d.hosts_vae {
                        decoders.push(i);
                    }
                    if d.tpp_size as usize != layout_stage_count(layout) {
                        return Err(format!(
                            "rank {i} says {} TPP stages, the layout has {}",
                            d.tpp_size,
                            layout_stage_count(layout)
                        ));
                    }
                }
                Some(Role::Vae(_)) => decoders.push(i),
                None => return Err(format!("rank {i} has no role")),
            }
        }
        stages.sort_by_key(|s| s.0);
        if stages.is_empty() {
            return Err("the layout has no DiT rank".into());
        }
        let mut next_step = 0;
        for (k, (stage, steps, r)) in stages.iter().enumerate() {
            if *stage != k || steps.start != next_step {
                return Err(format!(
                    "rank {r}: stage {stage} with steps {steps:?} does not continue stage {} at \
                     step {next_step}",
                    k.saturating_sub(1)
                ));
            }
            next_step = steps.end;
        }
        let [decoder_rank] = decoders[..] else {
            return Err(format!(
                "the layout has {} decoding ranks (VAE rank or DiT rank hosting the VAE), not one",
                decoders.len()
            ));
        };
        let final_rank = stages[stages.len() - 1].2;
        if !matches!(
            layout[decoder_rank]
                .role
                .as_ref()
                .and_then(|r| r.role.as_ref()),
            Some(Role::Vae(_))
        ) && decoder_rank != final_rank
        {
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
        let stage = stages.iter().position(|s| s.2 == rank).map(|k| StagePart {
            stage: k,
            steps: stages[k].1.clone(),
            prev: k.checked_sub(1).map(|p| stages[p].2),
            next: stages.get(k + 1).map(|s| s.2),
        });
        let mut dit_ranks: Vec<usize> = stages.iter().map(|s| s.2).collect();
        dit_ranks.sort_unstable();
        Ok(Topology {
            rank,
            stage,
            stages: stages.len(),
            dit_ranks,
            final_rank,
            decoder_rank,
            sample_steps: next_step,
        })
    }

    /// Whether this rank decodes and streams frames.
    pub fn decodes(&self) -> bool {
        self.rank == self.decoder_rank
    }
}

fn layout_stage_count(layout: &[pb::RankEntry]) -> usize {
    layout
        .iter()
        .filter(|e| {
            matches!(
                e.role.as_ref().and_then(|r| r.role.as_ref()),
                Some(Role::Dit(_))
            )
        })
        .count()
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
        let l = Layout {
            kind: LayoutKind::Lava,
            stages,
            tp: 1,
            ulysses: 1,
            pp: 1,
            fsdp: false,
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
    fn split_stages_and_broken_layouts_are_refused() {
        let mut l = layout(2, VaePlacement::Dedicated);
        if let Some(Role::Dit(d)) = l[0].role.as_mut().and_then(|r| r.role.as_mut()) {
            d.tp_size = 2;
        }
        assert!(Topology::new(&l, 0).unwrap_err().contains("tp 2"));
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
