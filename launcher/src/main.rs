//! `lava`: plan, launch and supervise Live Avatar jobs.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("no subcommand yet")
}
