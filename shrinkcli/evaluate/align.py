"""Five-point face alignment: the similarity transform that puts eyes, nose and mouth corners where
face-recognition models expect them (the 112x112 ArcFace template), as benchmarks such as IJB-B/C
ship landmarks for loosely cropped images rather than aligned crops.

The transform is the least-squares similarity (rotation, uniform scale, translation) from the
detected points to the template (Umeyama 1991, without reflection), and the image is resampled
bilinearly through its inverse (numpy and PIL only: no OpenCV or scikit-image needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrinkcli.errors import BadInputError

# Left eye, right eye, nose tip, left and right mouth corner on a 112x112 aligned face
# (the template insightface's models are trained with).
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2x3 matrix M of the similarity that maps `source` points closest to `target` (least squares)."""
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise BadInputError(f"alignment needs two matching [N, 2] point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    variance = (src_c ** 2).sum() / len(src)
    if variance <= 0:
        raise BadInputError("alignment landmarks are all the same point")
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:     # no reflections: a mirrored face is not a face pose
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = (singular * np.diag(sign)).sum() / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_face(image, landmarks: np.ndarray, size: int = 112):
    """The `size` x `size` aligned face (PIL image) from a PIL image and its 5 landmarks (x, y)."""
    from PIL import Image

    points = np.asarray(landmarks, np.float64).reshape(-1, 2)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise BadInputError(f"alignment needs 5 finite (x, y) landmarks, got shape {points.shape}")
    matrix = similarity_transform(points, TEMPLATE_112 * (size / 112.0))
    # PIL maps each output pixel through the inverse transform back into the source image.
    forward = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2].reshape(-1)
    return image.convert("RGB").transform((size, size), Image.AFFINE, data=tuple(inverse),
                                          resample=Image.BILINEAR)


def read_landmarks(path: str | Path) -> dict[str, np.ndarray]:
    """`name x1 y1 ... x5 y5 [score]` per line (IJB's `*_name_5pts_score.txt`) -> {name: [5, 2]}."""
    path = Path(path)
    found: dict[str, np.ndarray] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 11:
            raise BadInputError(f"{path}:{number}: expected an image name and 10 landmark values, got {len(parts) - 1}")
        try:
            found[parts[0]] = np.array([float(v) for v in parts[1:11]]).reshape(5, 2)
        except ValueError as exc:
            raise BadInputError(f"{path}:{number}: landmark values must be numbers ({exc})") from exc
    return found
