"""Physical pruning computes exactly what the masked network computes, for every supported architecture.

The reference is the unpruned model with the removed channels zeroed where they are produced: the output
of every BatchNorm (and, for torchvision models, every conv) that owns them, and for a residual stream the
stream itself after every addition. Random keep-sets, eval mode, randomized BatchNorm statistics.
"""
import json

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qsfm_cli.counting import count_macs, count_params
from qsfm_cli.models import create_model, list_models
from qsfm_cli.plan import PlanSpec, make_keep
from qsfm_cli.pruning import (apply_keep, architecture, build_model, channel_sets, classifier_name,
                              prunable_channels)
from qsfm_cli.papers import conv_linear_params, reference, thop_flops
from qsfm_cli.types import Order


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.4 + 0.2)  # small gains: no blow-up in depth
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def random_keep(sets, g: torch.Generator) -> dict[str, list[int]]:
    keep = {}
    for s in sets:
        n = int(torch.randint(1, s.size + 1, (1,), generator=g))
        keep[s.name] = sorted(torch.randperm(s.size, generator=g)[:n].tolist())
    return keep


def removed(s, keep) -> list[int]:
    return sorted(set(range(s.size)) - set(keep.get(s.name, range(s.size))))


def zero_outputs(model: nn.Module, targets: dict[str, list[int]]):
    def hook(idx):
        def zero(_module, _inputs, out):
            out = out.clone()
            out[:, idx] = 0
            return out
        return zero
    return [model.get_submodule(name).register_forward_hook(hook(idx)) for name, idx in targets.items()]


def norms_after(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """The BatchNorm that reads each conv's output, found by running the model."""
    wrote, read, alive = {}, {}, []

    def record(name, table, pick):
        def hook(_module, inputs, out):
            table[name] = id(pick(inputs, out))
            alive.extend((inputs[0], out))
        return hook

    handles = [m.register_forward_hook(record(n, wrote, lambda i, o: o)) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(record(n, read, lambda i, o: i[0])) for n, m in model.named_modules()
                if isinstance(m, _BatchNorm)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    by_input = {v: k for k, v in read.items()}
    return {conv: by_input[out] for conv, out in wrote.items() if out in by_input}


def family_mask(model, x, sets, keep) -> dict[str, list[int]]:
    """The BatchNorm after each producing conv, and for a residual stream the output of the module that
    holds each producer (the block, whose output is the stream)."""
    norms = norms_after(model, x)
    targets = {}
    for s in sets:
        idx = removed(s, keep)
        if not idx:
            continue
        for p in s.producers:
            targets[norms[p]] = idx
            parent = p.rpartition(".")[0]
            if s.kind == "stream" and parent:
                targets[parent] = idx
    return targets


def torch_pruning_mask(model, x, sets, keep) -> dict[str, list[int]]:
    """Every conv/BatchNorm whose outputs Torch-Pruning's group for the set removes, at its indices."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    targets = {}
    for s in sets:
        idx = removed(s, keep)
        if not idx:
            continue
        conv = model.get_submodule(s.name)
        for dep, where in graph.get_pruning_group(conv, graph.get_pruner_of_module(conv).prune_out_channels, idx):
            module = dep.target.module
            if isinstance(module, (nn.Conv2d, _BatchNorm)) and graph.is_out_channel_pruning_fn(dep.handler):
                targets[names[module]] = sorted(set(targets.get(names[module], [])) | set(where))
    return targets


@torch.no_grad()
def masked(model, x, targets):
    handles = zero_outputs(model, targets)
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def assert_equivalent(model, x, sets, keep, targets):
    pruned = apply_keep(model, keep, x)
    with torch.no_grad():
        ours, ref, full = pruned(x), masked(model, x, targets), model(x)
    scale = ref.abs().max().item()
    assert (ref - full).abs().max().item() > 1e-3 * scale, "the keep-set should change the logits"
    assert torch.allclose(ours, ref, atol=1e-4 * scale, rtol=0), (ours - ref).abs().max().item()
    for s in sets:  # really smaller
        assert pruned.get_submodule(s.name).out_channels == len(keep.get(s.name, range(s.size)))
    return pruned


REGISTERED = list_models()  # each pruned by its family adapter


@pytest.mark.parametrize("name", REGISTERED)
@pytest.mark.parametrize("scope", ["default", "stage"])
def test_registered_model_pruning_equals_masking(name, scope):
    model = randomized(create_model(name))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    sets = channel_sets(model, x, scope)
    for _ in range(3):
        keep = random_keep(sets, g)
        assert_equivalent(model, x, sets, keep, family_mask(model, x, sets, keep))


SLOW = pytest.mark.slow
TORCHVISION = [pytest.param("tv_resnet18", {}, marks=SLOW), ("tv_mobilenet_v3_small", {}),
               pytest.param("tv_efficientnet_b0", {}, marks=SLOW), pytest.param("tv_densenet121", {}, marks=SLOW),
               pytest.param("tv_regnet_x_400mf", {}, marks=SLOW),
               pytest.param("tv_googlenet", {"aux_logits": False, "init_weights": True}, marks=SLOW)]


@pytest.mark.parametrize("name, kwargs", TORCHVISION)
def test_torchvision_pruning_equals_masking(name, kwargs):
    assert_generic_pruning_equals_masking(randomized(create_model(name, **kwargs)))


def assert_generic_pruning_equals_masking(model: nn.Module) -> list:
    """Two random keeps of every set of a Torch-Pruning-pruned model equal masking; the pruned model rebuilt
    from its JSON spec computes the same. Returns the channel sets."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=g)
    sets = channel_sets(model, x, "all")
    for _ in range(2):
        keep = random_keep(sets, g)
        pruned = assert_equivalent(model, x, sets, keep, torch_pruning_mask(model, x, sets, keep))
    rebuilt = build_model(json.loads(json.dumps(architecture(pruned))))
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned(x))
    return sets


@pytest.mark.parametrize("name, shape", [("resnet20", 32), ("mobilenetv2", 32), ("tv_resnet18", 32)])
def test_a_pruned_model_prunes_again_exactly(name, shape):
    """Iterative pruning: the sets of a pruned model (remapped shortcuts included) prune exactly too."""
    model = randomized(create_model(name))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, shape, shape, generator=g)
    once = apply_keep(model, random_keep(channel_sets(model, x, "all"), g), x)
    sets = channel_sets(once, x, "all")
    keep = random_keep(sets, g)
    mask = family_mask(once, x, sets, keep) if name != "tv_resnet18" else torch_pruning_mask(once, x, sets, keep)
    assert_equivalent(once, x, sets, keep, mask)


