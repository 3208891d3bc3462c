//! From the planner's plain data to the control plane's messages: each rank's [`pb::RankRole`]
//! in an `InitRequest` is built here from `planner::layout::{Layout, Role}`, so the worker
//! receives exactly the layout the planner checked.

use planner::layout::{Layout, Role, VaePlacement, colocated_vae_rank};
use planner::{ModelSpec, PlanError};

use crate::worker::v1::{self as pb, rank_role};
use crate::{Error, ErrorKind, Result};

/// The model a `--model` flag or a `ModelRef.name` names: a built-in model, or a model spec
/// TOML file read on this node (the launcher plans with it, every worker loads it).
pub fn model_spec(name: &str) -> std::result::Result<ModelSpec, PlanError> {
    if ModelSpec::builtin_names().contains(&name) {
        return ModelSpec::builtin(name);
    }
    let text = std::fs::read_to_string(name).map_err(|e| PlanError::ModelSpec {
        name: name.into(),
        reason: format!(
            "not a built-in model ({}) and not a readable file: {e}",
            ModelSpec::builtin_names().join(", ")
        ),
    })?;
    ModelSpec::from_toml(name, &text)
}

fn small(what: &str, v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Unattributed {
        kind: ErrorKind::BadInput,
        message: format!("{what} {v} does not fit the protocol's 32 bits"),
    })
}

impl From<&Role> for pb::RoleKind {
    fn from(role: &Role) -> Self {
        match role {
            Role::Dit { .. } => pb::RoleKind::Dit,
            Role::Vae => pb::RoleKind::Vae,
        }
    }
}

/// The role message of global rank `rank`, which plays `role` in `layout`.
pub fn rank_role(layout: &Layout, role: &Role, rank: u64) -> Result<pb::RankRole> {
    // The rank that produces each block's final latents: tp 0, sp 0 of the last pp sub-stage
    // of the last TPP stage. It sends them to a dedicated VAE rank, or decodes them itself.
    let final_rank = colocated_vae_rank(layout);
    let role = match *role {
        Role::Dit {
            stage,
            step_begin,
            step_end,
            pp,
            sp,
            tp,
            layer_begin,
            layer_end,
        } => {
            rank_role::Role::Dit(pb::DitRole {
                tp_rank: small("tp rank", tp)?,
                tp_size: small("tp degree", layout.tp)?,
                sp_rank: small("sp rank", sp)?,
                sp_size: small("ulysses degree", layout.ulysses)?,
                pp_stage: small("pp stage", pp)?,
                pp_size: small("pp degree", layout.pp)?,
                block_start: small("first block", layer_begin)?,
                block_end: small("block end", layer_end)?,
                // FSDP shards each unit over the ulysses group (planner::layout::Layout::fsdp).
                fsdp_size: if layout.fsdp {
                    small("ulysses degree", layout.ulysses)?
                } else {
                    1
                },
                tpp_stage: small("TPP stage", stage)?,
                tpp_size: small("TPP stages", layout.stages)?,
                steps: (step_begin..step_end)
                    .map(|s| small("step", s))
                    .collect::<Result<_>>()?,
                hosts_vae: layout.vae == VaePlacement::Colocated && rank == final_rank,
            })
        }
        Role::Vae => rank_role::Role::Vae(pb::VaeRole {
            latents_from_rank: small("rank", final_rank)?,
        }),
    };
    Ok(pb::RankRole { role: Some(role) })
}

/// Role messages for every rank of `roles` (as `planner::layout::mesh` returns them), in rank order.
pub fn rank_roles(layout: &Layout, roles: &[Role]) -> Result<Vec<pb::RankRole>> {
    (0u64..)
        .zip(roles)
        .map(|(rank, role)| rank_role(layout, role, rank))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use planner::layout::{LayoutKind, T5Placement, mesh};

    fn layout(stages: u64, tp: u64, vae: VaePlacement) -> Layout {
        Layout {
            kind: LayoutKind::Lava,
            stages,
            tp,
            ulysses: 1,
            pp: 1,
            fsdp: false,
            vae,
            t5: T5Placement::One,
            fp8: false,
            offload: false,
        }
    }

    fn dit(r: &pb::RankRole) -> &pb::DitRole {
        match &r.role {
            Some(rank_role::Role::Dit(d)) => d,
            other => panic!("not a DiT role: {other:?}"),
        }
    }

    #[test]
    fn tpp_four_stages_with_a_dedicated_vae_rank() {
        let l = layout(4, 1, VaePlacement::Dedicated);
        let roles = rank_roles(&l, &mesh(&l, 40, 4)).unwrap();
        assert_eq!(roles.len(), 5);
        for (i, r) in roles[..4].iter().enumerate() {
            let d = dit(r);
            assert_eq!(
                (d.tpp_stage, d.tpp_size, d.steps.clone()),
                (i as u32, 4, vec![i as u32])
            );
            assert_eq!((d.block_start, d.block_end, d.hosts_vae), (0, 40, false));
        }
        assert_eq!(
            roles[4].role,
            Some(rank_role::Role::Vae(pb::VaeRole {
                latents_from_rank: 3
            }))
        );
        assert_eq!(pb::RoleKind::from(&Role::Vae), pb::RoleKind::Vae);
    }

    #[test]
    fn tpp_times_tp_with_the_vae_colocated_on_the_final_rank() {
        let l = layout(2, 2, VaePlacement::Colocated);
        let roles = rank_roles(&l, &mesh(&l, 40, 4)).unwrap();
        let got: Vec<_> = roles
            .iter()
            .map(dit)
            .map(|d| {
                (
                    d.tpp_stage,
                    d.tp_rank,
                    d.tp_size,
                    d.steps.clone(),
                    d.hosts_vae,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (0, 0, 2, vec![0, 1], false),
                (0, 1, 2, vec![0, 1], false),
                (1, 0, 2, vec![2, 3], true),
                (1, 1, 2, vec![2, 3], false),
            ]
        );
    }
}
