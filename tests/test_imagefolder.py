"""Folder-backed datasets: scanning, decoding of real-world files, loaders, errors, configs, and the
collect -> score -> prune -> fine-tune -> evaluate stages on a small ImageFolder with a torchvision model."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from qsfm_cli import report
from qsfm_cli.app import build, build_experiment, config_dir
from qsfm_cli.collect import collect_stats
from qsfm_cli.counting import count_macs, count_params
from qsfm_cli.evaluate import accuracy
from qsfm_cli.imagefolder import FolderSet, UnreadableImageError, load_imagefolder
from qsfm_cli.loaders import DeviceLoader, TorchvisionLoader, input_shape, make_loader
from qsfm_cli.models import create_model
from qsfm_cli.plan import PlanSpec, make_keep
from qsfm_cli.outputs import write_record
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.record import OK, Metrics, Results, RunRecord
from qsfm_cli.scoring import get_scorer
from qsfm_cli.train import STATE_FILE, Execution, TrainRecipe, train

CLASSES = ("n02", "n01", "n03")          # sorted: n01, n02, n03
COLOURS = {"n01": (220, 40, 40), "n02": (40, 200, 60), "n03": (50, 60, 210)}


def make_image_folder(root: Path, per_class: tuple[int, int] = (8, 4), seed: int = 0) -> Path:
    """``root/{train,val}/<class>/``: noisy images of a class colour, of mixed sizes, modes and extension
    cases, one grayscale and one CMYK JPEG, a palette and an RGBA PNG, a nested folder and a non-image."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                ext = (".JPEG", ".jpg", ".png", ".jpeg")[i % 4]
                if ext == ".png" and i % 8 == 2:
                    image = image.convert("P") if name == "n02" else image.convert("RGBA")
                image.save(folder / f"{name}_{i}{ext}")
    train = root / "train" / "n01"
    Image.new("L", (64, 48), 128).save(train / "gray.JPEG")
    Image.new("RGB", (50, 70), COLOURS["n01"]).convert("CMYK").save(train / "cmyk.jpg")
    (train / "nested").mkdir()
    Image.new("RGB", (52, 52), COLOURS["n01"]).save(train / "nested" / "deep.JPG")
    (train / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small gain nothing from more threads, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="module")
def splits(folder) -> tuple[FolderSet, FolderSet]:
    return load_imagefolder(str(folder), crop_size=32, resize_size=36, num_workers=0)


def test_classes_labels_and_files(splits):
    train, val = splits
    assert train.classes == val.classes == tuple(sorted(CLASSES)) and train.num_classes == 3
    names = [f.decode() for f in train.files]
    assert len(train) == 3 * 8 + 3 and len(val) == 3 * 4
    assert "n01/gray.JPEG" in names and "n01/cmyk.jpg" in names and "n01/nested/deep.JPG" in names
    assert not any(n.endswith(".txt") for n in names)
    for name, label in zip(names, train.labels.tolist()):
        assert name.split("/")[0] == train.classes[label]


def test_every_mode_decodes_to_rgb(splits):
    train, _ = splits
    images = train.decode()
    assert images.images.shape == (len(train), 3, 32, 32) and images.images.dtype == torch.uint8
    names = [f.decode() for f in train.files]
    gray = images.images[names.index("n01/gray.JPEG")].int()
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and abs(gray.float().mean() - 128) < 3
    cmyk = images.images[names.index("n01/cmyk.jpg")].float().mean((1, 2))
    assert (cmyk - torch.tensor(COLOURS["n01"], dtype=torch.float)).abs().max() < 12


def test_eval_loader_is_the_normalized_decoded_images(splits):
    _, val = splits
    folder_batches = list(make_loader(val, 5, device="cpu", train=False))
    memory_batches = list(DeviceLoader(val.decode(), 5))
    assert isinstance(make_loader(val, 5, device="cpu", train=False, path="device"), TorchvisionLoader)
    for (a, ya), (b, yb) in zip(folder_batches, memory_batches, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_train_loader_is_a_function_of_seed_and_epoch(splits):
    train, _ = splits

    def epoch(ds, e, start=0, seed=1):
        return list(make_loader(ds, 6, device="cpu", train=True, seed=seed, drop_last=True).iter_epoch(e, start))

    first = epoch(train, 2)
    assert len(first) == len(train) // 6 and first[0][0].shape == (6, 3, 32, 32)
    with_workers = epoch(dataclasses.replace(train, num_workers=2), 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, with_workers, strict=True))
    tail = epoch(train, 2, start=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], tail, strict=True))
    assert not torch.equal(first[0][0], epoch(train, 3)[0][0])
    assert not torch.equal(first[0][0], epoch(train, 2, seed=2)[0][0])
    # really augmented: not the centre crops of the evaluation transform
    plain = DeviceLoader(train.decode(), len(train)).images
    x = first[0][0]
    assert x.min() < 0 < x.max() and not any(torch.equal(x[0], img) for img in plain.permute(0, 3, 1, 2).float())


