//! Reference-image preprocessing (model-spec §10.1) against Pillow goldens and the planner.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};

use image::RgbImage;
use media::MediaError;
use media::image::{
    load_reference_image, load_rgb, pil_resize_bilinear, torchvision_center_crop,
    torchvision_resize,
};
use planner::size::{AspectSource, SizeArg, resolve};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lava-media-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn assert_same(got: &RgbImage, want: &RgbImage, what: &str) {
    assert_eq!(got.dimensions(), want.dimensions(), "{what}: size");
    let diffs = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(diffs, 0, "{what}: {diffs} bytes differ from Pillow");
}

#[test]
fn bilinear_resize_matches_pillow_byte_for_byte() {
    let src = load_rgb(&data("boy_240x134.png")).unwrap();
    for (w, h) in [(97, 61), (313, 173), (240, 50), (31, 134), (7, 5)] {
        let want = load_rgb(&data(&format!("pil_bilinear_{w}x{h}.png"))).unwrap();
        assert_same(&pil_resize_bilinear(&src, w, h), &want, &format!("{w}x{h}"));
    }
}

#[test]
fn resize_and_center_crop_match_torchvision_on_pil() {
    let src = load_rgb(&data("boy_240x134.png")).unwrap();
    // Downscale + crop, upscale + crop, upscale + zero padding (229 wide into 320).
    for (h, w) in [(64u32, 128u32), (192, 128), (128, 320)] {
        let want = load_rgb(&data(&format!("pil_pipeline_{h}x{w}.png"))).unwrap();
        let got = torchvision_center_crop(&torchvision_resize(&src, h.min(w)), h, w);
        assert_same(&got, &want, &format!("{h}x{w}"));
    }
}

#[test]
fn center_crop_rounds_half_to_even_like_python() {
    // 5 wide → 2: offset round(1.5) = 2; 7 wide → 2: offset round(2.5) = 2.
    let img = RgbImage::from_fn(7, 1, |x, _| image::Rgb([x as u8, 0, 0]));
    let c = torchvision_center_crop(&img, 1, 2);
    assert_eq!((c.get_pixel(0, 0)[0], c.get_pixel(1, 0)[0]), (2, 3));
    let img5 = RgbImage::from_fn(5, 1, |x, _| image::Rgb([x as u8, 0, 0]));
    let c = torchvision_center_crop(&img5, 1, 2);
    assert_eq!((c.get_pixel(0, 0)[0], c.get_pixel(1, 0)[0]), (2, 3));
    let img4 = RgbImage::from_fn(4, 1, |x, _| image::Rgb([x as u8, 0, 0]));
    let c = torchvision_center_crop(&img4, 1, 1);
    assert_eq!(c.get_pixel(0, 0)[0], 2, "round(1.5) = 2");
    let img6 = RgbImage::from_fn(6, 1, |x, _| image::Rgb([x as u8, 0, 0]));
    let c = torchvision_center_crop(&img6, 1, 1);
    assert_eq!(c.get_pixel(0, 0)[0], 2, "round(2.5) = 2");
}

