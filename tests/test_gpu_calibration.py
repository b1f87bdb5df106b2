"""CUDA: the CP form, MAC budgets, calibration (block targets, three-factor refit), synthetic images and
sensitivity weighting on a model that lives on the GPU — and the same answers as on the CPU.

Every test carries the ``gpu`` marker and is skipped without CUDA (tests/conftest.py); ``benchmarks/gpu_check.sh``
runs them. The CPU twins are in test_forms_cp.py, test_calibrate.py and test_synthetic.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxsurgeon
from fxsurgeon.bench import ieee_fp32
from fxsurgeon.calibrate import calibrate, output_sensitivity
from fxsurgeon.synthetic import synthesize
from test_calibrate import _residual_net, rel_err

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def _calib(seed: int, batches: int = 3, n: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(batches)]


def _all_on(model: nn.Module, kind: str) -> bool:
    return all(t.device.type == kind for t in (*model.parameters(), *model.buffers()))


def _layers(model: nn.Module) -> dict[str, tuple]:
    rec = fxsurgeon.get_record(model)
    return {r.target: (r.details.get("form"), r.details.get("rank")) for r in rec.rewrites
            if r.pass_name == "separable"}


def test_budget_across_forms_on_cuda_matches_the_cpu():
    net = _residual_net()
    x = torch.randn(2, 3, 16, 16)
    opts = dict(form="auto", target_macs=0.6, weighting="bn")
    on_cpu = fxsurgeon.convert(net, separable=opts, conv_head=False, example_inputs=x)
    on_gpu = fxsurgeon.convert(copy.deepcopy(net).to(CUDA), separable=opts, conv_head=False, example_inputs=x)
    assert _all_on(on_gpu, "cuda")
    assert _layers(on_gpu) == _layers(on_cpu)  # the same forms and ranks chosen
    assert "pw-dw-pw" in {f for f, _ in _layers(on_gpu).values()}
    with torch.no_grad(), ieee_fp32():
        assert rel_err(on_gpu(x.to(CUDA)).cpu(), on_cpu(x)) < 1e-4


def test_calibration_on_cuda_matches_the_cpu():
    net = _residual_net()
    calib = _calib(1)
    small = fxsurgeon.convert(net, separable=dict(form="pw-dw-pw", multiplier=1), conv_head=False)
    m_cpu, m_gpu = copy.deepcopy(small), copy.deepcopy(small).to(CUDA)
    with ieee_fp32():
        rep_cpu = calibrate(m_cpu, net, calib, bn=False)
        # CPU batches for a CUDA model: calibrate moves them to the model's device
        rep_gpu = calibrate(m_gpu, copy.deepcopy(net).to(CUDA), calib, bn=False)
    assert _all_on(m_gpu, "cuda")
    cpu_layers = {r.layer: r for r in rep_cpu.layers}
    gpu_layers = {r.layer: r for r in rep_gpu.layers}
    assert cpu_layers.keys() == gpu_layers.keys()
    assert {r.target_kind for r in rep_gpu.layers} == {"layer", "block"}  # residual-aware targets ran
    for name, r in gpu_layers.items():
        assert r.error_after == pytest.approx(cpu_layers[name].error_after, rel=1e-3, abs=1e-6), name
    assert rep_gpu.output_error_after < 0.9 * rep_gpu.output_error_before
    x = torch.cat(calib)
    with torch.no_grad(), ieee_fp32():
        assert rel_err(m_gpu(x.to(CUDA)).cpu(), m_cpu(x)) < 1e-3


def test_convert_with_calibration_and_sensitivity_budget_on_cuda():
    net = _residual_net()
    calib = _calib(2)
    x = calib[0][:2]
    opts = dict(form="auto", target_macs=0.5, weighting="bn", allocation="sensitivity")
    gm = fxsurgeon.convert(copy.deepcopy(net).to(CUDA), separable=opts, conv_head=False, example_inputs=x,
                           calibration=calib)
    assert _all_on(gm, "cuda")
    rec = fxsurgeon.get_record(gm)
    cal = rec.extras["calibration"]
    assert cal["output_error_after"] < cal["output_error_before"]
    names = list(_layers(gm))
    with ieee_fp32():
        s_cpu = output_sensitivity(net, names, calib, samples=32)
        s_gpu = output_sensitivity(copy.deepcopy(net).to(CUDA), names, calib, samples=32)
    for name in names:  # the same seeded noise on either device
        assert s_gpu[name] == pytest.approx(s_cpu[name], rel=1e-3), name


def test_synthetic_calibration_on_cuda():
    net = _residual_net().to(CUDA)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = synthesize(net, (3, 16, 16), count=32, steps=30, batch_size=16)
    assert data.images.shape == (32, 3, 16, 16) and torch.isfinite(data.images).all()
    assert data.loss_end < data.loss_start
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    gm = fxsurgeon.convert(net, separable=dict(form="auto", target_macs=0.6), conv_head=False,
                           example_inputs=torch.randn(2, 3, 16, 16), calibration="synthetic")
    assert _all_on(gm, "cuda")
    cal = fxsurgeon.get_record(gm).extras["calibration"]
    assert cal["output_error_after"] < cal["output_error_before"]
