"""Prepare the paper's Amazon datasets (Amazon Review Data 2018) as RecBole atomic files.

Recipe of UniSRec (Hou et al., KDD 2022): keep interactions whose item has metadata, iterative 5-core on users
and items, each user's interactions in time order, item text from title, categories and brand. The raw files
(ratings-only CSV and metadata json.gz per category) are read from ``raw_dir`` or downloaded into it
(download.py resumes a cut transfer).

    python -m recbole_darec.data.prepare amazon-arts [--raw_dir D] [--out_dir D] [--url_base U]
                                                     [--no_download]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import html
import http.client
import json
import logging
import math
import re
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from recbole_darec.data.download import DownloadError, download_file
from recbole_darec.errors import DatasetUnavailableError, RawDataError, run_cli
from recbole_darec.files import atomic_write

logger = logging.getLogger(__name__)

AMAZON_DATASETS: dict[str, str] = {
    "amazon-arts": "Arts_Crafts_and_Sewing",
    "amazon-scientific": "Industrial_and_Scientific",
    "amazon-instruments": "Musical_Instruments",
    "amazon-pantry": "Prime_Pantry",
    "amazon-games": "Video_Games",
}

DEFAULT_URL_BASE = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2"
SOURCE_PAGE = "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon_v2/"
RATINGS_SUBDIR = "categoryFilesSmall"
META_SUBDIR = "metaFiles2"

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token_seq\ttext:token_seq"

# UniSRec blanks longer fields: in the 2018 dumps they are scraped page fragments, not product text.
MAX_FIELD_CHARS = 2000
_MAX_EXAMPLES = 3  # malformed line numbers quoted in the warning

_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]*>", re.S)
_SPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# IDs become RecBole tokens: whitespace or quotes would break the tab-separated reader.
_VALID_ID = re.compile(r'[^\s",]+')
# item,user,rating,time; one regex per line keeps multi-million-line CSVs fast
_RATING_LINE = re.compile(rb'\s*([^\s",]+)\s*,\s*([^\s",]+)\s*,\s*([^\s,]+)\s*,\s*([^\s,]+)\s*')


@dataclass
class PrepareStats:
    name: str
    users: int
    items: int
    interactions: int
    avg_seq_len: float
    items_without_text: int
    malformed_rating_lines: int
    malformed_meta_lines: int
    dropped_no_meta: int  # interactions whose item has no metadata record (or no title with require_title)
    raw_interactions: int  # well-formed rating lines
    duplicate_interactions: int  # identical (user, item, rating, time) lines, kept once as in UniSRec
    kcore_rounds: int
    output_dir: str = ""

    def table(self) -> str:
        rows = [
            ("dataset", self.name),
            ("users", f"{self.users:,}"),
            ("items", f"{self.items:,}"),
            ("interactions", f"{self.interactions:,}"),
            ("average length", f"{self.avg_seq_len:.2f}"),
            ("items without text", f"{self.items_without_text:,}"),
            ("malformed rating lines", f"{self.malformed_rating_lines:,}"),
            ("malformed meta lines", f"{self.malformed_meta_lines:,}"),
            ("dropped (no metadata)", f"{self.dropped_no_meta:,}"),
            ("duplicate lines", f"{self.duplicate_interactions:,}"),
            ("output", self.output_dir),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def raw_file_names(name: str) -> tuple[str, str]:
    """(ratings CSV, metadata json.gz) file names of an ``amazon-*`` dataset."""
    category = _category(name)
    return f"{category}.csv", f"meta_{category}.json.gz"


def raw_file_urls(name: str, url_base: str | None = None) -> tuple[str, str]:
    base = (url_base or DEFAULT_URL_BASE).rstrip("/")
    ratings, meta = raw_file_names(name)
    return f"{base}/{RATINGS_SUBDIR}/{ratings}", f"{base}/{META_SUBDIR}/{meta}"


def _category(name: str) -> str:
    try:
        return AMAZON_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(AMAZON_DATASETS)}") from None


# ---------------------------------------------------------------- text


def clean_text(value: object) -> str:
    """One line of plain text, safe for RecBole's tab-separated pandas reader."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        # 2014 dumps nest category paths (list of lists); 2018 ones use a flat list.
        value = " ".join(clean_text(v) for v in value)
    elif not isinstance(value, str):
        value = str(value)
    for _ in range(3):  # some fields are escaped twice ("&amp;amp;")
        unescaped = html.unescape(value)
        if unescaped == value:
            break
        value = unescaped
    value = _TAG.sub(" ", value).replace('"', "")
    value = _CONTROL.sub(" ", _SPACE.sub(" ", value))
    value = _SPACE.sub(" ", value).strip()
    # Trailing dots go: the text joins fields with ". " (UniSRec's clean_text keeps exactly one).
    value = value.rstrip(". ")
    return "" if len(value) >= MAX_FIELD_CHARS else value


