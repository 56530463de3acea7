"""spin_ray.fast_path: preparing the UNet keeps its function; FLOP counting and MFU arithmetic."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from spin_ray.fast_path import (
    PEAK_BF16_DENSE_FLOPS,
    generation_flops_per_image,
    mfu,
    model_flops_per_forward,
    peak_bf16_flops,
    prepare_unet_for_inference,
    prepare_unet_for_training,
    resolve_channels_last,
    set_sdpa_attention,
    spin_flops_per_sample,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH = 2


@pytest.fixture
def unet(tiny_components):
    return tiny_components.unet


def unet_inputs(unet, batch: int = BATCH, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    side, channels = unet.config.sample_size, unet.config.in_channels
    sample = torch.randn(batch, channels, side, side, generator=generator)
    embeds = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([10, 900][:batch] + [500] * max(0, batch - 2))
    return sample, timesteps, embeds


def run(unet, inputs):
    sample, timesteps, embeds = inputs
    return unet(sample, timesteps, encoder_hidden_states=embeds).sample


# ----------------------------------------------------------------------------- preparation


def test_prepared_for_inference_gives_the_same_outputs_in_fp32(unet):
    reference = copy.deepcopy(unet).eval()
    reference.set_attn_processor(AttnProcessor())  # diffusers' plain (non-SDPA) attention
    prepared = prepare_unet_for_inference(unet, "cpu", dtype=torch.float32, channels_last=True)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected, got = run(reference, inputs), run(prepared, inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert prepared is unet and not prepared.training
    assert not any(p.requires_grad for p in prepared.parameters())
    assert all(isinstance(p, AttnProcessor2_0) for p in prepared.attn_processors.values())
    conv_weight = prepared.conv_in.weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last) and not conv_weight.is_contiguous()


def test_prepared_for_training_gives_the_same_outputs_and_gradients(unet):
    reference = copy.deepcopy(unet).train()
    prepared = prepare_unet_for_training(unet, "cpu", channels_last=True, gradient_checkpointing=True)
    inputs = unet_inputs(unet, seed=1)
    expected, got = run(reference, inputs), run(prepared, inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    expected.square().mean().backward()
    got.square().mean().backward()
    torch.testing.assert_close(prepared.conv_in.weight.grad, reference.conv_in.weight.grad, atol=1e-4, rtol=1e-3)
    assert prepared.training and prepared.is_gradient_checkpointing
    assert next(prepared.parameters()).dtype == torch.float32


def test_channels_last_defaults_to_cuda_only(unet):
    assert resolve_channels_last(None, "cuda:0") and not resolve_channels_last(None, "cpu")
    assert resolve_channels_last(True, "cpu") and not resolve_channels_last(False, torch.device("cuda"))
    prepare_unet_for_inference(unet, "cpu", dtype=torch.float32)  # default: None -> not on the CPU
    assert unet.conv_in.weight.is_contiguous()


def test_training_preparation_keeps_frozen_parameters_frozen(unet):
    unet.requires_grad_(False)
    unet.conv_out.requires_grad_(True)
    prepare_unet_for_training(unet, "cpu")
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {"conv_out.weight", "conv_out.bias"}


def test_sdpa_replaces_plain_attention_and_keeps_custom_processors(unet):
    class CustomProcessor(AttnProcessor):
        pass

    names = list(unet.attn_processors)
    custom = CustomProcessor()
    unet.set_attn_processor({name: custom if i == 0 else AttnProcessor() for i, name in enumerate(names)})
    assert set_sdpa_attention(unet) == len(names) - 1
    processors = unet.attn_processors
    assert processors[names[0]] is custom
    assert all(isinstance(processors[name], AttnProcessor2_0) for name in names[1:])


def test_compile_flag_compiles_the_module_in_place(unet):
    prepared = prepare_unet_for_inference(unet, "cpu", dtype=torch.float32, compile=True)
    assert prepared is unet
    assert getattr(prepared, "_compiled_call_impl", None) is not None  # nn.Module.compile()'s marker
    assert prepared.config.sample_size == unet.config.sample_size


# ----------------------------------------------------------------------------- FLOPs


def test_flop_count_is_positive_and_linear_in_batch(unet):
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    dim = unet.config.cross_attention_dim
    counts = {b: model_flops_per_forward(unet, (b, *shape), (b, 77, dim)) for b in (1, 2, 4)}
    assert counts[1] > 0
    assert counts[2] == pytest.approx(2 * counts[1], rel=0.01)
    assert counts[4] == pytest.approx(4 * counts[1], rel=0.01)
    assert next(unet.parameters()).device.type == "cpu"  # counted on a meta twin, the model is untouched


def test_flop_count_of_a_plain_module_matches_the_formula():
    class OneConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, kernel_size=3, padding=1)

        def forward(self, sample, timesteps, encoder_hidden_states):
            return self.conv(sample)

    # 2 FLOPs per multiply-add: 2 x batch x out_channels x H x W x in_channels x 3 x 3
    assert model_flops_per_forward(OneConv(), (3, 4, 5, 5), (3, 77, 16)) == 2 * 3 * 8 * 5 * 5 * 4 * 3 * 3


def test_flop_count_rejects_mismatched_batches(unet):
    with pytest.raises(ValueError, match="batch sizes differ"):
        model_flops_per_forward(unet, (2, 4, 16, 16), (3, 77, 32))


def sd15_unet_flops_by_hand(text_tokens: int = 77, text_dim: int = 768) -> int:
    """FLOPs of one SD-1.5 UNet forward on one 64x64 latent, derived from the architecture
    (runwayml/stable-diffusion-v1-5 unet/config.json: block_out_channels 320/640/1280/1280,
    2 layers per block, cross-attention blocks at the first three levels, a 1280-wide time
    embedding, linear feed-forward GEGLU x4) without running the model.

    Counted as FlopCounterMode counts: 2 FLOPs per multiply-add of every convolution, linear
    layer and attention matmul; biases, norms, activations, softmax and resampling are free.
    """
    time_dim = 1280

    def conv(pixels: int, c_in: int, c_out: int, kernel: int) -> int:
        return 2 * pixels * c_in * c_out * kernel * kernel

    def resnet(pixels: int, c_in: int, c_out: int) -> int:
        # conv1 3x3, the time embedding's projection to c_out, conv2 3x3, a 1x1 shortcut if c_in != c_out
        shortcut = conv(pixels, c_in, c_out, 1) if c_in != c_out else 0
        return conv(pixels, c_in, c_out, 3) + 2 * time_dim * c_out + conv(pixels, c_out, c_out, 3) + shortcut

    def transformer(pixels: int, c: int) -> int:
        # n = pixels tokens of width c; proj_in and proj_out are 1x1 convs: 2 * 2 n c^2
        # self-attention: q, k, v, out projections 4 * 2 n c^2; QK^T and AV: 2 * 2 n^2 c
        # cross-attention: q and out 2 * 2 n c^2; k and v from the text 2 * 2 L D c; QK^T and AV 2 * 2 n L c
        # feed-forward: GEGLU c -> 8c (2 n c 8c), then 4c -> c (2 n 4c c)
        n, tokens, dim = pixels, text_tokens, text_dim
        return (4 + 8 + 4 + 16 + 8) * n * c * c + 4 * n * n * c + 4 * n * tokens * c + 4 * tokens * dim * c

    p64, p32, p16, p8 = 64 * 64, 32 * 32, 16 * 16, 8 * 8
    total = 2 * 320 * time_dim + 2 * time_dim * time_dim  # sinusoidal 320 -> 1280 -> 1280
    total += conv(p64, 4, 320, 3)  # conv_in
    # down: (resnet + transformer) x 2 then a stride-2 3x3 conv, three times; then two plain resnets at 8x8
    total += 2 * (resnet(p64, 320, 320) + transformer(p64, 320)) + conv(p32, 320, 320, 3)
    total += resnet(p32, 320, 640) + resnet(p32, 640, 640) + 2 * transformer(p32, 640) + conv(p16, 640, 640, 3)
    total += resnet(p16, 640, 1280) + resnet(p16, 1280, 1280) + 2 * transformer(p16, 1280) + conv(p8, 1280, 1280, 3)
    total += 2 * resnet(p8, 1280, 1280)
    # mid: resnet, transformer, resnet at 8x8
    total += 2 * resnet(p8, 1280, 1280) + transformer(p8, 1280)
    # up: three resnets per level on the concatenation with the skip connections (skip widths
    # 1280,1280,1280 | 1280,1280,640 | 640,640,320 | 320,320,320), nearest x2 then a 3x3 conv
    total += 3 * resnet(p8, 2560, 1280) + conv(p16, 1280, 1280, 3)
    total += 2 * resnet(p16, 2560, 1280) + resnet(p16, 1920, 1280) + 3 * transformer(p16, 1280)
    total += conv(p32, 1280, 1280, 3)
    total += resnet(p32, 1920, 640) + resnet(p32, 1280, 640) + resnet(p32, 960, 640) + 3 * transformer(p32, 640)
    total += conv(p64, 640, 640, 3)
    total += resnet(p64, 960, 320) + 2 * resnet(p64, 640, 320) + 3 * transformer(p64, 320)
    total += conv(p64, 320, 4, 3)  # conv_out
    return total


def test_sd15_unet_flop_count_equals_the_count_derived_from_the_architecture(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from bench.common import SD15_UNET_CONFIG
    from bench.scaling import SD15_TFLOP_PER_FORWARD

    by_hand = sd15_unet_flops_by_hand()
    assert by_hand == 803_273_441_280  # 0.803 TFLOP: the design figure (docs, bench.scaling)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    flops = model_flops_per_forward(unet, (1, 4, 64, 64), (1, 77, 768))
    assert flops == by_hand  # exact: the counter sees every conv, linear and attention matmul, nothing else
    assert SD15_TFLOP_PER_FORWARD == round(by_hand / 1e12, 3)
    assert generation_flops_per_image(flops, 50, 7.5) == 100 * by_hand
    assert spin_flops_per_sample(flops, online_reference=True) == 8 * by_hand


# ----------------------------------------------------------------------------- accounting and MFU


def test_generation_and_training_flop_accounting():
    forward = 1.0e9
    assert generation_flops_per_image(forward, 50, 7.5) == 100 * forward  # two branches per step
    assert generation_flops_per_image(forward, 50, 1.0) == 50 * forward  # no guidance: one branch
    # policy: forward + backward (2x) on the real and the synthetic latent = 6 forwards
    assert spin_flops_per_sample(forward, online_reference=False) == 6 * forward
    # online reference adds theta_k's forward on both latents
    assert spin_flops_per_sample(forward, online_reference=True) == 8 * forward


def test_mfu_arithmetic():
    assert mfu(80e12, 0.2, 1000e12) == pytest.approx(0.4)
    assert mfu(0.0, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize(("name", "expected"), [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756.0e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312.0e12),
    ("NVIDIA A10G", 70.0e12),
    ("NVIDIA L4", 121.0e12),
    ("NVIDIA L40S", None),  # not in the table; "L4" must not match it
    ("Tesla T4", None),
])
def test_peak_flops_by_gpu_name(name, expected):
    assert peak_bf16_flops(name) == expected


def test_peak_flops_table_covers_the_common_gpus():
    assert {"H100", "H200", "A100", "A10G", "L4"} <= set(PEAK_BF16_DENSE_FLOPS)


def test_peak_flops_without_a_gpu_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_bf16_flops() is None


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_bf16_inference_on_gpu_is_close_to_fp32(unet):
    reference = copy.deepcopy(unet).eval()
    prepared = prepare_unet_for_inference(unet, "cuda", dtype=torch.bfloat16)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = run(reference, inputs)
        got = run(prepared, tuple(x.cuda() for x in inputs)).float().cpu()
    assert next(prepared.parameters()).dtype == torch.bfloat16
    assert (got - expected).abs().mean() < 0.05 * expected.abs().mean()
    assert peak_bf16_flops() is None or peak_bf16_flops() > 0


def test_a_channels_last_unet_saves_and_loads_back_unchanged(unet, tmp_path):
    """The trainer checkpoints theta with ``save_pretrained``; on CUDA its weights are channels_last."""
    from spin_ray.diffusion import load_unet

    prepare_unet_for_training(unet, "cpu", channels_last=True)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    loaded = load_unet(str(tmp_path / "unet"), subfolder=None, local_files_only=True)
    expected = unet.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