#[test]
fn example_720x400_photo_gives_384x704_with_6_and_7_black_columns() {
    let path = data("boy.jpg");
    for size in ["720*400", "704*384"] {
        let r = load_reference_image(&path, SizeArg::parse(size).unwrap()).unwrap();
        assert_eq!((r.source_height, r.source_width), (400, 720));
        assert_eq!((r.height(), r.width()), (384, 704), "{size}");
        assert!(!r.upscaled, "720×400 → 691×384 shrinks");
        let (h, w) = (r.height(), r.width());
        assert_eq!(r.pixels.len(), 3 * h * w);
        assert!(r.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
        let column_black =
            |x: usize| (0..3).all(|c| (0..h).all(|y| r.pixels[(c * h + y) * w + x] == -1.0));
        let black: Vec<usize> = (0..w).filter(|&x| column_black(x)).collect();
        let want: Vec<usize> = (0..6).chain(697..704).collect();
        assert_eq!(
            black, want,
            "{size}: 691 px wide image padded 6 left, 7 right"
        );
    }
}

#[test]
fn output_size_is_what_the_planner_resolves() {
    let tiny = tmp("tiny_16x16.png");
    RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10]))
        .save(&tiny)
        .unwrap();
    let portrait = tmp("portrait_400x720.png");
    image::imageops::rotate90(&load_rgb(&data("boy.jpg")).unwrap())
        .save(&portrait)
        .unwrap();
    for path in [data("boy.jpg"), data("boy_240x134.png"), tiny, portrait] {
        let img = load_rgb(&path).unwrap();
        for size in ["720*400", "704*384", "688*368", "384*256", "480*832"] {
            let arg = SizeArg::parse(size).unwrap();
            let planned = resolve(
                arg,
                AspectSource::Image {
                    height: u64::from(img.height()),
                    width: u64::from(img.width()),
                },
            )
            .unwrap();
            let r = load_reference_image(&path, arg).unwrap();
            assert_eq!(
                (r.resolution.height, r.resolution.width),
                (planned.height, planned.width),
                "{} at {size}",
                path.display()
            );
            assert_eq!(r.pixels.len(), 3 * r.height() * r.width());
        }
    }
}

#[test]
fn a_16x16_image_is_upscaled_to_64x64() {
    // The size search accepts scale 1.0: 16 → rounded up to 64 on both sides (area ≤ A), so
    // the reference upscales to 64×64; we do the same and flag it.
    let path = tmp("tiny_gradient_16x16.png");
    RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 16) as u8, (y * 16) as u8, 128])
    })
    .save(&path)
    .unwrap();
    let r = load_reference_image(&path, SizeArg::parse("704*384").unwrap()).unwrap();
    assert_eq!((r.height(), r.width()), (64, 64));
    assert!(r.upscaled);
    // No padding: every pixel comes from the image (the blue channel is 128 everywhere).
    let blue = &r.pixels[2 * 64 * 64..];
    let want = 128.0f32 / 255.0 * 2.0 - 1.0;
    assert!(blue.iter().all(|&v| v == want), "blue plane is constant");
    // The red ramp survives the 4× upscale: monotone along x, never padded black.
    let red_row: Vec<f32> = r.pixels[..64].to_vec();
    assert!(red_row.windows(2).all(|p| p[0] <= p[1]), "{red_row:?}");
    assert!(red_row[63] > red_row[0]);
}

#[test]
fn a_text_file_named_jpg_is_a_clear_error() {
    let path = tmp("notes.jpg");
    std::fs::write(&path, "this is not an image\n").unwrap();
    let err = load_reference_image(&path, SizeArg::parse("704*384").unwrap()).unwrap_err();
    assert!(matches!(err, MediaError::NotAnImage { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("notes.jpg") && msg.contains("not a JPEG or PNG"),
        "{msg}"
    );
}

#[test]
fn empty_missing_and_truncated_images_are_errors() {
    let empty = tmp("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let e = load_rgb(&empty).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");

    let missing = tmp("does-not-exist.png");
    assert!(matches!(
        load_rgb(&missing).unwrap_err(),
        MediaError::Io { .. }
    ));

    let png = std::fs::read(data("boy_240x134.png")).unwrap();
    let cut = tmp("truncated.png");
    std::fs::write(&cut, &png[..png.len() / 3]).unwrap();
    let e = load_rgb(&cut).unwrap_err();
    assert!(matches!(e, MediaError::ImageDecode { .. }), "{e:?}");

    // A GIF is an image, but not one the reference pipeline takes.
    let gif = tmp("x.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    assert!(matches!(
        load_rgb(&gif).unwrap_err(),
        MediaError::NotAnImage { .. }
    ));
}
