"""Every backbone through one seam: features, preprocessing, trainable blocks, predict, old files.

Parametrised over torchvision families and one timm ViT, all random-init at small inputs (no
network): what is checked is the plumbing, which does not depend on trained weights.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from conftest import rand_frames, write_frames

from pipeline.backbones import FrozenBackbone, create_backbone, default_frame_spec
from pipeline.cache import FeatureCache, SplitData, read_provenance
from pipeline.config import DatasetSpec, ExtractConfig, FrameOverrides, FrameSpec, TemporalConfig
from pipeline.data import decode_image_file, list_frames
from pipeline.demo import write_video
from pipeline.errors import CacheError, ConfigError, WeightsError
from pipeline.extract import extract_features
from pipeline.finetune import EndToEnd
from pipeline.heads import HeadConfig, build_head
from pipeline.predict import Predictor
from pipeline.preprocess import normalize_frames, resize_frames
from pipeline.train import evaluate_checkpoint, train_temporal

TORCHVISION = ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "efficientnet_b0", "regnet_y_400mf"]
TIMM_VIT = "timm:vit_tiny_patch16_224"
BACKBONES = [*TORCHVISION, TIMM_VIT]
S = 32  # input size: every one of these runs at 32x32 (the ViT is built for it: 2x2 patches)


def _image(h: int = 240, w: int = 320, seed: int = 0) -> torch.Tensor:
    """A smooth (3, H, W) uint8 image in (H, W, 3) memory, as the decoders give it."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 16, w // 16, generator=g) * 255
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    return img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().permute(2, 0, 1)


def _edges(h: int = 240, w: int = 320) -> torch.Tensor:
    """A hard-edged (3, H, W) uint8 image in (H, W, 3) memory: a 7-pixel checkerboard, its negative,
    and noise, where a resize filter over- and undershoots most."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = ((yy // 7 + xx // 7) % 2 * 255).to(torch.uint8)
    noise = torch.randint(0, 256, (h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.stack([board, 255 - board, noise]).permute(1, 2, 0).contiguous().permute(2, 0, 1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two classes, frame folders and a video file, in train and test."""
    root = tmp_path_factory.mktemp("bb") / "ds"
    rng = np.random.default_rng(3)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            for k in range(n):
                if k == 1:
                    (root / split / c).mkdir(parents=True, exist_ok=True)
                    write_video(root / split / c / f"{c}{k}.mkv", rand_frames(rng, 9, 48, 64), fps=10)
                else:
                    write_frames(root / split / c / f"{c}{k}", rand_frames(rng, 7, 48, 64), ".png")
    return root


# ------------------------------------------------------------------------ the seam itself


