//! Named, shape-checked weight access for the encoders and the VAE, over any tensor source
//! (a `.pth` archive, a safetensors file), so model code mirrors the checkpoint keys.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::memory::{Category, scope};
use crate::pth::PthFile;
use crate::weights::{CheckpointErrorKind, SafetensorsFile};
use crate::{DType, Device, Error, Result, Tensor};

/// Where tensors come from.
pub trait TensorSource: Sync {
    /// The tensor in its stored dtype; a missing name is an error naming it.
    fn load(&self, name: &str, device: &Device) -> Result<Tensor>;
    fn names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    /// File name for error messages.
    fn origin(&self) -> String;
}

impl TensorSource for PthFile {
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.tensor(name, device)
    }
    fn names(&self) -> Vec<String> {
        PthFile::names(self).map(str::to_string).collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }
    fn origin(&self) -> String {
        self.path().display().to_string()
    }
}

impl TensorSource for SafetensorsFile {
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.tensor(name, device)
    }
    fn names(&self) -> Vec<String> {
        SafetensorsFile::names(self).map(str::to_string).collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }
    fn origin(&self) -> String {
        self.path().display().to_string()
    }
}

/// A prefix into a source; every `get` records the name so [`Vars::check_all_used`] can
/// reject checkpoints with tensors the model does not know.
#[derive(Clone)]
pub struct Vars<'a> {
    src: &'a dyn TensorSource,
    used: &'a Mutex<BTreeSet<String>>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Vars<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vars({} @ {:?})", self.src.origin(), self.prefix)
    }
}

impl std::fmt::Debug for VarsRoot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VarsRoot({})", self.src.origin())
    }
}

/// Owns the prefix strings and the used-name set of one load.
pub struct VarsRoot<'a> {
    src: &'a dyn TensorSource,
    used: Mutex<BTreeSet<String>>,
    dtype: DType,
    device: Device,
}

impl<'a> VarsRoot<'a> {
    /// `dtype`: the dtype weights are converted to (bf16 in production, f32 for golden tests).
    pub fn new(src: &'a dyn TensorSource, dtype: DType, device: Device) -> Self {
        Self {
            src,
            used: Mutex::new(BTreeSet::new()),
            dtype,
            device,
        }
    }

    pub fn vars(&self) -> Vars<'_> {
        Vars {
            src: self.src,
            used: &self.used,
            prefix: String::new(),
            dtype: self.dtype,
            device: self.device,
        }
    }

    /// Whether the source holds `name` (full name).
    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(name)
    }

    /// Err if the source holds tensors no `get` asked for (ignoring names `ignore` accepts).
    pub fn check_all_used(&self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.lock().map_err(|_| Error::LockPoisoned)?;
        let extra: Vec<String> = self
            .src
            .names()
            .into_iter()
            .filter(|n| !used.contains(n) && !ignore(n))
            .collect();
        match extra.first() {
            None => Ok(()),
            Some(name) => Err(Error::Checkpoint {
                path: self.src.origin(),
                kind: CheckpointErrorKind::ExtraTensor {
                    name: name.clone(),
                    shape: Vec::new(),
                    more: extra.len() - 1,
                },
            }),
        }
    }
}

impl<'a> Vars<'a> {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }

    /// Full name of `name` under this prefix.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The builder of sub-module `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Vars<'a> {
        Vars {
            prefix: self.name(&name.to_string()),
            ..self.clone()
        }
    }

    /// Tensor `name` with exactly `shape`, in the model dtype (charged to the weights).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// As [`Vars::get`] in an explicit dtype (e.g. f32 norm weights).
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let full = self.name(name);
        let _g = scope(Category::Weights);
        if !self.src.contains(&full) {
            return Err(Error::Checkpoint {
                path: self.src.origin(),
                kind: CheckpointErrorKind::MissingTensor {
                    name: full,
                    expected: shape.to_vec(),
                    more: 0,
                },
            });
        }
        let t = self.src.load(&full, &self.device)?;
        if t.dims() != shape {
            return Err(Error::Checkpoint {
                path: self.src.origin(),
                kind: CheckpointErrorKind::ShapeMismatch {
                    name: full,
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                },
            });
        }
        self.used
            .lock()
            .map_err(|_| Error::LockPoisoned)?
            .insert(full);
        if t.dtype() == dtype {
            Ok(t)
        } else {
            t.to_dtype(dtype)
        }
    }
}
