//! `--size` and the output resolution (model-spec §10.1).
//!
//! In LiveAvatar `--size "704*384"` selects a target pixel *area*; the reference image's aspect
//! ratio then decides H×W, rounded to multiples of 64. lava keeps that meaning by default and
//! also accepts `704x384`. `--exact-size` takes W×H literally instead (multiples of 16: VAE
//! stride 8 × patch 2), which is how the hard-coded "720×400" buffers of the reference were sized.

use serde::Serialize;

use crate::error::{PlanError, Result};

/// A parsed `--size`: width × height as written (W*H, as in Wan's SIZE_CONFIGS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SizeArg {
    pub width: u64,
    pub height: u64,
}

impl SizeArg {
    /// Accepts `704*384`, `704x384` and `704X384`; nothing else (no spaces, no other separators).
    pub fn parse(input: &str) -> Result<Self> {
        let bad = |reason: &str| PlanError::Size {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = input.split(['*', 'x', 'X']).collect();
        if parts.len() != 2 {
            return Err(bad("expected WIDTH*HEIGHT or WIDTHxHEIGHT, e.g. 704*384"));
        }
        let num = |s: &str| -> Result<u64> {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit()) {
                return Err(bad(
                    "width and height must be plain positive integers, e.g. 704*384",
                ));
            }
            s.parse::<u64>().map_err(|_| bad("number too large"))
        };
        let (width, height) = (num(parts[0])?, num(parts[1])?);
        if width == 0 || height == 0 {
            return Err(bad("width and height must be at least 1"));
        }
        if width > 16384 || height > 16384 {
            return Err(bad("width and height must be at most 16384"));
        }
        Ok(Self { width, height })
    }

    pub fn area(&self) -> u64 {
        self.width * self.height
    }
}

/// Where the aspect ratio came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AspectSource {
    /// The reference image's pixel size (height, width).
    Image { height: u64, width: u64 },
    /// `--aspect W:H`.
    Aspect { width: u64, height: u64 },
    /// No image and no `--aspect`: the size string's own W:H.
    SizeString,
    /// `--exact-size`: W×H taken literally.
    Exact,
}

/// The effective output resolution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolution {
    pub height: u64,
    pub width: u64,
    pub size: SizeArg,
    pub source: AspectSource,
}

/// Parse `--aspect W:H`.
pub fn parse_aspect(input: &str) -> Result<(u64, u64)> {
    let bad = || PlanError::Aspect {
        input: input.to_string(),
    };
    let (w, h) = input.split_once(':').ok_or_else(bad)?;
    let p = |s: &str| {
        s.parse::<u64>()
            .ok()
            .filter(|v| *v > 0 && *v <= 100_000 && s.chars().all(|c| c.is_ascii_digit()))
    };
    Ok((p(w).ok_or_else(bad)?, p(h).ok_or_else(bad)?))
}

/// Output H×W for an area string and an image of `height × width` pixels: LiveAvatar's
/// size search with divisor 64 (model-spec §10.1 step 2).
pub fn size_less_than_area(height: u64, width: u64, area: u64) -> (u64, u64) {
    const DIV: u64 = 64;
    let (h, w, a) = (height as f64, width as f64, area as f64);
    let (lo, hi) = if height * width <= area {
        (0.1, 1.0)
    } else {
        // Lower scale: (h·s + 63)(w·s + 63) = A.
        let d = (DIV - 1) as f64;
        let qa = h * w;
        let qb = d * (h + w);
        let qc = d * d - a;
        (
            (-qb + (qb * qb - 4.0 * qa * qc).sqrt()) / (2.0 * qa),
            (a / (h * w)).sqrt(),
        )
    };
    for i in 0..100 {
        let scale = hi - (hi - lo) * i as f64 / 100.0;
        let nh = (h * scale) as u64;
        let nw = (w * scale) as u64;
        let (ph, pw) = (nh.div_ceil(DIV) * DIV, nw.div_ceil(DIV) * DIV);
        if ph * pw <= area && ph > 0 && pw > 0 {
            return (ph, pw);
        }
    }
    // Fallback: multiples of 64 on the aspect ratio, clamped to the original size.
    let s = (a / (h * w)).sqrt();
    let fh = (((h * s) as u64) / DIV).max(1) * DIV;
    let fw = (((w * s) as u64) / DIV).max(1) * DIV;
    (fh.min(height.max(DIV)), fw.min(width.max(DIV)))
}

