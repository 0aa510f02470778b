"""Speed options besides the kernels, each checked against the plain path: fused AdamW, torch.compile of the
trainable modules through Accelerate (recipe ``compile``), and compiled one-step sampling in the BOOT pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BOOT_FAST, save_teacher
from safetensors.torch import load_file

from gendistill.cli import main
from gendistill.pipelines import BootImagePipeline


@pytest.mark.gpu
def test_fused_adamw_on_cuda_matches_the_loop_implementation():
    """fused_optimizer: torch's fused AdamW on CUDA parameters, within 1e-6 of the per-parameter loop after 5 steps;
    CPU parameters (and fused_optimizer false) keep the loop."""
    from gendistill.training.boot import BootRecipe
    from gendistill.training.core import make_optimizer

    torch.manual_seed(0)
    weights = [torch.randn(64, 64, device="cuda", requires_grad=True) for _ in range(2)]
    copies = [w.detach().clone().requires_grad_() for w in weights]
    fused = make_optimizer(BootRecipe(fused_optimizer=True), weights, 1e-2)
    loop = make_optimizer(BootRecipe(fused_optimizer=False), copies, 1e-2)
    assert fused.defaults["fused"] and not loop.defaults.get("fused")
    for _ in range(5):
        for opt, params in ((fused, weights), (loop, copies)):
            opt.zero_grad()
            sum((p**2).sum() for p in params).backward()
            opt.step()
    for a, b in zip(weights, copies):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_optimizer_keeps_the_loop_for_cpu_parameters():
    from gendistill.training.boot import BootRecipe
    from gendistill.training.core import make_optimizer

    params = [torch.nn.Parameter(torch.randn(3))]
    assert not make_optimizer(BootRecipe(fused_optimizer=True), params, 1e-3).defaults.get("fused")


def test_compile_recipe_flag_trains_and_exports_like_the_plain_path(tmp_path, capsys):
    """``--compile eager`` runs the student through TorchDynamo (same kernels as eager): the same losses and the
    same exported weights as ``--compile no``, saved without compile wrappers."""
    teacher = save_teacher(tmp_path / "t")
    graphs = {}
    for backend in ("no", "eager"):
        argv = ["boot", "--teacher", teacher, "--output", str(tmp_path / backend), *BOOT_FAST, "--max-steps", "3"]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        assert main([*argv, "--compile", backend]) == 0
        graphs[backend] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs["no"] == 0 and graphs["eager"] > 0  # the flag really sends the student through Dynamo
    losses = {
        b: [
            json.loads(line)["loss/student"]
            for line in (tmp_path / b / "logs" / "metrics.jsonl").open()
            if "loss/student" in line
        ]
        for b in ("no", "eager")
    }
    assert len(losses["no"]) == 3
    torch.testing.assert_close(torch.tensor(losses["eager"]), torch.tensor(losses["no"]), rtol=1e-5, atol=1e-7)
    a = load_file(tmp_path / "no" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "eager" / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(a) == set(b) and not any("_orig_mod" in k for k in b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert main(["boot", "--teacher", teacher, "--output", str(tmp_path / "bad"), "--compile", "tvm"]) == 2
    assert "compile 'tvm' is not valid; valid: no, eager, aot_eager, inductor" in capsys.readouterr().err


def test_pipeline_compile_option_matches_the_plain_pipeline(tmp_path):
    """``enable_compile`` wraps the student UNet (CUDA graphs by default on CUDA); here with the eager backend on the
    CPU: the same images, and saving writes the original weights."""
    teacher = save_teacher(tmp_path / "t")
    out = tmp_path / "s"
    assert main(["boot", "--teacher", teacher, "--output", str(out), *BOOT_FAST, "--max-steps", "1"]) == 0
    pipe = BootImagePipeline.from_pretrained(out)
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = pipe(class_labels=[0, 1], latents=eps, output_type="pt").images
    pipe.enable_compile(mode=None, backend="eager")
    assert type(pipe.unet).__name__ == "OptimizedModule" and pipe.unet.config.in_channels == 1
    compiled = pipe(class_labels=[0, 1], latents=eps, output_type="pt").images
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-6)
    pipe.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("_orig_mod" in k for k in saved)
    with pytest.raises(ValueError, match="mode 'fastest' is not valid"):
        pipe.enable_compile(mode="fastest")
