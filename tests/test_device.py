"""stvit_core.device: --device is checked before any model or data work, in the library and the CLI."""

import pytest
import torch

from stvit_core.device import autocast, resolve_device
from stvit_core.errors import InvalidArgumentError
from stvit_core.evaluate import evaluate_model
from stvit_core.train import resolve_config, train
from tests.train_utils import assert_one_line_error, cli_in_process, tiny_stvit

UNKNOWN = ["tpu", "cuda:x", "GPU", "meta", "xpu", "cuda:-1"]


def test_auto_and_cpu():
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", UNKNOWN)
def test_unknown_devices_are_one_clear_error(spec):
    with pytest.raises(InvalidArgumentError, match="--device") as err:
        resolve_device(spec)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused():
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
            resolve_device(spec)


def test_entry_points_check_the_device_first(tmp_path):
    # the data and the model do not exist: the device error must come before either is looked at
    cfg = resolve_config(overrides=dict(data=str(tmp_path / "no-data"), output=str(tmp_path / "out"), device="tpu"))
    with pytest.raises(InvalidArgumentError, match="--device 'tpu'"):
        train(cfg, torch.nn.Linear(1, 1))
    with pytest.raises(InvalidArgumentError, match="--device 'cuda:x'"):
        evaluate_model(str(tmp_path / "no-model"), str(tmp_path / "no-data"), imagenet=False, device="cuda:x")
    for command in (["finetune", "-o", str(tmp_path / "out")], ["eval", "folder"], ["eval", "imagenet"]):
        r = cli_in_process([*command, "-m", str(tmp_path / "no-model"), "-d", str(tmp_path / "no-data"),
                            "--device", "tpu"])
        assert_one_line_error(r, "--device", "tpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), (None, torch.float32)])
def test_amp_autocasts_on_cpu(amp, dtype):
    """--amp on CPU is torch's CPU autocast (it used to be a silent float32 run): every linear layer of a real
    model computes in the asked dtype, and the forward still works."""
    model = tiny_stvit(tokens=4).eval()
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    with torch.no_grad(), autocast(torch.device("cpu"), amp):
        logits = model(torch.randn(2, 3, 28, 28))
    assert seen == {dtype} and logits.dtype == dtype and torch.isfinite(logits.float()).all()