/// Resolve the output resolution from `--size` and the aspect source (image, `--aspect`, or
/// the size string itself), or literally with `exact`.
pub fn resolve(size: SizeArg, source: AspectSource) -> Result<Resolution> {
    let (height, width) = match &source {
        AspectSource::Exact => (size.height, size.width),
        AspectSource::Image { height, width } => size_less_than_area(*height, *width, size.area()),
        AspectSource::Aspect { width, height } => virtual_image(*width, *height, size.area()),
        AspectSource::SizeString => virtual_image(size.width, size.height, size.area()),
    };
    if height % 16 != 0 || width % 16 != 0 {
        return Err(PlanError::Size {
            input: format!("{}*{}", size.width, size.height),
            reason: format!(
                "resolves to H×W = {height}×{width}, which is not a multiple of 16 (VAE stride 8 × patch 2)"
            ),
        });
    }
    if height < 64 || width < 64 {
        return Err(PlanError::Size {
            input: format!("{}*{}", size.width, size.height),
            reason: format!("resolves to H×W = {height}×{width}; both sides must be at least 64"),
        });
    }
    Ok(Resolution {
        height,
        width,
        size,
        source,
    })
}

/// An image of aspect `aw:ah` whose area is (about) the target, then the same search: what a
/// reference image of that shape would give.
fn virtual_image(aw: u64, ah: u64, area: u64) -> (u64, u64) {
    let s = (area as f64 / (aw as f64 * ah as f64)).sqrt();
    let (h, w) = (
        ((ah as f64) * s).round() as u64,
        ((aw as f64) * s).round() as u64,
    );
    size_less_than_area(h.max(1), w.max(1), area)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separators_are_equivalent() {
        let a = SizeArg::parse("704*384").unwrap();
        assert_eq!(a, SizeArg::parse("704x384").unwrap());
        assert_eq!(a, SizeArg::parse("704X384").unwrap());
        assert_eq!((a.width, a.height), (704, 384));
    }

    #[test]
    fn malformed_sizes_are_errors() {
        for s in [
            "704-384",
            "704 * 384",
            "abc",
            "0*384",
            "704*0",
            "704*384*2",
            "",
            "*384",
            "704*",
            "-704*384",
            "7.5*384",
        ] {
            assert!(SizeArg::parse(s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn example_image_gives_384x704() {
        // The shipped example images are 720 wide × 400 high (model-spec §10.1).
        for area in ["720*400", "704*384"] {
            let s = SizeArg::parse(area).unwrap();
            let r = resolve(
                s,
                AspectSource::Image {
                    height: 400,
                    width: 720,
                },
            )
            .unwrap();
            assert_eq!((r.height, r.width), (384, 704), "{area}");
            let r = resolve(
                s,
                AspectSource::Image {
                    height: 720,
                    width: 400,
                },
            )
            .unwrap();
            assert_eq!((r.height, r.width), (704, 384), "{area} portrait");
        }
    }

    #[test]
    fn spec_table_10_1() {
        // (area, aspect W:H, expected H×W) from model-spec §10.1's table.
        let cases = [
            ("720*400", (1, 1), (512, 512)),
            ("720*400", (4, 3), (448, 640)),
            ("704*384", (1, 1), (512, 512)),
            ("704*384", (4, 3), (448, 576)),
            ("688*368", (16, 9), (384, 640)),
            ("688*368", (1, 1), (448, 448)),
            ("688*368", (4, 3), (384, 512)),
            ("384*256", (16, 9), (256, 384)),
            ("384*256", (1, 1), (256, 256)),
        ];
        for (area, (aw, ah), want) in cases {
            let r = resolve(
                SizeArg::parse(area).unwrap(),
                AspectSource::Aspect {
                    width: aw,
                    height: ah,
                },
            )
            .unwrap();
            assert_eq!((r.height, r.width), want, "{area} at {aw}:{ah}");
        }
    }

    #[test]
    fn exact_size_needs_multiples_of_16() {
        let r = resolve(SizeArg::parse("720x400").unwrap(), AspectSource::Exact).unwrap();
        assert_eq!((r.height, r.width), (400, 720));
        assert!(resolve(SizeArg::parse("700x400").unwrap(), AspectSource::Exact).is_err());
    }
}
