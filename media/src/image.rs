//! Reference image → [3, H, W] pixels in [−1, 1] (model-spec §10.1).
//!
//! The reference runs `CenterCrop((H, W))(Resize(min(H, W))(pil_image))` with torchvision on a
//! PIL image, so the resize is Pillow's antialiased bilinear on 8-bit pixels. [`pil_resize_bilinear`]
//! re-implements Pillow's `Resample.c` (separable convolution, 22-bit fixed-point weights,
//! horizontal pass first, 8-bit intermediate) so PNG inputs give the reference's bytes exactly.
//! JPEG inputs can differ by a few levels where the decoders differ (zune-jpeg here,
//! libjpeg-turbo in Pillow); see docs/media.md.

use std::path::Path;

use image::{ImageFormat, RgbImage};
use planner::size::{AspectSource, Resolution, SizeArg, resolve};

use crate::error::{MediaError, Result};

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 − 8 − 2.
const PRECISION_BITS: u32 = 22;

/// The preprocessed reference image.
#[derive(Debug, Clone)]
pub struct ReferenceImage {
    /// Output resolution (multiples of 64 from the size search).
    pub resolution: Resolution,
    /// The decoded image's height and width.
    pub source_height: u32,
    pub source_width: u32,
    /// True when the resize enlarged the image (the source is smaller than the output).
    pub upscaled: bool,
    /// [3, H, W] row-major, channel-planar, in [−1, 1].
    pub pixels: Vec<f32>,
}

impl ReferenceImage {
    pub fn height(&self) -> usize {
        self.resolution.height as usize
    }
    pub fn width(&self) -> usize {
        self.resolution.width as usize
    }
}

/// Load a JPEG or PNG file as 8-bit RGB (alpha dropped, grey replicated, like PIL's
/// `convert('RGB')`). The format comes from the file's bytes, not its name, so a text file
/// named `.jpg` is reported as not an image.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| MediaError::io(path, e))?;
    decode_rgb(&bytes, path)
}

/// [`load_rgb`] on bytes already in memory; `path` names them in errors.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(MediaError::NotAnImage {
            path: path.into(),
            reason: "the file is empty".into(),
        });
    }
    let format = image::guess_format(bytes).map_err(|_| MediaError::NotAnImage {
        path: path.into(),
        reason: format!(
            "unrecognised leading bytes {:02x?}",
            &bytes[..bytes.len().min(8)]
        ),
    })?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png) {
        return Err(MediaError::NotAnImage {
            path: path.into(),
            reason: format!("{format:?} is not supported"),
        });
    }
    let img = image::load_from_memory_with_format(bytes, format).map_err(|e| {
        MediaError::ImageDecode {
            path: path.into(),
            reason: e.to_string(),
        }
    })?;
    Ok(img.to_rgb8())
}

/// Load, size-select (`planner::size::resolve` with the image's aspect), resize, centre-crop
/// and normalise a reference image.
pub fn load_reference_image(path: &Path, size: SizeArg) -> Result<ReferenceImage> {
    let img = load_rgb(path)?;
    prepare_reference_image(&img, size)
}

/// The §10.1 pipeline on an image already decoded.
pub fn prepare_reference_image(img: &RgbImage, size: SizeArg) -> Result<ReferenceImage> {
    let (sh, sw) = (img.height(), img.width());
    let resolution = resolve(
        size,
        AspectSource::Image {
            height: u64::from(sh),
            width: u64::from(sw),
        },
    )?;
    let (h, w) = (
        u32_of(resolution.height, "height")?,
        u32_of(resolution.width, "width")?,
    );
    let resized = torchvision_resize(img, h.min(w));
    let upscaled = resized.width() > sw || resized.height() > sh;
    let cropped = torchvision_center_crop(&resized, h, w);
    Ok(ReferenceImage {
        resolution,
        source_height: sh,
        source_width: sw,
        upscaled,
        pixels: to_signed_unit_chw(&cropped),
    })
}

fn u32_of(v: u64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| MediaError::ImageDecode {
        path: Default::default(),
        reason: format!("output {what} {v} out of range"),
    })
}

/// torchvision `Resize(size)` with an int on a PIL image: the shorter side becomes `size`, the
/// longer `int(size · long / short)`; bilinear with Pillow's antialiasing.
pub fn torchvision_resize(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (f64::from(size) * f64::from(long) / f64::from(short)) as u32;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    pil_resize_bilinear(img, nw, nh)
}

