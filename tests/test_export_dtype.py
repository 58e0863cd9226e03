"""rlft export writes the dtype the run trained and served in (so an exported model answers as
the run and ``rlft serve`` did), and ``--dtype`` chooses another."""

import json

import pytest
import torch
from safetensors import safe_open

from rlft.cli import main


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, pretrained_tiny_dir):
    """A run store with one LoRA checkpoint of a bf16 run (non-zero adapter weights), written as the trainer does."""
    from rlft.policy import LoraSpec, load_policy
    from rlft.store import RunStore
    from rlft.training.checkpoint import save_checkpoint

    runs = tmp_path_factory.mktemp("runs")
    store = RunStore(runs)
    run_id = store.create_run(name="bf16-run", model=pretrained_tiny_dir)
    policy = load_policy(pretrained_tiny_dir, dtype="bfloat16", lora=LoraSpec(rank=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = save_checkpoint(store.run_dir(run_id), 1, policy, opt, sched)
    store.add_checkpoint(run_id, 1, str(path))
    store.close()
    return str(runs), run_id


def _dtypes(out) -> set[str]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict


def test_export_defaults_to_the_trained_dtype_and_dtype_flag_overrides(bf16_run, tmp_path, capsys):
    runs, run_id = bf16_run
    assert main(["export", run_id, "--runs", runs, "--merge", str(tmp_path / "bf16")]) == 0
    assert "in bfloat16" in capsys.readouterr().out
    assert _dtypes(tmp_path / "bf16") == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["export", run_id, "--runs", runs, "--merge", str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    assert _dtypes(tmp_path / "fp32") == {"F32"}

