"""Bytes a forward pass keeps for backward, per region (layer i, output), measured, not assumed.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd saves; each is counted
once by its storage (views, and a tensor saved by two ops, share one), parameters are left out
(model states, not activations), and a storage belongs to the region whose forward first saved
it. Regions follow forward pre-hooks: ``embed`` until the first decoder layer runs, ``layer<i>``
while layer i runs, ``output`` from the final norm on (norm, LM head, loss). The planner's
activation term (operator planner/activations.py) is compared with these figures in
tests/trainer/test_trainer_activations.py and benchmarks/activations.py.
"""

# ruff: noqa: PLC0415 - torch loads lazily
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def measure(model: Any, layers: Sequence[Any], final_norm: Any, forward: Callable[[], Any]) -> dict[str, int]:
    """Run ``forward()`` (returns the loss) and its backward; bytes saved per region."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    region = ["embed"]
    seen: dict[int, tuple[str, int]] = {}

    def enter(name: str) -> Callable[..., None]:
        def hook(_module: Any, _args: Any) -> None:
            region[0] = name

        return hook

    handles = [layer.register_forward_pre_hook(enter(f"layer{i}")) for i, layer in enumerate(layers)]
    handles.append(final_norm.register_forward_pre_hook(enter("output")))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen and storage.nbytes() > 0:
            seen[key] = (region[0], storage.nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, int] = {}
    for name, nbytes in seen.values():
        out[name] = out.get(name, 0) + nbytes
    return out
