"""The PyTorch peer: the same models, weights and batch; frozen by ``requires_grad_(False)``.

Idiomatic eager PyTorch on the CPU: ``nn.Linear``/``nn.LayerNorm``/``nn.Embedding``
modules, ``F.scaled_dot_product_attention``, ``torch.optim.Adam`` over the
parameters that still require gradients. Weights are copied from the JAX model
(kernels transposed), so one step can be checked against the JAX split.
Imported only when torch is installed (the ``bench`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _models import Setting, Spec
from _variants import LEARNING_RATE, TORCH, Variant


class TorchMLP(nn.Module):
    def __init__(self, *, width: int, depth: int, classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class TorchBlock(nn.Module):
    def __init__(self, *, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model, eps=1e-6)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-6)
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d // self.heads))
        x = x + self.out(att.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.norm2(x)), approximate="tanh"))


class TorchEncoder(nn.Module):
    def __init__(
        self, *, vocab: int, seq: int, d_model: int, heads: int, depth: int, classes: int
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        self.blocks = nn.ModuleList(
            [TorchBlock(d_model=d_model, heads=heads) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class TorchGP(nn.Module):
    def __init__(self, *, features: int) -> None:
        super().__init__()
        self.log_variance = nn.Parameter(torch.zeros(()))
        self.log_lengthscale = nn.Parameter(torch.zeros(features))
        self.log_noise = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = y.shape[0]
        z = x / self.log_lengthscale.exp()
        d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
        k = self.log_variance.exp() * torch.exp(-0.5 * d2)
        k = k + (self.log_noise.exp() + 1e-6) * torch.eye(n)
        chol = torch.linalg.cholesky(k)
        alpha = torch.cholesky_solve(y[:, None], chol)[:, 0]
        nll = 0.5 * y @ alpha + chol.diagonal().log().sum() + 0.5 * n * math.log(2 * math.pi)
        return nll / n


def _build(spec: Spec) -> nn.Module:
    s = spec.sizes
    if spec.name == "mlp":
        return TorchMLP(width=s["width"], depth=s["depth"], classes=s["classes"])
    if spec.name == "transformer":
        return TorchEncoder(
            vocab=s["vocab"],
            seq=s["seq"],
            d_model=s["d_model"],
            heads=s["heads"],
            depth=s["depth"],
            classes=s["classes"],
        )
    if spec.name == "gp":
        return TorchGP(features=s["features"])
    raise ValueError(f"no PyTorch twin for model {spec.name!r}")


def jax_path(name: str) -> tuple[str, bool]:
    """The JAX path of a torch parameter name, and whether the array is transposed."""
    parts = name.split(".")
    leaf = parts[-1]
    if leaf == "weight":
        if parts[-2] == "embed":
            return "/".join([*parts[:-1], "embedding"]), False
        if "norm" in parts[-2]:
            return "/".join([*parts[:-1], "scale"]), False
        return "/".join([*parts[:-1], "kernel"]), True
    return "/".join(parts), False


class TorchStep:
    """One PyTorch training step on a fixed batch, the frozen parameters left out of Adam."""

    def __init__(self, spec: Spec, setting: Setting, init: dict[str, np.ndarray], batch: Any):
        self.model = _build(spec)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                path, transposed = jax_path(name)
                value = init[path].T if transposed else init[path]
                p.copy_(torch.from_numpy(np.array(value, copy=True)))
                p.requires_grad_(not setting.is_frozen(path))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
        x, y = (torch.from_numpy(np.array(a, copy=True)) for a in batch)
        if spec.name == "gp":
            self.loss: Callable[[], torch.Tensor] = lambda: self.model(x, y)
        else:
            self.loss = lambda: F.cross_entropy(self.model(x), y.long())

    def run(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def params(self) -> dict[str, np.ndarray]:
        out = {}
        for name, p in self.model.named_parameters():
            path, transposed = jax_path(name)
            value = p.detach().numpy().copy()
            out[path] = value.T if transposed else value
        return out

    def opt_state(self) -> list[np.ndarray]:
        return [
            t.detach().numpy().copy()
            for state in self.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        ]


def torch_variant(spec: Spec, setting: Setting, init: dict[str, np.ndarray], batch: Any) -> Variant:
    """The PyTorch peer as a variant; it holds its own copy of the batch."""
    peer = TorchStep(spec, setting, init, batch)
    return Variant(
        name=TORCH,
        run=lambda x, y: peer.run(),
        params=peer.params,
        opt_state=peer.opt_state,
    )


def threads() -> int:
    return torch.get_num_threads()


def version() -> str:
    return torch.__version__