/// torchvision `CenterCrop((h, w))` on a PIL image: zero-pad first where the image is smaller
/// (left/top ⌊Δ/2⌋, right/bottom ⌈Δ/2⌉), then crop at offsets round((size − crop)/2) with
/// Python's round (half to even).
pub fn torchvision_center_crop(img: &RgbImage, h: u32, w: u32) -> RgbImage {
    let (iw, ih) = (img.width(), img.height());
    let pad_l = w.saturating_sub(iw) / 2;
    let pad_t = h.saturating_sub(ih) / 2;
    let (pw, ph) = (iw.max(w), ih.max(h));
    let top = round_half_even_half(ph - h);
    let left = round_half_even_half(pw - w);
    // Output pixel (x, y) is padded-image pixel (x + left, y + top), i.e. source pixel
    // (x + left − pad_l, y + top − pad_t) when inside the source, else black.
    let mut out = RgbImage::new(w, h);
    for y in 0..h {
        let sy = i64::from(y + top) - i64::from(pad_t);
        if sy < 0 || sy >= i64::from(ih) {
            continue;
        }
        for x in 0..w {
            let sx = i64::from(x + left) - i64::from(pad_l);
            if sx < 0 || sx >= i64::from(iw) {
                continue;
            }
            out.put_pixel(x, y, *img.get_pixel(sx as u32, sy as u32));
        }
    }
    out
}

/// Python's `int(round(d / 2.0))` for a non-negative integer d: halves go to the even neighbour.
fn round_half_even_half(d: u32) -> u32 {
    let q = d / 2;
    if d % 2 == 1 && q % 2 == 1 { q + 1 } else { q }
}

/// ToTensor (u8 / 255 in f32) then `· 2 − 1`, channel-planar [3, H, W].
pub fn to_signed_unit_chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * h * w];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = f32::from(px[c]) / 255.0 * 2.0 - 1.0;
        }
    }
    out
}

/// Per-output-pixel source window (first index, count) and fixed-point weights, as Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` with the bilinear (triangle) filter.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn precompute_coeffs(in_size: u32, out_size: u32) -> Coeffs {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0 × filterscale
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut weights = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) - xmin;
        let (xmin, xmax) = (xmin as usize, xmax.max(0) as usize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let w = (1.0 - t.abs()).max(0.0);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..xmax {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = v * f64::from(1u32 << PRECISION_BITS);
            row[x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's `Image.resize((w, h), Image.BILINEAR)` on an RGB image, byte for byte.
pub fn pil_resize_bilinear(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = (img.width(), img.height());
    if (iw, ih) == (w, h) || w == 0 || h == 0 || iw == 0 || ih == 0 {
        return if (iw, ih) == (w, h) {
            img.clone()
        } else {
            RgbImage::new(w, h)
        };
    }
    let src = img.as_raw();
    let horiz = precompute_coeffs(iw, w);
    let vert = precompute_coeffs(ih, h);
    // Rows of the source the vertical pass reads.
    let y_first = vert.bounds[0].0;
    let y_last = vert.bounds[h as usize - 1].0 + vert.bounds[h as usize - 1].1;
    let (tmp, tmp_w, row0) = if iw != w {
        let rows = y_last - y_first;
        let mut tmp = vec![0u8; rows * w as usize * 3];
        let half = 1i32 << (PRECISION_BITS - 1);
        for r in 0..rows {
            let srow = &src[(r + y_first) * iw as usize * 3..][..iw as usize * 3];
            for xx in 0..w as usize {
                let (xmin, n) = horiz.bounds[xx];
                let k = &horiz.weights[xx * horiz.ksize..][..n];
                let mut ss = [half; 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &srow[(x + xmin) * 3..][..3];
                    for c in 0..3 {
                        ss[c] += i32::from(p[c]) * kx;
                    }
                }
                let o = &mut tmp[(r * w as usize + xx) * 3..][..3];
                for c in 0..3 {
                    o[c] = clip8(ss[c]);
                }
            }
        }
        (tmp, w as usize, y_first)
    } else {
        (src.clone(), iw as usize, 0)
    };
    if ih == h {
        // Only the horizontal pass was needed; tmp holds all rows.
        let mut out = RgbImage::new(w, h);
        out.copy_from_slice(&tmp);
        return out;
    }
    let mut out = RgbImage::new(tmp_w as u32, h);
    let buf: &mut [u8] = &mut out;
    let half = 1i32 << (PRECISION_BITS - 1);
    for yy in 0..h as usize {
        let (ymin, n) = vert.bounds[yy];
        let k = &vert.weights[yy * vert.ksize..][..n];
        for xx in 0..tmp_w {
            let mut ss = [half; 3];
            for (y, &ky) in k.iter().enumerate() {
                let p = &tmp[((y + ymin - row0) * tmp_w + xx) * 3..][..3];
                for c in 0..3 {
                    ss[c] += i32::from(p[c]) * ky;
                }
            }
            let o = &mut buf[(yy * tmp_w + xx) * 3..][..3];
            for c in 0..3 {
                o[c] = clip8(ss[c]);
            }
        }
    }
    out
}
