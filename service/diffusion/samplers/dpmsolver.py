"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): multistep data-prediction solvers of the diffusion ODE/SDE.

With λ = log(α/σ) (α = √ᾱ, σ = √(1−ᾱ)), h = λ_t − λ_s and D0 = x̂_0 of the current step, the
first-order update is x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D0 (paper, eq. 5 — DDIM). The multistep
variants add finite differences of the previous steps' x̂_0: ``dpmpp_2m`` (Algorithm 2, diffusers'
"midpoint" form), ``dpmpp_3m`` (third order), and ``dpmpp_2m_sde`` (the SDE variant of section 4.2,
which adds σ_t √(1 − e^{−2h}) z, z from the row's own generator). As in diffusers'
DPMSolverMultistepScheduler: x̂_0 is not clipped, the warm-up steps use lower orders, the final step
(to σ = 0) is first order, and below 15 steps the last two steps use at most second order
(``lower_order_final``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from service.diffusion.samplers.base import Plan, Rows, StepOutput, log_snr_half
from service.diffusion.samplers.multistep import MultistepSolver

__all__ = ["DPMSolverPP"]


class DPMSolverPP(MultistepSolver):
    family = "dpmsolver"

    def __init__(self, name: str, order: int, sde: bool = False) -> None:
        if sde and order > 2:
            raise ValueError("the SDE variant is implemented up to second order")
        self.name, self.order, self.sde = name, order, sde
        self.history_slots = order - 1  # x̂_0 of the previous steps, newest first

    def order_at(self, plan: Plan, i: int) -> int:
        """diffusers' order rule: warm up one order per step; first order into σ = 0; ≤ 2nd just before it.

        The warm-up counts the steps this plan ran (a tail starts at first order, as diffusers' img2img does);
        "fewer than 15 steps" is about the whole sequence (diffusers' ``len(timesteps)``).
        """
        n = len(plan)
        if self.order == 1 or i < 1 or i == n - 1:
            return 1
        if self.order == 2 or i < 2 or (plan.options.lower_order_final and plan.first + n < 15 and i == n - 2):
            return 2
        return 3

    def draws_noise(self, plan: Plan, i: int, eta: float) -> bool:
        return self.sde and plan.alphas_cumprod_next[i] < 1.0

    def coefficients(self, plan: Plan, i: int, _eta: float = 0.0) -> tuple[float, ...]:
        """(c_x, c_m0, c_m1, c_m2, c_z) of x_t = c_x x + Σ c_mk x̂0_{i−k} + c_z z, in float64."""
        abar_s, abar_t = plan.alphas_cumprod[i], plan.alphas_cumprod_next[i]
        if abar_t >= 1.0:  # final step to σ = 0: e^{−h} = 0, so x_t = D0 (ODE and SDE alike)
            return 0.0, 1.0, 0.0, 0.0, 0.0
        alpha_t, sigma_t, sigma_s = math.sqrt(abar_t), math.sqrt(1.0 - abar_t), math.sqrt(1.0 - abar_s)
        lam = [log_snr_half(plan.alphas_cumprod[j]) if j >= 0 else 0.0 for j in (i, i - 1, i - 2)]
        h = log_snr_half(abar_t) - lam[0]
        order = self.order_at(plan, i)
        # 1. D0 and the finite differences D1, D2 as combinations of (m0, m1, m2) = x̂0 of steps i, i−1, i−2
        d0 = np.array([1.0, 0.0, 0.0])
        d1 = d2 = np.zeros(3)
        if order >= 2:
            r0 = (lam[0] - lam[1]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0  # D1_0 = (m0 − m1)/r0
            d1 = d1_0
        if order == 3:
            r1 = (lam[1] - lam[2]) / h
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1  # D1_1 = (m1 − m2)/r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
        if self.sde:
            # 2a. SDE-DPM-Solver++ (section 4.2):
            #     (σ_t/σ_s e^{−h}) x + α_t (1 − e^{−2h}) (D0 + ½ D1) + σ_t √(1 − e^{−2h}) z
            phi = -math.expm1(-2.0 * h)
            c_x = sigma_t / sigma_s * math.exp(-h)
            m = alpha_t * phi * (d0 + 0.5 * d1)
            c_z = sigma_t * math.sqrt(phi)
        else:
            # 2b. DPM-Solver++(1, 2M): (σ_t/σ_s) x − α_t (e^{−h} − 1) D0 − ½ α_t (e^{−h} − 1) D1 (2M: Algorithm 2);
            #     3M: (σ_t/σ_s) x − α_t (e^{−h} − 1) D0 + α_t ((e^{−h} − 1)/h + 1) D1 − α_t ((e^{−h} − 1 + h)/h² − ½) D2
            em1 = math.expm1(-h)
            c_x, c_z = sigma_t / sigma_s, 0.0
            if order == 3:
                m = -alpha_t * em1 * d0 + alpha_t * (em1 / h + 1.0) * d1 - alpha_t * ((em1 + h) / h**2 - 0.5) * d2
            else:
                m = -alpha_t * em1 * (d0 + 0.5 * d1)
        return c_x, *m.tolist(), c_z

    def step(self, rows: Rows) -> StepOutput:
        m0 = rows.pred_x0()  # data prediction x̂_0 = (x − σ ε)/α (no clipping, as diffusers)
        c = rows.per_row(self.coefficients)
        prev = c[:, 0] * rows.x + c[:, 1] * m0 + c[:, 4] * rows.noise
        hist = rows.history
        if hist is not None:
            prev = prev + c[:, 2] * hist[:, 0]
            if self.order == 3:
                prev = prev + c[:, 3] * hist[:, 1]
            hist = torch.cat([m0[:, None], hist[:, :-1]], dim=1)  # newest first
        return StepOutput(prev, m0, hist)
