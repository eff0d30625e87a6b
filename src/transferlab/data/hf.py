"""Your own data through Hugging Face `datasets`: CSV / JSON(L) / Parquet / text files, an image
folder, a `save_to_disk` folder or a hub dataset already in the local HF cache — as a
`LabelledPool` that the one split logic (splits.py) cuts into tasks.

What stays on disk: the inputs. The dataset's Arrow files are memory-mapped, and `ImageColumn` /
`TextColumn` hold row numbers, not pixels or strings. A batch's images are read, converted to RGB
(grayscale / RGBA / palette images mixed with RGB are fine), resized to `image_size` and scaled to
[0, 1] when a loader asks for that batch — in DataLoader workers with `data.num_workers` > 0;
memory does not grow with the number of images (scripts/bench_data.py). Texts are tokenized
through `datasets.map`, cached on disk with the dataset. Labels and domains are small and read once.

Columns by config: `input_column` (an image or text column; null: the first image column, else
`text`), `label_column` (a ClassLabel's names, else the sorted distinct values), for token
classification `words_column` + `tags_column` (a list of words and one tag per word), and an
optional `domain_column` (for data.source_domains / target_domains / ood_domains). The dataset's
own validation and test splits are used as given (never cut into training data); without them the
usual seeded cuts apply.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from transferlab.config import PositiveInt
from transferlab.data.pool import LabelledPool
from transferlab.errors import ConfigError, DataError

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}


class ImageColumn:
    """Images of a dataset's rows, decoded per batch: `column[positions]` → float32 tensor
    (len, 3, size, size) in [0, 1]. `take(positions)` is a view on fewer rows (no decoding)."""

    ndim = 4
    dtype = np.dtype(np.float32)
    decodes = True  # loaders give it worker processes (data.num_workers)

    def __init__(self, dataset, column: str, rows: np.ndarray, size: int, origin: str):
        self.dataset, self.column, self.rows, self.size, self.origin = dataset, column, rows, size, origin

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), 3, self.size, self.size)

    def with_rows(self, rows: np.ndarray) -> "ImageColumn":
        return ImageColumn(self.dataset, self.column, rows, self.size, self.origin)

    def take(self, positions) -> "ImageColumn":
        return self.with_rows(self.rows[np.asarray(positions)])

    @property
    def identity(self) -> str:
        """What the images are (for cache keys): the dataset's fingerprint, the rows, the size."""
        h = hashlib.sha256(f"{self.origin}|{self.column}|{self.size}".encode())
        h.update(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes())
        return h.hexdigest()

    def __getitem__(self, index) -> torch.Tensor:
        positions = np.atleast_1d(np.asarray(index.tolist() if torch.is_tensor(index) else index))
        records = self.dataset[self.rows[positions].tolist()][self.column]
        pixels = torch.from_numpy(np.stack([self._decode(record) for record in records]))  # (N, H, W, 3) uint8
        out = torch.empty(0)
        if torch.utils.data.get_worker_info() is not None:
            # in a loader worker: written straight into shared memory, as DataLoader's own collate
            # does, so sending the batch to the training process copies nothing (~15% of images/s)
            out = out.new(out.untyped_storage()._new_shared(pixels.numel() * out.element_size()))
        out = out.resize_(pixels.shape[0], 3, self.size, self.size)  # channels first, contiguous
        return out.copy_(pixels.permute(0, 3, 1, 2)).div_(255.0)

    def _decode(self, record: dict) -> np.ndarray:
        from PIL import Image

        where = record.get("path") or "an image stored in the dataset"
        try:
            with Image.open(io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"]) as image:
                image = image.convert("RGB")
                if image.size != (self.size, self.size):
                    image = image.resize((self.size, self.size), Image.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"data: cannot decode {where} ({type(e).__name__}: {e}); remove or replace the file") from None


class TextColumn:
    """Texts of a dataset's rows, read from its Arrow table when asked: iterating gives the strings;
    `tokenized(tokenizer, max_length)` gives their token ids through `datasets.map`, whose result
    is cached on disk beside the dataset's own files (a second run of the same data and tokenizer
    reads it back). `take(positions)` is a view on fewer rows."""

    ndim = 1
    dtype = np.dtype(object)  # what LabelledPool.is_text reads

    def __init__(self, dataset, column: str, rows: np.ndarray, origin: str):
        self.dataset, self.column, self.rows, self.origin = dataset, column, rows, origin

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows),)

    def with_rows(self, rows: np.ndarray) -> "TextColumn":
        return TextColumn(self.dataset, self.column, rows, self.origin)

    def take(self, positions) -> "TextColumn":
        return self.with_rows(self.rows[np.asarray(positions)])

    def __getitem__(self, i: int) -> str:
        return self.dataset[int(self.rows[i])][self.column]

    def __iter__(self):
        return iter(self.dataset.select(self.rows)[self.column])

    def tokenized(self, tokenizer, max_length: int) -> list[list[int]]:
        """Token ids of these rows (truncated to max_length, special tokens added, no padding)."""
        key = hashlib.sha256(repr((self.origin, self.column, self.dataset._fingerprint, type(tokenizer).__name__,
                                   tokenizer.name_or_path, len(tokenizer), max_length)).encode()).hexdigest()[:16]
        if key not in _TOKENIZED:
            column = self.column

            def encode(batch):
                return {"input_ids": tokenizer(batch[column], truncation=True, max_length=max_length,
                                               return_token_type_ids=False, return_attention_mask=False)["input_ids"]}

            _TOKENIZED.clear()  # one dataset at a time is enough (a run's splits share it)
            _TOKENIZED[key] = self.dataset.map(encode, batched=True, remove_columns=self.dataset.column_names,
                                               new_fingerprint=key)
        return _TOKENIZED[key].select(self.rows)["input_ids"]


