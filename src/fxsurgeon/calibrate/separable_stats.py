"""The joint refit of a separable block (either form) from the im2col statistics of its input: last pointwise,
depthwise and (pointwise → depthwise → pointwise) first 1×1 conv weights, alternating exact solves."""

from __future__ import annotations

import math

import torch
from torch import nn

from .solve import conjugate_gradient, residual, ridge_cg, ridge_refit
from .specs import LayerRefit, RefitSpec, conv_padding
from .stats import ADD_MAX_ELEMENTS, RefitStatistics, as_rows, write_back

__all__ = ["DEPTHWISE_CG_ITERATIONS", "DEPTHWISE_MAX_UNKNOWNS", "REFIT_REDUCE", "SEPARABLE_ITERATIONS",
           "SeparableAccumulator"]


#: most depthwise unknowns (C_dw·k²) the depthwise step solves for; above, the pointwise step only
DEPTHWISE_MAX_UNKNOWNS = 8192
#: conjugate-gradient iterations of one depthwise step too large to factorise. Each step starts from the
#: current filters and the best (D, W) is kept by its true error, so an inexact step costs little: on the
#: ResNet-20 at 0.60× MACs, 20 instead of 60 moved the logit error by 2e-5 (the CG was 19.5 of 34 refit seconds)
DEPTHWISE_CG_ITERATIONS = 20
#: alternations of the depthwise and pointwise least-squares steps
SEPARABLE_ITERATIONS = 4
#: refit the first 1×1 conv of a pointwise → depthwise → pointwise block too (a third alternating step)
REFIT_REDUCE = True


