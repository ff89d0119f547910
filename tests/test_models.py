import pytest
import torch

from pix2rep.config import preset_config
from pix2rep.losses import segmentation_loss
from pix2rep.models import (ModelConfig, ProjectionHead, SegmentationModel, UNet, count_parameters,
                            stack_segmentation_models, unstack_segmentation_model)


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


SMALL = ModelConfig(widths=(8, 16, 32), out_channels=8)


def three_models() -> list[SegmentationModel]:
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(SegmentationModel(UNet(SMALL), 4))
    return models


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_stacked_models_compute_each_model_on_its_own_channel(channels_last, training):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [m.train(training).to(memory_format=fmt) for m in three_models()]
    stacked = stack_segmentation_models(models, SMALL).train(training).to(memory_format=fmt)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=fmt)
    with torch.no_grad():
        together = stacked(x).reshape(2, 3, 4, 32, 32)
        alone = torch.stack([m(x[:, g : g + 1]) for g, m in enumerate(models)], dim=1)
    assert together.shape == alone.shape
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=0)  # the same sums, grouped
    # In training mode each model's BatchNorm statistics are its own batch's.
    torch.testing.assert_close(stacked.backbone.encoders[0][1].running_mean,
                               torch.cat([m.backbone.encoders[0][1].running_mean for m in models]))


def test_unstacking_gives_back_the_stacked_models_exactly():
    models = three_models()
    for original, back in zip(models, unstack_segmentation_model(stack_segmentation_models(models, SMALL), SMALL)):
        assert original.state_dict().keys() == back.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), back.state_dict().values()))


def test_the_summed_loss_gives_each_stacked_model_the_gradient_of_its_own_loss():
    from pix2rep.training.downstream import _SumOverCells

    models = three_models()
    stacked = stack_segmentation_models(models, SMALL)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 4, (4, 3, 32, 32))
    loss_fn = segmentation_loss("dice-ce")
    _SumOverCells(loss_fn, 3)(stacked(x), y).backward()
    for g, model in enumerate(models):
        loss_fn(model(x[:, g : g + 1]), y[:, g : g + 1]).backward()
        scale = max(float(p.grad.abs().max()) for p in model.parameters())
        for name, p in model.named_parameters():
            mine = dict(stacked.named_parameters())[name].grad.chunk(3)[g]
            # rounding only: about 1e-8 against gradients of 1e-3..1e-1 (measured)
            assert float((mine - p.grad).abs().max()) <= 1e-5 * scale, name
