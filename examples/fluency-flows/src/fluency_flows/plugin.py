"""Registration of the architecture ``glow-small`` (cheap: the model module and normflows load lazily)."""

from __future__ import annotations

from fluency.api import ArchitectureSpec, Option, hookimpl

FLUENCY_PLUGIN_API = "1.1"


def glow_options() -> dict[str, Option]:
    """The typed options of ``glow-small``; none depends on the seed (the run's seed draws the weights)."""
    return {
        "image_size": Option("int", 32, "input height and width (a multiple of 2^levels)", minimum=2),
        "levels": Option("int", 2, "scales: squeeze, steps, then (except the last) split off half the channels",
                         minimum=1, maximum=6),
        "steps": Option("int", 4, "Glow steps (actnorm, invertible 1x1 conv, affine coupling) per scale",
                        minimum=1),
        "hidden_channels": Option("int", 64, "channels of the hidden layers of each coupling network", minimum=1),
    }


@hookimpl
def fluency_register_architectures() -> list[ArchitectureSpec]:
    return [
        ArchitectureSpec(
            name="glow-small",
            factory="fluency_flows.model:GlowSmall",
            description="Small multi-scale Glow normalising flow (normflows GlowBlocks): exact likelihood, "
                        "hookable per scale and per step.",
            options=glow_options(),
        )
    ]
