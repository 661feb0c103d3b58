"""The offline demo dataset: real images with a real domain shift, from packages fedcal installs.

``data.dataset = "demo-digits"`` needs no network and no file outside the installed packages:

- ``handwritten``: the 1,797 handwritten digits of UCI's optical-recognition set (43 writers) that
  scikit-learn ships (``sklearn.datasets.load_digits``), 8x8 pixels in 17 grey levels;
- ``sans``, ``serif``, ``mono``: the same ten digits typeset in the TrueType fonts matplotlib ships
  (DejaVu Sans / Serif / Sans Mono and their bold and italic faces, STIX, Computer Modern), each
  rendered with a seeded random size, shift and rotation, then reduced exactly as UCI reduced the
  scans (8x8 blocks, 17 grey levels), so that only the *style* differs between domains.

Handwriting against type is a genuine shift: the clients of one domain never see the others'
style, and the held-out domain (``data.heldout_domains``) tests transfer. The folder is written
once into ``data.cache_dir`` as ``<domain>/<digit>/<i>.png`` (32x32 PNGs), keyed by a version
string, and then read by the ordinary image-folder path like any other local dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

VERSION = "demo-digits-v1"
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FONT_DOMAINS = {
    "sans": ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf"],
    "serif": ["DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "cmr10.ttf"],
    "mono": ["DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf"],
}
PER_DIGIT = 50  # typeset images per digit and domain
SIZE = 32  # stored image size (the tiny CLIPs' input size)


def _reduce(gray: np.ndarray) -> np.ndarray:
    """UCI's reduction: 32x32 binary-ish -> 8x8 block sums -> 0..16."""
    blocks = gray.reshape(8, 4, 8, 4).mean(axis=(1, 3))
    return np.round(16 * blocks / max(blocks.max(), 1e-9)).astype(np.uint8)


def _typeset(font_file: str, digit: int, rng: np.random.Generator) -> np.ndarray:
    import matplotlib
    from matplotlib import font_manager  # noqa: F401  (the fonts' package)
    from PIL import Image, ImageDraw, ImageFont

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", font_file)
    font = ImageFont.truetype(path, int(rng.integers(22, 30)))
    canvas = Image.new("L", (48, 48), 0)
    ImageDraw.Draw(canvas).text((24 + rng.integers(-3, 4), 24 + rng.integers(-3, 4)), str(digit), fill=255, font=font, anchor="mm")
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    box = canvas.getbbox() or (0, 0, 48, 48)
    crop = canvas.crop(box)
    side = max(crop.size)
    square = Image.new("L", (side, side), 0)
    square.paste(crop, ((side - crop.size[0]) // 2, (side - crop.size[1]) // 2))
    gray = np.asarray(square.resize((32, 32), Image.BILINEAR), dtype=np.float64)
    return _reduce(gray / max(gray.max(), 1.0))


def _handwritten() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def _save(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(np.clip(pixels.astype(np.float64) * (255 / 16), 0, 255).astype(np.uint8), "L")
    img.resize((SIZE, SIZE), Image.BILINEAR).convert("RGB").save(path)


def demo_folder(cache_dir: str | os.PathLike[str]) -> Path:
    """The demo image folder in ``cache_dir`` (written on first use, atomically)."""
    root = Path(os.path.expanduser(str(cache_dir))) / VERSION
    if (root / ".complete").exists():
        return root
    tmp = root.with_name(f"{VERSION}.tmp-{os.getpid()}")
    images, labels = _handwritten()
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp / "handwritten" / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        _save(pixels, folder / f"{i:04d}.png")
    for d, (domain, fonts) in enumerate(FONT_DOMAINS.items()):
        rng = np.random.default_rng(1000 + d)
        for digit, name in enumerate(CLASS_NAMES):
            folder = tmp / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(PER_DIGIT):
                _save(_typeset(fonts[i % len(fonts)], digit, rng), folder / f"{i:04d}.png")
    (tmp / ".complete").write_text(VERSION)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root
