"""Procedurally drawn face-like identities: the built-in, download-free quickstart data.

`synthetic[:IDS[:PER_ID[:SEED]]]`. Identity `i` under seed `s` is a fixed set of shape, colour and
position parameters (face oval, hair style and colour, eyes, brows, nose, mouth, glasses, beard)
drawn from `default_rng([s, 1, i])`; image `k` of that identity adds nuisance variation (shift,
scale, rotation, expression, brightness, contrast, background, noise) from `default_rng([s, 2, i, k])`.
So everything is deterministic and generated on the fly, and a different seed gives different
identities (use one seed for training and another for disjoint evaluation identities).
"""

from __future__ import annotations

import numpy as np

from shrinkcli.data.base import FaceDataset
from shrinkcli.data.transforms import prepare_pil
from shrinkcli.errors import BadInputError

CANVAS = 128
DEFAULT_IDENTITIES = 40
DEFAULT_PER_IDENTITY = 12
DEFAULT_SEED = 0


def parse_synthetic_spec(spec: str) -> tuple[int, int, int]:
    parts = spec.split(":")[1:] if ":" in spec else []
    values = [DEFAULT_IDENTITIES, DEFAULT_PER_IDENTITY, DEFAULT_SEED]
    if len(parts) > 3:
        raise BadInputError(f"synthetic spec {spec!r} has too many fields", hint="use synthetic[:IDS[:PER_ID[:SEED]]]")
    for position, part in enumerate(parts):
        if part == "":
            continue
        try:
            values[position] = int(part)
        except ValueError:
            raise BadInputError(f"synthetic spec {spec!r}: {part!r} is not an integer",
                                hint="use synthetic[:IDS[:PER_ID[:SEED]]], e.g. synthetic:40:12:0") from None
    if values[0] < 1 or values[1] < 1 or values[2] < 0:
        raise BadInputError(f"synthetic spec {spec!r}: identities and images per identity must be >= 1, seed >= 0")
    return values[0], values[1], values[2]


def _colour(rng, low: int, high: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, size=3))


def identity_params(seed: int, identity: int) -> dict:
    rng = np.random.default_rng([seed, 1, identity])
    skin_base = rng.uniform(0.35, 1.0)
    skin = tuple(int(c) for c in np.array([235, 190, 160]) * skin_base + rng.integers(-20, 20, 3))
    return {
        "face_w": rng.uniform(30, 46), "face_h": rng.uniform(40, 54), "face_dy": rng.uniform(-4, 6),
        "skin": tuple(int(np.clip(c, 20, 255)) for c in skin),
        "hair": _colour(rng, 0, 256), "hair_style": int(rng.integers(0, 5)), "hair_size": rng.uniform(0.2, 1.0),
        "eye_dx": rng.uniform(9, 17), "eye_y": rng.uniform(-14, -4), "eye_r": rng.uniform(2.5, 6.0),
        "iris": _colour(rng, 0, 200), "brow_tilt": rng.uniform(-5, 5), "brow_w": rng.uniform(1.5, 4.5),
        "nose_len": rng.uniform(6, 16), "nose_w": rng.uniform(2, 7),
        "mouth_w": rng.uniform(7, 18), "mouth_y": rng.uniform(14, 26), "mouth_curve": rng.uniform(-6, 6),
        "lips": _colour(rng, 80, 240), "glasses": bool(rng.random() < 0.25), "beard": bool(rng.random() < 0.2),
        "mole": (rng.uniform(-20, 20), rng.uniform(-10, 20)) if rng.random() < 0.4 else None,
    }


