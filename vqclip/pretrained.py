"""The weight registry, the cache, and resumable, verified downloads.

Each entry maps a name to the files it needs: URL, sha256 (where published), size, license.
Files land in ``<cache>/<name>/<file>``. The cache is, in order: the ``cache_dir`` argument,
``$VQCLIP_CACHE``, ``~/.cache/vqclip``. The project's ``checkpoints/`` folder is searched too.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CLIP_MODELS", "PROJECT_CHECKPOINTS", "VQGAN_MODELS", "ChecksumError", "DownloadError",
           "RemoteFile", "require", "get_cache_dir", "download", "download_file", "list_models",
           "resolve", "sha256sum"]

log = logging.getLogger(__name__)

PROJECT_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says what to fetch and from where."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the published sha256."""


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    sha256: str | None = None  # None: not published upstream; the size is checked instead
    size: int | None = None


def _heibox(share: str, file: str) -> str:
    # Heidelberg's Seafile shares of the taming-transformers release (CompVis/taming-transformers README)
    return f"https://heibox.uni-heidelberg.de/d/{share}/files/?p=%2F{file.replace('/', '%2F')}&dl=1"


# Sizes and sha256 of the official files as published by pytti's model mirror lists; the two
# YAML hashes were checked against the YAML texts taming published. None: not published.
_TAMING_LICENSE = "MIT (CompVis/taming-transformers)"

VQGAN_MODELS: dict[str, dict] = {
    "imagenet_f16_1024": {
        "description": "ImageNet, f=16, 1024 codes (taming-transformers)",
        "license": _TAMING_LICENSE,
        "files": {
            "config": RemoteFile(_heibox("8088892a516d4e3baf92", "configs/model.yaml"), "model.yaml"),
            "ckpt": RemoteFile(_heibox("8088892a516d4e3baf92", "ckpts/last.ckpt"), "last.ckpt"),
        },
    },
    "imagenet_f16_16384": {
        "description": "ImageNet, f=16, 16384 codes (taming-transformers); the default",
        "license": _TAMING_LICENSE,
        "files": {
            "config": RemoteFile(
                _heibox("a7530b09fed84f80a887", "configs/model.yaml"), "model.yaml",
                "00e2c6189926f1d89ecfef73e9598db77981c1982f0555fbade963ffd16143c7", 692),
            "ckpt": RemoteFile(
                _heibox("a7530b09fed84f80a887", "ckpts/last.ckpt"), "last.ckpt",
                "845a68805098cb666420d5db93df53f3a3b6dd443e6dd85c05759c5b998cd663", 980092370),
        },
    },
    "gumbel_f8_8192": {
        "description": "OpenImages, f=8, 8192 codes, Gumbel quantizer (taming-transformers)",
        "license": _TAMING_LICENSE,
        "files": {
            "config": RemoteFile(
                _heibox("2e5662443a6b4307b470", "configs/model.yaml"), "model.yaml",
                "91110bab325067b37f85d1e75895a837d59c292bae4f3097f80c518714d5caff", 745),
            "ckpt": RemoteFile(
                _heibox("2e5662443a6b4307b470", "ckpts/last.ckpt"), "last.ckpt",
                "5cd6c74810ab97e00e942c25403f73afc081e8b19987b31ec0d9ff5b68e7ab14", 376581823),
        },
    },
    "wikiart_16384": {
        # EleutherAI's host (eaidata.bmk.sh) is gone; pixray's release carries the same files.
        "description": "WikiArt, f=16, 16384 codes (EleutherAI, fine-tuned from imagenet_f16_16384)",
        "license": "MIT code; WikiArt images carry their own terms",
        "files": {
            "config": RemoteFile(
                "https://github.com/pixray/pixray/releases/download/v1.7.1/vqgan_wikiart_16384.yaml",
                "model.yaml", "6e78241d2828ff35b8381839ce249c24a6c468ed429760d33a25e98e7f24499a", 920),
            "ckpt": RemoteFile(
                "https://github.com/pixray/pixray/releases/download/v1.7.1/vqgan_wikiart_16384.ckpt",
                "last.ckpt", "bd08bb46301f98be1712bb2be9f8868cea30b53137cd985d4d6e8da8b3e02c36",
                1005327541),
        },
    },
}

