//! The plan against the GPUs the ranks actually opened: `--gpus` is what the user said, the
//! workers' registrations say what is there. Checked after registration and before Init, so a
//! wrong `--gpus` or a GPU that other processes already fill stops the job before any weight
//! is loaded, with the numbers.

use proto::worker::v1 as pb;
use proto::{Error, ErrorKind};

/// What the plan assumed of one rank's GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// Catalog name from `--gpus`.
    pub gpu: String,
    /// The GPU's memory as the catalog gives it.
    pub capacity_bytes: u64,
    /// The rank's predicted peak: its own bytes, without the CUDA context (already created
    /// when free memory is read), library workspaces and allocator reserve.
    pub peak_bytes: u64,
}

impl Need {
    /// The needs of every rank of `plan`, in rank order.
    pub fn of(plan: &planner::Plan) -> Vec<Need> {
        plan.ranks
            .iter()
            .map(|r| Need {
                gpu: r.gpu.clone(),
                capacity_bytes: r.capacity_bytes,
                peak_bytes: r.peak_bytes,
            })
            .collect()
    }
}

/// Catalog sizes are nominal; a real GPU reports a little more or less than its label.
const CAPACITY_SLACK: f64 = 0.97;

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
}

/// Refuses when a CUDA rank's GPU is smaller than the plan assumed, or has less free memory
/// than the rank's predicted peak. CPU ranks (no memory reported) pass.
pub fn check(regs: &[pb::RegisterRequest], needs: &[Need]) -> Result<(), Error> {
    for r in regs {
        let Some(dev) = r.device.as_ref().filter(|d| d.total_memory_bytes > 0) else {
            continue;
        };
        let Some(need) = needs.get(r.rank as usize) else {
            continue;
        };
        let on = format!("{} (cuda:{} on {})", dev.name, dev.ordinal, r.hostname);
        if (dev.total_memory_bytes as f64) < CAPACITY_SLACK * need.capacity_bytes as f64 {
            return Err(Error::rank(
                r.rank,
                ErrorKind::Infeasible,
                format!(
                    "its GPU {on} has {}, the plan assumed {} with {}; pass --gpus for the GPUs this node has",
                    gib(dev.total_memory_bytes),
                    need.gpu,
                    gib(need.capacity_bytes)
                ),
            ));
        }
        if dev.free_memory_bytes < need.peak_bytes {
            return Err(Error::rank(
                r.rank,
                ErrorKind::Infeasible,
                format!(
                    "{} free on {on} (other processes hold {}), the plan needs {} at peak",
                    gib(dev.free_memory_bytes),
                    gib(dev.total_memory_bytes.saturating_sub(dev.free_memory_bytes)),
                    gib(need.peak_bytes)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reg(rank: u32, total: u64, free: u64) -> pb::RegisterRequest {
        pb::RegisterRequest {
            rank,
            hostname: "node1".into(),
            device: Some(pb::DeviceInfo {
                kind: if total > 0 { "cuda" } else { "cpu" }.into(),
                ordinal: rank,
                name: "NVIDIA H100 80GB HBM3".into(),
                total_memory_bytes: total,
                free_memory_bytes: free,
            }),
            ..Default::default()
        }
    }

    const GIB: u64 = 1 << 30;

    fn need(capacity: u64, peak: u64) -> Need {
        Need {
            gpu: "H200".into(),
            capacity_bytes: capacity * GIB,
            peak_bytes: peak * GIB,
        }
    }

    #[test]
    fn matching_gpus_with_room_pass() {
        let needs = [need(80, 60), need(80, 60)];
        let regs = [reg(0, 80 * GIB, 79 * GIB), reg(1, 79 * GIB, 70 * GIB)];
        check(&regs, &needs).unwrap();
        // CPU ranks report no memory and are not checked.
        check(&[reg(0, 0, 0)], &[need(141, 200)]).unwrap();
    }

    #[test]
    fn a_smaller_gpu_than_planned_is_infeasible_naming_the_rank() {
        let needs = [need(80, 30), need(141, 60)];
        let regs = [reg(0, 80 * GIB, 79 * GIB), reg(1, 80 * GIB, 79 * GIB)];
        let err = check(&regs, &needs).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Infeasible);
        assert_eq!(err.rank_id(), Some(1));
        let msg = err.to_string();
        assert!(msg.contains("H200") && msg.contains("141.0 GiB"), "{msg}");
    }

    #[test]
    fn a_gpu_that_others_fill_is_infeasible_with_the_numbers() {
        let needs = [need(80, 60)];
        let err = check(&[reg(0, 80 * GIB, 20 * GIB)], &needs).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind(), ErrorKind::Infeasible);
        assert!(
            msg.contains("20.0 GiB free") && msg.contains("60.0 GiB at peak"),
            "{msg}"
        );
    }
}
