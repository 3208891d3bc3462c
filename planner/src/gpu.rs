//! The GPU catalog (configs/gpus.toml) and the `--gpus` syntax.
//!
//! `--gpus` is a comma-separated list of `N x TYPE` groups: `5xH800`, `4xH100,1xL40S`, `H200`
//! (one), or a generic size `5x24GB` / `2x80GiB` for cards not in the catalog. Ranks take the
//! GPUs in the order listed.

use serde::{Deserialize, Serialize};

use crate::error::{PlanError, Result};

const CATALOG: &str = include_str!("../../configs/gpus.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    defaults: Defaults,
    gpu: Vec<Entry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    allocator_reserve_fraction: f64,
    generic_context_mb: u64,
    generic_workspace_mb: u64,
    generic_bf16_tflops: f64,
    generic_fp8_tflops: f64,
    generic_mem_bw_gbs: f64,
    generic_link_gbs: f64,
    generic_host_gbs: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    aliases: Vec<String>,
    label: String,
    memory_mib: u64,
    context_mb: u64,
    workspace_mb: u64,
    bf16_tflops: f64,
    fp8_tflops: f64,
    mem_bw_gbs: f64,
    interconnect: String,
    link_gbs: f64,
    host_gbs: f64,
}

/// One GPU as the planner sees it. All memory figures in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    /// Catalog name (`H800`) or the generic size as written (`24GB`).
    pub name: String,
    pub label: String,
    /// Total memory as the driver reports it.
    pub memory_bytes: u64,
    /// CUDA context and lazily loaded modules.
    pub context_bytes: u64,
    /// Library workspaces allocated up front.
    pub workspace_bytes: u64,
    /// Allocator headroom kept free for fragmentation.
    pub reserve_bytes: u64,
    pub bf16_tflops: f64,
    /// 0 when the GPU has no FP8 tensor cores.
    pub fp8_tflops: f64,
    pub mem_bw_gbs: f64,
    pub interconnect: String,
    pub link_gbs: f64,
    pub host_gbs: f64,
    /// Not in the catalog: rates are nominal and only good for ranking layouts.
    pub generic: bool,
}

impl Gpu {
    /// Bytes left for the model once context, workspaces and allocator headroom are taken.
    pub fn usable_bytes(&self) -> u64 {
        self.memory_bytes
            .saturating_sub(self.context_bytes + self.workspace_bytes + self.reserve_bytes)
    }

    pub fn has_fp8(&self) -> bool {
        self.fp8_tflops > 0.0
    }
}

/// The parsed catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    defaults: Defaults,
    entries: Vec<Entry>,
}

impl Catalog {
    /// The catalog compiled in from configs/gpus.toml.
    pub fn builtin() -> Result<Self> {
        Self::from_toml(CATALOG)
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let file: CatalogFile =
            toml::from_str(text).map_err(|e| PlanError::Catalog(e.to_string()))?;
        Ok(Self {
            defaults: file.defaults,
            entries: file.gpu,
        })
    }

    /// Catalog names, for error messages and `--help`.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    fn reserve(&self, memory_bytes: u64) -> u64 {
        (memory_bytes as f64 * self.defaults.allocator_reserve_fraction).round() as u64
    }

    /// One GPU by catalog name or alias (case-insensitive), or a generic `24GB` / `80GiB`.
    pub fn gpu(&self, name: &str) -> Result<Gpu> {
        let key = name.trim();
        let entry = self.entries.iter().find(|e| {
            e.name.eq_ignore_ascii_case(key)
                || e.aliases.iter().any(|a| a.eq_ignore_ascii_case(key))
        });
        let d = &self.defaults;
        let (name, label, memory_bytes, context_mb, workspace_mb, rates, interconnect, generic) =
            match entry {
                Some(e) => (
                    e.name.clone(),
                    e.label.clone(),
                    e.memory_mib * MIB,
                    e.context_mb,
                    e.workspace_mb,
                    [
                        e.bf16_tflops,
                        e.fp8_tflops,
                        e.mem_bw_gbs,
                        e.link_gbs,
                        e.host_gbs,
                    ],
                    e.interconnect.clone(),
                    false,
                ),
                None => match parse_generic_size(key) {
                    Some(bytes) => (
                        key.to_string(),
                        format!("generic {key} GPU"),
                        bytes,
                        d.generic_context_mb,
                        d.generic_workspace_mb,
                        [
                            d.generic_bf16_tflops,
                            d.generic_fp8_tflops,
                            d.generic_mem_bw_gbs,
                            d.generic_link_gbs,
                            d.generic_host_gbs,
                        ],
                        "unknown".to_string(),
                        true,
                    ),
                    None => {
                        return Err(PlanError::UnknownGpu {
                            name: key.to_string(),
                            known: self.names().join(", "),
                        });
                    }
                },
            };
        let [bf16_tflops, fp8_tflops, mem_bw_gbs, link_gbs, host_gbs] = rates;
        Ok(Gpu {
            name,
            label,
            memory_bytes,
            context_bytes: context_mb * MB,
            workspace_bytes: workspace_mb * MB,
            reserve_bytes: self.reserve(memory_bytes),
            bf16_tflops,
            fp8_tflops,
            mem_bw_gbs,
            interconnect,
            link_gbs,
            host_gbs,
            generic,
        })
    }

    /// Parse `--gpus`: `5xH800`, `4xH100,1xL40S`, `H200`, `5x24GB`.
    pub fn parse_gpus(&self, input: &str) -> Result<Vec<Gpu>> {
        let bad = |reason: &str| PlanError::Gpus {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.trim().is_empty() {
            return Err(bad(
                "empty; expected e.g. 5xH800 or 4xH100,1xL40S or 5x24GB",
            ));
        }
        let mut gpus = Vec::new();
        for group in input.split(',') {
            let group = group.trim();
            let (count, name) = match group.split_once(['x', 'X', '*']) {
                Some((n, rest)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
                    let n: u64 = n.parse().map_err(|_| bad("GPU count is not a number"))?;
                    (n, rest)
                }
                _ => (1, group),
            };
            if count == 0 {
                return Err(bad("a GPU count must be at least 1"));
            }
            if count > 4096 {
                return Err(bad("more than 4096 GPUs in one group"));
            }
            if name.is_empty() {
                return Err(bad("missing GPU type after the count"));
            }
            let gpu = self.gpu(name)?;
            gpus.extend(std::iter::repeat_n(gpu, count as usize));
        }
        Ok(gpus)
    }
}

pub const MB: u64 = 1_000_000;
pub const MIB: u64 = 1 << 20;
pub const GB: u64 = 1_000_000_000;
pub const GIB: u64 = 1 << 30;

/// `24GB` (10^9 bytes) or `24GiB` (2^30 bytes); decimals allowed (`22.5GB`).
fn parse_generic_size(s: &str) -> Option<u64> {
    let lower = s.to_ascii_lowercase();
    let (num, unit) = if let Some(n) = lower.strip_suffix("gib") {
        (n, GIB as f64)
    } else if let Some(n) = lower.strip_suffix("gb") {
        (n, GB as f64)
    } else if let Some(n) = lower.strip_suffix('g') {
        (n, GB as f64)
    } else {
        return None;
    };
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v > 0.0 && v < 100_000.0).then(|| (v * unit).round() as u64)
}
