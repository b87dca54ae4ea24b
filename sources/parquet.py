"""Parquet and Arrow datasets as inputs: `.parquet` files, folders of them (an HF hub snapshot),
`datasets.save_to_disk` folders (`.arrow` files), and hub ids (`hf://org/name[:split]`).

Rows follow the messages/conversations + images convention. The image column (`images`, else
`image`) holds, per row, one image or a list of them, each as raw bytes, an HF Image record
`{"bytes", "path"}`, or a path (relative to --media-dir, else to the file's folder).

Memory stays bounded on files far larger than RAM. Listing the rows reads every column except
image bytes (only the `path` field of `{"bytes", "path"}` records; a column of raw bytes is
streamed batch by batch and only counted). The bytes are read later, when a loader thread asks
for them, from a sequential cursor over the file that keeps a few small batches: the pipeline
asks for rows nearly in order, so each byte is read once.

Keys are `make_key(id or "{stem}_{row}", "{file}#{row}")`, the same rule as for json datasets,
so resume and --retry-failures work alike.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from .items import ImageRef, SourceItem, make_key
from .readers import SourceError
from .records import RecordError, read_record

TABLE_EXTENSIONS = (".parquet", ".arrow")
HUB_PREFIX = "hf://"
IMAGE_COLUMNS = ("images", "image")
BATCH_ROWS = 16          # rows per batch the image cursor reads
KEPT_BATCHES = 8         # batches the cursor keeps behind its head: the loaders' look-ahead
OPEN_CURSORS = 2         # files whose cursors stay open (inputs are read in order)


class TableSourceError(SourceError):
    """A table input that cannot be read at all."""


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise TableSourceError("parquet/arrow inputs need pyarrow: pip install pyarrow") from None
    return pa, pc, pq


def is_table_file(path: str) -> bool:
    return path.lower().endswith(TABLE_EXTENSIONS)


def table_files_in(folder: str) -> list[str]:
    """The data files of a dataset folder: a save_to_disk folder's `.arrow` files (in the order
    its state.json lists them) or the `.parquet` files under it (sorted); [] for other folders."""
    state = os.path.join(folder, "state.json")
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as f:
                names = [d["filename"] for d in json.load(f).get("_data_files", [])]
        except (OSError, ValueError, KeyError, TypeError):
            names = []
        files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
        if files:
            return files
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        found.extend(os.path.join(dirpath, fn) for fn in sorted(filenames) if fn.lower().endswith(".parquet"))
    return found


# -- one table file: schema, batches from a row, image cells ---------------------------------------
class _Table:
    def __init__(self, path: str):
        self.path = path
        self.pa, self.pc, self.pq = _pa()
        try:
            if path.lower().endswith(".parquet"):
                # pre_buffer (pyarrow's default) caches every range it has read until the file
                # is closed: a whole 50 GB file over a run. Off, batches are read and freed.
                self._parquet = self.pq.ParquetFile(path, pre_buffer=False)
                self.schema = self._parquet.schema_arrow
                meta = self._parquet.metadata
                self._group_starts = []
                start = 0
                for i in range(meta.num_row_groups):
                    self._group_starts.append(start)
                    start += meta.row_group(i).num_rows
                self.num_rows = start
            else:
                # datasets writes Arrow IPC streams; memory-mapped, so nothing is read until touched.
                source = self.pa.memory_map(path, "r")
                try:
                    self._arrow = self.pa.ipc.open_stream(source).read_all()
                except self.pa.ArrowInvalid:
                    self._arrow = self.pa.ipc.open_file(source).read_all()
                self._parquet = None
                self.schema = self._arrow.schema
                self.num_rows = self._arrow.num_rows
        except (OSError, self.pa.ArrowException) as exc:
            raise TableSourceError(f"{path}: not a readable parquet/arrow file ({exc})") from None

    def batches(self, columns: list[str], start_row: int = 0) -> Iterator[tuple[int, Any]]:
        """(first row, RecordBatch) from the batch holding start_row to the end of the file."""
        if self._parquet is None:
            table = self._arrow.select([c.split(".")[0] for c in columns])
            for batch in table.slice(start_row).to_batches(max_chunksize=BATCH_ROWS):
                yield start_row, batch
                start_row += batch.num_rows
            return
        groups = [i for i, s in enumerate(self._group_starts) if s + self._rows_in(i) > start_row]
        row = self.first_read_row(start_row)
        for batch in self._parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=columns):
            yield row, batch
            row += batch.num_rows

    def first_read_row(self, row: int) -> int:
        """Where batches(row) starts reading: the row's row group (parquet) or the row (arrow)."""
        if self._parquet is None:
            return row
        return max((s for s in self._group_starts if s <= row), default=0)

    def _rows_in(self, group: int) -> int:
        return self._parquet.metadata.row_group(group).num_rows


