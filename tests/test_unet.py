"""DDPMUNet: weights and configs interchangeable with diffusers.UNet2DModel (the oracle), the paper's parameter counts,
the execution options (checkpointing, attention kernels, memory layout, compile) and bad input."""

import json

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from ddpm_hf import DDPMUNet, unet_config
from ddpm_hf.presets import PRESETS
from ddpm_hf.unet import ResnetBlock

TOL = dict(rtol=0, atol=1e-5)


def _inputs(config, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def _outputs(model, x, t, **kwargs):
    with torch.no_grad():
        return model(x, t, **kwargs).sample


@pytest.mark.parametrize("preset", ["ddpm-cifar10", "small-32", "small-28", "tiny-16"])
def test_diffusers_folder_loads_in_ours_and_back(tmp_path, preset):
    torch.manual_seed(0)
    config = unet_config(preset, dropout=0.0)
    theirs = UNet2DModel(**config).eval()
    theirs.save_pretrained(tmp_path / "diffusers")
    ours = DDPMUNet.from_pretrained(tmp_path / "diffusers").eval()
    x, t = _inputs(config)
    torch.testing.assert_close(_outputs(ours, x, t), _outputs(theirs, x, t), **TOL)
    torch.testing.assert_close(_outputs(ours, x, 517), _outputs(theirs, x, 517), **TOL)  # scalar timestep

    ours.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert set(load_file(tmp_path / "ours" / "diffusion_pytorch_model.safetensors")) == set(theirs.state_dict())
    back = UNet2DModel.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_outputs(back, x, t), _outputs(theirs, x, t), **TOL)


@pytest.mark.parametrize("preset", ["ddpm-cifar10", "ddpm-256", "small-32", "small-28", "tiny-16"])
def test_blocks_are_unet2dmodels_by_class_name_and_gradient_checkpointing(preset):
    """Code that finds a U-Net's blocks by class name, or by the gradient_checkpointing attribute diffusers'
    enable_gradient_checkpointing sets, sees the same blocks at the same positions as in a UNet2DModel."""
    config = unet_config(preset)
    with torch.device("meta"):
        ours, theirs = DDPMUNet(**config), UNet2DModel(**config)

    def blocks(model):
        return {name: type(module).__name__ for name, module in model.named_modules()
                if name == "mid_block" or (name.count(".") == 1 and name.startswith(("down_blocks.", "up_blocks.")))}

    def checkpointing(model):
        return {name: module.gradient_checkpointing for name, module in model.named_modules()
                if hasattr(module, "gradient_checkpointing")}

    assert blocks(ours) == blocks(theirs)
    assert len(blocks(ours)) == 2 * len(config["block_out_channels"]) + 1
    assert checkpointing(ours) == checkpointing(theirs) and set(checkpointing(ours)) == set(blocks(ours))
    for model in (ours, theirs):
        model.enable_gradient_checkpointing()
    assert checkpointing(ours) == checkpointing(theirs) and all(checkpointing(ours).values())
    for model in (ours, theirs):
        model.disable_gradient_checkpointing()
    assert checkpointing(ours) == checkpointing(theirs) and not any(checkpointing(ours).values())


def test_paper_parameter_counts_match_unet2dmodel():
    cifar = DDPMUNet(**unet_config("ddpm-cifar10"))
    assert sum(p.numel() for p in cifar.parameters()) == 35_746_307  # the paper's 35.7 M
    with torch.device("meta"):
        big, big_theirs = DDPMUNet(**unet_config("ddpm-256")), UNet2DModel(**unet_config("ddpm-256"))
    count = sum(p.numel() for p in big.parameters())
    assert count == sum(p.numel() for p in big_theirs.parameters())
    assert 113e6 < count < 115e6  # the paper's 114 M


