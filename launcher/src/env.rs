//! Where this launcher sits in the job: from flags, torchrun-style or Slurm variables.
//!
//! A job has `nnodes` launchers (one per node, or one per Slurm/torchrun task), each starting
//! `nproc` workers. Launcher `node_rank` owns global ranks `node_rank*nproc .. +nproc`, and
//! its workers use devices `local_node_rank*nproc .. +nproc` on their node. So both common
//! set-ups work: one launcher per node with `--nproc <GPUs per node>`, or one launcher per
//! GPU (e.g. `srun -n8` or torchrun) with `--nproc 1`.
//!
//! Precedence, field by field: flags (and their `LAVA_*` variables), then torchrun's
//! `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`, then Slurm's
//! `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`/`SLURM_JOB_NODELIST`, then one node.

use std::fmt;
use std::str::FromStr;

/// torchrun's default rendezvous port, used when a multi-launcher job names none.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which source the launcher's place came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No rank variables: a single launcher.
    Single,
    /// torchrun-style `RANK`, `WORLD_SIZE`, ...
    Torchrun,
    /// Slurm's `SLURM_PROCID`, `SLURM_NTASKS`, ...
    Slurm,
}

/// The launcher's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Index of this launcher, 0 = the master (coordinator).
    pub node_rank: u32,
    /// Number of launchers.
    pub nnodes: u32,
    /// Index of this launcher among the launchers on its node (offsets device ordinals).
    pub local_node_rank: u32,
    /// Workers this launcher starts.
    pub nproc: u32,
    /// Host of the master launcher.
    pub master_addr: String,
    /// Port of the master launcher's registration service; 0 lets a single launcher pick one.
    pub master_port: u16,
    /// Where the values came from.
    pub source: Source,
}

impl Topology {
    /// Number of ranks in the job.
    pub fn world_size(&self) -> u32 {
        self.nnodes * self.nproc
    }

    /// Global rank of this launcher's `i`-th worker.
    pub fn global_rank(&self, i: u32) -> u32 {
        self.node_rank * self.nproc + i
    }

    /// Device ordinal (on this node) of this launcher's `i`-th worker.
    pub fn device_ordinal(&self, i: u32) -> u32 {
        self.local_node_rank * self.nproc + i
    }

    /// Whether this launcher coordinates the job.
    pub fn is_master(&self) -> bool {
        self.node_rank == 0
    }
}

/// Flags that override the environment; `None` = not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--nnodes`.
    pub nnodes: Option<u32>,
    /// `--node-rank`.
    pub node_rank: Option<u32>,
    /// `--local-node-rank`.
    pub local_node_rank: Option<u32>,
    /// `--nproc`.
    pub nproc: Option<u32>,
    /// `--master-addr`.
    pub master_addr: Option<String>,
    /// `--master-port`.
    pub master_port: Option<u16>,
}

/// A variable or flag that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError(pub String);

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TopologyError {}

fn parse<T: FromStr>(var: &str, value: &str) -> Result<T, TopologyError>
where
    T::Err: fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e| TopologyError(format!("{var}={value:?}: {e}")))
}

