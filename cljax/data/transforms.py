"""Per-sample image transforms of the input pipeline: pure functions of a record and a seed.

Images are decoded from their encoded bytes and leave the host as uint8 (HWC). Three views:

- `resized_view(image, size, crop_fraction)`: the shorter side resized to size /
  crop_fraction, then the centre size x size crop (evaluation: crop_fraction 0.875, the
  ImageNet standard; a buffer's stored copy: 1.0);
- `random_resized_crop(image, size, rng)`: Inception's training crop (area 8-100% of the
  image, aspect ratio 3/4-4/3) resized to size x size, and a random horizontal flip;
- a fixed-size image needs neither: it is used as stored.
"""

import io

import numpy as np
from PIL import Image

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875


def decode(encoded: bytes | np.ndarray) -> np.ndarray:
    """An encoded image (JPEG, PNG, ...) as a uint8 HWC array; arrays pass through."""
    if isinstance(encoded, np.ndarray):
        return encoded
    with Image.open(io.BytesIO(encoded)) as image:
        array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    return array[..., None] if array.ndim == 2 else array


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (with antialiasing when shrinking) of a uint8 HWC image."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
    return resized.reshape(height, width, channels)


def resized_view(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """Shorter side to `size / crop_fraction`, then the centre `size` x `size` crop."""
    height, width = image.shape[:2]
    scale = size / crop_fraction / min(height, width)
    new_height = max(size, round(height * scale))
    new_width = max(size, round(width * scale))
    resized = _resize(image, new_height, new_width)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[top : top + size, left : left + size]


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Inception's random crop (torchvision's RandomResizedCrop: up to 10 tries, then the
    centre crop of the largest allowed aspect), resized to `size`, randomly flipped."""
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        ratio = np.exp(rng.uniform(np.log(RATIO[0]), np.log(RATIO[1])))
        crop_w = round(np.sqrt(target * ratio))
        crop_h = round(np.sqrt(target / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            break
    else:
        aspect = width / height
        if aspect < RATIO[0]:
            crop_w, crop_h = width, round(width / RATIO[0])
        elif aspect > RATIO[1]:
            crop_h, crop_w = height, round(height * RATIO[1])
        else:
            crop_w, crop_h = width, height
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = _resize(image[top : top + crop_h, left : left + crop_w], size, size)
    return crop[:, ::-1] if rng.random() < 0.5 else crop