class SeparableAccumulator(RefitStatistics):
    """Refit a SeparableConv2d's depthwise and last pointwise weights from statistics of its *input* patches.

    With P = the im2col patches of the block's input (over the depthwise conv's window, stride, padding and
    dilation), the block computes ``y = W · B(D) · T · p`` (+ bias): T the first 1×1 conv expanded over the
    window (identity for depthwise → pointwise), B(D) the block-diagonal depthwise filters, W the pointwise
    weights. ``G = Σ p pᵀ`` and ``C = Σ p yᵀ`` determine the squared error of every (D, W), so the pointwise
    step (least squares in W for fixed D) and the depthwise step (least squares in D for fixed W, whose
    normal matrix is ``(W Wᵀ) ∘ G`` in depthwise-filter coordinates) alternate on them without another pass
    over the data. Both steps shrink towards the data-free weights; the best (D, W) seen is kept.
    """

    def __init__(self, spec: RefitSpec, module: nn.Module, samples: int | None = None,
                 iterations: int | None = None) -> None:
        self.module = module
        self.iterations = SEPARABLE_ITERATIONS if iterations is None else iterations
        self.dw, self.pw = module.depthwise, module.pointwise
        self.red = module.reduce if "reduce" in module._modules else None
        has_bias = self.pw.bias is not None
        c_in = self.red.in_channels if self.red is not None else self.dw.in_channels
        self.k2 = self.dw.kernel_size[0] * self.dw.kernel_size[1]
        super().__init__(spec, has_bias, c_in * self.k2 + has_bias, self.pw.out_channels, self.dw.weight.device,
                         samples)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return self._sampled_add(x, y, y[0].numel() // max(y.shape[1], 1) if y.dim() > 1 else 1)

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        dw = self.dw
        per_sample = self.gram.shape[0] * max(1, y[0].numel() // max(y.shape[1], 1)) if y.dim() > 1 else 1
        step = max(1, ADD_MAX_ELEMENTS // max(per_sample, 1))
        if x.shape[0] > step and y.shape[0] == x.shape[0]:
            return all(self._add(x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step))
        prec = torch.float64 if x.dtype == torch.float64 else torch.float32
        cols = torch.nn.functional.unfold(x.detach().to(prec), dw.kernel_size, dilation=dw.dilation,
                                          padding=conv_padding(dw), stride=dw.stride)
        z = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        t = as_rows(y, False).to(prec)
        if t.shape[0] != z.shape[0] or t.shape[1] != self.cross.shape[1]:
            self.info.reason = (f"the original's output {tuple(y.shape)} does not line up with the block's input "
                                f"{tuple(x.shape)}")
            return False
        return self._accumulate(z, t)

    def finish(self, ridge: float) -> LayerRefit:
        stop = self._unusable()
        if stop is not None:
            return stop
        info = self.info
        dw, pw, k2 = self.dw, self.pw, self.k2
        c_dw, c_mid = dw.out_channels, dw.in_channels
        mult = c_dw // c_mid  # filter g = c·mult + j reads channel c
        dq = c_mid * k2
        gq = cq = g4 = c3 = s2 = None

        def project(t_red: torch.Tensor | None) -> None:
            """Statistics of the depthwise conv's input patches: T p (the first 1×1 conv acts on each tap alike)."""
            nonlocal gq, cq, g4, c3, s2
            if t_red is not None:
                # (T ⊗ I_k²) G (T ⊗ I_k²)ᵀ without forming the Kronecker product: ~9× fewer multiply-adds
                n_red, n_in = t_red.shape
                d_in = n_in * k2
                g = self.gram[:d_in, :d_in].reshape(n_in, k2, n_in, k2)
                main = torch.einsum("rtCs,RC->rtRs", torch.einsum("rc,ctCs->rtCs", t_red, g), t_red)
                gq = main.reshape(n_red * k2, n_red * k2)
                cq = torch.einsum("rc,cto->rto", t_red, self.cross[:d_in].reshape(n_in, k2, -1)).reshape(
                    n_red * k2, -1)
                if self.has_bias:
                    side = torch.einsum("rc,ct->rt", t_red, self.gram[:d_in, d_in].reshape(n_in, k2)).reshape(-1, 1)
                    gq = torch.cat([torch.cat([gq, side], 1), torch.cat([side.T, self.gram[d_in:, d_in:]], 1)])
                    cq = torch.cat([cq, self.cross[d_in:]])
            else:
                gq, cq = self.gram, self.cross
            g4 = gq[:dq, :dq].reshape(c_mid, k2, c_mid, k2)
            c3 = cq[:dq].reshape(c_mid, k2, -1)
            s2 = gq[:dq, dq].reshape(c_mid, k2) if self.has_bias else None  # Σ patches, for the bias

        t0 = self.red.weight.detach().double().reshape(self.red.out_channels, -1) if self.red is not None else None
        project(t0)
        d0 = dw.weight.detach().double().reshape(c_dw, k2)
        w0 = pw.weight.detach().double().reshape(pw.out_channels, c_dw).T
        if self.has_bias:
            w0 = torch.cat([w0, pw.bias.detach().double().unsqueeze(0)])

        def z_stats(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Gram and cross statistics of the depthwise outputs (and the constant, with a bias)."""
            d3 = d.reshape(c_mid, mult, k2)
            gz = torch.einsum("cjCs,CJs->cjCJ", torch.einsum("cjt,ctCs->cjCs", d3, g4), d3).reshape(c_dw, c_dw)
            cz = torch.einsum("cjt,cto->cjo", d3, c3).reshape(c_dw, -1)
            if self.has_bias:
                sz = torch.einsum("cjt,ct->cj", d3, s2).reshape(c_dw, 1)
                gz = torch.cat([torch.cat([gz, sz], 1), torch.cat([sz.T, gq[dq:, dq:]], 1)])
                cz = torch.cat([cz, cq[dq:]])
            return gz, cz

        def pointwise_step(d: torch.Tensor) -> tuple[torch.Tensor, float]:
            gz, cz = z_stats(d)
            w = ridge_refit(gz, cz, w0, ridge)
            return w, residual(gz, cz, self.yy, w)

        def error(d: torch.Tensor, w: torch.Tensor) -> float:
            return residual(*z_stats(d), self.yy, w)

        def depthwise_step(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            # the normal matrix is (W Wᵀ)[g, g'] · G[(c(g), t), (c(g'), t')] over (filter, tap) pairs
            p3 = w[:c_dw].reshape(c_mid, mult, -1)
            target = c3 if s2 is None else c3 - s2[..., None] * w[c_dw]  # the bias is fixed here: fit y − b
            rhs = torch.einsum("cto,cjo->cjt", target, p3).reshape(-1)
            pp = torch.einsum("cjo,CJo->cjCJ", p3, p3)
            n = c_dw * k2
            if n <= 4096:  # small enough to form: factorise, or CG with fast matrix-vector products
                h = (pp[:, :, None, :, :, None] * g4[:, None, :, :, None, :]).reshape(n, n)
                if n <= 1024:
                    return ridge_refit(h, rhs[:, None], d0.reshape(-1, 1), ridge).reshape(c_dw, k2)
                return ridge_cg(h, rhs, d0.reshape(-1), ridge, start=d.reshape(-1),
                                iterations=DEPTHWISE_CG_ITERATIONS).reshape(c_dw, k2)
            diag = (torch.diagonal(pp.reshape(c_dw, c_dw)).reshape(c_mid, mult, 1)
                    * torch.diagonal(g4.reshape(dq, dq)).reshape(c_mid, 1, k2)).reshape(-1)

            def matvec(v: torch.Tensor) -> torch.Tensor:
                x = torch.einsum("cjCJ,CJs->cjCs", pp, v.reshape(c_mid, mult, k2))
                return torch.einsum("ctCs,cjCs->cjt", g4, x).reshape(-1)

            # large: conjugate gradients from the current filters, without forming the matrix; an inexact
            # inner step is fine (the best (D, W) is kept by its true error)
            return conjugate_gradient(matvec, diag, rhs, d0.reshape(-1), ridge, start=d.reshape(-1),
                                      iterations=DEPTHWISE_CG_ITERATIONS).reshape(c_dw, k2)

        dp = self.gram.shape[0] - self.has_bias  # input patch width, C_in·k²
        c_in = dp // k2
        if self.red is not None:  # G's (i, ·, i, ·) blocks, for the first 1×1 conv's preconditioner
            gp_blocks = torch.diagonal(self.gram[:dp, :dp].reshape(c_in, k2, c_in, k2), dim1=0, dim2=2).permute(2, 0, 1)

        def reduce_step(w: torch.Tensor, d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """Least squares in the first 1×1 conv's weights T (c_mid × C_in) for fixed D and W.

            The normal matrix, over (channel, input channel) pairs, is
            ``Σ_{j,j'} (W Wᵀ)[(c,j),(c',j')] Σ_{t,t'} D[(c,j),t] D[(c',j'),t'] G[(i,t),(i',t')]``; conjugate
            gradients apply it without forming it (one product with G per step).
            """
            p = w[:c_dw]
            pp = p @ p.T  # (c_dw, c_dw)
            g = self.gram[:dp, :dp]
            cross = self.cross[:dp] if not self.has_bias else self.cross[:dp] - self.gram[:dp, dp:dp + 1] * w[c_dw]
            cp = (cross @ p.T).reshape(c_in, k2, c_mid, mult)  # Σ p (W y)ᵀ, per (input channel, tap)
            d3 = d.reshape(c_mid, mult, k2)
            rhs = torch.einsum("cjt,itcj->ci", d3, cp).reshape(-1)

            def matvec(v: torch.Tensor) -> torch.Tensor:
                a = (d3[:, :, None, :] * v.reshape(c_mid, 1, c_in, 1)).reshape(c_dw, dp)  # (c,j) × (i,t)
                b = pp @ (a @ g)
                return torch.einsum("cjt,cjit->ci", d3, b.reshape(c_mid, mult, c_in, k2)).reshape(-1)

            pp_blocks = torch.diagonal(pp.reshape(c_mid, mult, c_mid, mult), dim1=0, dim2=2).permute(2, 0, 1)
            diag = torch.einsum("cjJ,cjt,itT,cJT->ci", pp_blocks, d3, gp_blocks, d3).reshape(-1)
            return conjugate_gradient(matvec, diag, rhs, t0.reshape(-1), ridge, start=t.reshape(-1)).reshape(c_mid, c_in)

        before = error(d0, w0)
        best = (before, d0, w0, t0)
        joint = c_dw * k2 <= DEPTHWISE_MAX_UNKNOWNS
        d, t = d0, t0
        w, err = pointwise_step(d)
        if err < best[0]:
            best = (err, d, w, t)
        for _ in range(self.iterations if joint else 0):
            d = depthwise_step(w, d)
            if t is not None and REFIT_REDUCE:
                t = reduce_step(w, d, t)
                project(t)
            w, err = pointwise_step(d)
            if not math.isfinite(err) or not torch.isfinite(d).all() or not torch.isfinite(w).all() \
                    or (t is not None and not torch.isfinite(t).all()):
                break
            if err < best[0]:
                best = (err, d, w, t)
        after, d, w, t = best
        info.error_before = math.sqrt(before / self.yy)
        if not after < before:
            info.error_after = info.error_before
            info.reason = "the refit did not lower the error; weights kept"
            return info
        info.error_after = math.sqrt(after / self.yy)
        with torch.no_grad():
            dw.weight.copy_(d.reshape(dw.weight.shape).to(dw.weight.dtype))
            if t is not None:
                self.red.weight.copy_(t.reshape(self.red.weight.shape).to(self.red.weight.dtype))
        write_back(pw, w, self.has_bias)
        info.refit = True
        return info