# Trained by this project on its shapes world (vqclip/shapes/) with `vqclip train`, shipped in
# checkpoints/ and never downloaded; the README's "shapes world" section has the commands.
_BUNDLED_LICENSE = "MIT (vqclip; trained by the project)"
VQGAN_MODELS["shapes_f4_512"] = {
    "description": "shapes world, f=4, 512 codes, 64 px (vqclip's own, bundled): the offline preset",
    "license": _BUNDLED_LICENSE, "bundled": True,
    "files": {"config": RemoteFile("", "model.yaml", "09037172d51e7a8041bac74af2084b27428ec3219621d44179f0943031413907", 333),
              "ckpt": RemoteFile("", "vqgan.safetensors", "8b0fcb30c760291bc9cdaacbb8604a83beb781261bd104cc5767cc879df0b51c", 5977838)},
}


def _bundled_clip(arch: str, tag: str, description: str, config: tuple, weights: tuple) -> dict:
    """The entry of a CLIP trained here and shipped in checkpoints/; files as (sha256, size)."""
    return {"arch": arch, "pretrained": tag, "quick_gelu": False, "bundled": True,
            "description": description, "license": _BUNDLED_LICENSE,
            "files": {"config": RemoteFile("", f"{arch}.json", *config),
                      "weights": RemoteFile("", "open_clip_model.safetensors", *weights)}}


CLIP_MODELS: dict[str, dict] = {
    "ViT-B-32/openai": {
        "arch": "ViT-B-32", "pretrained": "openai", "quick_gelu": True,
        "description": "OpenAI CLIP ViT-B/32, 224 px; the default guide",
        "license": "MIT (openai/CLIP)",
        "files": {"weights": RemoteFile(
            "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors",
            "open_clip_model.safetensors")},
    },
    "ViT-B-16/laion2b_s34b_b88k": {
        "arch": "ViT-B-16", "pretrained": "laion2b_s34b_b88k", "quick_gelu": False,
        "description": "OpenCLIP ViT-B/16 trained on LAION-2B, 224 px",
        "license": "MIT (mlfoundations/open_clip)",
        "files": {"weights": RemoteFile(
            "https://huggingface.co/laion/CLIP-ViT-B-16-laion2B-s34B-b88K/resolve/main/open_clip_model.safetensors",
            "open_clip_model.safetensors")},
    },
    "vqclip-shapes/v2": _bundled_clip(
        "vqclip-shapes", "v2",
        "tiny CLIP of the shapes world, 64 px (vqclip's own, bundled): the offline preset",
        ("db7cc6610b36637eea9a46d645929d8d80fa4c447adb85c49364f6f39a570c90", 265),
        ("245d0ca1545cd18dcaacb2a32332b101216feb5a8aed7077166173bdcd390dcf", 8316666)),
    "vqclip-shapes-rn/v1": _bundled_clip(
        "vqclip-shapes-rn", "v1", "tiny CLIP of the shapes world with a convolutional image tower, "
        "64 px (vqclip's own, bundled): the offline preset's second guide",
        ("093528488dec0fc1d433aa83f00cd6bb3a3238bd33d1fb8df8e51db2bde813bd", 284),
        ("7873dbae0bdde12597aa2be77ae90feeb50a29f703aae934fe0974fd3fdb58fa", 12586642)),
}


def _entry(name: str) -> dict:
    entry = VQGAN_MODELS.get(name) or CLIP_MODELS.get(name)
    if entry is None:
        raise ValueError(f"unknown model {name!r}; available: "
                         f"{', '.join([*VQGAN_MODELS, *CLIP_MODELS])}")
    return entry


def get_cache_dir(path: str | Path | None = None) -> Path:
    """The download cache: ``path``, else ``$VQCLIP_CACHE``, else ``~/.cache/vqclip``."""
    try:
        if path is not None:
            return Path(path).expanduser()
        if os.environ.get("VQCLIP_CACHE"):
            return Path(os.environ["VQCLIP_CACHE"]).expanduser()
        return Path.home() / ".cache" / "vqclip"
    except RuntimeError as e:  # "~nosuchuser/..."
        raise ValueError(f"cannot resolve the cache directory: {e}") from None


