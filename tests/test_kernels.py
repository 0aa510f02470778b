"""Fused kernels against their plain-torch references: on the CPU through Triton's interpreter (a subprocess with
TRITON_INTERPRET=1, which must be set before Triton compiles the kernels), and on CUDA when a GPU is present.

Stated bounds (relative to the reference, elementwise with an absolute floor): channel statistics and their
gradient 1e-5 for fp32 inputs; for bf16 inputs the statistics 1e-5 (both read the same bf16 values and accumulate in
fp32) and the gradient one bf16 rounding (1e-2). BOOT loss and its gradient 1e-5 for fp32 and bf16 inputs (the
kernel computes in fp32 from the same values)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BOOT_FAST

from gendistill import kernels
from gendistill.cli import main
from gendistill.kernels import reference

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

CHECKS = textwrap.dedent(
    """
    import json, sys
    import torch
    from gendistill import kernels
    from gendistill.kernels import reference

    device = sys.argv[1]
    torch.manual_seed(0)
    out = {}

    def rel(a, b):
        return ((a.float() - b.float()).abs() / (b.float().abs() + 1e-3)).max().item()

    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((7, 5, 6, 3), (33, 4), (3, 6, 50)):
            x = (torch.randn(*shape) * 2 + 3).to(device=device, dtype=dtype)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            mean, var = kernels.channel_stats(xa, backend="triton")
            rmean, rvar = reference.channel_stats(xb)
            gm, gv = torch.randn_like(rmean), torch.randn_like(rvar)
            ((mean * gm).sum() + (var * gv).sum()).backward()
            ((rmean * gm).sum() + (rvar * gv).sum()).backward()
            key = f"stats {dtype} {shape}"
            out[key] = {"mean": rel(mean, rmean), "var": rel(var, rvar), "grad": rel(xa.grad, xb.grad),
                        "grad_dtype": str(xa.grad.dtype)}
        # only the mean used: the variance gradient is None
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        kernels.channel_stats(xa, backend="triton")[0].sum().backward()
        reference.channel_stats(xb)[0].sum().backward()
        out[f"stats mean-only {dtype}"] = {"grad": rel(xa.grad, xb.grad)}

        for pred in ("epsilon", "v_prediction", "sample"):
            for guided in (True, False):
                b, shape = 5, (5, 3, 9, 7)
                student = torch.randn(shape, device=device)
                tensors = [torch.randn(shape, device=device).to(dtype) for _ in range(4)]
                if not guided:
                    tensors[3] = None
                coef = [torch.rand(b, device=device) * 3, torch.rand(b, device=device) * 0.9 + 0.1,
                        torch.rand(b, device=device), torch.rand(b, device=device) * 0.9 + 0.1]
                sa, sb = student.clone().requires_grad_(), student.clone().requires_grad_()
                la = kernels.boot_guided_loss(sa, *tensors, *coef, pred, backend="triton")
                lb = reference.boot_guided_loss(sb, *tensors, *coef, pred)
                g = torch.randn(b, device=device)
                (la * g).sum().backward()
                (lb * g).sum().backward()
                out[f"boot {dtype} {pred} guided={guided}"] = {"loss": rel(la, lb), "grad": rel(sa.grad, sb.grad)}
    print(json.dumps(out))
    """
)


def _check(results: dict) -> None:
    assert results, "no kernel was checked"
    for key, errors in results.items():
        bf16 = "bfloat16" in key
        for name, value in errors.items():
            if name == "grad_dtype":
                assert value == ("torch.bfloat16" if bf16 else "torch.float32"), key
                continue
            bound = 1e-2 if (bf16 and key.startswith("stats") and name == "grad") else 1e-5
            assert value <= bound, f"{key} {name}: relative error {value:.2e} > {bound:.0e}"


@needs_triton
@pytest.mark.slow
def test_triton_kernels_match_the_references_in_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHECKS, "cpu"], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * (3 + 1 + 6)
    _check(results)


@needs_triton
@pytest.mark.gpu
def test_triton_kernels_match_the_references_on_cuda(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CHECKS, "cuda"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check(json.loads(result.stdout.strip().splitlines()[-1]))


def test_references_against_independent_computations():
    """The references themselves: statistics against numpy, the BOOT loss written out per element."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    mean, var = reference.channel_stats(x)
    values = x.permute(1, 0, 2, 3).reshape(3, -1).double().numpy()
    torch.testing.assert_close(mean.double(), torch.tensor(values.mean(1)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), torch.tensor(values.var(1)), rtol=1e-6, atol=1e-6)

    student, y_prev, x_t, uc, uu = (torch.randn(2, 1, 2, 2) for _ in range(5))
    w, a, s, d = torch.tensor([2.0, 1.5]), torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.8]), torch.tensor([0.5, 0.2])
    loss = reference.boot_guided_loss(student, y_prev, x_t, uc, uu, w, a, s, d, "epsilon")
    for i in range(2):
        total = 0.0
        for e in range(4):
            u = uu[i].flatten()[e] + w[i] * (uc[i].flatten()[e] - uu[i].flatten()[e])
            f = (x_t[i].flatten()[e] - s[i] * u) / a[i]
            y = y_prev[i].flatten()[e]
            target = y + d[i] * (f - y)
            total += float((student[i].flatten()[e] - target) ** 2 / d[i] ** 2)
        assert loss[i].item() == pytest.approx(total / 4, rel=1e-5)


