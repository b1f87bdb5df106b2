"""How tests/golden/saved_before_layout/ was written, by fxsurgeon before the package moved into folders (issue 19).

``model.pt`` is ``torch.save`` of a converted CIFAR ResNet-20 (a pickle naming fxsurgeon's module classes by their
import paths then, e.g. ``fxsurgeon.forms_dense.TuckerConv2d``), ``model.safetensors`` is ``fxsurgeon.save`` of
the same model, ``io.pt`` an input batch and the outputs. tests/test_moved.py loads them with the
current package. Kept for the record; rerunning it with a newer fxsurgeon writes files of the newer layout.
"""

import torch

import fxsurgeon
from fxsurgeon.models import resnet20


def main() -> None:
    out = "tests/golden/saved_before_layout"
    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    layers = {"layer1.0.conv1": {"form": "tucker2", "rank": 4}, "layer1.0.conv2": {"form": "spatial-svd", "rank": 4},
              "layer1.1.conv1": {"form": "pw-dw-pw", "rank": 6}, "layer1.1.conv2": {"form": "dw-pw", "rank": 3}}
    gm = fxsurgeon.convert(model, example_inputs=x, conv_head=True, verify=False,
                           separable=dict(layers=layers, exclude=["layer2*", "layer3*", "conv1"]))
    torch.save(gm, f"{out}/model.pt")
    fxsurgeon.save(gm, f"{out}/model.safetensors", source="fxsurgeon.models:resnet20")
    torch.save({"x": x, "y": gm(x)}, f"{out}/io.pt")


# only when run as a script: pytest (--doctest-modules) imports every file under tests/, and importing this must
# not overwrite the fixtures it wrote with files of the current layout
if __name__ == "__main__":
    main()
