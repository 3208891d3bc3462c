//! Layout ops (exact copies) and host byte access, on every device, against index
//! arithmetic written out in the test.

#![allow(clippy::unwrap_used)]

use runtime::device::set_poison_outputs;
use runtime::testing::{Rng, assert_close};
use runtime::{DType, Device, Result, Tensor, test_device};

fn setup(seed: u64) -> Rng {
    set_poison_outputs(true);
    Rng::new(seed)
}

fn layout_ops(dev: &Device) -> Result<()> {
    let mut rng = setup(11);
    let dims = [2usize, 3, 4, 5];
    for dt in [DType::F32, DType::BF16, DType::F8E4M3] {
        let (x, v) = rng.randn(dims, 1.0, dt, dev)?;
        let at = |i: [usize; 4]| v[((i[0] * 3 + i[1]) * 4 + i[2]) * 5 + i[3]];
        // narrow
        let n = x.narrow(2, 1, 2)?;
        let mut want = Vec::new();
        for a in 0..2 {
            for b in 0..3 {
                for c in 1..3 {
                    for d in 0..5 {
                        want.push(at([a, b, c, d]));
                    }
                }
            }
        }
        assert_eq!(n.dims(), &[2, 3, 2, 5]);
        assert_close("narrow", &n, &want, 0.0)?;
        // permute
        let p = x.permute(&[3, 1, 0, 2])?;
        let mut want = Vec::new();
        for d in 0..5 {
            for b in 0..3 {
                for a in 0..2 {
                    for c in 0..4 {
                        want.push(at([a, b, c, d]));
                    }
                }
            }
        }
        assert_eq!(p.dims(), &[5, 3, 2, 4]);
        assert_close("permute", &p, &want, 0.0)?;
        assert_close("transpose", &x.transpose(1, 3)?.transpose(1, 3)?, &v, 0.0)?;
        // cat and chunk invert each other
        let parts = x.chunk(3, 1)?;
        let refs: Vec<&Tensor> = parts.iter().collect();
        assert_close("cat(chunk)", &Tensor::cat(&refs, 1)?, &v, 0.0)?;
        let c = Tensor::cat(&[&x, &x.narrow(3, 0, 2)?], 3)?;
        let mut want = Vec::new();
        for a in 0..2 {
            for b in 0..3 {
                for cc in 0..4 {
                    for d in 0..7 {
                        want.push(at([a, b, cc, if d < 5 { d } else { d - 5 }]));
                    }
                }
            }
        }
        assert_close("cat", &c, &want, 0.0)?;
        // slice_set into a poisoned destination: only the target range changes.
        let dst = Tensor::zeros((2, 3, 9, 5), dt, dev)?;
        dst.poison()?;
        dst.slice_set(&x, 2, 3)?;
        let got = dst.to_vec_f32()?;
        for a in 0..2 {
            for b in 0..3 {
                for cc in 0..9 {
                    for d in 0..5 {
                        let g = got[((a * 3 + b) * 9 + cc) * 5 + d];
                        if (3..7).contains(&cc) {
                            assert_eq!(g, at([a, b, cc - 3, d]));
                        } else {
                            assert!(g.is_nan());
                        }
                    }
                }
            }
        }
        // index_select
        let ids = [3u32, 0, 3, 1];
        let s = x.index_select(&ids, 2)?;
        let mut want = Vec::new();
        for a in 0..2 {
            for b in 0..3 {
                for &i in &ids {
                    for d in 0..5 {
                        want.push(at([a, b, i as usize, d]));
                    }
                }
            }
        }
        assert_close("index_select", &s, &want, 0.0)?;
        assert!(x.index_select(&[4], 2).is_err());
        // upsample nearest ×(2, 3) on the last two dims
        let u = x.upsample_nearest2d(2, 3)?;
        assert_eq!(u.dims(), &[2, 3, 8, 15]);
        let mut want = Vec::new();
        for a in 0..2 {
            for b in 0..3 {
                for y in 0..8 {
                    for z in 0..15 {
                        want.push(at([a, b, y / 2, z / 3]));
                    }
                }
            }
        }
        assert_close("upsample_nearest2d", &u, &want, 0.0)?;
        // broadcast_as repeats size-1 dims and prepends missing ones; stack adds a dim
        let one = x.narrow(1, 2, 1)?; // [2, 1, 4, 5]
        let e = one.broadcast_as((3, 2, 6, 4, 5))?;
        let mut want = Vec::new();
        for _ in 0..3 {
            for a in 0..2 {
                for _ in 0..6 {
                    for c in 0..4 {
                        for d in 0..5 {
                            want.push(at([a, 2, c, d]));
                        }
                    }
                }
            }
        }
        assert_close("broadcast_as", &e, &want, 0.0)?;
        assert!(x.broadcast_as((2, 6, 4, 5)).is_err());
        let st = Tensor::stack(&[&x, &x], 1)?;
        assert_eq!(st.dims(), &[2, 2, 3, 4, 5]);
        assert_close("stack", &st.narrow(1, 1, 1)?, &v, 0.0)?;
        // reshape shares the buffer
        let r = x.reshape((6, 20))?;
        assert!(r.same_storage(&x));
        assert!(x.reshape((7, 20)).is_err());
    }
    Ok(())
}
test_device!(layout_ops, layout_ops_cpu, layout_ops_cuda);

fn host_bytes_round_trip(dev: &Device) -> Result<()> {
    let mut rng = setup(12);
    let (x, v) = rng.randn((3, 7), 1.0, DType::BF16, dev)?;
    let bytes = x.to_bytes()?;
    assert_eq!(bytes.len(), 42);
    let y = Tensor::from_bytes(&bytes, (3, 7), DType::BF16, dev)?;
    assert_close("from_bytes", &y, &v, 0.0)?;
    let z = Tensor::zeros((3, 7), DType::BF16, dev)?;
    z.copy_from_bytes(&bytes)?;
    assert_close("copy_from_bytes", &z, &v, 0.0)?;
    assert!(z.copy_from_bytes(&bytes[1..]).is_err());
    let h = x.to_device(&Device::Cpu)?;
    assert_eq!(h.with_cpu_storage(|s| s.as_bytes().to_vec())?, bytes);
    Ok(())
}
test_device!(
    host_bytes_round_trip,
    host_bytes_round_trip_cpu,
    host_bytes_round_trip_cuda
);