def _local_dir(name: str) -> str:
    return name.replace("/", "--")  # "ViT-B-32/openai" -> "ViT-B-32--openai"


def find_local(name: str, cache_dir: str | Path | None = None) -> dict[str, Path] | None:
    """The paths of all of ``name``'s files if they are all present (cache or checkpoints/)."""
    entry = _entry(name)
    for root in (get_cache_dir(cache_dir), PROJECT_CHECKPOINTS):
        folder = root / _local_dir(name)
        paths = {key: folder / f.filename for key, f in entry["files"].items()}
        if all(p.is_file() and (f.size is None or p.stat().st_size == f.size)
               for p, f in zip(paths.values(), entry["files"].values(), strict=True)):
            return paths
    return None


def resolve(name: str, cache_dir: str | Path | None = None, allow_download: bool = True,
            progress: bool = True) -> dict[str, Path]:
    """Paths to ``name``'s files, downloading the missing ones if ``allow_download``.

    Raises:
        ValueError: unknown name.
        DownloadError: not present and it could not (or may not) be downloaded.
    """
    found = find_local(name, cache_dir)
    if found is not None:
        return found
    if not allow_download:
        raise DownloadError(_missing_message(name, cache_dir))
    return download(name, cache_dir=cache_dir, progress=progress)


def _missing_message(name: str, cache_dir: str | Path | None) -> str:
    entry = _entry(name)
    folder = get_cache_dir(cache_dir) / _local_dir(name)
    urls = "; ".join(f"{f.filename} <- {f.url}" for f in entry["files"].values())
    return (f"{name} is not downloaded. Run `vqclip download {name}` while online, or fetch "
            f"{urls} into {folder}")


def download(name: str, cache_dir: str | Path | None = None, progress: bool = True,
             force: bool = False) -> dict[str, Path]:
    """Fetch every file of a registry entry into the cache; files already present are used.

    Offline mode (``VQCLIP_OFFLINE=1``) never touches the network.

    Returns:
        ``{file key: path}``, e.g. ``{"config": ..., "ckpt": ...}``.
    Raises:
        ValueError: unknown name. DownloadError / ChecksumError: see messages.
    """
    entry = _entry(name)
    found = None if force else find_local(name, cache_dir)
    if found is not None:
        return found
    if entry.get("bundled"):
        raise DownloadError(f"{name} ships with vqclip in {PROJECT_CHECKPOINTS / _local_dir(name)}, "
                            "but its files are missing or changed; restore them (git checkout "
                            "checkpoints/, or reinstall)")
    if os.environ.get("VQCLIP_OFFLINE") == "1":
        raise DownloadError("VQCLIP_OFFLINE=1: " + _missing_message(name, cache_dir))
    folder = get_cache_dir(cache_dir) / _local_dir(name)
    paths = {}
    for key, remote in entry["files"].items():
        dest = folder / remote.filename
        if force:  # start over: neither the file nor a partial one is trusted
            dest.unlink(missing_ok=True)
            dest.with_name(dest.name + ".part").unlink(missing_ok=True)
        try:
            paths[key] = download_file(remote, dest, progress=progress)
        except DownloadError as e:
            if isinstance(e, ChecksumError):
                raise
            raise DownloadError(f"{e}. {_missing_message(name, cache_dir)}") from None
    return paths


