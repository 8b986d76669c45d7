"""Training backends: where a :class:`tinkex.TrainingClient` runs its forward and backward passes.

Two are built in, registered as the plugin ``tinkex._backends._plugin``:

- ``local`` (:mod:`tinkex._backends.local`): a transformers causal LM in this process.
- ``tinker`` (:mod:`tinkex._backends.tinker`): the Tinker service through the official SDK.

Other packages add backends with the ``tinkex_register_backends`` hook.
"""

from __future__ import annotations
