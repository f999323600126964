"""Samplers: one module per family behind one protocol (:class:`~service.diffusion.samplers.base.Sampler`).

=============  ==========================================================  =====================
name           update                                                      diffusers class
=============  ==========================================================  =====================
ddpm           ancestral, respaced when steps < T (Ho et al. 2020)         DDPMScheduler
ddim           DDIM with η (Song et al. 2021)                              DDIMScheduler
dpmpp_2m       DPM-Solver++(2M) (Lu et al. 2022)                           DPMSolverMultistep…
dpmpp_3m       DPM-Solver++(3M)                                            (solver_order=3)
dpmpp_2m_sde   SDE-DPM-Solver++(2M), noise from each row's generator       (sde-dpmsolver++)
unipc          UniPC, bh2, order 2 with the UniC corrector (Zhao 2023)     UniPCMultistep…
=============  ==========================================================  =====================

Adding a sampler is one module and one entry in :data:`SAMPLERS`.
"""

from __future__ import annotations

from service.diffusion.samplers.base import Plan, Rows, Sampler, SamplerOptions, StepOutput
from service.diffusion.samplers.ddim import DDIM
from service.diffusion.samplers.ddpm import DDPM
from service.diffusion.samplers.dpmsolver import DPMSolverPP
from service.diffusion.samplers.spacing import Spacing
from service.diffusion.samplers.unipc import UniPC

__all__ = [
    "DEFAULT_SAMPLER",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SPACINGS",
    "Plan",
    "Rows",
    "Sampler",
    "SamplerOptions",
    "Spacing",
    "StepOutput",
    "get_sampler",
]

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        DDPM(),
        DDIM(),
        DPMSolverPP("dpmpp_2m", order=2),
        DPMSolverPP("dpmpp_3m", order=3),
        DPMSolverPP("dpmpp_2m_sde", order=2, sde=True),
        UniPC("unipc", order=2),
    )
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
SPACINGS: tuple[Spacing, ...] = ("leading", "trailing", "linspace", "karras", "logsnr")
# What a request that names no sampler gets (API, CLI, web page): the best quality for its cost in
# docs/benchmarks.md ("Samplers: quality against cost") — on the default model SDE-DPM-Solver++(2M) leads from
# 10 steps on and is within 2x the real-data floor at its default 20 steps, where DDPM-T costs 1000 forwards.
DEFAULT_SAMPLER = "dpmpp_2m_sde"


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}") from None