def require(names: list[str], cache_dir: str | Path | None = None, allow_download: bool = True,
            progress: bool = True) -> None:
    """Make sure the registry models among ``names`` are present, with one message for all.

    Names that are not in the registry (file paths) are left to the loaders.

    Raises:
        DownloadError: some are missing and may not (offline) or could not be downloaded; the
            message gives the one command that fetches them all.
    """
    known = [n for n in names if n in VQGAN_MODELS or n in CLIP_MODELS]
    missing = [n for n in known if find_local(n, cache_dir) is None]
    if not missing:
        return
    command = f"`vqclip download {' '.join(missing)}`"
    reason = "they are not downloaded" if len(missing) > 1 else "it is not downloaded"
    if not allow_download or os.environ.get("VQCLIP_OFFLINE") == "1":
        reason += " and downloading is off" + (" (VQCLIP_OFFLINE=1)" if allow_download else "")
    else:
        try:
            for name in missing:
                download(name, cache_dir=cache_dir, progress=progress)
            return
        except ChecksumError:
            raise
        except DownloadError as e:
            reason = str(e).split(". ")[0]
    from .config import list_presets

    hint = "; `--preset shapes` works offline" if "shapes" in list_presets() else ""
    raise DownloadError(f"{' and '.join(missing)} needed: {reason}. Run {command} while online, "
                        f"or put the files in {get_cache_dir(cache_dir)}{hint}")


def sha256sum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download_file(remote: RemoteFile, dest: str | Path, progress: bool = True,
                  timeout: float = 30.0) -> Path:
    """Download ``remote`` to ``dest``, resuming a ``dest.part`` left by an earlier try.

    The bytes go to ``dest.part``; only a complete file whose sha256 (or size) checks out is
    renamed to ``dest``. A present ``dest`` is a cache hit and makes no request.

    Raises:
        DownloadError: network failure (the partial file is kept for resuming).
        ChecksumError: wrong content (the partial file is deleted, so the next try starts over).
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.is_file():
        if remote.size is None or dest.stat().st_size == remote.size:
            return dest
        log.warning("%s has %d bytes, expected %d; downloading it again",
                    dest, dest.stat().st_size, remote.size)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(remote.url, headers={"User-Agent": "vqclip"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    total = remote.size
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else remote.size
            with open(part, "ab" if have else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=remote.filename, disable=not progress, leave=False,
            ) as bar:
                _copy(response, out, bar)
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416 "range not satisfiable": the part is already whole
            raise DownloadError(f"could not download {remote.url}: HTTP {e.code} {e.reason}") from None
    except http.client.IncompleteRead:
        pass  # reported below with the byte counts
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"could not download {remote.url}: {reason}") from None

    got = part.stat().st_size
    if total is not None and got < total:
        raise DownloadError(f"could not download {remote.url}: connection closed after "
                            f"{got} of {total} bytes; run again to resume")
    _verify(remote, part, dest)
    part.replace(dest)
    return dest


def _copy(response, out, bar) -> None:
    while True:
        try:
            chunk = response.read(_CHUNK)
        except http.client.IncompleteRead as e:  # keep what arrived, for the next try to resume
            out.write(e.partial)
            raise
        if not chunk:
            return
        out.write(chunk)
        bar.update(len(chunk))


def _verify(remote: RemoteFile, part: Path, dest: Path) -> None:
    got_size = part.stat().st_size
    if remote.size is not None and got_size != remote.size:
        part.unlink()
        raise ChecksumError(f"{dest}: expected {remote.size} bytes from {remote.url}, got {got_size}")
    if remote.sha256 is not None:
        actual = sha256sum(part)
        if actual != remote.sha256:
            part.unlink()
            raise ChecksumError(f"{dest}: sha256 mismatch for {remote.url}: expected "
                                f"{remote.sha256}, got {actual}")
    else:
        log.info("%s: no published sha256; size %d bytes", dest.name, got_size)


def _check(files) -> str:
    """How a download of these files is verified: "sha256", "size", or "none"."""
    files = list(files)
    if all(f.sha256 for f in files):
        return "sha256"
    return "size" if all(f.size for f in files) else "none"


def list_models(cache_dir: str | Path | None = None) -> list[dict]:
    """One row per registry entry: name, family, description, license, and local path or None."""
    rows = []
    for family, table in (("vqgan", VQGAN_MODELS), ("clip", CLIP_MODELS)):
        for name, entry in table.items():
            local = find_local(name, cache_dir)
            sizes = [f.size for f in entry["files"].values()]
            rows.append({
                "name": name, "family": family, "description": entry["description"],
                "license": entry["license"],
                "size": sum(sizes) if None not in sizes else None,
                "check": _check(entry["files"].values()),
                "path": str(next(iter(local.values())).parent) if local else None,
            })
    return rows
