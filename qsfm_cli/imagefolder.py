"""Folder-backed datasets in torchvision's ``ImageFolder`` layout, for data too large for memory (ImageNet).

``<root>/<train_dir>/<class>/<image>`` and ``<root>/<val_dir>/<class>/<image>`` (sub-folders of a class
folder are searched too). Class indices follow the sorted names of the training class folders: for ImageNet
the sorted WordNet ids, the index order of every public ImageNet checkpoint. The validation split must hold
the same class folders (ILSVRC-12's flat validation folder has to be sorted into them first).

A ``FolderSet`` holds file names and labels only. Images are decoded by ``DataLoader`` workers
(``qsfm_cli.loaders``): training with ``RandomResizedCrop(crop_size)`` + horizontal flip, evaluation with a
resize of the shorter side to ``resize_size`` + a centre crop of ``crop_size`` (resampling with
``interpolation``), both to uint8 tensors that the loader normalizes on the device. ``FolderSet.sample``
decodes a seeded sample of its images with the evaluation transform into an in-memory ``ImageSet``, so
feature collection, BatchNorm re-estimation and sensitivity slices work on it unchanged.

Every image is converted to RGB (grayscale, CMYK, palette and RGBA files alike). A file that cannot be
decoded stops the run with ``UnreadableImageError`` naming it, rather than being skipped: a skipped image
would silently change which images a seeded epoch holds. Images larger than PIL's ``MAX_IMAGE_PIXELS``
(89.5M pixels by default) are refused the same way, as possible decompression bombs.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .cache import fingerprint
from .data import ImageSet, access
from .loaders import SeededItems, ignore_sigint

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")   # any case
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded, or that PIL refuses as a possible decompression bomb.

    A ``DataLoader`` worker's exception is rebuilt in the main process from a text that holds the worker's
    whole traceback; only this error's own line is kept, so it still reads as one line.
    """

    PREFIX = "cannot read image "

    def __init__(self, message: str):
        start = message.rfind(self.PREFIX)
        super().__init__(message[start:].splitlines()[0] if start >= 0 else message)