/// Resolves the topology from `flags` and the variables `get` returns.
pub fn resolve(
    flags: &Overrides,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Topology, TopologyError> {
    let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
    let num = |name: &str| -> Result<Option<u32>, TopologyError> {
        var(name).map(|v| parse::<u32>(name, &v)).transpose()
    };
    let master_port_var = var("MASTER_PORT")
        .map(|v| parse::<u16>("MASTER_PORT", &v))
        .transpose()?;

    let mut t = if let Some(rank) = num("RANK")? {
        let world = num("WORLD_SIZE")?.ok_or_else(|| {
            TopologyError("RANK is set but WORLD_SIZE is not (torchrun-style variables)".into())
        })?;
        Topology {
            node_rank: rank,
            nnodes: world,
            local_node_rank: num("LOCAL_RANK")?.unwrap_or(0),
            nproc: 1,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: master_port_var.unwrap_or(DEFAULT_MASTER_PORT),
            source: Source::Torchrun,
        }
    } else if let Some(procid) = num("SLURM_PROCID")? {
        let ntasks = match num("SLURM_NTASKS")? {
            Some(n) => n,
            None => num("SLURM_NPROCS")?.ok_or_else(|| {
                TopologyError("SLURM_PROCID is set but SLURM_NTASKS is not".into())
            })?,
        };
        let master_addr = match var("MASTER_ADDR") {
            Some(addr) => addr,
            None => {
                let list = var("SLURM_JOB_NODELIST")
                    .or_else(|| var("SLURM_NODELIST"))
                    .ok_or_else(|| {
                        TopologyError(
                            "SLURM_PROCID is set but SLURM_JOB_NODELIST is not; set MASTER_ADDR"
                                .into(),
                        )
                    })?;
                let hosts = expand_hostlist(&list)
                    .map_err(|e| TopologyError(format!("SLURM_JOB_NODELIST: {e}")))?;
                hosts
                    .into_iter()
                    .next()
                    .ok_or_else(|| TopologyError("SLURM_JOB_NODELIST is empty".into()))?
            }
        };
        // The usual sbatch bridge: a port derived from the job id, so concurrent jobs differ.
        let job_port =
            num("SLURM_JOB_ID")?.map(|id| 20000 + u16::try_from(id % 10000).unwrap_or(0));
        Topology {
            node_rank: procid,
            nnodes: ntasks,
            local_node_rank: num("SLURM_LOCALID")?.unwrap_or(0),
            nproc: 1,
            master_addr,
            master_port: master_port_var.or(job_port).unwrap_or(DEFAULT_MASTER_PORT),
            source: Source::Slurm,
        }
    } else {
        Topology {
            node_rank: 0,
            nnodes: 1,
            local_node_rank: 0,
            nproc: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            source: Source::Single,
        }
    };

    if let Some(v) = flags.nnodes {
        t.nnodes = v;
    }
    if let Some(v) = flags.node_rank {
        t.node_rank = v;
    }
    if let Some(v) = flags.local_node_rank {
        t.local_node_rank = v;
    }
    if let Some(v) = flags.nproc {
        t.nproc = v;
    }
    if let Some(v) = &flags.master_addr {
        t.master_addr = v.clone();
    }
    if let Some(v) = flags.master_port {
        t.master_port = v;
    }
    if t.nnodes > 1 && t.master_port == 0 {
        t.master_port = DEFAULT_MASTER_PORT;
    }

    if t.nnodes == 0 || t.nproc == 0 {
        return Err(TopologyError(format!(
            "{} launchers × {} workers is an empty job",
            t.nnodes, t.nproc
        )));
    }
    if t.node_rank >= t.nnodes {
        return Err(TopologyError(format!(
            "launcher index {} is outside {} launchers",
            t.node_rank, t.nnodes
        )));
    }
    if t.nnodes.checked_mul(t.nproc).is_none() {
        return Err(TopologyError(format!(
            "{} × {} ranks overflows",
            t.nnodes, t.nproc
        )));
    }
    Ok(t)
}

/// Expands a Slurm hostlist such as `gpu[01-03,07],login1` into host names, in order.
///
/// Supports several bracket groups per name (`rack[1-2]-n[1-2]`, expanded left to right),
/// zero padding taken from the lower bound (`[08-10]` → `08 09 10`), and single numbers.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        if item.is_empty() {
            return Err(format!("empty host name in {list:?}"));
        }
        hosts.extend(expand_one(item)?);
    }
    Ok(hosts)
}

/// Splits on commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(format!("nested '[' in {list:?}")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(format!("unmatched ']' in {list:?}")),
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unclosed '[' in {list:?}"));
    }
    items.push(&list[start..]);
    Ok(items)
}

/// Expands one name with zero or more bracket groups.
fn expand_one(item: &str) -> Result<Vec<String>, String> {
    let Some(open) = item.find('[') else {
        return Ok(vec![item.to_string()]);
    };
    let close = item[open..]
        .find(']')
        .map(|c| open + c)
        .ok_or_else(|| format!("unclosed '[' in {item:?}"))?;
    let prefix = &item[..open];
    let rest = expand_one(&item[close + 1..])?;
    let mut out = Vec::new();
    for range in item[open + 1..close].split(',') {
        for n in expand_range(range).map_err(|e| format!("{e} in {item:?}"))? {
            for tail in &rest {
                out.push(format!("{prefix}{n}{tail}"));
            }
        }
    }
    Ok(out)
}

