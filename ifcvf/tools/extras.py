"""Optional extras: what a command needs beyond what `ifcvf serve` on hardware needs.

The runtime dependencies are cffi and rich.  The rest are extras of the
package (pyproject.toml); `make run` and `make test` install all of them:

- ``sim``          simpy: the simulated IFCVF (`--device sim`, `ifcvf sim run`, `ifcvf bench sim`);
- ``plot``         matplotlib: `ifcvf sim run --plot`;
- ``conformance``  pytest: `ifcvf conformance`;
- ``metrics``      prometheus_client: `ifcvf serve --metrics`;
- ``test``         pytest and hypothesis: the repository's own tests;
- ``dask``         distributed: `ifcvf sim sweep --scheduler ADDRESS`;
- ``fuzz``         atheris and hypothesis: `ifcvf fuzz`.

A command checks for its extra before it does anything (``require``); the
CLI turns a ``MissingExtra`` (or an import of a missing extra's module that
slipped past the check) into one line that names the extra and the pip
command, not a traceback.
"""
from __future__ import annotations

import importlib.util

# extra -> the top-level modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "sim": ("simpy",),
    "plot": ("matplotlib",),
    "conformance": ("pytest",),
    "metrics": ("prometheus_client",),
    "test": ("pytest", "hypothesis"),
    "dask": ("distributed",),
    "fuzz": ("atheris", "hypothesis"),
}


class MissingExtra(Exception):
    """A command needs an optional extra that is not installed; the message says which."""

    def __init__(self, extra: str, module: str, what: str):
        self.extra = extra
        self.module = module
        self.what = what
        super().__init__(f"{what} needs the `{extra}` extra ({module} is not installed): "
                         f"pip install 'ifcvf[{extra}]'")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, what: str) -> None:
    """Raise ``MissingExtra`` unless every module of ``extra`` can be imported."""
    for module in EXTRAS[extra]:
        if not _installed(module):
            raise MissingExtra(extra, module, what)


def extra_providing(module: str | None) -> str | None:
    """The extra whose missing module ``module`` (a ModuleNotFoundError's name) is, if any."""
    if not module:
        return None
    top = module.split(".")[0]
    for extra, modules in EXTRAS.items():
        if top in modules:
            return extra
    return None
