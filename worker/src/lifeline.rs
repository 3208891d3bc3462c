//! Ways the worker learns it must stop without being asked over gRPC.
//!
//! - Lifeline: the launcher holds the write end of our stdin and never writes. When the
//!   launcher dies, for any reason including SIGKILL, the kernel closes it and our read
//!   returns EOF. This also works where `PR_SET_PDEATHSIG` does not (another PID namespace,
//!   a launcher thread that exits).
//! - Signals: SIGTERM and SIGINT become a [`Stop::Signal`].

use std::io::Read;
use std::sync::Arc;

use crate::control::{Shared, Stop};

/// Watches stdin on a plain thread; EOF or a read error means the launcher is gone.
pub fn watch_stdin(shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("lifeline".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    // The launcher never writes; ignore anything that arrives.
                    Ok(_) => continue,
                }
            }
            shared.request_stop(Stop::LauncherGone);
            log!("lifeline closed: the launcher is gone");
        })?;
    Ok(())
}

/// Turns SIGTERM and SIGINT into stop requests. Must run inside the tokio runtime.
pub fn watch_signals(shared: Arc<Shared>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let signo = tokio::select! {
            _ = term.recv() => libc::SIGTERM,
            _ = int.recv() => libc::SIGINT,
        };
        shared.request_stop(Stop::Signal(signo));
        log!("received signal {signo}; stopping");
    });
    Ok(())
}

/// Names the main thread (what `ps -o comm` and `top` show), e.g. `lava-r3-dit`.
pub fn set_process_name(rank: u32, role: &str) {
    // The kernel keeps 15 bytes; longer names are cut, which is harmless.
    if let Ok(name) = std::ffi::CString::new(format!("lava-r{rank}-{role}")) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string that outlives the call.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
}
