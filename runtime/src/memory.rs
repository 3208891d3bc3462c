//! Memory accounting: one tracker per device sees every tensor allocation.
//!
//! Each allocation is charged to a [`Category`] (weights, KV cache, activations, workspace,
//! communication) and releases its bytes when dropped, so [`MemoryTracker::stats`] gives
//! live and peak bytes per category, to hold against the planner's per-rank prediction.
//!
//! A tensor's category is the thread's current one when it is created: [`Category::Activations`]
//! unless a [`scope`] says otherwise (`let _g = memory::scope(Category::Weights);`).
//!
//! Reservations: [`MemoryTracker::reserve`] records planned bytes per category at start-up;
//! a backend may back them with a pre-allocated pool ([`MemoryTracker::reserved`]), and
//! [`MemoryTracker::set_strict`] turns any allocation beyond the reservation into
//! [`Error::OutOfReservation`] *before* the bytes are allocated, so a run proves it never
//! allocates outside its plan. [`planned_bytes`] turns the planner's per-rank budget
//! ([`planner::memory::RankMemory`]) into per-category reservations, and
//! [`MemoryStats::over_plan`] lists the categories whose peak exceeded them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::{Device, Error, Result};

/// What an allocation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    Weights,
    KvCache,
    Activations,
    Workspace,
    Communication,
}

impl Category {
    pub const ALL: [Category; 5] = [
        Category::Weights,
        Category::KvCache,
        Category::Activations,
        Category::Workspace,
        Category::Communication,
    ];
    fn index(self) -> usize {
        self as usize
    }
}

/// Bytes of one category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CategoryStats {
    pub live: usize,
    pub peak: usize,
    pub reserved: usize,
    /// Number of allocations made so far.
    pub allocations: u64,
}

/// A snapshot of one device's accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryStats {
    pub device: Device,
    pub per_category: [(Category, CategoryStats); 5],
    pub total_live: usize,
    /// Peak of the sum over categories (not the sum of per-category peaks).
    pub total_peak: usize,
}

impl MemoryStats {
    pub fn get(&self, c: Category) -> CategoryStats {
        self.per_category[c.index()].1
    }
}

impl std::fmt::Display for MemoryStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "memory on {:?}: live {} B, peak {} B",
            self.device, self.total_live, self.total_peak
        )?;
        for (c, s) in &self.per_category {
            writeln!(
                f,
                "  {:<14} live {:>14} B  peak {:>14} B  reserved {:>14} B  ({} allocs)",
                format!("{c:?}"),
                s.live,
                s.peak,
                s.reserved,
                s.allocations
            )?;
        }
        Ok(())
    }
}

impl MemoryStats {
    /// Categories with a reservation whose peak exceeded it: `(category, peak, reserved)`.
    pub fn over_plan(&self) -> Vec<(Category, usize, usize)> {
        self.per_category
            .iter()
            .filter(|(_, s)| s.reserved > 0 && s.peak > s.reserved)
            .map(|&(c, s)| (c, s.peak, s.reserved))
            .collect()
    }
}

/// The tracker category of a planner budget line; `None` for bytes that never pass
/// through the tracker (the CUDA context, the allocator's own reserve).
pub fn category_of(component: planner::memory::Component) -> Option<Category> {
    use planner::memory::Component as P;
    Some(match component {
        P::DitWeights
        | P::DitF32Copies
        | P::FsdpRootUnshard
        | P::FsdpBlocksInFlight
        | P::T5Weights
        | P::VaeWeights
        | P::Wav2Vec2 => Category::Weights,
        // State carried from call to call.
        P::KvNoisy | P::KvSink | P::TextKv | P::VaeDecoderCache => Category::KvCache,
        P::DitActivations | P::T5Activations => Category::Activations,
        P::VaeDecodeWorkspace | P::VaeEncodeWorkspace | P::LibraryWorkspace => Category::Workspace,
        P::CommBuffers => Category::Communication,
        P::CudaContext | P::AllocatorReserve => return None,
    })
}

