"""Registers the data-aware methods (Fisher, RegMean, AdaMerging, AdaMerging++, WEMoE) defined in
:mod:`neuromerge.data_aware.methods`, so ``neuromerge methods`` lists them; the static engine refuses them."""

from ..data_aware import methods as _data_aware_methods  # noqa: F401  (registers on import)
