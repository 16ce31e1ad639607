"""Datasets as uint8 image tensors: small enough (CIFAR: 150 MB) to live whole on the device.

Every dataset comes back as two ``ImageSet``s (train, test); normalization and augmentation happen later
in batched tensor ops (``qsfm_cli.loaders``), so the same data serves training, collection and evaluation.
"""
from __future__ import annotations

import logging
import pickle
import shutil
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cache import fingerprint

log = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class ImageSet:
    """Images ``[N, 3, H, W]`` uint8 and labels ``[N]`` int64, with the normalization to apply."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, images=self.images[index], labels=self.labels[index])

    def sample(self, n: int, seed: int) -> "ImageSet":
        """``n`` images drawn without replacement, the same ones for the same seed: the first ``n`` of a
        seeded permutation, so a smaller sample is part of a larger one."""
        if n >= len(self):
            return self
        return self.subset(_permutation(len(self), seed)[:n].sort().values)

    def held_out(self, n: int, seed: int, *, skip: int = 0) -> "ImageSet":
        """``n`` images from the END of ``sample``'s permutation, after leaving out its last ``skip``: apart
        from every ``sample(m, seed)`` with ``m + skip + n <= len(self)`` and from ``held_out(skip, seed)``."""
        if not (0 < n and skip + n <= len(self)):
            raise ValueError(f"{n} held-out images after {skip} others; this set has {len(self)}")
        end = len(self) - skip
        return self.subset(_permutation(len(self), seed)[end - n:end].sort().values)

    def content_key(self) -> str:
        """Identity of the images and labels for cache keys (a ``FolderSet`` has its own)."""
        return fingerprint("images", self.images, self.labels)

    def with_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> "ImageSet":
        return replace(self, mean=tuple(mean) if mean else self.mean, std=tuple(std) if std else self.std)


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def access(default: Any = MISSING) -> Any:
    """A dataset spec field that says where or how to read the data, not which data it is: left out of a
    run's identity (``identity``), so that runs differing only in it are one setting. Without a default
    the field is required."""
    return field(default=default, metadata={"identity": False})


def identity(spec: Any) -> dict[str, Any]:
    """The fields of a dataset spec that say which data it is (every field not marked ``access``)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.metadata.get("identity", True)}


def checked_classes(spec: Any, splits: tuple[Any, Any]) -> tuple[Any, Any]:
    """``splits`` when they hold ``spec.num_classes`` classes (or it is None); a ``ValueError`` otherwise."""
    found = splits[0].num_classes
    if spec.num_classes is not None and spec.num_classes != found:
        raise ValueError(f"dataset.num_classes={spec.num_classes}; accepted: {found} (what {spec.name} holds)")
    return splits


@dataclass(frozen=True)
class CifarSpec:
    """CIFAR-10 or CIFAR-100 read from torchvision's python batches under ``root`` (see ``_cifar`` for
    ``download`` and ``verify``)."""

    name: str = "cifar10"
    num_classes: int | None = None        # checked against the data when given
    root: str = access("data")
    download: bool = access(True)
    verify: bool | str = access("auto")   # true | false | auto

    def load(self) -> tuple[ImageSet, ImageSet]:
        if self.name not in CIFARS:
            raise ValueError(f"dataset.name={self.name}; accepted: {', '.join(CIFARS)}")
        return checked_classes(self, _cifar(self.name, self.root, download=self.download, verify=self.verify))


@dataclass(frozen=True)
class DigitsSpec:
    """scikit-learn's 8x8 digits upsampled to 32x32, split 80/20 with ``seed``."""

    name: str = "digits"
    num_classes: int | None = None        # checked against the data when given
    seed: int = 0

    def load(self) -> tuple[ImageSet, ImageSet]:
        return checked_classes(self, _digits(self.seed))


@dataclass(frozen=True)
class FakeSpec:
    """Synthetic, learnable images (``_fake``)."""

    name: str = "fake"
    num_classes: int = 10
    size: int = 32
    train_size: int = 512
    test_size: int = 256
    seed: int = 0

    def load(self) -> tuple[ImageSet, ImageSet]:
        return _fake(self.num_classes, self.size, self.train_size, self.test_size, self.seed)


CIFARS = ("cifar10", "cifar100")
DATASETS = {"cifar10": CifarSpec, "cifar100": CifarSpec, "digits": DigitsSpec, "fake": FakeSpec}