def item_fields(record: dict) -> tuple[str, str, str]:
    """(title, categories, brand) of one metadata record, cleaned."""
    categories = record.get("category")
    if categories is None:
        categories = record.get("categories")
    return clean_text(record.get("title")), clean_text(categories), clean_text(record.get("brand"))


def item_text(title: str, categories: str, brand: str) -> str:
    return " ".join(f"{part}." for part in (title, categories, brand) if part)


# ---------------------------------------------------------------- raw files


def _unavailable_message(name: str, raw_dir: Path, missing: list[Path], url_base: str | None) -> str:
    ratings_url, meta_url = raw_file_urls(name, url_base)
    ratings, meta = raw_file_names(name)
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"Dataset '{name}' needs the Amazon Review Data (2018) files of category '{_category(name)}', and "
        f"{' and '.join(p.name for p in missing)} {verb} missing from {raw_dir}. "
        f"Put {ratings} (ratings only) and {meta} (metadata) in that folder, "
        f"or pass the folder that holds them with --raw_dir, then run "
        f"`python -m recbole_darec.data.prepare {name} --raw_dir <folder>`. "
        f"They are published at {SOURCE_PAGE} (direct links: {ratings_url} and {meta_url})."
    )


def fetch_raw_files(
    name: str, raw_dir: str | Path, url_base: str | None = None, download: bool = True
) -> tuple[Path, Path]:
    """Paths of the ratings CSV and metadata json.gz in ``raw_dir``, downloading the missing ones."""
    raw_dir = Path(raw_dir)
    paths = [raw_dir / f for f in raw_file_names(name)]
    missing = [p for p in paths if not p.exists()]
    if missing and not download:
        raise DatasetUnavailableError(_unavailable_message(name, raw_dir, missing, url_base))
    urls = dict(zip(paths, raw_file_urls(name, url_base)))
    for path in missing:
        try:
            download_file(urls[path], path)
        except (DownloadError, OSError, http.client.HTTPException) as e:
            message = _unavailable_message(name, raw_dir, [p for p in paths if not p.exists()], url_base)
            raise DatasetUnavailableError(f"{message} Downloading {urls[path]} failed: {e}.") from e
    return paths[0], paths[1]


# ---------------------------------------------------------------- parsing


class _Ratings:
    """Rating lines as compact integer-coded arrays (the CSVs hold millions of lines)."""

    def __init__(self) -> None:
        self.user_ids: dict[str, int] = {}
        self.item_ids: dict[str, int] = {}
        self.user, self.item = array("q"), array("q")
        self.rating, self.time = array("d"), array("d")
        self.malformed = 0
        self.malformed_examples: list[int] = []


def read_ratings(path: Path) -> _Ratings:
    out = _Ratings()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"ratings {path.name}"
    ) as bar:
        pending = 0
        for lineno, raw in enumerate(f, 1):
            pending += len(raw)
            if pending >= 1 << 20:
                bar.update(pending)
                pending = 0
            parsed = _parse_rating(raw)
            if parsed is None:
                if raw.strip():  # a blank line carries no data
                    out.malformed += 1
                    if len(out.malformed_examples) < _MAX_EXAMPLES:
                        out.malformed_examples.append(lineno)
                continue
            item, user, rating, time = parsed
            out.user.append(out.user_ids.setdefault(user, len(out.user_ids)))
            out.item.append(out.item_ids.setdefault(item, len(out.item_ids)))
            out.rating.append(rating)
            out.time.append(time)
        bar.update(pending)
    return out


