"""Network in Network (ImageNet): mlpconv blocks, ceil-mode max pools, dropout, and global
average pooling of per-class maps; with batch_norm=True, a BatchNorm after every conv."""
import pytest
import torch

from cnnfuse.models.architectures import nin

from .seed_harness import check_seed, count_params

# (kernel, cin, cout) of the twelve convs of the Caffe model-zoo ImageNet NIN.
_CONVS = [(11, 3, 96), (1, 96, 96), (1, 96, 96), (5, 96, 256), (1, 256, 256), (1, 256, 256),
          (3, 256, 384), (1, 384, 384), (1, 384, 384), (3, 384, 1024), (1, 1024, 1024),
          (1, 1024, 1000)]


def test_layout():
    """7.6M parameters (the layer list above, counted independently of the model code);
    224 -> 54 -> 27 -> 13 -> 6 maps as in the Caffe model; one score per class."""
    model = nin().eval()
    assert count_params(model) == sum(k * k * i * o + o for k, i, o in _CONVS) == 7_595_176
    x = torch.randn(1, 3, 224, 224)
    sizes = []
    with torch.no_grad():
        for layer in model.features:
            x = layer(x)
            if isinstance(layer, torch.nn.MaxPool2d) or layer is model.features[-1]:
                sizes.append(x.shape[-1])
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
    assert sizes == [27, 13, 6, 6]
    assert nin(num_classes=10)(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="num_classes"):
        nin(num_classes=0)


def test_fuse():
    result = check_seed(nin(num_classes=100), sizes=(64, 75), batch=2)
    assert result.report.fused["activation relu"] == 12
    assert result.batchnorms == 0
    report = result.report
    assert report.coverage == 1.0 and report.activations_absorbed == report.activation_sites


def test_fuse_batch_norm():
    """BatchNorm after every conv, all folded; the model fused without a layout change
    (memory_format=None) and fed NCHW."""
    result = check_seed(nin(num_classes=100, batch_norm=True), sizes=(64, 67),
                        memory_format=None)
    assert result.folded == result.batchnorms == 12
    assert result.report.fused["activation relu"] == 12