def draw_face(params: dict, rng: np.random.Generator, *, size: int = CANVAS):
    """Render one image of an identity with per-sample nuisance variation (PIL RGB image)."""
    from PIL import Image, ImageDraw, ImageEnhance

    background = _colour(rng, 30, 225)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    p = params
    cx, cy = size / 2, size / 2 + p["face_dy"]
    fw, fh = p["face_w"], p["face_h"]
    hair = p["hair"]
    if p["hair_style"] in (1, 3):  # long hair behind the face
        extra = 6 + 14 * p["hair_size"]
        draw.ellipse((cx - fw - extra, cy - fh - 6, cx + fw + extra, cy + fh * (0.2 + 0.6 * p["hair_size"])), fill=hair)
    draw.ellipse((cx - fw, cy - fh, cx + fw, cy + fh), fill=p["skin"])
    if p["hair_style"] in (0, 1, 4):  # cap of hair on top
        depth = fh * (0.25 + 0.35 * p["hair_size"])
        draw.chord((cx - fw - 2, cy - fh - 4, cx + fw + 2, cy - fh + 2 * depth), 180, 360, fill=hair)
    if p["hair_style"] == 4:  # fringe
        draw.rectangle((cx - fw * 0.6, cy - fh + 2, cx + fw * 0.6, cy - fh * 0.55), fill=hair)
    if p["beard"]:
        draw.chord((cx - fw, cy - fh * 0.1, cx + fw, cy + fh), 0, 180, fill=hair)
    open_mouth = rng.uniform(0, 4)
    blink = rng.random() < 0.1
    for side in (-1, 1):
        ex, ey, r = cx + side * p["eye_dx"], cy + p["eye_y"], p["eye_r"]
        if blink:
            draw.line((ex - r, ey, ex + r, ey), fill=(20, 20, 20), width=2)
        else:
            draw.ellipse((ex - r * 1.4, ey - r, ex + r * 1.4, ey + r), fill=(245, 245, 245))
            draw.ellipse((ex - r * 0.7, ey - r * 0.7, ex + r * 0.7, ey + r * 0.7), fill=p["iris"])
        by = ey - r - 4
        tilt = side * p["brow_tilt"]
        draw.line((ex - r * 1.5, by + tilt, ex + r * 1.5, by - tilt), fill=hair, width=max(1, int(p["brow_w"])))
        if p["glasses"]:
            draw.ellipse((ex - r * 2.2, ey - r * 1.8, ex + r * 2.2, ey + r * 1.8), outline=(15, 15, 15), width=2)
    if p["glasses"]:
        draw.line((cx - p["eye_dx"] + p["eye_r"] * 2.2, cy + p["eye_y"], cx + p["eye_dx"] - p["eye_r"] * 2.2,
                   cy + p["eye_y"]), fill=(15, 15, 15), width=2)
    nose_top = cy + p["eye_y"] + 4
    draw.polygon([(cx, nose_top), (cx - p["nose_w"], nose_top + p["nose_len"]), (cx + p["nose_w"], nose_top + p["nose_len"])],
                 fill=tuple(max(0, c - 35) for c in p["skin"]))
    my, mw, curve = cy + p["mouth_y"], p["mouth_w"], p["mouth_curve"]
    draw.chord((mw * -1 + cx, my - abs(curve) - open_mouth, cx + mw, my + abs(curve) + open_mouth),
               0 if curve >= 0 else 180, 180 if curve >= 0 else 360, fill=p["lips"])
    if p["mole"] is not None:
        mx, my2 = p["mole"]
        draw.ellipse((cx + mx - 2, cy + my2 - 2, cx + mx + 2, cy + my2 + 2), fill=(60, 35, 25))

    angle = rng.uniform(-10, 10)
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-5, 5, size=2)
    image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=background)
    side = int(round(size / scale))
    left = int(round((size - side) / 2 + shift[0]))
    top = int(round((size - side) / 2 + shift[1]))
    # EXTENT with a fill colour: zooming out shows more background, never black borders
    image = image.transform((size, size), Image.EXTENT, (left, top, left + side, top + side),
                            resample=Image.BILINEAR, fillcolor=background)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class SyntheticDataset(FaceDataset):
    def __init__(self, identities: int = DEFAULT_IDENTITIES, per_identity: int = DEFAULT_PER_IDENTITY,
                 seed: int = DEFAULT_SEED, *, spec: str | None = None, **options):
        self.identities, self.per_identity, self.seed = identities, per_identity, seed
        self.spec = spec or f"synthetic:{identities}:{per_identity}:{seed}"
        self.class_names = [f"synthetic-{seed}-{i:05d}" for i in range(identities)]
        self._params_cache: dict[int, dict] = {}
        super().__init__(np.repeat(np.arange(identities, dtype=np.int64), per_identity),
                         num_classes=identities, **options)

    def _params(self, identity: int) -> dict:
        if identity not in self._params_cache:
            self._params_cache[identity] = identity_params(self.seed, identity)
        return self._params_cache[identity]

    def pil_image(self, index: int):
        identity, sample = divmod(index, self.per_identity)
        rng = np.random.default_rng([self.seed, 2, identity, sample])
        return draw_face(self._params(identity), rng)

    def describe(self, index: int) -> str:
        identity, sample = divmod(index, self.per_identity)
        return f"{self.spec} identity {identity} image {sample}"

    def _load(self, index: int) -> np.ndarray:
        image = prepare_pil(self.pil_image(index), input_size=self.input_size, crop=self.crop)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

    def encoded(self, index: int) -> bytes:
        import io

        buffer = io.BytesIO()
        self.pil_image(index).save(buffer, format="PNG")
        return buffer.getvalue()
