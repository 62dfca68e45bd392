"""PatchCore with a faster k-center-greedy coreset: the same greedy rule, a cheaper distance update.

Why: anomalib's :class:`KCenterGreedy` updates the nearest-centre distances with
``linalg.norm(features - center)``, which materialises an N x d temporary on every iteration. On
2 CPU cores that is memory-bound: ~0.37 s per iteration for 296 k patches of 311 projected
dimensions (all of ELPV at /16), so the 2,960 iterations of a 1 % coreset took ~18 min.
Here the squared distance comes from one matrix-vector product,
``|f|^2 - 2 f.c + |c|^2`` with ``|f|^2`` computed once, and the running minimum is updated in
place: ~0.10 s per iteration on the same data. The greedy picks the farthest point from the
chosen centres; squared distances order points exactly as distances do, so the rule is
anomalib's. Only floating-point rounding differs, which can swap near-ties.

Everything else (feature extraction, the random projection, the memory bank, scoring, ONNX
export, checkpoints) is anomalib's own :class:`~anomalib.models.Patchcore`.
"""

from __future__ import annotations

import torch
from anomalib.models import Patchcore
from anomalib.models.components import KCenterGreedy


class FastKCenterGreedy(KCenterGreedy):
    """:class:`KCenterGreedy` whose distance update is one matrix-vector product, in place."""

    def reset_distances(self) -> None:
        """Forget the running minimum and the cached squared norms (new features)."""
        super().reset_distances()
        self._squared_norms: torch.Tensor | None = None

    def update_distances(self, cluster_center: int | torch.Tensor | None) -> None:
        """Fold the squared distances to ``cluster_center`` into the running minimum (shape N x 1)."""
        if cluster_center is None:
            return
        if getattr(self, "_squared_norms", None) is None:
            self._squared_norms = (self.features * self.features).sum(1, keepdim=True)
        center = self.features[cluster_center].reshape(-1, 1)
        distances = self.features @ center  # N x 1
        distances.mul_(-2).add_(self._squared_norms).add_(self._squared_norms[cluster_center].reshape(1, 1))
        distances.clamp_(min=0)
        if self.min_distances is None:
            self.min_distances = distances
        else:
            torch.minimum(self.min_distances, distances, out=self.min_distances)


class FastCoresetPatchcore(Patchcore):
    """anomalib's PatchCore, with :class:`FastKCenterGreedy` selecting the memory bank."""

    def fit(self) -> None:
        """Stack the training patches and keep a ``coreset_sampling_ratio`` coreset of them."""
        model = self.model
        if len(model.embedding_store) == 0:
            msg = "Embedding store is empty. Cannot perform coreset selection."
            raise ValueError(msg)
        bank = torch.vstack(model.embedding_store)
        model.embedding_store.clear()
        model.memory_bank = FastKCenterGreedy(
            embedding=bank, sampling_ratio=self.coreset_sampling_ratio
        ).sample_coreset()