@pytest.mark.parametrize("overrides", [
    dict(resnet_time_scale_shift="scale_shift"),
    dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4),
    dict(num_class_embeds=10),
    dict(class_embed_type="timestep"),
    dict(out_channels=2, attention_head_dim=8, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1),
    dict(act_fn="mish", center_input_sample=True, mid_block_scale_factor=2 ** -0.5, norm_eps=1e-5),
    dict(mid_block_type=None),
    dict(add_attention=False, time_embedding_dim=48),
])
def test_config_options_match_unet2dmodel(tmp_path, overrides):
    torch.manual_seed(1)
    config = unet_config("tiny-16", **overrides)
    theirs = UNet2DModel(**config).eval()
    theirs.save_pretrained(tmp_path)
    ours = DDPMUNet.from_pretrained(tmp_path).eval()
    x, t = _inputs(config, batch=3)
    kwargs = {}
    if "num_class_embeds" in overrides:
        kwargs["class_labels"] = torch.tensor([0, 3, 9])
    if overrides.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([1, 2, 3])
    torch.testing.assert_close(_outputs(ours, x, t, **kwargs), _outputs(theirs, x, t, **kwargs), **TOL)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in overrides.items():
        assert ours.config[key] == saved[key] == value


def test_legacy_attention_keys_of_old_hub_checkpoints_load(tmp_path):
    """google/ddpm-cifar10-32 predates diffusers' Attention class: its keys are query/key/value/proj_attn."""
    torch.manual_seed(2)
    config = unet_config("tiny-16")
    theirs = UNet2DModel(**config).eval()
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, value in theirs.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = value.contiguous()
    assert any(".query." in k for k in legacy)
    theirs.save_config(tmp_path)
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    x, t = _inputs(config)
    ours = DDPMUNet.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_outputs(ours, x, t), _outputs(theirs, x, t), **TOL)


def _loss_and_grads(model, x, t):
    model.zero_grad()
    out = model(x, t).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(3)
    config = unet_config("tiny-16", dropout=0.0)
    model = DDPMUNet(**config).train()
    x, t = _inputs(config)
    out, grads = _loss_and_grads(model, x, t)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    out_ckpt, grads_ckpt = _loss_and_grads(model, x, t)
    torch.testing.assert_close(out_ckpt, out, **TOL)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6)


def test_sdpa_and_math_attention_agree():
    torch.manual_seed(4)
    config = unet_config("tiny-16", attention_head_dim=8)
    model = DDPMUNet(**config).eval()
    x, t = _inputs(config)
    sdpa = _outputs(model, x, t)
    model.set_attention_implementation("math")
    torch.testing.assert_close(_outputs(model, x, t), sdpa, **TOL)
    with pytest.raises(ValueError, match="sdpa"):
        model.set_attention_implementation("flash3")


def test_channels_last_model_and_input_give_same_outputs():
    torch.manual_seed(5)
    config = unet_config("small-32", dropout=0.0)
    model = DDPMUNet(**config).eval()
    x, t = _inputs(config, batch=3)
    reference = _outputs(model, x, t)
    model = model.to(memory_format=torch.channels_last)
    out = _outputs(model, x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, reference, **TOL)
    assert out.is_contiguous()


def test_every_gradient_has_its_parameters_strides():
    """DDP copies each gradient into a bucket view laid out like its parameter and compares their strides literally
    ("Grad strides do not match bucket view strides", at every multi-process run's first backward). The 1×1
    shortcut convolutions, whose weights count as channels-last too, returned channels-last gradients from the
    channels-last CPU activations from the preset's training batch of 16 on (not at 4 or 12, with torch 2.13)."""
    torch.manual_seed(8)
    config = unet_config("tiny-16")
    model = DDPMUNet(**config).train()
    x, t = _inputs(config, batch=PRESETS["tiny-16"]["training"]["train_batch_size"])
    model(x, t).sample.square().mean().backward()
    mismatched = {n: (p.stride(), p.grad.stride()) for n, p in model.named_parameters()
                  if p.grad.stride() != p.stride()}
    assert not mismatched
    shortcuts = [m for m in model.modules() if isinstance(m, ResnetBlock) and m.conv_shortcut is not None]
    assert len(shortcuts) >= 4