def test_scopes_and_names_per_model():
    x = torch.zeros(1, 3, 32, 32)
    r56 = create_model("resnet56")
    default = channel_sets(r56, x)
    assert [s.name for s in default][:2] == ["layer1.0.conv1", "layer1.1.conv1"] and len(default) == 27
    stage = {s.name: s for s in channel_sets(r56, x, "stage")}
    assert len(stage) == 31 and stage["conv1"].kind == "stream"
    assert stage["layer2.0.conv2"].producers == tuple(f"layer2.{b}.conv2" for b in range(9))
    assert stage["layer1.0.conv1"].consumers == ("layer1.0.conv2",)
    assert len(channel_sets(create_model("vgg16_bn"), x)) == 13
    mobile = channel_sets(create_model("mobilenetv2"), x)
    assert len(mobile) == 16 and mobile[0].producers == ("layers.1.conv1", "layers.1.conv2")
    assert prunable_channels(r56, x)["layer3.0.conv2"] == 64
    assert channel_sets(r56, x, "all") == list(stage.values())


def test_stage_pruning_remaps_the_padding_shortcut():
    model = randomized(create_model("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    keep = {"layer1.0.conv2": [0, 3, 5, 9], "layer2.0.conv2": list(range(0, 32, 2))}
    pruned = apply_keep(model, keep, x)
    # Stage-1 channel 3 fed stage-2 channel 8 + 3 = 11, which is removed; channel 5 fed 13 (removed);
    # channel 0 fed 8 -> new position 4; 9 fed 17 (removed).
    assert pruned.layer2[0].shortcut.index == [4, -1, -1, -1]
    assert pruned.stage_widths == [4, 16, 64] and pruned.stem_width == 16
    assert pruned.layer1[0].shortcut.index == [0, -1, -1, 1, -1, 2, -1, -1, -1, 3] + [-1] * 6


def test_keep_and_the_input_model():
    model = create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = apply_keep(model, {"layer1.0.conv1": [1, 2]}, x)
    assert pruned.layer1[0].conv1.out_channels == 2 and pruned.layer1[1].conv1.out_channels == 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.layer1[0].conv1.out_channels == 16


@pytest.mark.parametrize("keep, message", [
    ({"linear": [0]}, "'linear' is the classifier: its outputs are the class logits and are never pruned"),
    ({"layer1.1.conv2": [0]}, "unknown channel set 'layer1.1.conv2'; prunable sets: conv1, layer1.0.conv1"),
    ({"layer1.0.conv1": []}, "keep['layer1.0.conv1'] is empty"),
    ({"layer1.0.conv1": [0, 16]}, "distinct indices in [0, 16)"),
])
def test_bad_keep_fails_with_one_line(keep, message):
    model = create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError) as err:
        apply_keep(model, keep, x)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_torchvision_classifier_is_never_a_set():
    model = create_model("tv_resnet18")
    x = torch.zeros(1, 3, 64, 64)
    assert classifier_name(model, x) == "fc"
    assert "fc" not in prunable_channels(model, x)
    with pytest.raises(ValueError, match="'fc' is the classifier"):
        apply_keep(model, {"fc": [0]}, x)


def test_untraced_layers_are_named():
    with pytest.raises(ValueError, match="aux1.conv.conv.*aux_logits=False"):
        channel_sets(create_model("tv_googlenet", init_weights=True), torch.zeros(1, 3, 64, 64), "all")


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_architecture_round_trips(name):
    model = randomized(create_model(name))
    x = torch.randn(2, 3, 32, 32)
    pruned = apply_keep(model, random_keep(channel_sets(model, x, "all"), torch.Generator().manual_seed(3)), x)
    rebuilt = build_model(json.loads(json.dumps(architecture(pruned))), pruned.state_dict())
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned(x))


