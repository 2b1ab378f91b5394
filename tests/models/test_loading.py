"""Model loading from every source, through the project's own `load_model` / `open_pipeline`.

Single-file checkpoints are written in the ORIGINAL Stable Diffusion key layout (tests/ldm_format.py)
and read back with diffusers' converters; state dicts must come back bit for bit, and a short
generation must give the same image as the folder the file was made from.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from linfusion_cli.errors import InputError, ModelNotFoundError
from linfusion_cli.hub import download_command
from linfusion_cli.models.loading import cache_dir, load_model

from ..ldm_format import (
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    save_ldm_checkpoint,
)


@pytest.fixture(scope="module")
def sdxl_distinct_dir(tmp_path_factory):
    """The tiny SD-XL pipeline with text encoders of different widths (24 + 40 = 64).

    diffusers tells SD-XL's two encoders apart in a single file by the width of their position
    embeddings (768 vs 1280 in the real model); the stock tiny model has 32 for both, which
    would load the CLIP-L weights into text_encoder_2.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from linfusion_cli.models.tiny import _text_config, build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")
    torch.manual_seed(12)
    one = _text_config()
    one.hidden_size, one.intermediate_size = 24, 29
    pipe.text_encoder = CLIPTextModel(one).eval()
    two = _text_config(projection=True)
    two.hidden_size, two.intermediate_size = 40, 51
    pipe.text_encoder_2 = CLIPTextModelWithProjection(two).eval()
    pipe.register_modules(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    folder = tmp_path_factory.mktemp("tiny-sdxl-distinct") / "sdxl"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _folder(family, tiny_pipeline_dirs, sdxl_distinct_dir):
    return sdxl_distinct_dir if family == "sdxl" else tiny_pipeline_dirs[family]


def _components(pipe):
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def _realign(pipe):
    """Copy every weight into fresh memory. Weights mmapped from a .safetensors file sit at
    whatever offset the file gives them, and CPU BLAS picks its kernel (and summation order) by
    alignment: equal weights at different offsets differ in the last bit (seen: SD-XL's
    text_projection at offset 40 vs 0). Fresh allocations are aligned alike."""
    for module in _components(pipe).values():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.data = tensor.data.clone()
    return pipe


def _generate(pipe, seed=3):
    return pipe("a red lighthouse", negative_prompt="fog", num_inference_steps=2, guidance_scale=5.0,
                height=64, width=64, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


# --- 1. single .safetensors in the original (LDM / A1111) layout --------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_ldm_single_file_round_trip(family, tiny_pipeline_dirs, sdxl_distinct_dir, tmp_path):
    folder = _folder(family, tiny_pipeline_dirs, sdxl_distinct_dir)
    reference = load_model(str(folder), linfusion=None)
    path = save_ldm_checkpoint(reference.pipe, tmp_path / f"tiny-{family}.safetensors")

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # really the original layout, not diffusers names
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert not any(k.startswith(("unet.", "vae.", "down_blocks", "text_model")) for k in keys)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("first_stage_model.decoder.mid.attn_1.proj_out.weight").ndim == 4
    text_prefix = {"sd15": SD1_CLIP_PREFIX, "sd21": SD2_OPENCLIP_PREFIX, "sdxl": SDXL_OPENCLIP_PREFIX}
    assert any(k.startswith(text_prefix[family]) for k in keys)

    loaded = load_model(str(path), config=str(folder), linfusion=None)
    assert loaded.family == family
    assert type(loaded.pipe).__name__ == type(reference.pipe).__name__
    assert loaded.pipe.unet.dtype == torch.float32
    assert loaded.pipe.scheduler.config.prediction_type == reference.pipe.scheduler.config.prediction_type
    ours, theirs = _components(loaded.pipe), _components(reference.pipe)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        a, b = ours[name].state_dict(), theirs[name].state_dict()
        assert a.keys() == b.keys(), f"{name}: {sorted(set(a) ^ set(b))[:5]}"
        bad = [k for k in b if not torch.equal(a[k], b[k])]
        assert not bad, f"{name}: {len(bad)} tensors differ, e.g. {bad[:3]}"
    image, expected = _generate(loaded.pipe), _generate(reference.pipe)
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-5)  # as loaded
    np.testing.assert_array_equal(_generate(_realign(loaded.pipe)), _generate(_realign(reference.pipe)))


def test_single_file_without_config_offline_is_one_clear_line(tiny_pipeline_dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reference = load_model(str(tiny_pipeline_dirs["sd15"]), linfusion=None)
    path = save_ldm_checkpoint(reference.pipe, tmp_path / "no-config.safetensors")
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(path), linfusion=None)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert "offline" in message.lower() or "HF_HUB_OFFLINE" in message, message
    assert "no-config.safetensors" in message and "config" in message, message  # what is missing
    assert download_command("stable-diffusion-v1-5/stable-diffusion-v1-5", ("*.json", "*.txt")) in message, message
    assert "local diffusers folder" in message, message  # ... or how to do without a download


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(InputError) as info:
        load_model(str(path), linfusion=None)
    assert "broken.safetensors" in str(info.value) and "\n" not in str(info.value)


# --- 2. pickle checkpoints -----------------------------------------------------------------------


def test_ckpt_is_refused_without_allow_pickle(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(InputError) as refused:
        load_model(str(path), linfusion=None)
    assert "--allow-pickle" in str(refused.value)
    assert "model.ckpt" in str(refused.value)
    # with allow_pickle it is attempted: this file is no Stable Diffusion model, so it fails later,
    # with a different (still one-line, still ours) error
    with pytest.raises(InputError) as attempted:
        load_model(str(path), linfusion=None, allow_pickle=True)
    assert "--allow-pickle" not in str(attempted.value)
    assert "\n" not in str(attempted.value)


def test_ckpt_with_allow_pickle_loads(tiny_pipeline_dirs, tmp_path):
    from ..ldm_format import pipeline_to_ldm

    folder = tiny_pipeline_dirs["sd15"]
    reference = load_model(str(folder), linfusion=None)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(reference.pipe)}, path)  # A1111's .ckpt nesting
    loaded = load_model(str(path), config=str(folder), linfusion=None, allow_pickle=True)
    for name, module in _components(reference.pipe).items():
        got = getattr(loaded.pipe, name).state_dict()
        assert all(torch.equal(got[k], v) for k, v in module.state_dict().items()), name


