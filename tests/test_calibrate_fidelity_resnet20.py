"""The shared trained ResNet-20: our definition loads its weights strictly and reproduces its accuracy."""

import pytest
import torch

from fxsurgeon.models import default_data_dir, load_cifar10_test, load_resnet20, resnet20

DATA = default_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "resnet20-12fca82f.th").exists() or not (DATA / "cifar10_test_jpeg.npz").exists(),
    reason=f"shared data not found at {DATA} (set FXSURGEON_DATA)",
)


@needs_data
def test_definition_loads_the_trained_weights_strictly():
    ckpt = torch.load(DATA / "resnet20-12fca82f.th", map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = resnet20()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 269_722


@needs_data
@pytest.mark.slow
def test_reproduces_81_06_percent_on_the_evaluation_half():
    model = load_resnet20()
    x, y = load_cifar10_test(split="eval")
    assert x.shape == (5000, 3, 32, 32)
    assert torch.bincount(y).tolist() == [500] * 10
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            correct += int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
    assert correct == 4053  # 81.06 %


@needs_data
def test_calibration_and_evaluation_halves_do_not_overlap():
    xc, yc = load_cifar10_test(split="calib")
    xe, ye = load_cifar10_test(split="eval")
    xa, ya = load_cifar10_test(split="all")
    torch.testing.assert_close(xa[0::2], xc)
    torch.testing.assert_close(xa[1::2], xe)
    assert torch.equal(ya[0::2], yc) and torch.equal(ya[1::2], ye)


@pytest.mark.skipif(not (DATA / "resnet32-d509ac18.th").exists(), reason=f"ResNet-32 weights not found at {DATA}")
def test_resnet32_definition_loads_the_trained_weights_strictly():
    from fxsurgeon.models import resnet32

    ckpt = torch.load(DATA / "resnet32-d509ac18.th", map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = resnet32()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 464_154
