import pytest
import torch

from pix2rep.config import preset_config
from pix2rep.models import ProjectionHead, SegmentationModel, UNet, count_parameters


def test_paper_preset_is_the_papers_unet():
    cfg = preset_config("paper")
    net = UNet(cfg.model)
    # 6 levels, widths 64..2048, last decoder block outputs D = 1024: 134,897,024 parameters.
    assert count_parameters(net) == 134_897_024
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 32, 32))
    assert out.shape == (1, 1024, 32, 32)


@pytest.mark.parametrize("preset,d", [("cpu", 64), ("tiny", 16)])
def test_output_is_full_resolution_d_channels(preset, d):
    cfg = preset_config(preset)
    net = UNet(cfg.model).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 64, 48)).shape == (2, d, 64, 48)
        assert SegmentationModel(net, 4)(torch.rand(2, 1, 64, 64)).shape == (2, 4, 64, 64)


def test_input_size_must_be_divisible():
    net = UNet(preset_config("cpu").model)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 40, 40))


def test_projection_head_maps_vectors():
    head = ProjectionHead(64, 256, 256)
    assert head(torch.rand(10, 64)).shape == (10, 256)
    # D*256 + 256 (linear) + 2*256 (BN) + 256*256 + 256 (linear)
    assert count_parameters(head) == 64 * 256 + 256 + 512 + 256 * 256 + 256
