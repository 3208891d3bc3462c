//! Feeding ffmpeg's inputs from threads: a queue per input, so the caller never blocks on
//! ffmpeg (which reads its inputs interleaved and would otherwise deadlock a single thread
//! that writes video while ffmpeg waits for audio, or the reverse).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{MediaError, Result};

/// One input of ffmpeg fed by a thread. Buffers are queued without bound (they are frames
/// already in memory); a write error (ffmpeg gone) is kept and reported on the next send.
pub(crate) struct Feeder {
    tx: Option<Sender<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
    /// Set once the sink is open (a FIFO's open blocks until ffmpeg opens the other end).
    opened: Arc<AtomicBool>,
}

impl Feeder {
    /// Feed an already open sink (ffmpeg's stdin).
    pub(crate) fn new<W: Write + Send + 'static>(sink: W) -> Self {
        Self::spawn(move || Ok(sink))
    }

    /// Feed a FIFO; opening it happens on the thread.
    pub(crate) fn fifo(path: PathBuf) -> Self {
        Self::spawn(move || std::fs::OpenOptions::new().write(true).open(&path))
    }

    fn spawn<W, F>(open: F) -> Self
    where
        W: Write + Send + 'static,
        F: FnOnce() -> std::io::Result<W> + Send + 'static,
    {
        let (tx, rx) = channel::<Vec<u8>>();
        let error = Arc::new(Mutex::new(None));
        let opened = Arc::new(AtomicBool::new(false));
        let (err, op) = (Arc::clone(&error), Arc::clone(&opened));
        let thread = std::thread::spawn(move || {
            let set = |e: String| {
                if let Ok(mut g) = err.lock() {
                    g.get_or_insert(e);
                }
            };
            let mut sink = match open() {
                Ok(s) => s,
                Err(e) => return set(format!("opening: {e}")),
            };
            op.store(true, Ordering::SeqCst);
            for buf in rx {
                if let Err(e) = sink.write_all(&buf).and_then(|()| sink.flush()) {
                    return set(e.to_string());
                }
            }
        });
        Self {
            tx: Some(tx),
            thread: Some(thread),
            error,
            opened,
        }
    }

    pub(crate) fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|g| g.clone())
    }

    pub(crate) fn send(&self, buf: Vec<u8>) -> Result<()> {
        if let Some(e) = self.error() {
            return Err(MediaError::Ffmpeg(format!("writing to ffmpeg: {e}")));
        }
        let Some(tx) = &self.tx else {
            return Err(MediaError::Video("the writer is closed".into()));
        };
        tx.send(buf)
            .map_err(|_| MediaError::Ffmpeg("writing to ffmpeg: the feeder stopped".into()))
    }

    /// No more input: the thread writes what is queued, then closes the sink (EOF for ffmpeg).
    pub(crate) fn close(&mut self) {
        self.tx.take();
    }

    /// Wait for the thread. `fifo`: if ffmpeg exited without opening it, the thread is still
    /// blocked in open; a non-blocking open of the read end releases it.
    pub(crate) fn join(&mut self, fifo: Option<&Path>) {
        self.close();
        if let (Some(p), false) = (fifo, self.opened.load(Ordering::SeqCst)) {
            let _ = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A FIFO in the temp folder, removed on drop.
pub(crate) struct Fifo {
    pub(crate) path: PathBuf,
}

impl Fifo {
    pub(crate) fn new(tag: &str) -> Result<Self> {
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("lava-{tag}-{}-{n}.fifo", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| MediaError::Video(format!("FIFO path: {e}")))?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        if rc != 0 {
            return Err(MediaError::io(&path, std::io::Error::last_os_error()));
        }
        Ok(Self { path })
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
