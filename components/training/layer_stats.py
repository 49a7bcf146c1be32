"""What backpropagation does to each trainable layer, epoch by epoch: its gradient norm, its weight norm
and the update-to-weight ratio (the norm of one optimizer step's change over the weights' norm; around
1e-3 is the usual healthy figure, far above it the learning rate is too high for that layer).

A layer is a stage of the model as components/training/prefix_cache.py cuts it (resnet: conv1, layer1 ..
layer4, fc; timm: conv_stem, blocks.0 .., classifier). Measured on every SAMPLE_EVERY-th step only (and
the first): a copy of the trainable weights before the step and a few norms after it, so the cost stays
a small fraction of a step. Metrics are named `layer/<stage>/grad_norm`, `.../weight_norm`,
`.../update_ratio`.
"""

from __future__ import annotations

import torch
from torch import nn

from components.training.prefix_cache import stage_names

SAMPLE_EVERY = 8
PREFIX = "layer/"


class LayerStats:
    """Call `before_step()` after backward and before `optimizer.step()`, `after_step()` after it, and
    `epoch_metrics()` when the epoch ends (it starts the next epoch afresh)."""

    def __init__(self, model: nn.Module):
        stages = sorted(stage_names(model), key=len, reverse=True)  # the longest stage a name starts with
        self._layer_of = {}
        for name, _ in model.named_parameters():
            self._layer_of[name] = next((s for s in stages if name.startswith(f"{s}.")), name.rsplit(".", 1)[0])
        self.model = model
        self._reset()

    def _reset(self):
        self._step, self._sums, self._counts, self._before = 0, {}, {}, None

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]

    def before_step(self) -> None:
        self._step += 1
        if (self._step - 1) % SAMPLE_EVERY:
            self._before = None
            return
        params = self._trainable()
        with torch.no_grad():
            self._before = [(n, p, p.detach().clone()) for n, p in params]
            self._weights = self._by_layer((n, _norm2(p)) for n, p in params)
            grads = self._by_layer((n, _norm2(p.grad)) for n, p in params)
        for layer, g2 in grads.items():
            self._add(layer, "grad_norm", g2.sqrt().item())

    def after_step(self) -> None:
        if self._before is None:
            return
        with torch.no_grad():
            moved = self._by_layer((n, _norm2(old.sub_(p.detach()))) for n, p, old in self._before)  # in place
        for layer in moved:
            self._add(layer, "update_ratio",
                      (moved[layer].sqrt() / self._weights[layer].sqrt().clamp_min(1e-12)).item())
        self._before = None

    def epoch_metrics(self) -> dict[str, float]:
        """Means over the epoch's sampled steps, and each layer's weight norm as the epoch ends."""
        out = {f"{PREFIX}{layer}/{kind}": total / self._counts[(layer, kind)]
               for (layer, kind), total in sorted(self._sums.items())}
        with torch.no_grad():
            norms = self._by_layer((n, _norm2(p)) for n, p in self.model.named_parameters() if p.requires_grad)
        out.update({f"{PREFIX}{layer}/weight_norm": v.sqrt().item() for layer, v in sorted(norms.items())})
        self._reset()
        return out

    def _by_layer(self, pairs) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, value in pairs:
            layer = self._layer_of.get(name, name)
            out[layer] = out[layer] + value if layer in out else value
        return out

    def _add(self, layer: str, kind: str, value: float) -> None:
        self._sums[(layer, kind)] = self._sums.get((layer, kind), 0.0) + value
        self._counts[(layer, kind)] = self._counts.get((layer, kind), 0) + 1


def _norm2(t: torch.Tensor) -> torch.Tensor:
    """The squared L2 norm, in float32, without a squared copy of the tensor."""
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float32) ** 2


def per_layer(row: dict, kind: str) -> dict[str, float]:
    """{layer: value} of one kind (grad_norm, weight_norm, update_ratio) from a history row."""
    return {k[len(PREFIX):-len(kind) - 1]: v for k, v in row.items()
            if k.startswith(PREFIX) and k.endswith(f"/{kind}")}
