"""Download the benchmark data from its public sources, verified against a pinned manifest.

The manifest (``data/manifests/sources.json``) lists every data file with its size, sha256 and
upstream URL. Downloads are resumable and never leave a half-written or unverified file at its
final path: each file streams to a temporary sibling, is checked, then ``os.replace``-d into place.
Only the standard library does HTTP, so a bare machine with Python can fetch the data.

CLI (also ``python -m davsp_lib.data.download``)::

    download [--root PATH] [--source NAME ...] [--base-url URL]
    verify   [--root PATH] [--source NAME ...]

``--root`` defaults to ``$DAVSP_DATA_ROOT``. ``--base-url`` fetches every file from
``{base_url}/{relative_path}`` instead: an internal mirror, or a test server.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import read_json

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "data" / "manifests" / "sources.json"
ROOT_ENV = "DAVSP_DATA_ROOT"
CHUNK = 1 << 20
USER_AGENT = "davsp-workbook-data/1 (+urllib)"
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- manifest ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One data file: where it goes under the root, what it must hash to, where it comes from."""

    source: str
    path: str
    size: int
    sha256: str
    url: str | None
    alt_urls: tuple[str, ...] = ()
    verified: bool = False
    note: str | None = None

    def urls(self, base_url: str | None) -> list[str]:
        """URLs to try, in order; a mirror (``base_url``) serves every file, local-only ones too."""
        if base_url:
            return [mirror_url(base_url, self.path)]
        return [u for u in (self.url, *self.alt_urls) if u]


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]
    sources: dict[str, dict[str, Any]]
    path: Path | None = None

    def select(self, sources: Iterable[str] | None) -> list[FileEntry]:
        """Files of the named sources (all when ``None``); unknown names raise ``ValueError``."""
        if sources is None:
            return list(self.files)
        wanted = list(sources)
        unknown = sorted(set(wanted) - set(self.sources))
        if unknown:
            raise ValueError(f"unknown source(s) {unknown}; the manifest has {list(self.sources)}")
        return [entry for entry in self.files if entry.source in wanted]


def _check_rel_path(manifest: Path | None, rel: Any) -> str:
    """Manifest paths must stay inside the data root, whatever the manifest says."""
    if not isinstance(rel, str) or not rel:
        raise DataError(manifest, f"file entry has no valid 'path': {rel!r}")
    if "\\" in rel or {"", ".", ".."} & set(rel.split("/")):
        raise DataError(manifest, "path must be relative, POSIX, without '.' or '..'", item=rel)
    return rel


def _parse_entry(manifest: Path | None, source: str, raw: dict[str, Any]) -> FileEntry:
    rel = _check_rel_path(manifest, raw.get("path"))
    size, sha, url = raw.get("size"), raw.get("sha256"), raw.get("url")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DataError(manifest, f"'size' must be an integer >= 0, got {size!r}", item=rel)
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise DataError(manifest, f"'sha256' must be 64 lowercase hex digits: {sha!r}", item=rel)
    alt = raw.get("alt_urls") or []
    if url is not None and not isinstance(url, str):
        raise DataError(manifest, f"'url' must be a string or null, got {url!r}", item=rel)
    if not isinstance(alt, list) or not all(isinstance(u, str) for u in alt):
        raise DataError(manifest, "'alt_urls' must be a list of strings", item=rel)
    return FileEntry(
        source, rel, size, sha, url, tuple(alt), bool(raw.get("verified")), raw.get("note")
    )