def test_mobilenet_stem_pruned_to_a_stage_width_keeps_block0_plain():
    """Block 0 (16 outputs) has no residual add; a stem pruned to 16 channels must not gain one."""
    model = randomized(create_model("mobilenetv2"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, 32, generator=g)
    sets = channel_sets(model, x, "stage")
    keep = {**random_keep(sets, g), "conv1": list(range(0, 32, 2))}
    pruned = assert_equivalent(model, x, sets, keep, family_mask(model, x, sets, keep))
    assert [b.residual for b in pruned.layers] == [b.residual for b in model.layers]


# -------------------------------------------------------------------------- published rows (no data)
def row_model(name: str, rates: str) -> nn.Module:
    model = create_model(name)
    x = torch.zeros(1, 3, 32, 32)
    plan = PlanSpec(rates=rates, scope="stage")
    sets = channel_sets(model, x, plan.scope)
    plan.validate(sets, model)
    orders = {s.name: Order(removal=list(range(s.size))) for s in sets}  # counts need no scores
    keep, info = make_keep(orders, sets, plan, model=model, example_input=x)
    assert info["layout"] == "chip" or info["layout"] == "hrank"
    return apply_keep(model, keep, x)


@pytest.mark.parametrize("name, rates, flops_M, params_M", [
    ("resnet56", "[0.]+[0.15]*2+[0.4]*27", 65.94, 0.48),
    ("resnet56", "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9", 34.78, 0.24),
    ("resnet110", "[0.]+[0.2]*2+[0.3]*18+[0.35]*36", 140.54, 1.04),
])
def test_chip_rows_match_the_paper(name, rates, flops_M, params_M):
    """CHIP's FLOPs are thop's count of its pruned network, which our CHIP layout builds exactly."""
    model = row_model(name, rates)
    assert abs(thop_flops(model) / 1e6 - flops_M) <= 0.005 * flops_M
    assert round(conv_linear_params(model) / 1e6, 2) == params_M


@pytest.mark.parametrize("key, name", [("hrank_resnet56", "resnet56"), ("chip_resnet56_a", "resnet56"),
                                       ("chip_resnet110", "resnet110")])
def test_reference_rows_compare_with_the_baseline_counted_as_the_papers_count(key, name):
    """The papers' params leave BatchNorm out, so their baseline must too; MACs have no BatchNorm part."""
    row, model = reference(key), create_model(name)
    assert row.base_params_M == conv_linear_params(model) / 1e6 < count_params(model) / 1e6
    assert row.base_macs_M == count_macs(model) / 1e6
    assert row.params_reduction_pct == round(100 * (1 - row.params_M / (conv_linear_params(model) / 1e6)), 2)


HRANK_ROW = "[0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]"


def test_hrank_row_counts():
    """HRank's 62.72M / 0.49M count every conv's outputs reduced by its own entry and its inputs at full
    width (its FLOPs script on its masked network); the network its entries define physically (block
    conv1 widths only) is smaller in MACs, and our count of it is exact."""
    from qsfm_cli.plan import parse_rates

    rates = parse_rates(HRANK_ROW)
    model = create_model("resnet56")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    sizes = {}
    handles = [c.register_forward_hook(lambda m, _i, o: sizes.__setitem__(m, o.shape[-1] * o.shape[-2]))
               for c in convs]
    count_macs(model)
    for h in handles:
        h.remove()
    kept = [c.out_channels - int(r * c.out_channels) for c, r in zip(convs, rates)]
    linear = model.linear.weight.numel() + model.linear.bias.numel()
    hrank_flops = sum(c.in_channels * k * 9 * sizes[c] for c, k in zip(convs, kept)) + linear
    hrank_params = sum(c.in_channels * k * 9 for c, k in zip(convs, kept)) + linear
    assert abs(hrank_flops / 1e6 - 62.72) <= 0.005 * 62.72 and round(hrank_params / 1e6, 2) == 0.49

    pruned = row_model("resnet56", HRANK_ROW)
    mids = [int(w * (1 - rates[1 + 2 * b])) for b, w in enumerate([16] * 9 + [32] * 9 + [64] * 9)]
    assert pruned.mid_widths == mids and pruned.stage_widths == [16, 32, 64]
    # per block 9 * mid * (in + out) * output pixels; stem 27 * 16 * 1024; linear 64 * 10
    ins = [16] * 10 + [32] * 9 + [64] * 8
    outs, pixels = [16] * 9 + [32] * 9 + [64] * 9, [1024] * 9 + [256] * 9 + [64] * 9
    blocks = sum(9 * m * (i + o) * p for m, i, o, p in zip(mids, ins, outs, pixels))
    assert count_macs(pruned) == blocks + 27 * 16 * 1024 + 640
