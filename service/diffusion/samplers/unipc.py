"""UniPC (Zhao et al. 2023, arXiv:2302.04867): multistep predictor UniP + corrector UniC, B(h) = e^h − 1 (bh2).

Data-prediction form, λ = log(α/σ), h = λ_t − λ_s, hh = −h. The predictor of order p moves x_s to
x_t = (σ_t/σ_s) x_s − α_t (e^{hh} − 1) m_s − α_t B(h) Σ_k ρ_k D_k with D_k = (m_{s_k} − m_s)/r_k,
r_k = (λ_{s_k} − λ_s)/h, and ρ solving the order conditions R ρ = b (paper, Algorithm 2; ρ = ½ for
p = 2). Once ε at the new x_t is known, UniC redoes that same step with the new x̂_0 as one more
difference (order p+1, no extra network evaluation): the corrected x_t replaces the predicted one
before the next predictor. As in diffusers' UniPCMultistepScheduler: no x̂_0 clipping, warm-up
orders, the last step first order into σ = 0 (``lower_order_final``: order ≤ steps left).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from service.diffusion.samplers.base import Plan, Rows, StepOutput, log_snr_half
from service.diffusion.samplers.multistep import MultistepSolver

__all__ = ["UniPC"]


def _rhos(rks: list[float], hh: float, order: int, corrector: bool) -> np.ndarray:
    """ρ of the UniP (``corrector=False``) or UniC update: R ρ = b with R_ij = r_j^i, b_i = h φ_{i+1}(hh) i!/B(h)."""
    b_h = math.expm1(hh)  # bh2
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1
    rows, b = [], []
    r = np.array([*rks, 1.0])
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r, b = np.stack(rows), np.array(b)
    if corrector:
        return np.array([0.5]) if order == 1 else np.linalg.solve(big_r, b)
    if order == 1:
        return np.zeros(0)
    return np.array([0.5]) if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])


class UniPC(MultistepSolver):
    family = "unipc"

    def __init__(self, name: str = "unipc", order: int = 2) -> None:
        self.name, self.order = name, order
        self.history_slots = 1 + order  # x_s before its predictor (for UniC), then x̂_0 of the last `order` steps
        self.corrected_x_slot = 0  # the corrected x_s replaces x_s: inpainting keeps its known pixels there too

    def order_at(self, plan: Plan, i: int) -> int:
        """Order of the predictor at step i: warm-up min(i+1, order), and ≤ steps left with ``lower_order_final``."""
        if plan.alphas_cumprod_next[i] >= 1.0 and not plan.options.lower_order_final:
            return 1  # into σ = 0 only first order is finite
        left = len(plan) - i if plan.options.lower_order_final else self.order
        return min(self.order, left, min(i, self.order) + 1)

    def coefficients(self, plan: Plan, i: int, _eta: float = 0.0) -> tuple[float, ...]:
        """Coefficients over the terms (x_last, x, m_i, m_{i−1}, …, m_{i−order}): the corrected x, then x_t."""
        k_terms = 3 + self.order
        lam = [log_snr_half(plan.alphas_cumprod[j]) if j >= 0 else 0.0 for j in range(i, i - self.order - 1, -1)]

        def m(j: int) -> np.ndarray:  # the term vector of m_{i−j}
            e = np.zeros(k_terms)
            e[2 + j] = 1.0
            return e

        # 1. UniC: redo step i−1 → i with the new x̂_0 m_i (order of that predictor + 1)
        x_c = np.zeros(k_terms)
        if i == 0:
            x_c[1] = 1.0
        else:
            order = self.order_at(plan, i - 1)
            abar_t, abar_s = plan.alphas_cumprod[i], plan.alphas_cumprod[i - 1]
            h = lam[0] - lam[1]
            rks = [(lam[1 + k] - lam[1]) / h for k in range(1, order)]
            rhos = _rhos(rks, -h, order, corrector=True)
            pairs = enumerate(zip(rhos[:-1], rks, strict=True), 1)
            diffs = sum((rho * (m(1 + k) - m(1)) / rk for k, (rho, rk) in pairs), np.zeros(k_terms))
            alpha_t, sigma_t, sigma_s = math.sqrt(abar_t), math.sqrt(1.0 - abar_t), math.sqrt(1.0 - abar_s)
            x_c[0] = sigma_t / sigma_s
            x_c += -alpha_t * math.expm1(-h) * m(1) - alpha_t * math.expm1(-h) * (diffs + rhos[-1] * (m(0) - m(1)))
        # 2. UniP: step i → i+1 from the corrected x
        abar_s, abar_t = plan.alphas_cumprod[i], plan.alphas_cumprod_next[i]
        order = self.order_at(plan, i)
        if abar_t >= 1.0:  # into σ = 0: x_t = m_i
            return *x_c.tolist(), *m(0).tolist()
        h = log_snr_half(abar_t) - lam[0]
        rks = [(lam[k] - lam[0]) / h for k in range(1, order)]
        rhos = _rhos(rks, -h, order, corrector=False)
        pairs = enumerate(zip(rhos, rks, strict=True), 1)
        diffs = sum((rho * (m(k) - m(0)) / rk for k, (rho, rk) in pairs), np.zeros(k_terms))
        alpha_t, sigma_t, sigma_s = math.sqrt(abar_t), math.sqrt(1.0 - abar_t), math.sqrt(1.0 - abar_s)
        x_t = sigma_t / sigma_s * x_c - alpha_t * math.expm1(-h) * m(0) - alpha_t * math.expm1(-h) * diffs
        return *x_c.tolist(), *x_t.tolist()

    def step(self, rows: Rows) -> StepOutput:
        m_new = rows.pred_x0()  # data prediction x̂_0 = (x − σ ε)/α at the (uncorrected) x, as diffusers
        hist = rows.history  # (B, 1 + order, C, H, W): x_last, m_{i−1}, …, m_{i−order}
        assert hist is not None
        terms = torch.cat([hist[:, :1], rows.x[:, None], m_new[:, None], hist[:, 1:]], dim=1)
        c = rows.per_row(self.coefficients)
        k = terms.shape[1]
        x_c = (c[:, :k] * terms).sum(dim=1)
        prev = (c[:, k:] * terms).sum(dim=1)
        new_hist = torch.cat([x_c[:, None], m_new[:, None], hist[:, 1:-1]], dim=1)
        return StepOutput(prev, m_new, new_hist)