/// Planned bytes per category of one rank: resident lines plus, per category, the largest
/// of the transient phases (phases never overlap).
pub fn planned_bytes(mem: &planner::memory::RankMemory) -> [(Category, u64); 5] {
    use planner::memory::Phase;
    let phases = [Phase::Startup, Phase::DitCall, Phase::VaeDecode];
    std::array::from_fn(|i| {
        let c = Category::ALL[i];
        let sum = |phase: Phase| -> u64 {
            mem.items
                .iter()
                .filter(|it| it.phase == phase && category_of(it.component) == Some(c))
                .map(|it| it.bytes)
                .sum()
        };
        let transient = phases.iter().map(|&p| sum(p)).max().unwrap_or(0);
        (c, sum(Phase::Resident) + transient)
    })
}

#[derive(Debug, Default)]
struct State {
    cats: [CategoryStats; 5],
    total_live: usize,
    total_peak: usize,
    strict: bool,
}

/// The accounting of one device. Get the shared one with [`MemoryTracker::for_device`].
#[derive(Debug)]
pub struct MemoryTracker {
    device: Device,
    state: Mutex<State>,
}

impl MemoryTracker {
    /// A fresh, unshared tracker (for tests and for backends that keep their own).
    pub fn new(device: Device) -> Arc<Self> {
        Arc::new(Self {
            device,
            state: Mutex::new(State::default()),
        })
    }