def load_dataset(name: str, root: str | None = None, **options: Any) -> tuple[ImageSet, ImageSet]:
    """Return ``(train, test)`` for one of ``DATASETS``, with the options of its spec (``CifarSpec``:
    ``root``, ``download``, ``verify``; ``DigitsSpec``: ``seed``; ``FakeSpec``: ``num_classes``, ``size``,
    ``train_size``, ``test_size``, ``seed``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset.name={name}; accepted: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if root is not None:
        options["root"] = root
    taken = [f.name for f in fields(spec) if f.name != "name"]
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise ValueError(f"dataset.{unknown[0]}={options[unknown[0]]}; accepted: "
                         f"{', '.join(f'dataset.{k}' for k in taken)}")
    return spec(name=name, **options).load()


VERIFY_MODES = (True, False, "auto")


def _cifar(name: str, root: str | None, *, download: bool, verify: bool | str) -> tuple[ImageSet, ImageSet]:
    """CIFAR from torchvision's python batches. ``verify``: ``True`` refuses files whose MD5 differs from
    torchvision's list (and downloads the archive when ``download`` and they are missing or differ);
    ``False`` skips the check; ``"auto"`` checks, and when a local copy fails it (a copy rebuilt from a
    lossless export, or holding only some training batches) uses it with a warning saying so. Whatever
    ``verify`` says, the batches are read by ``load_cifar_pickle``, which runs no code from the files."""
    from torchvision import datasets

    if verify not in VERIFY_MODES:
        raise ValueError(f"dataset.verify={verify!r}; accepted: true, false, auto")
    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = str(Path(root or "data").expanduser())
    if Path(root).exists() and not Path(root).is_dir():
        raise ValueError(f"dataset.root={root!r} is a file; accepted: a folder holding {base.base_folder}/, or "
                         f"one to download it into")
    folder = Path(root) / base.base_folder
    meta = base.meta["filename"]
    tests = [f for f, _ in base.test_list]
    if verify is False or (verify == "auto" and _local_copy_unverified(base, root)):
        trains = [f for f, _ in base.train_list if (folder / f).is_file()]
        absent = [f for f in tests + [meta] if not (folder / f).is_file()]
        absent += [] if trains else ["every training batch"]
        if absent:
            raise _cifar_not_found(name, root, base, f"missing: {', '.join(absent)}")
    else:
        trains = [f for f, _ in base.train_list]
        damaged = _damaged_files(base, folder)
        if damaged and download:
            from torchvision.datasets.utils import download_and_extract_archive

            created = _first_missing(Path(root))
            try:
                download_and_extract_archive(base.url, root, filename=base.filename, md5=base.tgz_md5)
            except (RuntimeError, OSError) as err:   # no network; a corrupt download
                if created is not None:              # a failed attempt leaves no folder behind
                    shutil.rmtree(created, ignore_errors=True)
                raise _cifar_not_found(name, root, base, f"download failed: {err}") from None
            damaged = _damaged_files(base, folder)
        if damaged:
            raise _cifar_not_found(name, root, base, f"missing or MD5 differs: {', '.join(damaged)}")
    classes = load_cifar_pickle(folder / meta).get(base.meta["key"])
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"{folder / meta} is not CIFAR's metadata: it has no list {base.meta['key']!r}")
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    splits = [ImageSet(*_cifar_batches(folder, files, len(classes)), len(classes), mean, std, name)
              for files in (trains, tests)]
    return splits[0], splits[1]


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (``None``: it exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _cifar_not_found(name: str, root: str, base: type, why: str) -> FileNotFoundError:
    return FileNotFoundError(f"{name} not found under dataset.root={root!r} ({why}); point dataset.root at a "
                             f"folder holding {base.base_folder}/ (dataset.verify=true refuses a copy whose "
                             f"checksums differ)")


def _damaged_files(base: type, folder: Path) -> list[str]:
    """The batches and metadata file that are missing or whose MD5 differs from torchvision's list."""
    from torchvision.datasets.utils import check_integrity

    expected = base.train_list + base.test_list + [[base.meta["filename"], base.meta["md5"]]]
    return [f for f, md5 in expected if not check_integrity(str(folder / f), md5)]


