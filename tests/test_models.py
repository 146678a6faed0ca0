"""Every registered model builds, runs forward and backward, and trains every parameter."""
from __future__ import annotations

import pytest
import torch

from cxrray.models import REGISTRY, PretrainedWeightsUnavailable, build_model, gradcam_layer_path
from cxrray.transforms import Preprocess


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("channels", [3, 1])
def test_model_forward_backward_reaches_every_parameter(name, channels):
    torch.manual_seed(0)
    size = 299 if name == "inception_v3" else 64  # Inception's aux head needs its native 299 px
    model = build_model(name, 5, Preprocess(size=size, channels=channels))
    x = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8)
    model.train()
    out = model(x)
    if name == "inception_v3":
        assert isinstance(out, tuple), "Inception must return aux logits in training mode"
        loss = out[0].sum() + 0.4 * out[1].sum()
        out = out[0]
    else:
        loss = out.sum()
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, f"no gradient for {missing[:5]}"
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    # The Grad-CAM layer named in artifacts exists in the wrapper.
    assert model.get_submodule(gradcam_layer_path(name)) is not None


def test_freeze_backbone_trains_only_the_head():
    model = build_model("resnet50", 3, Preprocess(size=64), freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["backbone.fc.weight", "backbone.fc.bias"]


def test_grey_first_conv_matches_replicated_input():
    """Adapting the first conv to one channel must give the same output as replicating grey."""
    torch.manual_seed(0)
    rgb = build_model("resnet50", 2, Preprocess(size=64, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)).eval()
    grey = build_model("resnet50", 2, Preprocess(size=64, channels=1, mean=(0.5,), std=(0.25,))).eval()
    state = {k: v for k, v in rgb.state_dict().items()}
    state["backbone.conv1.weight"] = state["backbone.conv1.weight"].sum(1, keepdim=True)
    grey.load_state_dict(state)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rgb(x), grey(x), atol=1e-4)


def test_imagenet_weights_refused_clearly_when_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="never downloads"):
        build_model("densenet121", 3, Preprocess(size=64), pretrained="imagenet")


def test_pretrained_from_local_file_loads_all_but_head(tmp_path):
    src = build_model("resnet50", 1000, Preprocess(size=64)).backbone
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = build_model("resnet50", 4, Preprocess(size=64), pretrained=str(tmp_path / "w.pth"))
    assert torch.equal(model.backbone.conv1.weight, src.conv1.weight)
    assert model.backbone.fc.out_features == 4


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="densenet121"):
        build_model("alexnet", 2, Preprocess())
