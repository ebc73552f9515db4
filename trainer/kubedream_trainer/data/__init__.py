"""The data layer: EveryDream-style data roots scanned into a `Dataset`, epochs drawn by
multipliers, batches planned per aspect-ratio bucket, and (in `data.loader`, the one
module that imports torch) batches decoded ahead of the GPU.

Importing this package does not import torch, so the operator can scan and inspect roots.
See docs/data.md for the file conventions.
"""

from .captions import process_caption
from .multipliers import draw_epoch
from .plan import plan_epoch
from .records import Dataset, FolderInfo, ImageRecord, Problem
from .scan import DataRootError, scan_roots

__all__ = [
    "DataRootError",
    "Dataset",
    "FolderInfo",
    "ImageRecord",
    "Problem",
    "draw_epoch",
    "plan_epoch",
    "process_caption",
    "scan_roots",
]