def _cifar_batches(folder: Path, files: list[str], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` of the batches ``files``, each checked."""
    images, labels = [], []
    for file in files:
        path = folder / file
        batch = load_cifar_pickle(path)
        data = batch.get("data")
        targets = batch.get("labels", batch.get("fine_labels"))
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            raise ValueError(f"{path} is not a CIFAR batch: no uint8 'data' array of shape [N, 3072]")
        if not isinstance(targets, list) or len(targets) != len(data) or \
                not all(isinstance(t, int) and 0 <= t < num_classes for t in targets):
            raise ValueError(f"{path} is not a CIFAR batch: its labels are not {len(data)} integers in "
                             f"[0, {num_classes})")
        images.append(torch.from_numpy(data).view(-1, 3, 32, 32))
        labels.append(torch.as_tensor(targets, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


class _Refused(Exception):
    """A pickle names a global outside ``_PICKLE_GLOBALS``."""


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How Python 3 pickles bytes at protocol 2 (``_codecs.encode(text, "latin1")``), and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# What pickled numpy arrays need: the array reconstructor (protocols 0-4) or the buffer reader (protocol 5),
# each named by numpy 1's or numpy 2's module path and taken from how numpy pickles an array, which works
# under both; the array type and the dtype; and how Python 3 writes bytes at protocol 2. Resolved here, so
# that unpickling imports nothing a file names.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def load_cifar_pickle(path: str | Path) -> dict:
    """One of CIFAR's python files (a batch or the metadata), unpickled without running code: globals other
    than numpy's array constructors (``_PICKLE_GLOBALS``) are refused before they are looked up, and what
    comes out may hold only dicts, lists, strings, bytes, ints and integer numpy arrays. Anything else, or
    a truncated file, is a ``ValueError`` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except _Refused as err:
        raise ValueError(f"{path} is not a CIFAR file: it holds {err} (refused, nothing run; a CIFAR file holds only "
                         f"dicts, lists, strings, bytes, ints and integer numpy arrays)") from None
    except OSError:
        raise
    except Exception as err:   # what a truncated or garbled pickle raises varies with where it breaks
        raise ValueError(f"{path} is truncated or not a pickle ({type(err).__name__}: {err})") from None
    held = _foreign_content(obj)
    if held or not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR file: it holds {held or _describe(obj)} (a CIFAR file is a dict "
                         f"of lists, strings, bytes, ints and integer numpy arrays)")
    return obj


def _foreign_content(obj) -> str:
    """What in ``obj`` a CIFAR file never holds ("" when nothing)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, np.ndarray):
            if item.dtype.kind not in "ui":
                return _describe(item)
        elif type(item) not in (str, bytes, int):
            return _describe(item)
    return ""


def _describe(obj) -> str:
    if isinstance(obj, np.ndarray):
        return f"a numpy array of {obj.dtype}"
    kind = type(obj)
    return f"a {kind.__name__}" if kind.__module__ == "builtins" else f"a {kind.__module__}.{kind.__qualname__}"


def _local_copy_unverified(base: type, root: str) -> bool:
    """True when ``root`` holds a usable copy (the test batch and some training batches) that fails
    torchvision's MD5 check; logs what differs."""
    from torchvision.datasets.utils import check_integrity

    folder = Path(root) / base.base_folder
    present = [f for f, _ in base.train_list + base.test_list if (folder / f).is_file()]
    if not any(f == base.test_list[0][0] for f in present) or len(present) < 2:
        return False
    missing = [f for f, _ in base.train_list if f not in present]
    differing = [f for f, md5 in base.train_list + base.test_list
                 if f in present and not check_integrity(str(folder / f), md5)]
    if missing or differing:
        log.warning("%s: using the local copy as it is (dataset.verify=true refuses it); MD5 differs from "
                    "torchvision's list: %s; missing: %s", folder, ", ".join(differing) or "none",
                    ", ".join(missing) or "none")
    return bool(missing or differing)


def _digits(seed: int) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images), upsampled to 32x32 RGB."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=32, mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    mean, std = (0.5,) * 3, (0.5,) * 3
    full = ImageSet(images, labels, 10, mean, std, "digits")
    return full.subset(perm[:cut].sort().values), full.subset(perm[cut:].sort().values)


def _fake(num_classes: int, size: int, train_size: int, test_size: int,
          seed: int) -> tuple[ImageSet, ImageSet]:
    """Synthetic, learnable images: a fixed random pattern per class plus noise."""
    from .limits import available_memory, check_batches

    if size < 1 or min(train_size, test_size) < 1:
        raise ValueError(f"dataset.size={size}, dataset.train_size={train_size}, dataset.test_size={test_size}; "
                         f"accepted: each >= 1")
    # drawn as float32 pattern plus float32 noise before the uint8 copy
    check_batches({"dataset.train_size": train_size, "dataset.test_size": test_size}, 3 * 9 * size * size,
                  available_memory())
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, size, size, generator=g) * 255

    def draw(n: int) -> ImageSet:
        labels = torch.randint(num_classes, (n,), generator=g)
        noise = torch.randn(n, 3, size, size, generator=g) * 40
        images = (patterns[labels] + noise).clamp(0, 255).to(torch.uint8)
        return ImageSet(images, labels, num_classes, (0.5,) * 3, (0.25,) * 3, "fake")

    return draw(train_size), draw(test_size)
