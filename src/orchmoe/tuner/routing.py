"""How one call's routing reaches the OrchMoE layers, in forward and in a recomputation during backward.

The tuner computes a call's routing once (:class:`CallRouting`: one skill-weight tensor per layer) and publishes it
in a :class:`RoutingSlot` that every OrchMoE layer of the model shares. The slot holds only a *weak* reference, so
the model never keeps a routing alive by itself. What keeps it alive:

- the tuner's ``forward`` / ``generate`` frame, for the duration of the call;
- in training with autograd on, the autograd graph of the call: :func:`hold_in_graph` passes the embedding output
  through an identity node whose context holds the routing. Gradient checkpointing recomputes layers during
  backward, before that node runs (every layer is downstream of it), so a recomputed layer finds the same routing;
  once backward has freed the graph, nothing holds it. An identity node on the language model's last hidden state
  (:func:`republish_in_backward`), whose backward runs before any layer's, publishes the routing again, in case
  another call ran between this call's forward and backward.

Reentrant checkpointing recomputes a layer inside a nested ``backward`` call, which must not run through the
routers' graph (it is shared by every layer and would be freed by the first nested call). During such a
recomputation a layer therefore gets a detached leaf copy of its skill weights; the leaf's gradient is collected in
the routing and handed to the routers' graph by the identity node, whose backward runs after every layer's. Without
checkpointing, or with non-reentrant checkpointing, gradients take the ordinary path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn


@dataclass
class RoutingState:
    """Routing statistics of one call (for the loss and the training log); tensors, no host sync."""

    task_weights: torch.Tensor  # (B, T)
    mi_loss: torch.Tensor  # scalar: mean_b H(w_b) - H(mean_b w)
    entropy_per_example: torch.Tensor  # scalar, detached
    entropy_marginal: torch.Tensor  # scalar, detached


@dataclass(eq=False)
class CallRouting:
    """The skill weights of every OrchMoE layer for one call, in the form each layer multiplies by."""

    weights: dict[nn.Module, torch.Tensor]  # layer -> (B, S*r) or (B, S)
    state: RoutingState | None = None
    recomputed_grads: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # of reentrant recomputations
    backpropagated: bool = False  # set when backward has passed through the call's graph (its loss is spent)

    def for_layer(self, layer: nn.Module) -> torch.Tensor | None:
        weights = self.weights.get(layer)
        if weights is None or not (weights.requires_grad and torch.is_grad_enabled() and _in_backward()):
            return weights
        leaf = weights.detach().requires_grad_()  # a reentrant recomputation: see the module docstring
        leaf.register_hook(partial(self._collect_recomputed_grad, layer))
        return leaf

    def _collect_recomputed_grad(self, layer: nn.Module, grad: torch.Tensor) -> None:
        grads = self.recomputed_grads
        grads[layer] = grad if layer not in grads else grads[layer] + grad


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (a reentrant checkpoint's recomputation).

    torch has no public API for this; ``torch._C._current_graph_task_id`` (-1 outside backward, since torch 1.13)
    is pinned by ``tests/tuner/test_routing.py::test_the_backward_probe_of_this_torch``, which fails on a torch
    that drops or changes it."""
    return torch._C._current_graph_task_id() != -1


class RoutingSlot:
    """Shared by a tuner and its layers: a weak reference to the routing of the call in progress, and one to the
    routing of the latest training call with autograd on (whose router objective joins the loss).

    Copies and pickles of a model get an empty slot (a routing belongs to one call, never to the model).
    """

    __slots__ = ("__weakref__", "_loss_ref", "_ref")

    def __init__(self) -> None:
        self._ref: weakref.ReferenceType[CallRouting] | None = None
        self._loss_ref: weakref.ReferenceType[CallRouting] | None = None

    def get(self) -> CallRouting | None:
        return None if self._ref is None else self._ref()

    def set(self, routing: CallRouting | None) -> None:
        """Publish ``routing`` (None: none) for the call that starts; the weak reference stays after the call, alive
        as long as the call's autograd graph (if any) holds the routing."""
        self._ref = None if routing is None else weakref.ref(routing)

    def get_for_loss(self) -> CallRouting | None:
        """The routing of the latest training call with autograd on (a no-grad call in train mode, e.g. a trainer's
        metrics or reference pass, does not replace it)."""
        return None if self._loss_ref is None else self._loss_ref()

    def set_for_loss(self, routing: CallRouting) -> None:
        self._loss_ref = weakref.ref(routing)

    def __reduce__(self) -> tuple[type, tuple]:
        return RoutingSlot, ()


class _RepublishInBackward(torch.autograd.Function):
    """Identity on the language model's last hidden state (a view: no copy); its backward, which runs before any
    layer's, publishes the call's routing again, so recomputations in this backward use it even if another call ran
    since. On the hidden state rather than the output head's logits, so that a loss that never calls the head
    module (a fused linear cross-entropy, TRL's ``fused_lm_head``) gets it too."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, slot: RoutingSlot, routing: CallRouting) -> torch.Tensor:
        ctx.slot, ctx.routing = slot, routing
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.slot.set(ctx.routing)
        return grad, None, None


def republish_in_backward(output: torch.Tensor, slot: RoutingSlot, routing: CallRouting) -> torch.Tensor:
    """``output`` unchanged; when backward reaches it, ``routing`` is published in ``slot`` again."""
    return _RepublishInBackward.apply(output, slot, routing) if output.requires_grad else output


class _HoldInGraph(torch.autograd.Function):
    """Identity on ``hidden``; its context holds the routing while the graph lives, and its backward hands the
    gradients collected from reentrant recomputations to the routers' graph."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, routing: CallRouting, anchor: torch.Tensor, *weights: torch.Tensor):
        ctx.routing = routing
        ctx.layers = list(routing.weights)
        return hidden.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ctx.routing.backpropagated = True
        recomputed = ctx.routing.recomputed_grads
        return (grad, None, None, *(recomputed.pop(layer, None) for layer in ctx.layers))


def hold_in_graph(hidden: torch.Tensor, routing: CallRouting) -> torch.Tensor:
    """``hidden`` unchanged, made part of the autograd graph that keeps ``routing`` alive (see the module docstring).

    The anchor, a scalar leaf, puts the node in the graph even when nothing else of it requires grad (frozen
    routers), as peft's ``enable_input_require_grads`` does for reentrant checkpointing.
    """
    anchor = torch.zeros((), device=hidden.device, requires_grad=True)
    return _HoldInGraph.apply(hidden, routing, anchor, *routing.weights.values())


def last_hidden_module(model: nn.Module) -> nn.Module | None:
    """The module whose output is the language model's last hidden state (``get_decoder()``), the head's input; the
    output head itself where a model has no decoder to name."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, nn.Module) else None


def republished(output: Any, slot: RoutingSlot, routing: CallRouting) -> Any:
    """``output`` (a tensor, a tuple or a ``ModelOutput`` whose first field is the hidden state) with its hidden state
    passed through :func:`republish_in_backward`."""
    if isinstance(output, torch.Tensor):
        return republish_in_backward(output, slot, routing)
    hidden = republish_in_backward(output[0], slot, routing)
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output[next(iter(output.keys()))] = hidden  # a ModelOutput: its first field (last_hidden_state)
    return output
