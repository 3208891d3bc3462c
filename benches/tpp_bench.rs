//! `tpp-bench`: the streaming generation of issue #6 on one host, one process per GPU, through
//! the runtime's own path (`CausalWanModelS2V::load_rank`, `StageRunner`, the streaming VAE
//! decoder, `NcclComm`), with seeded random weights (the same on every rank, as dit-bench
//! builds them) and seeded inputs; no encoders.
//!
//! Layouts (`--layout`): `tppN` — N TPP stages of 4/N steps each, latents passed stage to stage,
//! the clip-1 sink sent by the last stage, the VAE co-located on the last stage's rank;
//! `tpN` — one stage, tensor parallel N, every step, VAE on rank 0 after each block; `single`
//! — one rank, every step (the reference for the equivalence check). `tppSxtpT` composes both.
//!
//! The parent process makes the bootstrap (an NCCL unique id, or a socket address for
//! `--backend cpu`), re-runs this binary once per rank with it in the environment, kills every
//! rank if one fails or the deadline passes, and prints the per-rank table. Each rank prints its
//! timings and its memory per category beside the planner's prediction for that rank, writes a
//! report to `--out`, and the decoding rank dumps every block's final latents (f32) there.
//!
//!   usage: tpp-bench --layout single|tppN|tpN [--backend cuda|cpu] [--model s2v-14b|tiny]
//!          [--size W*H] [--clips N] [--seed N] [--no-vae] [--gpu H200] [--out DIR]
//!          [--timeout S]
//!          tpp-bench compare REFERENCE.f32 OTHER.f32 [--blocks N] [--tol X]
//!          tpp-bench plan --layout … (the planner's per-rank prediction only)

#[path = "tpp_plan.rs"]
mod tpp_plan;
#[path = "tpp_rank.rs"]
mod tpp_rank;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Environment of a rank process.
pub const ENV_RANK: &str = "TPP_BENCH_RANK";
pub const ENV_BOOT: &str = "TPP_BENCH_BOOT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cuda,
    Cpu,
}

#[derive(Debug, Clone)]
pub struct Args {
    pub layout: String,
    pub stages: usize,
    pub tp: usize,
    pub backend: Backend,
    pub model: String,
    pub size: String,
    pub clips: usize,
    pub seed: u64,
    pub vae: bool,
    pub gpu: String,
    pub out: PathBuf,
    pub timeout: Duration,
}

impl Args {
    pub fn world(&self) -> usize {
        self.stages * self.tp
    }
}

/// `single` → (1, 1); `tpp4` → (4, 1); `tp4` → (1, 4); `tpp2xtp2` → (2, 2).
fn parse_layout(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--layout {s}: want single, tppN, tpN or tppSxtpT");
    if s == "single" {
        return Ok((1, 1));
    }
    let (mut stages, mut tp) = (1, 1);
    for part in s.split('x') {
        if let Some(n) = part.strip_prefix("tpp") {
            stages = n.parse().map_err(|_| bad())?;
        } else if let Some(n) = part.strip_prefix("tp") {
            tp = n.parse().map_err(|_| bad())?;
        } else {
            return Err(bad());
        }
    }
    if stages == 0 || tp == 0 {
        return Err(bad());
    }
    Ok((stages, tp))
}

fn args(raw: &[String]) -> Result<Args> {
    let mut a = Args {
        layout: "single".into(),
        stages: 1,
        tp: 1,
        backend: Backend::Cuda,
        model: "s2v-14b".into(),
        size: "704*384".into(),
        clips: 2,
        seed: 0,
        vae: true,
        gpu: "H200".into(),
        out: PathBuf::from("tpp-bench-out"),
        timeout: Duration::from_secs(600),
    };
    let mut it = raw.iter();
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--layout" => a.layout = val()?.clone(),
            "--backend" => {
                a.backend = match val()?.as_str() {
                    "cuda" => Backend::Cuda,
                    "cpu" => Backend::Cpu,
                    b => bail!("--backend {b}: want cuda or cpu"),
                }
            }
            "--model" => a.model = val()?.clone(),
            "--size" => a.size = val()?.clone(),
            "--clips" => a.clips = val()?.parse()?,
            "--seed" => a.seed = val()?.parse()?,
            "--no-vae" => a.vae = false,
            "--gpu" => a.gpu = val()?.clone(),
            "--out" => a.out = PathBuf::from(val()?),
            "--timeout" => a.timeout = Duration::from_secs(val()?.parse()?),
            _ => bail!("unknown argument {k}"),
        }
    }
    (a.stages, a.tp) = parse_layout(&a.layout)?;
    if a.clips == 0 {
        bail!("--clips must be at least 1");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some("compare") {
        return tpp_plan::compare(&raw[1..]);
    }
    if raw.first().map(String::as_str) == Some("plan") {
        return plan_only(&args(&raw[1..])?);
    }
    let a = args(&raw)?;
    match std::env::var(ENV_RANK) {
        Ok(r) => {
            let rank: usize = r.parse().context("TPP_BENCH_RANK")?;
            let boot = std::env::var(ENV_BOOT).context("TPP_BENCH_BOOT")?;
            tpp_rank::run(&a, rank, &boot)
        }
        Err(_) => parent(&a, &raw),
    }
}

