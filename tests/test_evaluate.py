"""The MACs meter the planner counts with, the held-out images and the divergence it is given."""
import pytest
import torch
from torch import nn

from qsfm_cli.data import ImageSet
from qsfm_cli.counting import MacsMeter, count_macs
from qsfm_cli.evaluate import divergence_from, fidelity
from qsfm_cli.models import create_model
from qsfm_cli.pruning import apply_keep, channel_sets


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "mobilenetv2", "tv_resnet18"])
def test_macs_meter_matches_the_flop_counter_on_pruned_models(name):
    model = create_model(name)
    x = torch.zeros(1, 3, 32, 32)
    meter = MacsMeter(model, x)
    assert meter.exact and meter.base == count_macs(model)
    g = torch.Generator().manual_seed(0)
    keep = {s.name: sorted(torch.randperm(s.size, generator=g)[:max(1, s.size * 6 // 10)].tolist())
            for s in channel_sets(model, x, "all")}
    pruned = apply_keep(model, keep, x)
    assert meter(pruned) == count_macs(pruned, (1, 3, 32, 32)) < meter.base
    assert meter.reduction(pruned) == 1 - count_macs(pruned) / count_macs(model)


def test_macs_meter_falls_back_to_the_flop_counter_beyond_conv_and_linear():
    class Bilinear(nn.Module):       # a matmul outside conv/linear layers: the shape sum misses it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            f = self.conv(x).flatten(2)
            return f @ f.transpose(1, 2)

    model = Bilinear()
    meter = MacsMeter(model, torch.zeros(1, 3, 8, 8))
    assert not meter.exact and meter(model) == meter.base == count_macs(model, (1, 3, 8, 8))


def numbered(n: int, labels: int = 0) -> ImageSet:
    """``n`` images whose pixels hold their own index, all labelled ``labels``."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageSet(images, torch.full((n,), labels, dtype=torch.long), 2, (0.0,) * 3, (1.0,) * 3)


def ids(ds: ImageSet) -> set[int]:
    return set(ds.images[:, 0, 0, 0].tolist())


def test_held_out_images_are_apart_from_every_sample_and_from_each_other():
    ds = numbered(40)
    sensitivity, select = ds.held_out(10, seed=3), ds.held_out(8, seed=3, skip=10)
    calibration = ds.sample(22, seed=3)                      # 22 + 10 + 8 = 40: the whole set, no overlap
    assert (len(ids(sensitivity)), len(ids(select)), len(ids(calibration))) == (10, 8, 22)
    assert not ids(sensitivity) & ids(select) and not (ids(sensitivity) | ids(select)) & ids(calibration)
    assert ids(ds.sample(12, seed=3)) <= ids(calibration)    # a smaller sample is part of a larger one
    assert ids(ds.held_out(10, seed=4)) != ids(sensitivity)  # another seed, other images
    with pytest.raises(ValueError, match="8 held-out images after 33 others; this set has 40"):
        ds.held_out(8, seed=3, skip=33)


class Logits(nn.Module):
    """Logits read from the image index i in the pixels: ``scale`` x (i - 20, 20 - i) / 10."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        v = x[:, 0, 0, 0] * 255       # the loader divides by 255 (mean 0, std 1 here)
        return self.scale * torch.stack([v - 20, 20 - v], 1) / 10


def test_divergence_reads_no_label_and_is_zero_for_the_reference_itself():
    ds = numbered(40, labels=-1)           # a label read anywhere would fail (cross-entropy, indexing)
    loss_of = divergence_from(Logits(1.0), ds, batch_size=16)
    assert loss_of(Logits(1.0)) == pytest.approx(0.0, abs=1e-7)
    assert 0 < loss_of(Logits(0.5)) < loss_of(Logits(0.1)) < loss_of(Logits(-1.0))


def test_fidelity_compares_with_the_reference_and_the_labels():
    ds = numbered(40, labels=1)
    # Logits(1) predicts class 1 for pixels < 20, class 0 above; Logits(-1) the opposite.
    same = fidelity(Logits(1.0), Logits(1.0), ds, batch_size=16)
    flipped = fidelity(Logits(1.0), Logits(-1.0), ds, batch_size=16)
    assert same["images"] == 40 and same["agreement"] == 100.0 and same["kl"] == pytest.approx(0.0, abs=1e-7)
    assert same["top1"] == 50.0 and flipped["agreement"] == pytest.approx(2.5) and flipped["kl"] > 1   # pixel 20: a tie
