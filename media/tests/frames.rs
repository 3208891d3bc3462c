//! The §10.3 mapping: wav2vec2 frame count, 50 → 30 Hz align-corners interpolation,
//! round(6k/5) sampling to 25 fps, clip bucketing and per-block slices.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use media::frames::{
    BLOCK_FRAMES, CLIP_FRAMES, Features, clip_features, frames_30hz, interpolate_align_corners,
    num_clips, timing, track_index, wav2vec2_frames, wav2vec2_input_values,
};

#[test]
fn wav2vec2_frame_count() {
    assert!(wav2vec2_frames(399).is_err());
    assert_eq!(wav2vec2_frames(400).unwrap(), 1);
    assert_eq!(wav2vec2_frames(719).unwrap(), 1);
    assert_eq!(wav2vec2_frames(720).unwrap(), 2);
    assert_eq!(
        wav2vec2_frames(16000).unwrap(),
        49,
        "1 s ⇒ 49 frames as in HF"
    );
}

#[test]
fn thirty_hz_length_and_clip_count() {
    assert_eq!(frames_30hz(49), 29);
    assert_eq!(frames_30hz(100), 60);
    assert_eq!(frames_30hz(1), 0);
    // int(T50 / 50.0 * 30) in float64 is *not* always ⌊3·T50/5⌋: 205/50 = 4.1 and
    // 4.1 · 30 = 122.99999999999999. Python gives these 17 exceptions below 5000.
    let exceptions: Vec<usize> = (0..5000).filter(|&t| frames_30hz(t) != 3 * t / 5).collect();
    assert_eq!(exceptions.len(), 17);
    assert_eq!(&exceptions[..4], &[205, 410, 820, 845]);
    assert_eq!(frames_30hz(205), 122);
    // Checksum of Python's int(t / 50.0 * 30) · (t + 1) over t < 5000.
    let sum: usize = (0..5000).map(|t| frames_30hz(t) * (t + 1)).sum();
    assert_eq!(sum, 24_994_958_348);
    // nr = ⌊T30 / 57.6⌋ + 1.
    assert_eq!(num_clips(0), 1);
    assert_eq!(num_clips(57), 1);
    assert_eq!(num_clips(58), 2);
    assert_eq!(num_clips(288), 6, "288 / 57.6 = 5 exactly");
    for t30 in 0..20_000usize {
        assert_eq!(num_clips(t30), t30 * 5 / 288 + 1, "T30 = {t30}");
    }
}

#[test]
fn video_frame_index_is_round_of_6k_over_5_like_numpy() {
    // get_sample_indices: linspace(0, num/25, num, endpoint=False)·30, np.round (half to even).
    let num = 48 * 400;
    let step = (num as f64 / 25.0) / num as f64;
    for k in 0..num {
        let t = k as f64 * step;
        assert_eq!(
            track_index(k),
            (t * 30.0).round_ties_even() as usize,
            "k = {k}"
        );
    }
    assert_eq!(
        (0..6).map(track_index).collect::<Vec<_>>(),
        vec![0, 1, 2, 4, 5, 6]
    );
}

#[test]
fn interpolation_hits_the_corners_and_is_linear() {
    // One layer, width 2: channel 0 = 10·t, channel 1 = constant 3.
    let x = Features::new(
        1,
        5,
        2,
        (0..5).flat_map(|t| [10.0 * t as f32, 3.0]).collect(),
    )
    .unwrap();
    let y = interpolate_align_corners(&x, 3);
    assert_eq!(y.data, vec![0.0, 3.0, 20.0, 3.0, 40.0, 3.0]);
    // T50 = 100 ⇒ T30 = 60, scale 99/59; output t sits at t·99/59 on the 50 Hz axis.
    let x = Features::new(2, 100, 1, (0..200).map(|i| (i % 100) as f32).collect()).unwrap();
    let y = interpolate_align_corners(&x, 60);
    assert_eq!(y.frames, 60);
    for layer in 0..2 {
        let row = &y.data[layer * 60..(layer + 1) * 60];
        assert_eq!(row[0], 0.0);
        assert_eq!(row[59], 99.0, "align_corners keeps the last frame");
        for (t, &v) in row.iter().enumerate() {
            let want = t as f64 * 99.0 / 59.0;
            assert!((f64::from(v) - want).abs() < 1e-4, "t {t}: {v} vs {want}");
        }
    }
    // Same length: copied unchanged; one output frame: the first input frame.
    assert_eq!(interpolate_align_corners(&x, 100).data, x.data);
    assert_eq!(interpolate_align_corners(&x, 1).data, vec![0.0, 0.0]);
    assert!(Features::new(1, 2, 3, vec![0.0; 5]).is_err());
}