def parse_manifest(data: Any, path: Path | None = None) -> Manifest:
    """Validate the manifest's shape, so a bad manifest fails before any download starts."""
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, dict) or not sources:
        raise DataError(path, "manifest has no 'sources' object")
    files: list[FileEntry] = []
    seen: dict[str, str] = {}
    for name, source in sources.items():
        if not isinstance(source, dict) or not isinstance(source.get("files"), list):
            raise DataError(path, "source has no 'files' list", item=name)
        for raw in source["files"]:
            if not isinstance(raw, dict):
                raise DataError(path, f"file entry is not an object: {raw!r}", item=name)
            entry = _parse_entry(path, name, raw)
            if entry.path in seen:
                raise DataError(
                    path,
                    f"listed twice (sources {seen[entry.path]!r} and {name!r})",
                    item=entry.path,
                )
            seen[entry.path] = name
            files.append(entry)
    meta = {name: {k: v for k, v in s.items() if k != "files"} for name, s in sources.items()}
    return Manifest(tuple(files), meta, path)


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Read and validate a manifest (default: the project's ``data/manifests/sources.json``)."""
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    return parse_manifest(read_json(path), path)


def _as_manifest(manifest: Manifest | str | Path | None) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


# --- hashing and verification ------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(root: Path, entry: FileEntry) -> str | None:
    """Why the local copy of ``entry`` is not right, or ``None`` when it is."""
    path = root / entry.path
    if not path.is_file():
        return f"{entry.path}: missing"
    size = path.stat().st_size
    if size != entry.size:
        return f"{entry.path}: size {size} bytes, expected {entry.size}"
    actual = file_sha256(path)
    if actual != entry.sha256:
        return f"{entry.path}: sha256 {actual}, expected {entry.sha256}"
    return None


def verify(
    root: str | Path,
    manifest: Manifest | str | Path | None = None,
    *,
    sources: list[str] | None = None,
) -> list[str]:
    """Problems of a local data root against the manifest (missing, size, sha256); [] if none."""
    root = Path(root)
    entries = _as_manifest(manifest).select(sources)
    return [problem for entry in entries if (problem := check_file(root, entry)) is not None]


# --- downloading -------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """Raised after all files were attempted, when some failed; ``.report`` has the details."""

    def __init__(self, report: DownloadReport):
        self.report = report
        lines = [f"{len(report.failed)} file(s) failed to download:"]
        lines += [f"  {reason}" for reason in report.failed.values()]
        super().__init__("\n".join(lines))


class _FetchError(Exception):
    """One attempt failed; ``retry`` says whether another attempt can help."""

    def __init__(self, message: str, *, retry: bool):
        super().__init__(message)
        self.retry = retry


@dataclass
class DownloadReport:
    """What happened to each file, so a caller can print it or act on failures."""

    root: Path
    downloaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason (names URL and hashes)
    unavailable: dict[str, str] = field(default_factory=dict)  # local-only: path -> how to get it

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"data root {self.root}: {len(self.downloaded)} downloaded, "
            f"{len(self.present)} already present, {len(self.failed)} failed, "
            f"{len(self.unavailable)} not downloadable"
        ]
        lines += [f"  FAILED {reason}" for reason in self.failed.values()]
        lines += [f"  NOT DOWNLOADED {path}: {how}" for path, how in self.unavailable.items()]
        return "\n".join(lines)


def mirror_url(base_url: str, rel: str) -> str:
    return f"{base_url.rstrip('/')}/{urllib.parse.quote(rel)}"


def build_request(url: str, use_token: bool) -> urllib.request.Request:
    """GET request; a Hugging Face token (gated datasets) goes to huggingface.co only."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    token = os.environ.get("HF_TOKEN")
    host = urllib.parse.urlsplit(url).hostname or ""
    if use_token and token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
        # Unredirected: the token is not forwarded when the Hub redirects to its CDN.
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return request


def _stream_to(response: Any, handle: Any, limit: int, bar: tqdm) -> tuple[int, str]:
    """Copy the body to ``handle``, hashing on the way; stop early past ``limit`` bytes."""
    digest, size = hashlib.sha256(), 0
    while block := response.read(CHUNK):
        size += len(block)
        if size > limit:
            raise _FetchError(f"more than the expected {limit} bytes", retry=False)
        handle.write(block)
        digest.update(block)
        bar.update(len(block))
    return size, digest.hexdigest()


def _get(
    url: str, handle: Any, entry: FileEntry, *, timeout: float, use_token: bool, bar: tqdm
) -> tuple[int, str]:
    """Stream one URL into ``handle``; transport problems become retryable ``_FetchError``s."""
    try:
        with urllib.request.urlopen(build_request(url, use_token), timeout=timeout) as response:
            return _stream_to(response, handle, entry.size, bar)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _FetchError(f"HTTP {exc.code} {exc.reason} for {url}", retry=True) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc  # timeouts, resets, truncated bodies
        raise _FetchError(f"cannot fetch {url}: {reason}", retry=True) from None
    except _FetchError as exc:
        raise _FetchError(f"{entry.path}: got {exc} from {url}; discarded", retry=False) from None


def _fetch_once(
    url: str, entry: FileEntry, dest: Path, *, timeout: float, use_token: bool, bar: tqdm
) -> None:
    """Download ``url`` to ``dest`` atomically, or raise :class:`_FetchError` leaving nothing."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp, start = Path(tmp_name), bar.n
    try:
        with os.fdopen(fd, "wb") as handle:
            size, actual = _get(url, handle, entry, timeout=timeout, use_token=use_token, bar=bar)
            handle.flush()
            os.fsync(handle.fileno())
        if size != entry.size:
            raise _FetchError(
                f"{entry.path}: got {size} bytes from {url}, expected {entry.size} "
                f"(truncated or a different file); discarded",
                retry=True,
            )
        if actual != entry.sha256:
            raise _FetchError(
                f"{entry.path}: sha256 mismatch for {url}: expected {entry.sha256}, "
                f"got {actual}; discarded",
                retry=False,
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; data files are meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        bar.n = start
        bar.refresh()
        tmp.unlink(missing_ok=True)
        raise


def _try_url(
    url: str, entry: FileEntry, dest: Path, *, retries: int, backoff: float, **fetch: Any
) -> str | None:
    """Up to ``retries + 1`` attempts at one URL: the failure reason, or ``None`` on success."""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, entry, dest, **fetch)
            return None
        except _FetchError as exc:
            if not exc.retry:
                return str(exc)
            reason = f"{exc} (after {attempt + 1} attempt{'s' if attempt else ''})"
        except OSError as exc:  # local: cannot create the temporary file or replace the target
            return f"{entry.path}: cannot write under {dest.parent}: {exc}"
    return reason


