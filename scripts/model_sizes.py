"""The registered CIFAR models' sizes as docs/models.md gives them: conv + linear MACs at 32x32 and parameters.

    python scripts/model_sizes.py
"""
from __future__ import annotations

import argparse

from qsfm_cli.counting import count_macs, count_params
from qsfm_cli.models import create_model, list_models
from qsfm_cli.papers import conv_linear_params


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("| model | MACs (32x32) | params | params without BN |")
    print("|---|---|---|---|")
    for name in list_models():
        if name == "tiny":
            continue
        model = create_model(name, num_classes=10)
        print(f"| `{name}` | {count_macs(model) / 1e6:.2f}M | {count_params(model) / 1e6:.3f}M | "
              f"{conv_linear_params(model) / 1e6:.3f}M |")


if __name__ == "__main__":
    main()
