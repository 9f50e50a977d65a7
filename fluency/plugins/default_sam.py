"""Metric ``sam``: per-image SAM sharpness (Foret et al. 2021), the report's robustness measure.

For image i with loss L_i (the checkpoint's training loss, z = mu, model in eval
mode so the loss is deterministic)::

    g_i = ∇_W L_i(W)
    ε̂_i = ρ · g_i / (‖g_i‖₂ + 1e-12)                      (SAM)
    ε̂_i = ρ · W² ⊙ g_i / (‖ |W| ⊙ g_i ‖₂ + 1e-12)         (adaptive SAM, ASAM)
    s_i = L_i(W + ε̂_i) − L_i(W)

using *the image's own gradient* (a batch gradient gives other numbers). ``terms`` picks the
loss L_i: ``loss`` (the checkpoint's training loss, reconstruction + β·KL, the default),
``recon`` (its reconstruction terms only) or ``kl`` (the unweighted KL term only), so the
sharpness of reconstructing an image can be told apart from that of encoding it. A large
s_i means the loss of that image is sharp around the trained weights: the model's
understanding of it is fragile, so lower is more fluent. At small ρ, s_i ≈ ρ·‖g_i‖.

Two exact implementations: ``loop`` (one image at a time) and ``vmap``
(``torch.func`` per-sample gradients, ``chunk_size`` images at once); ``auto``
takes ``vmap`` on a GPU, and on a CPU when a chunk's per-image weight copies fit in
512 MiB (vae-small: 1.85× the loop), else the loop, whose memory does not grow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.api import FluencyError

EPS = 1e-12


def sam_perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                     adaptive: bool = False) -> list[torch.Tensor]:
    """ε̂ for one gradient: ρ·g/‖g‖ (one L2 norm over all tensors), or the ASAM form when ``adaptive``."""
    if adaptive:
        scaled = [p.abs() * g for p, g in zip(params, grads)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        return [rho * p.pow(2) * g / (norm + EPS) for p, g in zip(params, grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [rho * g / (norm + EPS) for g in grads]


def sharpness(loss: Callable[[], torch.Tensor], params: Sequence[torch.nn.Parameter], rho: float,
              adaptive: bool = False) -> tuple[float, float]:
    """``(L(W + ε̂) − L(W), ‖∇L‖)`` for a scalar loss closure over ``params``; the weights are restored exactly."""
    base = loss()
    grads = torch.autograd.grad(base, params, allow_unused=True, materialize_grads=True)  # a term may skip weights
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, sam_perturbation([p.detach() for p in params], grads, rho, adaptive)):
            p.add_(e)
        try:
            perturbed = loss()
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)
    gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return float(perturbed - base.detach()), float(gnorm)


TERMS = ("loss", "recon", "kl")
#: memory a vmap chunk may take on the CPU before ``method="auto"`` falls back to the loop
VMAP_CPU_BYTES = 512 << 20


class SAMSharpness(FluencyMetric):
    """Per-image SAM sharpness; options ``rho``, ``adaptive``, ``terms``, ``parameters``, ``method``, ``chunk_size``."""

    def _loss(self, batch: MetricBatch) -> Callable[[Any, torch.Tensor], torch.Tensor]:
        """The per-image loss the ``terms`` option names: the whole training loss, or one of its parts."""
        loss_fn = batch.loss
        if batch.model is None or loss_fn is None:
            raise FluencyError(f"{self.name} needs the model and its loss (MetricSpec needs='model')")
        term = self.options.get("terms") or "loss"
        if term == "loss":
            return loss_fn
        if term not in TERMS:
            raise FluencyError(f"{self.name}: terms={term!r}; use one of {list(TERMS)}")
        parts = getattr(loss_fn, "parts", None)
        if parts is None:
            raise FluencyError(f"{self.name}: terms={term!r} needs a loss with .parts(output, images) (the "
                               f"checkpoint's loss {type(loss_fn).__name__} has none); use terms=loss")
        return lambda out, x: parts(out, x)[term]

    @property
    def name(self) -> str:
        return "sam"

    def _params(self, model: Any) -> dict[str, torch.nn.Parameter]:
        if self.options.get("parameters", "all") == "encoder":
            named = model.encoder_parameters()
        else:
            named = {n: p for n, p in model.named_parameters()}
        named = {n: p for n, p in named.items() if p.requires_grad}  # frozen weights (e.g. a frozen encoder) stay put
        if not named:
            raise FluencyError("sam: the model has no parameters to perturb for parameters="
                               f"{self.options.get('parameters')!r}")
        return named

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        self._loss(batch)  # fails early, naming the problem, when the model or the chosen loss term is missing
        method = self.options.get("method", "auto")
        if method == "auto":
            method = "vmap" if batch.images.device.type == "cuda" or self._vmap_fits(batch.model) else "loop"
        fn = self._vmap if method == "vmap" else self._loop
        sharp = fn(batch)
        if not torch.isfinite(sharp).all():
            bad = [i for i, ok in zip(batch.image_ids, torch.isfinite(sharp).tolist()) if not ok]
            raise FluencyError(f"sam: non-finite sharpness for images {bad[:10]}")
        return [MetricValues("sam", sharp)]

    def _vmap_fits(self, model: Any) -> bool:
        """Whether a vmap chunk's per-image copies (gradient, ε̂, perturbed weights, with a margin: 4 × 4 bytes
        per weight and image) fit in :data:`VMAP_CPU_BYTES`; small models then take the faster batched path on
        the CPU too (vae-small: 1.85× the loop, measured), big ones the loop, whose memory does not grow."""
        weights = sum(p.numel() for p in self._params(model).values())
        return int(self.options.get("chunk_size", 16)) * weights * 16 <= VMAP_CPU_BYTES

    def _loop(self, batch: MetricBatch) -> torch.Tensor:
        model, loss_fn = batch.model, self._loss(batch)
        assert model is not None
        params = list(self._params(model).values())
        rho, adaptive = float(self.options["rho"]), bool(self.options.get("adaptive", False))
        values = []
        for i in range(len(batch.image_ids)):
            x = batch.images[i:i + 1]
            s, _ = sharpness(lambda: loss_fn(model(x, sample=False), x).sum(), params, rho, adaptive)
            values.append(s)
        return torch.tensor(values, dtype=torch.float64)

    def _vmap(self, batch: MetricBatch) -> torch.Tensor:
        model, loss_fn = batch.model, self._loss(batch)
        assert model is not None
        chosen = {n: p.detach() for n, p in self._params(model).items()}
        frozen = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
        frozen.update({n: b.detach() for n, b in model.named_buffers()})
        rho, adaptive = float(self.options["rho"]), bool(self.options.get("adaptive", False))
        names = list(chosen)

        def one_loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            x = x.unsqueeze(0)
            out = functional_call(model, {**frozen, **p}, (x,), {"sample": False})
            return loss_fn(out, x).sum()

        def one(x: torch.Tensor) -> torch.Tensor:
            base = one_loss(chosen, x)
            g = grad(one_loss)(chosen, x)
            eps = sam_perturbation([chosen[n] for n in names], [g[n] for n in names], rho, adaptive)
            moved = {n: chosen[n] + e for n, e in zip(names, eps)}
            return one_loss(moved, x) - base

        chunk = int(self.options.get("chunk_size", 16))
        with torch.no_grad():
            return vmap(one, chunk_size=chunk)(batch.images).double().cpu()


class GradNorm(SAMSharpness):
    """‖∇_W L_i(W)‖₂ per image, the first-order part of SAM sharpness (s_i ≈ ρ·‖g_i‖ at small ρ)."""

    @property
    def name(self) -> str:
        return "grad-norm"

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        model, loss_fn = batch.model, self._loss(batch)
        assert model is not None
        params = list(self._params(model).values())
        values = []
        for i in range(len(batch.image_ids)):
            x = batch.images[i:i + 1]
            grads = torch.autograd.grad(loss_fn(model(x, sample=False), x).sum(), params, allow_unused=True,
                                        materialize_grads=True)
            values.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return [MetricValues("grad-norm", torch.tensor(values, dtype=torch.float64))]


TERMS_HELP = ("which loss: loss (the training loss, reconstruction + beta*KL), recon (its reconstruction "
              "terms) or kl (the KL term, unweighted)")


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="grad-norm",
            factory=GradNorm,
            description="Per-image norm of the loss gradient over the weights (SAM sharpness ≈ ρ·grad-norm).",
            needs="model",
            requires=("objective",),
            higher_is_more_fluent=False,
            options={"parameters": Option("str", "all", "which weights", choices=("all", "encoder")),
                     "terms": Option("str", "loss", TERMS_HELP, choices=TERMS)},
        ),
        MetricSpec(
            name="sam",
            factory=SAMSharpness,
            description="Per-image SAM sharpness L_i(W+ε̂_i) − L_i(W) with the image's own gradient (Foret et al. 2021).",
            needs="model",
            requires=("objective",),
            higher_is_more_fluent=False,
            options={
                "rho": Option("float", 0.05, "radius ρ of the weight perturbation", minimum=0.0),
                "adaptive": Option("bool", False, "adaptive SAM (ASAM, Kwon et al. 2021; use a ~10x larger rho)"),
                "terms": Option("str", "loss", TERMS_HELP, choices=TERMS),
                "parameters": Option("str", "all", "which weights to perturb", choices=("all", "encoder")),
                "method": Option("str", "auto", "loop (exact, one image at a time), vmap (torch.func "
                                 "per-sample gradients) or auto (vmap on GPU, and on CPU when a chunk fits "
                                 "in 512 MiB; else loop)",
                                 choices=("auto", "loop", "vmap")),
                "chunk_size": Option("int", 16, "images per vmap chunk (bounds memory)", minimum=1),
            },
        )
    ]
