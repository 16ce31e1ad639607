"""The MACs meter the planner counts with, and the held-out loss it is given."""
import pytest
import torch
from torch import nn

from qsfm_cli.data import ImageSet
from qsfm_cli.counting import MacsMeter, count_macs
from qsfm_cli.evaluate import heldout_loss
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


def test_heldout_slice_avoids_the_collected_images():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 2, 2).contiguous()
    ds = ImageSet(images, torch.zeros(40, dtype=torch.long), 2, (0.0,) * 3, (1.0,) * 3)
    collected = set(ds.sample(16, seed=3).images[:, 0, 0, 0].tolist())
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.extend(x[:, 0, 0, 0].round().long().tolist())
            return torch.zeros(len(x), 2)

    heldout_loss(ds, 10, skip=16, seed=3, batch_size=4)(Probe())
    assert len(seen) == 10 and not collected & set(seen)
    with pytest.raises(ValueError, match="no training images left"):
        heldout_loss(ds, 10, skip=40, seed=3)