@pytest.mark.slow
def test_torch_compile_gives_same_outputs():
    torch.manual_seed(6)
    config = unet_config("tiny-16", dropout=0.0)
    model = DDPMUNet(**config).eval()
    x, t = _inputs(config)
    reference = _outputs(model, x, t)
    compiled = torch.compile(model)
    torch.testing.assert_close(_outputs(compiled, x, t), reference, rtol=0, atol=1e-4)


def test_original_initialisation_starts_every_block_as_identity():
    torch.manual_seed(7)
    config = unet_config("tiny-16")
    model = DDPMUNet(**config).initialize_like_ddpm(torch.Generator().manual_seed(0)).eval()
    x, t = _inputs(config)
    assert torch.equal(_outputs(model, x, t), torch.zeros_like(x))  # zero output convolution
    block = next(m for m in model.modules() if isinstance(m, ResnetBlock) and m.conv_shortcut is None)
    h = torch.randn(2, block.conv1.in_channels, 8, 8)
    temb = torch.randn(2, block.time_emb_proj.in_features)
    torch.testing.assert_close(block(h, temb), h)
    # variance scaling (fan_avg, uniform): the bound is √(3 / fan_avg)
    conv = model.conv_in
    fan_avg = (conv.out_channels + conv.in_channels) * 9 / 2
    assert conv.weight.abs().max() <= (3 / fan_avg) ** 0.5
    assert conv.weight.abs().max() > 0.8 * (3 / fan_avg) ** 0.5


def test_bad_input_names_what_was_expected():
    config = unet_config("small-32")
    model = DDPMUNet(**config).eval()
    with pytest.raises(ValueError, match=r"\(batch, 1, height, width\)"):
        model(torch.randn(2, 3, 32, 32), 1)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(2, 1, 30, 30), 1)
    with pytest.raises(ValueError, match="one value per sample"):
        model(torch.randn(2, 1, 32, 32), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(2, 1, 32, 32), 1, class_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("overrides,words", [
    (dict(time_embedding_type="fourier"), "positional"),
    (dict(down_block_types=["SkipDownBlock2D", "AttnDownBlock2D"]), "unsupported block types"),
    (dict(block_out_channels=[12, 32]), "multiples of norm_num_groups"),
    (dict(block_out_channels=[16, 32, 32]), "same length"),
    (dict(resnet_time_scale_shift="spatial"), "scale_shift"),
    (dict(attention_head_dim=64), "attention_head_dim=64 exceeds the 32 channels of an attention block"),
    (dict(attention_head_dim=[8, 8]), r"attention_head_dim=\[8, 8\]; pass one integer"),
])
def test_bad_config_is_refused(overrides, words):
    with pytest.raises(ValueError, match=words):
        DDPMUNet(**unet_config("tiny-16", **overrides))


def test_a_head_dim_wider_than_an_attention_block_is_refused_as_unet2dmodel_would_give_it_no_head():
    """Oracle for the refusal above: diffusers builds such an attention with 0 heads (a zero-width projection), a
    model no DDPMUNet could hold."""
    config = unet_config("tiny-16", attention_head_dim=64)
    widths = {module.to_q.weight.shape[0] for module in UNet2DModel(**config).modules() if hasattr(module, "to_q")}
    assert 0 in widths


def test_a_python_number_is_an_integer_timestep_as_for_unet2dmodel():
    """UNet2DModel makes a Python number a long tensor (517.6 is 517); a float tensor stays float in both."""
    torch.manual_seed(2)
    config = unet_config("tiny-16")
    theirs = UNet2DModel(**config).eval()
    ours = DDPMUNet(**config).eval()
    ours.load_state_dict(theirs.state_dict())
    x, _ = _inputs(config, batch=2)
    for t in (517.6, 517, 999.99997, torch.tensor(517.6), torch.tensor([3.5, 998.2])):
        torch.testing.assert_close(_outputs(ours, x, t), _outputs(theirs, x, t), **TOL)
    assert not torch.equal(_outputs(ours, x, 517.6), _outputs(ours, x, torch.tensor(517.6)))
