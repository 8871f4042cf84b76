"""The peers' loss code loaded without their packages' heavy ``__init__`` imports.

lightly's and open_clip's package ``__init__`` modules import torchvision (and timm),
which this project does not install; their loss files import only torch. So the
files are loaded on their own. Used by the drop-in tests (tests/kernels) and by the
new-loss benchmarks (``benchmarks/new_losses.py``).

Each loader raises ``ModuleNotFoundError`` where the package is not installed; the
caller decides whether that is a skip or a failure.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: How to install each peer (the versions CI installs, ``.ci/run``).
INSTALL = {
    "lightly": "pip install --no-deps lightly==1.6.0",
    "open_clip": "pip install --no-deps open_clip_torch==3.3.0",
    "pytorch_metric_learning": "pip install --no-deps pytorch-metric-learning==2.9.0",
}


def package_root(name: str) -> Path:
    """The folder of an installed package, found without importing it.

    Raises:
        ModuleNotFoundError: not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed ({INSTALL.get(name, 'pip install')})")
    return Path(next(iter(spec.submodule_search_locations)))


def lightly_ntxent_class() -> type:
    """lightly's ``NTXentLoss`` from its own source files (``loss/ntx_ent_loss.py``,
    ``models/modules/memory_bank.py``, ``utils/dist.py``), loaded without the package's
    ``__init__`` modules, which pull in torchvision; ``lightly.models.utils`` (used only
    by the multi-process bank update) is a stub. ``sys.modules`` is restored after."""
    root = package_root("lightly")
    saved = {n: m for n, m in sys.modules.items() if n == "lightly" or n.startswith("lightly.")}
    packages = ["lightly", "lightly.utils", "lightly.models", "lightly.models.modules",
                "lightly.loss"]  # fmt: skip
    try:
        for name in list(saved):
            del sys.modules[name]
        for name in packages:
            sys.modules[name] = ModuleType(name)
        stub = ModuleType("lightly.models.utils")
        sys.modules[stub.__name__] = stub
        sys.modules["lightly.models"].utils = stub  # type: ignore[attr-defined]
        loaded = {}
        for name, rel in (("lightly.utils.dist", "utils/dist.py"),
                          ("lightly.models.modules.memory_bank", "models/modules/memory_bank.py"),
                          ("lightly.loss.ntx_ent_loss", "loss/ntx_ent_loss.py")):  # fmt: skip
            file_spec = importlib.util.spec_from_file_location(name, root / rel)
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = module
            parent, _, leaf = name.rpartition(".")
            setattr(sys.modules[parent], leaf, module)
            file_spec.loader.exec_module(module)
            loaded[name] = module
        return loaded["lightly.loss.ntx_ent_loss"].NTXentLoss
    finally:
        for name in [n for n in sys.modules if n == "lightly" or n.startswith("lightly.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def open_clip_loss_module() -> ModuleType:
    """open_clip's ``loss.py`` on its own (it imports only torch; the package's
    ``__init__`` pulls in torchvision and timm)."""
    path = package_root("open_clip") / "loss.py"
    loader = importlib.util.spec_from_file_location("open_clip_loss_only", path)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


@functools.cache
def cached_lightly_ntxent_class() -> type:
    """``lightly_ntxent_class()``, loaded once per process (benchmarks build many)."""
    return lightly_ntxent_class()


@functools.cache
def cached_open_clip_loss_module() -> ModuleType:
    """``open_clip_loss_module()``, loaded once per process."""
    return open_clip_loss_module()
