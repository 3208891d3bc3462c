//! `lava generate`'s progress on stderr and its closing summary.
//!
//! Per decoded block: blocks, frames, FPS, ETA and the block's compute time on every TPP
//! stage (from the frame chunk). On a terminal the line is redrawn in place; otherwise (a pipe,
//! a log file, CI) every block prints a plain line. The summary: first-frame latency, steady
//! FPS, per-stage block times and the slowest stage, and each rank's peak memory beside the
//! plan's prediction for that rank.

use std::io::{IsTerminal as _, Write as _};
use std::time::Instant;

use proto::frames::v1::FrameChunk;

/// Progress of one generation.
#[derive(Debug)]
pub struct Progress {
    t0: Instant,
    total_blocks: u64,
    expected_frames: u64,
    tty: bool,
    blocks: u64,
    frames: u64,
    /// Seconds since t0 when the first chunk arrived, and its frames.
    first: Option<(f64, u64)>,
    last: f64,
    /// Per block, per stage compute time (ms).
    stage_ms: Vec<Vec<f32>>,
    decode_ms: Vec<f64>,
}

impl Progress {
    /// Starts the clock now.
    pub fn new(total_blocks: u64, expected_frames: u64) -> Self {
        Self {
            t0: Instant::now(),
            total_blocks,
            expected_frames,
            tty: std::io::stderr().is_terminal(),
            blocks: 0,
            frames: 0,
            first: None,
            last: 0.0,
            stage_ms: Vec::new(),
            decode_ms: Vec::new(),
        }
    }

    /// Frames received so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Records a decoded block and prints its progress line.
    pub fn block(&mut self, c: &FrameChunk) {
        let el = self.t0.elapsed().as_secs_f64();
        self.blocks += 1;
        self.frames += u64::from(c.frame_count);
        self.first.get_or_insert((el, u64::from(c.frame_count)));
        self.last = el;
        self.stage_ms.push(c.stage_ms.clone());
        let decode = c.decode_end_unix_ns.saturating_sub(c.decode_start_unix_ns) as f64 / 1e6;
        self.decode_ms.push(decode);
        let line = self.line(c, el, decode);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if self.blocks == self.total_blocks {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn line(&self, c: &FrameChunk, el: f64, decode_ms: f64) -> String {
        let fps = self.frames as f64 / el.max(1e-9);
        let eta = match self.first {
            Some((t1, _)) if self.blocks > 1 => {
                let per_block = (el - t1) / (self.blocks - 1) as f64;
                format!(
                    "{:.1} s",
                    per_block * self.total_blocks.saturating_sub(self.blocks) as f64
                )
            }
            _ => "?".into(),
        };
        let stages = c
            .stage_ms
            .iter()
            .map(|ms| format!("{ms:.0}"))
            .collect::<Vec<_>>()
            .join("/");
        format!(
            "lava: block {} (clip {}): frames {}/{}, blocks {}/{}, {fps:.2} frames/s, ETA {eta}, \
             stages {stages} ms, decode {decode_ms:.0} ms, {el:.1} s",
            c.block_index,
            c.clip_index,
            self.frames,
            self.expected_frames,
            self.blocks,
            self.total_blocks,
        )
    }

    /// Seconds from the start to the first frame.
    pub fn first_frame_s(&self) -> Option<f64> {
        self.first.map(|f| f.0)
    }

    /// Frames per second after the first block (the pipeline's steady state); `None` with
    /// fewer than two blocks.
    pub fn steady_fps(&self) -> Option<f64> {
        let (t1, f1) = self.first?;
        (self.blocks > 1 && self.last > t1).then(|| (self.frames - f1) as f64 / (self.last - t1))
    }

    /// Mean and max compute time per block of every stage, ms.
    pub fn stage_stats(&self) -> Vec<(f64, f64)> {
        let stages = self.stage_ms.iter().map(Vec::len).max().unwrap_or(0);
        (0..stages)
            .map(|s| {
                let v: Vec<f64> = self
                    .stage_ms
                    .iter()
                    .filter_map(|b| b.get(s).map(|&x| f64::from(x)))
                    .collect();
                let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                (mean, v.iter().copied().fold(0.0, f64::max))
            })
            .collect()
    }

    /// The closing summary (one line each); `ranks` are (label, measured peak, planned peak).
    pub fn summary(&self, total_s: f64, ranks: &[(String, u64, u64)]) -> Vec<String> {
        let mut out = Vec::new();
        let first = self
            .first_frame_s()
            .map_or("none".into(), |s| format!("{s:.2} s"));
        let steady = self
            .steady_fps()
            .map_or("n/a (one block)".into(), |f| format!("{f:.2} frames/s"));
        out.push(format!(
            "lava: summary: {} frames in {total_s:.1} s; first frame after {first}; steady {steady}",
            self.frames
        ));
        let stats = self.stage_stats();
        for (s, (mean, max)) in stats.iter().enumerate() {
            out.push(format!(
                "lava:   stage {s}: {mean:.0} ms per block (max {max:.0} ms)"
            ));
        }
        let decode = self.decode_ms.iter().sum::<f64>() / self.decode_ms.len().max(1) as f64;
        out.push(format!("lava:   decode: {decode:.0} ms per block"));
        if let Some((s, (mean, _))) = stats
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.0.total_cmp(&b.1.0))
        {
            out.push(format!(
                "lava:   slowest stage: stage {s} ({mean:.0} ms per block)"
            ));
        }
        out.push("lava:   peak memory per rank (tracker) vs the plan's prediction:".into());
        for (label, got, planned) in ranks {
            let ratio = if *planned > 0 {
                format!(
                    " ({:+.1} %)",
                    100.0 * (*got as f64 - *planned as f64) / *planned as f64
                )
            } else {
                String::new()
            };
            out.push(format!(
                "lava:     {label}: {} measured, {} planned{ratio}",
                mib(*got),
                mib(*planned)
            ));
        }
        out
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chunk(b: u32, frames: u32, stage_ms: Vec<f32>) -> FrameChunk {
        FrameChunk {
            block_index: b,
            frame_count: frames,
            stage_ms,
            decode_start_unix_ns: 1_000_000,
            decode_end_unix_ns: 6_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn stage_stats_and_summary_name_the_slowest_stage() {
        let mut p = Progress::new(3, 33);
        p.block(&chunk(0, 9, vec![10.0, 30.0]));
        assert_eq!(p.steady_fps(), None);
        std::thread::sleep(std::time::Duration::from_millis(5));
        p.block(&chunk(1, 12, vec![20.0, 50.0]));
        p.block(&chunk(2, 12, vec![30.0, 40.0]));
        assert_eq!(p.frames(), 33);
        assert!(p.steady_fps().unwrap() > 0.0);
        assert_eq!(p.stage_stats(), vec![(20.0, 30.0), (40.0, 50.0)]);
        let s = p.summary(1.0, &[("rank 0 dit".into(), 3 << 20, 2 << 20)]);
        assert!(
            s.iter()
                .any(|l| l.contains("slowest stage: stage 1 (40 ms")),
            "{s:?}"
        );
        assert!(s.iter().any(|l| l.contains("decode: 5 ms")), "{s:?}");
        assert!(
            s.iter()
                .any(|l| l.contains("3.0 MiB measured, 2.0 MiB planned (+50.0 %)")),
            "{s:?}"
        );
    }
}