def test_sample_is_a_seeded_training_sample_like_imagesets(splits):
    train, _ = splits
    sample, decoded = train.sample(7, seed=4), train.decode().sample(7, seed=4)
    assert torch.equal(sample.images, decoded.images) and torch.equal(sample.labels, decoded.labels)
    assert not torch.equal(train.sample(7, seed=5).labels, sample.labels) or \
        not torch.equal(train.sample(7, seed=5).images, sample.images)
    assert (sample.mean, sample.std, sample.num_classes) == (train.mean, train.std, 3)
    assert len(train.sample(10_000, seed=0)) == len(train)


def test_accuracy_on_a_folder_equals_accuracy_on_its_decoded_images(splits):
    _, val = splits
    torch.manual_seed(0)
    model = create_model("tv_mobilenet_v3_small", num_classes=3).eval()
    assert accuracy(model, val, batch_size=5) == accuracy(model, val.decode(), batch_size=5)
    assert input_shape(val) == (3, 32, 32)


# ---------------------------------------------------------------------------------------- bad input
def test_empty_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path)
    (root / "train" / "n04").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/n04 has no images \(extensions, any case: .jpg"):
        load_imagefolder(str(root))


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "val" / "n03").rename(root / "val" / "n09"),
     "class folders of .*val differ from the training split's: missing n03; extra n09"),
    (lambda root: None, r"dataset.num_classes=1000; accepted: 3 \(the class folders of .*train\)"),
])
def test_split_mismatches_are_one_line(tmp_path, change, message):
    root = make_image_folder(tmp_path)
    change(root)
    with pytest.raises(ValueError, match=message):
        load_imagefolder(str(root), num_classes=1000 if "1000" in message else None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(crop_size=224, resize_size=200), "dataset.resize_size=200 is smaller than dataset.crop_size=224"),
    (dict(interpolation="cubic"), "dataset.interpolation=cubic; accepted: bilinear, bicubic"),
    (dict(num_workers=-1), "dataset.num_workers=-1; accepted: >= 0"),
])
def test_bad_settings_fail_before_scanning(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_imagefolder(str(tmp_path / "absent"), **kwargs)


def test_missing_root_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.root=.* must hold train/ and val/"):
        load_imagefolder(str(tmp_path))


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_stops_with_one_line_naming_it(tmp_path, workers):
    root = make_image_folder(tmp_path)
    bad = root / "val" / "n02" / "n02_1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])                    # truncated
    _, val = load_imagefolder(str(root), crop_size=32, resize_size=36, num_workers=workers)
    with pytest.raises(UnreadableImageError) as err:
        list(make_loader(val, 4, device="cpu", train=False))
    assert str(err.value).startswith(f"cannot read image {bad}: ") and "\n" not in str(err.value)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path)
    _, val = load_imagefolder(str(root), crop_size=32, resize_size=36, num_workers=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)    # PIL warns above this, errors above twice it
    with pytest.raises(UnreadableImageError, match="cannot read image .*decompression bomb"):
        val.decode()


# ------------------------------------------------------------------------------------------------ configs
def composed(*overrides: str):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_dataset_configs_build_folder_sets(folder):
    train, val = build(composed("dataset=imagefolder", f"dataset.root={folder}", "dataset.crop_size=48",
                                "dataset.resize_size=56", "dataset.num_workers=0").dataset).load()
    assert isinstance(train, FolderSet) and (train.name, train.num_classes, train.crop_size) == ("imagefolder", 3, 48)
    assert val.classes == train.classes and train.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="dataset.num_classes=1000; accepted: 3 "):
        build(composed("dataset=imagenet", f"dataset.root={folder}").dataset).load()


def recorded_setting(folder: Path, run: Path, *overrides: str) -> Path:
    """A run of ``dataset=imagefolder`` built as qsfm-run builds it, recorded as finished in ``run``."""
    cfg = composed("experiment=smoke", "dataset=imagefolder", f"dataset.root={folder}", "dataset.crop_size=32",
                   "dataset.resize_size=36", *overrides)
    exp = build_experiment(cfg, run)
    base = Metrics(top1=50.0, top5=90.0, macs=1000, params=100, latency_ms={})
    write_record(run, RunRecord(exp.settings(), status=OK, results=Results(base, base, base, {}, {}, {})))
    return run


