"""Files: images with their headers (:mod:`.images`: ``.npy``, NIfTI)
and safe writes (:mod:`.files`: temporary file + rename, loads that never unpickle objects)."""

from .images import as_image, load_image, read_image, save_image, spacing_of, write_image

__all__ = ["as_image", "load_image", "read_image", "save_image", "spacing_of", "write_image"]
