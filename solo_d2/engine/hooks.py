"""Training hooks of solo_d2: :class:`DataOrderHook` (``--resume`` continues the data order)."""
import logging

from detectron2.engine.train_loop import HookBase

from ..data.samplers import ResumableTrainingSampler

__all__ = ["DataOrderHook"]

# Under "detectron2" so that the messages reach Detectron2's log handlers (stdout, log.txt).
logger = logging.getLogger("detectron2.solo_d2.engine")


class DataOrderHook(HookBase):
    """Saves the training sampler's seed and the number of images consumed so far in every
    checkpoint (trainer state ``hooks/DataOrderHook``) and, on resume, makes the sampler continue
    its stream at that position. Registered first, so its ``after_step`` runs before the
    checkpointer's.

    Exact when the loader yields the sampler's stream in order: always with
    ``DATALOADER.ASPECT_RATIO_GROUPING False`` or images of one orientation; with grouping and
    mixed portrait / landscape images, the grouping buffers reorder the stream by a few images, so
    the batches right after a resume may differ slightly from an uninterrupted run's. Any number
    of data-loader workers and of processes (before and after the resume) is fine.
    """

    def __init__(self, sampler: ResumableTrainingSampler, images_per_batch: int):
        self.sampler = sampler
        self.images_per_batch = int(images_per_batch)
        self.consumed = 0
        self._restored = False

    def before_train(self):
        if not self._restored:
            # No saved position (fresh run, or a checkpoint written without this hook): derive it.
            self.consumed = self.trainer.start_iter * self.images_per_batch
            if self.trainer.start_iter > 0:
                logger.warning(
                    "The checkpoint has no saved data order: the sampler continues at "
                    f"{self.consumed} images = iteration {self.trainer.start_iter} x "
                    f"IMS_PER_BATCH {self.images_per_batch}, with seed {self.sampler.seed}"
                )
        self.sampler.set_start(self.consumed)
        if self.consumed:
            logger.info(f"Data order: continuing the training sampler stream at image {self.consumed}")

    def after_step(self):
        self.consumed += self.images_per_batch

    def state_dict(self):
        return {"seed": self.sampler.seed, "consumed": self.consumed, "dataset_size": self.sampler.size}

    def load_state_dict(self, state_dict):
        if state_dict.get("dataset_size") != self.sampler.size:
            logger.warning(
                f"The training set has {self.sampler.size} images but had "
                f"{state_dict.get('dataset_size')} when the checkpoint was written: the data order "
                "cannot continue exactly"
            )
        self.consumed = int(state_dict["consumed"])
        self.sampler.set_start(self.consumed, seed=state_dict["seed"])
        self._restored = True