def _parse_rating(raw: bytes) -> tuple[str, str, float, float] | None:
    match = _RATING_LINE.fullmatch(raw)
    if match is None:
        return None
    item, user, rating, time = match.groups()
    try:
        rating_value, time_value = float(rating), float(time)
        item_id, user_id = item.decode("utf-8"), user.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if not (math.isfinite(rating_value) and math.isfinite(time_value)):
        return None
    return item_id, user_id, rating_value, time_value


def iter_meta(path: Path) -> Iterator[tuple[int, dict | None]]:
    """(line number, record) per metadata line; record is None for a malformed line.

    Streams the gzip line by line, so memory does not grow with the file (several GB for some categories).
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as raw, gzip.open(raw, "rb") as f, tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"metadata {path.name}"
        ) as bar:
            for lineno, line in enumerate(f, 1):
                if lineno % 4096 == 0:
                    bar.update(raw.tell() - bar.n)
                if line.strip():
                    yield lineno, _parse_meta(line)
            bar.update(raw.tell() - bar.n)
    except (OSError, EOFError, zlib.error) as e:
        raise RawDataError(
            f"{path} is not a complete gzip file ({e}); delete it and download it again"
        ) from e


def _parse_meta(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        try:
            # Older dumps write Python dict literals (single quotes), one per line.
            record = ast.literal_eval(line.decode("utf-8").strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError):
            return None
    if not isinstance(record, dict) or not isinstance(record.get("asin"), str):
        return None
    if not _VALID_ID.fullmatch(record["asin"].strip()):
        return None
    return record


def read_meta(path: Path, wanted: dict[str, int]) -> tuple[dict[int, tuple[str, str, str]], int, list[int]]:
    """Cleaned (title, categories, brand) per wanted item id, the malformed line count and a few line numbers.

    Only items in ``wanted`` are kept, and the first record of an item wins (some dumps repeat items).
    """
    fields: dict[int, tuple[str, str, str]] = {}
    malformed, examples = 0, []
    for lineno, record in iter_meta(path):
        if record is None:
            malformed += 1
            if len(examples) < _MAX_EXAMPLES:
                examples.append(lineno)
            continue
        item = wanted.get(record["asin"].strip())
        if item is not None and item not in fields:
            fields[item] = item_fields(record)
    return fields, malformed, examples


# ---------------------------------------------------------------- recipe


def k_core(user: np.ndarray, item: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Iterative k-core: drop users and items with fewer than k interactions until none is dropped."""
    keep = keep.copy()
    rounds = 0
    while True:
        user_count = np.bincount(user[keep], minlength=int(user.max(initial=0)) + 1)
        item_count = np.bincount(item[keep], minlength=int(item.max(initial=0)) + 1)
        drop = keep & ((user_count[user] < k) | (item_count[item] < k))
        if not drop.any():
            return keep, rounds
        keep &= ~drop
        rounds += 1


