"""Every extension point is one ``Registry``: the same duplicate warning, "unknown name" error and auto-import."""
import importlib
import pkgutil
import sys
import warnings

import pytest

from qsfm_cli.collect import STATISTICS
from qsfm_cli.loggers import LOGGERS
from qsfm_cli.models import MODELS
from qsfm_cli.plan import PROTOCOLS
from qsfm_cli.recover import RECOVERIES
from qsfm_cli.registry import Registry
from qsfm_cli.scoring import SCORERS

REGISTRIES = {"collect": STATISTICS, "scoring": SCORERS, "plan": PROTOCOLS, "recover": RECOVERIES,
              "loggers": LOGGERS, "models": MODELS}


@pytest.mark.parametrize("package", REGISTRIES)
def test_every_module_of_the_package_is_imported(package):
    registry = REGISTRIES[package]
    assert isinstance(registry, Registry) and registry.names()
    path = importlib.import_module(f"qsfm_cli.{package}").__path__
    assert {f"qsfm_cli.{package}.{m.name}" for m in pkgutil.iter_modules(path)} <= set(sys.modules)


@pytest.mark.parametrize("package", REGISTRIES)
def test_an_unknown_name_is_one_line_in_the_projects_format(package):
    registry = REGISTRIES[package]
    with pytest.raises(ValueError) as err:
        registry.get("nope")
    assert str(err.value).startswith(f"{registry.key}=nope; accepted: {', '.join(registry.names())}")


@pytest.mark.parametrize("package", REGISTRIES)
def test_a_name_registered_twice_warns_and_the_later_wins(package):
    registry = REGISTRIES[package]
    name, last = registry.names()[0], registry.names()[-1]
    first, other = registry.get(name), registry.get(last)
    with registry.scratch():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            registry.register(first)           # the same object again (a re-import) is no duplicate
        with pytest.warns(UserWarning, match=f"^{registry.what} '{name}' registered twice; the later definition "
                                             f"wins$"):
            registry.register(other, name)
        assert registry.get(name) is other
    assert registry.get(name) is first


def test_build_refuses_an_option_naming_the_accepted_keys():
    registry: Registry = Registry("thing", "thing.name")

    @registry.register
    class Thing:
        name = "a"

        def __init__(self, size: int = 1, *, colour: str = "red"):
            self.size, self.colour = size, colour

    assert registry.build("a", {"size": 3}).size == 3
    with pytest.raises(ValueError, match=r"^thing.shape=2; accepted: thing.size, thing.colour, thing.extra$"):
        registry.build("a", {"shape": 2}, also=("extra",))
