"""Amazon dataset preparation: the UniSRec recipe on a raw-format fixture, downloads from a local server."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recbole_darec.data import prepare
from recbole_darec.data.download import DownloadError, download_file
from recbole_darec.data.prepare import (
    AMAZON_DATASETS,
    DatasetUnavailableError,
    RawDataError,
    ensure_dataset,
    prepare_dataset,
)

NAME = "amazon-pantry"
CATEGORY = "Prime_Pantry"
RATINGS, META = f"{CATEGORY}.csv", f"meta_{CATEGORY}.json.gz"
T0 = 1_500_000_000
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

USERS = [f"U{k}" for k in range(1, 7)]
ITEMS = [f"A{j}" for j in range(1, 7)]

MALFORMED_RATINGS = [
    b"this is not a csv line\n",
    b"A1,U1,five,1500000000\n",
    b"A1,U1,5.0\n",
    b"A1,U1,5.0,1500000000,extra\n",
    b"\xff\xfe,U1,5.0,1500000000\n",  # not UTF-8
    b'"A1",U1,5.0,1500000000\n',  # a quoted ID would break RecBole's reader
]
MALFORMED_META = ["{not json", "[1, 2]", '{"title": "no asin"}']


def _rating_lines() -> list[str]:
    lines = []
    # 6 users x 6 items; per user, time order differs from the file's item-major order.
    for j, item in enumerate(ITEMS):
        for k, user in enumerate(USERS):
            if user == "U1" and item in ("A2", "A3"):
                continue
            lines.append(f"{item},{user},5.0,{T0 + 100 * ((5 * j + k) % 6)}")
    # U1's A3 and A2 share a time: the file order (A3 first) must survive.
    lines += [f"A3,U1,4.0,{T0 + 250}", f"A2,U1,3.0,{T0 + 250}"]
    lines.append(f"A1,U2,1.0,{T0 + 1000}")  # a repeat at another time is kept (UniSRec keeps repeats)
    lines.append(lines[20])  # an identical line counts once
    lines += [f"NOMETA,{u},5.0,{T0 + 50}" for u in USERS]  # no metadata: dropped before the k-core
    # UFEW has 4 interactions (dropped in round 1); CAS then falls from 5 to 4 (dropped in round 2).
    lines += [f"{i},UFEW,5.0,{T0 + 5}" for i in ("A1", "A2", "A3", "CAS")]
    lines += [f"CAS,{u},5.0,{T0 + 7}" for u in USERS[:4]]
    return lines


def _meta_lines() -> list[str]:
    records = [
        {
            "asin": "A1",
            "title": 'Caf&eacute; &amp;amp; Bar\t<b>Bold</b> "Quoted"\nsecond line...',
            "category": ["Grocery &amp; Gourmet Food", "Snacks"],
            "brand": "Acme\tCo",
        },
        {"asin": "A2", "title": "Plain Two", "category": []},
        {"asin": "A3", "title": "x" * 2500, "category": ["Cat3"], "brand": "B3"},  # scraped junk: blanked
        {"asin": "A4", "title": "Four 5&quot; wide\r\n", "category": ["Cat4"], "brand": "B4"},
        {"asin": "A6"},  # a record without any text
        {"asin": "CAS", "title": "Cascade"},
        {"asin": "ORPHAN", "title": "Never rated"},
        {"asin": "A1", "title": "a later duplicate record, ignored"},
    ]
    lines = [json.dumps(r) for r in records]
    # older dumps write Python dict literals
    lines.insert(3, "{'asin': 'A5', 'title': 'Five', 'brand': 'B5', 'category': ['Cat5']}")
    lines[5:5] = MALFORMED_META
    lines.append("")
    return lines


def write_raw(raw_dir: Path) -> Path:
    raw_dir.mkdir(parents=True, exist_ok=True)
    good = [(line + "\n").encode() for line in _rating_lines()]
    body = good[:10] + MALFORMED_RATINGS[:3] + good[10:30] + [b"\n"] + MALFORMED_RATINGS[3:] + good[30:]
    (raw_dir / RATINGS).write_bytes(b"".join(body))
    with gzip.open(raw_dir / META, "wt", encoding="utf-8") as f:
        f.write("\n".join(_meta_lines()) + "\n")
    return raw_dir


def read_atomic(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = [h.split(":")[0] for h in rows[0]]
    assert all(len(r) == len(header) for r in rows[1:]), "a field spilled over a tab"
    return [dict(zip(header, r)) for r in rows[1:]]


@pytest.fixture
def prepared(tmp_path):
    raw = write_raw(tmp_path / "raw")
    stats = prepare_dataset(NAME, str(raw), str(tmp_path / "out"), download=False)
    return stats, tmp_path / "out" / NAME


# ---------------------------------------------------------------- recipe


def test_registry_names_the_paper_categories():
    assert AMAZON_DATASETS == {
        "amazon-arts": "Arts_Crafts_and_Sewing",
        "amazon-scientific": "Industrial_and_Scientific",
        "amazon-instruments": "Musical_Instruments",
        "amazon-pantry": "Prime_Pantry",
        "amazon-games": "Video_Games",
    }


def test_counts_follow_the_recipe(prepared):
    stats, _ = prepared
    assert (stats.users, stats.items, stats.interactions) == (6, 6, 37)
    assert stats.avg_seq_len == pytest.approx(37 / 6)
    assert stats.raw_interactions == 52
    assert stats.duplicate_interactions == 1
    assert stats.dropped_no_meta == 6
    assert stats.kcore_rounds == 2
    assert stats.items_without_text == 1


def test_output_is_five_core_and_time_ordered(prepared):
    _, out = prepared
    rows = read_atomic(out / f"{NAME}.inter")
    assert len(rows) == 37
    per_user, per_item = defaultdict(list), defaultdict(int)
    for r in rows:
        per_user[r["user_id"]].append((float(r["timestamp"]), r["item_id"]))
        per_item[r["item_id"]] += 1
    assert sorted(per_user) == USERS and sorted(per_item) == ITEMS
    assert min(len(v) for v in per_user.values()) >= 5 and min(per_item.values()) >= 5
    for seq in per_user.values():
        times = [t for t, _ in seq]
        assert times == sorted(times)
    # each user's rows are contiguous, and the tie keeps the file order (A3 before A2)
    users_in_file = [r["user_id"] for r in rows]
    assert users_in_file == sorted(users_in_file, key=users_in_file.index)
    assert [i for _, i in per_user["U1"]] == ["A1", "A6", "A5", "A3", "A2", "A4"]
    assert [i for _, i in per_user["U2"]][-1] == "A1"
    assert (out / f"{NAME}.inter").read_text().splitlines()[0] == prepare.INTER_HEADER


def test_item_text_is_cleaned(prepared):
    _, out = prepared
    raw_text = (out / f"{NAME}.item").read_text(encoding="utf-8")
    assert raw_text.splitlines()[0] == prepare.ITEM_HEADER
    assert '"' not in raw_text and "&amp;" not in raw_text and "<b>" not in raw_text and "\r" not in raw_text
    items = {r["item_id"]: r for r in read_atomic(out / f"{NAME}.item")}
    assert sorted(items) == ITEMS  # NOMETA, CAS and ORPHAN are not there
    assert items["A1"] == {
        "item_id": "A1",
        "title": "Café & Bar Bold Quoted second line",
        "categories": "Grocery & Gourmet Food Snacks",
        "brand": "Acme Co",
        "text": "Café & Bar Bold Quoted second line. Grocery & Gourmet Food Snacks. Acme Co.",
    }
    assert items["A2"]["text"] == "Plain Two."
    assert items["A3"]["title"] == "" and items["A3"]["text"] == "Cat3. B3."
    assert items["A4"]["title"] == "Four 5 wide"
    assert items["A5"]["text"] == "Five. Cat5. B5."  # parsed from a Python-literal line
    assert items["A6"]["text"] == ""


def test_malformed_lines_are_counted_and_reported(tmp_path, caplog):
    raw = write_raw(tmp_path / "raw")
    with caplog.at_level(logging.WARNING, logger=prepare.__name__):
        stats = prepare_dataset(NAME, str(raw), str(tmp_path / "out"), download=False)
    assert stats.malformed_rating_lines == len(MALFORMED_RATINGS)
    assert stats.malformed_meta_lines == len(MALFORMED_META)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "6 malformed rating line(s)" in warning and "3 malformed metadata line(s)" in warning
    assert "line [11, 12, 13]" in warning  # where to look


def test_require_title_drops_items_without_title(tmp_path):
    raw = write_raw(tmp_path / "raw")
    # k=1 isolates the metadata filter from the k-core
    loose = prepare_dataset(NAME, str(raw), str(tmp_path / "a"), download=False, k=1)
    assert (loose.items, loose.items_without_text, loose.dropped_no_meta) == (7, 1, 6)
    strict = prepare_dataset(NAME, str(raw), str(tmp_path / "b"), download=False, k=1, require_title=True)
    # A3 (title blanked: 7 interactions) and A6 (no text: 6) go too
    assert (strict.items, strict.items_without_text, strict.dropped_no_meta) == (5, 0, 6 + 7 + 6)


def test_truncated_metadata_gzip_is_a_clear_error(tmp_path):
    raw = write_raw(tmp_path / "raw")
    data = (raw / META).read_bytes()
    (raw / META).write_bytes(data[: len(data) // 2])
    with pytest.raises(RawDataError, match="delete it and download it again"):
        prepare_dataset(NAME, str(raw), str(tmp_path / "out"), download=False)
    assert not (tmp_path / "out" / NAME / f"{NAME}.inter").exists()


@pytest.mark.parametrize("failing", [".item", ".inter"])
def test_partial_output_never_passes_as_prepared(tmp_path, monkeypatch, failing):
    raw = write_raw(tmp_path / "raw")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(failing):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ensure_dataset(NAME, str(tmp_path / "out"), raw_dir=str(raw))
    out = tmp_path / "out" / NAME
    assert not (out / f"{NAME}.inter").exists()
    assert not list(out.glob("*.tmp*"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert ensure_dataset(NAME, str(tmp_path / "out"), raw_dir=str(raw)) is True


def test_ensure_dataset(tmp_path):
    data_path = tmp_path / "data"
    assert ensure_dataset("ml-100k", str(data_path)) is False
    write_raw(data_path / "raw" / NAME)  # the default raw_dir
    assert ensure_dataset(NAME, str(data_path)) is True
    assert (data_path / NAME / f"{NAME}.item").exists()
    assert ensure_dataset(NAME, str(data_path), url_base="http://127.0.0.1:9/") is False  # already prepared


# ---------------------------------------------------------------- offline


def test_offline_without_raw_files_names_files_and_folder(tmp_path):
    raw = tmp_path / "nothing here"
    with pytest.raises(DatasetUnavailableError) as err:
        prepare_dataset(NAME, str(raw), str(tmp_path / "out"), download=False)
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert RATINGS in message and META in message and str(raw) in message and "--raw_dir" in message
    assert f"categoryFilesSmall/{RATINGS}" in message and f"metaFiles2/{META}" in message
    assert "\n" not in message


def test_unreachable_server_is_reported_as_unavailable(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, like an offline machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / RATINGS).write_text("A1,U1,5.0,1\n")  # only the metadata is missing
    with pytest.raises(DatasetUnavailableError) as err:
        ensure_dataset(NAME, str(tmp_path / "out"), raw_dir=str(raw), url_base=f"http://127.0.0.1:{port}")
    message = str(err.value)
    assert META in message and str(raw) in message and "failed" in message
    assert not (raw / META).exists()


def test_cli_prints_statistics_and_fails_cleanly(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw")
    out = str(tmp_path / "out")
    assert prepare.main([NAME, "--raw_dir", str(raw), "--out_dir", out, "--no_download"]) == 0
    table = capsys.readouterr().out
    for label, value in [("users", "6"), ("items", "6"), ("interactions", "37"), ("average length", "6.17"),
                         ("items without text", "1"), ("malformed rating lines", "6")]:
        assert re.search(rf"^{label}\s+{value}$", table, re.M), (label, table)
    empty, out = str(tmp_path / "empty"), str(tmp_path / "o2")
    assert prepare.main([NAME, "--raw_dir", empty, "--out_dir", out, "--no_download"]) == 2
    assert META in capsys.readouterr().err


def test_cli_run_as_a_module_fails_cleanly(tmp_path):
    # Run with -m the file is __main__, a second copy of the module; its errors live in errors.py: still one line, 2.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "recbole_darec.data.prepare", NAME, "--raw_dir", str(tmp_path / "empty"),
           "--out_dir", str(tmp_path / "out"), "--no_download"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ") and META in proc.stderr


# ---------------------------------------------------------------- downloads from a local server


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, rng = 0, self.headers.get("Range")
        if rng and srv.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        # a dropped connection: half of what Content-Length promised
        self.wfile.write(chunk[: len(chunk) // 2] if srv.truncate else chunk)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.honour_range, srv.truncate = {}, [], True, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _serve_raw(srv, tmp_path) -> dict[str, bytes]:
    raw = write_raw(tmp_path / "source")
    files = {
        f"/categoryFilesSmall/{RATINGS}": (raw / RATINGS).read_bytes(),
        f"/metaFiles2/{META}": (raw / META).read_bytes(),
    }
    srv.files.update(files)
    return files


def test_download_then_prepare(server, tmp_path):
    files = _serve_raw(server, tmp_path)
    raw = tmp_path / "raw"
    assert ensure_dataset(NAME, str(tmp_path / "out"), raw_dir=str(raw), url_base=server.url + "/") is True
    assert (raw / RATINGS).read_bytes() == files[f"/categoryFilesSmall/{RATINGS}"]
    assert (raw / META).read_bytes() == files[f"/metaFiles2/{META}"]
    assert not list(raw.glob("*.part"))
    assert len(read_atomic(tmp_path / "out" / NAME / f"{NAME}.inter")) == 37


def test_download_resumes_from_part(server, tmp_path):
    body = _serve_raw(server, tmp_path)[f"/metaFiles2/{META}"]
    dest = tmp_path / "dl" / META
    dest.parent.mkdir()
    (dest.parent / (META + ".part")).write_bytes(body[:100])
    download_file(f"{server.url}/metaFiles2/{META}", dest)
    assert dest.read_bytes() == body
    assert server.requests == [(f"/metaFiles2/{META}", "bytes=100-")]


def test_download_restarts_when_range_is_ignored(server, tmp_path):
    body = _serve_raw(server, tmp_path)[f"/metaFiles2/{META}"]
    server.honour_range = False
    dest = tmp_path / META
    (tmp_path / (META + ".part")).write_bytes(b"stale bytes from another file")
    download_file(f"{server.url}/metaFiles2/{META}", dest)
    assert dest.read_bytes() == body


def test_interrupted_download_keeps_part_and_resumes(server, tmp_path):
    body = _serve_raw(server, tmp_path)[f"/categoryFilesSmall/{RATINGS}"]
    server.truncate = True
    dest, part = tmp_path / RATINGS, tmp_path / (RATINGS + ".part")
    with pytest.raises(DownloadError, match="resumes"):
        download_file(f"{server.url}/categoryFilesSmall/{RATINGS}", dest, attempts=2)
    assert not dest.exists()
    kept = part.stat().st_size
    assert 0 < kept < len(body) and body.startswith(part.read_bytes())
    server.truncate = False
    server.requests.clear()
    download_file(f"{server.url}/categoryFilesSmall/{RATINGS}", dest)
    assert dest.read_bytes() == body and not part.exists()
    assert server.requests == [(f"/categoryFilesSmall/{RATINGS}", f"bytes={kept}-")]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_gzip_is_rejected(server, tmp_path, damage):
    body = bytearray(_serve_raw(server, tmp_path)[f"/metaFiles2/{META}"])
    if damage == "flip":
        body[len(body) // 2] ^= 0xFF
    else:
        body = body[:-8]  # complete as served, but the gzip trailer is gone
    server.files[f"/metaFiles2/{META}"] = bytes(body)
    dest = tmp_path / META
    with pytest.raises(DownloadError, match="not a valid gzip"):
        download_file(f"{server.url}/metaFiles2/{META}", dest)
    assert not dest.exists() and not (tmp_path / (META + ".part")).exists()


# ---------------------------------------------------------------- RecBole 1.2.1 reads the output


def _recbole_dataset(data_path: Path, name: str, item_cols: list[str]):
    try:
        import recbole_darec.compat  # noqa: F401  (numpy-2 aliases RecBole 1.2.1 needs)
    except ImportError:
        import numpy as np

        # RecBole 1.2.1's Config reads aliases that numpy 2 removed.
        for alias, value in {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_,
                             "bool8": np.bool_}.items():
            setattr(np, alias, getattr(np, alias, value))
    from recbole.config import Config
    from recbole.data import create_dataset

    config = Config(
        model="SASRec",
        dataset=name,
        config_dict={
            "data_path": str(data_path),
            "train_neg_sample_args": None,
            "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": item_cols},
        },
    )
    return create_dataset(config)


def test_recbole_loads_prepared_files(prepared):
    _, out = prepared
    dataset = _recbole_dataset(out.parent, NAME, ["item_id", "title", "text"])
    assert (dataset.user_num, dataset.item_num, dataset.inter_num) == (7, 7, 37)  # +1: RecBole's padding id


def shared_dataset(name: str) -> Path:
    """A data set of ``../shared/datasets``. A user's clone has no ../shared: a test that needs it is skipped, and
    says why. CI has it (CI=true): there its absence is a setup error, and the test fails."""
    folder = SHARED / name
    if not folder.is_dir():
        message = f"{folder} is missing: this test needs the shared data set beside the checkout (../shared)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}, and CI must have it.")
        pytest.skip(f"{message}; a clone without it skips it (CI=true makes this a failure).")
    return folder


@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_a_missing_shared_data_set_skips_outside_ci_and_fails_in_ci(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no-such-set is missing"):
        shared_dataset("no-such-set")


def test_shared_scientific_is_used_as_is():
    shared_dataset("amazon-scientific")
    assert ensure_dataset("amazon-scientific", str(SHARED)) is False
    dataset = _recbole_dataset(SHARED, "amazon-scientific", ["item_id", "title", "text"])
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (8442, 4385, 59427)
    items = read_atomic(SHARED / "amazon-scientific" / "amazon-scientific.item")
    assert len(items) == 4385 and all(r["text"] for r in items)


def test_run_darec_on_an_unavailable_amazon_dataset_is_a_one_line_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: an offline machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "run_darec.py"), "--model=SASRec",
           "--dataset=amazon-arts", f"--data_path={tmp_path / 'dataset'}", f"--raw_url_base=http://127.0.0.1:{port}",
           f"--checkpoint_dir={tmp_path / 'saved'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "amazon-arts" in errors[0] and "--raw_dir" in errors[0], proc.stderr[-2000:]