def read_rgb(path: str | Path):
    """The image at ``path`` as an RGB PIL image; ``UnreadableImageError`` naming it otherwise."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except Exception as err:   # whatever PIL raises for this file: truncated, corrupt, too large, unknown
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnreadableImageError(f"{UnreadableImageError.PREFIX}{path}: {reason}") from None


class FolderItems(SeededItems):
    """The images of a ``FolderSet`` through one of its transforms."""

    def __init__(self, root: Path, files: np.ndarray, labels: torch.Tensor, transform):
        super().__init__(transform)
        self.root, self.files, self.labels = root, files, labels

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int):
        return read_rgb(self.root / os.fsdecode(self.files[i])), int(self.labels[i])


@dataclass
class FolderSet:
    """One split of an image folder: files under ``root`` and their labels, with the transform sizes and
    the normalization to apply. Offers what the pipeline uses of an ``ImageSet``: ``num_classes``,
    ``mean``/``std``, ``name``, ``len``, ``subset``, ``sample``, ``with_normalization``, and a loader
    through ``qsfm_cli.loaders.make_loader``."""

    root: Path
    # Paths relative to root as one fixed-width bytes array, not a list of str: a forked DataLoader worker
    # would copy a list of a million Python objects page by page as it touches their reference counts.
    files: np.ndarray
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    name: str = ""
    crop_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    num_workers: int = 8

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "FolderSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, files=self.files[index.numpy()], labels=self.labels[index])

    def with_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> "FolderSet":
        return replace(self, mean=tuple(mean) if mean else self.mean, std=tuple(std) if std else self.std)

    def transform(self, train: bool):
        """PIL image -> uint8 ``[3, crop_size, crop_size]``: random-resized crop + flip, or resize + centre
        crop."""
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        if train:
            steps = [T.RandomResizedCrop(self.crop_size, interpolation=mode), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(self.resize_size, interpolation=mode), T.CenterCrop(self.crop_size)]
        return T.Compose([*steps, T.PILToTensor()])

    def items(self, train: bool) -> FolderItems:
        return FolderItems(self.root, self.files, self.labels, self.transform(train))

    def sample(self, n: int, seed: int) -> ImageSet:
        """``n`` images drawn without replacement (the same ones for the same seed, chosen as
        ``ImageSet.sample`` chooses), decoded with the evaluation transform into an ``ImageSet``."""
        part = self
        if n < len(self):
            g = torch.Generator().manual_seed(seed)
            part = self.subset(torch.randperm(len(self), generator=g)[:n].sort().values)
        return part.decode()

    def decode(self) -> ImageSet:
        """Every image of this set with the evaluation transform, in order, as an in-memory ``ImageSet``."""
        loader = DataLoader(self.items(train=False), batch_size=64, num_workers=self.num_workers,
                            worker_init_fn=ignore_sigint)
        images = torch.cat([x for x, _ in loader]) if len(self) else \
            torch.zeros(0, 3, self.crop_size, self.crop_size, dtype=torch.uint8)
        return ImageSet(images, self.labels.clone(), self.num_classes, self.mean, self.std, self.name)

    def content_key(self) -> str:
        """Identity of the images for cache keys: class names, file names, labels and transform sizes (not
        the file bytes: hashing a million images would take longer than the work it saves)."""
        names = torch.from_numpy(np.frombuffer(self.files.tobytes(), dtype=np.uint8).copy())
        return fingerprint("folder", list(self.classes), names, self.labels, self.crop_size, self.resize_size,
                           self.interpolation)


def scan_split(folder: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...], np.ndarray, torch.Tensor]:
    """``(classes, files, labels)`` of one split folder. ``classes``: the class folder names that must be
    present (another split's); by default the sorted sub-folders of ``folder``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found (it must hold one sub-folder per class)")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        if not found:
            raise ValueError(f"image folder {folder} has no class sub-folders")
        classes = found
    elif set(found) != set(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ValueError(f"class folders of {folder} differ from the training split's: missing "
                         f"{_few(missing)}; extra {_few(extra)}")
    files: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for index, name in enumerate(classes):
        images = _images_under(folder, name, seen)
        if not images:
            raise ValueError(f"class folder {folder / name} has no images (extensions, any case: "
                             f"{', '.join(EXTENSIONS)})")
        files += images
        labels += [index] * len(images)
    return tuple(classes), np.array([os.fsencode(f) for f in files]), torch.tensor(labels, dtype=torch.long)


def _images_under(folder: Path, name: str, seen: set[str]) -> list[str]:
    """Image files under class folder ``folder/name``, as paths relative to ``folder``. Links to folders
    outside the split are followed; a link that leads back into it (``a/up -> ..``, or into another
    class) is refused, as is any folder reached twice: its images would be scanned again, under a wrong
    label, or without end. ``seen``: the real paths of the folders of this split scanned so far."""
    tree = os.path.realpath(folder)
    found = []

    def unreadable(err: OSError) -> None:
        raise ValueError(f"cannot read image folder {err.filename}: {err.strerror}")

    for parent, dirs, names in os.walk(folder / name, followlinks=True, onerror=unreadable):
        real = os.path.realpath(parent)
        if real in seen:
            raise ValueError(f"image folder {parent} is reached twice (it is {real}); remove the link that "
                             f"leads back to it")
        seen.add(real)
        dirs.sort()
        for d in dirs:
            link = os.path.join(parent, d)
            if os.path.islink(link) and _inside(os.path.realpath(link), tree):
                raise ValueError(f"image folder {link} is a link back into {folder} (to "
                                 f"{os.path.realpath(link)}): its images would be scanned twice, under a wrong "
                                 f"label; remove the link")
        rel = os.path.relpath(parent, folder)
        found += [os.path.join(rel, f) for f in sorted(names) if f.lower().endswith(EXTENSIONS)]
    return found


def _inside(path: str, tree: str) -> bool:
    return os.path.commonpath([path, tree]) == tree


def _few(names: list[str]) -> str:
    return (", ".join(names[:5]) + (" ..." if len(names) > 5 else "")) or "none"


@dataclass(frozen=True)
class ImageFolderSpec:
    """An image folder: ``<root>/<train_dir>`` and ``<root>/<val_dir>``, one sub-folder per class in each;
    ``num_classes``, when given, must match the class folders. The crop and resize sizes and the
    interpolation shape the pixels the model sees, so they are part of a run's identity; where the files
    lie and how many processes decode them are not (``data.access``)."""

    root: str = access()
    name: str = "imagefolder"
    num_classes: int | None = None
    crop_size: int = 224            # training: RandomResizedCrop(crop_size) + flip; evaluation: centre crop
    resize_size: int = 256          # evaluation: shorter side resized to this before the centre crop
    interpolation: str = "bilinear"
    train_dir: str = access("train")
    val_dir: str = access("val")
    num_workers: int = access(8)    # decoding processes per loader (per GPU under torchrun)

    def load(self) -> tuple[FolderSet, FolderSet]:
        """``(train, val)``, the sizes checked before the folders are read."""
        checks = [
            (self.crop_size >= 1, f"dataset.crop_size={self.crop_size}; accepted: >= 1"),
            (self.resize_size >= self.crop_size, f"dataset.resize_size={self.resize_size} is smaller than "
                                                 f"dataset.crop_size={self.crop_size}: the centre crop would not fit"),
            (self.interpolation in INTERPOLATIONS, f"dataset.interpolation={self.interpolation}; accepted: "
                                                   f"{', '.join(INTERPOLATIONS)}"),
            (self.num_workers >= 0, f"dataset.num_workers={self.num_workers}; accepted: >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        base = Path(self.root).expanduser()
        for split in (self.train_dir, self.val_dir):
            if not (base / split).is_dir():
                raise FileNotFoundError(f"{base / split} not found: dataset.root={str(self.root)!r} must hold "
                                        f"{self.train_dir}/ and {self.val_dir}/, one sub-folder per class in each")
        classes, train_files, train_labels = scan_split(base / self.train_dir)
        if self.num_classes is not None and self.num_classes != len(classes):
            raise ValueError(f"dataset.num_classes={self.num_classes}; accepted: {len(classes)} (the class folders "
                             f"of {base / self.train_dir})")
        _, val_files, val_labels = scan_split(base / self.val_dir, classes)
        log.info("%s: %d training and %d validation images in %d classes under %s", self.name, len(train_files),
                 len(val_files), len(classes), base)
        common = dict(classes=classes, name=self.name, crop_size=self.crop_size, resize_size=self.resize_size,
                      interpolation=self.interpolation, num_workers=self.num_workers)
        return (FolderSet(base / self.train_dir, train_files, train_labels, **common),
                FolderSet(base / self.val_dir, val_files, val_labels, **common))


def load_imagefolder(root: str, **options: Any) -> tuple[FolderSet, FolderSet]:
    """``(train, val)`` of an image folder; ``options``: the fields of ``ImageFolderSpec``."""
    return ImageFolderSpec(root, **options).load()
