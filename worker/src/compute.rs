//! The compute thread: the one thread that owns this rank's device.
//!
//! Device contexts and communicators are bound to the thread that created them and are not
//! `Send`-friendly, so the control plane (tokio, its own threads) never touches them: it sends
//! a [`Command`] over a channel and awaits the reply on a oneshot.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The device this rank computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU reference backend.
    Cpu,
    /// A CUDA device by ordinal on this node.
    Cuda(u32),
}

impl Device {
    /// Parses `cpu` or `cuda:N`.
    pub fn parse(text: &str) -> Result<Device, String> {
        if text == "cpu" {
            return Ok(Device::Cpu);
        }
        match text.strip_prefix("cuda:").map(str::parse::<u32>) {
            Some(Ok(ordinal)) => Ok(Device::Cuda(ordinal)),
            _ => Err(format!("device {text:?} is neither `cpu` nor `cuda:N`")),
        }
    }

    /// `cpu` or `cuda`.
    pub fn kind(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    /// Ordinal on the node (0 for the CPU).
    pub fn ordinal(self) -> u32 {
        match self {
            Device::Cpu => 0,
            Device::Cuda(ordinal) => ordinal,
        }
    }
}

/// Result of a device probe.
#[derive(Debug)]
pub struct Probe {
    /// What was checked and how it went.
    pub detail: String,
}

/// Work for the compute thread.
#[derive(Debug)]
pub enum Command {
    /// Prove the thread is alive and its device answers.
    Probe(oneshot::Sender<Probe>),
    /// Leave the loop.
    Stop,
}

/// The control plane's handle on the compute thread.
#[derive(Debug)]
pub struct Compute {
    tx: mpsc::Sender<Command>,
    join: Option<JoinHandle<()>>,
}

impl Compute {
    /// Starts the compute thread for `device`. A CUDA device in a build without the `cuda`
    /// feature is refused here, before the rank registers.
    pub fn start(rank: u32, device: Device) -> Result<Compute, String> {
        if let Device::Cuda(_) = device
            && !cfg!(feature = "cuda")
        {
            return Err(
                "this lava-worker was built without the `cuda` feature; use --device cpu".into(),
            );
        }
        let (tx, rx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name(format!("compute-r{rank}"))
            .spawn(move || run(device, rx))
            .map_err(|e| format!("starting the compute thread: {e}"))?;
        Ok(Compute {
            tx,
            join: Some(join),
        })
    }

    /// A sender for the control plane's handlers.
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }

    /// Asks the thread to stop and waits up to `timeout` for it.
    pub fn stop(mut self, timeout: Duration) -> bool {
        // Send fails only when the thread is already gone, which is what we want.
        let _ = self.tx.send(Command::Stop);
        let Some(join) = self.join.take() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while !join.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        join.join().is_ok()
    }
}

fn run(device: Device, rx: mpsc::Receiver<Command>) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Probe(reply) => {
                // The receiver may have given up (timeout); nothing to do then.
                let _ = reply.send(probe(device));
            }
            Command::Stop => break,
        }
    }
}

/// The device check of an expensive health probe. On the CPU backend the thread answering is
/// the check; a CUDA build would allocate and synchronise on the device here.
fn probe(device: Device) -> Probe {
    Probe {
        detail: format!(
            "{}:{} compute thread answered",
            device.kind(),
            device.ordinal()
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        assert_eq!(Device::parse("cuda:3"), Ok(Device::Cuda(3)));
        assert!(Device::parse("cuda").is_err());
        assert!(Device::parse("gpu:1").is_err());
    }

    #[test]
    fn probe_round_trips_and_stop_joins() {
        let compute = Compute::start(0, Device::Cpu).unwrap();
        let (tx, rx) = oneshot::channel();
        compute.sender().send(Command::Probe(tx)).unwrap();
        let probe = rx.blocking_recv().unwrap();
        assert!(probe.detail.starts_with("cpu:0"), "{}", probe.detail);
        assert!(compute.stop(Duration::from_secs(5)));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_device_is_refused_without_the_feature() {
        let err = Compute::start(0, Device::Cuda(0)).unwrap_err();
        assert!(err.contains("cuda"), "{err}");
    }
}
