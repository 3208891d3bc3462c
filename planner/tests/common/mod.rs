//! Shared by the planner's integration tests: plan the built-in s2v-14b model.
#![allow(clippy::unwrap_used, dead_code)]

use planner::layout::Layout;
use planner::size::{AspectSource, SizeArg, resolve};
use planner::{Catalog, Infeasible, ModelSpec, Plan, Request, Workload, plan};

/// Plan s2v-14b on `gpus` at `size` (4 steps, 1 clip); panics on bad input.
pub fn plan_s2v(
    gpus: &str,
    size: &str,
    source: AspectSource,
    layout: Layout,
) -> Result<Plan, Box<Infeasible>> {
    let model = ModelSpec::builtin("s2v-14b").unwrap();
    let gpus = Catalog::builtin().unwrap().parse_gpus(gpus).unwrap();
    let res = resolve(SizeArg::parse(size).unwrap(), source).unwrap();
    let work = Workload {
        sample_steps: 4,
        clips: 1,
    };
    plan(&Request::new(model, gpus, layout, res, work).unwrap())
}