def prepare_dataset(
    name: str,
    raw_dir: str,
    out_dir: str,
    url_base: str | None = None,
    download: bool = True,
    k: int = 5,
    require_title: bool = False,
) -> PrepareStats:
    """Write ``<out_dir>/<name>/<name>.inter`` and ``.item`` from the raw files in ``raw_dir``.

    Missing raw files are downloaded into ``raw_dir`` when ``download`` is true.

    ``require_title=True`` also drops items whose metadata has no title; the default keeps every item with a
    metadata record, as UniSRec does, so the published statistics are reproduced.
    """
    ratings_path, meta_path = fetch_raw_files(name, raw_dir, url_base, download)
    ratings = read_ratings(ratings_path)
    fields, malformed_meta, meta_examples = read_meta(meta_path, ratings.item_ids)

    user = np.asarray(ratings.user, dtype=np.int64)
    item = np.asarray(ratings.item, dtype=np.int64)
    rating = np.asarray(ratings.rating, dtype=np.float64)
    time = np.asarray(ratings.time, dtype=np.float64)

    has_meta = np.zeros(len(ratings.item_ids), dtype=bool)
    for item_id, (title, _, _) in fields.items():
        has_meta[item_id] = bool(title) or not require_title
    with_meta = has_meta[item] if len(item) else np.zeros(0, dtype=bool)

    # UniSRec reads the ratings into a set: identical lines count once.
    first = ~pd.DataFrame({"u": user, "i": item, "r": rating, "t": time}).duplicated().to_numpy()
    duplicates = int(len(user) - first.sum())

    keep, rounds = k_core(user, item, with_meta & first, k)
    if not keep.any():
        raise RawDataError(f"{name}: no interaction is left after the {k}-core filter: check the raw files")
    rows = np.flatnonzero(keep)
    # lexsort is stable: equal (user, time) keep their order in the file.
    rows = rows[np.lexsort((time[rows], user[rows]))]

    user_names = list(ratings.user_ids)
    item_names = list(ratings.item_ids)
    kept_items = np.unique(item[rows])
    texts = {int(i): (*fields[int(i)], item_text(*fields[int(i)])) for i in kept_items}

    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    inter_file, item_file = target / f"{name}.inter", target / f"{name}.item"
    inter_lines = (
        f"{user_names[u]}\t{item_names[i]}\t{_format_time(t)}"
        for u, i, t in zip(user[rows].tolist(), item[rows].tolist(), time[rows].tolist())
    )
    item_lines = (f"{item_names[i]}\t" + "\t".join(v) for i, v in texts.items())
    # The .inter file marks a prepared dataset (ensure_dataset checks it), so it is moved into place last.
    _write_table(item_file, ITEM_HEADER, item_lines)
    _write_table(inter_file, INTER_HEADER, inter_lines)

    n_users = int(np.unique(user[rows]).size)
    stats = PrepareStats(
        name=name,
        users=n_users,
        items=int(kept_items.size),
        interactions=int(rows.size),
        avg_seq_len=rows.size / n_users,
        items_without_text=sum(1 for v in texts.values() if not v[3]),
        malformed_rating_lines=ratings.malformed,
        malformed_meta_lines=malformed_meta,
        dropped_no_meta=int((~with_meta).sum()),
        raw_interactions=len(user),
        duplicate_interactions=duplicates,
        kcore_rounds=rounds,
        output_dir=str(target),
    )
    if ratings.malformed or malformed_meta:
        logger.warning(
            "%s: skipped %d malformed rating line(s) in %s (e.g. line %s) and %d malformed metadata line(s) "
            "in %s (e.g. line %s)",
            name, ratings.malformed, ratings_path, ratings.malformed_examples or "-",
            malformed_meta, meta_path, meta_examples or "-",
        )
    logger.info("prepared %s: %s", name, asdict(stats))
    return stats


def _format_time(t: float) -> str:
    return str(int(t)) if t.is_integer() else repr(t)


def _write_table(path: Path, header: str, lines: Iterator[str]) -> None:
    # newline="\n": RecBole reads the header with readline()[:-1]; a "\r" would stick to the last field.
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(header + "\n")
        for line in lines:
            f.write(line + "\n")


def ensure_dataset(
    name: str, data_path: str, raw_dir: str | None = None, url_base: str | None = None
) -> bool:
    """Prepare ``<data_path>/<name>`` if it is an ``amazon-*`` dataset not prepared yet; True if it did."""
    if name not in AMAZON_DATASETS or (Path(data_path) / name / f"{name}.inter").exists():
        return False
    raw = raw_dir or str(Path(data_path) / "raw" / name)
    logger.info("dataset %s is not in %s: preparing it from the raw files in %s", name, data_path, raw)
    prepare_dataset(name, raw, data_path, url_base=url_base, download=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_darec.data.prepare",
        description="Prepare an Amazon Review Data (2018) dataset as RecBole atomic files (UniSRec recipe).",
    )
    parser.add_argument("name", choices=sorted(AMAZON_DATASETS))
    parser.add_argument("--out_dir", default="dataset", help="receives <name>/ (default: %(default)s)")
    parser.add_argument("--raw_dir", default=None, help="raw files folder (default: <out_dir>/raw/<name>)")
    parser.add_argument("--url_base", default=None, help=f"download location (default: {DEFAULT_URL_BASE})")
    parser.add_argument("--no_download", action="store_true", help="only use the files already in --raw_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    raw_dir = args.raw_dir or str(Path(args.out_dir) / "raw" / args.name)

    def prepare_and_report() -> None:
        stats = prepare_dataset(args.name, raw_dir, args.out_dir, url_base=args.url_base,
                                download=not args.no_download)
        print(stats.table())

    return run_cli(prepare_and_report)


if __name__ == "__main__":
    sys.exit(main())
