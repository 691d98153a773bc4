"""Token data: the on-disk format (``format``), where documents come from (``sources``), corpus ->
shards (``prepare``), batches read back (``batches``) and a compact-vocabulary copy (``compact``)."""

from gpt2lab.data.batches import Batches, iter_windows, val_batches
from gpt2lab.data.compact import compact_vocabulary
from gpt2lab.data.format import DTYPE, META, SPLITS, TokenData, read_meta, write_token_dir
from gpt2lab.data.prepare import PrepareSummary, prepare
from gpt2lab.data.sources import Source, split_text, stdlib_files

__all__ = [
    "DTYPE",
    "META",
    "SPLITS",
    "Batches",
    "PrepareSummary",
    "Source",
    "TokenData",
    "compact_vocabulary",
    "iter_windows",
    "prepare",
    "read_meta",
    "split_text",
    "stdlib_files",
    "val_batches",
    "write_token_dir",
]
