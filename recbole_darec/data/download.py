"""Download one file over HTTP(S) with resume: through ``<dest>.part``, put in place only once it is complete.

Used by prepare.py for the raw Amazon files (several GB for some categories), where a dropped connection must not
cost the bytes already received.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download did not complete or did not verify; nothing was put in place."""


def download_file(url: str, dest: str | Path, timeout: float = 60.0, attempts: int = 3) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a previous partial download.

    The file is moved into place only once its size matches Content-Length and, for ``.gz``, it decompresses
    completely (CRC included). A transfer cut short keeps the ``.part`` for the next resume; a corrupt gzip
    is deleted, since resuming it cannot repair it.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            _transfer(url, part, timeout)
            break
        except urllib.error.HTTPError:
            raise
        except (OSError, http.client.HTTPException) as e:
            after = part.stat().st_size if part.exists() else 0
            # Retry only while bytes keep arriving: an unreachable host fails the same way every time.
            if attempt == attempts or after <= before:
                raise DownloadError(
                    f"download of {url} did not complete ({e}); {after:,} bytes are kept in {part} "
                    "and the next run resumes from there"
                ) from e
            logger.warning("download of %s interrupted (%s), resuming at byte %d", url, e, after)
    if dest.name.endswith(".gz") and not _gzip_ok(part):
        part.unlink()
        raise DownloadError(f"{url} is not a valid gzip file (corrupt or truncated); the download is deleted")
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, timeout: float, resume: bool = True) -> None:
    offset = part.stat().st_size if resume and part.exists() else 0
    headers = {"User-Agent": "recbole-darec"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is not a prefix of this file: start over
            part.unlink()
            return _transfer(url, part, timeout, resume=False)
        raise
    with response:
        if offset and response.status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink()
                return _transfer(url, part, timeout, resume=False)
            mode = "ab"
        else:  # a 200 answer to a Range request: the server sends the whole file
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, mode) as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5]
        ) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"received {size:,} of {total:,} bytes")


def _gzip_ok(path: Path) -> bool:
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error):
        return False
    return True