def test_the_data_access_keys_do_not_split_a_setting_and_the_pixels_do(folder, tmp_path):
    recorded_setting(folder, tmp_path / "a", "dataset.num_workers=0")
    copy = shutil.copytree(folder, tmp_path / "copy" / "data", symlinks=True)
    recorded_setting(copy, tmp_path / "b", "dataset.num_workers=2", "dataset.train_dir=train")
    recorded_setting(folder, tmp_path / "c", "dataset.num_workers=0", "dataset.interpolation=bicubic")
    runs = report.collect_runs([tmp_path / name for name in "abc"])
    assert runs.set_index("run")["series_key"].nunique() == 2
    assert len(report.ratio_table(report.ok_runs(runs))) == 2   # a and b are one setting; c is another
    assert "dataset.num_workers" not in runs.columns and set(runs["dataset.interpolation"]) == {"bilinear", "bicubic"}


def test_imagenet_experiment_composes(folder):
    cfg = composed("experiment=qsfm_mobilenetv2_imagenet", f"dataset.root={folder}")
    assert (cfg.model.name, cfg.dataset.name, cfg.dataset.num_classes, cfg.scorer.name) == \
        ("tv_mobilenet_v2", "imagenet", 1000, "qsfm")
    assert cfg.reference == "qsfm_mobilenetv2_imagenet" and cfg.model.pretrained
    assert TrainRecipe.from_dict(dict(cfg.finetune)).epochs > 0


# ------------------------------------------------------------------------------------------- end to end
def prune_finetune_evaluate(model_name: str, splits, run_dir: Path, scorer: str = "qsfm") -> dict:
    """collect -> score -> plan -> prune -> fine-tune -> evaluate on folder-backed splits."""
    train_set, val_set = splits
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=train_set.num_classes).eval()
    example = torch.zeros(1, *input_shape(val_set))
    sets = channel_sets(model, example)
    chosen = get_scorer(scorer)
    stats = collect_stats(model, sets, train_set.sample(12, seed=0), chosen.requests(), batch_size=6)
    orders = chosen.score(model, sets, stats)
    keep, _ = make_keep(orders, sets, PlanSpec(ratio=0.5))
    pruned = apply_keep(model, keep, example)
    recipe = TrainRecipe(epochs=1, batch_size=8, lr=0.01)
    result = train(pruned, train_set, val_set, recipe, device="cpu", seed=0, run_dir=run_dir, progress=False,
                   execution=Execution(amp="none", num_workers=0))
    top1, top5 = accuracy(pruned, val_set, batch_size=8)
    return dict(model=model, pruned=pruned, result=result, top1=top1, top5=top5, example=example)


@pytest.mark.slow
def test_torchvision_model_end_to_end_on_an_image_folder(folder, tmp_path):
    splits = load_imagefolder(str(folder), crop_size=64, resize_size=72, num_workers=0)
    out = prune_finetune_evaluate("tv_mobilenet_v3_small", splits, tmp_path)
    shape = (1, *input_shape(splits[1]))
    assert count_macs(out["pruned"], shape) < 0.8 * count_macs(out["model"], shape)
    assert count_params(out["pruned"]) < count_params(out["model"])
    history = out["result"].history
    assert len(history) == 1 and np.isfinite(history[0]["loss"]) and (tmp_path / STATE_FILE).is_file()
    assert out["top1"] == pytest.approx(out["result"].test_top1)   # the trainer's and evaluate's top-1 agree
    assert 0 <= out["top1"] <= out["top5"] <= 100


@pytest.mark.parametrize("target", ["..", "../../n03", "."])
def test_a_link_back_into_the_tree_is_refused_in_one_line(tmp_path: Path, target: str) -> None:
    root = make_image_folder(tmp_path / "data", per_class=(2, 1))
    link = root / "train" / "n01" / "nested" / "up"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(ValueError) as err:
        load_imagefolder(str(root))
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"image folder {link} is a link back into {root / 'train'} (to ")
    assert message.endswith("its images would be scanned twice, under a wrong label; remove the link")


def test_a_link_to_a_folder_outside_is_followed_once(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=(2, 1))
    outside = tmp_path / "more"
    outside.mkdir()
    Image.new("RGB", (40, 40), COLOURS["n02"]).save(outside / "extra.png")
    (root / "train" / "n02" / "more").symlink_to(outside, target_is_directory=True)
    train, _ = load_imagefolder(str(root))
    files = [f.decode() for f in train.files]
    assert files.count("n02/more/extra.png") == 1
    assert train.labels[files.index("n02/more/extra.png")] == train.classes.index("n02")
    # the same outside folder linked from a second class is reached twice: refused
    (root / "train" / "n03" / "more").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"image folder .*n03/more is reached twice \(it is .*more\); remove the link"):
        load_imagefolder(str(root))