def test_unreadable_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises(InputError) as info:
        load_model(str(path), linfusion=None, allow_pickle=True)
    assert "junk.ckpt" in str(info.value) and "\n" not in str(info.value)


# --- 3. local diffusers folders ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_local_folder_family_dtype_and_scheduler(family, tiny_pipeline_dirs):
    folder = tiny_pipeline_dirs[family]
    loaded = load_model(str(folder), linfusion=None, device="cpu")
    assert loaded.family == family
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32 and loaded.vae_dtype == torch.float32
    assert loaded.pipe.unet.dtype == torch.float32 and loaded.pipe.vae.dtype == torch.float32
    expected = "v_prediction" if family == "sd21" else "epsilon"
    assert loaded.pipe.scheduler.config.prediction_type == expected
    assert loaded.linfusion is None and loaded.linfusion_layers == []

    bf16 = load_model(str(folder), linfusion=None, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.pipe.unet.dtype == torch.bfloat16

    euler = load_model(str(folder), linfusion=None, device="cpu", scheduler="euler")
    assert type(euler.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert euler.sampler == "Euler"
    assert euler.pipe.scheduler.config.prediction_type == expected
    assert euler.pipe.scheduler.config.beta_schedule == loaded.pipe.scheduler.config.beta_schedule


def test_unknown_scheduler_and_dtype_are_input_errors(tiny_pipeline_dirs):
    with pytest.raises(InputError, match="scheduler"):
        load_model(str(tiny_pipeline_dirs["sd15"]), linfusion=None, scheduler="nope")
    with pytest.raises(InputError, match="dtype"):
        load_model(str(tiny_pipeline_dirs["sd15"]), linfusion=None, dtype="int3")


# --- 4. missing models ---------------------------------------------------------------------------


def test_uncached_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    model = "nobody-here/no-such-model-xyz"
    with pytest.raises(ModelNotFoundError) as info:
        load_model(model, linfusion=None)
    message = str(info.value)
    assert model in message, message
    assert "\n" not in message and "Traceback" not in message, message
    assert "download" in message and "--model" in message, message  # how to provide it


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_model(str(tmp_path), linfusion=None)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/model.safetensors", "missing.ckpt"])
def test_nonexistent_path(name):
    with pytest.raises(ModelNotFoundError, match="model not found"):
        load_model(name, linfusion=None)


# --- 5. the demo model ---------------------------------------------------------------------------


def test_demo_built_once_and_mounts_linfusion(tmp_path, monkeypatch):
    from linfusion_cli.models import tiny

    monkeypatch.setenv("LINFUSION_CACHE", str(tmp_path / "cache"))
    builds = []
    real = tiny.save_tiny_pipeline
    monkeypatch.setattr(tiny, "save_tiny_pipeline", lambda *a, **k: builds.append(a) or real(*a, **k))

    first = load_model("demo")
    assert first.family == "sd15"
    assert first.linfusion == "fresh" and len(first.linfusion_layers) > 0
    folders = [p for p in cache_dir().iterdir()]
    assert len(folders) == 1 and (folders[0] / "model_index.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in folders[0].rglob("*") if p.is_file()}

    second = load_model("demo")
    assert len(builds) == 1
    assert {p: p.stat().st_mtime_ns for p in folders[0].rglob("*") if p.is_file()} == stamps
    assert second.linfusion == "fresh" and second.linfusion_layers == first.linfusion_layers
    assert [p for p in cache_dir().iterdir()] == folders  # no leftover temp folders
    assert not any(".tmp" in p.name for p in cache_dir().iterdir())
    assert os.environ["LINFUSION_CACHE"] == str(cache_dir())


def test_gpu_defaults_set_the_allocator_unless_the_user_did(monkeypatch):
    """The CUDA settings, forced on the CPU: expandable segments unless either allocator
    variable is set, cuDNN autotuning and TF32 for float32 fallbacks (CUDA-only switches)."""
    import os

    import torch

    from linfusion_cli.models.loading import gpu_defaults

    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu_defaults()
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
        monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
        gpu_defaults()
        assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved
