"""``ResumableTrainingSampler``: Detectron2's ``TrainingSampler`` whose stream can start anywhere."""
import itertools
from typing import Optional

import torch
from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler"]


class ResumableTrainingSampler(TrainingSampler):
    """``TrainingSampler`` whose (seeded, infinite) index stream starts at position ``start``.

    The stream is the same as Detectron2's: ``shuffle(range(size)) + shuffle(range(size)) + ...``
    from a generator seeded with ``seed``; rank ``r`` of ``W`` takes ``stream[start + r :: W]``.
    ``start`` counts the indices that *all* ranks together have consumed, i.e. the number of
    images trained on so far (``iterations done * SOLVER.IMS_PER_BATCH``). With ``start = k * B``,
    the run continues exactly where a run with total batch ``B`` stopped after ``k`` iterations,
    whatever the number of processes of either run. (Detectron2 restarts the stream from the
    beginning on resume.)
    """

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None, start: int = 0):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.set_start(start)

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def start(self) -> int:
        return self._start

    @property
    def size(self) -> int:
        return self._size

    def set_start(self, start: int, seed: Optional[int] = None) -> None:
        """Continue the stream at global position ``start`` (and use ``seed`` if given)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self._start = int(start)
        if seed is not None:
            self._seed = int(seed)

    def __iter__(self):
        first = self._start + self._rank  # global stream position of this rank's first index
        g = torch.Generator()
        g.manual_seed(self._seed)
        skip_epochs = first // self._size
        if self._shuffle:
            for _ in range(skip_epochs):  # advance the generator past the epochs already consumed
                torch.randperm(self._size, generator=g)
        yield from itertools.islice(
            self._epochs_from(g), first - skip_epochs * self._size, None, self._world_size
        )

    def _epochs_from(self, g):
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=g).tolist()
            else:
                yield from range(self._size)
