"""Image decoding and preprocessing shared by every reader and by pairs loading.

One pipeline everywhere (training, verification packs, pairs files) so that an image means the
same tensor whichever format it was stored in: decode with PIL -> RGB (greyscale is replicated
to 3 channels) -> optional centre crop of `crop` source pixels -> bilinear resize to
`input_size` -> uint8 CHW. Normalisation `(x - mean) / std` is a separate step on uint8 batches.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np

from shrinkcli.errors import BadInputError

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]


def _open_pil(source: ImageSource, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: no face image is that large,
            # so it is refused like a bomb instead of a library warning on stderr.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                image = Image.open(io.BytesIO(bytes(source)))
            else:
                image = Image.open(source)
            image.load()  # force the full decode here, so truncation is reported now, not later
        return image
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise BadInputError(f"cannot decode image {where}: {exc}",
                            hint="an image this large is not a face crop (possibly a decompression bomb); "
                                 "remove it, or pass skip_corrupt to skip it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInputError(f"cannot decode image {where}: {exc}",
                            hint="re-encode or remove the file, or pass skip_corrupt to count and skip it") from exc


def prepare_pil(image, *, input_size: int | None, crop: int | None = None):
    """RGB conversion, centre crop (`crop` px of the source, clipped to the image) and resize."""
    from PIL import Image

    if image.mode != "RGB":
        # "L", "I;16", palette, RGBA, CMYK all end as 3 identical-meaning RGB channels
        image = image.convert("RGB")
    if crop:
        width, height = image.size
        side_w, side_h = min(crop, width), min(crop, height)
        left, top = (width - side_w) // 2, (height - side_h) // 2
        image = image.crop((left, top, left + side_w, top + side_h))
    if input_size and image.size != (input_size, input_size):
        image = image.resize((input_size, input_size), Image.BILINEAR)
    return image


def decode_image(source: ImageSource, *, input_size: int | None = 112, crop: int | None = None,
                 where: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes into a uint8 array [3, H, W] in RGB order."""
    label = where or (str(source) if not isinstance(source, (bytes, bytearray, memoryview)) else "<bytes>")
    image = prepare_pil(_open_pil(source, label), input_size=input_size, crop=crop)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def image_size(source: ImageSource, where: str | None = None) -> tuple[int, int]:
    """(width, height) of an encoded image, fully decoded so corrupt files are caught."""
    label = where or str(source)
    return _open_pil(source, label).size


def normalize(images_uint8, mean: float = 127.5, std: float = 127.5):
    """uint8 tensor/array [..., 3, H, W] -> float32 tensor `(x - mean) / std`."""
    import torch

    tensor = torch.as_tensor(images_uint8)
    return (tensor.to(torch.float32) - float(mean)) / float(std)
