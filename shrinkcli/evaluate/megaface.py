"""MegaFace-style identification: each probe identity's images against a large distractor set.

Protocol (MegaFace challenge 1): for an identity with images x_1..x_n, every ordered pair
(x_i as probe, x_j as the single genuine gallery entry), i != j, is one trial; the trial is a
rank-1 hit when sim(x_i, x_j) is strictly greater than sim(x_i, d) for every distractor d.
The best distractor similarity of each probe image is found once, streaming the distractors in
chunks, so millions of distractors need only (probe images x chunk) memory.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.identification import BestMatch, iter_blocks
from shrinkcli.evaluate.verification import l2_normalize


def best_distractor_similarity(probe_emb: np.ndarray, distractors: np.ndarray | Iterable[np.ndarray],
                               *, block: int = 8192) -> tuple[np.ndarray, int]:
    matcher = BestMatch(probe_emb)
    count = 0
    for chunk in iter_blocks(distractors, block):
        count += len(chunk)
        matcher.update(np.asarray(chunk), None)
    return matcher.score, count


def megaface_rank1(probe_emb: np.ndarray, probe_labels: np.ndarray,
                   distractors: np.ndarray | Iterable[np.ndarray], *, block: int = 8192) -> dict[str, Any]:
    """Rank-1 identification rate over all (probe, genuine) trials, plus the per-identity mean."""
    probe_labels = np.asarray(probe_labels)
    if len(probe_emb) != len(probe_labels):
        raise BadInputError("megaface: probe embeddings and labels differ in length")
    best_distractor, n_distractors = best_distractor_similarity(probe_emb, distractors, block=block)
    if n_distractors == 0:
        raise BadInputError("megaface: the distractor set is empty")
    probes = l2_normalize(probe_emb).astype(np.float32)
    hits = trials = 0
    per_identity = []
    for label in np.unique(probe_labels):
        members = np.flatnonzero(probe_labels == label)
        if len(members) < 2:
            continue
        sims = probes[members] @ probes[members].T
        beats = sims > best_distractor[members][:, None]
        np.fill_diagonal(beats, False)
        n = len(members) * (len(members) - 1)
        hits += int(beats.sum())
        trials += n
        per_identity.append(beats.sum() / n)
    if trials == 0:
        raise BadInputError("megaface: no probe identity has two or more images")
    return {"rank1": hits / trials, "rank1_identity_mean": float(np.mean(per_identity)),
            "trials": trials, "identities": len(per_identity), "distractors": n_distractors}
