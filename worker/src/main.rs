//! `lava-worker`: one rank of a lava job, spawned by the launcher.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("lava-worker is started by `lava generate`; it has no standalone mode")
}
