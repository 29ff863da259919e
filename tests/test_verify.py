"""verify(): the static and dynamic dtype-consistency check, on hand-made and loaded models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loaderkit
from loaderkit import VerifyError

from conftest import TinyNet


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.SiLU())
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.conv_in(x)).mean((2, 3)))


def kinds(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in report.problems:
        out.setdefault(p.module, set()).add(p.kind)
    return out


def test_clean_model_passes():
    model = ConvNet().to(torch.bfloat16)
    report = loaderkit.verify(model, torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    assert report.ok, str(report)
    assert report.modules_checked == 3 and report.compute_dtypes == {"bfloat16": 3}
    assert report.ran_forward
    assert str(report).startswith("verify: ok")
    assert loaderkit.verify(model, strict=True).ok


def test_fp8_conv_without_cast_rule_is_flagged_by_name():
    model = ConvNet().to(torch.bfloat16)
    model.body[0].to(torch.float8_e4m3fn)  # weight and bias, as a plain checkpoint cast would leave them
    report = loaderkit.verify(model)
    assert not report.ok
    assert kinds(report) == {"body.0": {"storage"}}
    problem = report.problems[0]
    assert "float8_e4m3fn" in problem.message and "weight" in problem.message and "bias" in problem.message
    assert "body.0" in str(report)
    # and this is the crash it predicts
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    dynamic = loaderkit.verify(model, torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    assert "forward" in kinds(dynamic).get("", set())


def test_mixed_dtypes_within_a_module_are_flagged():
    model = ConvNet()
    model.out.bias.data = model.out.bias.data.to(torch.float16)
    report = loaderkit.verify(model)
    assert kinds(report) == {"out": {"storage"}}
    assert "mixed" in report.problems[0].message
    assert "float16" in report.problems[0].message and "float32" in report.problems[0].message


def test_bf16_activation_into_fp32_linear_is_flagged():
    model = TinyNet()  # float32 throughout
    report = loaderkit.verify(model, torch.randn(2, 8, dtype=torch.bfloat16))
    flagged = kinds(report)
    assert flagged["proj"] == {"activation"}
    msg = next(p.message for p in report.problems if p.module == "proj")
    assert "bfloat16" in msg and "float32" in msg
    assert report.ran_forward


def test_activation_check_with_kwargs():
    class KwNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, *, x):
            return self.lin(x)

    report = loaderkit.verify(KwNet(), example_kwargs={"x": torch.randn(1, 4, dtype=torch.float16)})
    assert kinds(report).get("lin") == {"activation"}


def test_strict_raises_verify_error_naming_the_module():
    model = ConvNet()
    model.conv_in.to(torch.float8_e5m2)
    with pytest.raises(VerifyError) as err:
        loaderkit.verify(model, strict=True)
    assert err.value.module == "conv_in"
    assert "conv_in" in str(err.value)
    assert isinstance(err.value, loaderkit.LoaderKitError)


def test_plan_mismatch_is_flagged(tiny_ckpt):
    path, _ = tiny_ckpt
    plan = loaderkit.plan(path, "bf16", model=TinyNet)
    report = loaderkit.verify(TinyNet(), plan=plan)  # float32 module against a bf16 plan
    assert kinds(report) == {"proj": {"plan"}, "norm": {"plan"}, "head": {"plan"}}


@pytest.mark.parametrize("strategy, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_loaded_model_passes(tiny_ckpt, strategy, dtype):
    path, _ = tiny_ckpt
    model = loaderkit.load(path, strategy, model=TinyNet)
    report = loaderkit.verify(model, torch.randn(2, 8, dtype=dtype))
    assert report.ok, str(report)
    assert report.compute_dtypes == {str(dtype).removeprefix("torch."): 3}
    # the model is checked against the plan it was loaded with
    model.norm.float()
    assert kinds(loaderkit.verify(model)).get("norm") == ({"plan"} if strategy != "fp32" else None)


def test_loaded_model_casts_float32_inputs(tiny_ckpt):
    path, ref = tiny_ckpt
    model = loaderkit.load(path, "bf16", model=TinyNet)
    x = torch.randn(2, 8)
    report = loaderkit.verify(model, x)
    assert report.ok, str(report)
    with torch.no_grad():
        out = model(x)
        want = ref.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


def test_integer_weight_in_a_linear_is_flagged():
    model = TinyNet()
    model.proj.weight = nn.Parameter(torch.ones(16, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 8))
    assert kinds(loaderkit.verify(model)).get("proj") == {"storage"}