def _first_calls(net: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Module name → the rank of its first call in one forward of ``x`` (a module enters before its children)."""
    calls: dict[str, int] = {}

    def hook(name: str):
        def enter(_module, _args) -> None:
            calls.setdefault(name, len(calls))
        return enter

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in net.named_modules()]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("name", BACKBONES)
def test_blocks_partition_the_parameters_and_frozen_matches_net(name):
    bb = create_backbone(name, "none", input_size=S)
    names = [n for n, _ in bb.net.named_parameters()]
    flat = [p for b in bb.blocks for p in b.params]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))  # every parameter in exactly one block
    assert len(bb.blocks) >= 4
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        assert bb.net.eval()(x).shape == (2, bb.num_features)
    # The blocks run in their order: --trainable-blocks n must train the n nearest the output.
    first_call = _first_calls(bb.net, x)
    owner = {f"{m}.{p}".lstrip("."): m for m, mod in bb.net.named_modules()
             for p, _ in mod.named_parameters(recurse=False)}  # parameter → the module that holds it
    calls = [[first_call[owner[p]] for p in b.params] for b in bb.blocks]
    spans = [(min(c), max(c)) for c in calls]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    spec = FrameSpec(size=S, mean=bb.frame_spec.mean, std=bb.frame_spec.std)
    frames = torch.randint(0, 256, (3, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    frames[:, :, :3] = 255  # saturated borders: a wrong fold at the zero padding would show
    frozen = FrozenBackbone(bb.net, spec)
    with torch.inference_mode():
        ref = bb.net(normalize_frames(frames, spec))
        got = frozen(frames.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert frozen.scale is None  # the input scale went into the first conv
    assert bb.has_batchnorm == (name != TIMM_VIT)


def test_a_size_a_patchifying_stem_does_not_divide_is_refused(videos, tmp_path):
    """A ViT with 16-pixel patches at --size 40 ran, and never saw the last 8 rows and columns of
    any frame: it is refused before any work, with the sizes that fit."""
    from pipeline.backbones import check_input_size

    with pytest.raises(ConfigError, match=r"timm:vit_tiny_patch16_224 would never see the last 8 rows and columns "
                                          r"of 40x40 frames: its first layer \(16x16, stride 16\) covers 32; use "
                                          r"--size 32 or 48"):
        check_input_size(create_backbone(TIMM_VIT, "none", input_size=40), 40)
    check_input_size(create_backbone(TIMM_VIT, "none", input_size=48), 48)
    check_input_size(create_backbone("resnet18", "none"), 41)  # an overlapping stem reads every pixel it can
    with pytest.raises(ConfigError, match=r"vit_b_16 would never see the last 12 rows and columns of 60x60 frames"):
        create_backbone("vit_b_16", "none", input_size=60)  # torchvision's constructor asserted, a traceback
    # ... but not at the size an architecture was made for: SigLIP-so400m takes 384 in 14-pixel patches
    import dataclasses

    import timm

    bb = create_backbone(TIMM_VIT, "none", input_size=48)
    siglip = dataclasses.replace(bb, name="timm:vit_so400m_patch14_siglip_384",
                                 net=timm.create_model("vit_tiny_patch16_224", patch_size=14, img_size=384,
                                                       num_classes=0).eval())  # its stem, at a test's width
    check_input_size(siglip, 384)
    with pytest.raises(ConfigError, match=r"never see the last 4 rows and columns of 200x200 frames.*196 or 210"):
        check_input_size(siglip, 200)
    with pytest.raises(ConfigError, match="would never see the last 8 rows"):
        extract_features(ExtractConfig(dataset=DatasetSpec(root=str(videos)), output=str(tmp_path / "v.h5"),
                                       backbone=TIMM_VIT, weights="none", frame_overrides=FrameOverrides(size=40)),
                         progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", BACKBONES)
def test_a_frames_features_do_not_depend_on_its_place_in_a_full_batch(name):
    """What lets a resumed extraction equal an uninterrupted one bit for bit: on CPU, at the
    extraction batch (64; the last batch is padded to it), a frame's features do not depend on
    where in the batch it sits or on the frames beside it. (At batches of 3-8, EfficientNet's and
    RegNet's squeeze-excitation kernels do, at float rounding: 1e-7 relative.)"""
    torch.manual_seed(0)
    bb = create_backbone(name, "none", input_size=S)
    for m in bb.net.modules():  # BatchNorm statistics as calibrated ones would be: no exact zeros
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBackbone(bb.net, FrameSpec(size=S, mean=bb.frame_spec.mean, std=bb.frame_spec.std))
    frames = torch.randint(0, 256, (64, S, S, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    frames = frames.permute(0, 3, 1, 2)  # channels_last, as batches are packed
    with torch.inference_mode():
        ref = frozen(frames)
        for shift in (1, 33):
            perm = torch.roll(torch.arange(64), shift)
            assert torch.equal(frozen(frames[perm]), ref[perm]), shift
        padded = frames.clone()
        padded[10:] = 0  # a last batch: 10 frames, then padding
        assert torch.equal(frozen(padded)[:10], ref[:10])


@pytest.mark.parametrize(("name", "tag"), [(n, None) for n in TORCHVISION] + [
    ("mobilenet_v2", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V1")])  # older tags: 256 -> 224, not 232
def test_default_frame_spec_equals_torchvision_weights_transforms(name, tag):
    import torchvision
    import torchvision.transforms.v2 as T2

    weights = torchvision.models.get_model_weights(name)
    w = weights[tag] if tag else weights.DEFAULT
    spec = default_frame_spec(name, tag or "imagenet")
    if tag is None:
        assert spec == default_frame_spec(name) == create_backbone(name, "none").frame_spec
    want = w.transforms()(_image())  # (3, crop, crop) float, normalised
    got = normalize_frames(resize_frames(_image(), spec)[None], spec)[0]
    assert got.shape == want.shape
    # Stated tolerance: one uint8 level. ImageClassification resizes with torchvision's v1 functional,
    # which rounds the uint8 result differently from the v2 kernel used here (same filter, same
    # crop); about a fifth of the values differ by exactly one level, none by more.
    levels = (got - want).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255
    assert levels.max() <= 1 + 1e-3 and levels.mean() < 0.35, (float(levels.max()), float(levels.mean()))
    # Hard edges: the resize is torchvision's v2 Resize + CenterCrop bit for bit. v1 resizes in
    # float; v2's uint8 bicubic clips the filter's overshoot between its two passes, so there
    # (EfficientNet, Swin, SWAG weights) the stated tolerance is looser: measured 20 levels at most
    # and 0.24 on average on this checkerboard; on a photo 3-7 levels on 0.06 % of the pixels at most.
    edges = _edges()
    v2 = T2.Compose([T2.Resize(spec.resize_size, interpolation=T2.InterpolationMode(spec.interpolation),
                               antialias=True), T2.CenterCrop(spec.size)])
    assert torch.equal(resize_frames(edges, spec), v2(edges))
    levels = (normalize_frames(resize_frames(edges, spec)[None], spec)[0] - w.transforms()(edges)).abs()
    levels *= torch.tensor(spec.std).view(3, 1, 1) * 255
    if spec.interpolation == "bicubic":
        assert levels.max() <= 24 and levels.mean() < 0.5, (float(levels.max()), float(levels.mean()))
    else:
        assert levels.max() <= 1 + 1e-3 and levels.mean() < 0.35, (float(levels.max()), float(levels.mean()))


@pytest.mark.parametrize("name", [TIMM_VIT, "timm:resnet18"])  # CLIP-style 0.5 mean/std; ImageNet's, crop 0.95
def test_default_frame_spec_equals_timm_eval_transform(name):
    """timm resizes PIL images; ours resizes uint8 tensors with the same antialiased filter. Stated
    tolerance: mean |diff| under 0.5/255 and max under 3/255 of the pixel range."""
    import timm
    from PIL import Image

    model = timm.create_model(name.split(":")[1], pretrained=False, num_classes=0)
    cfg = timm.data.resolve_model_data_config(model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    spec = default_frame_spec(name)
    assert (spec.size, spec.interpolation, spec.mean, spec.std) == (
        cfg["input_size"][-1], cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]))
    img = _image()
    want = tf(Image.fromarray(img.permute(1, 2, 0).numpy()))
    got = normalize_frames(resize_frames(img, spec)[None], spec)[0]
    assert got.shape == want.shape
    diff = (got - want).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255  # back to pixel levels
    assert diff.mean() < 0.5 and diff.max() <= 3.0, (float(diff.mean()), float(diff.max()))


@pytest.mark.parametrize(("name", "tag"), [("timm:dm_nfnet_f0", "dm_in1k"),  # squash: both sides 213, crop 192
                                         ("timm:deepseek_vit_412m", "deepseek_v4_1_flash")])  # border: letterbox
def test_timm_squash_and_border_eval_transforms_are_reproduced(name, tag):
    """timm's other crop modes, from the pretrained config alone (no model built): the same
    stated tolerance as above, and the letterbox's padding is the mean colour exactly."""
    import timm
    from PIL import Image

    cfg = timm.models.get_pretrained_cfg(f"{name.split(':')[1]}.{tag}").to_dict()
    data = timm.data.resolve_data_config(pretrained_cfg=cfg)
    tf = timm.data.create_transform(**data, is_training=False)
    spec = default_frame_spec(name, tag)
    assert spec.resize == cfg["crop_mode"] and spec.size == data["input_size"][-1]
    img = _image()
    want = tf(Image.fromarray(img.permute(1, 2, 0).numpy()))
    frames = resize_frames(img, spec)
    got = normalize_frames(frames[None], spec)[0]
    assert got.shape == want.shape
    diff = (got - want).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255
    assert diff.mean() < 0.5 and diff.max() <= 3.0, (float(diff.mean()), float(diff.max()))
    if spec.resize == "border":  # 320x240: the long side fills the width, rows are padded above and below
        pad = (spec.size - round(240 * spec.resize_size / 320)) // 2
        assert pad > 0 and (frames[:, :pad] == torch.tensor([round(255 * m) for m in spec.mean]).view(3, 1, 1)).all()


def test_frame_overrides_keep_the_crop_ratio():
    spec = default_frame_spec("mobilenet_v2")  # 232 -> 224
    assert spec.override(FrameOverrides(size=112)).resize_size == 116
    assert spec.override(FrameOverrides(size=112, resize_size=140)).resize_size == 140
    assert spec.override(FrameOverrides(interpolation="bicubic")).interpolation == "bicubic"
    assert spec.override(FrameOverrides()) == spec
    with pytest.raises(ConfigError, match="--resize-size 16 is smaller than the crop, --size 32"):
        spec.override(FrameOverrides(size=32, resize_size=16))
    with pytest.raises(ConfigError, match="--resize-size 40 is smaller than the crop, --size 224"):
        spec.override(FrameOverrides(resize_size=40))
    # squash and border take the whole frame unless --resize-size asks for a margin to crop
    assert spec.override(FrameOverrides(resize="squash")).resize_size == 224
    assert spec.override(FrameOverrides(resize="border", size=112)).resize_size == 112
    assert spec.override(FrameOverrides(resize="squash", resize_size=240)).resize_size == 240
    squashed = FrameSpec(size=192, resize="squash", resize_size=213)  # NFNet weights' own default: their ratio
    assert squashed.override(FrameOverrides(size=96)).resize_size == 106
    assert squashed.override(FrameOverrides(resize="crop", resize_size=240)).resize_size == 240
    old = FrameSpec.from_dict({"size": 224, "resize": "crop", "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225]})  # schema 1
    assert old.resize_size == 224 and old.interpolation == "bilinear" and old != spec


@pytest.mark.parametrize("name", BACKBONES)
def test_one_trainable_block_changes_exactly_that_block(name):
    torch.manual_seed(0)
    bb = create_backbone(name, "none", input_size=S)
    spec = FrameSpec(size=S, mean=bb.frame_spec.mean, std=bb.frame_spec.std)
    head = build_head(HeadConfig(num_classes=2, input_dim=bb.num_features, hidden=8, dropout=0))
    model = EndToEnd(bb, head, spec, trainable_blocks=1).train()
    assert {n for n, p in bb.net.named_parameters() if p.requires_grad} == set(bb.blocks[-1].params)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    clips = torch.randint(0, 256, (2, 3, 3, S, S), dtype=torch.uint8)
    torch.nn.functional.cross_entropy(model(clips, torch.tensor([3, 2])), torch.tensor([0, 1])).backward()
    opt.step()
    after = model.backbone.state_dict()
    last = set(bb.blocks[-1].params) | {k for k in after if any(k.startswith(m + ".") for m in bb.blocks[-1].modules)}
    changed = {k for k in after if not torch.equal(before[k], after[k]) and not k.endswith("num_batches_tracked")}
    assert changed <= last, sorted(changed - last)[:5]  # nothing outside it moved: weights, BN statistics
    # and all of it trains (a BatchNorm scale near 1 may move less than a float32 step: its gradient is checked)
    assert changed & set(bb.blocks[-1].params), "no parameter of the last block moved"
    still = [n for n, p in bb.net.named_parameters()
             if n in bb.blocks[-1].params and (p.grad is None or not p.grad.any())]
    assert not still, still[:5]


@pytest.mark.parametrize(("name", "last"), [
    ("timm:pit_ti_224", None),  # no group matcher: loose tokens used to join the last group
    ("timm:cait_xxs24_224", {"blocks.22", "blocks.23", "blocks_token_only.0", "blocks_token_only.1", "norm"})])
def test_timm_trainable_blocks_are_a_suffix_of_the_network_as_it_runs(name, last):
    """--trainable-blocks 1 trains the end of the network only. PiT's position embedding and class
    token (input side) trained with its last group, so the backward pass ran through the whole
    frozen network; CaiT's matcher puts its class-attention blocks, which run after every
    self-attention block, with its last two, so its class-attention block 0 stayed frozen after a
    trainable block. Working out the order runs the network once, in eval mode, whatever its mode."""
    bb = create_backbone(name, "none", input_size=32)
    bb.net.train()
    bb.set_trainable(1)
    trainable = {n for n, p in bb.net.named_parameters() if p.requires_grad}
    assert bb.net.training and all(m.training for m in bb.net.modules())
    assert not trainable & {"pos_embed", "cls_token"}, sorted(trainable)[:5]
    if last is not None:
        assert {".".join(n.split(".")[:2]) if n.startswith("blocks") else n.split(".")[0] for n in trainable} == last
    # the gradient need not cross a frozen module: what trains runs after everything that does not
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: order.append(name) and None)
             for n, m in bb.net.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    with torch.no_grad():
        bb.net.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    trains = [any(p.requires_grad for p in bb.net.get_submodule(n).parameters(recurse=False)) for n in order]
    assert trains == sorted(trains), [n for n, t in zip(order, trains) if t][:3]


def test_batchnorm_recalibration_runs_only_the_batchnorms_in_training_mode():
    """Stochastic depth and dropout stay off while the statistics are estimated: they are the
    extracting network's, whatever the RNG (EfficientNet's used to differ by seed, ~30 % in the
    features)."""
    from pipeline.backbones import recalibrate_batchnorm

    batches = [normalize_frames(torch.randint(0, 256, (8, 3, S, S), dtype=torch.uint8,
                                              generator=torch.Generator().manual_seed(i)), FrameSpec(size=S))
               for i in range(2)]
    nets = []
    for seed in (1, 2):
        torch.manual_seed(0)
        net = create_backbone("efficientnet_b0", "none").net
        torch.manual_seed(seed)
        recalibrate_batchnorm(net, batches)
        nets.append(net)
    a, b = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a) and not nets[0].training


def test_trainable_blocks_out_of_range_names_the_count():
    bb = create_backbone("resnet18", "none")
    with pytest.raises(ConfigError, match="between 0 and 5 for resnet18"):
        bb.set_trainable(6)


# ------------------------------------------------------------- extraction, training, predict


@pytest.mark.parametrize("name", BACKBONES)
def test_cached_features_equal_backbone_and_predict_from_checkpoint(name, videos, tmp_path):
    out = tmp_path / "f.h5"
    # Not the backbone's own resize ratio, so predict must take the FrameSpec from the checkpoint;
    # features stored as float16 (the default), so predict must round its features as the cache did.
    frames_as = FrameOverrides(size=S, resize_size=S + 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = extract_features(ExtractConfig(dataset=DatasetSpec(str(videos)), output=str(out), backbone=name,
                                           weights="none", frame_overrides=frames_as, batch_size=8, workers=0,
                                           calibration_frames=16), progress=False)
    assert r.backbone == name and r.frame_spec == default_frame_spec(name).override(frames_as)
    with FeatureCache(out) as c:
        prov = c.provenance
        data = c.load_split("train")
    assert prov.backbone == name and prov.feature_dim == data.features.shape[1] and prov.dtype == "float16"
    assert prov.frame_spec == r.frame_spec  # the backbone's own mean, std and filter; the sizes asked for
    if prov.weights.path:  # the recalibrated backbone's file gives the FrameSpec it was made with
        assert default_frame_spec(name, prov.weights.path) == prov.frame_spec != default_frame_spec(name)
    # the same network, rebuilt from what the cache records, on the same decoded frames
    bb = create_backbone(name, prov.weights.path or "none", input_size=S) if prov.weights.path else None
    if bb is None:  # no BatchNorm: nothing was calibrated, the random init is the seed's
        torch.manual_seed(0)
        bb = create_backbone(name, "none", input_size=S)
    frames = [decode_image_file(p) for p in list_frames(videos / data.videos[0])]
    with torch.inference_mode():
        ref = torch.cat([bb.net.eval()(normalize_frames(resize_frames(f, prov.frame_spec)[None], prov.frame_spec))
                         for f in frames]).numpy()
    got = data.video(0)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())

    train_temporal(TemporalConfig(cache=str(out), out=str(tmp_path / "run"), hidden=8, epochs=1, seq_len=4,
                                  device="cpu"), progress=False)
    ckpt = tmp_path / "run" / "best.pt"
    ev = evaluate_checkpoint(ckpt, out, "test", device="cpu")
    preds = Predictor(ckpt, device="cpu", batch_size=8, workers=0).predict(
        [videos / v for v in ev.videos], progress=False)  # nothing but the checkpoint
    for p, want in zip(preds, ev.probs):
        assert p.error is None
        # the same features to the last bit (float32 rounded to float16 as the cache stores them), so the
        # same probabilities up to float32 rounding in the head (measured: at most 6e-8)
        np.testing.assert_allclose(p.probs, want, rtol=0, atol=1e-6)


def test_timm_feature_size_counts_the_layers_after_the_pooling(videos, tmp_path):
    """MobileNetV3 (timm) pools, then a 1x1 conv widens 288 channels to 1024 features: the size is
    timm's head_hidden_size, not num_features. With 288, extract-features wrote its cache, then
    refused it as inconsistent, and finetune-end-to-end built an LSTM for 288 inputs."""
    from pipeline.backbones import describe_timm

    name = "timm:mobilenetv3_small_050"
    bb = create_backbone(name, "none", input_size=S)
    with torch.inference_mode():
        assert bb.num_features == bb.net.eval()(torch.zeros(1, 3, S, S)).shape[1] == 1024
    assert {r["num_features"] for r in describe_timm("mobilenetv3_small_050*")} == {1024}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_features(ExtractConfig(dataset=DatasetSpec(str(videos)), output=str(tmp_path / "m.h5"), backbone=name,
                                       weights="none", frame_overrides=FrameOverrides(size=S), batch_size=8, workers=0,
                                       calibration_frames=16), progress=False)
    with FeatureCache(tmp_path / "m.h5") as c:
        assert c.provenance.feature_dim == c.load_split("train").features.shape[1] == 1024


def test_backbone_without_batchnorm_warns_random_features(videos, tmp_path, caplog):
    extract_features(ExtractConfig(dataset=DatasetSpec(str(videos)), output=str(tmp_path / "v.h5"), backbone=TIMM_VIT,
                                   weights="none", frame_overrides=FrameOverrides(size=S), batch_size=8, workers=0),
                     progress=False)
    assert "no BatchNorm to calibrate" in caplog.text and "only good for testing" in caplog.text
    saved = read_provenance(tmp_path / "v.h5").weights.path  # the random ViT, saved for later stages
    with pytest.raises(ConfigError, match=rf"holds {TIMM_VIT} made for {S}x{S} frames, which fixes its input size; "
                                          rf"use --size {S}$"):
        create_backbone(TIMM_VIT, saved, input_size=S + 16)


# ------------------------------------------------------------------------------------ weights


def test_timm_local_file_loads_offline(tmp_path):
    import timm
    from safetensors.torch import save_file

    arch = TIMM_VIT.split(":")[1]
    torch.manual_seed(1)
    full = timm.create_model(arch, pretrained=False, img_size=S)  # with its classifier, as timm ships files
    save_file(full.state_dict(), str(tmp_path / "model.safetensors"))
    bb = create_backbone(TIMM_VIT, str(tmp_path / "model.safetensors"), input_size=S)
    full.reset_classifier(0)
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(bb.net(x), full.eval()(x))
    assert bb.weights.source == "file" and bb.weights.sha256


def test_timm_file_whose_classifier_has_a_norm_loads(tmp_path):
    """LeViT's classifier is a BatchNorm then a linear layer: timm drops the linear's keys from its
    own file, the norm's were taken for another model's and the file refused."""
    import timm

    torch.manual_seed(1)
    full = timm.create_model("levit_128s", pretrained=False)  # with both heads, as timm ships the file
    torch.save(full.state_dict(), tmp_path / "levit.pth")
    bb = create_backbone("timm:levit_128s", str(tmp_path / "levit.pth"))
    want = {k: v for k, v in full.state_dict().items() if not k.startswith(("head.", "head_dist."))}
    got = bb.net.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_timm_load_errors_say_what_does_not_fit(tmp_path):
    """A failed load said only its first line ("Error(s) in loading state_dict for ResNet:"): now
    the first shape that does not fit, and where the size asked is what does not fit, the size."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"cannot load .*r18\.pth into timm:resnet10t \(RuntimeError: size "
                                           r"mismatch for .*; pass that model's own weights file"):
        create_backbone("timm:resnet10t", str(tmp_path / "r18.pth"))
    torch.save(timm.create_model("levit_128s").state_dict(), tmp_path / "levit.pth")  # made for 224
    with pytest.raises(ConfigError, match=r"into timm:levit_128s built for 64x64 frames \(size mismatch for .*"
                                          r"attention_biases.*\); use --size 224, the size it was made for"):
        create_backbone("timm:levit_128s", str(tmp_path / "levit.pth"), input_size=64)


def test_timm_file_of_another_model_or_an_empty_one_is_refused(tmp_path):
    """timm drops the classifier and then loads a file non-strictly: an empty file, or another
    model's, loaded without a word and left the network at a new random init on every run."""
    import timm
    from safetensors.torch import save_file

    arch = TIMM_VIT.split(":")[1]
    state = timm.create_model(arch, pretrained=False, img_size=S).state_dict()
    torch.save({}, tmp_path / "empty.pth")
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.11.")}, str(tmp_path / "short.safetensors"))
    save_file({**state, "blocks.12.norm1.weight": torch.ones(192)}, str(tmp_path / "long.safetensors"))
    r34 = timm.create_model("resnet34", pretrained=False).state_dict()  # resnet18's tensors and more
    torch.save(r34, tmp_path / "r34.pth")
    for file, kind, backbone in (("empty.pth", "tensors are not in it", TIMM_VIT),
                                 ("short.safetensors", "tensors are not in it (blocks.11.", TIMM_VIT),
                                 ("long.safetensors", "the model has no place for (blocks.12.norm1.weight)", TIMM_VIT),
                                 ("r34.pth", "the model has no place for (layer1.2.", "timm:resnet18")):
        with pytest.raises(WeightsError, match=rf"^{tmp_path / file} does not fit {backbone}: .*{re.escape(kind)}"):
            create_backbone(backbone, str(tmp_path / file), input_size=S)
    create_backbone("timm:resnet34", str(tmp_path / "r34.pth"), input_size=S)  # its own model takes it


def _hub_cache(monkeypatch, root: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """``state`` as the Hugging Face cache under ``root`` holds a download of ``repo``, used offline
    (as after an earlier online run): timm loads it through its own hub code, nothing is mocked."""
    import huggingface_hub.constants as C
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder / "snapshots" / commit / "model.safetensors"


def test_timm_pretrained_weights_round_trip_from_the_hub_cache(videos, tmp_path, monkeypatch):
    """Published timm weights, as a user online gets them: the cache records the tag and the hash
    of the file timm loaded; a head trained on it predicts from its checkpoint alone; a moved copy
    passed as --weights PATH is checked against that hash; files that recorded the hub id (before
    1 Dec 2026) still rebuild."""
    import timm

    from pipeline.config import WeightsIdentity
    from pipeline.files import sha256_file
    from pipeline.model import load_model

    arch = TIMM_VIT.split(":")[1]
    tag = "augreg_in21k_ft_in1k"
    torch.manual_seed(3)
    full = timm.create_model(arch, pretrained=False)  # the published file's layout: 224 px, with its classifier
    file = _hub_cache(monkeypatch, tmp_path / "hub", f"timm/{arch}.{tag}", full.state_dict())

    out = tmp_path / "f.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm resamples the position embedding to 32 px
        r = extract_features(ExtractConfig(dataset=DatasetSpec(str(videos)), output=str(out), backbone=TIMM_VIT,
                                           weights="imagenet", frame_overrides=FrameOverrides(size=S), batch_size=8,
                                           workers=0), progress=False)
    assert r.weights == WeightsIdentity(source="timm", name=tag, sha256=sha256_file(file))
    train_temporal(TemporalConfig(cache=str(out), out=str(tmp_path / "run"), hidden=8, epochs=1, seq_len=4,
                                  device="cpu"), progress=False)
    ckpt = tmp_path / "run" / "best.pt"
    ev = evaluate_checkpoint(ckpt, out, "test", device="cpu")
    preds = Predictor(ckpt, device="cpu", batch_size=8, workers=0).predict([videos / v for v in ev.videos],
                                                                          progress=False)
    for p, want in zip(preds, ev.probs):
        assert p.error is None
        np.testing.assert_allclose(p.probs, want, rtol=0, atol=1e-6)

    model = load_model(ckpt)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model(arch, pretrained=False).state_dict(), str(other))
    with pytest.raises(WeightsError, match=r"other\.safetensors is not the backbone this model was trained with"):
        model.backbone(other)
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(file.read_bytes())
    assert model.backbone(moved).weights.sha256 == r.weights.sha256

    # The published file changed since: rebuilding by its tag is refused, naming the way out.
    save_file(timm.create_model(arch, pretrained=False).state_dict(), str(file))
    with pytest.raises(WeightsError, match=rf"weights {tag} are another file now .* pass that file as --weights PATH"):
        model.backbone()
    file.write_bytes(moved.read_bytes())

    # Written before: the hub id as the name (or, for weights without one, the model name), no hash.
    # Read as the tag; it matches today's identity.
    from pipeline.config import Provenance

    def recorded(backbone: str, name: str) -> str:
        d = {**r_prov.to_dict(), "backbone": backbone, "weights": {"source": "timm", "name": name}}
        return Provenance.from_dict(d).weights.name

    r_prov = model.provenance
    assert recorded(TIMM_VIT, f"timm/{arch}.{tag}") == tag == recorded(TIMM_VIT, tag)
    assert recorded("timm:davit_base_fl", "microsoft/Florence-2-base") == "msft_florence2"  # not a timm/ hub id
    assert recorded("timm:gcvit_base", "gcvit_base") == "in1k"  # no hub id: the model name, its default tag
    old = Provenance.from_dict({**r_prov.to_dict(), "weights": {"source": "timm", "name": f"timm/{arch}.{tag}"}})
    assert old.weights.matches(r.weights) and r.weights.matches(old.weights)
    assert not WeightsIdentity(source="timm", name="other_tag").matches(r.weights)


def test_offline_downloads_name_the_file(monkeypatch, tmp_path):
    """No network (this machine has none; the test makes sure of it): one line naming the file."""
    import urllib.error

    import torch.hub

    import pipeline.backbones as B

    monkeypatch.setattr(B, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(B, "_hub_cached", lambda cfg: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"could not download the timm weights .*huggingface.co/timm/.*--weights"):
        create_backbone(TIMM_VIT, "imagenet")
    with pytest.raises(WeightsError, match=r"could not download the resnet18 weights IMAGENET1K_V1.*"
                                           r"--weights PATH/TO/resnet18-"):
        create_backbone("resnet18", "imagenet")
    with pytest.raises(WeightsError, match="unknown weights 'no_such_tag'"):
        create_backbone(TIMM_VIT, "no_such_tag")


def test_a_published_torchvision_file_gets_its_own_tags_transform(monkeypatch, tmp_path, caplog):
    """The offline message says to fetch a tag's file and pass its PATH: that file must get that
    tag's preprocessing (MobileNetV2's V1 resizes to 256, the default V2 to 232; SWAG weights take
    384), not the default weights'. Any other file gets the default's, with a warning where the
    tags differ in it."""
    import torchvision

    import pipeline.backbones as B
    from pipeline.files import sha256_file

    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    real = B.published_sha256_prefix  # the real V1 file cannot be downloaded here: give its hash to this one
    monkeypatch.setattr(B, "published_sha256_prefix",
                        lambda name, tag: sha256_file(path)[:8] if tag == "IMAGENET1K_V1" else real(name, tag))
    B._say_default_transform.cache_clear()
    v1 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    with caplog.at_level("WARNING"):
        assert default_frame_spec("mobilenet_v2", str(path)) == B._torchvision_frame_spec(v1)
        assert create_backbone("mobilenet_v2", str(path)).frame_spec.resize_size == 256
    assert "not a weights file torchvision publishes" not in caplog.text
    monkeypatch.setattr(B, "published_sha256_prefix", real)
    with caplog.at_level("WARNING"):
        assert default_frame_spec("mobilenet_v2", str(path)).resize_size == 232
        default_frame_spec("mobilenet_v2", str(path))
    assert caplog.text.count(f"{path} is not a weights file torchvision publishes for mobilenet_v2: its frames are "
                             "prepared as for the IMAGENET1K_V2 weights (short side resized to 232, centre crop "
                             "224x224, bilinear)") == 1  # once per file
    caplog.clear()
    other = tmp_path / "resnet18.pth"  # one published tag: nothing to choose between
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with caplog.at_level("WARNING"):
        default_frame_spec("resnet18", str(other))
    assert "not a weights file" not in caplog.text


def test_a_torchvision_state_dict_in_safetensors_loads(tmp_path):
    """A torchvision state dict saved with safetensors (as hubs share them) was refused as "does
    not hold a state dict of tensors"."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}
    save_file(state, str(tmp_path / "r18.safetensors"))
    bb = create_backbone("resnet18", str(tmp_path / "r18.safetensors"))
    assert torch.equal(bb.net.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=r"bad\.safetensors is not a readable safetensors file"):
        create_backbone("resnet18", str(tmp_path / "bad.safetensors"))


def test_unknown_and_mismatched_backbones_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'.*resnet18"):
        create_backbone("resnet19")
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_backbone("timm:no_such_model_xyz")
    with pytest.raises(ConfigError, match=r"^timm has no pretrained tag 'bogus' for resnet18: use timm:resnet18\.a1_in1k"):
        create_backbone("timm:resnet18.bogus")
    with pytest.raises(ConfigError, match="^timm: needs a model name"):
        create_backbone("timm:")
    from pipeline.backbones import _remove_classifier

    with pytest.raises(ConfigError, match="no linear classifier"):  # no torchvision model now: SqueezeNet has its own
        _remove_classifier(nn.Sequential(nn.Conv2d(3, 8, 1), nn.AdaptiveAvgPool2d(1)), "convnet")
    bb = create_backbone("resnet18", "none")
    torch.save({"schema_version": 2, "kind": "backbone", "backbone": "resnet18", "backbone_state": bb.net.state_dict()},
               tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="holds resnet18 weights, not mobilenet_v2; pass --backbone resnet18"):
        create_backbone("mobilenet_v2", str(tmp_path / "r18.pt"))


def test_extract_takes_the_backbone_a_weights_file_records(tiny_dataset, tmp_path):
    """`extract-features --weights runs/e2e/best.pt` (or a saved backbone) without --backbone: the
    backbone the file records, not the default MobileNetV2 and a refusal. A --backbone given
    that differs is still refused."""
    from click.testing import CliRunner

    from cli import main

    bb = create_backbone("resnet18", "none")
    torch.save({"schema_version": 2, "kind": "backbone", "backbone": "resnet18", "backbone_state": bb.net.state_dict()},
               tmp_path / "r18.pt")
    args = ["extract-features", "--data-dir", str(tiny_dataset), "--weights", str(tmp_path / "r18.pt"), "--size",
            str(S), "--workers", "0", "--no-progress", "--output", str(tmp_path / "c.h5")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.stderr
    assert f"--weights {tmp_path / 'r18.pt'} holds resnet18 weights: --backbone resnet18" in r.stderr
    with FeatureCache(tmp_path / "c.h5") as c:
        assert c.provenance.backbone == "resnet18" and c.provenance.feature_dim == 512
    r = CliRunner().invoke(main, [*args[:1], "--backbone", "mobilenet_v2", *args[1:-1], str(tmp_path / "d.h5")])
    assert r.exit_code == 1 and "holds resnet18 weights, not mobilenet_v2; pass --backbone resnet18" in r.stderr


@pytest.mark.parametrize(("name", "tag"), [("resnet18", "IMAGENET1K_V1"), (TIMM_VIT, "augreg_in21k_ft_in1k")])
def test_checkpoint_rebuilds_named_weights_at_the_recorded_size(name, tag, tmp_path, monkeypatch):
    """A head trained on features of published weights (torchvision or timm, downloaded when
    extracted) asks for those same weights, at the input size the features were made at. The
    download itself is replaced here (no network): what is checked is what is asked for."""
    import pipeline.model as M
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import FrameSelection, Provenance, WeightsIdentity
    from pipeline.model import load_model

    dim = create_backbone(name, "none", input_size=S).num_features
    spec = default_frame_spec(name, tag).override(FrameOverrides(size=S))
    prov = Provenance(backbone=name, weights=WeightsIdentity(source="timm" if name == TIMM_VIT else "torchvision",
                                                             name=tag, sha256=None, path=None),
                      frame_spec=spec, selection=FrameSelection(), feature_dim=dim, classes=("a", "b"))
    head_cfg = HeadConfig(num_classes=2, input_dim=dim, hidden=8)
    save_checkpoint(tmp_path / "best.pt", {"kind": "temporal", "model_config": head_cfg.to_dict(),
                                           "model_state": build_head(head_cfg).state_dict(),
                                           "train_config": {"seq_len": 4}, "frame_spec": spec.to_dict(),
                                           "classes": ["a", "b"], "cache": prov.to_dict(), "epoch": 1, "metrics": {}})
    asked = []

    def offline(n, weights="none", *, input_size=None):
        asked.append((n, weights, input_size))
        return create_backbone(n, "none", input_size=input_size)

    monkeypatch.setattr(M, "create_backbone", offline)
    model = load_model(tmp_path / "best.pt")
    assert model.provenance == prov
    assert model.backbone().num_features == dim and asked == [(name, tag, S)]
    with pytest.raises(WeightsError, match="weights file not found"):  # a file given instead is checked as one
        model.backbone(tmp_path / "missing.pt")
    if name == "resnet18":  # a local copy of torchvision's file must carry the hash of its published name
        torch.save(create_backbone(name, "none").net.state_dict(), tmp_path / "r18.pt")
        with pytest.raises(WeightsError, match=r"r18\.pt is not the backbone this model was trained with "
                                               r"\(sha256 [0-9a-f]{12}\.\.\. != f37072fd\.\.\.\)"):
            model.backbone(tmp_path / "r18.pt")
        from pipeline.files import sha256_file  # a file whose hash starts as published is taken (a real one is 45 MB)

        monkeypatch.setattr(M, "published_sha256_prefix", lambda n, t: sha256_file(tmp_path / "r18.pt")[:8])
        model.backbone(tmp_path / "r18.pt")
        assert asked[-1] == (name, str(tmp_path / "r18.pt"), S)
    with pytest.raises(ConfigError, match=r"records its backbone weights .*: drop --weights imagenet"):
        model.backbone("imagenet")


def test_checkpoint_with_more_classes_than_head_outputs_is_refused(tmp_path):
    """A damaged checkpoint whose class list does not fit its head would mislabel every video."""
    from pipeline.checkpoint import CheckpointError, save_checkpoint
    from pipeline.config import FrameSelection, Provenance, WeightsIdentity
    from pipeline.model import load_model

    spec = FrameSpec(size=S)
    prov = Provenance(backbone="resnet18", weights=WeightsIdentity(source="torchvision", name="IMAGENET1K_V1"),
                      frame_spec=spec, selection=FrameSelection(), feature_dim=512, classes=("a", "b", "c"))
    head_cfg = HeadConfig(num_classes=2, input_dim=512, hidden=8)
    save_checkpoint(tmp_path / "best.pt", {"kind": "temporal", "model_config": head_cfg.to_dict(),
                                           "model_state": build_head(head_cfg).state_dict(), "train_config": {},
                                           "frame_spec": spec.to_dict(), "classes": ["a", "b", "c"],
                                           "cache": prov.to_dict(), "epoch": 1, "metrics": {}})
    with pytest.raises(CheckpointError, match=r"best\.pt is damaged: it lists 3 classes for a head of 2 outputs"):
        load_model(tmp_path / "best.pt")
    # a field gone, or weights a diverged run saved: one line each, not a KeyError or NaN for every video
    state = build_head(head_cfg).state_dict()
    base = {"kind": "temporal", "model_config": head_cfg.to_dict(), "model_state": state, "train_config": {},
            "frame_spec": spec.to_dict(), "classes": ["a", "b"], "cache": prov.to_dict(), "epoch": 1, "metrics": {}}
    save_checkpoint(tmp_path / "ok.pt", base)
    assert load_model(tmp_path / "ok.pt").classes == ["a", "b"]
    save_checkpoint(tmp_path / "gone.pt", {k: v for k, v in base.items() if k != "model_state"})
    with pytest.raises(CheckpointError, match=r"gone\.pt is damaged: no model_state; use the run's other checkpoint"):
        load_model(tmp_path / "gone.pt")
    key = next(iter(state))
    save_checkpoint(tmp_path / "nan.pt", {**base, "model_state": {**state, key: state[key] * float("nan")}})
    with pytest.raises(CheckpointError, match=rf"nan\.pt holds non-finite weights \({key}\): the run diverged"):
        load_model(tmp_path / "nan.pt")


# ------------------------------------------------------------------- files of the last schema


def _write_schema1_cache(path: Path, weights: Path, splits: dict[str, SplitData]) -> None:
    """``splits`` as schema 1 wrote them: no FrameSpec resize size or filter, no feature layout version."""
    from pipeline.files import sha256_file

    classes = next(iter(splits.values())).classes
    prov = {"backbone": "mobilenet_v2", "feature_dim": 1280, "dtype": "float16", "precision": "float32",
            "classes": classes, "weights": {"source": "file", "name": None, "sha256": sha256_file(weights),
                                            "path": str(weights)},
            "frame_spec": {"size": S, "resize": "crop", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "selection": {"stride": 1, "fps": None, "max_frames": None, "folder_fps": None}}
    with h5py.File(path, "w") as f:
        for split, d in splits.items():
            g = f.create_group(split)
            g["features"] = d.features.astype(np.float16)
            g["frame_indices"] = d.frame_indices
            g["offsets"] = d.offsets
            g["labels"] = d.labels
            g.create_dataset("videos", data=np.array(d.videos, dtype=object), dtype=h5py.string_dtype())
            g["fps"] = d.fps.astype(np.float32)
        f.attrs.update({"schema_version": 1, "classes": json.dumps(classes), "provenance": json.dumps(prov),
                        "config": "{}", "failures": "[]"})


def test_schema1_cache_and_checkpoint_still_load(tmp_path, weights_file, videos):
    """Files written the schema-1 way (MobileNetV2 at its FrameSpec of then: resize straight to the
    crop size, bilinear) still evaluate, and predict on the videos gives evaluate's probabilities."""
    from pipeline.checkpoint import TOOL
    from pipeline.config import Provenance

    then = FrameSpec(size=S, resize_size=S, interpolation="bilinear")  # what schema 1 did
    extract_features(ExtractConfig(dataset=DatasetSpec(str(videos)), output=str(tmp_path / "now.h5"),
                                   weights=str(weights_file), frame_spec=then, batch_size=8, workers=0), progress=False)
    with FeatureCache(tmp_path / "now.h5") as c:
        splits = {s: c.load_split(s) for s in ("train", "test")}
    classes = splits["test"].classes
    old_cache = tmp_path / "old.h5"
    _write_schema1_cache(old_cache, weights_file, splits)
    with FeatureCache(old_cache) as c:
        assert c.provenance.backbone == "mobilenet_v2" and c.frame_spec == then
        prov = json.loads(h5py.File(old_cache)["/"].attrs["provenance"])
    # a provenance without the backbone's name and dimension reads as schema 1's only one
    unnamed = {k: v for k, v in prov.items() if k not in ("backbone", "feature_dim")}
    assert Provenance.from_dict(unnamed) == Provenance.from_dict(prov)
    # a schema-1 checkpoint: the LSTM's layer was called lstm, no arch, no resize size
    torch.manual_seed(0)
    head = build_head(HeadConfig(num_classes=len(classes), input_dim=1280, hidden=8))
    state = {("lstm." + k[4:] if k.startswith("rnn.") else k): v for k, v in head.state_dict().items()}
    old_ckpt = tmp_path / "old.pt"
    torch.save({"tool": TOOL, "schema_version": 1, "kind": "temporal", "epoch": 1, "classes": classes,
                "model_config": {"num_classes": len(classes), "input_dim": 1280, "hidden": 8, "layers": 1,
                                 "bidirectional": False, "dropout": 0.5, "pool": "last"},
                "model_state": state, "train_config": {"seq_len": 4, "eval_clips": 1},
                "frame_spec": prov["frame_spec"], "cache": unnamed, "metrics": {}}, old_ckpt)
    ev = evaluate_checkpoint(old_ckpt, old_cache, "test", device="cpu")
    assert ev.probs.shape == (len(splits["test"].videos), len(classes)) and ev.videos == splits["test"].videos
    from pipeline.sampling import uniform_clips

    first = splits["test"].features[: splits["test"].offsets[1]]
    pos, _ = uniform_clips(np.array([len(first)]), 4)  # the clip evaluate takes
    with torch.no_grad():  # the migrated weights are the same function
        x = torch.from_numpy(first[pos[0]].astype(np.float32))[None]
        np.testing.assert_allclose(ev.probs[0], torch.softmax(head.eval()(x), 1)[0].numpy(), rtol=1e-4, atol=1e-5)
    preds = Predictor(old_ckpt, device="cpu", workers=0).predict([videos / v for v in ev.videos], progress=False)
    # Decoded, resized and run as schema 1 did, from the checkpoint alone. Predict rounds its features
    # to the cache's float16 too, but it batches frames by video, not 8 across videos: with one thread
    # the conv's last float32 bit then differs and can move a feature one float16 step. Measured:
    # equal with two threads, 2.6e-6 apart with one. (BatchNorm means 1 % off move them 3e-2.)
    for p, want in zip(preds, ev.probs):
        assert p.error is None
        np.testing.assert_allclose(p.probs, want, rtol=0, atol=1e-5)
    # A schema-1 end-to-end checkpoint (the backbone inside, the head twice), here with the same
    # backbone and head: the same predictions, up to the features' float16 rounding in the cache
    # (old end-to-end files recorded float32). Measured: at most 2e-5 apart; with the BatchNorm
    # means of the backbone 1 % off, 3e-2.
    e2e = tmp_path / "old_e2e.pt"
    torch.save({"tool": TOOL, "schema_version": 1, "kind": "end_to_end", "epoch": 1, "classes": classes,
                "model_config": torch.load(old_ckpt)["model_config"], "model_state": state, "head_state": state,
                "backbone_state": create_backbone("mobilenet_v2", str(weights_file)).net.state_dict(),
                "train_config": {"seq_len": 4, "eval_clips": 1}, "frame_spec": prov["frame_spec"],
                "cache": {**prov, "weights": {"source": "end_to_end"}, "dtype": "float32"}, "metrics": {}}, e2e)
    for p, want in zip(Predictor(e2e, device="cpu", workers=0).predict([videos / v for v in ev.videos],
                                                                         progress=False), ev.probs):
        assert p.error is None
        np.testing.assert_allclose(p.probs, want, rtol=0, atol=1e-4)
    # Extending the old cache with today's default FrameSpec would mix features: refused.
    with pytest.raises(CacheError, match=r"FrameSpec .*--overwrite"):
        extract_features(ExtractConfig(dataset=DatasetSpec(str(videos)), output=str(old_cache),
                                       weights=str(weights_file), batch_size=8, workers=0), progress=False)


def test_shapes_only_build_skips_init_in_this_thread_only():
    """A model whose weights a file gives is built without initialising them (``_SkipInit``), and
    that holds for the building thread alone: a model built meanwhile in another thread is
    initialised as usual. The file's weights then load exactly, RegNet (widths computed from
    tensor values, so not on the meta device) included."""
    import threading

    from pipeline.backbones import _build_torchvision, _SkipInit

    t = torch.zeros(3, 3)
    other: dict[str, torch.Tensor] = {}

    def build_elsewhere() -> None:
        torch.manual_seed(0)
        other["w"] = nn.Linear(8, 8).weight.detach().clone()

    with _SkipInit():
        assert nn.init.normal_(t) is t and t.uniform_() is t and not t.any()
        th = threading.Thread(target=build_elsewhere)
        th.start()
        th.join()
    torch.manual_seed(0)
    assert other["w"].abs().sum() > 0 and torch.equal(other["w"], nn.Linear(8, 8).weight)
    for name in ("mobilenet_v3_small", "regnet_y_400mf"):
        real = _build_torchvision(name, None)
        shell = _build_torchvision(name, None, shapes_only=True)
        shell.load_state_dict(real.state_dict(), assign=True)
        assert all(torch.equal(a, b) for a, b in zip(real.state_dict().values(), shell.state_dict().values()))


def test_provenance_mismatch_names_every_field():
    """Features from any other source are never mixed or evaluated together: each field that
    differs is named, class lists in order (a reordered list relabels every video)."""
    from pipeline.config import FrameSelection, Provenance, WeightsIdentity

    base = Provenance(backbone="resnet18", weights=WeightsIdentity(source="file", sha256="a" * 64, path="/x/w.pt"),
                      frame_spec=default_frame_spec("resnet18"), selection=FrameSelection(), feature_dim=512,
                      classes=("c0", "c1", "c2"))
    assert base.mismatch(base.replace()) is None
    assert base.mismatch(base.replace(weights=WeightsIdentity(source="file", sha256="a" * 64, path="/moved/w.pt"))) \
        is None  # a moved file with the same bytes is the same backbone
    changes = {"backbone": {"backbone": "resnet34"},
               "weights": {"weights": WeightsIdentity(source="file", sha256="b" * 64, path="/x/w.pt")},
               "FrameSpec": {"frame_spec": default_frame_spec("resnet18").override(FrameOverrides(size=160))},
               "frame selection": {"selection": FrameSelection(stride=2)},
               "feature dimension": {"feature_dim": 256},
               "compute precision": {"precision": "bfloat16"},
               "feature dtype": {"dtype": "float32"},
               "class list": {"classes": ("c1", "c0", "c2")}}
    for what, kw in changes.items():
        got = base.mismatch(base.replace(**kw))
        assert got is not None and got.startswith(what), (what, got)
        assert base.mismatch(base.replace(**kw), ignore=(next(iter(kw)),)) is None
    # --folder-fps without --fps only dates frame folders' frames: the same features
    assert base.mismatch(base.replace(selection=FrameSelection(folder_fps=30.0))) is None
    # ... but one cache holds one dating of its frames
    assert base.mismatch(base.replace(selection=FrameSelection(folder_fps=30.0)), dated=True).startswith("frame selection")
    got = base.replace(selection=FrameSelection(fps=10.0, folder_fps=25.0)).mismatch(
        base.replace(selection=FrameSelection(fps=10.0, folder_fps=30.0)))
    assert got is not None and got.startswith("frame selection"), got


def test_a_timm_model_built_for_a_size_it_cannot_take_is_refused_in_one_line():
    """timm builds a fixed-size model (LeViT) for the size asked; at 70 its attention biases count
    5x5 positions, its stem gives 4x4: the check took the size the model was built for as its
    weights' own and skipped it, and BatchNorm recalibration then ended in a traceback."""
    from pipeline.backbones import check_input_size

    bb = create_backbone("timm:levit_128s", "none", input_size=70)
    with pytest.raises(ConfigError, match=r"timm:levit_128s cannot take 70x70 frames \(.*\); use --size 224, the "
                                          r"size its weights were made for"):
        check_input_size(bb, 70)
    check_input_size(create_backbone("timm:levit_128s", "none", input_size=64), 64)  # a size it takes


def test_check_input_size_blames_the_size_only_when_the_weights_own_size_works():
    from pipeline.backbones import Backbone, check_input_size
    from pipeline.config import WeightsIdentity

    def backbone(net: nn.Module) -> Backbone:
        return Backbone(name="probe", net=net.eval(), num_features=8, frame_spec=FrameSpec(size=32),
                        weights=WeightsIdentity(source="random"), block_params=[])

    shrinks = backbone(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 7), nn.Flatten()))
    check_input_size(shrinks, 32)
    with pytest.raises(ConfigError, match=r"^probe cannot take 8x8 frames \(.*\); use --size 32$"):
        check_input_size(shrinks, 8)  # 8 → 3 → nothing: a 7x7 kernel does not fit

    class Fixed(nn.Module):  # as a torchvision ViT: built for one size, which its weights' spec may not be
        def __init__(self) -> None:
            super().__init__()
            self.image_size, self.conv = 16, nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._assert(x.shape[-1] == self.image_size, f"Wrong image width! Expected {self.image_size}")
            return self.conv(x).mean((2, 3))

    with pytest.raises(ConfigError, match=r"^probe cannot take 32x32 frames \(Wrong image width! Expected 16\); "
                                          r"use --size 16 \(its weights fix the input size"):
        check_input_size(backbone(Fixed()), 32)  # at the spec's own size, built for another
    four_channels = backbone(nn.Conv2d(4, 8, 3))  # fails at every size: not the size's fault
    with pytest.raises(ConfigError, match=r"^probe fails on a blank 8x8 frame \(.*\); check --weights$"):
        check_input_size(four_channels, 8)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_googlenet_and_inception_give_torchvisions_features_by_tag_and_by_file(name, tmp_path, monkeypatch):
    """torchvision's file of these weights holds the auxiliary ImageNet-training heads (a file was
    refused for them), and with weights torchvision builds the model to re-normalise its input
    (``transform_input``), which a file did not: the same weights gave features 120 % apart by tag
    and by file. Both now equal torchvision's own model on its own normalisation, with that step
    moved into the FrameSpec (mean = std = 0.5)."""
    import torchvision

    from pipeline.config import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    state = torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=True).state_dict()
    torch.save(state, tmp_path / "published.pth")  # the keys of torchvision's published file
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", lambda self, *a, **k: state)
    w = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    theirs = torchvision.models.get_model(name, weights=w).eval()  # as torchvision builds it: transform_input
    theirs.fc = nn.Identity()
    by_tag, by_file = create_backbone(name, "IMAGENET1K_V1"), create_backbone(name, str(tmp_path / "published.pth"))
    spec = by_tag.frame_spec
    assert spec == by_file.frame_spec == default_frame_spec(name, "IMAGENET1K_V1")
    assert (spec.mean, spec.std) == ((0.5,) * 3, (0.5,) * 3) and spec.size == w.transforms().crop_size[0]
    crop = resize_frames(_image(), spec)[None]  # the same uint8 pixels for both
    with torch.no_grad():
        want = theirs(normalize_frames(crop, FrameSpec(size=spec.size, mean=IMAGENET_MEAN, std=IMAGENET_STD)))
        got_tag, got_file = by_tag.net(normalize_frames(crop, spec)), by_file.net(normalize_frames(crop, spec))
    torch.testing.assert_close(got_tag, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    torch.testing.assert_close(got_file, got_tag, rtol=0, atol=1e-6 * want.abs().max().item())


def test_weights_files_keep_module_versions_fix_a_vits_size_and_refuse_nan(tmp_path):
    """MNASNet loads only with its module version, which travels in the state dict's metadata (a
    file of its weights was a ValueError traceback, so was predict after extract). A ViT file made at
    another size than 224 (torchvision's SWAG weights: 384, 518) was refused for its position
    embedding. Weights with NaN where the features pass (vgg16's IMAGENET1K_FEATURES has no
    classifier values) made every feature NaN."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    ref = create_backbone("mnasnet0_5", "none").net
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    torch.save(dict(ref.state_dict()), tmp_path / "plain.pt")  # no metadata at all: the model's own versions
    with torch.no_grad():
        for f in ("m.pt", "plain.pt"):
            assert torch.equal(create_backbone("mnasnet0_5", str(tmp_path / f)).net(x), ref(x)), f

    import torchvision

    torch.save(torchvision.models.vit_b_16(image_size=32).state_dict(), tmp_path / "vit32.pt")
    vit = create_backbone("vit_b_16", str(tmp_path / "vit32.pt"))
    assert vit.net.image_size == vit.frame_spec.size == default_frame_spec("vit_b_16", str(tmp_path / "vit32.pt")).size == 32
    assert create_backbone("vit_b_16", "none", input_size=48).net.image_size == 48  # random weights: the size asked

    state = torchvision.models.alexnet().state_dict()
    state["classifier.1.weight"][:] = float("nan")  # fc6, which the 4096-d features go through
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(WeightsError, match=r"nan\.pt holds NaN/Inf in classifier\.1\.weight, which the features go "
                                           r"through; use other weights \(IMAGENET1K_V1\)$"):
        create_backbone("alexnet", str(tmp_path / "nan.pt"))


@pytest.mark.parametrize(("name", "count"), [("densenet121", 8), ("vgg11", 10), ("alexnet", 7), ("swin_t", 8),
                                             ("maxvit_t", 6), ("mnasnet0_5", 10), ("squeezenet1_1", 9)])
def test_more_families_have_blocks_worth_training_one_of(name, count):
    """These fell to the generic grouping (top-level children): DenseNet was one block holding every
    parameter, Swin two (the last just its final LayerNorm), VGG/AlexNet two, MaxViT three (99 %
    in one), MNASNet 14 with each BatchNorm a block of its own; --trainable-blocks 1 trained the
    whole network or a norm layer. Now per stage (each conv and fc6/fc7 for VGG/AlexNet), in the
    order they run."""
    bb = create_backbone(name, "none")
    names = [n for n, _ in bb.net.named_parameters()]
    flat = [p for b in bb.blocks for p in b.params]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat)) and len(bb.blocks) == count
    sizes, modules = dict(bb.net.named_parameters()), dict(bb.net.named_modules())
    owner = {f"{m}.{p}".lstrip("."): m for m, mod in modules.items() for p, _ in mod.named_parameters(recurse=False)}
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    assert all(any(not isinstance(modules[owner[p]], norms) for p in b.params) for b in bb.blocks)  # no lone norm
    assert sum(sizes[p].numel() for p in bb.blocks[-1].params) < 0.6 * sum(t.numel() for t in sizes.values())
    if name.startswith(("swin", "maxvit")):
        return  # their attention reads parameters outside a module call: the order check below cannot see them
    first_call = _first_calls(bb.net, torch.randn(1, 3, 64, 64))
    spans = [(min(first_call[owner[p]] for p in b.params), max(first_call[owner[p]] for p in b.params))
             for b in bb.blocks]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_squeezenet_features_are_its_pooled_last_fire_module(name, tmp_path):
    """SqueezeNet classifies with a 1x1 conv, no Linear: every command refused it ("no linear
    classifier"), and list-backbones showed its dimension as '?'. Its features are what that conv
    reads, pooled (512-d), from a tag's file or a state dict with its classifier alike."""
    import torchvision
    from click.testing import CliRunner

    from cli import main

    torch.manual_seed(0)
    ref = torchvision.models.get_model(name, weights=None).eval()
    torch.save(ref.state_dict(), tmp_path / "sq.pth")  # with its classifier, as torchvision's files are
    bb = create_backbone(name, str(tmp_path / "sq.pth"))
    assert bb.num_features == 512
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        want = torch.nn.functional.adaptive_avg_pool2d(ref.features(x), 1).flatten(1)
        torch.testing.assert_close(bb.net.eval()(x), want)
    r = CliRunner().invoke(main, ["list-backbones"])
    assert r.output.splitlines()[[ln.split()[0] for ln in r.output.splitlines()].index(name)].split()[1] == "512"


def test_googlenet_features_cached_with_imagenet_normalisation_are_rebuilt_so(monkeypatch, tmp_path):
    """A checkpoint on GoogLeNet features cached before the FrameSpec carried the model's own
    re-normalisation (ImageNet mean/std, transform_input inside the model): its backbone is rebuilt
    with that step, so predict computes the features it was trained on; by tag, from a moved
    weights file, and from an end-to-end checkpoint fine-tuned from such a model alike."""
    import torchvision

    from pipeline.config import FrameSelection, Provenance, WeightsIdentity
    from pipeline.files import sha256_file
    from pipeline.model import Model

    state = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", lambda self, *a, **k: state)

    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    torch.save(net.state_dict(), moved := tmp_path / "googlenet.pth")
    e2e_state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}

    def rebuilt(spec: FrameSpec, how: str = "tag") -> bool:
        ident = WeightsIdentity(source="torchvision", name="IMAGENET1K_V1",
                                sha256=sha256_file(moved) if how == "file" else None)
        prov = Provenance(backbone="googlenet", weights=ident, frame_spec=spec, selection=FrameSelection(),
                          feature_dim=1024, classes=("a", "b"))
        kind, ckpt = ("end_to_end", {"backbone_state": e2e_state}) if how == "end_to_end" else ("temporal", {})
        model = Model(Path("x.pt"), kind, nn.Identity(), None, ["a", "b"], prov, 8, 1, ckpt)
        return model.backbone(moved if how == "file" else None).net.transform_input

    old = FrameSpec(size=224, resize_size=256)  # ImageNet mean/std: made the old way
    assert rebuilt(old) is rebuilt(old, "file") is rebuilt(old, "end_to_end") is True
    assert rebuilt(default_frame_spec("googlenet", "IMAGENET1K_V1")) is False
    assert rebuilt(default_frame_spec("googlenet", "IMAGENET1K_V1"), "file") is False
    # extract-features --weights with such an end-to-end checkpoint: the backbone its head was trained on
    for spec, renormalises in ((old, True), (default_frame_spec("googlenet", "IMAGENET1K_V1"), False)):
        torch.save({"backbone_state": e2e_state, "kind": "end_to_end",
                    "cache": {"backbone": "googlenet", "frame_spec": spec.to_dict()}}, e2e := tmp_path / "e2e.pt")
        assert default_frame_spec("googlenet", str(e2e)) == spec
        assert create_backbone("googlenet", str(e2e)).net.transform_input is renormalises