def test_backend_selection_and_bad_input(monkeypatch):
    x = torch.randn(4, 3, 2, 2)
    # CPU tensors take the reference automatically
    torch.testing.assert_close(kernels.channel_stats(x)[1], reference.channel_stats(x)[1])
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'; valid: triton, torch"):
        kernels.channel_stats(x, backend="cuda")
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="needs CUDA tensors, got a cpu tensor"):
            kernels.channel_stats(x, backend="triton")
    with pytest.raises(ValueError, match="expects \\(N, C, ...\\)"):
        kernels.channel_stats(torch.randn(5))
    s = torch.randn(2, 1, 2, 2)
    one = torch.ones(2)
    with pytest.raises(ValueError, match="u_cond has shape \\(2, 1, 2, 3\\)"):
        kernels.boot_guided_loss(s, s, s, torch.randn(2, 1, 2, 3), None, one, one, one, one, "epsilon")
    with pytest.raises(ValueError, match="d must hold one value per sample \\(2\\)"):
        kernels.boot_guided_loss(s, s, s, s, None, one, one, one, torch.ones(3), "epsilon")
    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        kernels.boot_guided_loss(s, s, s, s, None, one, one, one, one, "x0")
    assert kernels.backend_for(True) is None and kernels.backend_for(False) == "torch"


def test_two_runs_in_one_process_each_use_their_recipes_kernel_backend(
    monkeypatch, bn_teacher, class_teacher_dir, tmp_path
):
    # The recipes' fused_kernels flag reaches the kernels as an argument (no process-wide switch): fused, then not,
    # then fused again in one process, each run's kernel calls carry its own recipe's backend.
    import gendistill.dfkd.losses as losses
    import gendistill.diffusion.boot as boot

    seen = []

    def recording(name, kernel):
        def wrapped(*args, backend=None):
            seen.append((name, backend))
            return kernel(*args, backend=backend)

        return wrapped

    monkeypatch.setattr(losses, "channel_stats", recording("dfkd", losses.channel_stats))
    monkeypatch.setattr(boot, "boot_guided_loss", recording("boot", boot.boot_guided_loss))
    dfkd = ["dfkd", "--teacher", str(bn_teacher), "--batch-size", "4", "--max-steps", "1", "--eval-every", "0"]
    dfkd += ["--sample-every", "0", "--checkpoint-every", "0", "--method-options", "ngf=8,nz=16,student_steps=1"]
    boot_argv = ["boot", "--teacher", class_teacher_dir, *BOOT_FAST, "--max-steps", "1", "--checkpoint-every", "0"]
    expected = []
    for i, fused in enumerate((True, False, True)):
        seen.clear()
        flag = ["--fused-kernels", str(fused).lower()]
        assert main([*dfkd, *flag, "--output", str(tmp_path / f"dfkd{i}")]) == 0
        assert main([*boot_argv, *flag, "--output", str(tmp_path / f"boot{i}")]) == 0
        backend = None if fused else "torch"
        assert {name for name, _ in seen} == {"dfkd", "boot"}
        assert {b for _, b in seen} == {backend}, (fused, seen)
        expected.append(backend)
    assert expected == [None, "torch", None]
