"""Regenerates the Pillow goldens of media/tests/image.rs (run from this folder; needs Pillow).

The reference (LiveAvatar, causal_s2v_pipeline_tpp.py) does
    CenterCrop((H, W))(Resize(min(H, W))(Image.fromarray(ref_image)))
on a PIL image. torchvision's Resize/CenterCrop on PIL images are re-stated below in plain
Pillow (torchvision is not needed): Resize(int) -> Image.resize(BILINEAR) with the short side
set and the long side truncated; CenterCrop pads with zeros (left/top floor, right/bottom
ceil) and crops at round() offsets (Python's round: half to even).
"""
from PIL import Image

src = Image.open("boy.jpg").convert("RGB").resize((240, 134), Image.LANCZOS)
src.save("boy_240x134.png")

for w, h in [(97, 61), (313, 173), (240, 50), (31, 134), (7, 5)]:
    src.resize((w, h), Image.BILINEAR).save(f"pil_bilinear_{w}x{h}.png")


def torchvision_resize(img, size):
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def torchvision_center_crop(img, ch, cw):
    w, h = img.size
    if cw > w or ch > h:
        l, t = ((cw - w) // 2 if cw > w else 0), ((ch - h) // 2 if ch > h else 0)
        r, b = ((cw - w + 1) // 2 if cw > w else 0), ((ch - h + 1) // 2 if ch > h else 0)
        padded = Image.new("RGB", (w + l + r, h + t + b), (0, 0, 0))
        padded.paste(img, (l, t))
        img = padded
        w, h = img.size
        if (w, h) == (cw, ch):
            return img
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


# (H, W) pairs: a downscale with a crop, an upscale with padding on both axes' long side.
for H, W in [(64, 128), (192, 128), (128, 320)]:
    out = torchvision_center_crop(torchvision_resize(src, min(H, W)), H, W)
    out.save(f"pil_pipeline_{H}x{W}.png")