/// `plan --layout …`: the planner's prediction for every rank of the layout, nothing run.
fn plan_only(a: &Args) -> Result<()> {
    let spec = planner::ModelSpec::builtin(&a.model)?;
    for r in 0..a.world() {
        let p = tpp_plan::predict(&spec, &a.gpu, &a.size, a.stages, a.tp, a.clips, a.vae, r)?;
        let cats: Vec<String> = p
            .per_category
            .iter()
            .map(|(c, b)| format!("{c:?} {b}"))
            .collect();
        println!(
            "PLAN layout {} rank {r}: peak {} B ({:.2} GiB); {}",
            a.layout,
            p.peak,
            tpp_plan::gib(p.peak),
            cats.join(", ")
        );
    }
    Ok(())
}

/// Bootstrap string every rank gets: the NCCL id in hex, or rank 0's socket address.
fn bootstrap(a: &Args) -> Result<String> {
    match a.backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            let id = runtime::comm::NcclId::new().context("creating the NCCL unique id")?;
            Ok(id.to_bytes().iter().map(|b| format!("{b:02x}")).collect())
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => bail!("this tpp-bench was built without the `cuda` feature"),
        Backend::Cpu => {
            // A free loopback port for rank 0's rendezvous listener.
            let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            Ok(l.local_addr()?.to_string())
        }
    }
}

fn parent(a: &Args, raw: &[String]) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let boot = bootstrap(a)?;
    let exe = std::env::current_exe()?;
    let world = a.world();
    println!(
        "tpp-bench: layout {} ({} stage(s) × tp {}), {world} process(es), backend {:?}, model {}, \
         {}, {} clip(s), VAE {}",
        a.layout,
        a.stages,
        a.tp,
        a.backend,
        a.model,
        a.size,
        a.clips,
        if a.vae { "on" } else { "off" }
    );
    let mut children: Vec<Child> = Vec::with_capacity(world);
    for r in 0..world {
        let spawned = Command::new(&exe)
            .args(raw)
            .env(ENV_RANK, r.to_string())
            .env(ENV_BOOT, &boot)
            .env("NCCL_NVLS_ENABLE", "0")
            .spawn()
            .with_context(|| format!("starting rank {r}"));
        match spawned {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(&mut children);
                return Err(e);
            }
        }
    }
    let deadline = Instant::now() + a.timeout;
    let mut codes: Vec<Option<i32>> = vec![None; world];
    let mut done = vec![false; world];
    let mut failed = None;
    while done.iter().any(|d| !d) {
        for (i, c) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(s) = c.try_wait()? {
                done[i] = true;
                codes[i] = s.code();
                if !s.success() && failed.is_none() {
                    failed = Some(format!("rank {i} exited with {s}"));
                }
            }
        }
        if failed.is_some() || Instant::now() > deadline {
            kill_all(&mut children);
            let why = failed.unwrap_or_else(|| format!("still running after {:?}", a.timeout));
            bail!("layout {}: {why}; ranks' exit codes {codes:?}", a.layout);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    summary(a)
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            drop(c.kill());
        }
        drop(c.wait());
    }
}

/// The per-rank table from the ranks' reports.
fn summary(a: &Args) -> Result<()> {
    println!(
        "SUMMARY layout {} | rank | role | load s | steady block ms (own stage) | decode ms | \
         peak GiB | planned GiB | diff",
        a.layout
    );
    let mut pipeline = None;
    for r in 0..a.world() {
        let rep = tpp_plan::read_report(&tpp_rank::report_path(a, r))?;
        let get = |k: &str| rep.get(k).cloned().unwrap_or_else(|| "—".into());
        let (peak, planned): (u64, u64) = (
            get("peak_bytes").parse().unwrap_or(0),
            get("planned_bytes").parse().unwrap_or(0),
        );
        println!(
            "SUMMARY layout {} | {r} | {} | {} | {} | {} | {:.2} | {:.2} | {}",
            a.layout,
            get("role"),
            get("load_s"),
            get("block_ms_steady"),
            get("decode_ms_steady"),
            tpp_plan::gib(peak),
            tpp_plan::gib(planned),
            tpp_plan::pct(peak, planned)
        );
        if rep.contains_key("fps_steady") {
            pipeline = Some(format!(
                "SUMMARY layout {} pipeline: first-frame latency {} s, steady FPS {} \
                 (12 frames per block), whole-run FPS {}, steady block interval {} ms, \
                 {} blocks, latents {}",
                a.layout,
                get("first_frame_s"),
                get("fps_steady"),
                get("fps_all"),
                get("interval_ms_steady"),
                get("blocks"),
                get("latents")
            ));
        }
    }
    if let Some(p) = pipeline {
        println!("{p}");
    }
    println!(
        "SUMMARY layout {} planned = `{}` lines of what the bench builds (no encoders{})",
        a.layout,
        tpp_plan::lava_plan_command(&a.gpu, a.world(), &a.size, a.tp, a.clips),
        if a.vae { "" } else { ", no VAE" }
    );
    Ok(())
}
