"""The docs as contracts: every config schema key is documented in docs/config.md, docs/python.md's Python
code runs as written, and the README's word on where Hydra is used holds."""
from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore

from qsfm_cli import config
from qsfm_cli.evaluate import accuracy, count_params

from .conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MD = ROOT / "docs" / "config.md"
PYTHON_MD = ROOT / "docs" / "python.md"
TOP_LEVEL = "Top-level keys"


def schema_keys() -> list[tuple[str, str]]:
    """``(group, dotted key)`` of every field of every schema ``config.register()`` stores: the run schema
    with its nested groups, and each option schema under ``schema/<group>/``. A schema class met twice (the
    fine-tuning recipe is also ``baseline.recipe``) is listed once, under its first owner."""
    config.register()
    repo = ConfigStore.instance().repo
    nodes = [("", repo["run_schema.yaml"].node)]
    nodes += [(group, option.node) for group, options in sorted(repo["schema"].items())
              for option in options.values()]
    keys: dict[str, str] = {}
    nested: set[type] = set()

    def walk(cls: type, prefix: str, group: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, kind = prefix + f.name, hints[f.name]
            if dataclasses.is_dataclass(kind):
                if kind not in nested:
                    nested.add(kind)
                    walk(kind, key + ".", group or f.name)
            elif f.name != "_target_":        # Hydra's instantiation target, not a setting
                keys.setdefault(key, group)

    for group, node in nodes:
        walk(node._metadata.object_type, f"{group}." if group else "", group)
    return [(group, key) for key, group in keys.items()]


def code_words(text: str) -> set[str]:
    """The dotted names inside the backticks of ``text`` (`` `execution.amp` ``, `` `.compile` ``, `` `k1` ``)."""
    spans = re.findall(r"`([^`\n]+)`", text)
    return {word for span in spans for word in re.findall(r"[A-Za-z_]\w*(?:\.\w+)*", span)}


def sections(markdown: str) -> dict[str, str]:
    """Heading -> text up to the next heading."""
    parts = re.split(r"^#{2,4} (.+)$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def documented(group: str, key: str, doc: dict[str, str]) -> bool:
    """``key`` is named in full anywhere, or by its last part in the section of its group (the heading that
    names `` `group/` ``; keys of groups without one belong to "Top-level keys")."""
    if any(w == key or w.startswith(key + ".") for text in doc.values() for w in code_words(text)):
        return True
    group = group.split(".")[0]
    owner = next((text for heading, text in doc.items() if f"`{group}/`" in heading), doc[TOP_LEVEL])
    leaf = key.rsplit(".", 1)[-1]
    return any(w == leaf or w.endswith("." + leaf) for w in code_words(owner))


def test_schema_keys_are_found():
    keys = {key for _, key in schema_keys()}
    assert {"prune.ratio", "model.name", "seed", "dataset.root", "scorer.metric", "recover.bn_images"} <= keys


def test_every_schema_key_is_in_config_md():
    doc = sections(CONFIG_MD.read_text())
    assert TOP_LEVEL in doc
    missing = [key for group, key in schema_keys() if not documented(group, key, doc)]
    assert not missing, f"docs/config.md does not name these config keys: {', '.join(missing)}"


def test_an_undocumented_key_is_caught():
    doc = sections("## Top-level keys\n\n`seed`, `execution.amp`, `.compile`\n\n### `prune/`\n\n`ratio`\n")
    assert documented("", "seed", doc) and documented("execution", "execution.compile", doc)
    assert documented("prune", "prune.ratio", doc)
    assert not documented("prune", "prune.round_to", doc) and not documented("", "device", doc)


def python_blocks(path: Path, info: str) -> list[str]:
    """The code of ``path``'s fenced blocks whose info string is ``info``, in order."""
    return [code for kind, code in re.findall(r"^```([^\n]*)\n(.*?)^```", path.read_text(), flags=re.M | re.S)
            if kind == info]


def run_code(blocks: list[str]) -> dict:
    namespace: dict = {"__name__": "__main__"}
    exec(compile("\n\n".join(blocks), "docs/python.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_python_md_runs(tmp_path, monkeypatch, capsys):
    """docs/python.md's ``python`` blocks as one script, offline (digits, a small ResNet), in an empty
    directory: it prunes and prints the base and pruned metrics."""
    monkeypatch.chdir(tmp_path)
    ns = run_code(python_blocks(PYTHON_MD, "python"))
    assert count_params(ns["pruned"]) < count_params(ns["model"])
    assert capsys.readouterr().out.count("top1=") == 2


@pytest.mark.slow
def test_python_md_real_data_block_loads_the_public_resnet56(tmp_path, monkeypatch):
    """Its ``python real-data`` block (which replaces the offline model and data) with the files where the doc
    says they are: the network it loads scores the checkpoint's published 93.39% (the stages after it are
    the offline test's)."""
    (tmp_path / "data").symlink_to(shared_file("data", "cifar-10-batches-py").parent)
    (tmp_path / "resnet56-4bfd9763.th").symlink_to(shared_file("checkpoints", "resnet56-4bfd9763.th"))
    monkeypatch.chdir(tmp_path)
    ns = run_code(python_blocks(PYTHON_MD, "python real-data"))
    assert len(ns["train_set"]) == 50000
    assert accuracy(ns["model"], ns["test"])[0] == pytest.approx(93.39, abs=0.005)


def test_hydra_is_imported_only_by_app_and_config():
    """README: the CLI (app.py) and the schemas it registers (config.py) import Hydra; no stage does."""
    importers = set()
    for path in (ROOT / "qsfm_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] == "hydra" for name in names):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"qsfm_cli/app.py", "qsfm_cli/config.py"}
