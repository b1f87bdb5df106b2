"""Small reference models used by recipes, benchmarks and tests."""

from .cifar_resnet import (
    CifarResNet,
    default_data_dir,
    load_cifar10_test,
    load_resnet20,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)

__all__ = ["CifarResNet", "default_data_dir", "load_cifar10_test", "load_resnet20", "resnet20", "resnet32", "resnet44", "resnet56"]