_TOKENIZED: dict = {}  # fingerprint → the mapped dataset, so the splits of one run tokenize once


Column = (ImageColumn, TextColumn)


def take(x, positions):
    """Rows `positions` of a pool's inputs: a numpy array (images, texts) or a column view.
    np.take, as scikit-learn's splitters index: fancy indexing can give a size-1 axis another
    stride, which PyTorch reads as channels-last and convolves by another kernel (other roundings)."""
    return x.take(positions) if isinstance(x, Column) else np.take(x, positions, axis=0)


def concatenate(parts: list):
    """Inputs of several cuts of one pool, in order."""
    if isinstance(parts[0], Column):  # views of one table (pick_splits' concatenation)
        return parts[0].with_rows(np.concatenate([p.rows for p in parts]))
    return np.concatenate(parts)


# -- loading ------------------------------------------------------------------------------------
def import_datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("data=hf needs Hugging Face datasets: pip install datasets") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def file_patterns(data_files) -> list[str]:
    """data_files (a path or glob, a list of them, or {split: either}) as a flat list."""
    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    return [str(p) for v in values for p in ([v] if isinstance(v, str) else list(v))]


def matches(pattern: str) -> list[str]:
    return glob.glob(os.path.expanduser(pattern), recursive=True)


def check_data_files(data_files) -> None:
    """A path or glob that matches nothing fails here, in one line, not deep inside a builder."""
    for p in file_patterns(data_files):
        if not matches(p):
            raise ConfigError(f"data.dataset.data_files: '{p}' matches no file (from {os.getcwd()}); "
                              "give a path or glob that exists")


def files_identity(data_files, data_dir) -> list:
    """Paths, sizes and modification times of the local files: an edited file changes it."""
    patterns = [] if data_files is None else file_patterns(data_files)
    if data_dir is not None:
        patterns.append(str(Path(data_dir) / "**" / "*"))
    files = sorted({f for p in patterns for f in matches(p) if os.path.isfile(f)})
    return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]


