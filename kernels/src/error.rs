//! The one error type of the `kernels` crate.

/// Errors of kernel loading, launches, cuBLASLt and argument checks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // === CUDA libraries ===
    /// A CUDA driver call or kernel launch failed.
    #[error("CUDA driver: {op}: {source}")]
    Driver {
        op: &'static str,
        source: cudarc::driver::DriverError,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt: {op}: {source}")]
    Cublas {
        op: &'static str,
        source: cudarc::cublaslt::result::CublasError,
    },
    /// A shared library could not be loaded; `hint` says how to fix it.
    #[error("CUDA library {lib} not found: {hint}")]
    LibraryMissing { lib: &'static str, hint: String },
    /// An embedded kernel module could not be loaded (neither cubin nor PTX).
    #[error("loading kernel module {module}: cubin: {cubin}; PTX: {ptx}")]
    ModuleLoad {
        module: &'static str,
        cubin: cudarc::driver::DriverError,
        ptx: cudarc::driver::DriverError,
    },

    // === Arguments ===
    /// An operand would be read or written past its buffer.
    #[error("{op}: operand {operand} needs {need} bytes, buffer has {have}")]
    OutOfBounds {
        op: &'static str,
        operand: &'static str,
        need: usize,
        have: usize,
    },
    /// A launcher was called with arguments it does not support.
    #[error("{op}: {msg}")]
    Unsupported { op: &'static str, msg: String },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// `.w(op)`: wrap a driver result with the name of the call.
pub(crate) trait DriverExt<T> {
    fn w(self, op: &'static str) -> Result<T>;
}

impl<T> DriverExt<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn w(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Driver { op, source })
    }
}

impl<T> DriverExt<T> for std::result::Result<T, cudarc::cublaslt::result::CublasError> {
    fn w(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Cublas { op, source })
    }
}