def _fetch_entry(entry: FileEntry, root: Path, urls: list[str], **options: Any) -> str | None:
    """Try each URL in turn; the combined failure reason, or ``None`` once the file is in place."""
    dest = root / entry.path
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{entry.path}: cannot create {dest.parent}: {exc}"
    reasons = []
    for url in urls:
        reason = _try_url(url, entry, dest, **options)
        if reason is None:
            return None
        reasons.append(reason.removeprefix(f"{entry.path}: "))
    if dest.exists():
        reasons.append("the existing local file does not match the manifest; left as is")
    return f"{entry.path}: " + "; then ".join(reasons)


def download(
    root: str | Path,
    *,
    manifest: Manifest | str | Path | None = None,
    sources: list[str] | None = None,
    base_url: str | None = None,
    timeout: float = 60,
    retries: int = 3,
    progress: bool = True,
    backoff: float = 1.0,
) -> DownloadReport:
    """Fetch every missing or wrong file of the manifest into ``root``; skip verified ones.

    All files are attempted, so finished work is kept; if any failed, :class:`DownloadError`
    is raised at the end (its ``.report`` lists downloaded, present and failed files). Files with
    no public URL (local-only) are listed in ``report.unavailable`` instead of failing.
    ``retries`` is the number of extra attempts per URL after the first one.
    """
    root = Path(root)
    entries = _as_manifest(manifest).select(sources)
    report = DownloadReport(root)
    todo: list[FileEntry] = []
    for entry in entries:
        if check_file(root, entry) is None:
            report.present.append(entry.path)
        elif not entry.urls(base_url):
            how = entry.note or "No public URL; copy it from a data mirror."
            report.unavailable[entry.path] = f"{how} (cp MIRROR/{entry.path} {root / entry.path})"
        else:
            todo.append(entry)
    total = sum(entry.size for entry in todo)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        disable=not progress or not todo,
        desc="data",
        leave=False,
    ) as bar:
        for entry in todo:
            bar.set_postfix_str(entry.path, refresh=False)
            reason = _fetch_entry(
                entry,
                root,
                entry.urls(base_url),
                retries=max(0, retries),
                backoff=backoff,
                timeout=timeout,
                use_token=base_url is None,
                bar=bar,
            )
            if reason is None:
                report.downloaded.append(entry.path)
            else:
                report.failed[entry.path] = reason
    if report.failed:
        raise DownloadError(report)
    return report


# --- CLI ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="davsp data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    default_root = os.environ.get(ROOT_ENV)
    for name, text in (("download", "fetch missing files"), ("verify", "check a data root")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument(
            "--root",
            type=Path,
            default=default_root,
            required=default_root is None,
            help=f"data root (default: ${ROOT_ENV})",
        )
        cmd.add_argument(
            "--source",
            action="extend",
            nargs="+",
            dest="sources",
            metavar="NAME",
            help="only these manifest sources (--source a b, or repeated)",
        )
        cmd.add_argument("--manifest", type=Path, default=None, help="manifest JSON")
        if name == "download":
            cmd.add_argument(
                "--base-url",
                default=None,
                help="fetch {BASE_URL}/{relative path} instead of upstream URLs",
            )
            cmd.add_argument("--timeout", type=float, default=60)
            cmd.add_argument("--retries", type=int, default=3)
            cmd.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``download`` / ``verify``; exit 0 when the data root is complete and correct, else 1."""
    args = _parser().parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        if args.command == "verify":
            problems = verify(args.root, manifest, sources=args.sources)
            checked = len(manifest.select(args.sources))
            for problem in problems:
                print(problem)
            print(f"{args.root}: {checked - len(problems)} of {checked} files OK")
            return 1 if problems else 0
        report = download(
            args.root,
            manifest=manifest,
            sources=args.sources,
            base_url=args.base_url,
            timeout=args.timeout,
            retries=args.retries,
            progress=not args.no_progress,
        )
    except DownloadError as exc:
        print(exc.report.summary(), file=sys.stderr)
        return 1
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 1 if report.unavailable else 0


if __name__ == "__main__":
    sys.exit(main())
