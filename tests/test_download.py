"""Downloader tests against a loopback HTTP server (127.0.0.1 only; never the internet)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from davsp_lib.data import download as dl
from davsp_lib.runtime.errors import DataError

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Small files in the layout of the real mirror; the bytes are made up (and one is binary).
FILES: dict[str, bytes] = {
    "figstep/SafeBench-Tiny.csv": b"dataset,category_id,task_id\r\nSafeBench,1,1\r\n",
    "figstep/images/query_ForbidQI_1_1_6.png": bytes(range(256)) * 8,
    "mm-vet/mm-vet.json": json.dumps({"v1_0": {"answer": "-1<AND>-5"}}).encode(),
    "text-prompts/sources/advbench.json": b'[{"instruction": "x", "category": null}]\n',
}
SOURCE_OF = {"figstep": "figstep", "mm-vet": "mm-vet", "text-prompts": "text-prompts"}


@dataclass
class Server:
    """A loopback server over ``folder``; ``faults`` maps a relative path to a status or 'slow'."""

    folder: Path
    base: str
    hits: Counter = field(default_factory=Counter)
    faults: dict[str, int | str] = field(default_factory=dict)

    def url(self, rel: str) -> str:
        return f"{self.base}/{rel}"


def _handler(server: Server):
    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            rel = unquote(self.path.lstrip("/"))
            server.hits[rel] += 1
            fault = server.faults.get(rel)
            if fault == "slow":
                time.sleep(1.0)  # longer than the client timeout used in the tests
            if isinstance(fault, int):
                self.send_error(fault)
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out closes its socket; that is the test, not an error


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    folder = tmp_path / "served"
    for rel, data in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    state = Server(folder, "")
    handler = partial(_handler(state), directory=str(folder))
    httpd = _QuietServer(("127.0.0.1", 0), handler)  # loopback only, any free port
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _entry(rel: str, data: bytes, url: str | None) -> dict:
    sha = hashlib.sha256(data).hexdigest()
    return {"path": rel, "size": len(data), "sha256": sha, "url": url, "verified": True}


def make_manifest(server: Server, *, extra: dict[str, list[dict]] | None = None) -> dl.Manifest:
    sources: dict[str, dict] = {}
    for rel, data in FILES.items():
        name = SOURCE_OF[rel.split("/")[0]]
        sources.setdefault(name, {"repo": "x/y", "files": []})
        sources[name]["files"].append(_entry(rel, data, server.url(rel)))
    for name, files in (extra or {}).items():
        sources[name] = {"files": files}
    return dl.parse_manifest({"sources": sources})


def fetch(root: Path, manifest: dl.Manifest, **kwargs) -> dl.DownloadReport:
    options = {"progress": False, "retries": 1, "backoff": 0.0, "timeout": 5}
    return dl.download(root, manifest=manifest, **{**options, **kwargs})


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.part")]


def test_full_download_then_verify(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "data"
    manifest = make_manifest(server)
    report = fetch(root, manifest)
    assert sorted(report.downloaded) == sorted(FILES)
    assert report.ok and not report.present and not report.failed
    for rel, data in FILES.items():
        assert (root / rel).read_bytes() == data
    assert dl.verify(root, manifest) == []
    assert leftovers(root) == []


def test_second_run_skips_present_files(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "data"
    manifest = make_manifest(server)
    fetch(root, manifest)
    hits_after_first = sum(server.hits.values())
    report = fetch(root, manifest)
    assert sorted(report.present) == sorted(FILES)
    assert report.downloaded == []
    assert sum(server.hits.values()) == hits_after_first  # nothing was requested again


def test_checksum_mismatch_names_file_and_hashes(server: Server, tmp_path: Path) -> None:
    bad = "figstep/SafeBench-Tiny.csv"
    corrupted = FILES[bad].replace(b"SafeBench", b"SafeBenck")  # same size, other bytes
    (server.folder / bad).write_bytes(corrupted)
    root = tmp_path / "data"
    with pytest.raises(dl.DownloadError) as info:
        fetch(root, make_manifest(server), retries=3)
    message = str(info.value)
    assert bad in message
    assert hashlib.sha256(FILES[bad]).hexdigest() in message  # expected
    assert hashlib.sha256(corrupted).hexdigest() in message  # actual
    assert not (root / bad).exists()
    assert leftovers(root) == []
    assert server.hits[bad] == 1  # a wrong checksum is not retried
    report = info.value.report
    assert list(report.failed) == [bad]
    assert sorted(report.downloaded) == sorted(set(FILES) - {bad})


def test_truncated_body_is_retried_then_discarded(server: Server, tmp_path: Path) -> None:
    bad = "figstep/images/query_ForbidQI_1_1_6.png"
    (server.folder / bad).write_bytes(FILES[bad][:100])
    root = tmp_path / "data"
    with pytest.raises(dl.DownloadError, match="got 100 bytes") as info:
        fetch(root, make_manifest(server))
    assert server.hits[bad] == 2
    assert bad in info.value.report.failed
    assert not (root / bad).exists() and leftovers(root) == []


def test_404_is_retried_then_reported_with_url(server: Server, tmp_path: Path) -> None:
    missing = "mm-vet/mm-vet.json"
    (server.folder / missing).unlink()
    root = tmp_path / "data"
    with pytest.raises(dl.DownloadError) as info:
        fetch(root, make_manifest(server), retries=1)
    reason = info.value.report.failed[missing]
    assert server.url(missing) in reason and "404" in reason
    assert server.hits[missing] == 2  # first attempt + 1 retry
    assert len(info.value.report.downloaded) == len(FILES) - 1


@pytest.mark.parametrize(("fault", "expected"), [(500, "HTTP 500"), ("slow", "timed out")])
def test_server_errors_and_timeouts_are_reported(
    server: Server, tmp_path: Path, fault: int | str, expected: str
) -> None:
    rel = "text-prompts/sources/advbench.json"
    server.faults[rel] = fault
    with pytest.raises(dl.DownloadError) as info:
        fetch(tmp_path / "data", make_manifest(server), retries=0, timeout=0.3)
    reason = info.value.report.failed[rel]
    assert expected in reason and server.url(rel) in reason


def test_interrupted_run_then_rerun_completes(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "data"
    manifest = make_manifest(server)
    late = "figstep/images/query_ForbidQI_1_1_6.png"
    server.faults[late] = 503
    with pytest.raises(dl.DownloadError):
        fetch(root, manifest, retries=0, progress=True)  # the bar must survive a failure too
    del server.faults[late]
    report = fetch(root, manifest)
    assert report.downloaded == [late]
    assert sorted(report.present) == sorted(set(FILES) - {late})
    assert dl.verify(root, manifest) == []


def test_wrong_local_file_is_replaced_by_verified_download(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "data"
    rel = "mm-vet/mm-vet.json"
    (root / rel).parent.mkdir(parents=True)
    (root / rel).write_bytes(b"{}")
    report = fetch(root, make_manifest(server))
    assert rel in report.downloaded
    assert (root / rel).read_bytes() == FILES[rel]


def test_alt_url_used_when_primary_fails(server: Server, tmp_path: Path) -> None:
    rel = "figstep/SafeBench-Tiny.csv"
    entry = _entry("other/tiny.csv", FILES[rel], server.url("gone.csv"))
    entry["alt_urls"] = [server.url(rel)]
    manifest = dl.parse_manifest({"sources": {"s": {"files": [entry]}}})
    report = fetch(tmp_path / "data", manifest, retries=0)
    assert report.downloaded == ["other/tiny.csv"]
    assert server.hits["gone.csv"] == 1


def test_local_only_file_is_reported_not_failed(server: Server, tmp_path: Path) -> None:
    data = b'{"_about": "maintainers"}\n'
    (server.folder / "prompts.json").write_bytes(data)
    manifest = make_manifest(server, extra={"prompts": [_entry("prompts.json", data, None)]})
    root = tmp_path / "data"
    report = fetch(root, manifest)
    assert list(report.unavailable) == ["prompts.json"]
    assert "NOT DOWNLOADED prompts.json" in report.summary()
    assert dl.verify(root, manifest) == ["prompts.json: missing"]
    # A mirror serves it under the same relative path.
    report = fetch(root, manifest, base_url=server.base + "/", sources=["prompts"])
    assert report.downloaded == ["prompts.json"]


def test_base_url_overrides_upstream_urls(server: Server, tmp_path: Path) -> None:
    entries = [_entry(rel, data, "https://example.invalid/never") for rel, data in FILES.items()]
    manifest = dl.parse_manifest({"sources": {"all": {"files": entries}}})
    report = fetch(tmp_path / "data", manifest, base_url=server.base)
    assert sorted(report.downloaded) == sorted(FILES)


def test_source_filter(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "data"
    report = fetch(root, make_manifest(server), sources=["mm-vet"])
    assert report.downloaded == ["mm-vet/mm-vet.json"]
    with pytest.raises(ValueError, match="unknown source"):
        fetch(root, make_manifest(server), sources=["nope"])


def test_verify_names_missing_size_and_hash_problems(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "data"
    manifest = make_manifest(server)
    fetch(root, manifest)
    (root / "mm-vet/mm-vet.json").unlink()
    (root / "figstep/SafeBench-Tiny.csv").write_bytes(b"short")
    png_rel = "figstep/images/query_ForbidQI_1_1_6.png"
    (root / png_rel).write_bytes(bytes(reversed(FILES[png_rel])))
    actual = hashlib.sha256((root / png_rel).read_bytes()).hexdigest()
    expected = hashlib.sha256(FILES[png_rel]).hexdigest()
    size = len(FILES["figstep/SafeBench-Tiny.csv"])
    assert dl.verify(root, manifest) == [
        f"figstep/SafeBench-Tiny.csv: size 5 bytes, expected {size}",
        f"{png_rel}: sha256 {actual}, expected {expected}",
        "mm-vet/mm-vet.json: missing",
    ]


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs.txt", "a/./b", "a\\b"])
def test_manifest_rejects_paths_outside_root(bad: str) -> None:
    entry = {"path": bad, "size": 1, "sha256": "0" * 64, "url": None}
    with pytest.raises(DataError, match="relative"):
        dl.parse_manifest({"sources": {"s": {"files": [entry]}}})


def test_manifest_rejects_duplicates_and_bad_hashes() -> None:
    good = {"path": "a.txt", "size": 1, "sha256": "0" * 64, "url": None}
    with pytest.raises(DataError, match="listed twice"):
        dl.parse_manifest({"sources": {"s": {"files": [good]}, "t": {"files": [good]}}})
    with pytest.raises(DataError, match="sha256"):
        dl.parse_manifest({"sources": {"s": {"files": [{**good, "sha256": "abc"}]}}})


def test_hf_token_only_sent_to_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret")
    hub = dl.build_request("https://huggingface.co/datasets/x/y/resolve/main/a.json", True)
    assert hub.unredirected_hdrs.get("Authorization") == "Bearer secret"
    assert "Authorization" not in hub.headers  # not forwarded to the CDN on redirect
    assert not dl.build_request("https://raw.githubusercontent.com/x/y/z", True).unredirected_hdrs
    assert not dl.build_request("https://huggingface.co/x", False).unredirected_hdrs


def test_cli_download_and_verify(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    manifest_path = tmp_path / "manifest.json"
    manifest = make_manifest(server)
    sources = {
        name: {
            "files": [
                _entry(e.path, FILES[e.path], None) for e in manifest.files if e.source == name
            ]
        }
        for name in manifest.sources
    }
    manifest_path.write_text(json.dumps({"sources": sources}))
    root = tmp_path / "data"
    monkeypatch.setenv(dl.ROOT_ENV, str(root))
    assert dl.main(["verify", "--manifest", str(manifest_path)]) == 1
    args = ["--manifest", str(manifest_path), "--base-url", server.base, "--no-progress"]
    assert dl.main(["download", *args]) == 0
    assert dl.main(["verify", "--manifest", str(manifest_path)]) == 0
    assert "4 of 4 files OK" in capsys.readouterr().out
    sources = ["--source", "figstep", "mm-vet", "--source", "text-prompts"]
    assert dl.main(["verify", "--manifest", str(manifest_path), *sources]) == 0
    assert dl.main(["verify", "--manifest", str(manifest_path), "--source", "nope"]) == 2


def _mirror() -> Path | None:
    candidates = [
        os.environ.get(dl.ROOT_ENV),
        PROJECT_ROOT.parent / "shared" / "data",
        "/work/shared/data",
    ]
    return next((Path(c) for c in candidates if c and (Path(c) / "README.md").is_file()), None)


def test_committed_manifest_matches_the_real_mirror() -> None:
    """Proves the committed manifest's sizes and sha256s describe the real mirror's bytes."""
    mirror = _mirror()
    if mirror is None:
        pytest.skip("benchmark data mirror not available")
    manifest = dl.load_manifest()
    assert dl.verify(mirror, manifest) == []
    listed = {entry.path for entry in manifest.files}
    on_disk = {p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file()}
    assert on_disk - {"README.md"} == listed  # every mirror file is in the manifest


def test_committed_manifest_urls_are_pinned() -> None:
    """Every URL names a commit; local-only entries say how to get the file instead."""
    manifest = dl.load_manifest()
    for entry in manifest.files:
        if entry.url is None:
            assert entry.note and "mirror" in entry.note, entry.path
            continue
        assert entry.url.startswith("https://"), entry.path
        assert "/main/" not in entry.url and "/master/" not in entry.url, entry.path
        if not entry.verified:
            assert entry.note, f"{entry.path}: unverified entries must say why"


def test_copy_of_real_files_round_trip(server: Server, tmp_path: Path) -> None:
    """A few real mirror files through the server: bytes arrive unchanged (skipped without it)."""
    mirror = _mirror()
    if mirror is None:
        pytest.skip("benchmark data mirror not available")
    real = dl.load_manifest()
    picked = [
        e
        for e in real.files
        if e.path in {"figstep/SafeBench-Tiny.csv", "figstep/images/query_ForbidQI_1_1_6.png"}
    ]
    for entry in picked:
        target = server.folder / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror / entry.path, target)
    manifest = dl.Manifest(tuple(picked), {"figstep": {}})
    report = fetch(tmp_path / "data", manifest, base_url=server.base)
    assert sorted(report.downloaded) == sorted(e.path for e in picked)


def _make_manifest_module():
    """scripts/ is not a package: load the script by path (dataclasses need sys.modules)."""
    import importlib.util
    import sys

    name = "davsp_scripts_make_manifest"
    if name not in sys.modules:
        path = PROJECT_ROOT / "scripts" / "make_manifest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_make_manifest_recomputes_hashes_and_keeps_urls(tmp_path: Path) -> None:
    mm = _make_manifest_module()
    mirror = tmp_path / "mirror"
    (mirror / "figstep").mkdir(parents=True)
    (mirror / "README.md").write_text("about the mirror")
    (mirror / "figstep" / "safebench.csv").write_bytes(b"a,b\n1,2\n")
    (mirror / "mm-vet").mkdir()
    (mirror / "mm-vet" / "mm-vet.json").write_bytes(b"{}")
    out = tmp_path / "sources.json"
    kept = {
        "path": "figstep/safebench.csv",
        "size": 1,
        "sha256": "0" * 64,
        "url": "https://example.org/kept.csv",
        "verified": True,
    }
    out.write_text(json.dumps({"sources": {"figstep": {"licence": "MIT", "files": [kept]}}}))

    assert mm.main(["--mirror", str(mirror), "--manifest", str(out)]) == 0
    manifest = dl.load_manifest(out)
    by_path = {entry.path: entry for entry in manifest.files}
    assert set(by_path) == {"figstep/safebench.csv", "mm-vet/mm-vet.json"}  # README skipped
    csv = by_path["figstep/safebench.csv"]
    assert csv.url == "https://example.org/kept.csv"  # curated URL kept
    assert (csv.size, csv.sha256) == (8, hashlib.sha256(b"a,b\n1,2\n").hexdigest())
    assert by_path["mm-vet/mm-vet.json"].url.startswith("https://raw.githubusercontent.com/")
    assert dl.verify(mirror, manifest) == []
    assert mm.main(["--mirror", str(mirror), "--manifest", str(out), "--check"]) == 0

    (mirror / "mm-vet" / "mm-vet.json").unlink()  # an entry whose file left the mirror
    assert mm.main(["--mirror", str(mirror), "--manifest", str(out)]) == 1
    assert mm.main(["--mirror", str(mirror), "--manifest", str(out), "--prune"]) == 0
    assert [e.path for e in dl.load_manifest(out).files] == ["figstep/safebench.csv"]


def test_committed_manifest_is_up_to_date_with_the_mirror(capsys: pytest.CaptureFixture) -> None:
    mirror = _mirror()
    if mirror is None:
        pytest.skip("benchmark data mirror not available")
    mm = _make_manifest_module()
    assert mm.main(["--mirror", str(mirror), "--check"]) == 0, capsys.readouterr().err
