"""Closed-set rank-1 identification: probes against a gallery, optionally with distractors.

Similarities are computed in blocks of gallery rows, keeping only each probe's best score and
its label, so memory stays at (probes x block) however large the gallery and distractor set.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.verification import l2_normalize

DISTRACTOR_LABEL = -1


def split_probe_gallery(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (gallery, probes): the first image of every identity is in the gallery; the other
    images of identities with two or more images are probes. Identities with a single image stay
    in the gallery, where no probe matches them (they act as distractors)."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    is_gallery = np.zeros(len(labels), dtype=bool)
    is_gallery[first] = True
    return np.sort(first), np.flatnonzero(~is_gallery)


def iter_blocks(rows: np.ndarray | Iterable[np.ndarray], block: int) -> Iterable[np.ndarray]:
    if isinstance(rows, np.ndarray):
        for start in range(0, len(rows), block):
            yield rows[start:start + block]
    else:
        yield from rows


class BestMatch:
    """Running best similarity (and its label) per probe over gallery blocks."""

    def __init__(self, probes: np.ndarray):
        self.probes = l2_normalize(probes).astype(np.float32)
        self.score = np.full(len(self.probes), -np.inf, dtype=np.float32)
        self.label = np.full(len(self.probes), DISTRACTOR_LABEL, dtype=np.int64)

    def update(self, gallery: np.ndarray, labels: np.ndarray | None) -> None:
        if len(gallery) == 0:
            return
        sims = self.probes @ l2_normalize(gallery).astype(np.float32).T
        best = np.argmax(sims, axis=1)
        score = sims[np.arange(len(sims)), best]
        # strict '>' keeps the earlier entry on a tie: genuine gallery rows come first
        better = score > self.score
        self.score[better] = score[better]
        self.label[better] = DISTRACTOR_LABEL if labels is None else labels[best[better]]


def rank1(probe_emb: np.ndarray, probe_labels: np.ndarray, gallery_emb: np.ndarray,
          gallery_labels: np.ndarray, distractors: np.ndarray | Iterable[np.ndarray] | None = None,
          *, block: int = 4096) -> dict[str, Any]:
    """Fraction of probes whose most similar gallery entry (cosine) has the probe's identity.

    `distractors` (an array or an iterable of arrays, e.g. memory-mapped chunks) join the gallery
    with no identity: a probe nearer to a distractor than to its own identity is a miss.
    """
    probe_labels = np.asarray(probe_labels)
    gallery_labels = np.asarray(gallery_labels)
    if len(probe_emb) == 0:
        raise BadInputError("identification needs at least one probe (an identity with two or more images)")
    if len(gallery_emb) != len(gallery_labels) or len(probe_emb) != len(probe_labels):
        raise BadInputError("identification: embeddings and labels differ in length")
    matcher = BestMatch(probe_emb)
    for start in range(0, len(gallery_emb), block):
        matcher.update(gallery_emb[start:start + block], gallery_labels[start:start + block])
    n_distractors = 0
    if distractors is not None:
        for chunk in iter_blocks(distractors, block):
            n_distractors += len(chunk)
            matcher.update(np.asarray(chunk), None)
    hits = matcher.label == probe_labels
    return {"rank1": float(np.mean(hits)), "probes": int(len(probe_labels)),
            "gallery": int(len(gallery_labels)), "distractors": int(n_distractors),
            "identities": int(len(np.unique(probe_labels)))}


def rank1_from_labelled(emb: np.ndarray, labels: np.ndarray,
                        distractors: np.ndarray | Iterable[np.ndarray] | None = None,
                        *, block: int = 4096) -> dict[str, Any]:
    """Rank-1 on one labelled set split by `split_probe_gallery`."""
    labels = np.asarray(labels)
    gallery, probes = split_probe_gallery(labels)
    return rank1(emb[probes], labels[probes], emb[gallery], labels[gallery], distractors, block=block)
