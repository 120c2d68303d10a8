"""Get the public NIH/NLM malaria cell images onto disk, and a class-folder tree into a bucket.

``download_nih_dataset`` (module ``download``) fetches ``cell_images.zip``;
``extract_cell_images`` (``archive``) unpacks it safely into ``<to>/<class>/``;
``upload_tree`` (``upload``) puts such a tree under ``incoming/`` of any store, where the
ingest flow validates and sorts it.
"""

from malaria_dev.datasets.archive import (
    IMAGE_SUFFIXES,
    MAX_MEMBER_BYTES,
    MAX_TOTAL_BYTES,
    ArchiveError,
    DownloadError,
    ExtractResult,
    UnsafeArchiveError,
    extract_cell_images,
)
from malaria_dev.datasets.download import (
    NIH_CELL_IMAGES_URL,
    ChecksumError,
    DownloadResult,
    download_nih_dataset,
)
from malaria_dev.datasets.upload import UploadError, UploadResult, upload_tree

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_MEMBER_BYTES",
    "MAX_TOTAL_BYTES",
    "NIH_CELL_IMAGES_URL",
    "ArchiveError",
    "ChecksumError",
    "DownloadError",
    "DownloadResult",
    "ExtractResult",
    "UnsafeArchiveError",
    "UploadError",
    "UploadResult",
    "download_nih_dataset",
    "extract_cell_images",
    "upload_tree",
]
