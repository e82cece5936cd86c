"""`arat data download`: fetch an official CIFAR archive, verify its published MD5, extract it."""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from ..progress import progress_bar
from .cifar import LAYOUTS, DataError, find_layout

ARCHIVES = {  # published by the dataset authors (https://www.cs.toronto.edu/~kriz/cifar.html)
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: not a URL (unknown url type)
        raise DataError(
            f"could not download {url} ({getattr(e, 'reason', e)}); check the network or pass --url "
            "to a local copy (file:///path/to/archive.tar.gz)"
        ) from None


def safe_extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not target.is_relative_to(dest.resolve()) or not (member.isreg() or member.isdir()):
                    raise DataError(f"{archive} has an unsafe member {member.name!r}; not extracting it")
            # the "data" filter too where Python has it (3.12, and 3.10.12 / 3.11.4 on): no setuid, setgid or
            # sticky bits, no group/other write; Python 3.14 makes it the default, and 3.12-3.13 warn without it
            tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"{archive.name} is not a gzip tar archive ({type(e).__name__}); pass the official python version "
            "(*-python.tar.gz)"
        ) from None


def download(dataset: str, data_dir: str | Path, url: str | None = None, md5: str | None = None) -> Path:
    """Download (unless already present), verify, extract; returns the dataset folder."""
    if dataset not in ARCHIVES:
        raise DataError(f"unknown dataset {dataset!r} (cifar10, cifar100)")
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file: name a directory to download into")
    if found := find_layout(dataset, data_dir):
        return found
    default_url, published_md5 = ARCHIVES[dataset]
    url, md5 = url or default_url, md5 or published_md5
    if url and "://" not in url and Path(url).is_file():  # a local archive named by its path
        url = Path(url).resolve().as_uri()
    folder = data_dir / LAYOUTS[dataset][0]
    if folder.exists():  # checked before downloading: the extraction would land inside it
        raise DataError(f"{folder} exists but is incomplete (find_layout found no full {dataset}); delete it and rerun")
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fetch_and_extract(dataset, data_dir, url, md5)
    except BaseException:
        if created and not any(data_dir.iterdir()):  # a failed download leaves no empty folder it made
            data_dir.rmdir()
        raise
    if (found := find_layout(dataset, data_dir)) is None:
        raise DataError(f"{data_dir / LAYOUTS[dataset][0]} is incomplete after extraction; delete it and retry")
    return found


def fetch_and_extract(dataset: str, data_dir: Path, url: str, md5: str) -> None:
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
        archive = Path(tmp) / Path(url).name
        fetch(url, archive)
        if (got := md5sum(archive)) != md5:
            why = ("it is not the official archive (or pass its --md5)" if url.startswith("file:")
                   else "the download is corrupt, run the command again")  # fmt: skip
            raise DataError(f"{url}: MD5 {got} does not match the expected {md5}; {why}")
        staging = Path(tmp) / "extract"
        staging.mkdir()
        safe_extract(archive, staging)
        folder = LAYOUTS[dataset][0]
        if not (staging / folder).is_dir():
            raise DataError(f"{url} does not contain {folder}/; is it the official python archive?")
        try:  # a rename within data_dir: readers see the whole folder or none
            os.rename(staging / folder, data_dir / folder)
        except OSError:  # a download started beside this one put the folder there first (a move nested this one)
            if find_layout(dataset, data_dir) is None:
                raise