def open_dataset(builder, data_files, data_dir, from_disk, from_function, config_name, encoding):
    datasets = import_datasets()
    if from_function is not None:  # the Python way: anything a function can build
        from hydra.utils import get_method

        if os.getcwd() not in sys.path:  # the console script's path does not hold the working directory
            sys.path.insert(0, os.getcwd())
        try:
            made = get_method(from_function)()
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"data.dataset.from_function={from_function}: cannot import it ({e}); give "
                              "module.function, importable from the working directory") from None
        if not isinstance(made, (datasets.Dataset, datasets.DatasetDict)):
            raise ConfigError(f"data.dataset.from_function={from_function} returned {type(made).__name__}; "
                              "return a datasets.Dataset or DatasetDict")
        splits = dict(made) if isinstance(made, datasets.DatasetDict) else {"train": made}
        return splits, [from_function, {name: d._fingerprint for name, d in splits.items()}]
    if from_disk is not None:
        if not Path(from_disk).is_dir():
            raise ConfigError(f"data.dataset.from_disk: {from_disk} is not a folder (save one with "
                              "Dataset.save_to_disk)")
        loaded = datasets.load_from_disk(str(from_disk))
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return splits, [from_disk, {name: d._fingerprint for name, d in splits.items()}]
    if builder is None:
        raise ConfigError("data=hf: set data.dataset.builder (csv, json, parquet, text, imagefolder or a hub "
                          "dataset id) with data_files / data_dir, or data.dataset.from_disk / from_function")
    if data_files is not None:
        check_data_files(data_files)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ConfigError(f"data.dataset.data_dir: {data_dir} is not a folder")
    kwargs = {"encoding": encoding} if encoding is not None and builder == "csv" else {}
    try:
        loaded = datasets.load_dataset(builder, config_name, data_files=data_files, data_dir=data_dir, **kwargs)
    except (FileNotFoundError, ConnectionError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True", "YES", "yes")
        hint = " and HF_HUB_OFFLINE=1: it is not in the local HF cache" if offline else ""
        raise ConfigError(f"data.dataset.builder={builder}: cannot load it ({type(e).__name__}{hint}); "
                          "download it once on a machine with a network, or point data_files at local files") from None
    except Exception as e:  # builders raise many types for unreadable input
        cause = e.__cause__ or e
        raise DataError(f"data.dataset.builder={builder}: could not read {data_files or data_dir or builder} "
                        f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
    splits = dict(loaded)
    return splits, [builder, config_name, {name: d._fingerprint for name, d in splits.items()},
                    files_identity(data_files, data_dir)]


def pick_splits(splits: dict) -> dict[str, Any]:
    """{"train", "val", "test"} → the dataset's split of that role (val / test may be None)."""
    chosen = {}
    for role, names in SPLIT_NAMES.items():
        chosen[role] = next((splits[n] for n in names if n in splits), None)
    if chosen["train"] is None:
        if len(splits) != 1:
            raise ConfigError(f"data: the dataset has splits {sorted(splits)} and none is named train")
        chosen["train"] = next(iter(splits.values()))
    return chosen


def require_column(dataset, column: str, key: str) -> None:
    if column not in dataset.column_names:
        raise ConfigError(f"data.dataset.{key}={column}: no such column; the dataset's columns are "
                          f"{', '.join(dataset.column_names)}")


def no_missing(values: list, column: str) -> None:
    missing = sum(v is None or (isinstance(v, float) and np.isnan(v)) for v in values)
    if missing:
        raise DataError(f"data: column '{column}' has {missing} missing value(s); drop or fill those rows")


def encode(values: list, column: str, names: Optional[list[str]] = None) -> tuple[np.ndarray, list[str]]:
    """Ids for a label column: a ClassLabel's ids as they are, else the sorted distinct values."""
    no_missing(values, column)
    if names is not None:
        return np.asarray(values, dtype=np.int64), list(names)
    distinct = sorted(set(values), key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(distinct)}
    return np.array([index[v] for v in values], dtype=np.int64), [str(v) for v in distinct]


def class_label_names(dataset, column: str) -> Optional[list[str]]:
    feature = dataset.features[column]
    return list(feature.names) if hasattr(feature, "names") else None


def load_hf(builder: Optional[str] = None, data_files: Union[str, list, dict, None] = None,
            data_dir: Optional[str] = None, from_disk: Optional[str] = None, from_function: Optional[str] = None,
            config_name: Optional[str] = None,
            input_column: Optional[str] = None, label_column: str = "label", words_column: Optional[str] = None,
            tags_column: Optional[str] = None, domain_column: Optional[str] = None, image_size: PositiveInt = 224,
            encoding: Optional[str] = None, name: Optional[str] = None) -> LabelledPool:
    """A LabelledPool from a Hugging Face dataset (see the module docstring)."""
    splits, origin = open_dataset(builder, data_files, data_dir, from_disk, from_function, config_name, encoding)
    parts = pick_splits(splits)
    present = [role for role in ("train", "val", "test") if parts[role] is not None]
    first = parts["train"]
    title = name or Path(str(from_disk or data_dir or from_function
                             or (data_files if isinstance(data_files, str) else builder))).name
    fingerprint = hashlib.sha256(repr(origin).encode()).hexdigest()[:20]

    if (words_column is None) != (tags_column is None):
        raise ConfigError("data.dataset: token classification needs both words_column and tags_column")
    token_labels = words_column is not None
    if token_labels:
        require_column(first, words_column, "words_column")
        require_column(first, tags_column, "tags_column")
    else:
        require_column(first, label_column, "label_column")
    if input_column is None and not token_labels:
        images = [c for c, f in first.features.items() if type(f).__name__ == "Image"]
        input_column = images[0] if images else "text"
    if not token_labels:
        require_column(first, input_column, "input_column")
    if domain_column is not None:
        require_column(first, domain_column, "domain_column")
    for role in present:
        missing = [c for c in (input_column, label_column, words_column, tags_column, domain_column)
                   if c is not None and not (token_labels and c in (input_column, label_column))
                   and c not in parts[role].column_names]
        if missing:
            raise ConfigError(f"data: the dataset's {role} split has no column '{missing[0]}' (its columns: "
                              f"{', '.join(parts[role].column_names)})")

    if token_labels:
        return token_pool(parts, present, words_column, tags_column, title, fingerprint)

    is_image = type(first.features[input_column]).__name__ == "Image"
    datasets = import_datasets()
    if not is_image and getattr(first.features[input_column], "dtype", None) not in ("string", "large_string"):
        raise ConfigError(f"data.dataset.input_column={input_column}: neither images nor text "
                          f"({first.features[input_column]}); name an image or text column")
    for role in present:
        if not is_image and parts[role].data.column(input_column).null_count:
            raise DataError(f"data: column '{input_column}' has {parts[role].data.column(input_column).null_count} "
                            f"missing value(s) in the {role} split; drop or fill those rows")
    # one table for all splits: row numbers then index every split (cuts may mix them, e.g. OOD)
    whole = datasets.concatenate_datasets([parts[r].select_columns([input_column]) for r in present])
    if is_image:
        whole = whole.cast_column(input_column, datasets.Image(decode=False))
    names = class_label_names(first, label_column)
    labels = {r: parts[r][label_column] for r in present}
    all_ids, class_names = encode([v for r in present for v in labels[r]], label_column, names)
    domain_ids = domain_names = None
    if domain_column is not None:
        domain_ids, domain_names = encode([v for r in present for v in parts[r][domain_column]], domain_column,
                                          class_label_names(first, domain_column))

    arrays: dict[str, dict] = {}
    offset = 0
    for role in present:
        n = len(parts[role])
        rows = np.arange(offset, offset + n)
        if is_image:
            x = ImageColumn(whole, input_column, rows, image_size, fingerprint)
        else:
            x = TextColumn(whole, input_column, rows, fingerprint)
        arrays[role] = {"x": x, "y": all_ids[offset:offset + n],
                        "domain": None if domain_ids is None else domain_ids[offset:offset + n]}
        offset += n
    get = lambda role, key: arrays[role][key] if role in arrays else None  # noqa: E731
    return LabelledPool(get("train", "x"), get("train", "y"), get("test", "x"), get("test", "y"), class_names,
                        name=title, domain_train=get("train", "domain"), domain_test=get("test", "domain"),
                        domain_names=domain_names, x_val=get("val", "x"), y_val=get("val", "y"),
                        domain_val=get("val", "domain"), fingerprint=fingerprint)


def token_pool(parts: dict, present: list[str], words_column: str, tags_column: str, title: str,
               fingerprint: str) -> LabelledPool:
    """Token classification: x an object array of word tuples, y one int64 tag array per example."""
    first = parts["train"]
    feature = first.features[tags_column]
    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) / List(ClassLabel)
    names = list(inner.names) if hasattr(inner, "names") else None
    words = {r: parts[r][words_column] for r in present}
    tags = {r: parts[r][tags_column] for r in present}
    for r in present:
        for i, (w, t) in enumerate(zip(words[r], tags[r])):
            if w is None or t is None or len(w) != len(t):
                raise DataError(f"data: row {i} of the {r} split has {0 if w is None else len(w)} words in "
                                f"'{words_column}' but {0 if t is None else len(t)} tags in '{tags_column}'; "
                                "give one tag per word")
    if names is None:
        names = sorted({tag for r in present for sentence in tags[r] for tag in sentence})
        index = {tag: i for i, tag in enumerate(names)}
        ids = {r: [np.array([index[t] for t in s], dtype=np.int64) for s in tags[r]] for r in present}
    else:
        ids = {r: [np.asarray(s, dtype=np.int64) for s in tags[r]] for r in present}

    def objects(items):
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out

    x = {r: objects([tuple(w) for w in words[r]]) for r in present}
    y = {r: objects(ids[r]) for r in present}
    # splits.py cuts token tasks by example from one pool: the dataset's own splits come along as
    # fixed val/test examples
    return LabelledPool(x["train"], y["train"], x.get("test"), y.get("test"), [str(n) for n in names], name=title,
                        token_labels=True, x_val=x.get("val"), y_val=y.get("val"), fingerprint=fingerprint)
