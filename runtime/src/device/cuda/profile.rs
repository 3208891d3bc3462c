//! Per-op device time (`LAVA_PROFILE=1`): every backend op records a CUDA event before and
//! after its launches on the device's stream; [`take`] synchronises, reads the elapsed times
//! and sums them per op key (kind and shape class). Events do not synchronise the stream, so
//! the profiled run keeps its launch overlap; the wall time minus the summed op time is what
//! the GPU spent idle (launch gaps, host work). Off by default: a span is then one branch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{CudaEvent, sys};

use super::{CudaDev, ce};
use crate::{Error, Result};

static FORCED: AtomicBool = AtomicBool::new(false);

/// Whether ops record spans: `LAVA_PROFILE=1` in the environment, or [`set_enabled`].
pub fn enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    FORCED.load(Ordering::Relaxed)
        || *ENV.get_or_init(|| std::env::var("LAVA_PROFILE").is_ok_and(|v| v == "1"))
}

/// Turn span recording on or off from the program (e.g. for a few calls after timing).
pub fn set_enabled(on: bool) {
    FORCED.store(on, Ordering::Relaxed);
}

/// The recorded (key, start, end) triples of one device, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    spans: Mutex<Vec<(String, CudaEvent, CudaEvent)>>,
}

/// One op's span; records the end event when dropped.
pub(crate) struct Span<'a> {
    dev: &'a CudaDev,
    key: String,
    start: Option<CudaEvent>,
}

impl CudaDev {
    /// Start a span named by `key()` when profiling is on (the key is only formatted then).
    pub(crate) fn span(&self, key: impl FnOnce() -> String) -> Option<Span<'_>> {
        if !enabled() {
            return None;
        }
        let start = self
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()?;
        Some(Span {
            dev: self,
            key: key(),
            start: Some(start),
        })
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let end = self
            .dev
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
        if let (Ok(end), Some(start), Ok(mut v)) =
            (end, self.start.take(), self.dev.prof.spans.lock())
        {
            v.push((std::mem::take(&mut self.key), start, end));
        }
    }
}

/// Device time per op key since the last call: (key, calls, total ms), largest first.
pub fn take(ordinal: usize) -> Result<Vec<(String, usize, f64)>> {
    let d = super::dev(ordinal)?;
    d.stream.synchronize().map_err(ce)?;
    let spans = std::mem::take(&mut *d.prof.spans.lock().map_err(|_| Error::LockPoisoned)?);
    let mut acc: HashMap<String, (usize, f64)> = HashMap::new();
    for (key, s, e) in spans {
        let ms = f64::from(s.elapsed_ms(&e).map_err(ce)?);
        let a = acc.entry(key).or_default();
        a.0 += 1;
        a.1 += ms;
    }
    let mut v: Vec<_> = acc.into_iter().map(|(k, (n, ms))| (k, n, ms)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok(v)
}

/// A table of [`take`]'s rows, `per` dividing counts and times (e.g. the number of calls),
/// with the op kind (the key's first word) subtotals first.
pub fn table(rows: &[(String, usize, f64)], per: usize, wall_ms: f64) -> String {
    let per = per.max(1) as f64;
    let total: f64 = rows.iter().map(|r| r.2).sum::<f64>() / per;
    let mut kinds: HashMap<&str, (f64, f64)> = HashMap::new();
    for (k, n, ms) in rows {
        let kind = k.split_whitespace().next().unwrap_or("");
        let e = kinds.entry(kind).or_default();
        e.0 += *n as f64 / per;
        e.1 += ms / per;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    let mut s = format!(
        "PROFILE per call: wall {wall_ms:.2} ms, ops {total:.2} ms, idle (gaps, host) {:.2} ms\n",
        wall_ms - total
    );
    s.push_str("PROFILE kind | launches/call | ms/call | share of wall\n");
    for (k, (n, ms)) in &kinds {
        s.push_str(&format!(
            "PROFILE {k} | {n:.0} | {ms:.2} | {:.1}%\n",
            100.0 * ms / wall_ms.max(1e-9)
        ));
    }
    s.push_str("PROFILE op | calls/call | ms/call | us each\n");
    for (k, n, ms) in rows {
        let (n, ms) = (*n as f64 / per, ms / per);
        s.push_str(&format!(
            "PROFILE {k} | {n:.1} | {ms:.3} | {:.1}\n",
            1e3 * ms / n.max(1e-9)
        ));
    }
    s
}