#[test]
fn clip_features_pick_frames_and_pad_clips() {
    // 25 layers of width 4; value encodes (layer, frame, channel).
    let (l, t50, d) = (25, 100, 4);
    let data = (0..l * t50 * d)
        .map(|i| {
            let (layer, rest) = (i / (t50 * d), i % (t50 * d));
            (layer * 1000 + (rest / d) * 10 + rest % d) as f32
        })
        .collect();
    let x = Features::new(l, t50, d, data).unwrap();
    let track = interpolate_align_corners(&x, frames_30hz(t50));
    let c = clip_features(&x).unwrap();
    // T30 = 60 ⇒ nr = 2 ⇒ 96 frames; frame k has audio while round(1.2k) < 60 ⇒ k ≤ 49.
    assert_eq!((c.layers, c.width, c.clips, c.frames()), (l, d, 2, 96));
    assert_eq!(c.audio_frames, 50);
    for layer in [0, 7, 24] {
        for ch in 0..d {
            for k in 0..96 {
                let got = c.data[(layer * d + ch) * 96 + k];
                let want = if k < 50 {
                    track.data[(layer * 60 + track_index(k)) * d + ch]
                } else {
                    0.0
                };
                assert_eq!(got, want, "layer {layer} ch {ch} frame {k}");
            }
        }
    }
    // Block (r, b) = frames [48r + 12b, +12), as [layers][width][12].
    let blk = c.block(1, 2).unwrap();
    assert_eq!(blk.len(), l * d * BLOCK_FRAMES);
    for layer in 0..l {
        for ch in 0..d {
            for j in 0..BLOCK_FRAMES {
                let k = CLIP_FRAMES + 2 * BLOCK_FRAMES + j;
                assert_eq!(
                    blk[(layer * d + ch) * BLOCK_FRAMES + j],
                    c.data[(layer * d + ch) * 96 + k]
                );
            }
        }
    }
    assert!(c.block(2, 0).is_err());
    assert!(c.block(0, 4).is_err());
}

#[test]
fn input_values_are_zero_mean_unit_variance() {
    let x: Vec<f32> = (0..16000)
        .map(|i| 0.3 + 0.1 * ((i as f32) * 0.01).sin())
        .collect();
    let y = wav2vec2_input_values(&x);
    let n = y.len() as f64;
    let mean = y.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = y
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!(mean.abs() < 1e-6, "{mean}");
    assert!((var - 1.0).abs() < 1e-4, "{var}");
    // Silence stays finite (the 1e-7 in the denominator).
    assert!(wav2vec2_input_values(&[0.0; 100]).iter().all(|&v| v == 0.0));
}

#[test]
fn timing_agrees_with_the_mapping() {
    for samples in [400usize, 720, 16000, 32000, 32_400, 66_000, 16000 * 7 + 123] {
        let t = timing(samples).unwrap();
        let x = Features::new(1, t.t50, 1, vec![1.0; t.t50]).unwrap();
        if t.t30 == 0 {
            assert_eq!(t.audio_frames, 0);
            continue;
        }
        let c = clip_features(&x).unwrap();
        assert_eq!(
            (t.clips, t.audio_frames),
            (c.clips, c.audio_frames),
            "{samples}"
        );
        let nonzero = c.data.iter().filter(|&&v| v != 0.0).count();
        assert_eq!(nonzero, t.audio_frames, "{samples}");
    }
    // 2 s of audio: 99 wav2vec2 frames, 59 at 30 Hz, 1 clip, 49 driven frames.
    let t = timing(32000).unwrap();
    assert_eq!((t.t50, t.t30, t.clips, t.audio_frames), (99, 59, 2, 49));
    assert!(timing(399).is_err());
}