/// `07` → [`07`]; `08-10` → [`08`, `09`, `10`].
fn expand_range(range: &str) -> Result<Vec<String>, String> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
    if !digits(lo) || !digits(hi) {
        return Err(format!("bad range {range:?}"));
    }
    let width = lo.len();
    let (a, b): (u64, u64) = (
        lo.parse().map_err(|_| format!("bad range {range:?}"))?,
        hi.parse().map_err(|_| format!("bad range {range:?}"))?,
    );
    if a > b {
        return Err(format!("descending range {range:?}"));
    }
    if b - a >= 65536 {
        return Err(format!("range {range:?} has more than 65536 hosts"));
    }
    Ok((a..=b).map(|n| format!("{n:0width$}")).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn hostlists_expand_like_scontrol() {
        assert_eq!(
            expand_hostlist("gpu[01-04]").unwrap(),
            ["gpu01", "gpu02", "gpu03", "gpu04"]
        );
        assert_eq!(
            expand_hostlist("a,b[1,3-4],c").unwrap(),
            ["a", "b1", "b3", "b4", "c"]
        );
        assert_eq!(expand_hostlist("n[08-10]").unwrap(), ["n08", "n09", "n10"]);
        assert_eq!(
            expand_hostlist("rack[1-2]-n[1-2]").unwrap(),
            ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]
        );
        assert_eq!(expand_hostlist("node7").unwrap(), ["node7"]);
        assert_eq!(expand_hostlist("x[9-10].ib").unwrap(), ["x9.ib", "x10.ib"]);
    }

    #[test]
    fn malformed_hostlists_are_errors() {
        for bad in [
            "gpu[01-04",
            "gpu01-04]",
            "gpu[4-1]",
            "gpu[a-b]",
            "a,,b",
            "g[[1]]",
            "g[]",
            "g[1-]",
        ] {
            assert!(expand_hostlist(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn no_variables_means_one_local_launcher() {
        let t = resolve(&Overrides::default(), env(&[])).unwrap();
        assert_eq!(
            (t.node_rank, t.nnodes, t.nproc, t.master_port),
            (0, 1, 1, 0)
        );
        assert_eq!(t.source, Source::Single);
        assert!(t.is_master());
    }

    #[test]
    fn torchrun_variables_place_the_launcher() {
        let vars = [
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "1234"),
        ];
        let t = resolve(&Overrides::default(), env(&vars)).unwrap();
        assert_eq!(t.source, Source::Torchrun);
        assert_eq!(
            (t.node_rank, t.nnodes, t.local_node_rank, t.nproc),
            (3, 4, 1, 1)
        );
        assert_eq!((t.master_addr.as_str(), t.master_port), ("n0", 1234));
        assert_eq!(
            (t.world_size(), t.global_rank(0), t.device_ordinal(0)),
            (4, 3, 1)
        );
        assert!(resolve(&Overrides::default(), env(&[("RANK", "0")])).is_err());
        assert!(
            resolve(
                &Overrides::default(),
                env(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            )
            .is_err()
        );
    }

    #[test]
    fn slurm_variables_place_the_launcher_and_pick_the_first_node_as_master() {
        let vars = [
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "123456"),
        ];
        let flags = Overrides {
            nproc: Some(4),
            ..Overrides::default()
        };
        let t = resolve(&flags, env(&vars)).unwrap();
        assert_eq!(t.source, Source::Slurm);
        assert_eq!(
            (t.node_rank, t.nnodes, t.nproc, t.world_size()),
            (1, 2, 4, 8)
        );
        assert_eq!(
            (t.global_rank(0), t.global_rank(3), t.device_ordinal(3)),
            (4, 7, 3)
        );
        assert_eq!(
            (t.master_addr.as_str(), t.master_port),
            ("gpu07", 20000 + 3456)
        );
        assert!(!t.is_master());
    }

    #[test]
    fn torchrun_wins_over_slurm_and_flags_win_over_both() {
        let vars = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_JOB_NODELIST", "a"),
        ];
        assert_eq!(
            resolve(&Overrides::default(), env(&vars))
                .unwrap()
                .node_rank,
            1
        );
        let flags = Overrides {
            node_rank: Some(0),
            nnodes: Some(1),
            master_addr: Some("h".into()),
            ..Overrides::default()
        };
        let t = resolve(&flags, env(&vars)).unwrap();
        assert_eq!((t.node_rank, t.nnodes, t.master_addr.as_str()), (0, 1, "h"));
    }

    #[test]
    fn impossible_topologies_are_refused() {
        let flags = Overrides {
            node_rank: Some(2),
            nnodes: Some(2),
            ..Overrides::default()
        };
        assert!(resolve(&flags, env(&[])).is_err());
        let flags = Overrides {
            nproc: Some(0),
            ..Overrides::default()
        };
        assert!(resolve(&flags, env(&[])).is_err());
        assert!(
            resolve(
                &Overrides::default(),
                env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")])
            )
            .is_err()
        );
    }
}