    /// The process-wide tracker of `device`; every tensor allocation is charged to it.
    pub fn for_device(device: &Device) -> Arc<Self> {
        static REGISTRY: OnceLock<Mutex<HashMap<Device, Arc<MemoryTracker>>>> = OnceLock::new();
        let reg = REGISTRY.get_or_init(Default::default);
        let mut map = reg.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(*device)
            .or_insert_with(|| MemoryTracker::new(*device))
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Accounting stays consistent even if a holder panicked: every update is one step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Charge `bytes` to `category`; the bytes are released when the guard drops.
    /// In strict mode this fails if it would exceed the category's reservation.
    pub fn allocate(self: &Arc<Self>, category: Category, bytes: usize) -> Result<Allocation> {
        let mut st = self.lock();
        let strict = st.strict;
        let c = &mut st.cats[category.index()];
        if strict && c.live + bytes > c.reserved {
            return Err(Error::OutOfReservation {
                device: self.device,
                category,
                bytes,
                live: c.live,
                reserved: c.reserved,
            });
        }
        c.live += bytes;
        c.peak = c.peak.max(c.live);
        c.allocations += 1;
        st.total_live += bytes;
        st.total_peak = st.total_peak.max(st.total_live);
        Ok(Allocation {
            tracker: Arc::clone(self),
            category,
            bytes,
        })
    }

    /// Add `bytes` to the planned budget of `category`.
    pub fn reserve(&self, category: Category, bytes: usize) {
        self.lock().cats[category.index()].reserved += bytes;
    }

    /// Reserve a planner budget ([`planned_bytes`]) for every category.
    pub fn reserve_plan(&self, mem: &planner::memory::RankMemory) {
        for (c, bytes) in planned_bytes(mem) {
            self.reserve(c, usize::try_from(bytes).unwrap_or(usize::MAX));
        }
    }

    /// Planned bytes of `category` (what a pooled backend pre-allocates).
    pub fn reserved(&self, category: Category) -> usize {
        self.lock().cats[category.index()].reserved
    }

    /// In strict mode an allocation beyond a category's reservation is an error.
    pub fn set_strict(&self, strict: bool) {
        self.lock().strict = strict;
    }

    /// Restart peak tracking from the current live bytes.
    pub fn reset_peak(&self) {
        let mut st = self.lock();
        for c in st.cats.iter_mut() {
            c.peak = c.live;
        }
        st.total_peak = st.total_live;
    }

    pub fn stats(&self) -> MemoryStats {
        let st = self.lock();
        MemoryStats {
            device: self.device,
            per_category: std::array::from_fn(|i| (Category::ALL[i], st.cats[i])),
            total_live: st.total_live,
            total_peak: st.total_peak,
        }
    }

    fn release(&self, category: Category, bytes: usize) {
        let mut st = self.lock();
        st.cats[category.index()].live -= bytes;
        st.total_live -= bytes;
    }
}

/// Bytes charged to a tracker; released on drop.
#[derive(Debug)]
pub struct Allocation {
    tracker: Arc<MemoryTracker>,
    category: Category,
    bytes: usize,
}

impl Allocation {
    pub fn category(&self) -> Category {
        self.category
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.tracker.release(self.category, self.bytes);
    }
}

thread_local! {
    static CURRENT: std::cell::Cell<Category> = const { std::cell::Cell::new(Category::Activations) };
}

/// The category new tensors on this thread are charged to.
pub fn current_category() -> Category {
    CURRENT.with(|c| c.get())
}

/// Charge tensors created on this thread to `category` until the guard drops.
pub fn scope(category: Category) -> CategoryScope {
    let prev = CURRENT.with(|c| c.replace(category));
    CategoryScope { prev }
}

/// Run `f` with `category` as the current one.
pub fn with_category<R>(category: Category, f: impl FnOnce() -> R) -> R {
    let _g = scope(category);
    f()
}

/// Restores the previous category on drop.
#[derive(Debug)]
#[must_use = "the category applies only while the guard is alive"]
pub struct CategoryScope {
    prev: Category,
}

impl Drop for CategoryScope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.prev));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn live_peak_and_release() {
        let t = MemoryTracker::new(Device::Cpu);
        let a = t.allocate(Category::Weights, 100).unwrap();
        let b = t.allocate(Category::Activations, 50).unwrap();
        let c = t.allocate(Category::Activations, 30).unwrap();
        drop(b);
        let s = t.stats();
        assert_eq!(s.get(Category::Weights).live, 100);
        assert_eq!(s.get(Category::Activations).live, 30);
        assert_eq!(s.get(Category::Activations).peak, 80);
        assert_eq!(s.total_peak, 180);
        assert_eq!(s.total_live, 130);
        drop((a, c));
        assert_eq!(t.stats().total_live, 0);
        t.reset_peak();
        assert_eq!(t.stats().total_peak, 0);
    }

    #[test]
    fn strict_reservation_refuses_unplanned_bytes() {
        let t = MemoryTracker::new(Device::Cpu);
        t.reserve(Category::KvCache, 1000);
        t.set_strict(true);
        let a = t.allocate(Category::KvCache, 600).unwrap();
        let err = t.allocate(Category::KvCache, 600).unwrap_err();
        assert!(matches!(
            err,
            Error::OutOfReservation {
                live: 600,
                reserved: 1000,
                ..
            }
        ));
        assert!(t.allocate(Category::Activations, 1).is_err());
        drop(a);
        let _b = t.allocate(Category::KvCache, 1000).unwrap();
        assert_eq!(t.stats().get(Category::KvCache).reserved, 1000);
    }

    #[test]
    fn planner_budget_becomes_reservations() {
        use planner::memory::{Component, Item, Phase, RankMemory};
        let item = |component, phase, bytes| Item {
            component,
            phase,
            bytes,
            detail: String::new(),
        };
        let mem = RankMemory {
            items: vec![
                item(Component::DitWeights, Phase::Resident, 1000),
                item(Component::KvNoisy, Phase::Resident, 300),
                item(Component::DitActivations, Phase::DitCall, 200),
                item(Component::VaeDecodeWorkspace, Phase::VaeDecode, 70),
                item(Component::LibraryWorkspace, Phase::DitCall, 50),
                item(Component::CudaContext, Phase::Resident, 5000),
            ],
            stream_after_startup: true,
        };
        let p = planned_bytes(&mem);
        assert_eq!(p[Category::Weights.index()].1, 1000);
        assert_eq!(p[Category::KvCache.index()].1, 300);
        assert_eq!(p[Category::Activations.index()].1, 200);
        // Workspace: max(DitCall 50, VaeDecode 70); the CUDA context is not tracked.
        assert_eq!(p[Category::Workspace.index()].1, 70);
        assert_eq!(p[Category::Communication.index()].1, 0);

        let t = MemoryTracker::new(Device::Cpu);
        t.reserve_plan(&mem);
        let a = t.allocate(Category::Activations, 250).unwrap();
        drop(a);
        let _w = t.allocate(Category::Weights, 900).unwrap();
        assert_eq!(
            t.stats().over_plan(),
            vec![(Category::Activations, 250, 200)]
        );
    }

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(current_category(), Category::Activations);
        {
            let _w = scope(Category::Weights);
            assert_eq!(current_category(), Category::Weights);
            with_category(Category::KvCache, || {
                assert_eq!(current_category(), Category::KvCache)
            });
            assert_eq!(current_category(), Category::Weights);
        }
        assert_eq!(current_category(), Category::Activations);
    }
}