def _image_column(schema) -> str | None:
    return next((c for c in IMAGE_COLUMNS if c in schema.names), None)


def _count_columns(table: _Table, image_col: str | None) -> list[str]:
    """What listing the rows reads: everything but image bytes."""
    pa = table.pa
    cols = [n for n in table.schema.names if n != image_col]
    if image_col is None:
        return cols
    typ = table.schema.field(image_col).type
    inner = typ.value_type if pa.types.is_list(typ) or pa.types.is_large_list(typ) else typ
    if pa.types.is_struct(inner) and inner.get_field_index("path") >= 0 and table._parquet is not None:
        return cols + [f"{image_col}.list.element.path" if inner is not typ else f"{image_col}.path"]
    return cols + [image_col]  # raw bytes or path strings: read (arrow: mapped, not touched)


def _image_counts(table: _Table, column) -> list[int]:
    pa, pc = table.pa, table.pc
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return [n or 0 for n in pc.list_value_length(column).to_pylist()]
    return [1 if valid else 0 for valid in pc.is_valid(column).to_pylist()]


def _plain(value: Any) -> Any:
    """A cell as JSON-able data for `extra` (bytes are left out: they are not conversation)."""
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# -- the image cursor --------------------------------------------------------------------------------
class _ImageCursor:
    """Sequential reader of one file's image column. Rows are asked for nearly in order by the
    loader threads; it keeps the last KEPT_BATCHES batches and restarts from the row's row group
    only when a row behind them is asked for (a retry, or threads far apart)."""

    def __init__(self, path: str, column: str):
        self.table = _Table(path)
        self.column = column
        self.lock = threading.Lock()
        self.kept: collections.deque[tuple[int, list]] = collections.deque(maxlen=KEPT_BATCHES)
        self._batches: Iterator | None = None
        self._next_row = 0

    def cell(self, row: int) -> Any:
        with self.lock:
            while True:
                for start, cells in self.kept:
                    if start <= row < start + len(cells):
                        return cells[row - start]
                if self._batches is None or row < self._next_row or self.table.first_read_row(row) > self._next_row:
                    # Behind what is kept, or in a later row group (resume skips rows): seek there.
                    self.kept.clear()
                    self._batches = self.table.batches([self.column], row)
                try:
                    start, batch = next(self._batches)
                except StopIteration:
                    self._batches = None
                    raise OSError(f"row {row} is beyond the end of {self.table.path}") from None
                self._next_row = start + batch.num_rows
                if self._next_row > row:  # skip batches wholly before the row without keeping them
                    self.kept.append((start, batch.column(0).to_pylist()))


