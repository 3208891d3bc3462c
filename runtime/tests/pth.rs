//! The `.pth` reader on small archives written by torch.save (tests/fixtures/pth, made by
//! tests/reference/make_golden_encoders.py pth): dtypes, strided views, zip64, rejections.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use runtime::pth::PthFile;
use runtime::{DType, Device, Result};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pth")
        .join(name)
}

/// base = arange(24).reshape(4, 6) / 8
fn base(r: usize, c: usize) -> f32 {
    (r * 6 + c) as f32 / 8.0
}

fn check_views(file: &str) -> Result<()> {
    let f = PthFile::open(fixture(file))?;
    let dev = Device::Cpu;
    let names: Vec<&str> = f.names().collect();
    assert_eq!(
        names,
        ["f32", "bf16", "f16", "t", "rows", "scalar", "param"]
    );
    let all: Vec<f32> = (0..24).map(|i| base(i / 6, i % 6)).collect();
    let t = f.tensor("f32", &dev)?;
    assert_eq!((t.dims(), t.dtype()), (&[4usize, 6][..], DType::F32));
    assert_eq!(t.to_vec_f32()?, all);
    let t = f.tensor("bf16", &dev)?;
    assert_eq!(t.dtype(), DType::BF16);
    assert_eq!(
        t.to_vec_f32()?,
        all.iter().map(|v| v - 1.0).collect::<Vec<_>>()
    );
    let t = f.tensor("f16", &dev)?;
    assert_eq!(t.dtype(), DType::F16);
    assert_eq!(
        t.to_vec_f32()?,
        all.iter().map(|v| v + 0.5).collect::<Vec<_>>()
    );
    // A transpose shares the storage with stride (1, 6).
    let info = f.info("t").unwrap();
    assert_eq!((info.stride.as_slice(), info.offset), (&[1usize, 6][..], 0));
    let t = f.tensor("t", &dev)?;
    assert_eq!(t.dims(), &[6, 4]);
    let want: Vec<f32> = (0..24).map(|i| base(i % 4, i / 4)).collect();
    assert_eq!(t.to_vec_f32()?, want);
    // A row slice is an offset into the same storage.
    assert_eq!(f.info("rows").unwrap().offset, 6);
    assert_eq!(f.tensor("rows", &dev)?.to_vec_f32()?, all[6..18].to_vec());
    let s = f.tensor("scalar", &dev)?;
    assert_eq!((s.dims(), s.to_vec_f32()?), (&[][..], vec![2.5]));
    let p = f.tensor("param", &dev)?;
    assert_eq!(p.dims(), &[4, 1]);
    assert_eq!(p.to_vec_f32()?, vec![0.0, 0.75, 1.5, 2.25]);
    assert!(f.tensor("missing", &dev).is_err());
    Ok(())
}

#[test]
fn pth_reads_dtypes_and_views() -> Result<()> {
    check_views("views.pth")
}

#[test]
fn pth_reads_zip64_archives() -> Result<()> {
    check_views("zip64.pth")
}

fn err_of(name: &str) -> String {
    PthFile::open(fixture(name))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

#[test]
fn pth_rejects_what_it_does_not_understand() {
    let e = err_of("int64.pth");
    assert!(e.contains("LongStorage"), "{e}");
    let e = err_of("not_tensor.pth");
    assert!(e.contains("step") && e.contains("not a tensor"), "{e}");
    let e = err_of("deflated.pth");
    assert!(e.contains("compressed"), "{e}");
    // Not a zip at all (this test file), and a missing file.
    let e = PthFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pth.rs"))
        .err()
        .map(|e| e.to_string());
    assert!(e.is_some_and(|e| e.contains("end-of-central-directory")));
    assert!(PthFile::open(fixture("nope.pth")).is_err());
}
