"""Finding, downloading and safely reading the CIFAR-100 python-pickle files.

Only numpy is imported here, so a missing or corrupt file is reported before torch loads.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DATA_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
DATA_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
SPLITS = ("train", "test")
N_CLASSES = 100
IMAGE_BYTES = 3 * 32 * 32


class DataError(RuntimeError):
    """The data set is missing, truncated, corrupt or unsafe; the message names the file."""


class RawSplit(NamedTuple):
    """One split as read from disk: N x 3072 uint8 pixels (R, G, B planes) and fine labels."""

    pixels: np.ndarray
    labels: np.ndarray


def default_data_root() -> Path:
    """`$CIFAR100_DATA` if set, else a per-user cache folder."""
    if os.environ.get("CIFAR100_DATA"):
        return Path(os.environ["CIFAR100_DATA"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "cifar100_fit"


def data_folder(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The `cifar-100-python` folder under `root`, downloading the archive there if it is missing.

    `root` may also name the `cifar-100-python` folder itself.
    """
    root = Path(root).expanduser() if root else default_data_root()
    folder = root if root.name == FOLDER else root / FOLDER
    missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if not missing:
        return folder
    if not download or (folder.is_dir() and any(folder.iterdir())):
        paths = ", ".join(str(folder / name) for name in missing)
        raise DataError(f"{paths} is missing; restore it, or delete {folder} to download it again")
    download_archive(folder.parent)
    return folder


def download_archive(root: Path, url: str = DATA_URL, md5: str = DATA_MD5) -> None:
    """Download the official archive into `root`, check its md5 and extract it."""
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the data folder {root}: {error.strerror}") from None
    try:
        _download_and_extract(root, url, md5)
    except BaseException:
        if created:  # leave no empty folder behind a failed download
            shutil.rmtree(root, ignore_errors=True)
        raise


def _download_and_extract(root: Path, url: str, md5: str) -> None:
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        archive = Path(tmp) / "cifar-100-python.tar.gz"
        try:
            _fetch(url, archive)
        except OSError as error:
            raise DataError(
                f"could not download {url} ({error}); without a network, copy the folder "
                f"{FOLDER}/ with train, test and meta into {root}, or point --data or "
                f"CIFAR100_DATA at the folder that holds it"
            ) from None
        digest = _md5(archive)
        if digest != md5:
            raise DataError(f"{url} downloaded with md5 {digest}, expected {md5}; try again")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        extracted = Path(tmp) / FOLDER
        if not extracted.is_dir():
            raise DataError(f"{url} holds no {FOLDER}/ folder")
        shutil.rmtree(root / FOLDER, ignore_errors=True)
        extracted.rename(root / FOLDER)


def _fetch(url: str, dest: Path) -> None:
    from fastprogress.fastprogress import progress_bar

    with urllib.request.urlopen(url, timeout=30) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        chunk = 1 << 20
        n_chunks = max(1, -(-total // chunk))
        bar = progress_bar(range(n_chunks))
        bar.comment = f"MiB of {url}"
        for _ in bar:
            block = response.read(chunk)
            if not block:
                break
            out.write(block)
        while block := response.read(chunk):  # the server sent no or a wrong Content-Length
            out.write(block)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a callable that a data file has no reason to need."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and refuses anything else.

    A pickle can name any importable callable; the CIFAR files need only numpy's array rebuilders,
    and `_codecs.encode`, with which Python 3 writes bytes into a protocol-2 pickle.
    """

    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise UnsafePickleError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """Read one CIFAR pickle with `SafeUnpickler`; a bad file raises `DataError` naming it."""
    try:
        with open(path, "rb") as file:
            content = SafeUnpickler(file, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except UnsafePickleError as error:
        raise DataError(f"{path} is not a safe CIFAR pickle: {error}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as error:
        raise DataError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, expected a dict")
    return content


def read_split(folder: Path, split: str) -> RawSplit:
    """Read and validate the `train` or `test` pickle."""
    path = folder / split
    content = read_pickle(path)
    pixels, labels = content.get("data"), content.get("fine_labels")
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != IMAGE_BYTES:
        shape = getattr(pixels, "shape", None)
        raise DataError(f"{path}: 'data' should be an N x {IMAGE_BYTES} array, found {shape}")
    if pixels.dtype != np.uint8:
        raise DataError(f"{path}: 'data' should be uint8, found {pixels.dtype}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(pixels),):
        raise DataError(f"{path}: {len(labels)} fine_labels for {len(pixels)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise DataError(f"{path}: fine_labels outside 0..{N_CLASSES - 1}")
    return RawSplit(pixels, labels)


def read_class_names(folder: Path) -> list[str]:
    """The 100 fine class names from `meta`, in label order."""
    path = folder / "meta"
    names = read_pickle(path).get("fine_label_names")
    if not isinstance(names, list) or len(names) != N_CLASSES:
        raise DataError(f"{path}: expected {N_CLASSES} fine_label_names")
    return [str(name) for name in names]


class Cifar100(NamedTuple):
    """Both splits of CIFAR-100 as read from disk, with the fine class names."""

    train: RawSplit
    test: RawSplit
    classes: list[str]


def load_cifar100(root: str | os.PathLike | None = None) -> Cifar100:
    """Read and validate CIFAR-100 from `root` (see `data_folder`), downloading it if missing."""
    folder = data_folder(root)
    return Cifar100(
        read_split(folder, "train"), read_split(folder, "test"), read_class_names(folder)
    )
