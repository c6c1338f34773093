"""Detectron2's ``DatasetMapper`` whose errors name the image they happened on.

Detectron2's own mapper lets e.g. PIL's "image file is truncated" or "cannot identify image file
<_io.BufferedReader ...>" through without the file name, from the middle of a training run; this
one re-raises any error of the mapping as :class:`ImageLoadError` naming the file and image id.
"""
from detectron2.data import DatasetMapper

__all__ = ["ImageLoadError", "FileNamingDatasetMapper"]


class ImageLoadError(RuntimeError):
    """An error while reading or transforming one image of a dataset; names the file."""


class FileNamingDatasetMapper(DatasetMapper):
    """``DatasetMapper`` (same arguments) whose errors name the file and the image id."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except Exception as e:
            name = dataset_dict.get("file_name", "<no file_name>")
            raise ImageLoadError(
                f"{name} (image id {dataset_dict.get('image_id', '?')}): cannot load this "
                f"image: {type(e).__name__}: {e}"
            ) from e