class _Cursors:
    """The few open cursors, most recently used last."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open: collections.OrderedDict[tuple[str, str], _ImageCursor] = collections.OrderedDict()

    def get(self, path: str, column: str) -> _ImageCursor:
        with self.lock:
            cursor = self.open.pop((path, column), None) or _ImageCursor(path, column)
            self.open[(path, column)] = cursor
            while len(self.open) > OPEN_CURSORS:
                self.open.popitem(last=False)
            return cursor


_CURSORS = _Cursors()


@dataclass(frozen=True)
class TableImageRef(ImageRef):
    """Image `index` of the image cell at `row` of a parquet/arrow file (path)."""

    column: str = "images"
    row: int = 0
    index: int = 0
    base: str = ""   # folder that relative image paths are under

    def read(self) -> bytes:
        try:
            cell = _CURSORS.get(self.path, self.column).cell(self.row)
        except SourceError as exc:
            raise OSError(str(exc)) from None
        if isinstance(cell, list):
            cell = cell[self.index] if self.index < len(cell) else None
        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, (bytes, bytearray)):
            return bytes(cell)
        if isinstance(cell, str) and cell:
            full = cell if os.path.isabs(cell) else os.path.join(self.base, cell)
            try:
                with open(full, "rb") as f:
                    return f.read()
            except OSError as exc:  # name the file the cell points to, not only the row
                raise OSError(f"{exc.strerror or exc}: {full}") from None
        raise OSError(f"image cell {self.column}[{self.index}] of row {self.row} holds no bytes and no path")


# -- listing rows --------------------------------------------------------------------------------------
def read_table_file(path: str, media_dir: str | None, uri_base: str | None = None,
                    first_row: int = 0) -> Iterator[SourceItem]:
    """The rows of one parquet/arrow file as SourceItems; uri_base/first_row name rows of a hub
    dataset by its id and global row instead of its cache path."""
    abspath = os.path.abspath(path)
    base = os.path.abspath(media_dir) if media_dir else os.path.dirname(abspath)
    table = _Table(abspath)
    image_col = _image_column(table.schema)
    columns = _count_columns(table, image_col)
    stem = os.path.splitext(os.path.basename(path))[0]
    uri_base = uri_base or abspath
    for start, batch in table.batches(columns):
        counts = _image_counts(table, batch.column(image_col)) if image_col else [0] * batch.num_rows
        rows = batch.select([c for c in columns if c.split(".")[0] != image_col]).to_pylist()
        for offset, (record, n_images) in enumerate(zip(rows, counts)):
            index = first_row + start + offset
            uri = f"{uri_base}#{index}"
            name = str(record["id"]) if record.get("id") is not None else f"{stem}_{index}"
            refs = [TableImageRef(uri=f"{uri}/{image_col}/{i}", path=abspath, column=image_col,
                                  row=start + offset, index=i, base=base) for i in range(n_images)]
            if isinstance(record.get("tags"), str):  # ddaug's own --embed export stores tags as json text
                try:
                    record["tags"] = json.loads(record["tags"])
                except ValueError:
                    pass
            record = {k: _plain(v) for k, v in record.items() if v is not None}
            try:  # the same normalisation and ledger reasons as json/jsonl records
                rec = read_record(record, image_paths=False)
                messages, tags, extra, error = rec.messages, rec.tags, rec.extra, None
            except RecordError as exc:
                messages, tags, extra, error = [], {}, {}, str(exc)
            if error is None and not refs and not messages:
                error = "dataset row has neither images nor messages"
            yield SourceItem(key=make_key(name, uri), uri=uri, images=refs, messages=messages,
                             tags=tags, extra=extra, error=error)


def read_table_files(paths: list[str], media_dir: str | None) -> Iterator[SourceItem]:
    for path in paths:
        yield from read_table_file(path, media_dir)


def read_hub_dataset(spec: str, media_dir: str | None) -> Iterator[SourceItem]:
    """`hf://org/name[:split]` (or `hf://` + a local dataset folder): datasets downloads and
    prepares it in its own cache (HF_DATASETS_CACHE), then its Arrow files are read as above."""
    name, _, split = spec[len(HUB_PREFIX):].partition(":")
    try:
        import datasets
    except ImportError:
        raise TableSourceError(f"{spec}: hub datasets need the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network, unknown id, unknown split: one line for the user
        raise TableSourceError(f"{spec}: datasets cannot load it ({type(exc).__name__}: {exc})") from None
    first = 0
    for cache in ds.cache_files:
        table = _Table(cache["filename"])
        yield from read_table_file(cache["filename"], media_dir, uri_base=f"{HUB_PREFIX}{name}:{split or 'train'}",
                                   first_row=first)
        first += table.num_rows

